"""The Python API in one call, and what `lcm generate` says and records of its prompts and model.

- `LCMGenerator.load(path)(["a prompt"], steps=4)` (and `SolverGenerator`'s call alike) makes what the positional call
  makes with what `lcm generate` takes for what is left out: 4 steps, the model's recorded g, image i at seed i, the
  model's native size. The positional call of existing callers is unchanged (tests/test_pipelines*.py, the CLI).
- `lcm generate ""` names the blank prompt instead of saying none was given.
- The note of a prompt longer than the text encoder reads names its image file, numbered as the files are (from 0).
- The PNG record holds a local --model as an absolute path, so the image can be remade from any folder, and a
  --skip-existing rerun still keeps images whose record has the relative path of earlier versions.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from latent_consistency.errors import UserError
from latent_consistency.guidance_record import GuidanceRecord, write_record
from latent_consistency.models import PROGRESSIVE_STEPS
from latent_consistency.pipelines import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, LCMGenerator, SolverGenerator

PROMPTS = ["a red star", "a blue ring"]
RECORDED_G = 1.5  # a g the tiny LCM's guidance record names: neither the LCM default 8 nor 1


@pytest.fixture(scope="module")
def recorded_lcm(tiny_lcm, tmp_path_factory):
    """The tiny LCM with a guidance record (`guidance.json`), as `lcm distill` writes one: distilled on g in [1, 2]."""
    folder = shutil.copytree(tiny_lcm, tmp_path_factory.mktemp("models") / "recorded-lcm")
    write_record(folder, GuidanceRecord(1.0, 2.0, RECORDED_G))
    return folder


@pytest.fixture(scope="module")
def generator(recorded_lcm):
    return LCMGenerator.load(str(recorded_lcm))


# --- the one call -------------------------------------------------------------------------------------------------------

def test_an_lcm_generator_call_with_steps_alone_samples_as_lcm_generate_does(generator):
    # was: TypeError, __call__() missing 4 required positional arguments: 'guidance_scale', 'seeds', 'height', and 'width'
    size = generator.model.native_size
    images = generator(PROMPTS, steps=4)
    assert images.shape == (2, 3, size, size)
    assert torch.equal(images, generator(PROMPTS, generator.timesteps(4), RECORDED_G, [0, 1], size, size))
    # the recorded g is the one taken, not the kind's default: the tiny LCM's ω input changes its images
    assert not torch.equal(images, generator(PROMPTS, generator.timesteps(4), DEFAULT_GUIDANCE_SCALE["lcm"], [0, 1], size, size))


def test_an_lcm_generator_call_without_steps_takes_four(generator):
    assert DEFAULT_STEPS == 4
    assert torch.equal(generator(PROMPTS[:1]), generator(PROMPTS[:1], steps=4))


def test_an_lcm_without_a_guidance_record_is_sampled_at_its_kinds_g(tiny_lcm):
    generator = LCMGenerator.load(str(tiny_lcm))
    assert torch.equal(generator(PROMPTS[:1], steps=2), generator(PROMPTS[:1], steps=2, guidance_scale=DEFAULT_GUIDANCE_SCALE["lcm"]))


def test_steps_and_timesteps_together_are_refused(generator):
    with pytest.raises(UserError, match="give steps or timesteps, not both"):
        generator(PROMPTS[:1], generator.timesteps(2), steps=2)


def test_img2img_steps_start_at_the_strengths_timestep(generator):
    size = generator.model.native_size
    init = torch.linspace(-1, 1, 3 * size * size).reshape(1, 3, size, size)
    by_steps = generator(PROMPTS[:1], steps=2, init_images=init, strength=0.5)
    assert torch.equal(by_steps, generator(PROMPTS[:1], generator.timesteps(2, strength=0.5), init_images=init, strength=0.5))


def test_a_solver_generator_call_with_prompts_alone_samples_as_lcm_generate_does(tiny_sd):
    generator = SolverGenerator.load(str(tiny_sd))
    size = generator.model.native_size
    images = generator(PROMPTS)
    assert torch.equal(images, generator(PROMPTS, DEFAULT_STEPS, DEFAULT_GUIDANCE_SCALE["solver"], [0, 1], size, size))
    assert torch.equal(generator(PROMPTS[:1], steps=2), generator(PROMPTS[:1], 2, DEFAULT_GUIDANCE_SCALE["solver"], [0], size, size))



def test_a_solver_generator_call_without_steps_samples_a_progressive_round_in_its_own(tiny_sd):
    """A progressive round samples in the DDIM steps it was distilled for, as `lcm generate --sampler ddim` without --steps."""
    generator = SolverGenerator.load(str(tiny_sd))
    generator.model.scheduler_config = generator.model.scheduler_config | {PROGRESSIVE_STEPS: 2}  # as a round's export says
    assert generator.default_steps() == 2
    assert torch.equal(generator(PROMPTS[:1]), generator(PROMPTS[:1], steps=2))


# --- lcm generate -------------------------------------------------------------------------------------------------------

def generate(model, out, *extra) -> list[str]:
    return ["generate", *extra, "--model", str(model), "--steps", "1", "--out", str(out), "--device", "cpu"]


@pytest.mark.parametrize("argv", [[""], ["--prompt", " "]])
def test_a_lone_blank_prompt_is_said_blank_not_missing(tiny_lcm, tmp_path, run_error, argv):
    # was: "no prompts given: prompt 1 is blank", to a user who had given one
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", *argv))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "prompt 1 is blank; give text for every prompt" in err and "no prompts given" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_note_of_a_long_prompt_names_its_image_file(tiny_lcm, tmp_path, run_error):
    # was: "note: prompt 2 is 27 tokens ..." beside the files 0000-... and 0001-...: the second prompt's file is 0001
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_lcm, out, "a red star", "a large red star at the top left"))
    assert code == 0, err
    name = "0001-a-large-red-star-at-the-top-left.png"
    assert f"note: the prompt of {name} is 27 tokens, more than the 16 the text encoder reads" in err, err
    assert (out / name).is_file()


def _record(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.info["lcm-generate"])


def test_the_record_holds_a_local_model_as_an_absolute_path(tiny_lcm, tmp_path, run_error, monkeypatch):
    # was: the model as typed ("tiny-lcm"), which `lcm generate` run anywhere else does not find
    monkeypatch.chdir(tiny_lcm.parent)
    out = tmp_path / "out"
    assert run_error(generate(tiny_lcm.name, out, "a red star"))[0] == 0
    image = out / "0000-a-red-star.png"
    assert _record(image)["model"] == str(tiny_lcm)
    monkeypatch.chdir(tmp_path)  # elsewhere, the record's model is the same model: the image is kept as this run's
    before = image.stat().st_mtime_ns
    code, err = run_error(generate(_record(image)["model"], out, "a red star", "--skip-existing"))
    assert code == 0 and image.stat().st_mtime_ns == before, err


def test_skip_existing_keeps_an_image_whose_record_has_the_earlier_relative_path(tiny_lcm, tmp_path, run_error, monkeypatch):
    from latent_consistency.grids import save_png

    monkeypatch.chdir(tiny_lcm.parent)
    out = tmp_path / "out"
    assert run_error(generate(tiny_lcm.name, out, "a red star"))[0] == 0
    image = out / "0000-a-red-star.png"
    earlier = _record(image) | {"model": tiny_lcm.name}  # as earlier versions wrote it
    with Image.open(image) as pixels:
        save_png(pixels.copy(), image, {"lcm-generate": json.dumps(earlier)})
    before = image.stat().st_mtime_ns
    code, err = run_error(generate(tiny_lcm.name, out, "a red star", "--skip-existing"))
    assert code == 0 and image.stat().st_mtime_ns == before, err


def test_a_hub_id_is_recorded_as_given(tmp_path, monkeypatch):
    from latent_consistency.cli.generate import recorded_path

    monkeypatch.chdir(tmp_path)  # no folder org/lcm here: the name is a hub id
    assert recorded_path("org/lcm") == "org/lcm" and recorded_path("org/lcm@v1") == "org/lcm@v1"
    assert recorded_path("models/lcm/") == str(tmp_path / "models" / "lcm") and recorded_path(None) is None


def test_load_takes_device_and_dtype_as_the_flags_do(tiny_lcm):
    """The guide says `device=, dtype=` take what `--device` and `--dtype` take: "auto" raised torch's own RuntimeError
    and "bfloat16" was refused for a str."""
    import torch

    from latent_consistency.pipelines import LCMGenerator

    generator = LCMGenerator.load(str(tiny_lcm), device="auto", dtype="bfloat16")
    assert generator.device.type in ("cpu", "cuda", "mps") and generator.dtype == torch.bfloat16
    assert generator.model.unet.dtype == torch.bfloat16
