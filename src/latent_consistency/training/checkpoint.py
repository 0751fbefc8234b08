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
state.json also lists the files written with it, so a `step-NNNNNNN/` folder damaged by hand since (a file cut short or
deleted, state.json itself missing: `damaged_checkpoints`) or copied from another run (its config is not its run folder's)
is refused in one line, and kept: never skipped, restarted over or overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latent_consistency.errors import UserError, first_line

CHECKPOINT_DIR = "checkpoints"
STATE = "state.json"
FILES = "files"  # state.json's list of the files written beside it
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
    (tmp / STATE).write_text(json.dumps({**state, FILES: sorted(f.name for f in tmp.iterdir())}, indent=1))
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
    """Complete checkpoints, oldest first. Half-written `.tmp` folders are not checkpoints, nor are `damaged_checkpoints`."""
    return [p for p in _step_folders(run_dir) if (p / STATE).is_file()]


def damaged_checkpoints(run_dir: Path) -> list[Path]:
    """`step-NNNNNNN` folders without their state.json. A checkpoint is renamed into place whole, so such a folder was damaged
    since: a resume refuses it (`run_folder.check_resumable`) rather than start from the one before it, or from scratch,
    and overwrite it."""
    return [p for p in _step_folders(run_dir) if not (p / STATE).is_file()]


def _step_folders(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def remove_partial_checkpoints(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict]:
    """(tensors by name, objects by name, state) of a checkpoint folder; no pickled code is run. A checkpoint that is not
    whole (`check_whole`) or not of its run folder's run (`check_of_this_run`) is a UserError, and is left as it is."""
    path = Path(path)
    state = check_whole(path)
    check_of_this_run(path, state)
    try:
        tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        objects = {p.stem: torch.load(p, weights_only=True) for p in sorted(path.glob("*.pt"))}
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:  # cut short or not a checkpoint file
        raise UserError(damaged_message(path, f"a file cannot be read: {first_line(err)}")) from None
    return tensors, objects, state


def check_whole(path: Path) -> dict:
    """The state of the checkpoint folder `path`, once it is known to hold its state.json and every file that state.json
    lists (checkpoints written before that list: the files there). A file cut short is refused as it is read."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise UserError(damaged_message(path, f"it has no {STATE}")) from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError among them
        raise UserError(damaged_message(path, f"its {STATE} cannot be read: {first_line(err)}")) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(damaged_message(path, f"its {STATE} is not a checkpoint's"))
    written = state.get(FILES)
    missing = [name for name in (written if isinstance(written, list) else []) if not (path / str(name)).is_file()]
    if missing:
        raise UserError(damaged_message(path, f"its {', '.join(map(str, missing))} {'is' if len(missing) == 1 else 'are'} missing"))
    return state


def check_of_this_run(path: Path, state: dict) -> None:
    """A UserError when the checkpoint at `path` recorded a config (a training run's) that is not its run folder's
    config.json but for the fields a resumed run may change: a checkpoint copied there from another run."""
    from latent_consistency.training.config import config_from_dict

    saved = path.parent.parent / "config.json"
    if not isinstance(state.get("config"), dict) or not saved.is_file():
        return
    try:
        diffs = config_from_dict(json.loads(saved.read_text())).differences(config_from_dict(state["config"]))
    except (OSError, ValueError, TypeError, KeyError, UserError):
        return  # the run's config.json is the run folder's to refuse (`run_folder.saved_config`)
    if diffs:
        raise UserError(damaged_message(path, f"it was written by another run ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})"))


def damaged_message(path: Path, why: str) -> str:
    """The one-line refusal of the checkpoint `path`: why, and what to do, with the checkpoint before it (if any) named."""
    earlier = [p for p in list_checkpoints(path.parent.parent) if checkpoint_step(p) < checkpoint_step(path)]
    instead = (f"move it out of {path.parent} to resume from {earlier[-1].name}" if earlier else
               f"move it out of {path.parent} to resume from the start")
    return f"checkpoint {path} is damaged or another run's ({why}); {instead}, or start a new run with another --out"
