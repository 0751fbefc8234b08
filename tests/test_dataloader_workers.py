"""Training with DataLoader worker processes (`--num-workers N` on an image folder): the same samples in the same order as
without workers, a checkpoint's data position that resumes there, a data error and a stop that read as without workers."""

import multiprocessing
import subprocess

import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.training.batches import TrainingBatches
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    from latent_consistency.models import load_diffusion_model

    return load_diffusion_model(str(tiny_sd))


def latents(batches: TrainingBatches, n: int) -> list[torch.Tensor]:
    return [next(batches)["latents"] for _ in range(n)]


@pytest.mark.parametrize("samples, workers", [(5, 2), (1, 2)])
def test_workers_read_the_samples_of_no_workers_and_a_checkpoint_resumes_there(tiny_model, tmp_path, samples, workers):
    """Worker processes draw ahead of the training step (2 batches each): the saved position is that of the last batch
    trained on, so a run resumed with or without workers reads on as the uninterrupted run does; more workers than
    samples included."""
    folder = write_captioned_images(tmp_path / "data", samples)

    def opened(num_workers: int) -> TrainingBatches:
        return TrainingBatches(str(folder), tiny_model, 16, 3, seed=0, num_workers=num_workers)

    expected, drawn = latents(opened(0), 5), latents(with_workers := opened(workers), 3)
    state = with_workers.state_dict()  # a checkpoint after the third step
    for num_workers in (workers, 0):
        resumed = opened(num_workers)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(drawn + latents(resumed, 2), expected, strict=True))


def test_a_data_error_in_a_worker_is_its_one_line(tiny_model, tmp_path):
    """Images that turn unreadable during a run (a folder on a network drive going away): the worker's UserError reached
    the user as "Caught UserError in DataLoader worker process 0" with the worker's traceback; now as its one line."""
    folder = write_captioned_images(tmp_path / "data", 2)
    batches = TrainingBatches(str(folder), tiny_model, 16, 2, seed=0, num_workers=1)
    for image in folder.glob("*.png"):
        image.write_bytes(b"not a png")
    with pytest.raises(UserError) as err:
        next(batches)
    assert str(err.value) == f"no image in {folder} could be decoded (skipped: corrupt=2); check the files"


def test_a_worker_stopped_by_sigterm_ends_quietly(tiny_model, tmp_path):
    """SIGTERM to the whole process group (a scheduler's stop, `timeout`, `kill -- -PGID`) reaches the workers from a process
    other than theirs: torch's handler let it kill them, and the training process stopped with "DataLoader worker (pid N) is
    killed by signal: Terminated" and a traceback instead of its own one line. A worker now ends with exit code 0, which the
    training process does not take for a failure, and the training process stops on its own SIGTERM."""
    folder = write_captioned_images(tmp_path / "data", 2)
    batches = TrainingBatches(str(folder), tiny_model, 16, 2, seed=0, num_workers=1)
    before = set(multiprocessing.active_children())
    next(batches)
    [worker] = set(multiprocessing.active_children()) - before
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another sender than the training process
    worker.join(timeout=60)
    assert worker.exitcode == 0
