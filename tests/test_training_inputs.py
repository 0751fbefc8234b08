"""Inputs a training run (and `lcm demo`, `lcm world export`) must refuse up front, in one line with exit code 2, before
any training or file: rather than after the training, with a traceback, or by silently ignoring a recorded flag."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from latent_consistency.cli import main
from latent_consistency.training.config import MAX_SEED

LIMIT = "fewer than the 4 steps the validation grid samples in: use a skip of at most 250"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


@pytest.fixture
def distill(tiny_sd, image_folder, tmp_path):
    """`lcm distill --preset tiny` of the tiny teacher into tmp_path/run, with extra flags."""
    return lambda *extra: ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder),
                           "--out", str(tmp_path / "run"), *extra]


@pytest.fixture
def finetune(tiny_lcm, image_folder, tmp_path):
    """`lcm finetune --preset tiny` of the tiny LCM into tmp_path/run, with extra flags."""
    return lambda *extra: ["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(image_folder),
                           "--out", str(tmp_path / "run"), *extra]


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


@pytest.mark.parametrize("skip", ["500", "1000"])
def test_a_skip_too_large_for_the_validation_grid_is_refused_before_training(distill, finetune, run_error, tmp_path, skip):
    for command in (distill, finetune):
        refused(run_error, command("--skip", skip), LIMIT)
        assert not (tmp_path / "run").exists()


def test_the_largest_skip_the_validation_grid_allows_runs(distill, run_error, tmp_path):
    assert run_error(distill("--skip", "250", "--steps", "1"))[0] == 0
    assert (tmp_path / "run" / "lcm" / "model_index.json").is_file()


def test_fp16_without_a_gpu_is_refused_before_loading(distill, run_error, tmp_path, monkeypatch):
    monkeypatch.setattr("latent_consistency.training.loop.has_gpu", lambda: False)
    monkeypatch.setattr("latent_consistency.training.objectives.Distillation.load", lambda *a: pytest.fail("loaded the teacher"))
    refused(run_error, distill("--mixed-precision", "fp16"), "fp16 needs a GPU and this machine has none: use --mixed-precision bf16")
    assert not (tmp_path / "run").exists()


def test_dry_run_of_an_fp16_config_on_a_cpu_prints_it_with_a_note(distill, tmp_path, monkeypatch, capsys):
    """--dry-run shows the config a GPU machine would run (the `sd` preset is fp16), and says this machine cannot run it."""
    monkeypatch.setattr("latent_consistency.training.loop.has_gpu", lambda: False)
    assert main(distill("--mixed-precision", "fp16", "--dry-run")) in (0, None)
    out, err = capsys.readouterr()
    assert json.loads(out)["mixed_precision"] == "fp16"
    notes = [line for line in err.splitlines() if "the run resolves" not in line]  # what it makes of ema_decay null and resolution 0
    assert notes == ["note: not on this machine: --mixed-precision fp16 needs a GPU and this machine has none: use --mixed-precision bf16 or no"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [2**64, 2**64 - 1, MAX_SEED + 1])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_seed_out_of_range_is_refused(distill, run_error, tmp_path, seed, dry_run):
    refused(run_error, distill("--seed", str(seed), *dry_run), f"seed must be at most 2**63 - 1 = {MAX_SEED}")
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_runs_to_its_export(distill, run_error, tmp_path):
    """Validation seeds its noise with seed + 1: the bound leaves room for that."""
    assert run_error(distill("--seed", str(MAX_SEED), "--steps", "1"))[0] == 0
    assert (tmp_path / "run" / "lcm" / "model_index.json").is_file()


@pytest.mark.parametrize("command", ["distill", "finetune"])
def test_dry_run_refuses_a_batch_that_accumulation_does_not_divide(distill, finetune, run_error, command):
    argv = (distill if command == "distill" else finetune)("--batch-size", "5", "--grad-accumulation", "2", "--dry-run")
    refused(run_error, argv, "--batch-size 5 must be a multiple of --grad-accumulation 2")


def test_lora_rank_of_a_loaded_lcm_lora_is_refused(finetune, run_error):
    refused(run_error, finetune("--lora", "some-lora", "--adapter", "lora", "--lora-rank", "16", "--dry-run"),
            "the LCM-LoRA of --lora keeps its own rank")


def test_lora_rank_of_a_full_student_is_refused(distill, run_error):
    refused(run_error, distill("--lora-rank", "16", "--dry-run"), "--lora-rank 16 sets the rank of new LoRA adapters: it applies to --adapter lora")


def test_an_omega_size_that_the_student_init_does_not_have_is_refused(distill, tiny_lcm, run_error, tmp_path):
    """The tiny LCM's ω embedding has size 32: --time-cond-proj-dim 64 would be recorded but not used."""
    refused(run_error, distill("--student-init", str(tiny_lcm), "--time-cond-proj-dim", "64"),
            "whose ω embedding has size 32: --time-cond-proj-dim 64 cannot change it; leave it out")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("same", ["as given", "another spelling"])
