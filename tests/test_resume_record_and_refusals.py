"""What a resumed run records in its config.json: what its start recorded, but for the fields a resume may change and the
sources proven moved; and the refusals of a two-process run (`accelerate launch`, gloo on CPUs) before its first step,
which every process raises alike: said once."""

import json
import shutil

import pytest

from latent_consistency.cli import main
from latent_consistency.training.config import RESUMABLE_CHANGES
from test_multiprocess_refusals import distill, error_lines, launch_lcm


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def recorded(run) -> dict:
    return json.loads((run / "config.json").read_text())


@pytest.mark.slow
def test_a_resume_keeps_what_the_start_recorded_but_for_what_it_may_change(tiny_sd, tiny_lcm, images, tmp_path, monkeypatch):
    """--student-init ode/lcm, a relative folder of the hub's org/name form, is recorded as its absolute path when the run
    starts. Was: a resume after it was cleared away rewrote config.json with the spec as typed, "ode/lcm" (a hub id to every
    later reader), and its ω embedding size as None (unreadable since). The resume's own --steps, --out, logging and
    checkpoint settings, and a teacher proven moved, are recorded as it gives them."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_lcm, tmp_path / "ode" / "lcm")
    teacher, run = shutil.copytree(tiny_sd, tmp_path / "teacher"), tmp_path / "run"
    started = ["distill", "--preset", "tiny", "--student-init", "ode/lcm", "--data", str(images), "--batch-size", "4"]
    assert main([*started, "--teacher", str(teacher), "--out", str(run), "--steps", "1", "--checkpoint-every", "1"]) == 0
    start = recorded(run)
    assert start["student_init"] == str((tmp_path / "ode" / "lcm").resolve()) and start["time_cond_proj_dim"] == 32

    shutil.rmtree(tmp_path / "ode")
    moved_teacher, moved_run = teacher.rename(tmp_path / "teacher-moved"), run.rename(tmp_path / "run-moved")
    changes = {"steps": 2, "log_every": 2, "validate_every": 3, "checkpoint_every": 2, "keep_checkpoints": 3, "omega_response_samples": 8}
    flags = [word for name, value in changes.items() for word in ("--" + name.replace("_", "-"), str(value))]
    assert main([*started, "--teacher", str(moved_teacher), "--out", str(moved_run), *flags, "--resume"]) == 0
    assert set(changes) < set(RESUMABLE_CHANGES)
    expected = start | changes | {"out": str(moved_run), "teacher": str(moved_teacher.resolve())}
    assert recorded(moved_run) == expected
    state = json.loads((moved_run / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["config"] == expected  # the record a damaged config.json is restored from

    # A further resume of the run's own config, from another working directory, still names the folder it started from
    monkeypatch.chdir(moved_run)
    assert main(["distill", "--config", "config.json", "--out", str(moved_run), "--steps", "3", "--resume"]) == 0
    assert recorded(moved_run) == expected | {"steps": 3}


def refusal(case: str, tiny_sd, tiny_lcm, tmp_path) -> tuple[list[str], str]:
    """The flags of a run refused before its first step at `case`, and words of its one line."""
    if case == "batch split":  # passes `TrainConfig.check`; 3 samples do not split over 2 processes
        return ["--batch-size", "3"], "--batch-size 3 must be a multiple of processes x --grad-accumulation = 2"
    if case == "config check":  # `check_here`, before the run's Accelerator
        return ["--batch-size", "3", "--grad-accumulation", "2"], "--batch-size 3 must be a multiple of --grad-accumulation 2"
    if case == "student":  # `make_student`, once the models are loaded
        return ["--student-init", str(tiny_sd)], "has no ω input"
    if case == "optimizer":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return ["--optimizer", "adamw-8bit"], "--optimizer adamw-8bit needs bitsandbytes"
        pytest.skip("bitsandbytes is installed: --optimizer adamw-8bit is not refused")
    # A damaged guidance record of --student-init, read by the run's notes on the first process alone
    lcm = shutil.copytree(tiny_lcm, tmp_path / "damaged-lcm")
    (lcm / "guidance.json").write_text("{")
    return ["--student-init", str(lcm)], "guidance.json is damaged"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch split", "config check", "student", "optimizer", "damaged record"])
def test_a_refusal_before_the_first_step_is_said_once_and_ends_every_process(case, tiny_sd, tiny_lcm, images, tmp_path):
    """Was: the line once per process, or (a process that ended first) once, with the other stopped by the launcher (exit
    code 143, "terminated"), maybe before it had said why: the damaged record is read on the first process alone, while the
    other went on to its next collective."""
    flags, words = refusal(case, tiny_sd, tiny_lcm, tmp_path)
    done = launch_lcm(distill(tiny_sd, images, tmp_path / "run", "--steps", "1", *flags), timeout=60)
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and words in errors[0], done.stderr[-3000:]
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr[-3000:]
