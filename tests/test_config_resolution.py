"""How a training run's config is resolved (preset <- --config FILE <- flags) and recorded: a config file is refused
whole when it is wrong, settings that do not apply are refused rather than ignored wherever they come from, what
--dry-run prints is what the run accepts, and a resume that spells a setting another way is the same run."""

import json

import pytest

from latent_consistency.cli import main
from latent_consistency.training.config import DistillConfig

DISTILL = ["distill", "--teacher", "org/t", "--data", "world:shapes"]  # a hub id: --dry-run refuses a local path that is not there


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


def dry_run(capsys, argv) -> dict:
    assert main([*argv, "--dry-run"]) in (0, None)
    return json.loads(capsys.readouterr().out)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_config_file_naming_a_field_twice_is_refused(run_error, tmp_path):
    # was: exit 0, the last value (lr 0.2) used and the first dropped without a word
    config = write(tmp_path / "c.json", '{"lr": 0.1, "steps": 3, "lr": 0.2}')
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"],
            "gives field lr twice")


@pytest.mark.parametrize("field, value", [("steps", "5"), ("lr", "5e-5"), ("compile", "false"), ("teacher", None)])
def test_a_config_field_of_the_wrong_type_is_refused_where_a_flag_overrides_it(run_error, tmp_path, field, value):
    # was: exit 0: the file's malformed field was checked only when no flag replaced it, so one file was valid or not
    # depending on the command line
    config = write(tmp_path / "c.json", json.dumps({field: value}))
    flag = {"steps": ["--steps", "3"], "lr": ["--lr", "1e-4"], "compile": ["--no-compile"], "teacher": ["--teacher", "t2"]}[field]
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, *flag, "--dry-run"], f"config field {field} must be")


@pytest.mark.parametrize("field, value", [("time_cond_proj_dim", 128), ("omega_response_samples", 8)])
def test_a_lora_student_refuses_omega_settings_from_a_config_file(run_error, capsys, tmp_path, field, value):
    # was: exit 0 and the setting silently ignored (a LoRA student has no ω input); the same flag was refused
    argv = [*DISTILL, "--out", str(tmp_path / "run"), "--adapter", "lora"]
    refused(run_error, [*argv, "--config", write(tmp_path / "c.json", json.dumps({field: value})), "--dry-run"],
            f"config field {field} {value}")
    # a LoRA config --dry-run printed (those fields at their defaults, the tiny preset's left out) is still given back whole
    printed = dry_run(capsys, [*argv, "--preset", "tiny"])
    assert dry_run(capsys, [*DISTILL, "--out", str(tmp_path / "run"), "--config", write(tmp_path / "d.json", json.dumps(printed))]) == printed


@pytest.mark.parametrize("method", [["--method", "guidance"], ["--method", "progressive", "--student-steps", "2"]])
def test_an_omega_response_count_for_guided_distill_is_refused(run_error, capsys, tmp_path, method):
    # was: exit 0, and the run measured no ω response (only an LCM's is measured): the setting silently ignored
    argv = [*DISTILL, "--out", str(tmp_path / "run"), *method]
    refused(run_error, [*argv, "--omega-response-samples", "8", "--dry-run"], "--method")
    refused(run_error, [*argv, "--config", write(tmp_path / "c.json", '{"omega_response_samples": 8}'), "--dry-run"],
            "config field omega_response_samples 8")
    # the tiny preset's count is no request, and what --dry-run prints comes back the same
    printed = dry_run(capsys, [*argv, "--preset", "tiny"])
    assert dry_run(capsys, [*DISTILL, "--out", str(tmp_path / "run"), "--config", write(tmp_path / "d.json", json.dumps(printed))]) == printed
    assert main([*argv, "--preset", "tiny", "--omega-response-samples", "0", "--dry-run"]) in (0, None)
    capsys.readouterr()


def test_a_negative_student_step_count_is_refused(run_error, tmp_path):
    # was: exit 0 with student_steps -3 in the printed config (a negative count, ignored by --method lcd)
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--student-steps", "-3", "--dry-run"],
            "--student-steps must be 0 or more, got -3")


@pytest.mark.parametrize("extra, fix", [(["--skip", "50"], "set --skip 20"), (["--solver", "dpm"], "set --solver ddim"),
                                        (["--loss-weighting", "ict"], "set --loss-weighting uniform")])
def test_dry_run_refuses_lcd_settings_of_guided_distill_as_the_run_does(run_error, tmp_path, extra, fix):
    # was: --dry-run printed the config with exit 0; the run itself refused it only after loading the teacher
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--method", "guidance", *extra, "--dry-run"], fix)


def test_a_resume_that_spells_out_the_default_target_decay_is_the_same_run(tiny_sd, tmp_path, run_error):
    # was: "started with a different config (ema_decay: None -> 0.95)": unset is 0.95 for a full student, the same μ
    from tiny_models import write_captioned_images

    images = write_captioned_images(tmp_path / "images", 4)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "run")]
    assert run_error([*argv, "--steps", "1"])[0] == 0
    refused(run_error, [*argv, "--steps", "2", "--ema-decay", "0.9", "--resume"], "ema_decay: None -> 0.9")
    assert run_error([*argv, "--steps", "2", "--ema-decay", "0.95", "--resume"])[0] == 0
    assert DistillConfig(adapter="lora").differences(DistillConfig(adapter="lora", ema_decay=0.0)) == []
    assert DistillConfig(adapter="lora").differences(DistillConfig(adapter="lora", ema_decay=0.95)) == ["ema_decay: None -> 0.95"]


@pytest.mark.parametrize("how", ["flag", "file"])
def test_held_out_data_replaces_the_preset_s_held_out_fraction(run_error, capsys, tmp_path, how):
    # was: "give --eval-data or --eval-fraction, not both" for `lcm finetune --preset sd --eval-data DIR`: the preset's
    # --eval-fraction 0.1 counted as the user's
    argv = ["finetune", "--preset", "sd", "--model", "org/m", "--data", "world:shapes", "--out", str(tmp_path / "run")]
    asked = ["--eval-data", "world:digits"] if how == "flag" else ["--config", write(tmp_path / "c.json", '{"eval_data": "world:digits"}')]
    config = dry_run(capsys, [*argv, *asked])
    assert (config["eval_data"], config["eval_fraction"]) == ("world:digits", 0.0)
    refused(run_error, [*argv, *asked, "--eval-fraction", "0.2", "--dry-run"], "give --eval-data or --eval-fraction, not both")
