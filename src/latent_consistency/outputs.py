"""Output folders a command writes into, checked before any work is done."""

from __future__ import annotations

import tempfile
from pathlib import Path

from latent_consistency.errors import UserError


def writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder if missing and prove it is writable; a file in its place, or no permission, is a UserError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {what} {path}: {err.strerror or err}") from None
    return path
