"""Fixes of the LCM-LoRA review's findings (lorarev).

1. A training --resolution (or `lcm cache --resolution`) too small for the network's GroupNorms (one value per group) is
   refused in one line before any work, naming the smallest size that works, as generation refuses such a size. Was:
   accepted; a run trained, then ended in a traceback at its ω response (or on --resume), and a LoRA run exported a card
   whose `lcm generate` line is refused.
2. An LCM-LoRA distilled from a teacher (its card says "LCM-LoRA for") given with an LCM is refused in one line: on the LCM
   it applies the distillation twice (θ_LCM + τ, τ = θ_LCM − θ_teacher). A LoRA fine-tuned on the LCM still loads. Was:
   silently stacked (diffusers loads it too).
3. g < 1 on a model without an ω input (an LCM-LoRA) gives the g = 1 image, as in diffusers: accepted, as the teacher
   samplers accept it (PixArt-LCM's own recipe samples at g = 0), but said (`lcm generate`'s note, a Python warning), and
   the PNG records the g applied, 1, so --skip-existing keeps the image made at g = 1. Was: silent, and recorded as given.

The tiny models' native size is 16 px (VAE factor 2)."""

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.errors import UserError
from latent_consistency.models import load_diffusion_model
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.training import batches
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 4)


def distill(teacher, data, out, *extra) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", "2", *extra]


def smallest_side(folder) -> int:
    """The smallest square side generation takes for `folder`'s model (a multiple of the VAE factor 2)."""
    generator = LCMGenerator(load_diffusion_model(str(folder)), torch.device("cpu"), torch.float32)

    def takes(side: int) -> bool:
        try:
            generator.check_size(side, side)
        except UserError:
            return False
        return True

    return next(s for s in range(2, 64, 2) if takes(s))


@pytest.mark.parametrize("family, adapter", [("tiny_sd", []), ("tiny_sdxl", ["--adapter", "lora", "--lora-rank", "4"])])
def test_a_run_at_a_resolution_too_small_for_the_groupnorms_is_refused_before_the_data_is_read(family, adapter, images, tmp_path,
                                                                                                 run_error, monkeypatch, request):
    teacher = request.getfixturevalue(family)
    side = smallest_side(teacher)
    assert side > 4  # the tiny models: 4 px is too small, as the review found
    monkeypatch.setattr(batches, "open_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    code, err = run_error(distill(teacher, images, tmp_path / "run", "--resolution", "4", *adapter))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "resolution 4 is too small for this model" in err and f"use at least {side}" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "lora").exists()


def test_the_size_a_run_is_told_to_use_trains_and_is_one_generation_takes(tiny_sd, images, tmp_path, run_error):
    """The named size is the one generation names for the same model (the one rule), and a run at it finishes."""
    side = smallest_side(tiny_sd)
    with pytest.raises(UserError, match=f"use at least {side}x{side} px"):
        LCMGenerator(load_diffusion_model(str(tiny_sd)), torch.device("cpu"), torch.float32).check_size(side - 2, side - 2)
    code, err = run_error(distill(tiny_sd, images, tmp_path / "run", "--resolution", str(side)))
    assert code == 0, err


def test_training_batches_refuse_the_size_which_a_resume_and_the_omega_response_read(tiny_sd, images):
    """A --resume reads its config's resolution into the same batches: refused there too, not at the run's end."""
    with pytest.raises(UserError, match="resolution 4 is too small for this model"):
        batches.TrainingBatches(str(images), load_diffusion_model(str(tiny_sd)), 4, 1, seed=0)


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_sdxl"])
def test_a_cache_at_a_resolution_too_small_for_the_groupnorms_is_refused_before_the_data_is_read(family, images, tmp_path, run_error,
                                                                                                   monkeypatch, request):
    """`lcm cache` reads the UNet's config from the folder (no weights): the same refusal as a run's."""
    from latent_consistency.data import spec

    folder = request.getfixturevalue(family)
    monkeypatch.setattr(spec, "open_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    code, err = run_error(["cache", "--model", str(folder), "--data", str(images), "--out", str(tmp_path / "c"), "--resolution", "4"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "resolution 4 is too small for this model" in err and f"use at least {smallest_side(folder)}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def teachers_lora(tiny_sd, images, tmp_path_factory):
    """An LCM-LoRA distilled from the tiny SD teacher (its lora/ folder)."""
    out = tmp_path_factory.mktemp("runs") / "lcd-lora"
    assert main(distill(tiny_sd, images, out, "--steps", "1", "--adapter", "lora", "--lora-rank", "4")) == 0
    return out / "lora"


def test_a_teachers_lcm_lora_given_with_an_lcm_is_refused(tiny_lcm, teachers_lora, tmp_path, run_error):
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--lora", str(teachers_lora), "--steps", "1",
                           "--out", str(tmp_path / "out")])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--lora {teachers_lora} is an LCM-LoRA distilled from a teacher" in err and "give the teacher as the model" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(UserError, match="would apply the distillation a second time"):  # the weights file in its folder too
        LCMGenerator.load(str(tiny_lcm), lora=str(teachers_lora / "pytorch_lora_weights.safetensors"))


