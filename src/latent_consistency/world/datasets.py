"""The toy world's datasets by name: `shapes` (procedural, compositional) and `digits` (real scans)."""

from __future__ import annotations

import torch

from latent_consistency.errors import UserError
from latent_consistency.world import digits, shapes

DATASETS = ("shapes", "digits")
RESOLUTIONS = (32, 64)
# The split of held-out real images that generated images are compared with (FID, judge accuracy).
REFERENCE_SPLITS = {"shapes": "reference", "digits": "test"}
SPLITS = {"shapes": shapes.SPLITS, "digits": digits.SPLITS}

_ATTRIBUTE_VALUES = {
    "shapes": dict(
        zip(shapes.ATTRIBUTE_NAMES, (shapes.SHAPES, shapes.COLORS, shapes.SIZES, shapes.POSITIONS, shapes.BACKGROUNDS))
    ),
    "digits": {"digit": tuple(range(10))},
}


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    return name


def check_resolution(resolution: int, size_from: str | None = None) -> None:
    """A UserError unless the world's datasets come at `resolution` px. `size_from` says where that size came from when the
    user did not give it ("the native size of --model M"): `lcm cache --data world:shapes` with a 16 px model was refused
    as "resolution 16 is not supported", a number that the command line held nowhere."""
    if resolution in RESOLUTIONS:
        return
    if size_from is None:
        raise UserError(f"resolution {resolution} is not supported; use one of {', '.join(map(str, RESOLUTIONS))}")
    sizes = " or ".join(map(str, RESOLUTIONS))
    raise UserError(f"the world's datasets come at {sizes} px, not at {resolution} px, {size_from}; use a model made for {sizes} px images")


def get_dataset(
    name: str, split: str, resolution: int = 32, seed: int = 0, size: int | None = None, size_from: str | None = None
) -> torch.utils.data.Dataset:
    """The `split` of dataset `name` at `resolution` px; items {"image", "caption", "attributes"}. `size_from`: where
    `resolution` came from, for its refusal (`check_resolution`)."""
    check_dataset(name)
    if split not in SPLITS[name]:
        raise UserError(f"unknown {name} split {split!r}; use one of {', '.join(SPLITS[name])}")
    check_resolution(resolution, size_from)
    if name == "shapes":
        return shapes.ShapesDataset(split, resolution=resolution, size=size, seed=seed)
    return digits.DigitsDataset(split, resolution=resolution, seed=seed, size=size)


def attribute_names(name: str) -> tuple[str, ...]:
    """The attributes a caption of dataset `name` names, in caption order."""
    return tuple(_ATTRIBUTE_VALUES[check_dataset(name)])


def attribute_values(name: str, attribute: str) -> tuple:
    """The values `attribute` takes in dataset `name`; a judge's class i is value i."""
    values = _ATTRIBUTE_VALUES[check_dataset(name)]
    if attribute not in values:
        raise UserError(f"dataset {name} has no attribute {attribute!r}; use one of {', '.join(values)}")
    return values[attribute]


def caption(name: str, attributes: shapes.ShapeAttributes | digits.DigitAttributes) -> str:
    """The caption of dataset `name` that names `attributes`."""
    if check_dataset(name) == "shapes":
        return shapes.caption(attributes)
    return digits.digit_caption(attributes)


def parse_caption(name: str, text: str) -> shapes.ShapeAttributes | digits.DigitAttributes:
    """The attributes named by caption `text` of dataset `name`."""
    if check_dataset(name) == "shapes":
        return shapes.parse_caption(text)
    return digits.parse_digit_caption(text)
