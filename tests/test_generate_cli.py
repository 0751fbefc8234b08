"""`lcm generate` end to end on a tiny LCM folder, and its error contract (one line, exit 2)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latent_consistency.cli import main


@pytest.mark.slow
def test_generate_end_to_end_subprocess(tiny_lcm, tmp_path):
    out = tmp_path / "images"
    cmd = [sys.executable, "-m", "latent_consistency.cli", "generate", "a red star", "a blue ring",
           "--model", str(tiny_lcm), "--steps", "2", "--out", str(out), "--seed", "5", "--height", "16", "--width", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000-a-red-star.png", "0001-a-blue-ring.png"]
    assert Image.open(out / files[0]).size == (16, 16)
    # prompts from standard input: the same images
    piped = tmp_path / "piped"
    cmd = [sys.executable, "-m", "latent_consistency.cli", "generate", "--prompt-file", "-", "--model", str(tiny_lcm), "--steps", "2",
           "--out", str(piped), "--seed", "5", "--height", "16", "--width", "16"]
    result = subprocess.run(cmd, input="a red star\n\na blue ring\n", capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for name in files:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(piped / name)))


def test_generate_is_reproducible_and_independent_of_batch_size(tiny_lcm, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red star\n\na green square\na blue ring\n")
    common = ["generate", "--model", str(tiny_lcm), "--prompt-file", str(prompt_file), "--steps", "3", "--seed", "1"]
    assert main(common + ["--out", str(tmp_path / "a"), "--batch-size", "3"]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 3
    for name in names:
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # batched convolutions may round differently by one level
    assert main(common + ["--out", str(tmp_path / "c"), "--batch-size", "3", "--seed", "2"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / names[0])), np.asarray(Image.open(tmp_path / "c" / names[0])))


def test_prompt_option_adds_prompts_after_the_positional_ones(tiny_lcm, tmp_path):
    """`--prompt TEXT` (repeatable, diffusers' prompt=), not argparse's abbreviation of --prompt-file."""
    common = ["--model", str(tiny_lcm), "--steps", "2", "--seed", "3"]
    assert main(["generate", "a red star", "--prompt", "a blue ring", "--prompt", "a green square", "--out", str(tmp_path / "a")] + common) == 0
    assert main(["generate", "a red star", "a blue ring", "a green square", "--out", str(tmp_path / "b")] + common) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["0000-a-red-star.png", "0001-a-blue-ring.png", "0002-a-green-square.png"]
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ["--model", "--steps", "--guidance-scale", "--seed", "--height", "--width", "--batch-size",
                   "--out", "--device", "--dtype", "--prompt-file", "--prompt", "--timesteps", "--lora"]:
        assert option in text


def bad_inputs(tiny_lcm, tiny_sd, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    junk = tmp_path / "junk"
    junk.mkdir()
    # A folder nobody may create, root included (the tests run as root in CI).
    locked = "/proc/lcm-unwritable"
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    m = str(tiny_lcm)
    return {
        "missing model": (["a", "--model", str(tmp_path / "none")], "does not exist"),
        "not diffusers": (["a", "--model", str(junk)], "not a diffusers pipeline folder"),
        "no omega input": (["a", "--model", str(tiny_sd)], "without the guidance input"),
        "steps 0": (["a", "--model", m, "--steps", "0"], "steps must be between 1 and 50"),
        "steps > T/k": (["a", "--model", m, "--steps", "51"], "steps must be between 1 and 50"),
        "height": (["a", "--model", m, "--height", "15"], "multiple of the VAE factor 2"),
        "negative guidance": (["a", "--model", m, "--guidance-scale", "-1"], "guidance-scale"),
        "absurd guidance": (["a", "--model", m, "--guidance-scale", "500"], "guidance-scale"),
        "guidance below 1 for an omega input": (["a", "--model", m, "--guidance-scale", "0.5"], "trained on ω >= 0"),
        "empty prompt file": (["--model", m, "--prompt-file", str(empty)], "holds no prompts"),
        "no prompts": (["--model", m], "no prompts given"),
        "prompt file is a folder": (["--model", m, "--prompt-file", str(junk)], "is a folder"),
        "prompt file name too long": (["--model", m, "--prompt-file", "star " * 100], "File name too long"),
        "prompt file empty name": (["--model", m, "--prompt-file", ""], "--prompt-file is empty"),
        "only blank --prompt": (["--model", m, "--prompt", " "], "prompt 1 is blank"),
        "output is a file": (["a", "--model", m, "--out", str(blocked / "sub")], "cannot write to output folder"),
        "unwritable output": (["a", "--model", m, "--out", locked], "cannot write to output folder"),
        "bad timesteps": (["a", "--model", m, "--timesteps", "10,999"], "strictly decreasing"),
        "missing lora": (["a", "--model", str(tiny_sd), "--lora", str(tmp_path / "none")], "does not exist"),
        "folder that is not a lora": (["a", "--model", m, "--lora", str(junk)], "cannot load the LoRA"),
        "not a lora": (["a", "--model", str(tiny_sd), "--lora", str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")],
                       "cannot load the LoRA"),
    }


@pytest.mark.parametrize("case", ["missing model", "not diffusers", "no omega input", "steps 0", "steps > T/k", "height",
                                  "negative guidance", "absurd guidance", "guidance below 1 for an omega input",
                                  "empty prompt file", "no prompts", "prompt file is a folder", "prompt file name too long",
                                  "prompt file empty name", "only blank --prompt",
                                  "output is a file", "unwritable output", "bad timesteps", "missing lora", "folder that is not a lora",
                                  "not a lora"])
def test_bad_input_one_line_exit_2_nothing_written(tiny_lcm, tiny_sd, tmp_path, run_error, case):
    argv, message = bad_inputs(tiny_lcm, tiny_sd, tmp_path)[case]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    code, err = run_error(["generate"] + argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.iterdir())
