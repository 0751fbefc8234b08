"""Two-process runs (`accelerate launch --multi_gpu --num_processes 2` on CPUs, gloo) that are refused or stopped: every
process ends at once and the run's one line is printed once; a run resumed with another process count, which image data
allows and shards refuse; a checkpoint that keeps every process's data position; the FSDP config on CPU processes.
"""

import json
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from latent_consistency.cli import main
from latent_consistency.folder_lock import hold
from two_processes import DATA_PARALLEL, ENV, free_port, launch


def distill(tiny_sd, data, out, *extra) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), "--batch-size", "4", *extra]


def launch_lcm(args: list[str], script: Path | None = None, timeout: int = 90) -> subprocess.CompletedProcess:
    """Two processes of `lcm` (or of `script`, which runs it), one thread each."""
    program = [str(script), *args] if script else ["-m", "latent_consistency.cli", *args]
    return launch(DATA_PARALLEL, program, {"OMP_NUM_THREADS": "1"}, timeout=timeout)


def positions(out: Path, step: int) -> list[dict]:
    """The data positions (one per process) of the run's checkpoint of `step`."""
    return json.loads((out / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())["data"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lcm distill: ")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 24)


@pytest.mark.slow
def test_a_held_out_folder_ends_every_process_at_once_with_one_line(tiny_sd, images, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    with hold(out):  # another lcm command writes the folder
        done = launch_lcm(distill(tiny_sd, images, out, "--steps", "1"))
    assert done.returncode != 0
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "is in use by another lcm command" in errors[0], done.stderr[-3000:]
    # was: process 1 waited in `Accelerator()` for process 0, which had refused, until the launcher killed it 30 s later
    assert done.stderr.count("exitcode  : 2 ") == 2 and "SIGKILL" not in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 30
    assert not out.exists()


# Runs `lcm` with accelerate's gradient state at the end of an uneven dataloader, where `gather_for_metrics` keeps only the
# first `remainder` entries it gathers (the duplicates that even out an evaluation set's last batch)
UNEVEN_END = textwrap.dedent("""
    import sys
    from accelerate.state import GradientState

    GradientState.end_of_dataloader = property(lambda self: True)
    GradientState.remainder = property(lambda self: 1)
    from latent_consistency.cli import end_process, main
    sys.exit(end_process(main(sys.argv[1:])))
""")


@pytest.mark.slow
def test_a_two_process_checkpoint_keeps_both_positions_and_resumes_in_one_process(tiny_sd, images, tmp_path):
    """An image folder's position is one global position, the same on every process: a resume with another count goes on
    with the global batches where they stood."""
    out, script = tmp_path / "run", tmp_path / "uneven_end.py"
    script.write_text(UNEVEN_END)
    done = launch_lcm(distill(tiny_sd, images, out, "--steps", "1"), script)
    assert done.returncode == 0, done.stderr[-3000:]
    # was: one position, process 0's (`gather_for_metrics` dropped process 1's as a duplicate)
    assert [p["sampler"] for p in positions(out, 1)] == [{"epoch": 0, "index": 4, "num_samples": 24}] * 2
    # was: refused after the models loaded, "each process keeps its own data position"
    assert main(distill(tiny_sd, images, out, "--steps", "2", "--resume")) == 0
    assert [p["sampler"] for p in positions(out, 2)] == [{"epoch": 0, "index": 8, "num_samples": 24}]


@pytest.mark.slow
def test_a_one_process_run_resumes_in_two_processes(tiny_sd, images, tmp_path):
    out = tmp_path / "run"
    assert main(distill(tiny_sd, images, out, "--steps", "1")) == 0
    done = launch_lcm(distill(tiny_sd, images, out, "--steps", "2", "--resume"))
    # was: process 1 found no position of its own in the checkpoint (a one-process run's), process 0 refused
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p["sampler"] for p in positions(out, 2)] == [{"epoch": 0, "index": 8, "num_samples": 24}] * 2


def shards(tmp_path: Path) -> str:
    """Two webdataset shards of four captioned images each; their --data spec."""
    import io

    from PIL import Image

    from test_multiprocess_training import shard

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, "PNG")
    for k in range(2):
        shard(tmp_path / f"{k:05d}.tar", [png.getvalue()] * 4)
    return str(tmp_path / "{00000..00001}.tar")


@pytest.mark.slow
def test_shards_resumed_with_another_process_count_are_refused_on_every_process_before_the_models_load(tiny_sd, tmp_path,
                                                                                                        monkeypatch, capsys):
    data, out = shards(tmp_path), tmp_path / "run"
    assert main(distill(tiny_sd, data, out, "--steps", "1")) == 0
    done = launch_lcm(distill(tiny_sd, data, out, "--steps", "2", "--resume"))
    assert done.returncode != 0
    errors = error_lines(done.stderr)
    # was: refused by one process after the models loaded, "each process keeps its own data position" (true of shards alone);
    # the other printed "lcm distill: terminated"
    assert len(errors) == 1 and "each process reads its own shards" in errors[0], done.stderr[-3000:]
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr[-3000:]
    # A two-process checkpoint resumed in one process: refused before the models load
    state_file = out / "checkpoints" / "step-0000001" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(state | {"data": state["data"] * 2}))
    from latent_consistency.training import loop

    monkeypatch.setattr(loop, "objective_of", lambda config: pytest.fail("the models load before the refusal"))
    capsys.readouterr()
    assert main(distill(tiny_sd, data, out, "--steps", "2", "--resume")) == 2
    assert "written by a run of 2 process(es) on webdataset shards and this one has 1" in capsys.readouterr().err


