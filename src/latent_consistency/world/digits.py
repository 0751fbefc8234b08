"""`digits`: real handwriting, scikit-learn's bundled `load_digits` (1,797 8x8 scans, no download).

Images are upscaled bicubically from 8x8 and clipped to the scan's range, grey is replicated to RGB,
and ink is light on a dark background, as in the scans (0 = paper -> -1, 16 = ink -> +1).
Captions read "a handwritten digit seven". The "train" (90 %) / "test" (10 %) split is stratified by
digit and fixed by the seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latent_consistency.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")
TEST_FRACTION = 0.1
_CAPTION_RE = re.compile(rf"a handwritten digit ({'|'.join(DIGIT_WORDS)})")


@dataclass(frozen=True)
class DigitAttributes:
    """What a `digits` caption says: the digit, 0-9."""

    digit: int

    def __post_init__(self):
        if self.digit not in range(10):
            raise UserError(f"digit {self.digit!r} is not one of 0-9")


def digit_caption(a: DigitAttributes) -> str:
    """The caption of `a`, e.g. "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[a.digit]}"


def parse_digit_caption(text: str) -> DigitAttributes:
    """The digit a caption names; the inverse of `digit_caption` (case and outer spaces ignored)."""
    match = _CAPTION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise UserError(f"cannot read the digits caption {text!r}; write it like 'a handwritten digit seven'")
    return DigitAttributes(DIGIT_WORDS.index(match.group(1)))


class DigitsDataset(torch.utils.data.Dataset):
    """Items {"image": [3, H, W] in [-1, 1], "caption": str, "attributes": DigitAttributes}.

    `size` keeps the first `size` items of the split (all of it by default).
    """

    def __init__(self, split: str, resolution: int = 32, seed: int = 0, size: int | None = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in SPLITS:
            raise UserError(f"unknown digits split {split!r}; use one of {', '.join(SPLITS)}")
        if resolution < 8:
            raise UserError(f"digits resolution {resolution} is below the scans' 8 px; use 32 or 64")
        scans = load_digits()
        index = torch.arange(len(scans.target))
        train, test = train_test_split(
            index.numpy(), test_size=TEST_FRACTION, stratify=scans.target, random_state=seed
        )
        keep = torch.from_numpy(train if split == "train" else test)
        if size is not None and not 1 <= size <= len(keep):
            raise UserError(f"digits {split} split has {len(keep)} images; ask for 1 to {len(keep)}, got {size}")
        keep = keep[:size]
        pixels = torch.from_numpy(scans.images).float()[keep, None]  # [N, 1, 8, 8], 0..16
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bicubic", align_corners=False)
        self.images = pixels.clamp(0, 16).div(8).sub(1)
        self.digits = torch.from_numpy(scans.target)[keep]
        self.split, self.resolution, self.seed = split, resolution, seed

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> dict:
        attributes = DigitAttributes(int(self.digits[i]))
        return {
            "image": self.images[i].repeat(3, 1, 1),
            "caption": digit_caption(attributes),
            "attributes": attributes,
        }
