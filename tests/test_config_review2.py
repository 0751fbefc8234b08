"""Fixes of the run-configuration review's remaining findings: a run folder inside the data it reads refused, a config file's
mistakes said as the file's (a suggestion for a misspelt field, a checkpoint's state.json, YAML, a nested section), a moved
run folder's resume noted, and what the dry run resolves of its sentinel values said."""

import json

import pytest

from command_helpers import refused
from tiny_models import write_captioned_images


@pytest.mark.parametrize("held_out", [False, True])
def test_a_run_folder_inside_the_image_folder_it_reads_is_refused(run_error, tmp_path, held_out):
    # was: accepted; the validation grids it writes were then read as images of no caption ("run/samples/step-0000002.png
    # is not in metadata.jsonl"), as --eval-data inside --data is refused
    data = write_captioned_images(tmp_path / "data", 4)
    held = write_captioned_images(tmp_path / "held", 2)
    inside = (held if held_out else data) / "run"
    argv = ["distill", "--teacher", "org/sd", "--data", str(data), "--eval-data", str(held), "--out", str(inside)]
    flag = "--eval-data" if held_out else "--data"
    refused(run_error, [*argv, "--dry-run"], f"--out {inside} is inside {flag} {held if held_out else data}, whose subfolders")
    refused(run_error, argv, f"--out {inside} is inside {flag}")
    assert not inside.exists()
    code, err = run_error([*argv[:-1], str(tmp_path / "run"), "--dry-run"])
    assert code in (0, None), err


DISTILL = ["distill", "--teacher", "org/sd", "--data", "world:shapes"]


def config_file(tmp_path, text: str, name: str = "c.json") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("key, hint", [("batchsize", "batchsize (did you mean batch_size?)"),
                                       ("batch-size", "batch-size (a flag's spelling: the field is batch_size)"),
                                       ("--batch-size", "--batch-size (a flag's spelling: the field is batch_size)"),
                                       ("learning_rate", "learning_rate (diffusers' name: the field is lr)")])
def test_a_misspelt_config_field_gets_a_suggestion(run_error, tmp_path, key, hint):
    # was: "unknown config field(s) batchsize; see `lcm distill --help`", with no word of the field meant
    config = config_file(tmp_path, json.dumps({key: 8}))
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"], f"unknown config field(s) {hint}")


def test_a_config_file_with_sections_is_said_to_be_one_flat_object(run_error, tmp_path):
    # was: "unknown config field(s) optim"
    config = config_file(tmp_path, json.dumps({"steps": 2, "optim": {"lr": 1e-4}}))
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"],
            "gives optim an object; a config file is one flat JSON object of fields")


def test_a_checkpoint_s_state_json_given_as_the_config_names_its_run_s_config_json(run_error, capsys, tmp_path):
    # was: "unknown config field(s) config, step" (or a type error of its "data" list)
    from command_helpers import dry_run

    run = tmp_path / "run"
    saved = dry_run(capsys, [*DISTILL, "--out", str(run)])
    state = config_file(run / "checkpoints" / "step-0000002", json.dumps({"step": 2, "config": saved, "data": [{}]}), "state.json")
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "other"), "--config", state, "--dry-run"],
            f"is a checkpoint's state.json, which holds its run's config as its \"config\" object: give {run.resolve() / 'config.json'}")


