"""Options that were accepted and then did nothing: each one now works or is refused in one line (exit 2, nothing written),
while a preset's or a default's value of it, which the user did not ask for, stays accepted."""

import json

import pytest

from latent_consistency.cli import main
from tiny_models import save_tiny_lora

PIXART_RANGE = ["--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5"]


def refused(run_error, argv, message, out):
    """`argv` exits 2 with one line holding `message`, and --out is not made."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)
    assert not out.exists()


def dry_run(capsys, argv) -> dict:
    assert main([*argv, "--dry-run"]) in (0, None)
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flag", [["--time-cond-proj-dim", "128"], ["--omega-response-samples", "8"]])
def test_a_pixart_teacher_refuses_the_settings_of_an_omega_input(tiny_pixart, run_error, capsys, tmp_path, flag):
    # was: exit 0, a PixArt-LCM exported without an ω input and config.json saying time_cond_proj_dim 128 (or a response
    # count that measured nothing)
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_pixart), "--data", "world:shapes", "--out", str(out), *PIXART_RANGE]
    refused(run_error, [*argv, *flag], "is a PixArt transformer, which has no ω input", out)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({flag[0][2:].replace("-", "_"): int(flag[1])}))
    refused(run_error, [*argv, "--config", str(config)], f"config field {flag[0][2:].replace('-', '_')}", out)
    # the tiny preset's 32 (and 4) are no request: accepted, and what --dry-run prints is given back whole
    printed = dry_run(capsys, argv)
    config.write_text(json.dumps(printed))
    assert dry_run(capsys, ["distill", "--config", str(config)]) == printed


def test_an_omega_response_count_at_one_guidance_scale_is_refused(run_error, capsys, tmp_path):
    # was: exit 0, and no ω response measured: it is measured between the ends of the guidance range, and there was one scale
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--teacher", "org/t", "--data", "world:shapes", "--out", str(out), "--guidance-scale-min", "4",
            "--guidance-scale-max", "4"]
    refused(run_error, [*argv, "--omega-response-samples", "16"], "are both 4: give a range, or leave it out", out)
    printed = dry_run(capsys, argv)  # the tiny preset's 4 is no request
    config = tmp_path / "c.json"
    config.write_text(json.dumps(printed))
    assert dry_run(capsys, ["distill", "--config", str(config)]) == printed
    assert dry_run(capsys, [*argv[:-2], "--guidance-scale-max", "5", "--omega-response-samples", "16"])["omega_response_samples"] == 16


@pytest.fixture(scope="module")
def tiny_lcm_lora(tiny_sd, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "lora", tiny_sd)


@pytest.mark.parametrize("flag", ["--guidance-scale-min", "--guidance-scale-max"])
def test_fine_tuning_an_lcm_lora_refuses_a_guidance_range(tiny_sd, tiny_lcm_lora, run_error, capsys, tmp_path, flag):
    # was: exit 0, and the range did nothing: LCF feeds ω to the LCM's ω input, and an LCM-LoRA's base model has none (the
    # LoRA came out bit for bit the same at g ∈ [1, 2] as at [3, 15])
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny_sd), "--lora", str(tiny_lcm_lora), "--adapter", "lora", "--data", "world:shapes", "--out", str(out)]
    refused(run_error, [*argv, "--preset", "tiny", flag, "2"], f"{flag} sets the guidance scales whose ω", out)
    # the world preset's range is no request: left at the defaults, which --dry-run prints and takes back
    printed = dry_run(capsys, [*argv, "--preset", "world"])
    assert (printed["guidance_scale_min"], printed["guidance_scale_max"]) == (3.0, 15.0)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(printed))
    assert dry_run(capsys, ["finetune", "--config", str(config)]) == printed


@pytest.mark.parametrize("before", [["--world", "W"], ["--samples", "7"], ["--seed", "3"], ["--exact"]])
def test_an_evaluation_option_before_sweep_is_refused(run_error, tmp_path, before):
    # was: exit 0: sweep reads its own options only, so --seed or --exact did nothing, and --world or --samples were
    # replaced by sweep's defaults (the shipped world, 500)
    out = tmp_path / "sweep"
    refused(run_error, ["evaluate", *before, "sweep", "--runs", str(tmp_path), "--out", str(out)],
            f"{before[0]} is an option of `lcm evaluate` itself, given before `sweep`", out)


def test_an_evaluation_world_without_world_prompts_is_refused(run_error, tmp_path):
    # was: exit 0, the images scored by CLIP alone: a world's judge scores world:NAME prompts only
    out = tmp_path / "eval"
    refused(run_error, ["evaluate", "--lcm", "lcm", "--prompts", str(tmp_path / "prompts.txt"), "--world", "W", "--clip", "c", "--out", str(out)],
            "--world W gives the judge of world:NAME prompts", out)