def test_the_teachers_lcm_lora_still_loads_on_its_teacher_and_a_lora_finetuned_on_the_lcm_on_the_lcm(tiny_sd, tiny_lcm, teachers_lora,
                                                                                                      images, tmp_path):
    assert LCMGenerator.load(str(tiny_sd), lora=str(teachers_lora)).kind == "lora"
    out = tmp_path / "lcf-lora"
    assert main(["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--adapter", "lora", "--lora-rank", "4", "--data", str(images),
                 "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    assert LCMGenerator.load(str(tiny_lcm), lora=str(out / "lora")).kind == "lcm"


def test_a_guidance_scale_below_1_on_an_lcm_lora_is_noted_and_recorded_as_the_1_applied(tiny_sd, teachers_lora, tmp_path, capsys):
    from latent_consistency.cli.generate import read_record

    out = tmp_path / "out"
    common = ["a red star", "--model", str(tiny_sd), "--lora", str(teachers_lora), "--steps", "1", "--out", str(out)]
    capsys.readouterr()
    assert main(["generate", *common, "--guidance-scale", "0.5"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "--guidance-scale 0.5 is below 1" in line]
    assert len(notes) == 1 and notes[0].startswith("lcm generate: note: ") and "the image is that of guidance scale 1" in notes[0], err
    assert "UnguidedScaleWarning" not in err, err
    (png,) = out.glob("*.png")
    assert read_record(png)["guidance_scale"] == 1.0
    assert main(["generate", *common, "--guidance-scale", "1", "--skip-existing"]) == 0
    assert "kept the 1 already there" in capsys.readouterr().out
    assert main(["generate", *common, "--guidance-scale", "1.5", "--skip-existing"]) == 2  # another g: not the kept image's


def test_python_warns_of_a_guidance_scale_below_1_on_an_lcm_lora_alone(tiny_sd, tiny_lcm, teachers_lora):
    import warnings

    from latent_consistency.pipelines import UnguidedScaleWarning

    lora = LCMGenerator.load(str(tiny_sd), lora=str(teachers_lora))
    with pytest.warns(UnguidedScaleWarning, match="guidance scale 0 is below 1: .* the image is that of guidance scale 1"):
        below = lora(["a red star"], lora.timesteps(1), 0.0, [0], 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnguidedScaleWarning)
        torch.testing.assert_close(below, lora(["a red star"], lora.timesteps(1), 1.0, [0], 16, 16), rtol=0, atol=0)
        lcm = LCMGenerator.load(str(tiny_lcm))
        lcm(["a red star"], lcm.timesteps(1), 1.0, [0], 16, 16)


def test_serve_notes_a_guidance_scale_below_1_on_an_lcm_lora_in_a_header(tiny_sd, teachers_lora):
    import io
    import warnings

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from latent_consistency.pipelines import UnguidedScaleWarning
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    generator = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(teachers_lora))
    with warnings.catch_warnings(), TestClient(create_app(generator, Limits(max_side=64), model_name="tiny")) as client:
        warnings.simplefilter("ignore", UnguidedScaleWarning)  # as `lcm serve` ignores it
        below = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 3, "guidance_scale": 0.5})
        at_1 = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 3, "guidance_scale": 1})
    assert below.status_code == at_1.status_code == 200 and np.array_equal(*(np.asarray(Image.open(io.BytesIO(r.content))) for r in (below, at_1)))
    assert "guidance_scale 0.5 is below 1" in below.headers["X-Guidance-Note"] and "X-Guidance-Note" not in at_1.headers
