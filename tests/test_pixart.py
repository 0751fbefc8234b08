"""PixArt-α models (a transformer, a T5 text encoder with its attention mask, the 1024-px models' size conditions) through
the same contracts: cross-checks against diffusers' PixArtAlphaPipeline on tiny PixArt-architecture models, and the
commands end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.conditioning import PixArtConditioning
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model, load_lcm
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import sample_lcm, sample_teacher
from tiny_models import load_pipeline

PROMPTS = ["A red star ", "a blue ring at the top"]
# Our samplers generate at the size asked for; the pipeline's resolution binning (a size snapped to its aspect-ratio
# table, the image resized back) is off, and its caption cleaning needs bs4 and ftfy
PIPE = dict(output_type="latent", use_resolution_binning=False, clean_caption=False)


@pytest.fixture(scope="module")
def tiny_pixart_1024(tmp_path_factory):
    """The 1024-px models' architecture (sample size 128: resolution and aspect-ratio conditions), at 16 x 16 patches."""
    from tiny_models import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-1024", seed=2, sample_size=128, patch_size=8)


@pytest.fixture(scope="module")
def tiny_pixart_lcm(tmp_path_factory):
    from tiny_models import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-lcm", seed=1, lcm=True)




def assert_close_to_scale(ours, ref, tol=1e-5):
    """|ours - ref| <= tol · max|ref|. PixArt's linear betas end at ᾱ = 4e-5, where a random network's x̂0 = (z - σ·ε̂)/α
    reaches ~1e2, and float32 rounding there is ~1e-5 absolute: Eq. 12 written as c + ω·(c - u) rounds apart from the
    pipeline's u + g·(c - u) by an ulp of that (in the pipeline's arrangement the teacher solvers agree bit for bit)."""
    assert (ours - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_pack_and_unpack_round_trip():
    tokens, mask = torch.randn(3, 4, 5), torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    plain = PixArtConditioning(additional_conditions=False).pack(tokens, mask, (16, 24))
    assert plain.shape == (3, 4, 6)
    back, back_mask, added = PixArtConditioning(False).unpack(plain)
    assert torch.equal(back, tokens) and torch.equal(back_mask, mask) and added == {"resolution": None, "aspect_ratio": None}
    sized = PixArtConditioning(additional_conditions=True).pack(tokens, mask, (16, 24))
    assert sized.shape == (3, 5, 6)
    back, back_mask, added = PixArtConditioning(True).unpack(torch.cat([sized, sized])[4:5])  # rows travel together
    assert torch.equal(back, tokens[1:2]) and torch.equal(back_mask, mask[1:2])
    assert added["resolution"].tolist() == [[16, 24]] and added["aspect_ratio"].tolist() == [[pytest.approx(16 / 24)]]


@pytest.mark.parametrize("which", ["tiny_pixart", "tiny_pixart_1024"])
def test_prompt_encoder_equals_the_pipelines_encode_prompt(which, request):
    folder = request.getfixturevalue(which)
    pipe = load_pipeline(folder)
    model = load_diffusion_model(str(folder))
    assert model.is_transformer and not model.is_sdxl and model.time_cond_proj_dim is None
    with torch.no_grad():  # as the pipeline's __call__ runs it (T5's attention takes another kernel with autograd on)
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, device="cpu", clean_caption=False)
    conditioning = PixArtConditioning.of_transformer(model.unet)
    assert conditioning.additional_conditions == (which == "tiny_pixart_1024")
    tokens, c_mask, added = conditioning.unpack(model.prompts.encode(PROMPTS, size=(16, 24)))
    assert tokens.shape[1] == 120 and c_mask.sum(1).tolist() != [120, 120]
    torch.testing.assert_close(tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(c_mask, mask.float(), rtol=0, atol=0)
    u_tokens, u_mask, _ = conditioning.unpack(model.prompts.uncond())  # ∅: the empty negative prompt, encoded
    torch.testing.assert_close(u_tokens, negative[:1], rtol=0, atol=0)
    torch.testing.assert_close(u_mask, negative_mask[:1].float(), rtol=0, atol=0)
    if conditioning.additional_conditions:
        assert added["resolution"].tolist() == [[16, 24]] * 2 and added["aspect_ratio"].tolist() == [[pytest.approx(16 / 24)]] * 2


@pytest.mark.parametrize("which,size,sampler,scheduler,kwargs", [
    # PixArt ships a DPM-Solver++ config, which says nothing of DDIM's pixel-model defaults (clip x̂0, ᾱ_final = 1)
    ("tiny_pixart", (16, 24), "ddim", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    ("tiny_pixart", (16, 24), "dpm++", "DPMSolverMultistepScheduler", {}),
    ("tiny_pixart_1024", (32, 48), "ddim", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    ("tiny_pixart_1024", (32, 48), "dpm++", "DPMSolverMultistepScheduler", {}),
])
def test_teacher_solvers_equal_the_pixart_pipeline(which, size, sampler, scheduler, kwargs, request):
    folder = request.getfixturevalue(which)
    pipe = load_pipeline(folder, scheduler, **kwargs)
    model = load_diffusion_model(str(folder))
    g, steps, (h, w) = 4.5, 4, size
    latents = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, height=h, width=w, latents=latents.clone(), **PIPE).images
    cond, uncond = model.prompts.encode(PROMPTS, size=(h, w)), model.prompts.uncond(size=(h, w)).expand(2, -1, -1)
    ours = sample_teacher(model.guided_teacher(), sampler, latents.clone(), cond, uncond, g, steps, model.scheduler_config)
    assert_close_to_scale(ours, ref)


@pytest.mark.parametrize("steps,g", [(1, 0.0), (4, 0.0), (2, 2.0)])
def test_pixart_lcm_sampling_equals_the_pipeline_with_lcm_scheduler(tiny_pixart_lcm, steps, g):
    """PixArt-LCM: a transformer without an ω input under an LCMScheduler; at g > 1 classifier-free guided, as the pipeline."""
    pipe = load_pipeline(tiny_pixart_lcm)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), generator=torch.Generator().manual_seed(11),
               **PIPE).images
    model = load_lcm(str(tiny_pixart_lcm))
    f = model.consistency_model(g)
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), model.prompts.encode(PROMPTS), omega_from_guidance_scale(g),
                      f.schedule, generator=torch.Generator().manual_seed(11))
    assert_close_to_scale(ours, ref)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("pixart-images"), 8)


