"""img2img: the start timestep a strength picks (against LCMScheduler, and where diffusers differs: the float floor of
0.58·50 and issue #7651's get_timesteps), and `LCMGenerator` with init images against diffusers'
LatentConsistencyModelImg2ImgPipeline on the same tiny LCM."""

import types

import pytest
import torch
from diffusers import LatentConsistencyModelImg2ImgPipeline, LCMScheduler, StableDiffusionImg2ImgPipeline

from latent_consistency.errors import UserError
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.sampling import lcm_timesteps


def test_strength_known_timesteps():
    # s = 0.5: the grid's first 25 points {19, ..., 499}, 4 of them from the top at indices 0, 6, 12, 18
    assert lcm_timesteps(4, 1000, 50, strength=0.5).tolist() == [499, 379, 259, 139]
    assert lcm_timesteps(1, 1000, 50, strength=0.8).tolist() == [799]
    assert lcm_timesteps(1, 1000, 50, strength=0.02).tolist() == [19]
    assert lcm_timesteps(4, 1000, 50, strength=1.0).tolist() == lcm_timesteps(4, 1000, 50).tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("original_steps", [50, 25])
@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5, 0.75, 0.8, 0.95, 1.0])
def test_strength_timesteps_match_lcm_scheduler(original_steps, strength):
    """Where diffusers' int(N·s) is exact, LCMScheduler.set_timesteps(strength=s) (what LatentConsistencyModelImg2ImgPipeline
    uses) and ours agree for every step count that fits."""
    scheduler = LCMScheduler(original_inference_steps=original_steps)
    for n in range(1, int(original_steps * strength) + 1):
        scheduler.set_timesteps(n, strength=strength)
        assert lcm_timesteps(n, 1000, original_steps, strength).tolist() == scheduler.timesteps.tolist()


def test_diffusers_floors_the_float_product_at_strength_058():
    """0.58·50 = 28.999999999999996 in floating point: diffusers keeps 28 grid points and starts at 559; the strength
    asks for 29 of them, a start at 579."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4, strength=0.58)
    assert scheduler.timesteps[0].item() == 559
    assert lcm_timesteps(4, 1000, 50, strength=0.58)[0].item() == 579
    assert lcm_timesteps(4, 1000, 50, strength=0.58).tolist() == [579, 439, 299, 159]


@pytest.mark.parametrize("steps,strength,diffusers,ours", [
    (4, 0.6, [499, 259], [599, 459, 299, 159]),  # 2 steps from 499 where 0.6 asks to start at 599
    (4, 0.3, [259], [299, 239, 159, 79]),  # 1 step, from 259
    (1, 0.8, [], [799]),  # no step at all (diffusers #11092)
])
def test_issue_7651_get_timesteps_of_generic_img2img_pipelines(steps, strength, diffusers, ours):
    """diffusers' generic img2img pipelines (StableDiffusionImg2ImgPipeline, which an LCM-LoRA goes through with
    AutoPipelineForImage2Image) make the strength-1 timesteps and keep the last int(n·s): the start is not s·T and the
    step count drops (issue #7651). Ours start at the strength's grid timestep and keep n steps."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps)
    sliced, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    assert sliced.tolist() == diffusers
    assert lcm_timesteps(steps, 1000, 50, strength).tolist() == ours


@pytest.mark.parametrize("steps,strength,message", [
    (4, 0.0, "strength must be in (0, 1]"),
    (4, 1.5, "strength must be in (0, 1]"),
    (1, 0.01, "leaves no step"),
    (4, 0.06, "keeps 3 of the model's 50 distillation timesteps, fewer than 4 steps: use steps <= 3 or strength >= 0.08"),
])
def test_strength_errors(steps, strength, message):
    with pytest.raises(UserError) as err:
        lcm_timesteps(steps, 1000, 50, strength)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


def init_images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.8), (3, 0.3)])
def test_img2img_equals_latent_consistency_img2img_pipeline(tiny_lcm, generator, steps, strength):
    """Same model, images, seeds: LCMGenerator with init images is LatentConsistencyModelImg2ImgPipeline. diffusers samples
    the VAE posterior with the image's generator before the noise; we encode to the posterior mean (the seed only
    draws noise), so the pipeline is handed our latents of the images (a 4-channel `image` it takes as latents)."""
    prompts, seeds, g = ["a red star", "a blue ring"], [3, 4], 6.0
    images = init_images()
    ours = generator(prompts, generator.timesteps(steps, strength=strength), g, seeds, 16, 16, init_images=images, strength=strength)

    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(tiny_lcm, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = generator.model.codec.encode(images)
    torch.testing.assert_close(latents, pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor)
    ref = pipe(prompts, image=latents, num_inference_steps=steps, strength=strength, guidance_scale=g, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert pipe.scheduler.timesteps.tolist() == generator.timesteps(steps, strength=strength).tolist()
    assert (((ours / 2 + 0.5).clamp(0, 1)) - ref).abs().max().item() < 1e-5


def test_img2img_keeps_the_image_at_low_strength_and_broadcasts_one_image(generator):
    prompts, seeds = ["a red star", "a blue ring"], [0, 1]
    one = init_images(1)
    both = generator(prompts, generator.timesteps(2, strength=0.3), 6.0, seeds, 16, 16, init_images=one, strength=0.3)
    each = generator(prompts, generator.timesteps(2, strength=0.3), 6.0, seeds, 16, 16, init_images=one.expand(2, -1, -1, -1), strength=0.3)
    torch.testing.assert_close(both, each)
    text2img = generator(prompts, generator.timesteps(2), 6.0, seeds, 16, 16)
    # a lower strength stays closer to the (VAE round trip of the) init image than text-to-image with the same seeds
    roundtrip = generator.model.codec.decode(generator.model.codec.encode(one))
    assert (both - roundtrip).abs().mean() < (text2img - roundtrip).abs().mean()
    # TCD continues from the same start
    tcd = generator(prompts, generator.timesteps(2, strength=0.3), 6.0, seeds, 16, 16, gamma=0.3, init_images=one, strength=0.3)
    assert tcd.shape == both.shape and (tcd - both).abs().max() > 1e-4


@pytest.mark.parametrize("case,kwargs,message", [
    ("size", dict(init_images=init_images(2, 8)), "not the 16x16 asked for"),
    ("channels", dict(init_images=torch.zeros(2, 4, 16, 16)), "must be [B, 3, H, W]"),
    ("batch", dict(init_images=init_images(3)), "must be [B, 3, H, W]"),
    ("strength without image", dict(strength=0.5), "applies to img2img"),
    ("timesteps above the strength", dict(init_images=init_images(2), strength=0.5), "above strength 0.5's start timestep 499"),
    ("gamma", dict(gamma=1.5), "gamma must be in [0, 1]"),
])
def test_call_errors(generator, case, kwargs, message):
    with pytest.raises(UserError) as err:
        generator(["a", "b"], generator.timesteps(2), 6.0, [0, 1], 16, 16, **kwargs)
    assert message in str(err.value)


def test_custom_timesteps_take_no_strength(generator):
    assert generator.timesteps(None, [499, 259]).tolist() == [499, 259]
    with pytest.raises(UserError, match="give a strength or timesteps, not both"):
        generator.timesteps(None, [499, 259], strength=0.5)
