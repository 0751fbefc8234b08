"""`lcm distill --method ode` stopped while it solves its bank of the teacher's exact ODE solutions (Ctrl-C, SIGTERM,
kill -9) and resumed: the chunks solved so far are kept in the run folder (`ode_targets.partial/`), the resume solves only
the missing ones, and the bank it writes is bitwise the uninterrupted run's.

Before, a stopped solve kept nothing: the bank is written once, whole, so its resume solved every row again (minutes on the
world, hours at Stable Diffusion scale); and a run stopped before its first step was cleared by a rerun without --resume.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.solvers import get_solver
from latent_consistency.testing.analytic import GaussianMixtureEps
from latent_consistency.training.config import DistillConfig, resolve_config
from latent_consistency.training.ode_targets import FILE, PARTIAL, ODETargets, SolvedChunks, build_ode_targets, ode_targets_for_run
from latent_consistency.training.run_folder import prepare_run_folder
from test_ode_targets import MEANS, SCHEDULE, STD, gaussian_batches, ode_args

FIELDS = ("z", "t", "cond", "omega", "solution")
ROWS, CHUNK = 24, 5  # five chunks: 5, 5, 5, 5 and 4 rows
SETTINGS = json.dumps({"solver": "ddim", "seed": 3})


def exact_solver() -> TeacherConsistencyFunction:
    """The guided Gaussian teacher's solver from t to 0: a teacher that takes milliseconds."""
    teacher = GuidedTeacher(GaussianMixtureEps(MEANS, STD, SCHEDULE), SCHEDULE, "epsilon")
    return TeacherConsistencyFunction(teacher, get_solver("ddim"), 20, torch.tensor([[0.0, 1.0]]))


def bank(solved=None, seed=3, share=(0, 1), gather=None) -> ODETargets:
    return build_ode_targets(exact_solver(), gaussian_batches(40), ROWS, (1.0, 4.0), torch.Generator().manual_seed(seed), CHUNK,
                             share, gather, solved=solved)


@pytest.fixture
def solves(monkeypatch):
    """The rows of each teacher call (each chunk's rows at its two ω: one call) in `rows`; `stop_at`: the call, counted from
    the first in `rows`, that is stopped as Ctrl-C stops it."""
    calls, original = SimpleNamespace(rows=[], stop_at=None), TeacherConsistencyFunction.__call__

    def counted(self, z, t, cond, omega):
        if len(calls.rows) + 1 == calls.stop_at:
            raise KeyboardInterrupt
        calls.rows.append(len(z) // 2)
        return original(self, z, t, cond, omega)

    monkeypatch.setattr(TeacherConsistencyFunction, "__call__", counted)
    return calls


def same_bank(a: ODETargets, b: ODETargets) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in FIELDS)


def stopped_after_two_chunks(solves, solved: SolvedChunks, **kwargs) -> None:
    solves.rows, solves.stop_at = [], 3
    with pytest.raises(KeyboardInterrupt) as stop:
        bank(solved, **kwargs)
    assert str(solved.folder) in str(stop.value)  # the stop's line says where the solved chunks are kept
    solves.stop_at, solves.rows = None, []


def test_a_bank_stopped_after_some_chunks_resumes_to_the_uninterrupted_bank(tmp_path, solves, capsys):
    whole = bank()
    assert solves.rows == [5, 5, 5, 5, 4]
    folder = tmp_path / PARTIAL
    stopped_after_two_chunks(solves, SolvedChunks(folder, SETTINGS))
    # each chunk a whole file of its own; was: nothing kept
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    capsys.readouterr()
    resumed = bank(SolvedChunks(folder, SETTINGS))
    assert solves.rows == [5, 5, 4]  # the missing chunks only
    assert f"ODE bank: 10 of {ROWS} rows already solved" in capsys.readouterr().out
    assert same_bank(resumed, whole)


