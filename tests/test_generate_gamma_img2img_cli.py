"""`lcm generate --gamma` and `--init-image/--strength`: what they write, and their error contract (one line, exit 2,
nothing written)."""

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.pipelines import LCMGenerator


def write_image(path, size=(16, 16), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def read(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_gamma_and_init_image_write_what_the_generator_makes(tiny_lcm, tmp_path):
    init = write_image(tmp_path / "init.png")
    common = ["generate", "a red star", "--model", str(tiny_lcm), "--steps", "2", "--seed", "3"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "tcd"), "--gamma", "0.3"]) == 0
    assert main(common + ["--out", str(tmp_path / "i2i"), "--init-image", str(init), "--strength", "0.5", "--gamma", "0.3"]) == 0
    name = "0000-a-red-star.png"
    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    pixels = torch.from_numpy(read(init).astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    expected = {
        "tcd": generator(["a red star"], generator.timesteps(2), 8.0, [3], 16, 16, gamma=0.3),
        "i2i": generator(["a red star"], generator.timesteps(2, strength=0.5), 8.0, [3], 16, 16, gamma=0.3, init_images=pixels,
                         strength=0.5),
    }
    for folder, images in expected.items():
        want = ((images[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
        assert np.abs(read(tmp_path / folder / name) - want).max() <= 1, folder
    assert not np.array_equal(read(tmp_path / "plain" / name), read(tmp_path / "tcd" / name))


def test_init_image_is_resized_to_height_and_width(tiny_lcm, tmp_path):
    init = write_image(tmp_path / "init.png", size=(24, 10))
    assert main(["generate", "a ring", "--model", str(tiny_lcm), "--steps", "1", "--init-image", str(init), "--out", str(tmp_path / "own")]) == 0
    assert Image.open(tmp_path / "own" / "0000-a-ring.png").size == (24, 10)
    assert main(["generate", "a ring", "--model", str(tiny_lcm), "--steps", "1", "--init-image", str(init), "--height", "16",
                 "--width", "16", "--out", str(tmp_path / "resized")]) == 0
    assert Image.open(tmp_path / "resized" / "0000-a-ring.png").size == (16, 16)


def test_help_documents_the_new_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ["--gamma", "--init-image", "--strength"]:
        assert option in text


def bad_inputs(tiny_lcm, tiny_sd, tmp_path):
    m = str(tiny_lcm)
    init = str(write_image(tmp_path / "init.png"))
    odd = str(write_image(tmp_path / "odd.png", size=(15, 16)))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {
        "gamma above 1": (["a", "--model", m, "--gamma", "1.5"], "--gamma 1.5 is outside [0, 1]"),
        "gamma below 0": (["a", "--model", m, "--gamma", "-0.1"], "outside [0, 1]"),
        "gamma with a solver": (["a", "--model", str(tiny_sd), "--sampler", "ddim", "--gamma", "0.3"], "apply to --sampler lcm"),
        "strength without image": (["a", "--model", m, "--strength", "0.5"], "--strength applies to img2img"),
        "missing image": (["a", "--model", m, "--init-image", str(tmp_path / "none.png")], "does not exist"),
        "image is a folder": (["a", "--model", m, "--init-image", str(tmp_path)], "is a folder"),
        "not an image": (["a", "--model", m, "--init-image", str(text)], "cannot read init image"),
        "size not a multiple": (["a", "--model", m, "--init-image", odd], "not a multiple of the VAE factor 2; pass --height and --width"),
        "strength 0": (["a", "--model", m, "--init-image", init, "--strength", "0"], "strength must be in (0, 1]"),
        "strength above 1": (["a", "--model", m, "--init-image", init, "--strength", "1.2"], "strength must be in (0, 1]"),
        "strength leaves no step": (["a", "--model", m, "--init-image", init, "--strength", "0.01"], "leaves no step"),
        "strength leaves too few steps": (["a", "--model", m, "--init-image", init, "--strength", "0.04", "--steps", "4"],
                                          "use steps <= 2 or strength >= 0.08"),
        "strength and timesteps": (["a", "--model", m, "--init-image", init, "--strength", "0.5", "--timesteps", "499,259"],
                                   "not both"),
    }


CASES = ["gamma above 1", "gamma below 0", "gamma with a solver", "strength without image", "missing image", "image is a folder",
         "not an image", "size not a multiple", "strength 0", "strength above 1", "strength leaves no step",
         "strength leaves too few steps", "strength and timesteps"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(tiny_lcm, tiny_sd, tmp_path, run_error, case):
    argv, message = bad_inputs(tiny_lcm, tiny_sd, tmp_path)[case]
    out = tmp_path / "out"
    code, err = run_error(["generate"] + argv + ["--out", str(out)])
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.iterdir())
