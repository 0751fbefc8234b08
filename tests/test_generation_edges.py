"""`lcm generate` and the generators at the numeric edges: the smallest image sizes, non-finite images, guidance scales
below 1 for the ODE-solver baselines, step counts near T, custom timesteps that start low, long negative prompts."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latent_consistency.errors import UserError
from latent_consistency.pipelines import LCMGenerator, SolverGenerator

CPU = torch.device("cpu")


def generate(model, out, *argv):
    return ["generate", *argv, "--model", str(model), "--out", str(out)]


# --- the smallest sizes ----------------------------------------------------------------------------------------------------------

def test_an_image_too_small_for_the_networks_group_norms_is_one_line(tiny_lcm, tmp_path, run_error):
    # was: `--height 4 --width 4` (a multiple of the VAE factor 2, as the help asks) crashed deep in the UNet with
    # "ValueError: Expected more than 1 value per channel when training" and a traceback: its 2x2 latent is 1x1 at the
    # UNet's second level, one value per GroupNorm group. (The demo LCM: 8x8 px, factor 4.)
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_lcm, out, "a red star", "--height", "4", "--width", "4"))
    assert code == 2 and len(err.splitlines()) == 1 and "too small" in err and "at least 6x6 px" in err, err
    assert not out.exists() or not any(out.iterdir())
    # the smallest square it names, and a 1:4 strip of the smallest multiple, are made
    assert run_error(generate(tiny_lcm, out, "a red star", "--height", "6", "--width", "6"))[0] == 0
    assert run_error(generate(tiny_lcm, tmp_path / "strip", "a red star", "--height", "2", "--width", "8"))[0] == 0


def test_an_image_too_small_is_refused_in_any_batch(lcm):
    # was: the same 4x4 image failed alone and was made in a batch of two (GroupNorm's check counts the batch), where the
    # norm returned its bias alone: an image's pixels depended on its batch
    for n in (1, 2):
        with pytest.raises(UserError, match="too small"):
            lcm(["a red star"] * n, lcm.timesteps(1), 2.0, list(range(n)), 4, 4)


# --- NaN and infinite images -----------------------------------------------------------------------------------------------------

def with_nan_weights(tiny_lcm, tmp_path):
    folder = tmp_path / "diverged"
    shutil.copytree(tiny_lcm, folder)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, file, metadata={"format": "pt"})
    return folder


def test_a_model_that_makes_nan_writes_no_black_image(tiny_lcm, tmp_path, run_error):
    # was: a model with NaN weights (a diverged run's export) wrote all-black PNGs (NaN pixels cast to uint8 0) and exited 0
    out = tmp_path / "out"
    code, err = run_error(generate(with_nan_weights(tiny_lcm, tmp_path), out, "a red star", "a blue ring"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "0000-a-red-star.png (and 1 more of its batch) came out NaN or infinite" in err and "weights may hold NaN" in err, err
    assert not any(out.glob("*.png"))


def nan_for_rings(monkeypatch) -> None:
    """`LCMGenerator` made to give NaN images for the prompts that name a ring, as a diverged model would."""
    original = LCMGenerator.__call__

    def nan_for_the_ring(self, prompts, *args, **kwargs):
        images = original(self, prompts, *args, **kwargs)
        images[[i for i, p in enumerate(prompts) if "ring" in p]] = float("nan")
        return images

    monkeypatch.setattr(LCMGenerator, "__call__", nan_for_the_ring)


def test_images_written_before_a_nan_batch_are_kept(tiny_lcm, tmp_path, run_error, monkeypatch):
    # was: the NaN image of the second batch was written black beside the good ones, exit 0
    nan_for_rings(monkeypatch)
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_lcm, out, "a red star", "a blue ring", "a green square", "--batch-size", "1",
                                   "--dtype", "bfloat16"))
    error = err.splitlines()[-1]  # after the progress bar of three batches
    assert code == 2 and error.startswith("lcm generate: error: ") and err.count("error") == 1, err
    assert "0001-a-blue-ring.png came out NaN" in error and "(1 image(s) were)" in error and "try --dtype float32" in error, err
    assert sorted(p.name for p in out.iterdir()) == ["0000-a-red-star.png"]
    assert np.asarray(Image.open(out / "0000-a-red-star.png")).std() > 0


# --- the ODE-solver baselines: g <= 1, and step counts near T ----------------------------------------------------------------------

@pytest.mark.parametrize("g", [0.0, 0.5])
def test_a_solver_below_guidance_scale_one_is_unguided_as_in_diffusers(tiny_sd, g):
    # was: g < 1 ran classifier-free guidance with ω = g - 1 < 0, (1+ω)ε_c - ωε_u: at g = 0 the unconditional image
    # (0.026 from StableDiffusionPipeline's); diffusers runs no unconditional pass at g <= 1, the conditional output alone
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    prompts, seeds = ["a red star", "a ring"], [5, 6]
    ours = SolverGenerator.load(str(tiny_sd), CPU, torch.float32, "ddim")(prompts, 3, g, seeds, 16, 16)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False, clip_sample=False)
    ref = pipe(prompts, num_inference_steps=3, guidance_scale=g, height=16, width=16, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,steps,most", [("dpm++", 999, 998), ("dpm", 1000, 998), ("dpm++", 1000, 998)])
def test_dpm_solver_steps_that_repeat_a_timestep_are_one_line(tiny_sd, tmp_path, run_error, sampler, steps, most):
    # was: under SD's leading spacing and steps_offset 1, 999 DPM-Solver steps start at timestep 1000, whose σ is clamped
    # to timestep 999's: a zero step, NaN latents, an all-black PNG and exit 0 (after a minute on SD); 1000 steps are all
    # timestep 1 and crashed with "IndexError: index 1001 is out of bounds" and a traceback
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_sd, out, "a star", "--sampler", sampler, "--steps", str(steps), "--height", "16",
                                   "--width", "16"))
    assert code == 2 and len(err.splitlines()) == 1 and f"use at most {most}" in err, err
    assert not out.exists() or not any(out.iterdir())


# --- notes: custom timesteps that start low, a long negative prompt -----------------------------------------------------------------

def test_text_to_image_timesteps_that_start_low_get_a_note(tiny_lcm, tmp_path, run_error):
    # was: `--timesteps 0` decoded the starting noise itself (f(z, 0) = z) and `--timesteps 259` kept much of it, without a
    # word; diffusers' LCMScheduler warns when custom timesteps do not start at T - 1
    code, err = run_error(generate(tiny_lcm, tmp_path / "low", "a red star", "--timesteps", "259,0"))
    assert code == 0 and "note: --timesteps start at 259, not 999" in err, err
    code, err = run_error(generate(tiny_lcm, tmp_path / "top", "a red star", "--timesteps", "999,499"))
    assert code == 0 and "note" not in err, err


def test_a_negative_prompt_longer_than_the_text_encoder_reads_gets_a_note(tiny_lcm, tmp_path, run_error):
    # was: the prompts' ends were noted as dropped (past the tiny tokenizer's 16 tokens), the negative prompt's silently
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", "a red star", "--negative-prompt", "a large blue ring at the top"))
    assert code == 0 and "note: --negative-prompt is 24 tokens, more than the 16 the text encoder reads" in err, err


def test_the_server_answers_nan_pixels_with_a_500_not_a_black_image(tiny_lcm, monkeypatch):
    """was: `lcm serve` encoded NaN pixels as black (uint8 0) and answered 200 with a black PNG."""
    from fastapi.testclient import TestClient

    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    nan_for_rings(monkeypatch)
    app = create_app(generator, Limits(max_side=2 * generator.default_size(), max_upload_bytes=2**20, max_body_bytes=2 * 2**20))
    with TestClient(app, raise_server_exceptions=False) as client:
        failed = client.post("/v1/images", json={"prompt": "a blue ring", "steps": 1, "seed": 1})
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        assert client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1}).status_code == 200
