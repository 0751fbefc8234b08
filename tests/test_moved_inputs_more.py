"""What the first round of moved inputs (test_moved_inputs.py) left open: a `--method ode` run, whose bank of teacher
solutions recorded the teacher's and data's old places, and a moved --eval-data now resume exactly when the content is
provably the run's, and are refused when it changed; two `lcm evaluate sweep` of one run with different --out no longer
write the run's over-training scores over each other."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.folder_lock import lock_file
from test_file_inputs import assert_one_line
from test_moved_inputs import assert_same_weights, distill, files, stopped_at_step_2, stopped_copy
from tiny_models import write_captioned_images, write_run

ODE = ("--method", "ode", "--ode-targets", "6", "--guidance-scale-min", "1", "--guidance-scale-max", "4")


def bank(run: Path) -> dict:
    return torch.load(run / "ode_targets.pt", weights_only=True)


@pytest.fixture(scope="module")
def ode_started(tiny_sd, tmp_path_factory):
    """A finished 4-step `--method ode` run (checkpoints at steps 2 and 4, its bank) of its own copy of the tiny teacher on
    its own image folder: (that folder, the run folder)."""
    root = tmp_path_factory.mktemp("ode-started")
    shutil.copytree(tiny_sd, root / "teacher")
    write_captioned_images(root / "images", 8)
    assert main(distill(root / "teacher", root / "images", root / "run", *ODE)) == 0
    return root, root / "run"


def test_an_ode_run_moved_with_its_teacher_and_data_resumes_exactly(ode_started, tmp_path, run_error):
    """Was refused: "the ODE bank ... was not solved with this run's settings (teacher: old -> new)", though the teacher and
    data were the run's (sources.json, the checkpoint's data fingerprint). Now its bank is read, the resume is the
    uninterrupted run's bit for bit, and the bank, like config.json, names the new places: resumed again (from the step-2
    checkpoint, which names the old ones) it is read as the run's without a move."""
    root, reference = ode_started
    run = stopped_copy(reference, tmp_path / "run")
    try:
        shutil.move(root / "teacher", tmp_path / "teacher")
        shutil.move(root / "images", tmp_path / "images")
        code, err = run_error(distill(tmp_path / "teacher", tmp_path / "images", run, *ODE, "--resume"))
        assert code == 0, err
        assert [line for line in err.splitlines() if " moved from " in line][0].startswith(f"note: --teacher moved from {root / 'teacher'}")
        assert_same_weights(run, reference)
        theirs, ours = bank(reference), bank(run)
        assert all(torch.equal(ours[name], theirs[name]) for name in ("z", "t", "cond", "omega", "solution"))  # read, not solved again
        recorded = json.loads(ours["settings"])
        assert (recorded["teacher"], recorded["data"]) == (str(tmp_path / "teacher"), str(tmp_path / "images"))

        stopped_at_step_2(run)
        code, err = run_error(distill(tmp_path / "teacher", tmp_path / "images", run, *ODE, "--resume"))
        assert code == 0 and " moved from " not in err, err
        assert_same_weights(run, reference)
    finally:
        shutil.move(tmp_path / "teacher", root / "teacher")
        shutil.move(tmp_path / "images", root / "images")


def test_an_ode_run_whose_data_moved_and_changed_is_refused_and_its_bank_kept(ode_started, tmp_path, run_error):
    """The bank is read at the data's old place only as the same run's: data moved with one image replaced is refused by
    its fingerprint in one line, and neither the bank nor config.json is rewritten to name it."""
    root, reference = ode_started
    run = stopped_copy(reference, tmp_path / "run")
    shutil.copytree(root / "images", tmp_path / "images")
    shutil.copyfile(root / "images" / "1.png", tmp_path / "images" / "0.png")
    before = files(run)
    code, err = run_error(distill(root / "teacher", tmp_path / "images", run, *ODE, "--resume"))
    assert_one_line(code, err, f"the data {tmp_path / 'images'} changed since this run's checkpoint")
    assert files(run) == before


@pytest.fixture(scope="module")
def eval_started(tiny_sd, tmp_path_factory):
    """A finished 4-step run with --eval-data (its eval_loss at step 4): (its folder, the run folder)."""
    root = tmp_path_factory.mktemp("eval-started")
    write_captioned_images(root / "images", 8)
    write_captioned_images(root / "held-out", 4, caption="a blue circle number {i}")
    assert main(distill(tiny_sd, root / "images", root / "run", "--eval-data", str(root / "held-out"))) == 0
    return root, root / "run"


def eval_losses(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "eval_loss" in record]


