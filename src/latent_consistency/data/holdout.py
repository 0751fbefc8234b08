"""A held-out split of a user's data, by file: the same on every machine and run, whatever else is in the folder.

A file (an image of a folder, a .tar shard) or, where there are no files, a sample index is held out when a hash
of its name falls below the held-out fraction; adding or removing other files never moves it to the other side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from latent_consistency.errors import UserError

PARTS = ("train", "eval")


@dataclass(frozen=True)
class Holdout:
    """One side (`part`: "train" or "eval") of a held-out split of `fraction` of the files."""

    fraction: float
    part: str

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise UserError(f"the held-out fraction must be in (0, 1), got {self.fraction}")
        if self.part not in PARTS:
            raise ValueError(f"part {self.part!r} is not one of {PARTS}")

    def keeps(self, key: str) -> bool:
        """Whether the file or sample named `key` is on this side of the split. A file name that is not UTF-8 (os.walk's
        surrogate escapes) is hashed as its bytes on the disk; any other as its UTF-8, as always."""
        held_out = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64 < self.fraction
        return held_out == (self.part == "eval")

    def select(self, keys: list[str], what: str) -> list[int]:
        """The positions of `keys` on this side; an empty side is a user error."""
        kept = [i for i, key in enumerate(keys) if self.keeps(key)]
        if not kept:
            raise UserError(f"holding out {self.fraction:g} of {len(keys)} {what} leaves the {self.part} split empty; "
                            "give more data, another --eval-fraction, or --eval-data")
        return kept
