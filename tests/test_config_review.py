"""Fixes of the run-configuration review: a config file's paths read as flags read them, what config.json records names the
same data from any working directory, and a blank path is refused, not taken as absent."""

import json

import pytest

from command_helpers import dry_run, refused
from latent_consistency.cli import main
from latent_consistency.errors import UserError
from latent_consistency.training.run_folder import saved_config


def test_a_config_file_s_home_paths_are_the_home_folder_s(capsys, tmp_path, monkeypatch):
    # was: "out": "~/run" wrote into a folder named "~" under the working directory, and "~/sd" was recorded as typed (taken
    # for a hub id); a prompt's "~" is text
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "sd").mkdir(parents=True)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"teacher": "~/sd", "data": "world:shapes", "out": "~/run", "validation_prompts": ["~ a tilde"]}))
    printed = dry_run(capsys, ["distill", "--config", str(config)])
    assert (printed["teacher"], printed["out"]) == (str(home / "sd"), str(home / "run"))
    assert printed["validation_prompts"] == ["~ a tilde"]


def test_a_local_shard_pattern_is_recorded_from_the_root(capsys, tmp_path, monkeypatch):
    # was: recorded as typed, so config.json read other shards (or none) from another working directory
    monkeypatch.chdir(tmp_path)
    printed = dry_run(capsys, ["distill", "--teacher", "org/sd", "--data", "shards/{0..1}.tar", "--eval-data", "held/*.tar",
                               "--out", "run"])
    assert (printed["data"], printed["eval_data"]) == (str(tmp_path / "shards/{0..1}.tar"), str(tmp_path / "held/*.tar"))
    assert printed["teacher"] == "org/sd"  # a hub id is no path
    assert dry_run(capsys, ["distill", "--teacher", "org/sd", "--data", "world:shapes", "--out", "run"])["data"] == "world:shapes"


@pytest.mark.parametrize("flag", ["--config", "--student-init", "--eval-data"])
def test_a_blank_source_flag_is_refused(run_error, tmp_path, flag):
    # was: exit 0, taken as not given (an unset shell variable in `--config "$CFG"` ran at the defaults)
    argv = ["distill", "--teacher", "org/sd", "--data", "world:shapes", "--out", str(tmp_path / "run"), flag, "", "--dry-run"]
    refused(run_error, argv, f"argument {flag}: is empty")


def test_a_blank_lora_to_fine_tune_is_refused(run_error, tmp_path):
    argv = ["finetune", "--model", "org/lcm", "--data", "world:shapes", "--adapter", "lora", "--out", str(tmp_path / "run"),
            "--lora", "", "--dry-run"]
    refused(run_error, argv, "argument --lora: is empty")


def test_a_blank_parts_from_is_refused_by_a_dry_run_too(run_error, tmp_path):
    # was: exit 0 from --dry-run; the build itself refused it
    refused(run_error, ["world", "build", "--preset", "tiny", "--out", str(tmp_path / "w"), "--parts-from", "", "--dry-run"],
            "argument --parts-from: is empty")
    assert not (tmp_path / "w").exists()



def test_a_dry_run_refuses_a_new_run_in_a_full_folder_and_a_resume_of_another_config(run_error, capsys, tmp_path):
    # was: exit 0 and the config printed (with --resume, the changed lr as if it were used); the run itself was refused
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["distill", "--teacher", "org/sd", "--data", "world:shapes", "--out", str(out)]
    refused(run_error, [*argv, "--dry-run"], f"run folder {out} is not empty")
    (out / "notes.txt").unlink()
    (out / "config.json").write_text(json.dumps(dry_run(capsys, argv)))  # as a run that stopped before its first step left it
    refused(run_error, [*argv, "--resume", "--lr", "5e-4", "--dry-run"], "was started with a different config (lr: 0.0001 -> 0.0005)")
    code, err = run_error([*argv, "--resume", "--dry-run"])
    assert code in (0, None), err
    code, err = run_error([*argv, "--dry-run"])  # a new run would clear it first; the dry run leaves it
    assert code in (0, None), err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize("command, flag", [("distill", "--teacher"), ("distill", "--data"), ("finetune", "--model")])
def test_a_dry_run_refuses_a_local_model_or_data_that_is_not_there(run_error, tmp_path, command, flag):
    # was: exit 0; the run then stopped at loading it
    model = "--teacher" if command == "distill" else "--model"
    values = {model: "org/sd", "--data": "world:shapes", flag: str(tmp_path / "nothere")}
    argv = [command, *(word for pair in values.items() for word in pair), "--out", str(tmp_path / "run"), "--dry-run"]
    refused(run_error, argv, f"{flag} {tmp_path / 'nothere'} does not exist")
    assert not (tmp_path / "run").exists()


def test_a_full_student_preset_s_target_decay_is_left_out_for_a_lora(capsys, tmp_path):
    # was: --preset sd --adapter lora kept the preset's μ = 0.95, which copies the whole UNet as the target; with the note
    # that the preset's lr is a full student's
    argv = ["distill", "--preset", "sd", "--adapter", "lora", "--teacher", "org/sd", "--data", "world:shapes", "--out", str(tmp_path / "run")]
    assert dry_run(capsys, argv)["ema_decay"] is None
    assert main([*argv, "--dry-run"]) in (0, None)
    assert capsys.readouterr().err.splitlines()[0] == ("lcm distill: note: --preset sd is tuned for a full student, its lr 8e-06 with it; "
                                               "--adapter lora trains LoRA adapters, usually at another rate: give --lr")
    assert dry_run(capsys, [*argv, "--ema-decay", "0.95"])["ema_decay"] == 0.95  # asked for, it is kept
    assert main([*argv, "--lr", "1e-4", "--dry-run"]) in (0, None)
    assert "tuned for" not in capsys.readouterr().err  # the user's own rate: no note (a CPU's fp16 one aside)
    sdxl_full = ["distill", "--preset", "sdxl-lora", "--adapter", "full", "--teacher", "org/sd", "--data", "world:shapes", "--out",
                 str(tmp_path / "run")]
    assert main([*sdxl_full, "--dry-run"]) in (0, None)
    assert "--preset sdxl-lora is tuned for LoRA adapters, its lr 0.0001 with it" in capsys.readouterr().err



