"""A run resumed after the user moved what it reads (`mv runs/a /data/runs/a`, `cp -r`, a model folder renamed): the
teacher, the data and the run folder at new places with the same content resume it exactly, and its config.json names the
new places from then on; a model or data moved and changed is refused as before, with nothing written lost."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_consistency.cli import main
from tiny_models import write_captioned_images


def distill(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--keep-checkpoints", "10", *extra]


@pytest.fixture(scope="module")
def started(tiny_sd, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) of its own copy of the tiny teacher on its own image folder, all
    in one folder: (that folder, the run folder)."""
    root = tmp_path_factory.mktemp("started")
    shutil.copytree(tiny_sd, root / "teacher")
    write_captioned_images(root / "images", 8)
    assert main(distill(root / "teacher", root / "images", root / "run")) == 0
    return root, root / "run"


def stopped_copy(run: Path, to: Path) -> Path:
    """`cp -r` of `run` to `to`, as a kill after its step-2 checkpoint leaves it (no step-4 checkpoint, no export)."""
    shutil.copytree(run, to)
    stopped_at_step_2(to)
    return to


def stopped_at_step_2(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    shutil.rmtree(run / "lcm")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "step-0000004"
    return {f"{name}.{k}": v for name in ("student", "target") for k, v in load_file(str(last / f"{name}.safetensors")).items()}


def assert_same_weights(run: Path, reference: Path) -> None:
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_resume(run_error, run: Path, teacher: Path, images: Path) -> str:
    """The one-line error (exit 2) of `--resume` of `run` with `teacher` and `images`, which leaves every file of the run as
    it was."""
    before = files(run)
    code, err = run_error(distill(teacher, images, run, "--resume"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert files(run) == before
    return err


def test_a_run_moved_to_another_disk_with_its_teacher_and_data_resumes_exactly(started, tmp_path, run_error):
    """The run folder copied elsewhere, its teacher and image folder moved there: the resume is the uninterrupted run's,
    bit for bit, says once what moved, and leaves config.json naming the new places; killed again before its next
    checkpoint, the resume from the step-2 checkpoint (which names the old places) is accepted by the same rule."""
    root, reference = started
    run = stopped_copy(reference, tmp_path / "run")
    try:
        shutil.move(root / "teacher", tmp_path / "teacher")
        shutil.move(root / "images", tmp_path / "images")
        code, err = run_error(distill(tmp_path / "teacher", tmp_path / "images", run, "--resume"))
        assert code == 0, err
        notes = [line for line in err.splitlines() if " moved from " in line]
        assert notes == [f"note: --teacher moved from {root / 'teacher'} to {tmp_path / 'teacher'}; --data moved from {root / 'images'} "
                         f"to {tmp_path / 'images'}: the same content as this run's (sources.json, the checkpoint's data fingerprint); "
                         "its config.json now names the new place"]
        assert_same_weights(run, reference)
        saved = json.loads((run / "config.json").read_text())
        assert (saved["teacher"], saved["data"], saved["out"]) == (str(tmp_path / "teacher"), str(tmp_path / "images"), str(run))

        stopped_at_step_2(run)  # the step-2 checkpoint names the old places, config.json the new ones
        code, err = run_error(distill(tmp_path / "teacher", tmp_path / "images", run, "--resume"))
        assert code == 0, err
        assert " moved from " not in err
        assert_same_weights(run, reference)
    finally:
        shutil.move(tmp_path / "teacher", root / "teacher")
        shutil.move(tmp_path / "images", root / "images")


def test_a_teacher_moved_and_changed_is_refused_and_nothing_is_lost(started, tmp_path, run_error):
    """A copy of the teacher with one weight trained on since is another model: refused in one line, as before a move."""
    root, reference = started
    run = stopped_copy(reference, tmp_path / "run")
    shutil.copytree(root / "teacher", tmp_path / "teacher")
    weights = tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(weights))
    err = refused_resume(run_error, run, tmp_path / "teacher", root / "images")
    assert f"was started with a different config (teacher: '{root / 'teacher'}' -> '{tmp_path / 'teacher'}')" in err


def test_data_moved_and_changed_is_refused_and_config_json_is_kept(started, tmp_path, run_error):
    """An image folder moved with one image replaced: its fingerprint is not the checkpoint's, so the resume is refused in
    one line, and config.json still names the data the run trained on (it is rewritten only once the move is proven)."""
    root, reference = started
    run = stopped_copy(reference, tmp_path / "run")
    shutil.copytree(root / "images", tmp_path / "images")
    shutil.copyfile(root / "images" / "1.png", tmp_path / "images" / "0.png")
    err = refused_resume(run_error, run, root / "teacher", tmp_path / "images")
    assert f"the data {tmp_path / 'images'} changed since this run's checkpoint" in err


def test_a_checkpoint_of_a_run_on_another_teacher_elsewhere_is_still_refused(started, tmp_path, run_error):
    """A checkpoint whose config names another teacher folder is this run's only where the model it recorded is the run's
    (sources.json): one of a run on another model is refused as another run's, and kept."""
    root, reference = started
    run = stopped_copy(reference, tmp_path / "run")
    state_file = run / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["teacher"] = str(tmp_path / "another-teacher")
    state["sources"] = {"teacher": "0123456789abcdef"}
    state_file.write_text(json.dumps(state))
    err = refused_resume(run_error, run, root / "teacher", root / "images")
    assert "is damaged or another run's (it was written by another run (teacher:" in err
