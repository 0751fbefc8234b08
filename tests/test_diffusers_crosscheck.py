"""Our LCM sampler and timesteps against diffusers' LatentConsistencyModelPipeline on the same tiny model."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from latent_consistency.denoisers import ConsistencyModel, UNetNetwork
from latent_consistency.models import encode_prompts, load_lcm
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps, sample_lcm
from latent_consistency.schedule import NoiseSchedule


@pytest.mark.parametrize("original_steps", [50, 25])
def test_timesteps_match_lcm_scheduler(original_steps):
    scheduler = LCMScheduler(original_inference_steps=original_steps)
    for n in range(1, 9):
        scheduler.set_timesteps(n)
        assert lcm_timesteps(n, 1000, original_steps).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_lcm_equals_pipeline(tiny_lcm, steps):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star", "a blue ring at the top"]
    g = 7.5
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(
        prompts, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent",
        generator=torch.Generator().manual_seed(11),
    ).images

    model = load_lcm(str(tiny_lcm))
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    f = ConsistencyModel(UNetNetwork(model.unet), schedule, model.prediction_type, model.time_cond_proj_dim)
    cond = encode_prompts(model.tokenizer, model.text_encoder, prompts)
    ours = sample_lcm(
        f, latents.clone(), lcm_timesteps(steps, 1000, 50), cond, omega_from_guidance_scale(g), schedule,
        generator=torch.Generator().manual_seed(11),
    )
    assert (ours - ref).abs().max().item() < 1e-5
