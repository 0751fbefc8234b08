"""SDXL-family models (two text encoders, pooled embedding, size micro-conditioning) through the same contracts:
cross-checks against diffusers' StableDiffusionXLPipeline on a tiny SDXL-architecture model, and the commands end to end."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.conditioning import AddedConditioning
from latent_consistency.models import load_diffusion_model, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import sample_lcm, sample_teacher
from tiny_models import load_pipeline

PROMPTS = ["a red star", "a blue ring at the top"]


def test_pack_and_unpack_round_trip():
    added = AddedConditioning(pooled_dim=5)
    tokens, pooled, ids = torch.randn(3, 4, 12), torch.randn(3, 5), torch.tensor([[16.0, 24, 0, 8, 16, 24]]).expand(3, -1)
    c = added.pack(tokens, pooled, ids)
    assert c.shape == (3, 5, 12)
    back, extra = added.unpack(c)
    assert torch.equal(back, tokens) and torch.equal(extra["text_embeds"], pooled) and torch.equal(extra["time_ids"], ids)
    # rows travel together: the batch operations every contract uses keep each prompt's extra row
    assert torch.equal(added.unpack(torch.cat([c, c])[4:5])[1]["text_embeds"], pooled[1:2])
    with pytest.raises(ValueError):
        AddedConditioning(pooled_dim=8).pack(tokens, torch.randn(3, 8), ids)  # 8 + 6 > 12


def test_prompt_encoder_equals_the_pipelines_encode_prompt(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl)
    model = load_diffusion_model(str(tiny_sdxl))
    assert model.is_sdxl and model.force_zeros_for_empty_prompt and model.native_size == 16
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    c = model.prompts.encode(PROMPTS, size=(16, 24))
    tokens, added = AddedConditioning.of_unet(model.unet.config).unpack(c)
    torch.testing.assert_close(tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(added["time_ids"], ids.expand(2, -1), rtol=0, atol=0)
    # ∅: zeros (force_zeros_for_empty_prompt), with the images' time ids
    u_tokens, u_added = AddedConditioning.of_unet(model.unet.config).unpack(model.prompts.uncond(size=(16, 24)))
    assert torch.equal(u_tokens, negative[:1]) and torch.equal(u_added["text_embeds"], negative_pooled[:1])
    torch.testing.assert_close(u_added["time_ids"], ids, rtol=0, atol=0)


@pytest.mark.parametrize("sampler,scheduler,kwargs", [
    # SDXL ships an Euler config, which says nothing of these; DDIM's defaults (clip x̂0 to [-1, 1], ᾱ_final = 1) are
    # for pixel models, and our DDIM (as every SD DDIM config) turns them off
    ("ddim", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
def test_teacher_solvers_equal_the_sdxl_pipeline(tiny_sdxl, sampler, scheduler, kwargs):
    pipe = load_pipeline(tiny_sdxl, scheduler, **kwargs)
    g, steps = 5.0, 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent").images
    model = load_diffusion_model(str(tiny_sdxl))
    cond, uncond = model.prompts.encode(PROMPTS), model.prompts.uncond().expand(2, -1, -1)
    ours = sample_teacher(model.guided_teacher(), sampler, latents.clone(), cond, uncond, g, steps, model.scheduler_config)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,size", [(1, (16, 16)), (4, (16, 16)), (2, (24, 16))])
def test_sdxl_lcm_sampling_equals_the_pipeline_with_lcm_scheduler(tiny_sdxl_lcm, steps, size):
    pipe = load_pipeline(tiny_sdxl_lcm)
    g, (h, w) = 6.0, size
    latents = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, height=h, width=w, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(11)).images
    model = load_lcm(str(tiny_sdxl_lcm))
    f = model.consistency_model()
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), model.prompts.encode(PROMPTS, size=size), omega_from_guidance_scale(g),
                      f.schedule, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # float32 round-off on latents of size ~30


@pytest.mark.parametrize("g", [1.0, 1.5])
def test_sdxl_lcm_lora_sampling_equals_the_pipeline(tiny_sdxl, tmp_path, g):
    """The most used LCM artifact's recipe: load_lora_weights onto StableDiffusionXLPipeline, LCMScheduler, guidance g
    (classifier-free guidance against zeros when g > 1)."""
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sdxl)
    pipe = load_pipeline(tiny_sdxl, "LCMScheduler")
    pipe.load_lora_weights(lora)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=g, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(7)).images
    model = load_lcm_lora(str(tiny_sdxl), str(lora))
    f = model.consistency_model(g)
    ours = sample_lcm(f, latents.clone(), model.timesteps(2), model.prompts.encode(PROMPTS), 0.0, f.schedule, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # float32 round-off on latents of size ~30


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("sdxl-images"), 8)


def test_distill_an_sdxl_teacher_exports_an_sdxl_lcm_diffusers_samples_as_we_do(tiny_sdxl, image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sdxl), "--data", str(image_folder), "--out", str(out)]) == 0
    pipe = load_pipeline(out / "lcm")
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim is not None
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(["a red star"], num_inference_steps=2, guidance_scale=3.0, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    model = load_lcm(str(out / "lcm"))
    f = model.consistency_model()
    ours = sample_lcm(f, latents.clone(), model.timesteps(2), model.prompts.encode(["a red star"]), 2.0, f.schedule,
                      torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # float32 round-off on latents of size ~30
    assert main(["generate", "a red star", "--model", str(out / "lcm"), "--steps", "2", "--out", str(tmp_path / "images")]) == 0
    assert Image.open(tmp_path / "images" / "0000-a-red-star.png").size == (16, 16)


def test_sdxl_lcm_lora_distillation_loads_with_load_lora_weights(tiny_sdxl, image_folder, tmp_path):
    out = tmp_path / "lora-run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sdxl), "--data", str(image_folder), "--out", str(out),
                 "--adapter", "lora", "--lora-rank", "4", "--lr", "1e-3"]) == 0
    pipe = load_pipeline(tiny_sdxl, "LCMScheduler")
    pipe.load_lora_weights(out / "lora")
    image = pipe("a red star", num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert main(["generate", "a red star", "--model", str(tiny_sdxl), "--lora", str(out / "lora"), "--steps", "2",
                 "--out", str(tmp_path / "images")]) == 0


def test_latent_cache_of_an_sdxl_model_carries_the_micro_conditioning(tiny_sdxl, image_folder, tmp_path):
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import LatentCache, write_latent_cache

    model = load_diffusion_model(str(tiny_sdxl))
    path = write_latent_cache(ImageFolderDataset(image_folder, 16), tmp_path / "cache", model.codec, model.prompts,
                              source={"dataset": "test"}, progress=False)
    cache = LatentCache(path)
    added = AddedConditioning.of_unet(model.unet.config)
    torch.testing.assert_close(cache.text_embeddings[:1], model.prompts.encode([cache.captions[0]]))
    assert added.unpack(cache.uncond_embedding[None])[1]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    out = tmp_path / "cached-run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sdxl), "--data", str(path), "--out", str(out)]) == 0


def test_finetune_an_sdxl_lcm_exports_an_sdxl_lcm(tiny_sdxl_lcm, image_folder, tmp_path):
    out = tmp_path / "lcf"
    assert main(["finetune", "--preset", "tiny", "--model", str(tiny_sdxl_lcm), "--data", str(image_folder), "--out", str(out)]) == 0
    pipe = load_pipeline(out / "lcm")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    image = pipe("a red star", num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_generator_options_and_the_server_on_an_sdxl_lcm(tiny_sdxl_lcm):
    """Negative prompts, img2img and non-native sizes go through the same generator; the server's image equals it."""
    from fastapi.testclient import TestClient

    from latent_consistency.grids import to_pil
    from latent_consistency.pipelines import LCMGenerator
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    generator = LCMGenerator.load(str(tiny_sdxl_lcm), torch.device("cpu"), torch.float32)
    plain = generator(["a red star"], generator.timesteps(2), 3.0, [5], 16, 24)
    negative = generator(["a red star"], generator.timesteps(2), 3.0, [5], 16, 24, negative_prompts=["a ring"])
    assert plain.shape == (1, 3, 16, 24) and not torch.allclose(plain, negative)
    init = torch.zeros(1, 3, 16, 16)
    edited = generator(["a red star"], generator.timesteps(2, strength=0.5), 3.0, [5], 16, 16, init_images=init, strength=0.5)
    assert edited.shape == (1, 3, 16, 16) and torch.isfinite(edited).all()
    app = create_app(generator, Limits(max_side=32, max_upload_bytes=2**20, max_body_bytes=2**21), model_name="tiny-sdxl")
    with TestClient(app) as client:
        response = client.post("/v1/images", json={"prompt": "a red star", "seed": 5, "steps": 2, "guidance_scale": 3.0, "width": 24})
    assert response.status_code == 200
    served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    np.testing.assert_array_equal(served, np.asarray(to_pil(plain)[0]))


