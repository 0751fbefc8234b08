"""Fixes from the second kill -9 review ("chaos2"): what a kill leaves at the start of `lcm world build`, and what a rerun
of `lcm distill --student-init` and of `lcm evaluate sweep` says."""

import json
import shutil

import pytest

from latent_consistency.cli import main
from latent_consistency.world import build
from latent_consistency.world.artifact import WORLD_FILE
from tiny_models import make_tiny_components, write_captioned_images

# A few seconds a run: no validation, no ω response at the end
FAST = ["--batch-size", "2", "--lr-warmup-steps", "0", "--validate-every", "0", "--omega-response-samples", "0"]
RANGE_NOTE = "the student starts where that input extrapolates"


class _Started(Exception):
    """Raised by the first phase: the build got past its folder check and wrote its world.json."""


@pytest.mark.parametrize("rerun", ["world build", "build_world"])
def test_a_world_folder_holding_only_a_half_written_world_json_is_started(rerun, tmp_path, monkeypatch, capsys):
    # was: "--out OUT holds something other than a world (no world.json); give a new or empty folder" (exit 2), every rerun
    out = tmp_path / "w"
    out.mkdir()
    (out / (WORLD_FILE + ".tmp")).write_text('{"preset": {"name": "ti')  # a kill inside world.json's atomic write

    def first_phase(self, stage):
        raise _Started

    monkeypatch.setattr(build._Build, build.PHASES[0], first_phase)
    with pytest.raises(_Started):
        if rerun == "world build":
            main(["world", "build", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress"])
        else:
            build.build_world("tiny", out, device="cpu", progress=False)
    assert json.loads((out / WORLD_FILE).read_text())["preset"]["name"] == "tiny"
    assert not (out / (WORLD_FILE + ".tmp")).exists()


def test_a_world_folder_holding_more_than_a_half_written_world_json_is_still_refused(tmp_path, run_error):
    out = tmp_path / "w"
    out.mkdir()
    (out / (WORLD_FILE + ".tmp")).write_text("{")
    (out / "notes.txt").write_text("mine")
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--no-progress"])
    assert code == 2 and "holds something other than a world" in err


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A guidance-distilled model as `--method guidance` exports one, untrained, whose guidance record says its ω input learned
    g in [1, 2]: outside LCD's default [3, 15]."""
    from diffusers import StableDiffusionPipeline

    from latent_consistency.guidance_record import GuidanceRecord, write_record

    folder = tmp_path_factory.mktemp("models") / "stage-one"
    parts = make_tiny_components(folder.parent / ".stage-one-build", time_cond_proj_dim=16, seed=3)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    write_record(folder, GuidanceRecord(1.0, 2.0, 2.0))
    return folder


def student_init_run(tiny_sd, stage_one, tmp_path):
    init = shutil.copytree(stage_one, tmp_path / "init")
    images = write_captioned_images(tmp_path / "images", 4)
    return init, ["distill", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(tmp_path / "run"), "--student-init", str(init),
                  "--checkpoint-every", "1", *FAST]


def stopped_before_first_checkpoint(run):
    """What a kill before the first checkpoint leaves of a run (its config.json, metrics.jsonl and sources.json)."""
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "lcm")


def test_a_resumed_student_init_run_notes_its_starting_range_only_where_it_starts_from_it(stage_one, tiny_sd, tmp_path, run_error):
    # was: the range note on every resume, though the student starts from its checkpoint
    _, argv = student_init_run(tiny_sd, stage_one, tmp_path)
    code, err = run_error([*argv, "--steps", "1"])
    assert code == 0 and RANGE_NOTE in err, err
    code, err = run_error([*argv, "--steps", "2", "--resume"])
    assert code == 0 and RANGE_NOTE not in err, err  # resumed at step 1, from its checkpoint
    stopped_before_first_checkpoint(tmp_path / "run")
    code, err = run_error([*argv, "--steps", "2", "--resume"])  # from step 0: from --student-init again
    assert code == 0 and RANGE_NOTE in err, err


def test_a_student_init_gone_before_the_first_checkpoint_is_named_missing(stage_one, tiny_sd, tmp_path, run_error):
    # was: "cannot load the student's starting UNet from INIT: give a diffusers folder with unet/ and scheduler/"
    init, argv = student_init_run(tiny_sd, stage_one, tmp_path)
    assert run_error([*argv, "--steps", "1"])[0] == 0
    stopped_before_first_checkpoint(tmp_path / "run")
    shutil.rmtree(init)
    code, err = run_error([*argv, "--steps", "2", "--resume"])
    assert code == 2 and err.count("\n") == 0, err
    assert f"--student-init {init} does not exist" in err and "needs it until its first checkpoint" in err, err


def test_a_resumed_sweep_says_how_many_checkpoints_rows_it_reused(tmp_path, capsys):
    # was: no word of it; a rerun after a kill late in a sweep could not be told from a fresh sweep
    from latent_consistency.training.run_folder import saved_config
    from latent_consistency.world import over_training
    from latent_consistency.world.artifact import default_world_path
    from tiny_models import write_run

    run = write_run(tmp_path / "run")
    state = run / "checkpoints" / "step-0000002" / "state.json"
    settings = {"world": str(default_world_path().resolve()), "samples": 2,
                "guidance_scale": over_training.run_guidance_scale(saved_config(run / "config.json"))}
    row = {"step": 2, "fid_1": 3.0, "alignment_1": 0.5}  # scored before the kill: nothing to sample again
    (run / over_training.CACHE_FILE).write_text(json.dumps({"settings": settings,
                                                            "rows": {f"step-0000002@{state.stat().st_mtime_ns}": row}}))
    argv = ["evaluate", "sweep", "--runs", str(run), "--out", str(tmp_path / "sweep"), "--samples", "2", "--steps", "1", "--no-ode-error",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"reused 1 of 1 checkpoint row(s) from {run / over_training.CACHE_FILE}, scored 0" in out, out
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == {"run": [row]}
