"""Atomic, exactly resumable checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding everything a run needs to continue as if
it had never stopped:

    student.safetensors   trainable weights θ (the whole UNet, or the LoRA adapters)
    target.safetensors    the EMA target θ⁻ (when it is a separate network)
    optimizer.pt          AdamW state; lr_scheduler.pt the LR schedule (tensors and numbers only:
                          read with torch.load(weights_only=True))
    rng.pt                torch's global RNG states (the per-step training draws are reseeded from
                          (seed, rank, step) and need no state)
    state.json            step, counters, the data position of every rank, the resolved config

It is written into `step-NNNNNNN.tmp/` and renamed when complete, so a folder without `.tmp` is
always whole: a run killed half-way leaves only a `.tmp` folder, which resume ignores and removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder `step-NNNNNNN`."""
    return int(_NAME.match(Path(path).name).group(1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    objects: dict[str, dict], state: dict, keep: int) -> Path:
    """Write a checkpoint atomically and keep only the `keep` most recent ones."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, sd in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    for name, obj in objects.items():
        torch.save(obj, tmp / f"{name}.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written `.tmp` folders are not checkpoints."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def remove_partial_checkpoints(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict]:
    """(tensors by name, objects by name, state) of a checkpoint folder; no pickled code is run."""
    path = Path(path)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    objects = {p.stem: torch.load(p, weights_only=True) for p in path.glob("*.pt")}
    state = json.loads((path / "state.json").read_text())
    return tensors, objects, state
