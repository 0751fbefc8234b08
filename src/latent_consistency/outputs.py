"""Output folders a command writes into, checked before any work is done, and the writes into them: whole or not at all,
and a write that fails (a full disk) names its file."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from latent_consistency.errors import UserError

NAME_MAX = 255  # the most bytes a file name may have on Linux's file systems (ext4, XFS, Btrfs) and macOS's (APFS)
PARTIAL_SUFFIX = ".partial"  # of OUT.partial, where a command builds its output OUT (`partial_folder`)


def writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder if missing and prove it is writable; an empty name (not the current folder), a file in its place,
    or no permission, is a UserError."""
    if not str(path).strip():
        raise UserError(f"{what} is empty; give a folder name")
    path = Path(path)
    check_link(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {what} {path}: {err.strerror or err}") from None
    return path


def check_writable(path: str | Path, what: str = "output folder") -> None:
    """What `writable_folder` checks, without making the folder: for a command that makes it only once all its other
    checks pass, so that a refused command leaves none behind. A missing folder needs its nearest existing parent to be
    a folder it can write in."""
    if not str(path).strip() or Path(path).exists():
        writable_folder(path, what)  # refuses an empty name; an existing folder is only written a test file in
        return
    check_link(path, what)
    parent = next(p for p in Path(os.path.abspath(path)).parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"cannot make {what} {path}: {parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot make {what} {path}: {err.strerror or err} in {parent}") from None


def check_link(path: str | Path, what: str = "output folder") -> None:
    """A UserError where `path`, or the folder it is to be made in, is a symbolic link to nothing (or a loop of links): the
    folder cannot be made through it, and the failure said only "File exists" (mkdir makes no folder at a link), which
    named neither the link nor what it points to."""
    path = Path(path)
    link = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), path)
    if link.is_symlink() and not link.exists():
        inside = "" if link == path else f" in {link},"
        raise UserError(f"{what} {path} is{inside} a symbolic link to {os.path.realpath(link)}, which does not exist; make that "
                        "folder, or remove the link")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader (or a rerun after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    """`write_text_atomic` of `data` as JSON."""
    write_text_atomic(path, json.dumps(data, indent=indent))


def savefig_atomic(fig, path: Path, **kwargs) -> Path:
    """`fig.savefig(path)`, atomically like `write_text_atomic` (the format from the file's suffix)."""
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs))
    return path


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` a temporary file beside `path`, then move it over `path`, so that a reader (or a rerun after a kill)
    sees the old file or the new one, never half of one; the temporary file goes if `write` fails, and a failure to
    write (a full disk) names `path` (`written`)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with written(path):
            write(tmp)
            with open(tmp, "rb") as f:  # on disk before the rename: after a power cut, not an empty file under `path`
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_empty_folder(path: Path) -> bool:
    """Whether `path` is a folder (or a symbolic link to one) that holds nothing: a free output folder, as a missing one
    is (a user's mkdir for it). One that cannot be listed is not known to be empty."""
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def save_torch(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` through a Python file, so that a write that fails (a full disk) raises Python's OSError,
    which `written` finds behind torch's RuntimeError: given a path, torch's own writer reports only "unexpected pos". A
    Ctrl-C or SIGTERM (`KeyboardInterrupt`, `SystemExit`) that lands inside the write is raised as itself: torch's writer
    closing the zip after it raised "unexpected pos" in its place, and a stopped run printed a traceback."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            stop = err.__context__
            if isinstance(stop, (KeyboardInterrupt, SystemExit)):
                raise stop from None
            raise


