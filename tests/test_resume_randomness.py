"""A resumed run draws what the uninterrupted run draws, the networks' own draws (dropout) included: a run's randomness is a
function of (seed, step), never of what the process drew before."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from latent_consistency.cli import main
from latent_consistency.training import run_folder
from tiny_models import write_captioned_images


class Stopped(BaseException):
    """A run stopped where a kill would stop it: just after a checkpoint."""


@pytest.fixture(scope="module")
def dropout_teacher(tiny_sd, tmp_path_factory):
    """The tiny teacher with a UNet config that asks for dropout (diffusers' `dropout`): its student drops out in training."""
    folder = shutil.copytree(tiny_sd, tmp_path_factory.mktemp("dropout") / "teacher")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"dropout": 0.1}))
    return folder


def losses(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def test_a_resumed_run_drops_out_as_the_uninterrupted_run(dropout_teacher, tmp_path, monkeypatch):
    """The resumed run's DataLoader drew its base seed from torch's global generator where the uninterrupted run did not,
    so every dropout mask after a resume was another one (and on a GPU the checkpoint held no generator state at all)."""
    data = write_captioned_images(tmp_path / "images", 6)

    def args(out):
        return ["distill", "--preset", "tiny", "--teacher", str(dropout_teacher), "--data", str(data), "--out", str(out),
                "--checkpoint-every", "2", "--keep-checkpoints", "10", "--lr", "1e-3"]

    assert main(args(tmp_path / "reference")) == 0
    after_step = run_folder.RunFolder.after_step

    def stop_after_the_first_checkpoint(self, progress, *rest):
        after_step(self, progress, *rest)
        if progress.step == 2:
            raise Stopped

    monkeypatch.setattr(run_folder.RunFolder, "after_step", stop_after_the_first_checkpoint)
    with pytest.raises(Stopped):
        main(args(tmp_path / "resumed"))
    monkeypatch.undo()
    assert main([*args(tmp_path / "resumed"), "--resume"]) == 0

    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")
    last = [tmp_path / run / "checkpoints" / "step-0000004" for run in ("reference", "resumed")]
    reference, resumed = (load_file(str(folder / "student.safetensors")) for folder in last)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # The saved RNG state is the uninterrupted run's too
    assert torch.equal(*(torch.load(folder / "rng.pt", weights_only=True)["torch"] for folder in last))