def test_a_resume_with_another_process_count_counts_what_every_process_skipped_once():
    from latent_consistency.training.run_folder import data_position

    saved = [{"sampler": {"epoch": 0, "index": 8, "num_samples": 24}, "skipped_counts": {"corrupt": n}, "skipped_seen": seen}
             for n, seen in ((1, [["corrupt", "a.png"]]), (2, [["corrupt", "a.png"], ["corrupt", "b.png"]]))]
    assert data_position(saved, 1, 2) == saved[1]
    assert data_position(saved, 0, 1) == {"sampler": saved[0]["sampler"], "skipped_counts": {"corrupt": 2},
                                          "skipped_seen": [["corrupt", "a.png"], ["corrupt", "b.png"]]}
    assert data_position(saved, 2, 3) == {"sampler": saved[0]["sampler"]}


def test_the_fsdp_config_on_cpu_processes_notes_that_the_student_is_not_sharded(monkeypatch):
    """accelerate applies FSDP only on GPUs: with configs/accelerate/fsdp.yaml, CPU processes train in plain data
    parallelism. Was: silently."""
    from accelerate.utils import DistributedType

    from latent_consistency.training.sharding import sharding_note

    cpu_processes, sharded = (types.SimpleNamespace(distributed_type=kind) for kind in (DistributedType.MULTI_CPU, DistributedType.FSDP))
    assert sharding_note(cpu_processes) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from the config's distributed_type
    assert "not sharded" in sharding_note(cpu_processes) and "only on GPUs" in sharding_note(cpu_processes)
    assert sharding_note(sharded) is None


@pytest.mark.slow
def test_ctrl_c_of_the_launcher_is_one_line_from_the_first_process(tiny_sd, images, tmp_path):
    """SIGINT to `accelerate launch` (a terminal's Ctrl-C), which forwards it to every process. (The launcher itself then
    prints torch's SignalException traceback and exits 1: its own, not a process's.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *DATA_PARALLEL, "--num_processes", "2", "--main_process_port",
           str(free_port()), "--mixed_precision", "no", "-m", "latent_consistency.cli",
           *distill(tiny_sd, images, out, "--steps", "100000", "--checkpoint-every", "1")]
    # A test runner's workers may ignore SIGINT, which a child inherits: the launcher gets Python's default handling back
    launcher = subprocess.Popen(cmd, env=ENV | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoints" / "step-0000002").is_dir():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    stops = [line for line in error_lines(stderr) if "interrupted" in line]
    # was: the line once per process
    assert len(stops) == 1 and "to continue, run the same command with --resume" in stops[0], stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