# Where the libraries that write files put the OSError of a write that failed: Python's own has no file name (a write() or
# close(), not the open()), torch.save's RuntimeError is raised while handling it, safetensors' and tokenizers' (Rust) end
# their message in "(os error N)", shutil.Error quotes "[Errno N]"
_ERRNO_IN_MESSAGE = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def os_error_of(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`: `err` itself, one it was raised from or while handling, or the one its message quotes
    (`_ERRNO_IN_MESSAGE`); None when there is none."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        match = _ERRNO_IN_MESSAGE.search(str(err))
        if match:
            number = int(match.group(1) or match.group(2))
            return OSError(number, os.strerror(number))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def written(path: str | Path) -> Iterator[None]:
    """Name `path` in a failure to write it: the OSError behind it (`os_error_of`) raised again with `path` as its file
    name, which the CLI prints in one line (exit 2). Without it a full disk, met in a write() and not in the open(), was
    a traceback. An OSError that names its file already goes on as it is."""
    try:
        yield
    except Exception as err:
        cause = os_error_of(err)
        if cause is None or (isinstance(err, OSError) and err.filename is not None):
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err


def permit_as_umask(path: str | Path) -> Path:
    """Give the file `path`, or the folder `path` and everything in it, the permissions of what this process makes itself:
    0o666 (a folder 0o777) less the umask. safetensors (0.8) writes its files readable by their owner alone (0o600)
    whatever the umask, and diffusers' `save_pretrained` and `save_lora_weights` write through it, so a model written on
    a team's shared disk had its JSON files readable by all and its weights by their writer only; a folder copied with
    `shutil.copytree` keeps its source's modes. Called on an output once it is whole, before it is renamed into place, so
    that no reader finds it readable by its writer alone there. Links are left as they are (a chmod would follow them out
    of the output). Returns `path`."""
    path = Path(path)
    _permit(path)
    if path.is_dir() and not path.is_symlink():
        for folder, folders, files in os.walk(path):  # not into linked folders
            for name in folders + files:
                _permit(Path(folder, name))
    return path


def _permit(item: Path) -> None:
    """`permit_as_umask` of one file or folder (not of what the folder holds); a link is left as it is."""
    if item.is_symlink():
        return
    if item.is_dir():  # its set-group-ID bit kept: on a team's disk, what is made in it takes the folder's group
        os.chmod(item, (item.stat().st_mode & stat.S_ISGID) | (0o777 & ~_umask()))
    else:
        os.chmod(item, 0o666 & ~_umask())


@functools.cache
def _umask() -> int:
    """The process's umask, read once (setting it is the only way to read it, and for that instant it is 0 for every
    thread of the process)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(new: Path, path: Path) -> Path:
    """Move the complete folder `new` to `path`, replacing a folder there: a reader (or a rerun after a kill) finds the old
    folder, the new one or, for a moment, none, never half of one. Both must be on one file system."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def partial_folder(out: str | Path, example: str, flag: str = "--out") -> Path:
    """`OUT.partial`, where a command builds its output `out` before moving it into place (`move_into_place`): beside the
    folder that a symbolic link `out` points to, on that folder's file system, where `move_into_place` renames it. A
    UserError, before any work, for an --out that names no folder ("", ".", "..", "/"), which leaves no name to give it
    (`example`: a folder name to suggest), a link to nothing (`check_link`), or a name too long for OUT.partial: the
    command failed at its end with "File name too long" about a name the user never gave. An error names `out` as `flag`
    (a command's --out, or a Python call's argument: "out_dir")."""
    if Path(os.path.normpath(out)).name in ("", ".."):
        raise UserError(f"{flag} {str(out)!r} names no new folder; give the folder by its name (e.g. {example})")
    check_link(out, flag)
    target = output_target(out)
    length = len(os.fsencode(target.name))
    if length + len(PARTIAL_SUFFIX) > NAME_MAX:
        link = "" if target == Path(out) else f" (a link to {target})"
        raise UserError(f"{flag} {out}{link}: its folder name is {length} bytes long; at most {NAME_MAX - len(PARTIAL_SUFFIX)} "
                        f"({flag.removeprefix('--').upper()}{PARTIAL_SUFFIX} is written first)")
    return target.with_name(target.name + PARTIAL_SUFFIX)


def output_target(out: str | Path) -> Path:
    """The folder an output `out` is renamed onto: `out` itself, or the folder it points to where it is a symbolic link
    (a folder renamed onto the link failed with "Not a directory", once the whole output was written)."""
    return Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)


def move_into_place(new: Path, out: str | Path) -> Path:
    """Rename the complete folder `new` (`partial_folder`'s, or one in it) to the output `out`, a missing or empty folder
    (the command checked), or onto the one that a symbolic link `out` points to (`output_target`); returns `out`."""
    target = output_target(out)
    if target.is_dir():
        target.rmdir()  # empty: a folder is renamed onto nothing on Windows
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)
    return Path(out)


def start_partial(partial: Path, mark: str, writer: str) -> Path:
    """A new, empty `partial` holding only the file `mark`, for a command that builds its output there and renames it when
    complete: an unfinished one of its own (or an empty folder) is replaced, anything else refused (`check_partial`). The
    command removes `mark` when it finishes."""
    check_partial(partial, mark, writer)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / mark).touch()  # first: marks the folder as an unfinished output of ours, which a rerun may replace
    return partial


def check_partial(partial: Path, mark: str, writer: str) -> None:
    """`partial`, the folder a command builds its output in before renaming it, must be missing, empty, or an unfinished
    one of that command's (it holds the file `mark`, which the command writes first); anything else of that name (a file,
    a link, a user's folder) is a UserError and is left as it is, so that clearing or resuming it loses nothing of theirs."""
    if not partial.exists() and not partial.is_symlink():
        return
    if partial.is_symlink() or not partial.is_dir() or (any(partial.iterdir()) and not (partial / mark).is_file()):
        raise UserError(f"{partial} exists and is not an unfinished output of {writer}, which writes there first: move it away, "
                        "or choose another output folder")
