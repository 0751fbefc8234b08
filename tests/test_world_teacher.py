"""The world's teacher training: exact resumption from a checkpoint, and the v-prediction variant."""

import dataclasses

import pytest
import torch

from latent_consistency.models import save_diffusion_pipeline
from latent_consistency.world.fit import Checkpointer, Phase
from latent_consistency.world.presets import PRESETS
from latent_consistency.world.teacher import make_teacher_unet, teacher_scheduler_config, train_teacher

CONFIG = dataclasses.replace(PRESETS["tiny"].teacher, steps=6, batch_size=4)


class Interrupted(Exception):
    pass


class InterruptingCheckpointer(Checkpointer):
    """Stops the run right after the checkpoint of step `at` is written, as a kill would."""

    def __init__(self, run_dir, every, at):
        super().__init__(run_dir, every)
        self.at = at

    def step(self, step, *args):
        super().step(step, *args)
        if step == self.at:
            raise Interrupted


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, 8, 8, generator=g), torch.randint(3, (16,), generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(5, 32, generator=g)


def train(checkpointer, prediction_type="epsilon", zero_terminal_snr=False):
    torch.manual_seed(0)
    unet = make_teacher_unet(CONFIG, latent_size=8, latent_channels=4, cross_attention_dim=32)
    phase = Phase(torch.device("cpu"), torch.Generator().manual_seed(1), checkpointer, progress=False)
    return unet, *train_teacher(unet, *data(), teacher_scheduler_config(prediction_type, zero_terminal_snr), CONFIG, phase)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    _, ema_straight, losses_straight = train(Checkpointer(tmp_path / "straight", every=100))
    with pytest.raises(Interrupted):
        train(InterruptingCheckpointer(tmp_path / "resumed", every=3, at=3))
    _, ema_resumed, losses_resumed = train(Checkpointer(tmp_path / "resumed", every=3))
    assert losses_resumed == pytest.approx(losses_straight, rel=1e-5)
    for a, b in zip(ema_resumed.parameters(), ema_straight.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_prediction_teacher_saves_a_pipeline_diffusers_runs(tmp_path, zero_terminal_snr):
    from diffusers import StableDiffusionPipeline

    from tiny_models import make_tiny_components

    _, ema, losses = train(Checkpointer(tmp_path / "run", every=100), "v_prediction", zero_terminal_snr)
    assert len(losses) == CONFIG.steps and all(torch.isfinite(torch.tensor(losses)))
    parts = make_tiny_components(tmp_path / "parts")
    config = teacher_scheduler_config("v_prediction", zero_terminal_snr)
    save_diffusion_pipeline(tmp_path / "sd", ema, parts["vae"], parts["text_encoder"], parts["tokenizer"], config)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr == zero_terminal_snr
    images = pipe("a red star", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert torch.isfinite(images).all()
    # Zero terminal SNR: diffusers' sampler starts from pure noise at t = T-1, where the schedule has no signal.
    pipe.scheduler.set_timesteps(2)
    assert (int(pipe.scheduler.timesteps[0]) == 999) == zero_terminal_snr
    assert (float(pipe.scheduler.alphas_cumprod[-1]) < 1e-6) == zero_terminal_snr


def test_zero_terminal_snr_schedule_is_the_one_the_library_reads():
    """Our NoiseSchedule from the zero-SNR teacher config: diffusers' ᾱ, the last raised to 2^-24 as its DPM-Solver's."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from latent_consistency.schedule import NoiseSchedule

    config = teacher_scheduler_config("v_prediction", zero_terminal_snr=True)
    ours = NoiseSchedule.from_config(config).alphas_cumprod
    ddim = DDIMScheduler.from_config(config).alphas_cumprod.double()
    torch.testing.assert_close(ours[:-1], ddim[:-1], rtol=0, atol=0)
    assert float(ddim[-1]) == 0.0 and float(ours[-1]) == 2.0**-24
    assert float(DPMSolverMultistepScheduler.from_config(config).alphas_cumprod[-1]) == 2.0**-24


def test_zero_terminal_snr_is_read_from_the_schedule_itself():
    from latent_consistency.schedule import NoiseSchedule, make_betas

    assert NoiseSchedule.from_config(teacher_scheduler_config("v_prediction", zero_terminal_snr=True)).zero_terminal_snr
    assert not NoiseSchedule.from_config(teacher_scheduler_config("v_prediction")).zero_terminal_snr
    # the same betas given as trained_betas, without the flag
    betas = make_betas(rescale_betas_zero_snr=True).tolist()
    assert NoiseSchedule.from_config({"trained_betas": betas}).zero_terminal_snr