def test_eval_data_that_is_the_training_data_is_refused(distill, image_folder, run_error, same):
    eval_data = str(image_folder) if same == "as given" else str(image_folder / ".." / image_folder.name) + "/"
    refused(run_error, distill("--eval-data", eval_data, "--dry-run"), "is the training data (--data): its loss would not be held out")


def test_eval_data_inside_the_training_folder_is_refused(tiny_sd, tmp_path, run_error):
    """An image folder reads its subfolders: a held-out set kept in data/val was trained on too."""
    from tiny_models import write_captioned_images

    data = write_captioned_images(tmp_path / "data", 4)
    held = write_captioned_images(data / "val", 2)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "run"), "--dry-run"]
    refused(run_error, argv + ["--eval-data", str(held)], f"--eval-data {held} is inside --data {data}")
    beside = write_captioned_images(tmp_path / "val", 2)
    assert run_error(argv + ["--eval-data", str(beside)])[0] == 0


@pytest.fixture
def no_demo(monkeypatch):
    """The demo's work (past its up-front checks) stops the test at once."""
    def stop(*args, **kwargs):
        raise AssertionError("the demo started its work")

    monkeypatch.setattr("latent_consistency.world.demo.resolve_device", stop)


def test_demo_refuses_an_empty_out(run_error, tmp_path, monkeypatch, no_demo):
    monkeypatch.chdir(tmp_path)
    refused(run_error, ["demo", "--out", "", "--device", "cpu"], "--out is empty")
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_an_unknown_world_preset_before_making_anything(run_error, tmp_path, no_demo):
    refused(run_error, ["demo", "--world-preset", "nonexist", "--out", str(tmp_path / "d1")], "unknown world preset 'nonexist'")
    assert not (tmp_path / "d1").exists()


def finished_run(run, steps):
    """A run folder as a finished demo run leaves it: its config.json and an exported LCM."""
    (run / "lcm").mkdir(parents=True)
    (run / "lcm" / "model_index.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"objective": "lcd", "steps": steps, "teacher": "t", "data": "d", "out": str(run)}))


@pytest.mark.parametrize("flag, part", [("--distill-steps", "distill"), ("--finetune-steps", "finetune")])
def test_demo_refuses_steps_that_a_reused_run_was_not_made_with(run_error, tmp_path, no_demo, flag, part):
    finished_run(tmp_path / "d" / part, 3)
    refused(run_error, ["demo", "--out", str(tmp_path / "d"), flag, "5"],
            f"holds a finished run of 3 steps, which this demo reuses: {flag} 5 would not apply; give {flag} 3")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [part]


def test_the_demo_reports_the_steps_a_reused_run_was_made_with(tmp_path):
    from latent_consistency.world.demo import finished_run_config

    assert finished_run_config(tmp_path / "distill") is None
    finished_run(tmp_path / "distill", 3)
    assert finished_run_config(tmp_path / "distill").steps == 3


def test_exporting_the_shipped_world_says_it_is_exported_already(run_error, tmp_path):
    from latent_consistency.world.artifact import default_world_path

    refused(run_error, ["world", "export", "--from", str(default_world_path()), "--out", str(tmp_path / "w")],
            "is an exported world already (float16 weights), ready to use as it is")
    assert not (tmp_path / "w").exists()


def test_data_smaller_than_the_batch_trains_with_a_note(tiny_sd, tmp_path, run_error):
    """One image at batch 4 trains (overfitting one image is a use), but says that each batch repeats it."""
    from tiny_models import write_captioned_images

    one = write_captioned_images(tmp_path / "one", 1)
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(one), "--out", str(tmp_path / "run"),
                           "--steps", "1"])
    assert code == 0 and (tmp_path / "run" / "lcm" / "model_index.json").is_file()
    notes = [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line]
    assert notes == ["lcm distill: note: the data holds 1 sample, fewer than the batch of 4: every batch repeats each sample about 4 "
                     "times, with its own noise and timestep each time"], err


def test_data_as_large_as_the_batch_trains_without_a_note(distill, run_error):
    code, err = run_error(distill("--steps", "1", "--batch-size", "8"))
    assert code == 0 and not [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line], err


def test_a_batch_beyond_any_accelerator_is_refused(distill, finetune, run_error):
    """`--batch-size 10^14` hung (and left a config.json behind)."""
    for command in (distill, finetune):
        refused(run_error, command("--batch-size", str(10**14)), "more than any accelerator holds")


def test_a_lora_rank_above_every_adapted_layers_width_is_refused_before_training(distill, run_error, tmp_path):
    """`--lora-rank 10^11` ended in an out-of-memory traceback; a rank above every layer's width adds nothing."""
    refused(run_error, distill("--adapter", "lora", "--lora-rank", str(10**11)), "is above the width of every layer a LoRA adapts")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_largest_useful_lora_rank_trains(distill, run_error, tmp_path):
    import re

    code, err = run_error(distill("--adapter", "lora", "--lora-rank", str(10**6)))
    width = int(re.search(r"at most (\d+)", err).group(1))
    assert run_error(distill("--adapter", "lora", "--lora-rank", str(width), "--steps", "2"))[0] == 0


