"""Defects found by a review of the SDXL and PixArt-α families run through the `lcm` commands as a user runs them."""

import pytest

from tiny_models import save_tiny_pixart, write_captioned_images


@pytest.fixture(scope="module")
def tiny_pixart_lcm(tmp_path_factory):
    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-lcm", seed=1, lcm=True)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 4, size=(14, 30))


def test_a_lora_finetune_of_a_pixart_lcm_is_not_told_to_distil(tiny_pixart_lcm, image_folder, tmp_path, run_error):
    """was: `lcm finetune --model PIXART_LCM --adapter lora` answered "... cannot load LoRA weights: distil a full student (no
    --adapter lora)", advice for `lcm distill` given to a user fine-tuning an LCM. The advice now fits both commands."""
    out = tmp_path / "run"
    code, err = run_error(["finetune", "--preset", "tiny", "--model", str(tiny_pixart_lcm), "--data", str(image_folder), "--out", str(out),
                           "--steps", "1", "--adapter", "lora"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot load LoRA weights" in err and "leave --adapter lora out" in err and "distil" not in err, err
    assert not out.exists()
