"""`shapes`: the toy world's procedural, compositionally captioned images.

An image shows one object on a plain background; its caption names five attributes, e.g.
"a large red star at the top left on a gray background". There are 5 shapes x 8 colours x 2 sizes
x 9 positions (a 3x3 grid) x 3 backgrounds. The object's colour never equals the background's (white
on white, black on black): colour is drawn uniformly, then the background uniformly among the other
ones, so a white or black object is on one of two backgrounds and any other colour on one of three.

Images are drawn at 4x the resolution and box-filtered down (anti-aliasing). Centre, radius and
rotation get a small jitter, well below the gap between grid cells and between the two sizes, so
every caption stays readable at 32 px and a large object at a corner cell stays inside the image.

Splits (item i depends only on (split, seed, i), so items are generated lazily):
- "train": the training distribution: every combination except the held-out (shape, colour) pairs.
- "reference": held-out real images of the same distribution, for FID and the judge's test.
- "prompts": a fixed list of evaluation prompts of the same distribution, with a real image each.
- "heldout": only the held-out (shape, colour) pairs of `HELDOUT_PAIRS`, which never occur in
  "train", "reference" or "prompts": a generalisation check of compositional prompts. Each shape and
  each colour still occurs in training, only not together.
- "judge": the full attribute space, held-out pairs included, for training the evaluation judge,
  which must read every prompt the generator is asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from latent_consistency.errors import UserError

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS = ("black", "gray", "white")
ATTRIBUTE_NAMES = ("shape", "color", "size", "position", "background")

HELDOUT_PAIRS = (
    ("circle", "green"),
    ("square", "purple"),
    ("triangle", "blue"),
    ("star", "orange"),
    ("ring", "red"),
)

RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

# Geometry in fractions of the image side. Grid-cell centres are 0.24 apart; jitter moves a centre by
# at most 0.015 and scales the radius by at most 6 %, so cells and sizes never overlap, and even a
# large object in a corner cell keeps more than a 32 px image's pixel of margin
# (0.26 - 0.015 - 0.17·1.06·_EXTENT > 1/32).
_CELL_CENTERS = (0.26, 0.5, 0.74)
_RADIUS = {"small": 0.11, "large": 0.17}
_POSITION_JITTER = 0.015
_RADIUS_JITTER = 0.06
_ROTATION_JITTER = math.radians(12)
_SUPERSAMPLE = 4

_POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_CAPTION_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(_POSITION_PHRASES.values())}) on a ({'|'.join(BACKGROUNDS)}) background"
)
_PHRASE_TO_POSITION = {phrase: position for position, phrase in _POSITION_PHRASES.items()}


@dataclass(frozen=True)
class ShapeAttributes:
    """What a `shapes` caption says; values are checked against the world's vocabulary."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for name, values in zip(ATTRIBUTE_NAMES, (SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)):
            if getattr(self, name) not in values:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(values)}")
        if self.color == self.background:
            raise UserError(
                f"a {self.color} object on a {self.background} background is invisible; pick another colour"
            )


def caption(a: ShapeAttributes) -> str:
    """The caption of `a`, e.g. "a large red star at the top left on a gray background"."""
    return f"a {a.size} {a.color} {a.shape} {_POSITION_PHRASES[a.position]} on a {a.background} background"


