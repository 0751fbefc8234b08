"""What a user gives `lcm generate` on the less-travelled paths: an img2img init image whose own size a PixArt model or the
size limit refuses, and a preview decoder whose config.json the decoder cannot compute with. Each mistake is one line on
stderr naming what to fix, exit code 2, nothing written."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def tiny_pixart_lcm(tmp_path_factory):
    from tiny_models import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-lcm", seed=1, lcm=True)


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    """A random AutoencoderTiny for the tiny models' 4-channel latents, 2x smaller than their images."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1)).save_pretrained(folder, safe_serialization=True)
    return folder


def write_image(path, width, height):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def generate(model, out, *extra) -> list[str]:
    return ["generate", "a red star", "--model", str(model), "--steps", "1", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("case", ["off a PixArt model's patch grid", "far above the model's size"])
def test_an_init_image_of_a_size_the_model_cannot_make_names_the_image(case, tiny_pixart_lcm, tiny_lcm, tmp_path, run_error):
    """The init image's own size went to the size check as if the user had given it: "--height 18 must be ..." for a
    command without --height, and no word that --height/--width resize the image."""
    model, size, message = {
        # 18 is a multiple of the VAE factor 2, but not of 2 x the transformer's patch size 2
        "off a PixArt model's patch grid": (tiny_pixart_lcm, (18, 18), "its height 18 must be a positive multiple of the VAE factor 2 "
                                            "times the transformer's patch size 2; pass --height and --width to resize it"),
        "far above the model's size": (tiny_lcm, (16, 256), "its height 256 is more than 8x the model's 16 px"),
    }[case]
    init = write_image(tmp_path / "init.png", *size)
    out = tmp_path / "out"
    code, err = run_error(generate(model, out, "--init-image", init))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"init image {init} is {size[0]}x{size[1]} px: {message}" in err and "--height 18" not in err, err
    assert not out.exists()


def test_an_init_image_resized_by_height_and_width_onto_the_patch_grid_works(tiny_pixart_lcm, tmp_path, run_error):
    init = write_image(tmp_path / "init.png", 18, 18)
    code, err = run_error(generate(tiny_pixart_lcm, tmp_path / "out", "--init-image", init, "--height", "16", "--width", "20"))
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "0000-a-red-star.png").size == (20, 16)


PREVIEW_CONFIGS = {
    # was an AttributeError traceback ('list' object has no attribute 'get')
    "config a JSON list": ([1, 2], "its config.json holds a JSON list, not an object"),
    # the latents were divided by 0 (or by a negative number, or by infinity): garbage images written, exit 0
    "scaling factor 0": ({"scaling_factor": 0}, "scaling_factor is 0, not a positive number"),
    "scaling factor negative": ({"scaling_factor": -1.0}, "scaling_factor is -1.0, not a positive number"),
    # a TypeError traceback at the first decode
    "scaling factor null": ({"scaling_factor": None}, "scaling_factor is null, not a positive number"),
    # int(2.5) = 2 passed the size check: 20 x 20 images for a 16 x 16 request
    "fractional upsampling": ({"upsampling_scaling_factor": 2.5}, "upsampling_scaling_factor is 2.5, not a whole number >= 1"),
    # a ValueError traceback (float('x')) in the shift check
    "shift factor text": ({"shift_factor": "x"}, 'shift_factor is "x", not a number or null'),
    # a TypeError traceback inside the decoder's constructor
    "latent channels text": ({"latent_channels": "four"}, 'latent_channels is "four", not a whole number >= 1'),
    "a block width as text": ({"decoder_block_out_channels": ["8", "8"]}, "cannot load the preview decoder"),
}


@pytest.mark.parametrize("case", list(PREVIEW_CONFIGS))
def test_a_preview_decoder_config_it_cannot_decode_with_is_one_line_exit_2(case, tiny_lcm, tiny_taesd, tmp_path, run_error):
    change, message = PREVIEW_CONFIGS[case]
    decoder = shutil.copytree(tiny_taesd, tmp_path / "taesd")
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps(config | change if isinstance(change, dict) else change))
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_lcm, out, "--preview-decoder", str(decoder)))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