def test_chunks_solved_by_each_process_are_read_by_a_resume_with_another_process_count(tmp_path, solves, capsys):
    """A chunk is numbered by its place in order of t, not by the process that solved it: process 1 of 2 solved chunks 1
    and 2 (`dealt`) before the stop, and the resume on one process solves chunks 0, 3 and 4."""
    whole, folder = bank(), tmp_path / PARTIAL
    solves.rows = []
    bank(SolvedChunks(folder, SETTINGS), share=(1, 2), gather=lambda share: torch.cat([share, share]))
    assert solves.rows == [5, 5] and sorted(p.name for p in folder.iterdir()) == ["chunk-00001.safetensors", "chunk-00002.safetensors"]
    solves.rows = []
    capsys.readouterr()
    assert same_bank(bank(SolvedChunks(folder, SETTINGS)), whole)
    assert solves.rows == [5, 5, 4] and f"10 of {ROWS} rows already solved" in capsys.readouterr().out


def test_chunks_solved_with_other_settings_are_solved_again_with_a_note(tmp_path, solves, capsys):
    """Chunks recorded with other bank settings are another bank's: solved again, never mixed in, with a note naming what
    changed. The same run's settings before its teacher or data moved (`before_moves`) are its own."""
    whole, folder = bank(), tmp_path / PARTIAL
    stopped_after_two_chunks(solves, SolvedChunks(folder, SETTINGS))
    capsys.readouterr()
    resumed = bank(SolvedChunks(folder, json.dumps({"solver": "dpm++", "seed": 3})))
    err = capsys.readouterr().err
    assert "note: 2 chunk(s) of the ODE bank" in err and "solver: 'ddim' -> 'dpm++'" in err, err
    assert solves.rows == [5, 5, 5, 5, 4] and same_bank(resumed, whole)
    folder = tmp_path / "moved"
    stopped_after_two_chunks(solves, SolvedChunks(folder, SETTINGS))
    moved = json.dumps({"solver": "ddim", "seed": 3, "teacher": "/its/new/place"})
    assert same_bank(bank(SolvedChunks(folder, moved, before_moves=SETTINGS)), whole)
    assert solves.rows == [5, 5, 4] and "note" not in capsys.readouterr().err


def test_chunks_of_other_rows_half_written_or_damaged_are_solved_again(tmp_path, solves, capsys):
    """A chunk is read back only for the very rows it was solved from (another seed draws other noise, t and ω); a kill
    mid-write leaves a `.tmp` that is never read; a damaged chunk file is solved again, not an error."""
    folder = tmp_path / PARTIAL
    stopped_after_two_chunks(solves, SolvedChunks(folder, SETTINGS), seed=4)
    (folder / "chunk-00002.safetensors.tmp").write_bytes((folder / "chunk-00001.safetensors").read_bytes()[:100])
    whole = bank()
    solves.rows = []
    capsys.readouterr()
    assert same_bank(bank(SolvedChunks(folder, SETTINGS)), whole)
    assert solves.rows == [5, 5, 5, 5, 4] and "2 chunk(s) of the ODE bank" in capsys.readouterr().err
    chunk = folder / "chunk-00003.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # cut short, as a disk may leave it
    solves.rows = []
    assert same_bank(bank(SolvedChunks(folder, SETTINGS)), whole) and solves.rows == [5]