def test_a_stop_before_the_first_checkpoint_says_there_is_nothing_to_continue_and_its_rerun_says_so(tiny_sd, tmp_path, monkeypatch,
                                                                                                   capsys):
    # was: "372 steps are lost; to continue, run the same command with --resume" (a resume starts at step 0), and the rerun
    # then said that the run "stopped before its first step" (its steps logged no line: --log-every above them)
    from latent_consistency.training import run_folder
    from tiny_models import write_captioned_images

    images = write_captioned_images(tmp_path / "images", 4)
    after_step = run_folder.RunFolder.after_step

    def stopping(self, progress, *args):
        after_step(self, progress, *args)
        if progress.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.RunFolder, "after_step", stopping)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "run"),
            "--log-every", "100", "--checkpoint-every", "0", "--omega-response-samples", "0"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lcm distill: interrupted at step 3 of 4, before its first checkpoint: 3 steps are lost, and there is nothing to continue "
        "from; to start it again, run the same command with --resume")
    monkeypatch.undo()
    assert main(argv) == 0
    assert f"{tmp_path / 'run'}: the run there stopped before its first checkpoint; starting it over" in capsys.readouterr().out


def test_a_resume_refuses_a_run_config_of_fields_this_version_does_not_know(run_error, capsys, tmp_path):
    # was: the unknown field dropped without a word, and config.json rewritten without it
    out = tmp_path / "run"
    out.mkdir()
    argv = ["distill", "--teacher", "org/sd", "--data", "world:shapes", "--out", str(out)]
    (out / "config.json").write_text(json.dumps(dry_run(capsys, argv) | {"future_knob": 5}))
    with pytest.raises(UserError, match="future_knob"):  # the run's own reading of it, as a resume makes
        saved_config(out / "config.json")
    refused(run_error, [*argv, "--resume", "--dry-run"], "was written by a newer latent-consistency (field(s) future_knob, unknown")


def test_a_resume_may_turn_on_gradient_checkpointing_and_accumulation(run_error, capsys, tmp_path):
    # was: "started with a different config (gradient_checkpointing: False -> True)": a run out of memory could not go on
    # with the usual remedies, which change no step's math; a batch the new accumulation does not split is still refused
    out = tmp_path / "run"
    out.mkdir()
    argv = ["distill", "--teacher", "org/sd", "--data", "world:shapes", "--out", str(out), "--batch-size", "4"]
    (out / "config.json").write_text(json.dumps(dry_run(capsys, argv)))
    from latent_consistency.training.config import DistillConfig

    started = DistillConfig(teacher="org/sd", data="world:shapes", out=str(out), batch_size=4)
    assert started.differences(DistillConfig(**{**vars(started), "gradient_checkpointing": True, "grad_accumulation": 2,
                                                "max_nonfinite_steps": 3})) == []
    changes = ["--gradient-checkpointing", "--grad-accumulation", "2", "--max-nonfinite-steps", "3"]
    printed = dry_run(capsys, [*argv, *changes, "--resume"])
    assert (printed["gradient_checkpointing"], printed["grad_accumulation"], printed["max_nonfinite_steps"]) == (True, 2, 3)
    refused(run_error, [*argv, "--grad-accumulation", "3", "--resume", "--dry-run"], "--batch-size 4 must be a multiple of --grad-accumulation 3")
    refused(run_error, [*argv, "--lr", "1e-3", "--resume", "--dry-run"], "was started with a different config (lr:")


@pytest.mark.parametrize("how", ["flag", "file"])
def test_a_validation_guidance_scale_of_8_given_and_clamped_gets_its_note(tmp_path, how):
    # was: no note for 8 (the field's default), whoever gave it; 9 got one. Needs training/loop.py of the review's patch.
    from types import SimpleNamespace

    from latent_consistency.training.config import DistillConfig, resolve_config
    from latent_consistency.training.loop import validation_scale_note

    values = dict(teacher="org/t", data="world:shapes", out=str(tmp_path / "run"), guidance_scale_min=1.0, guidance_scale_max=2.0)
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"validation_guidance_scale": 8}))
    config = (resolve_config(DistillConfig, overrides={**values, "validation_guidance_scale": 8.0}) if how == "flag" else
              resolve_config(DistillConfig, config_file=str(config_file), overrides=values))
    student = SimpleNamespace(adapter="full", target_unet=SimpleNamespace(config={"time_cond_proj_dim": 32}))
    base = SimpleNamespace(guidance_record=None)
    assert validation_scale_note(config, base, student).startswith("--validation-guidance-scale 8 is outside [1, 2]")
    assert validation_scale_note(resolve_config(DistillConfig, overrides=values), base, student) is None  # the default, not asked for


@pytest.mark.parametrize("skip", ["-3", "0"])
def test_lcm_distill_says_one_least_skip(skip, tmp_path, run_error):
    """Was: --skip -3 "must be 0 or more", then --skip 0 "must be at least 1"."""
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", "org/t", "--data", "world:shapes", "--out", str(tmp_path / "r"),
                           f"--skip={skip}", "--dry-run"])
    assert (code, err) == (2, f"lcm distill: error: --skip must be at least 1, got {skip}"), err
