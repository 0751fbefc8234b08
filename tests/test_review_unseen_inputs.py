"""Inputs of `lcm generate` and `lcm evaluate` that no other test gives: a prompt file whose lines hold Unicode line
separators, custom --timesteps off the LCM's distillation grid, and the largest --seed an evaluation's images can take."""

import argparse

from PIL import Image

from latent_consistency.prompts import read_prompt_file


def test_a_prompt_file_is_split_at_line_ends_only(tmp_path):
    # defect: str.splitlines also split a line at U+2028, U+2029, U+0085 (NEL), form feed, vertical tab and U+001C-U+001E,
    # so a 3-line file made 6 images, and every later prompt took another image number and seed
    file = tmp_path / "prompts.txt"
    file.write_bytes("a red star\u2028on blue\r\na blue\x0cring\rnel\x85here\nlast\u2029one\x0b\x1c\x1d\x1etwo\n".encode())
    assert read_prompt_file(str(file)) == ["a red star\u2028on blue", "a blue\x0cring", "nel\x85here", "last\u2029one\x0b\x1c\x1d\x1etwo"]


def test_custom_timesteps_off_the_distillation_grid_are_noted(tiny_lcm, tmp_path, run_error):
    # defect: --timesteps 999,700 sampled the LCM at t = 700, where it was never distilled (its grid is 19, 39, ..., 999),
    # without a word; diffusers' LCMScheduler (and TCDScheduler) warn of timesteps off the original schedule
    out = tmp_path / "images"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--timesteps", "999,700,301", "--out", str(out),
                           "--height", "16", "--width", "16", "--device", "cpu"])
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("lcm generate: note:") and "700" in line]
    assert len(notes) == 1 and "301" in notes[0] and "grid" in notes[0], err
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--timesteps", "999,499", "--out", str(tmp_path / "on"),
                           "--height", "16", "--width", "16", "--device", "cpu"])
    assert code == 0 and "grid" not in err, err


def test_evaluate_takes_the_largest_seed_its_last_image_can_have(tmp_path):
    # defect: `lcm evaluate` refused --seed 2^63 - N (N images: the last one's seed 2^63 - 1, which `lcm generate` takes),
    # checking SEED + N instead of SEED + N - 1 against the largest seed
    from latent_consistency.cli.evaluate import load_eval_set
    from latent_consistency.pipelines import MAX_SEED

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\na blue ring\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (200 * i, 0, 0)).save(reference / f"{i}.png")
    args = argparse.Namespace(prompts=str(prompts), samples=2, images_per_prompt=1, reference=str(reference), seed=MAX_SEED - 1)
    assert load_eval_set(args, 16).seed == MAX_SEED - 1


def test_a_refused_guidance_scale_is_quoted_as_given(tiny_lcm, tmp_path, run_error):
    # defect: `{:g}` rounded to 6 digits, so --guidance-scale 0.9999999 was refused as "--guidance-scale 1 is below 1"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--guidance-scale", "0.9999999", "--out", str(tmp_path / "a")])
    assert code == 2 and "--guidance-scale 0.9999999 is below 1" in err, err
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--guidance-scale", "30.000001", "--out", str(tmp_path / "b")])
    assert code == 2 and "--guidance-scale 30.000001 is outside" in err, err
