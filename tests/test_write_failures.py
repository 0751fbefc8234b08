"""Writes that fail part-way (a full disk, a file larger than its file system takes): one line naming the file, exit 2,
and nothing already written lost or left half-written under its final name.

A full disk is made with RLIMIT_FSIZE: every write past the limit fails in the kernel with EFBIG, as it fails with ENOSPC
on a full disk, in Python's, torch's, safetensors' and PIL's writers alike (Python ignores SIGXFSZ), and needs no root.
"""

import contextlib
import errno
import json
import os
import resource
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from latent_consistency.outputs import savefig_atomic, write_json_atomic
from latent_consistency.training import checkpoint as ckpt
from latent_consistency.training import run_folder


@contextlib.contextmanager
def disk_full_past(size: int):
    """Every write past `size` bytes of a file fails (EFBIG), as on a disk that filled up there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def parts(step: int, size: int) -> tuple[dict, dict, dict]:
    """A checkpoint's (tensors, objects, state) at `step`, each weights file about `size` bytes."""
    weights = {"w": torch.full((size // 4,), float(step))}
    return {"student": weights}, {"optimizer": {"state": weights}, "rng": {"torch": torch.get_rng_state()}}, {"step": step}


def saved(run: Path, step: int, size: int = 1000, keep: int = 10) -> Path:
    return ckpt.save_checkpoint(run, step, *parts(step, size), keep=keep)


@pytest.mark.parametrize("fails_at", ["student.safetensors", "optimizer.pt"])
def test_a_disk_that_fills_while_a_checkpoint_is_written_names_it_and_keeps_the_one_before(tmp_path, fails_at):
    """safetensors raised a SafetensorError, torch.save a RuntimeError ("unexpected pos"), neither naming a file: a traceback,
    and the half-written step-NNNNNNN.tmp kept the space. Now an OSError names the checkpoint (the CLI's one line), the
    half-written folder goes and the checkpoint before it is whole."""
    run = tmp_path / "run"
    saved(run, 2)
    tensors, objects, state = parts(4, 200_000)
    if fails_at == "optimizer.pt":
        tensors = parts(4, 1000)[0]
    with pytest.raises(OSError) as raised, disk_full_past(100_000):
        ckpt.save_checkpoint(run, 4, tensors, objects, state, keep=10)
    assert raised.value.errno == errno.EFBIG and raised.value.filename == str(run / "checkpoints" / "step-0000004")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    loaded, _, state = ckpt.load_checkpoint(run / "checkpoints" / "step-0000002")
    assert state["step"] == 2 and torch.equal(loaded["student"]["w"], torch.full((250,), 2.0))


def test_a_kill_as_a_checkpoint_replaces_one_of_its_own_step_loses_neither(tmp_path, monkeypatch):
    """A run stopped by non-finite losses saves again at the step it last saved. The old checkpoint was removed before the
    new one was renamed into place: killed in between, resume removed the new one as half-written, and the step's
    checkpoint was gone. Now the new one, whole, is moved into place."""
    run = tmp_path / "run"
    saved(run, 2)
    rename = os.replace

    def killed_before_the_new_one_is_in_place(src, dst):
        if Path(src).name == "step-0000002.tmp" and Path(dst).name == "step-0000002":
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_one_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 2, *parts(2, 1000)[:2], {"step": 2, "nonfinite_total": 3}, keep=10)
    monkeypatch.undo()
    ckpt.remove_partial_checkpoints(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert ckpt.load_checkpoint(run / "checkpoints" / "step-0000002")[2]["nonfinite_total"] == 3


def test_a_kill_while_an_old_checkpoint_is_removed_leaves_none_damaged(tmp_path, monkeypatch):
    """Removing the checkpoints past --keep-checkpoints takes a while for a large one: killed half-way, it left a
    step-NNNNNNN without its state.json, which every resume then refused as damaged. Now it is renamed away first."""
    run = tmp_path / "run"
    saved(run, 2, keep=1)
    remove = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        if Path(path).name.startswith("step-0000002") and Path(path).is_dir():
            (Path(path) / ckpt.STATE).unlink()
            raise KeyboardInterrupt
        remove(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        saved(run, 4, keep=1)
    monkeypatch.undo()
    assert ckpt.damaged_checkpoints(run) == [] and ckpt.list_checkpoints(run) == [run / "checkpoints" / "step-0000004"]
    ckpt.remove_partial_checkpoints(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]


@pytest.mark.parametrize("write", ["json", "figure"])
def test_a_disk_that_fills_while_a_table_or_plot_is_written_names_it_and_keeps_the_old_file(tmp_path, write):
    """`lcm evaluate`'s results.json, report.md and plots: Python's write() and matplotlib's raised an OSError without a file
    name, a traceback. Now it names the file; the old file is kept whole and no temporary file is left."""
    path = tmp_path / ("results.json" if write == "json" else "steps.png")
    path.write_bytes(b"old")
    figure = plt.figure()
    figure.gca().imshow(torch.rand(300, 300).numpy())
    with pytest.raises(OSError) as raised, disk_full_past(1000):
        write_json_atomic(path, ["x" * 2000]) if write == "json" else savefig_atomic(figure, path, dpi=100)
    plt.close(figure)
    assert raised.value.filename == str(path) and path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_disk_that_fills_while_the_metrics_are_logged_names_the_log(tmp_path):
    """metrics.jsonl is appended to each `log_every` steps: a full disk there was a traceback."""
    writer = run_folder.MetricsWriter(tmp_path, active=True)
    writer.write({"step": 1, "loss": 0.5})
    with pytest.raises(OSError) as raised, disk_full_past(writer.path.stat().st_size + 10):
        writer.write({"step": 2, "loss": 0.25, "note": "x" * 100})
    assert raised.value.filename == str(writer.path)


def test_a_disk_that_fills_while_a_resume_drops_records_keeps_the_log_and_no_temporary_file(tmp_path):
    """A resume rewrites metrics.jsonl without the records after its checkpoint: a full disk there left metrics.jsonl.tmp
    behind, and a traceback."""
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": step, "loss": 0.1}) + "\n" for step in range(1, 200))
    path.write_text(text)
    with pytest.raises(OSError) as raised, disk_full_past(1000):
        run_folder.drop_records_after(path, 150)
    assert raised.value.filename == str(path) and path.read_text() == text and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "world/unet/model.safetensors", None, "copy.partial/unet/model.safetensors"),
     "No space left on device: copy.partial/unet/model.safetensors"),
    (OSError(errno.EACCES, "Permission denied", "a", None, "b"), "Permission denied: a"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device while writing the output; free some space, or write to another disk"),
    (OSError(errno.EACCES, "Permission denied"), None),
    (RuntimeError("Permission denied (os error 13)"), None),
    (RuntimeError("unexpected pos 704 vs 598"), None),
])
def test_the_one_line_of_a_path_or_disk_error(error, line):
    """A copy that fills the disk named its source (`lcm world export` blamed the world copied from); a library's own error
    over a full disk (safetensors', tokenizers', shutil.Error) was a traceback. Errors that are not a full disk or do not
    name their path stay tracebacks."""
    from latent_consistency.cli import path_error

    assert path_error(error) == line


def said(err: str, line: str) -> bool:
    """Whether standard error ends a line with `line` (the progress bar, not closed yet, is on the line before it)."""
    return any(part.endswith(line) for part in err.splitlines())


def test_a_run_whose_disk_fills_at_a_checkpoint_or_its_export_is_one_line_each_and_resumes(tiny_sd, tmp_path, monkeypatch, run_error):
    """`lcm distill` on a disk that fills at the step-4 checkpoint (after its weights, at the optimiser state) and then at
    the export: a traceback each time. Now one line naming what was being written, exit 2; the step-2 checkpoint is whole
    and `--resume` (with space again) continues from it and exports."""
    from tiny_models import write_captioned_images

    out = tmp_path / "run"
    args = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(write_captioned_images(tmp_path / "images", 8)),
            "--out", str(out), "--keep-checkpoints", "10"]
    save, finish = ckpt.save_checkpoint, run_folder.RunFolder.finish

    def full_at_step_4(run_dir, step, *rest, **kwargs):
        with disk_full_past(5_000_000) if step == 4 else contextlib.nullcontext():  # the tiny UNet's weights: 3.9 MB each
            return save(run_dir, step, *rest, **kwargs)

    def full_at_the_export(self):
        with disk_full_past(1_000_000):
            return finish(self)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_at_step_4)
    code, err = run_error(args)
    assert code == 2 and said(err, f"lcm distill: error: File too large: {out / 'checkpoints' / 'step-0000004'}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    monkeypatch.setattr(run_folder.RunFolder, "finish", full_at_the_export)
    code, err = run_error([*args, "--resume"])
    assert code == 2 and said(err, f"lcm distill: error: File too large: {out / 'export.partial'}")
    assert not (out / "lcm").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"]
    monkeypatch.undo()
    assert run_error([*args, "--resume"])[0] == 0 and (out / "lcm" / "guidance.json").is_file()


def test_a_disk_that_fills_while_generate_writes_an_image_is_one_line_and_keeps_the_ones_before(tiny_lcm, tmp_path, run_error, monkeypatch):
    """PIL's write() raised an OSError without a file name: a traceback. Now one line naming the image, exit 2; the images
    before it are whole and no temporary file is left."""
    out = tmp_path / "images"
    save = Image.Image.save

    def full_at_the_second(self, fp, *args, **kwargs):
        with disk_full_past(100) if len(list(out.iterdir())) == 1 else contextlib.nullcontext():
            return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_at_the_second)
    code, err = run_error(["generate", "a red star", "a blue ring", "--model", str(tiny_lcm), "--steps", "1", "--batch-size", "1",
                           "--height", "16", "--width", "16", "--out", str(out)])
    assert (code, err.splitlines()[-1]) == (2, f"lcm generate: error: File too large: {out / '0001-a-blue-ring.png'}")
    assert [p.name for p in out.iterdir()] == ["0000-a-red-star.png"]
    Image.open(out / "0000-a-red-star.png").load()
