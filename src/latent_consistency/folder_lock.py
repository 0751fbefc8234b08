"""One writer per output folder: a command that writes a folder (a run's --out, generate's, evaluate's, cache's) holds its
lock, and a second command on that folder is refused in one line instead of interleaving checkpoints, records or images
with the first (a second terminal, a scheduler requeueing a job that still runs, two notebook cells).

The lock is `flock` on a file beside the folder, `.NAME.lock` (for a NAME too long for that, its first bytes and a digest
of it, `lock_name`): the kernel releases it when its process ends, however it
ends (kill -9 and crashes included), so a run resumed after a crash is never refused, and the file such a process leaves is
taken over by the next command. Beside the folder, not in it: `lcm cache` needs its folder not to exist yet, and a run
folder must hold only a run's own files. Hidden, so that `runs/*` does not name it. Where no lock can be taken (the
parent folder missing or read-only, a file system without flock, Windows, which has no flock) the command runs unguarded,
as it did before this lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from latent_consistency.errors import UserError
from latent_consistency.outputs import NAME_MAX

try:
    import fcntl
except ImportError:  # Windows: no flock, and the import stopped every lcm command there, --help included
    fcntl = None

LOCK_PREFIX = 200  # the bytes of a folder's name that a lock file named by a digest keeps (`lock_name`)

# The descriptors of the locks this process holds, which a child it forks closes (`_close_held_in_child`)
_HELD: set[int] = set()


def lock_file(folder: str | Path) -> Path | None:
    """The lock file of `folder`: one for every spelling of it (relative, absolute, through a symbolic link); None for the
    file system's root, which has no folder beside it to hold one."""
    folder = Path(folder).resolve()
    return folder.with_name(lock_name(folder.name)) if folder.name else None


def lock_name(name: str) -> str:
    """The name of the lock file of a folder named `name`: `.NAME.lock`, or, where that is longer than a file name may be
    (a NAME over 249 bytes, whose lock the kernel refused, so that the command ran unguarded), the first LOCK_PREFIX bytes
    of NAME (whole characters) and a digest of all of it."""
    plain = f".{name}.lock"
    if len(os.fsencode(plain)) <= NAME_MAX:
        return plain
    encoded = os.fsencode(name)
    prefix = encoded[:LOCK_PREFIX].decode(sys.getfilesystemencoding(), errors="ignore")
    return f".{prefix}-{hashlib.sha256(encoded).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def hold(folder: str | Path | None, what: str = "") -> Iterator[None]:
    """Hold `folder`'s lock for the `with` block; a UserError naming the holder when another process holds it, and `what`
    it guards (default: the --out `folder`). No folder (an empty --out, refused by the command itself) takes no lock, and
    neither does a process of a launched group other than its first (`first_process`). The lock file is removed on
    leaving."""
    path = lock_file(folder) if str(folder or "").strip() and first_process() else None  # no lock at the root either
    fd = None if path is None else acquire(path, folder, what)
    if fd is not None:
        _HELD.add(fd)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before closing: a process that opened this file meanwhile sees it go (`acquire`)
            _HELD.discard(fd)
            os.close(fd)


def _close_held_in_child() -> None:
    """A forked child (a training run's DataLoader worker) closes its copies of the held locks' descriptors: a lock is released
    when every descriptor of it is closed, and a worker outlives a command killed with kill -9 by seconds (it notices only
    then that its parent is gone), during which `--resume` was refused as "in use by another lcm command"."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, whose processes start without fork (nor any lock held, `acquire`)
    os.register_at_fork(after_in_child=_close_held_in_child)


def acquire(path: Path, folder: str | Path, what: str = "") -> int | None:
    """An open descriptor of `path` holding its exclusive lock, None where none can be taken; held by another process, a
    UserError naming `what` it guards (default: the --out `folder`). A holder may remove the file between this process
    opening it and locking it: the lock then guards a file no longer there, so it is taken again."""
    while fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            otherwise = "" if what else ", or choose another --out"
            raise UserError(f"{what or f'--out {folder}'} is in use by another lcm command ({holder}); wait for it to end or stop it "
                            f"(a command that was killed holds nothing){otherwise}") from None
        except OSError:  # no flock on this file system (some NFS and Lustre mounts)
            os.close(fd)
            return None
        if is_file_at(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
            return fd
        os.close(fd)
    return None


def is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the file now at `path`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def first_process() -> bool:
    """Whether this process is alone or the first of a launched group (`accelerate launch`, torchrun, mpirun), by
    accelerate's own reading of the environment: the others of a training run write its folder with it, under its lock."""
    from accelerate.utils.environment import get_cpu_distributed_information

    return get_cpu_distributed_information().rank == 0
