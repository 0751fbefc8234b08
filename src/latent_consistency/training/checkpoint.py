"""Atomic, exactly resumable checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding everything a run needs to continue as if
it had never stopped:

    student.safetensors   trainable weights θ (the whole UNet, or the LoRA adapters)
    target.safetensors    the EMA target θ⁻ (when it is a separate network)
    optimizer.pt          AdamW state; lr_scheduler.pt the LR schedule (tensors and numbers only:
                          read with torch.load(weights_only=True))
    rng.pt                torch's CPU RNG state (every draw of a step, the loss's and the networks' own (dropout),
                          is seeded from (seed, rank, step) and needs no state: `training.loop.seed_network_draws`)
    state.json            step, counters, the data position of every rank, the resolved config

It is written into `step-NNNNNNN.tmp/` and renamed when complete, so a folder without `.tmp` is
always whole: a run killed half-way leaves only a `.tmp` folder, which resume ignores and removes. A write that fails
(a full disk) removes it and is an OSError naming the checkpoint, which the CLI prints in one line; the checkpoints
before it stay whole, and a resume continues from the latest.
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
from latent_consistency.outputs import permit_as_umask, save_torch, written

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
    """Write a checkpoint atomically and keep only the `keep` most recent ones. A write that fails (a full disk) is an
    OSError naming the checkpoint (`written`), removes its half-written folder and leaves the checkpoints before it whole."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with written(final):
            _write_files(tmp, tensors, objects, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # One of the same step (a run stopped by non-finite losses where it last saved) is set aside whole, not removed, until
    # the new one is in its place: a kill between the two renames leaves the new one whole as `.tmp`, which
    # `remove_partial_checkpoints` moves into place
    replaced = _set_aside(final) if final.exists() else None
    os.replace(tmp, final)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the `keep` most recent checkpoints (none with `keep` 0): after each save, and when a run resumes, where
    a kill between the last save and its pruning left one too many that no later save would remove."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(_set_aside(old), ignore_errors=True)


def _write_files(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, dict], state: dict) -> None:
    """A checkpoint's files into the new `folder`, state.json (listing the others) last, all of them on disk when it returns,
    with the umask's permissions (`permit_as_umask`: safetensors writes its own readable by their owner alone)."""
    folder.mkdir()
    for name, sd in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(folder / f"{name}.safetensors"))
    for name, obj in objects.items():
        save_torch(obj, folder / f"{name}.pt")
    (folder / STATE).write_text(json.dumps({**state, FILES: sorted(f.name for f in folder.iterdir())}, indent=1))
    permit_as_umask(folder)
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _set_aside(path: Path) -> Path:
    """Rename the checkpoint folder `path` to a `.tmp` name, which is no checkpoint, before it is removed: a removal cut
    short (a kill, a file that cannot be removed) leaves no `step-NNNNNNN` without its state.json, which a resume would
    refuse as damaged, only a folder that resume removes. Returns the new name."""
    aside = path.with_name(path.name + ".old.tmp")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


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
    """Remove the `.tmp` folders of checkpoints being written or removed when a run stopped. One that is whole (`read_state`)
    with no checkpoint of its step beside it was stopped as it replaced one of its own step (`save_checkpoint`): it is
    moved into place, so that neither is lost."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    for p in sorted(root.glob("*.tmp")):
        final = p.with_name(p.name.removesuffix(".tmp"))
        if _NAME.match(final.name) and not final.exists() and read_state(p)[1] is None:
            os.replace(p, final)
        else:
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
    state, damage = read_state(path)
    if damage:
        raise UserError(damaged_message(path, damage))
    return state


def read_state(path: Path) -> tuple[dict | None, str | None]:
    """(the state of the checkpoint folder `path`, None) when it is whole as `check_whole` knows it; else (None, why not)."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        return None, f"it has no {STATE}"
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError among them
        return None, f"its {STATE} cannot be read: {first_line(err)}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return None, f"its {STATE} is not a checkpoint's"
    listed = state.get(FILES)
    missing = [name for name in (listed if isinstance(listed, list) else []) if not (path / str(name)).is_file()]
    if missing:
        return None, f"its {', '.join(map(str, missing))} {'is' if len(missing) == 1 else 'are'} missing"
    return state, None


def check_of_this_run(path: Path, state: dict) -> None:
    """A UserError when the checkpoint at `path` recorded a config (a training run's) that is not its run folder's
    config.json but for the fields a resumed run may change and the models and data that moved since with the same
    content (`sources.proven_moves`: a checkpoint from before a move names their old places): a checkpoint copied there
    from another run."""
    from latent_consistency.training.config import RESUMABLE_CHANGES, config_from_dict
    from latent_consistency.training.sources import proven_moves

    run_dir, saved = path.parent.parent, path.parent.parent / "config.json"
    if not isinstance(state.get("config"), dict) or not saved.is_file():
        return
    try:
        run, written_by = config_from_dict(json.loads(saved.read_text())), config_from_dict(state["config"])
        diffs = run.differences(written_by, ignore=(*RESUMABLE_CHANGES, *proven_moves(run_dir, run, written_by, state, of_checkpoint=True)))
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