def parse_caption(text: str) -> ShapeAttributes:
    """The attributes a caption names; the inverse of `caption` (case and outer spaces ignored)."""
    match = _CAPTION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise UserError(
            f"cannot read the shapes caption {text!r}; write it like "
            f"'a large red star at the top left on a gray background'"
        )
    size, color, shape, phrase, background = match.groups()
    return ShapeAttributes(shape, color, size, _PHRASE_TO_POSITION[phrase], background)


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray towards +u crosses the boundary an odd number of times."""
    inside = np.zeros(u.shape, dtype=bool)
    for (u1, v1), (u2, v2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if v1 == v2:
            continue
        crosses = (v1 > v) != (v2 > v)
        inside ^= crosses & (u < u1 + (v - v1) * (u2 - u1) / (v2 - v1))
    return inside


def _regular_vertices(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


_UP = -math.pi / 2  # image rows grow downwards, so "up" is -v
_STAR = np.empty((10, 2))
_STAR[0::2] = _regular_vertices(5, 1.0, _UP)
_STAR[1::2] = _regular_vertices(5, 0.45, _UP + math.pi / 5)
_POLYGONS = {
    "square": _regular_vertices(4, 1.05, math.pi / 4),  # half side 0.74: about a circle's visual size
    "triangle": _regular_vertices(3, 1.0, _UP) + [0.0, 0.25],  # centred on its height, not its circumcentre
    "star": _STAR,
}
_EXTENT = 1.15  # every shape lies within this multiple of its radius, at any rotation


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v), in units of the object's radius, centred on the object."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    return _inside_polygon(u, v, _POLYGONS[shape])


def render(a: ShapeAttributes, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [H, W, 3] image of `a`: supersampled 4x inside the object's box, then box-filtered.

    Centre, radius and rotation are jittered by `rng` (see the module docstring for the bounds).
    """
    row, col = divmod(POSITIONS.index(a.position), 3)
    cx = _CELL_CENTERS[col] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
    cy = _CELL_CENTERS[row] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
    radius = _RADIUS[a.size] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER))
    angle = rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER)

    background = np.array(RGB[a.background], dtype=np.float32)
    image = np.broadcast_to(background, (resolution, resolution, 3)).copy()
    # Only the pixels of the object's bounding box are supersampled.
    reach = _EXTENT * radius * resolution
    x0, x1 = max(0, math.floor(cx * resolution - reach)), min(resolution, math.ceil(cx * resolution + reach))
    y0, y1 = max(0, math.floor(cy * resolution - reach)), min(resolution, math.ceil(cy * resolution + reach))
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    xs = ((np.arange(x0, x1)[:, None] + offsets).reshape(-1) / resolution - cx) / radius
    ys = ((np.arange(y0, y1)[:, None] + offsets).reshape(-1) / resolution - cy) / radius
    dx, dy = np.meshgrid(xs, ys)
    cos, sin = math.cos(angle), math.sin(angle)
    inside = _inside(a.shape, cos * dx + sin * dy, -sin * dx + cos * dy)
    coverage = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
    color = np.array(RGB[a.color], dtype=np.float32)
    box = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = box + coverage[..., None] * (color - box)
    return np.rint(image).astype(np.uint8)


SPLITS = ("train", "reference", "prompts", "heldout", "judge")
DEFAULT_SIZES = {"train": 50_000, "reference": 2_000, "prompts": 64, "heldout": 256, "judge": 10_000_000}
_HELDOUT_SET = frozenset(HELDOUT_PAIRS)
_TRAIN_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS if (s, c) not in _HELDOUT_SET)
_ALL_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS)
_PAIRS = {"train": _TRAIN_PAIRS, "reference": _TRAIN_PAIRS, "prompts": _TRAIN_PAIRS,
          "heldout": HELDOUT_PAIRS, "judge": _ALL_PAIRS}  # fmt: skip


def sample_attributes(split: str, rng: np.random.Generator) -> ShapeAttributes:
    """Attributes of one item of `split`: a (shape, colour) pair of the split, the rest uniform."""
    pairs = _PAIRS[split]
    shape, color = pairs[rng.integers(len(pairs))]
    backgrounds = [b for b in BACKGROUNDS if b != color]
    return ShapeAttributes(
        shape=shape,
        color=color,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=backgrounds[rng.integers(len(backgrounds))],
    )


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """Items {"image": [3, H, W] in [-1, 1], "caption": str, "attributes": ShapeAttributes}.

    Item i is drawn from a generator seeded by (seed, split, i) alone: the same item at every call,
    in any order, in any worker process.
    """

    def __init__(self, split: str, resolution: int = 32, size: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"unknown shapes split {split!r}; use one of {', '.join(SPLITS)}")
        if resolution < 8:
            raise UserError(f"shapes resolution {resolution} is too small; use 32 or 64")
        if size is not None and size < 1:
            raise UserError(f"shapes dataset size must be at least 1, got {size}")
        self.split, self.resolution, self.seed = split, resolution, seed
        self.size = DEFAULT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"item {i} of a shapes dataset of {self.size}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        attributes = sample_attributes(self.split, rng)
        image = render(attributes, self.resolution, rng)
        return {"image": to_tensor(image), "caption": caption(attributes), "attributes": attributes}
