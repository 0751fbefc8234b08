"""`lcm distill --method ode` on more than one process: every process solves its share of the bank of the teacher's exact
ODE solutions, and the bank is bitwise the one a single process builds.

Before, the main process built the whole bank while the others waited at a barrier: at Stable Diffusion scale (2,048
rows, hours of one GPU) longer than the collective timeout, so the waiting processes failed; and the rows drawn depended on
the run's per-process micro-batch, so a two-process run solved another bank than a one-process run of the same settings.
"""

import textwrap

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.solvers import get_solver
from latent_consistency.testing.analytic import GaussianMixtureEps
from latent_consistency.training.ode_targets import FILE, ODETargets, build_ode_targets, chunk_rows, dealt
from test_ode_targets import MEANS, SCHEDULE, STD, gaussian_batches
from two_processes import DATA_PARALLEL, launch

ROWS = ("z", "t", "cond", "omega")


def test_the_banks_rows_do_not_depend_on_the_micro_batches_the_data_came_in():
    """The data read 40 or 7 latents at a time (the micro-batch of a run on one process or on more): the same rows, the
    same draws, the same solutions."""
    net = GaussianMixtureEps(MEANS, STD, SCHEDULE)
    exact = TeacherConsistencyFunction(GuidedTeacher(net, SCHEDULE, "epsilon"), get_solver("ddim"), 20, torch.tensor([[0.0, 1.0]]))
    data = next(gaussian_batches(40))

    def batches(b):
        while True:
            yield from ({"latents": x0, "cond": cond} for x0, cond in zip(data["latents"].split(b), data["cond"].split(b)))

    banks = [build_ode_targets(exact, batches(b), 24, (1.0, 4.0), torch.Generator().manual_seed(3), chunk=5) for b in (40, 7)]
    # was: t, ω and ε were drawn per micro-batch, so another micro-batch (another process count) drew other ones
    assert all(torch.equal(getattr(banks[0], k), getattr(banks[1], k)) for k in (*ROWS, "solution"))


def test_chunks_depend_on_the_bank_the_latent_and_the_device_type_only_and_are_dealt_back_and_forth():
    """Not on the process count nor the run's batch: a network's arithmetic depends on the batch it runs in. In order of t,
    a chunk costs more passes than the one before: dealt in turn (0, 1, 0, 1), the last process would get the larger one
    of every round."""
    assert chunk_rows(2048, 4 * 8 * 8, torch.device("cpu")) == 128  # the world's bank: 256 latents per teacher call
    assert chunk_rows(2048, 4 * 64 * 64, torch.device("cuda")) == 16  # Stable Diffusion's: 128 chunks to share
    assert chunk_rows(6, 4 * 8 * 8, torch.device("cpu")) == 1 and chunk_rows(1, 4 * 128 * 128, torch.device("cpu")) == 1
    assert [dealt(list(range(8)), rank, 2) for rank in (0, 1)] == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert sorted(sum((dealt(list(range(10)), rank, 3) for rank in range(3)), [])) == list(range(10))


# `lcm` as the launcher runs it, each process printing the rows of the bank it solves; the main process writes the bank
# it would have written to SIDE, then is killed (-9) half-way through writing it to the run folder
SOLVING = textwrap.dedent("""
    import os, signal, sys
    from latent_consistency.evaluation import ode_error
    from latent_consistency.training import loop, ode_targets

    _solve, _build, _save = ode_error.TeacherConsistencyFunction.__call__, loop.build_ode_targets, ode_targets.save_torch

    def solve(self, z, t, cond, omega):
        # one write of the whole line, each row at its two ω: print's text and newline are two writes under PYTHONUNBUFFERED,
        # and the other process's line once landed between them ("rank 0 solves 1rank 1 solves 1")
        sys.stdout.write(f"rank {os.environ['RANK']} solves {len(z) // 2}\\n")
        sys.stdout.flush()
        return _solve(self, z, t, cond, omega)

    def killed_save(obj, path):
        _save(obj, path.with_name("SIDE"))
        path.write_bytes(b"half a bank")
        os.kill(os.getpid(), signal.SIGKILL)

    ode_error.TeacherConsistencyFunction.__call__, ode_targets.save_torch = solve, killed_save
    from latent_consistency.cli import end_process, main
    sys.exit(end_process(main(sys.argv[1:])))
""")


def solved(stdout: str, rank: int) -> int:
    return sum(int(line.split()[-1]) for line in stdout.splitlines() if line.startswith(f"rank {rank} solves "))


@pytest.mark.slow
def test_two_processes_share_the_bank_of_one_process_and_a_kill_in_its_write_leaves_none(tiny_sd, tmp_path):
    """A two-process run is killed while writing its bank; resumed on one process, it solves the same bank."""
    from tiny_models import write_captioned_images

    out, script = tmp_path / "run", tmp_path / "solving.py"
    script.write_text(SOLVING)
    args = ["distill", "--preset", "tiny", "--method", "ode", "--ode-targets", "6", "--teacher", str(tiny_sd), "--data",
            str(write_captioned_images(tmp_path / "images", 12)), "--out", str(out), "--guidance-scale-min", "1",
            "--guidance-scale-max", "4", "--steps", "1", "--omega-response-samples", "0"]
    killed = launch(DATA_PARALLEL, [str(script), *args], {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert killed.returncode != 0 and (out / "SIDE").is_file(), killed.stderr[-3000:]
    # was: process 0 solved all 6 rows while process 1 waited at a barrier (0 rows)
    assert solved(killed.stdout, 0) == solved(killed.stdout, 1) == 3, killed.stdout[-3000:]
    assert not (out / FILE).exists()  # what was half-written is the temporary file beside it
    two = ODETargets.load(out / "SIDE")
    (out / "SIDE").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process computes: on a CPU the thread count changes a network's rounding
    try:
        assert main([*args, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(FILE)) == [FILE]
    one = ODETargets.load(out / FILE)
    # was: other t, ω and z_t (the rows were drawn per micro-batch of the run: 4 rows on one process, 2 on each of two)
    assert all(torch.equal(getattr(one, k), getattr(two, k)) for k in (*ROWS, "solution")) and one.settings == two.settings