def test_the_run_folder_keeps_the_chunks_until_its_bank_is_written(tmp_path, solves):
    """`ode_targets_for_run` on one process: a stopped solve leaves its chunks and no bank; the resume writes the bank and
    removes the chunks, and chunks left beside a whole bank (a kill between the two) go at the next read."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, wait_for_everyone=lambda: None)
    whole = bank()
    solves.stop_at, solves.rows = 4, []
    with pytest.raises(KeyboardInterrupt):
        ode_targets_for_run(tmp_path, accelerator, bank, SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PARTIAL] and len(list((tmp_path / PARTIAL).iterdir())) == 3
    solves.stop_at, solves.rows = None, []
    assert same_bank(ode_targets_for_run(tmp_path, accelerator, bank, SETTINGS), whole) and solves.rows == [5, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE] and same_bank(ODETargets.load(tmp_path / FILE), whole)
    (tmp_path / PARTIAL).mkdir()
    (tmp_path / PARTIAL / "chunk-00000.safetensors").write_bytes(b"left by a kill")
    ode_targets_for_run(tmp_path, accelerator, bank, SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE] and solves.rows == [5, 4]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 12)


# `lcm distill` killed (-9) half-way through writing the third chunk of its bank (six chunks of one row: --ode-targets 6)
KILLED = textwrap.dedent("""
    import os, signal, sys
    from latent_consistency.training import ode_targets

    _save, written = ode_targets.save_file, []

    def killed_in_the_third(tensors, path, metadata):
        written.append(path)
        _save(tensors, path, metadata)
        if len(written) == 3:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    ode_targets.save_file = killed_in_the_third
    from latent_consistency.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_lcm_distill_killed_while_solving_its_bank_resumes_it_bit_for_bit(tiny_sd, image_folder, tmp_path, solves, capsys):
    """A real kill -9 mid-write; a rerun without --resume is refused (the chunks are work, not a run that never started:
    was, the folder was cleared); the resume solves the four missing rows and writes the uninterrupted run's bank."""
    out, script = tmp_path / "run", tmp_path / "killed.py"
    script.write_text(KILLED)
    args = ode_args(tiny_sd, image_folder, out, "--steps", "1", "--omega-response-samples", "0")
    killed = subprocess.run([sys.executable, str(script), *args], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / FILE).exists() and sorted(p.name for p in (out / PARTIAL).iterdir()) == [
        "chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors.tmp"]
    assert main(args) == 2 and "is not empty; pass --resume" in capsys.readouterr().err
    assert len(list((out / PARTIAL).iterdir())) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process computed: on a CPU the thread count changes a network's rounding
    try:
        assert main([*args, "--resume"]) == 0
        assert solves.rows == [1, 1, 1, 1] and "ODE bank: 2 of 6 rows already solved" in capsys.readouterr().out
        solves.rows = []
        assert main(ode_args(tiny_sd, image_folder, tmp_path / "whole", "--steps", "1", "--omega-response-samples", "0")) == 0
        assert solves.rows == [1] * 6
    finally:
        torch.set_num_threads(threads)
    assert not (out / PARTIAL).exists()
    resumed, whole = ODETargets.load(out / FILE), ODETargets.load(tmp_path / "whole" / FILE)
    assert same_bank(resumed, whole)


def test_lcm_distill_stopped_while_solving_its_bank_says_what_is_kept(tiny_sd, image_folder, tmp_path, solves, capsys):
    solves.stop_at = 3
    out = tmp_path / "run"
    assert main(ode_args(tiny_sd, image_folder, out)) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted while solving the ODE bank" in err, err
    assert str(out / PARTIAL) in err and "run the same command with --resume" in err, err
    assert len(list((out / PARTIAL).iterdir())) == 2


def test_resuming_a_partly_solved_bank_with_other_settings_says_the_same_ones_go_on_solving_it(tiny_sd, image_folder, tmp_path):
    """The refusal of a resume with other settings says what the same settings would reuse; was: nothing."""
    def ode(**overrides):
        return resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path),
                                                                     method="ode", guidance_scale_min=1.0, **overrides))

    (tmp_path / "config.json").write_text(json.dumps(ode().to_dict()))
    (tmp_path / PARTIAL).mkdir()
    (tmp_path / PARTIAL / "chunk-00000.safetensors").write_bytes(b"a chunk of teacher passes")
    with pytest.raises(UserError, match="is not empty"):
        prepare_run_folder(ode(), resume=False)
    with pytest.raises(UserError, match=f"goes on solving its ODE bank from the chunks in {PARTIAL}"):
        prepare_run_folder(ode(lr=1e-3), resume=True)
    prepare_run_folder(ode(), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", PARTIAL]
