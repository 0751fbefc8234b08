"""Teacher and LCM folders whose scheduler config varies as real SD-family checkpoints' do: a cosine beta schedule, a config
that leaves keys to its class's defaults, Euler's continuous timesteps. Each is read as diffusers reads it (the same ᾱ_t, the
same LCM timesteps, the same images as `LatentConsistencyModelPipeline`) or refused in one line."""

import json
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LatentConsistencyModelPipeline, LCMScheduler

from latent_consistency.models import load_diffusion_model, load_lcm
from latent_consistency.sampling import sample_lcm
from latent_consistency.schedule import NoiseSchedule


def with_scheduler_config(folder, tmp_path, config: dict):
    """A copy of a model folder whose scheduler/scheduler_config.json is `config`, as written (no keys filled in)."""
    copy = shutil.copytree(folder, tmp_path / f"{folder.name}-edited")
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return copy


def pipeline_and_ours(folder, steps: int, g: float = 5.0):
    """(LatentConsistencyModelPipeline's latents, sample_lcm's) from the same noise and generator seed."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = pipe(["a star"], num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    model = load_lcm(str(folder))
    f = model.consistency_model()
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), model.prompts.encode(["a star"]), g - 1, f.schedule,
                      torch.Generator().manual_seed(2))
    return ref, ours


# --- squaredcos_cap_v2: ᾱ_{T-1} is tiny, not zero ----------------------------------------------------------------------------

@pytest.mark.parametrize("T", [500, 1000, 1200])
def test_a_cosine_schedule_keeps_diffusers_terminal_alpha(T):
    # was: ᾱ_{T-1} = 2.4e-9 (T = 1000) was raised to 2^-24 = 6e-8 as if it were a zero-terminal-SNR 0, so α_{T-1} was 2.4e-4
    # where every diffusers scheduler has 4.9e-5: 5x at the first LCM step, whose timestep is T-1
    ref = LCMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    ours = NoiseSchedule.from_config({"num_train_timesteps": T, "beta_schedule": "squaredcos_cap_v2"})
    torch.testing.assert_close(ours.alphas_cumprod, ref, rtol=1e-6, atol=0)
    assert ours.zero_terminal_snr  # SNR 2.4e-9 at T-1: ε-prediction there is refused as at zero terminal SNR


def test_an_epsilon_lcm_on_a_cosine_schedule_samples_as_the_pipeline(tmp_path):
    # was: the first x̂0 = (z - σ·ε̂)/α at t = 999 divided by 2^-12 instead of √2.4e-9: latents 52066 off at a magnitude of 65235
    from tiny_models import make_tiny_components

    parts = make_tiny_components(tmp_path / "build", "epsilon", time_cond_proj_dim=32)
    parts["scheduler"] = LCMScheduler.from_config(parts["scheduler"].config, beta_schedule="squaredcos_cap_v2")
    folder = tmp_path / "cos-lcm"
    LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    ref, ours = pipeline_and_ours(folder, steps=2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_distilling_a_cosine_v_prediction_teacher_exports_an_lcm_that_samples_as_the_pipeline(tiny_sd, tmp_path):
    # was: `lcm distill` -> export -> `lcm generate` differed from LatentConsistencyModelPipeline on the export by 5.7e-4 at one
    # step (x̂0 = α·z - σ·v with α_{999} raised from 4.9e-5 to 2.4e-4)
    from latent_consistency.cli import main
    from tiny_models import write_captioned_images

    config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    teacher = with_scheduler_config(tiny_sd, tmp_path, config | {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})
    data, out = write_captioned_images(tmp_path / "images", 4), tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "1"]) == 0
    exported = json.loads((out / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["beta_schedule"] == "squaredcos_cap_v2" and exported["prediction_type"] == "v_prediction"
    for steps in (1, 4):
        ref, ours = pipeline_and_ours(out / "lcm", steps)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_distilling_a_cosine_epsilon_teacher_is_refused_naming_the_cosine_schedule(tiny_sd, tmp_path, run_error):
    # was: refused as "a zero-terminal-SNR schedule", a setting the user never made (the cosine schedule's α_{T-1} is 4.9e-5)
    from tiny_models import write_captioned_images

    config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    teacher = with_scheduler_config(tiny_sd, tmp_path, config | {"beta_schedule": "squaredcos_cap_v2"})
    data = write_captioned_images(tmp_path / "images", 4)
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "run"),
                           "--student-prediction", "epsilon"])
    assert code == 2 and "cosine schedule" in err and "4.9e-05" in err, err


# --- a config that leaves keys to its class's defaults ----------------------------------------------------------------------

def test_a_teacher_config_without_betas_has_its_classes_default_schedule(tiny_sd, tmp_path):
    # was: a missing beta_start/beta_end/beta_schedule read as LCMScheduler's scaled_linear 0.00085..0.012 (ᾱ_999 = 0.0047),
    # where diffusers' EulerDiscreteScheduler (as DDIM, PNDM, DPM-Solver) defaults to linear 0.0001..0.02 (ᾱ_999 = 4.0e-5)
    config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    model = load_diffusion_model(str(with_scheduler_config(tiny_sd, tmp_path, config)))
    ref = EulerDiscreteScheduler.from_config(config).alphas_cumprod.double()
    torch.testing.assert_close(model.schedule.alphas_cumprod, ref, rtol=1e-6, atol=0)


def test_an_lcm_config_without_original_inference_steps_is_an_lcm(tiny_lcm, tmp_path):
    # was: `original_inference_steps` left to LCMScheduler's default (50) made the folder "not an LCM": `lcm generate` refused it,
    # `lcm distill` took it for a guidance-distilled teacher
    config = json.loads((tiny_lcm / "scheduler" / "scheduler_config.json").read_text())
    del config["original_inference_steps"]
    folder = with_scheduler_config(tiny_lcm, tmp_path, config)
    assert load_diffusion_model(str(folder)).is_lcm
    scheduler = LCMScheduler.from_config(config)
    for steps in (1, 4):
        scheduler.set_timesteps(steps)
        assert load_lcm(str(folder)).timesteps(steps).tolist() == scheduler.timesteps.tolist()


# --- Euler's continuous timesteps ---------------------------------------------------------------------------------------------

def test_a_continuous_timestep_euler_config_is_refused(tiny_sd, tmp_path, run_error):
    # was: a v-prediction model on EulerDiscreteScheduler(timestep_type="continuous") (CosXL-style: its network takes
    # 0.25·log σ_t as the time input) was sampled and distilled with integer timesteps, silently wrong
    config = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    config |= {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "timestep_type": "continuous"}
    teacher = with_scheduler_config(tiny_sd, tmp_path, config)
    code, err = run_error(["generate", "a star", "--model", str(teacher), "--sampler", "ddim", "--steps", "2",
                           "--out", str(tmp_path / "images")])
    assert code == 2 and len(err.splitlines()) == 1 and "continuous" in err, err


# --- DDIM at T steps under SD's steps_offset 1 --------------------------------------------------------------------------------

def test_as_many_ddim_steps_as_training_timesteps_under_steps_offset_is_refused(tiny_sd, tmp_path, run_error):
    # was: `lcm generate --sampler ddim --steps 1000` (the "1..T" the help allows) on a config with steps_offset 1 and leading
    # spacing (SD 1.x/2.x's) started at timestep 1000 and crashed in DDIMScheduler.step with an IndexError traceback
    assert json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1
    code, err = run_error(["generate", "a star", "--model", str(tiny_sd), "--sampler", "ddim", "--steps", "1000",
                           "--out", str(tmp_path / "images"), "--height", "16", "--width", "16"])
    assert code == 2 and len(err.splitlines()) == 1 and "999" in err, err