def test_evaluate_an_sdxl_lcm_against_its_teacher(tiny_sdxl, tiny_sdxl_lcm, image_folder, tmp_path):
    """Table 1 of an SDXL LCM: the teacher's CFG rows guide against SDXL's zero ∅; FID in the pixels of a tiny CLIP."""
    from tiny_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    assert main(["evaluate", "--lcm", str(tiny_sdxl_lcm), "--teacher", str(tiny_sdxl), "--prompts", str(image_folder), "--out", str(out),
                 "--steps", "1,2", "--guidance-scale", "3", "--samples", "4", "--images-per-prompt", "1", "--clip", str(clip),
                 "--device", "cpu"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["sampler"] for r in rows.values()} == {"lcm", "ddim", "dpm", "dpm++"}
    assert all(np.isfinite(r["clip_fid"]) for r in rows.values())


def test_a_stable_diffusion_latent_cache_does_not_fit_an_sdxl_teacher(tiny_sd, tiny_sdxl, image_folder, tmp_path, run_error):
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import write_latent_cache

    sd = load_diffusion_model(str(tiny_sd))
    cache = write_latent_cache(ImageFolderDataset(image_folder, 16), tmp_path / "sd-cache", sd.codec, sd.prompts, source={}, progress=False)
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sdxl), "--data", str(cache), "--out", str(tmp_path / "run")])
    assert code == 2 and "latent cache conditions are [16, 32] (tokens x width) but the model's prompt encoder makes [17, 64]" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_only_an_sdxl_vae_is_upcast_in_float16(tiny_sd, tiny_sdxl):
    """diffusers' SDXL pipelines keep a `force_upcast` VAE in float32; its SD pipelines never upcast (AutoencoderKL's default
    force_upcast is True, and SD 1.x/2.x VAE configs predate the key)."""
    sd, sdxl = load_diffusion_model(str(tiny_sd), torch.float16), load_diffusion_model(str(tiny_sdxl), torch.float16)
    assert sd.vae.config.force_upcast and sd.vae.dtype == torch.float16 and not sd.upcasts_vae
    assert sdxl.vae.dtype == torch.float32 and sdxl.unet.dtype == sdxl.text_encoder_2.dtype == torch.float16