@pytest.mark.parametrize("text", ["steps: 2\nlr: 1.0e-4\n", "steps = 2\n"])
def test_a_yaml_or_toml_config_file_is_said_to_be_no_json(run_error, tmp_path, text):
    config = config_file(tmp_path, text, "c.yaml")
    refused(run_error, [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"],
            "is not valid JSON: Expecting value; config files are JSON")
    config = config_file(tmp_path, '{"steps": 2,}')  # JSON gone wrong is JSON's mistake, said as before
    code, err = run_error([*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"])
    assert code == 2 and "is not valid JSON" in err and "YAML" not in err, err


@pytest.mark.parametrize("field, value, message", [("lr", 0, "config field lr must be positive, got 0.0"),
                                                    ("steps", 0, "config field steps must be at least 1, got 0"),
                                                    ("ema_decay", 1, "config field ema_decay must be in [0, 1), got 1.0"),
                                                    ("skip", 0, "config field skip must be at least 1, got 0")])
def test_a_range_mistake_in_a_config_file_is_named_as_the_file_s_field(run_error, tmp_path, field, value, message):
    # was: "--lr must be positive, got 0.0", a flag the user never typed
    config = config_file(tmp_path, json.dumps({field: value}))
    argv = [*DISTILL, "--out", str(tmp_path / "run"), "--config", config, "--dry-run"]
    refused(run_error, argv, message)
    flag = "--" + field.replace("_", "-")
    refused(run_error, [*argv, flag, str(value)], f"{flag} must be")  # a flag beats the file: the value is the flag's


@pytest.mark.slow
def test_a_resume_of_a_copied_run_folder_says_where_the_run_was(tiny_sd, tmp_path, capsys):
    # was: no note for the run folder itself (the guide: a copied or moved run folder resumes "with a note")
    import shutil

    from command_helpers import run

    images = write_captioned_images(tmp_path / "images", 4)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--omega-response-samples", "0"]
    first, copy = tmp_path / "run", tmp_path / "copy"
    assert run([*argv, "--out", str(first), "--steps", "2"], capsys)[0] in (0, None)
    shutil.copytree(first, copy)
    code, _, err = run([*argv, "--out", str(copy), "--steps", "4", "--resume"], capsys)
    assert code in (0, None), err
    assert f"note: this run was in {first.resolve()}: it goes on in {copy} (moved or copied since)" in err
    assert json.loads((copy / "config.json").read_text())["out"] == str(copy.resolve())
    code, _, err = run([*argv, "--out", str(copy), "--steps", "6", "--resume"], capsys)  # in its own folder now: no note
    assert code in (0, None) and "this run was in" not in err, err


def test_a_dry_run_says_what_the_run_makes_of_its_sentinel_values(tiny_lcm, tmp_path, capsys):
    # was: "ema_decay": null, "skip": 0 and "resolution": 0 with no word of μ, k or the size the run uses
    from command_helpers import run

    argv = ["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", "world:shapes", "--out", str(tmp_path / "run"), "--dry-run"]
    code, out, err = run(argv, capsys)
    assert code in (0, None), err
    printed = json.loads(out)
    assert (printed["ema_decay"], printed["skip"], printed["resolution"]) == (None, 0, 0)  # recorded as given: fed back, the same run
    said = [line for line in err.splitlines() if "the run resolves" in line]
    assert said == [f"lcm finetune: the run resolves ema_decay μ = 0.95 (a full student's); skip k = 20 (the model's own: T / its "
                    f"original_inference_steps 50); resolution 16 (the native size of {tiny_lcm})"], err
    code, out, err = run([*argv, "--ema-decay", "0.9", "--skip", "100", "--resolution", "16"], capsys)
    assert code in (0, None) and "the run resolves" not in err, err
    code, out, err = run([*argv, "--adapter", "lora"], capsys)
    assert "ema_decay μ = 0 (a LoRA's: the target is the student)" in err, err


def test_the_sd_lora_preset_is_diffusers_published_lcm_lora_recipe_and_runs(run_error, capsys, tiny_sd, tmp_path):
    """`--preset sd-lora` (was missing: an SD 1.5 LCM-LoRA user had to spell out the recipe, or took `sdxl-lora`'s 1024 px):
    train_lcm_distill_lora_sd_wds.py's README settings at the model's native size, the paper's guidance range."""
    from command_helpers import dry_run

    argv = ["distill", "--preset", "sd-lora", "--teacher", str(tiny_sd), "--data", "world:shapes", "--out", str(tmp_path / "run")]
    config = dry_run(capsys, argv)
    assert {k: config[k] for k in ("adapter", "lora_rank", "lr", "weight_decay", "loss", "skip", "solver", "steps", "batch_size",
                                   "mixed_precision", "gradient_checkpointing", "resolution", "guidance_scale_min",
                                   "guidance_scale_max", "ema_decay")} == {
        "adapter": "lora", "lora_rank": 64, "lr": 1e-4, "weight_decay": 0.0, "loss": "huber", "skip": 20, "solver": "ddim",
        "steps": 1000, "batch_size": 12, "mixed_precision": "fp16", "gradient_checkpointing": True, "resolution": 0,
        "guidance_scale_min": 3.0, "guidance_scale_max": 15.0, "ema_decay": None}
    # on this CPU in float32, two steps: its LoRA is exported
    code, err = run_error([*argv, "--mixed-precision", "no", "--steps", "2", "--batch-size", "2", "--validate-every", "0",
                           "--data", str(write_captioned_images(tmp_path / "images", 4))])
    assert code in (0, None), err
    assert (tmp_path / "run" / "lora").is_dir()
