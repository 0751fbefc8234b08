"""`lcm generate` with inputs no report uses: seeds past 2^32, a teacher sampled in one step, solver step counts it
refuses, a lone blank prompt, a mistake next to settings that get notes. Found by trying the demo's models (LCM, LCF,
the world's teacher) on new prompts, seeds, steps, guidance scales and sizes; the images themselves matched the
teacher's limits there (the user guide's sections on sampling)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from test_generation_edges import generate
from test_reproducibility import library_pixels, pixels

CPU = torch.device("cpu")


def test_a_seed_of_2_to_the_32_or_more_is_said_to_repeat_a_smaller_seeds_image(lcm, tiny_lcm, tmp_path, run_error):
    # was: `--seed 4294967296` (2^32) wrote seed 0's image without a word (torch's CPU generator keeps a seed's low 32 bits),
    # though seeds up to 2^63 - 1 are taken; a user drawing "new" images from large seeds got copies of small seeds' ones
    settings = ["--steps", "2", "--guidance-scale", "3"]
    code, err = run_error(generate(tiny_lcm, tmp_path / "big", "a red star", "--seed", str(2**32), *settings))
    assert code == 0 and err.startswith("lcm generate: note: seed 4294967296 makes the image of seed 0") and "--seed at most 4294967295" in err, err
    np.testing.assert_array_equal(pixels(tmp_path / "big" / "0000-a-red-star.png"), library_pixels(lcm, "a red star", 0))
    # the last image's seed 2^32 - 1 is still a seed of its own; one image more reaches 2^32
    code, err = run_error(generate(tiny_lcm, tmp_path / "below", "a red star", "a ring", "--seed", str(2**32 - 2), *settings))
    assert code == 0 and "note" not in err, err
    code, err = run_error(generate(tiny_lcm, tmp_path / "across", "a red star", "a ring", "--seed", str(2**32 - 1), *settings))
    assert code == 0 and "seed 4294967296 makes the image of seed 0" in err and "--seed at most 4294967294 for 2 image(s)" in err, err


def test_one_ddim_step_that_reads_the_noise_as_a_clean_latent_gets_a_note(tiny_sd, tmp_path, run_error):
    # was: `--sampler ddim --steps 1` evaluates the teacher once, at timestep 1 under SD's "leading" spacing with steps_offset 1, where
    # the starting noise is read as an almost clean latent: the PNG is that noise (the world teacher's DDIM row, FID 424 at
    # 1 step), without a word; two steps start at timestep 501, and DPM-Solver's one step too
    size = ["--height", "16", "--width", "16"]
    code, err = run_error(generate(tiny_sd, tmp_path / "one", "a star", "--sampler", "ddim", "--steps", "1", *size))
    assert code == 0 and len(err.splitlines()) == 1, err
    assert "note: 1 ddim step(s)" in err and "start at timestep 1," in err and "give --steps 2 or more" in err, err
    for sampler, steps in (("ddim", "2"), ("dpm++", "1")):
        code, err = run_error(generate(tiny_sd, tmp_path / sampler, "a star", "--sampler", sampler, "--steps", steps, *size))
        assert code == 0 and "note" not in err, err


def test_solver_steps_that_are_no_distinct_timesteps_leave_no_out_folder(tiny_sd, tmp_path, run_error):
    # was: the step count was refused inside the first batch's sampling, after --out was made: the one-line error left an
    # empty folder behind (README: a user's mistake writes nothing)
    out = tmp_path / "out"
    code, err = run_error(generate(tiny_sd, out, "a star", "--sampler", "dpm++", "--steps", "999", "--height", "16", "--width", "16"))
    assert code == 2 and len(err.splitlines()) == 1 and "use at most 998" in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv", [[""], ["--prompt", " "]])
def test_a_lone_blank_prompt_is_named_in_the_error(tiny_lcm, tmp_path, run_error, argv):
    # was: `lcm generate ""` (a script's unset "$PROMPT") said "no prompts given; pass prompts as arguments", to a user who
    # had passed one; then "no prompts given: prompt 1 is blank", still saying none was given
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", *argv))
    assert code == 2 and len(err.splitlines()) == 1 and "prompt 1 is blank" in err and "no prompts given" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_refused_run_prints_its_error_alone_not_the_notes_of_its_settings(tiny_lcm, tmp_path, run_error):
    # was: on the demo's LCM (g recorded on [1, 2], ω response 0) `--guidance-scale 8 --height 8 --width 8` printed the two
    # guidance notes, then the error (three lines for one mistake), and a long prompt's truncation note came before an
    # init image's or a strength's error; the notes now follow the checks, for runs that happen
    from latent_consistency.guidance_record import GuidanceRecord, write_record

    model = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    write_record(model, GuidanceRecord(1.0, 2.0, 2.0, {999: 0.0, 499: 0.0}))
    long = " ".join(["a large red star at the top"] * 4)
    for argv, error in ((["a red star", "--guidance-scale", "8", "--height", "7"], "--height 7"),
                        ([long, "--init-image", str(tmp_path / "missing.png")], "does not exist"),
                        (["a red star", "--guidance-scale", "8", "--timesteps", "999,1999"], "strictly decreasing")):
        code, err = run_error(generate(model, tmp_path / "out", *argv))
        assert code == 2 and len(err.splitlines()) == 1 and error in err, err
        assert not (tmp_path / "out").exists()
    code, err = run_error(generate(model, tmp_path / "out", long, "--guidance-scale", "8", "--steps", "2"))
    assert code == 0 and [line.split(": ")[1] for line in err.splitlines()] == ["note"] * 3, err  # truncated, outside, ignored