def test_distill_a_pixart_teacher_exports_a_pixart_lcm_diffusers_samples_as_we_do(tiny_pixart, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_pixart), "--data", str(image_folder), "--out", str(out),
                 "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5"]) == 0
    pipe = load_pipeline(out / "lcm")
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(["a red star"], num_inference_steps=2, guidance_scale=1.0, latents=latents.clone(), generator=torch.Generator().manual_seed(2),
               **PIPE).images
    model = load_lcm(str(out / "lcm"))
    f = model.consistency_model()
    ours = sample_lcm(f, latents.clone(), model.timesteps(2), model.prompts.encode(["a red star"]), 0.0, f.schedule,
                      torch.Generator().manual_seed(2))
    assert_close_to_scale(ours, ref)
    assert main(["generate", "a red star", "--model", str(out / "lcm"), "--steps", "2", "--out", str(tmp_path / "images")]) == 0
    assert Image.open(tmp_path / "images" / "0000-a-red-star.png").size == (16, 16)
    # `lcm evaluate` against the teacher names the g distilled into it (its guidance record) for the teacher's guided rows
    from test_guided_distill import inception_stand_in

    capsys.readouterr()
    assert main(["evaluate", "--lcm", str(out / "lcm"), "--teacher", str(tiny_pixart), "--prompts", str(image_folder), "--steps", "1",
                 "--samples", "2", "--inception", str(inception_stand_in(tmp_path)), "--out", str(tmp_path / "table"), "--device", "cpu"]) == 0
    assert "give --guidance-scales 1,4.5 to score the teacher guided" in capsys.readouterr().err  # was 1,7.5: SD's, not this LCM's


def test_finetune_a_pixart_lcm_and_sample_the_teacher_with_a_solver(tiny_pixart, tiny_pixart_lcm, image_folder, tmp_path):
    out = tmp_path / "lcf"
    assert main(["finetune", "--preset", "tiny", "--model", str(tiny_pixart_lcm), "--data", str(image_folder), "--out", str(out)]) == 0
    image = load_pipeline(out / "lcm")("a red star", num_inference_steps=2, guidance_scale=0.0, use_resolution_binning=False,
                                     clean_caption=False, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert main(["generate", "a red star", "--model", str(tiny_pixart), "--sampler", "dpm++", "--steps", "2", "--width", "24",
                 "--out", str(tmp_path / "images")]) == 0
    assert Image.open(tmp_path / "images" / "0000-a-red-star.png").size == (24, 16)


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_what_a_pixart_model_cannot_do_is_one_line_and_exit_2(tiny_pixart, tiny_pixart_lcm, image_folder, tmp_path, capsys):
    distill = ["distill", "--preset", "tiny", "--teacher", str(tiny_pixart), "--data", str(image_folder), "--out", str(tmp_path / "o")]
    cases = {
        "a guidance range": (distill, "pass equal --guidance-scale-min and --guidance-scale-max"),
        "a LoRA": (distill + ["--adapter", "lora", "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5"], "cannot load LoRA weights"),
        "guidance distillation": (distill + ["--method", "guidance", "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5"],
                                  "has not; use --method lcd"),
        "a size off the patch grid": (["generate", "a", "--model", str(tiny_pixart_lcm), "--height", "18", "--out", str(tmp_path / "o")],
                                      "multiple of the VAE factor 2 times the transformer's patch size 2"),
        # was: a shape mismatch at the first step, after config.json was written
        "a training size off the patch grid": (distill + ["--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5", "--resolution", "6"],
                                               "resolution 6 is not a multiple of the VAE factor 2 times the transformer's patch size 2"),
        "a LoRA on a PixArt-LCM": (["generate", "a", "--model", str(tiny_pixart_lcm), "--lora", str(tmp_path), "--out", str(tmp_path / "o")],
                                   "takes no LoRA"),
    }
    for name, (argv, message) in cases.items():
        code, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, name
    assert not (tmp_path / "o").exists()


def test_folders_that_are_not_pixart_pipelines(tiny_pixart, tmp_path, capsys):
    import shutil

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    code, err = run(["generate", "a", "--model", str(neither), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no model_index.json and unet/ or transformer/" in err
    sigma = shutil.copytree(tiny_pixart, tmp_path / "sigma")
    index = json.loads((sigma / "model_index.json").read_text())
    (sigma / "model_index.json").write_text(json.dumps(index | {"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(UserError, match="only PixArtAlphaPipeline"):
        load_diffusion_model(str(sigma))
