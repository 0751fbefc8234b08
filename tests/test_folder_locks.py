"""Two commands on one output folder at once (a second terminal, a scheduler requeueing a job that still runs, two notebook
cells): the second is refused in one line while the first holds the folder's lock (`folder_lock`), and a holder that was
killed holds nothing. The first command is stood for by the lock held in this process, or in a child that waits on a pipe:
no two processes race on timing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold, lock_file
from tiny_models import save_tiny_clip, write_captioned_images, write_run

# A child that holds a folder's lock until its standard input closes: the first command, which the test can kill -9
HOLDER = textwrap.dedent("""
    import sys
    from latent_consistency.folder_lock import hold

    with hold(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")

# A holder that forks a worker, as a training run's DataLoader does, and prints the worker's process id
HOLDER_WITH_WORKER = textwrap.dedent("""
    import multiprocessing, sys, time
    from latent_consistency.folder_lock import hold

    with hold(sys.argv[1]):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        worker.start()
        print(worker.pid, flush=True)
        sys.stdin.read()
""")


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commands(out: Path, models: dict[str, Path], data: Path) -> dict[str, list[str]]:
    """A command of each kind writing `out`: without the lock, each would go on and write it."""
    return {
        "generate --skip-existing": ["generate", "a red star", "--model", str(models["lcm"]), "--steps", "1", "--out", str(out),
                                     "--skip-existing"],
        "distill": ["distill", "--preset", "tiny", "--teacher", str(models["sd"]), "--data", str(data), "--out", str(out), "--steps", "1"],
        "finetune --resume": ["finetune", "--preset", "tiny", "--model", str(models["lcm"]), "--data", str(data), "--out", str(out),
                              "--steps", "1", "--resume"],
        "evaluate": ["evaluate", "--lcm", str(models["lcm"]), "--prompts", str(data), "--clip", str(models["clip"]), "--samples", "2",
                     "--steps", "1", "--out", str(out)],
        # refused before its runs are read (this one has no weights to score)
        "evaluate sweep": ["evaluate", "sweep", "--runs", str(write_run(out.parent / "sweep-run")), "--samples", "2", "--out", str(out)],
        "cache": ["cache", "--model", str(models["lcm"]), "--data", str(data), "--out", str(out)],
    }


def first_commands_work(command: str, out: Path, models: dict[str, Path], data: Path) -> None:
    """What the first command had written when the second started: a training run still loading its models (its config.json
    alone, which a second run took for one that stopped before its first step), `lcm cache`'s unfinished OUT.partial (out
    itself is made when it is whole), or a file of its own."""
    from latent_consistency.data.latent_cache import PARTIAL_MARK
    from latent_consistency.training.config import DistillConfig, FinetuneConfig, resolve_config

    if command in ("distill", "finetune --resume"):
        cls, model = (DistillConfig, "teacher") if command == "distill" else (FinetuneConfig, "model")
        config = resolve_config(cls, "tiny", overrides={model: str(models["sd" if command == "distill" else "lcm"]), "data": str(data),
                                                         "out": str(out), "steps": 1})
        out.mkdir()
        (out / "config.json").write_text(json.dumps(config.to_dict()))
    elif command == "cache":
        partial = out.with_name(out.name + ".partial")
        partial.mkdir()
        (partial / PARTIAL_MARK).touch()
        (partial / "shard-00000.safetensors").write_text("the first command's")
    else:
        out.mkdir()
        (out / "mine.txt").write_text("the first command's")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 4)


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_lcm, tmp_path_factory):
    return {"sd": tiny_sd, "lcm": tiny_lcm, "clip": save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")}


@pytest.mark.parametrize("command", ["generate --skip-existing", "distill", "finetune --resume", "evaluate", "evaluate sweep", "cache"])
def test_a_second_command_on_a_held_folder_is_refused_and_changes_nothing(command, models, data, tmp_path, run_error):
    """Was: each went on beside the first: `distill` cleared the first run's folder as one that stopped before its first
    step, `--resume` wrote checkpoints and metrics between the first's, two generates or evaluations wrote the same images
    and results over each other, and a second `lcm cache` removed the first's OUT.partial as an unfinished cache and wrote
    its own there."""
    out = tmp_path / "out"
    first_commands_work(command, out, models, data)
    argv = commands(out, models, data)[command]
    with hold(out):
        before = contents(tmp_path)
        code, err = run_error(argv)
        assert contents(tmp_path) == before  # the lock file too: the refused command does not remove the holder's
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--out {out} is in use by another lcm command (process {os.getpid()} on " in err, err
    assert not lock_file(out).exists()


def test_a_killed_holder_holds_nothing(tiny_lcm, tmp_path, run_error):
    """A command killed with kill -9 (or crashed) leaves its lock file but no lock: the next one on the folder runs. While
    it lived, the refusal named its process."""
    out = tmp_path / "images"
    argv = ["generate", "a red star", "--model", str(tiny_lcm), "--steps", "1", "--out", str(out)]
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "held\n"
            code, err = run_error(argv)
            assert code == 2 and f"(process {holder.pid} on " in err, err
        finally:
            holder.kill()
    assert lock_file(out).exists()  # left behind by the kill
    code, err = run_error(argv)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["0000-a-red-star.png"] and not lock_file(out).exists()


def test_the_forked_workers_of_a_killed_holder_hold_nothing(tmp_path):
    """A run with --num-workers killed with kill -9: its DataLoader workers live on for seconds (they notice only then that
    their parent is gone) and held the lock through the descriptor they were forked with, so that --resume right after
    the kill was refused as "in use"; a forked child now closes it."""
    out = tmp_path / "run"
    with subprocess.Popen([sys.executable, "-c", HOLDER_WITH_WORKER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        worker = int(holder.stdout.readline())
        holder.kill()
    try:
        with hold(out):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_every_spelling_of_a_folder_is_one_lock(tmp_path, monkeypatch):
    """Relative, absolute, with a trailing slash or through a symbolic link: the same folder, the same lock."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    with hold(tmp_path / "runs" / "a"):
        for spelling in ("runs/a", "runs/a/", "./runs/../runs/a", "link/a"):
            with pytest.raises(UserError, match="is in use"), hold(spelling):
                pass


def test_only_the_first_process_of_a_launched_training_run_takes_the_lock(tmp_path, monkeypatch):
    """The processes of `accelerate launch` (or torchrun) all run `lcm distill --out RUN`: the first holds RUN for them all,
    the others are not refused by it."""
    out = tmp_path / "run"
    with hold(out):
        monkeypatch.setenv("RANK", "1")
        with hold(out):
            assert lock_file(out).exists()
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match="is in use"), hold(out):
            pass


def test_where_no_lock_can_be_made_the_command_runs_unguarded_and_leaves_nothing(tmp_path):
    """An --out whose parent folder is missing (made later by the command, if its checks pass) gets no lock file, and no
    folder made for one."""
    out = tmp_path / "missing" / "run"
    with hold(out), hold(out):
        pass
    assert list(tmp_path.iterdir()) == []
    with hold("/"):  # the root has no folder beside it for a lock file
        pass
