"""A VAE config's per-channel `latents_mean` μ and `latents_std` σ (Playground v2.5's SDXL VAE): `LatentCodec` standardises
the latents with them, z = (E(x) − μ)·s/σ, and decodes z·σ/s + μ, as diffusers' SDXL pipelines do, and only when the config
gives both. Checked against StableDiffusionXLPipeline (generation) and StableDiffusionXLImg2ImgPipeline (encoding) on a
tiny SDXL LCM. Also the one-line refusal of an EDM-scheduler model (Playground v2.5's scheduler)."""

import json
import shutil

import pytest
import torch

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import LatentCache, write_latent_cache
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model
from latent_consistency.pipelines import LCMGenerator
from test_model_inputs import assert_refused
from tiny_models import load_pipeline, write_captioned_images

# Playground v2.5's VAE statistics: far from (0, 1), so that ignoring them changes every image
PLAYGROUND_STATISTICS = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}


def with_vae_config(model, folder, **keys):
    """A copy of the pipeline folder `model` at `folder` whose vae/config.json has `keys` set."""
    shutil.copytree(model, folder)
    config_file = folder / "vae" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | keys))
    return folder


@pytest.fixture(scope="module")
def standardised_lcm(tiny_sdxl_lcm, tmp_path_factory):
    """The tiny SDXL LCM with Playground v2.5's latent statistics in its VAE config."""
    return with_vae_config(tiny_sdxl_lcm, tmp_path_factory.mktemp("models") / "standardised", **PLAYGROUND_STATISTICS)


def images(seed=0, size=16):
    """Two random images [2, 3, size, size] in [-1, 1]."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generate(folder, steps=2):
    """`LCMGenerator`'s images in [0, 1] and StableDiffusionXLPipeline's (its LCMScheduler) with the same seeds."""
    prompts, seeds, g = ["a red star", "a blue ring"], [3, 4], 6.0
    ours = LCMGenerator.load(str(folder))(prompts, steps=steps, guidance_scale=g, seeds=seeds, height=16, width=16) * 0.5 + 0.5
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    ref = load_pipeline(folder)(prompts, num_inference_steps=steps, guidance_scale=g, generator=generators, height=16, width=16,
                                output_type="pt").images
    return ours, ref


def test_generation_equals_the_sdxl_pipeline_with_latent_statistics(standardised_lcm, tiny_sdxl_lcm):
    ours, ref = generate(standardised_lcm)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    unstandardised, _ = generate(tiny_sdxl_lcm)
    assert (ours - unstandardised).abs().max() > 0.05, "the statistics change nothing: the check above means nothing"


def test_encode_equals_the_sdxl_img2img_pipelines_initial_latents(standardised_lcm):
    """(E(x) − μ)·s/σ, E(x) one draw from the posterior, as StableDiffusionXLImg2ImgPipeline.prepare_latents makes it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(standardised_lcm)
    x = images()[:1]
    ref = pipe.prepare_latents(x, None, 1, 1, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5), add_noise=False)
    ours = load_diffusion_model(str(standardised_lcm)).codec.encode(x, torch.Generator().manual_seed(5), sample=True)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_decode_inverts_encode_to_the_vaes_own_round_trip(standardised_lcm):
    """D(z) undoes the standardisation: decode(encode(x)) is the VAE's decode of its own posterior mean."""
    codec, x = load_diffusion_model(str(standardised_lcm)).codec, images(1)
    with torch.no_grad():
        ref = codec.vae.decode(codec.vae.encode(x).latent_dist.mean).sample
    torch.testing.assert_close(codec.decode(codec.encode(x)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", sorted(PLAYGROUND_STATISTICS))
def test_one_statistic_alone_is_ignored_as_diffusers_ignores_it(key, tiny_sdxl_lcm, tmp_path):
    """diffusers' SDXL pipelines standardise only when the config gives both; with one they scale by s alone."""
    folder = with_vae_config(tiny_sdxl_lcm, tmp_path / "one", **{key: PLAYGROUND_STATISTICS[key]})
    codec, x = load_diffusion_model(str(folder)).codec, images(2)
    with torch.no_grad():
        scaled = codec.vae.encode(x).latent_dist.mean * codec.scaling_factor
    torch.testing.assert_close(codec.encode(x), scaled, rtol=0, atol=0)


def test_statistics_of_another_channel_count_are_refused_in_one_line(tiny_sdxl_lcm, tmp_path, run_error):
    folder = with_vae_config(tiny_sdxl_lcm, tmp_path / "three", latents_mean=[0.1, 0.2, 0.3], latents_std=[1.0, 2.0, 3.0, 4.0])
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(folder), "--steps", "1", "--out", str(out)])
    assert_refused(code, err, out, "latents_mean is [0.1", "4 latent channels")


def test_an_edm_scheduler_is_refused_naming_edm(tiny_sdxl, tmp_path, run_error):
    """Playground v2.5's EDMDPMSolverMultistepScheduler: no beta schedule, an EDM noise process, named as one."""
    from diffusers import EDMDPMSolverMultistepScheduler

    folder = shutil.copytree(tiny_sdxl, tmp_path / "playground")
    shutil.rmtree(folder / "scheduler")
    EDMDPMSolverMultistepScheduler().save_pretrained(folder / "scheduler")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(folder), "--sampler", "ddim", "--steps", "2", "--out", str(out)])
    assert_refused(code, err, out, "EDMDPMSolverMultistepScheduler", "EDM: Playground v2.5")
    assert "a EDM" not in err, err


def test_a_cache_without_the_statistics_is_refused_for_a_model_with_them(tiny_sdxl_lcm, tmp_path):
    """The encoder digest covers μ and σ (`data.latent_cache._encoder_digest`): a cache of unstandardised latents (from the
    VAE before its config had them, or an earlier lcm that ignored them) does not pass for a model whose VAE gives them."""
    model = load_diffusion_model(str(tiny_sdxl_lcm))
    cache = LatentCache(write_latent_cache(ImageFolderDataset(write_captioned_images(tmp_path / "images", 2), 16), tmp_path / "cache",
                                           model.codec, model.prompts, source={"dataset": "test"}, progress=False))
    assert cache.check_encoders(model) is None
    standardised = load_diffusion_model(str(with_vae_config(tiny_sdxl_lcm, tmp_path / "standardised", **PLAYGROUND_STATISTICS)))
    with pytest.raises(UserError, match="another VAE"):
        cache.check_encoders(standardised)
