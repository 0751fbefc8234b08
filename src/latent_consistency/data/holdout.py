"""A held-out split of a user's data, by file: the same on every machine and run, whatever else is in the folder.

A file (an image of a folder, a .tar shard) or, where there are no files, a sample index is held out when a hash
of its name falls below the held-out fraction; adding or removing other files never moves it to the other side. A latent
cache's sample is held out by the name of the file, shard or item it was encoded from (its source key), as the data it
was written from holds it out: a cache of a folder holds out the folder's images, with all their captions.
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
        self.check_filled(len(kept), len(keys), what)
        return kept

    def split(self, keys: list[str], what: str) -> tuple[list[int], list[int]]:
        """The positions of `keys` on this side (`select`: an empty one is a user error) and on the other side (`other`,
        checked by whoever takes it: `check_filled`), each key hashed once: an image folder's training side keeps its
        held-out side (`ImageFolderDataset.take_other_side`), where opening the folder again for it walked it again."""
        sides: tuple[list[int], list[int]] = ([], [])
        for i, key in enumerate(keys):
            sides[not self.keeps(key)].append(i)
        self.check_filled(len(sides[0]), len(keys), what)
        return sides

    def other(self) -> Holdout:
        """The other side of the same split."""
        return Holdout(self.fraction, PARTS[1 - PARTS.index(self.part)])

    def check_filled(self, kept: int, total: int, what: str) -> None:
        """A UserError when this side keeps none (`kept`) of the `total` `what` ("images", "shards") split."""
        if not kept:
            raise UserError(f"holding out {self.fraction:g} of {total} {what} leaves the {self.part} split empty; "
                            "give more data, another --eval-fraction, or --eval-data")