def test_a_run_whose_eval_data_moved_resumes_exactly(tiny_sd, eval_started, tmp_path, run_error):
    """Was refused: "was started with a different config (eval_data: old -> new)", the held-out data being in no record.
    Each checkpoint now records its fingerprint: the moved folder is the run's, the resume is the uninterrupted run's, its
    eval_loss included, and config.json names the new place."""
    root, reference = eval_started
    run = stopped_copy(reference, tmp_path / "run")
    try:
        shutil.move(root / "held-out", tmp_path / "held-out")
        code, err = run_error(distill(tiny_sd, root / "images", run, "--eval-data", str(tmp_path / "held-out"), "--resume"))
        assert code == 0, err
        assert f"note: --eval-data moved from {root / 'held-out'} to {tmp_path / 'held-out'}" in err
        assert_same_weights(run, reference)
        assert eval_losses(run) == eval_losses(reference) != []
        assert json.loads((run / "config.json").read_text())["eval_data"] == str(tmp_path / "held-out")
    finally:
        shutil.move(tmp_path / "held-out", root / "held-out")


def test_eval_data_moved_and_changed_is_refused_and_nothing_is_lost(tiny_sd, eval_started, tmp_path, run_error):
    """A held-out folder moved with one image replaced is not the run's: refused in one line, config.json kept."""
    root, reference = eval_started
    run = stopped_copy(reference, tmp_path / "run")
    shutil.copytree(root / "held-out", tmp_path / "held-out")
    shutil.copyfile(root / "images" / "1.png", tmp_path / "held-out" / "0.png")
    before = files(run)
    code, err = run_error(distill(tiny_sd, root / "images", run, "--eval-data", str(tmp_path / "held-out"), "--resume"))
    assert_one_line(code, err, f"the held-out data {tmp_path / 'held-out'} (--eval-data) changed since this run's checkpoint")
    assert files(run) == before


def sweep(run: Path, out: Path) -> list[str]:
    return ["evaluate", "sweep", "--runs", str(run), "--out", str(out), "--samples", "2", "--device", "cpu"]


def test_a_second_sweep_of_a_run_being_swept_is_refused_in_one_line(tmp_path, run_error, monkeypatch):
    """Two sweeps of one run with different --out each held only its own --out, and both wrote the run's
    over_training.cache.json, .json, .md and .png over the other's. The second, started while the first scores the run,
    is refused at once, changing nothing; the first finishes."""
    from latent_consistency.world import artifact, over_training

    run = write_run(tmp_path / "run")
    second: list = []

    def scored(run_dir, *args, **kwargs):
        """The first sweep's scoring of the run, during which the second sweep starts."""
        if not second:
            before = files(run_dir)
            second.append(run_error(sweep(run_dir, tmp_path / "second")))
            assert files(run_dir) == before
        return [{"step": 2} | {f"{metric}_{n}": 1.0 for metric in ("fid", "alignment") for n in (1, 2, 4)}]

    monkeypatch.setattr(artifact, "load_world", lambda *args, **kwargs: None)
    monkeypatch.setattr(over_training, "evaluate_run", scored)
    code, err = run_error(sweep(run, tmp_path / "first"))
    assert code == 0, err
    assert_one_line(*second[0], f"the over-training record of {run} (over_training.*) is in use by another lcm command (process ")
    assert not (tmp_path / "second").exists()
    assert (run / "over_training.md").is_file() and (tmp_path / "first" / "sweep.json").is_file()
    assert not lock_file(run / "over_training").exists()


def test_a_sweep_of_a_student_init_run_whose_starting_model_is_gone(tmp_path, run_error):
    """Was refused, "cannot load the student's starting UNet from ...": the sweep made a --student-init run's student from
    that folder (`world-guided`'s: the `world-ode` run's export), which a run reads only at its start and which may have
    moved with its run folder or been cleared away since. It is now made as a resume makes it, in the architecture its
    checkpoints recorded, and takes their weights."""
    from dataclasses import replace

    from latent_consistency.training.checkpoint import save_checkpoint
    from latent_consistency.training.objectives import objective_of
    from latent_consistency.training.run_folder import STUDENT_UNET, saved_config
    from latent_consistency.training.students import make_student
    from latent_consistency.world.artifact import default_world_path, load_world

    run = write_run(tmp_path / "run", checkpoint=False, student_init=str(tmp_path / "moved-away"))
    config, world = saved_config(run / "config.json"), load_world(default_world_path())
    student = make_student(replace(config, student_init=""), world.model, objective_of(config).scheduler_config(config, world.model))
    save_checkpoint(run, 2, student.state_tensors(student.unet), {}, {"step": 2, STUDENT_UNET: dict(student.unet.config)}, 1)
    code, err = run_error(sweep(run, tmp_path / "sweep") + ["--steps", "1", "--no-ode-error"])
    assert code == 0, err
    assert [row["step"] for row in json.loads((run / "over_training.json").read_text())] == [2]