def test_a_warmup_longer_than_the_run_trains_with_a_note(distill, run_error):
    """The learning rate never reached --lr, silently."""
    code, err = run_error(distill("--steps", "2", "--lr-warmup-steps", "8"))
    notes = [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line]
    assert code == 0 and notes == ["lcm distill: note: --lr-warmup-steps 8 is more than --steps 2: the learning rate rises to 0.25 × --lr "
                                   "and never reaches it"], err


def test_pair_steps_as_long_as_the_run_train_with_a_note(distill, run_error, tmp_path):
    """--guidance-pair-steps asks for a plain tail after the λ_Δ term: one of --steps or more left none, silently."""
    pair = ("--guidance-scale-min", "1", "--guidance-scale-max", "4", "--guidance-pair-weight", "1", "--steps", "2")
    code, err = run_error(distill(*pair, "--guidance-pair-steps", "2"))
    notes = [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line]
    assert code == 0 and notes == ["lcm distill: note: --guidance-pair-steps 2 is not less than --steps 2: the λ_Δ term applies to every "
                                   "step, and the plain loss after it never comes"], err
    code, err = run_error(distill(*pair, "--guidance-pair-steps", "1", "--out", str(tmp_path / "tail")))
    assert code == 0 and not [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line]


def test_a_run_resumed_with_its_teacher_and_data_spelled_another_way_is_the_same_run(tiny_sd, image_folder, tmp_path, run_error):
    """`w` and `./w/` name one folder (and world:shapes one dataset): a resume (the demo's rerun too) that spells them
    otherwise is not refused as a different config; another model in another folder still is (a copy of the same model
    is the same teacher moved: tests/test_moved_inputs.py)."""
    out = tmp_path / "run"
    args = ["distill", "--preset", "tiny", "--out", str(out), "--steps", "2"]
    assert run_error(args + ["--teacher", str(tiny_sd), "--data", str(image_folder)])[0] == 0
    again = ["--teacher", str(tiny_sd.parent / ".." / tiny_sd.parent.name / tiny_sd.name) + "/", "--data", str(image_folder) + "/"]
    assert run_error([*args[:-1], "4", *again, "--resume"])[0] == 0
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_sd, other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v + 1e-3 if i == 0 else v for i, (k, v) in enumerate(sorted(tensors.items()))}
    save_file(tensors, str(weights))
    refused(run_error, [*args[:-1], "6", "--teacher", str(other), "--data", str(image_folder), "--resume"], "different config (teacher:")


def test_a_resumed_run_whose_new_steps_reshape_its_decaying_schedule_gets_a_note(distill, run_error):
    """Cosine decay runs over --steps: a run of 2 steps resumed with --steps 4 jumps from the end of its schedule (0 × --lr)
    back to its middle (0.5 ×) at step 2; a constant schedule does not change, and gets no note."""
    code, err = run_error(distill("--steps", "2", "--lr-schedule", "cosine"))
    assert code == 0 and not [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line], err
    code, err = run_error(distill("--steps", "4", "--lr-schedule", "cosine", "--resume"))
    notes = [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line]
    assert code == 0 and notes == ["lcm distill: note: --steps 4 stretches the cosine learning-rate schedule this run followed over 2 "
                                   "steps: at step 2 the rate jumps from 0 to 0.5 × --lr"], err


def test_a_constant_schedule_resumed_with_more_steps_gets_no_note(distill, run_error):
    assert run_error(distill("--steps", "2"))[0] == 0
    code, err = run_error(distill("--steps", "4", "--resume"))
    assert code == 0 and not [line for line in err.splitlines() if "note:" in line and "lcm cache" not in line], err


def test_a_world_preset_trains_a_lora_without_its_full_student_settings(tmp_path, capsys, run_error):
    """`--preset world --adapter lora` (the README's LCM-LoRA line with the world's preset): the preset's v-prediction
    student, ω projection rate and ω embedding are a full student's and are left out, not refused as if the user had
    asked for them; asked for on the command line they still are."""
    argv = ["distill", "--preset", "world", "--adapter", "lora", "--teacher", "org/t", "--data", "world:shapes", "--out", str(tmp_path / "run")]
    assert main([*argv, "--dry-run"]) in (0, None)
    config = json.loads(capsys.readouterr().out)
    assert (config["adapter"], config["student_prediction"], config["omega_lr_scale"], config["lr"]) == ("lora", "teacher", 1.0, 5e-5)
    refused(run_error, [*argv, "--student-prediction", "v_prediction", "--dry-run"], "--student-prediction applies to full students")
