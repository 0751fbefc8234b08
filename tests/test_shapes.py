import itertools

import numpy as np
import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.world.datasets import DATASETS, attribute_names, attribute_values, get_dataset, parse_caption
from latent_consistency.world.shapes import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    RGB,
    SHAPES,
    SIZES,
    ShapeAttributes,
    ShapesDataset,
    caption,
    render,
)

ALL_VALID = [
    ShapeAttributes(*values)
    for values in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)
    if values[1] != values[4]
]


def test_vocabulary_is_compositional():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and len(SIZES) == 2 and len(POSITIONS) == 9
    assert attribute_names("shapes") == ATTRIBUTE_NAMES
    assert attribute_values("shapes", "color") == COLORS
    assert len(ALL_VALID) == len(SHAPES) * len(SIZES) * len(POSITIONS) * (len(COLORS) * len(BACKGROUNDS) - 2)


def test_caption_round_trip_for_every_combination():
    captions = {caption(a) for a in ALL_VALID}
    assert len(captions) == len(ALL_VALID)
    for a in ALL_VALID:
        assert parse_caption("shapes", caption(a)) == a
    a = ShapeAttributes("star", "red", "large", "top left", "gray")
    assert caption(a) == "a large red star at the top left on a gray background"
    assert parse_caption("shapes", "  A Large RED star at the top left on a gray background ") == a


@pytest.mark.parametrize(
    "text",
    [
        "a large red hexagon at the top on a gray background",
        "a red star",
        "",
        "a large red star at the top on a gray background!",
    ],
)
def test_unparsable_caption_is_a_user_error(text):
    with pytest.raises(UserError, match="cannot read"):
        parse_caption("shapes", text)


def test_invalid_attributes_are_user_errors():
    with pytest.raises(UserError, match="unknown shape"):
        ShapeAttributes("hexagon", "red", "large", "top", "gray")
    with pytest.raises(UserError, match="invisible"):
        ShapeAttributes("star", "white", "large", "top", "white")
    with pytest.raises(UserError, match="invisible"):
        parse_caption("shapes", "a small black ring in the center on a black background")


def test_items_are_deterministic_and_lazy():
    a, b = ShapesDataset("train", seed=3), ShapesDataset("train", seed=3, size=20)
    for i in (19, 0, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert not torch.equal(a[0]["image"], ShapesDataset("train", seed=4)[0]["image"])
    assert not torch.equal(a[0]["image"], ShapesDataset("reference", seed=3)[0]["image"])
    # The same item at 64 px shows the same caption.
    assert ShapesDataset("train", resolution=64, seed=3)[5]["caption"] == a[5]["caption"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_images_in_range_and_shape(resolution):
    data = get_dataset("shapes", "train", resolution=resolution)
    for i in range(20):
        item = data[i]
        image = item["image"]
        assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
        assert image.min() >= -1 and image.max() <= 1
        assert parse_caption("shapes", item["caption"]) == item["attributes"]
        # Background colour fills the corners' opposite; object colour is present.
        rgb = ((image + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
        assert (rgb == torch.tensor(RGB[item["attributes"].color], dtype=torch.float32)).all(1).any()


@pytest.mark.parametrize("resolution", [32, 64])
def test_every_object_stays_inside_and_in_its_cell(resolution):
    """Border pixels are pure background and the object's centroid lies in its 3x3 grid cell."""
    rng = np.random.default_rng(0)
    for shape, size, position in itertools.product(SHAPES, SIZES, POSITIONS):
        a = ShapeAttributes(shape, "red", size, position, "white")
        for _ in range(3):
            image = render(a, resolution, rng)
            assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 3)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            assert (border == RGB["white"]).all(), (a, "touches the border")
            ink = 1 - image[..., 1].astype(float) / RGB["white"][1]  # green channel: 245 paper, 40 ink
            ys, xs = np.mgrid[:resolution, :resolution] + 0.5
            cy, cx = (ink * ys).sum() / ink.sum(), (ink * xs).sum() / ink.sum()
            row, col = divmod(POSITIONS.index(position), 3)
            assert int(3 * cy / resolution) == row and int(3 * cx / resolution) == col, a


def test_colour_never_equals_background():
    data = ShapesDataset("judge", size=400)
    colours = [(data[i]["attributes"].color, data[i]["attributes"].background) for i in range(400)]
    assert all(c != b for c, b in colours)
    assert {b for c, b in colours if c == "white"} == {"black", "gray"}


def test_heldout_pairs_never_appear_in_training_splits():
    heldout = set(HELDOUT_PAIRS)
    assert len({s for s, _ in heldout}) == len(heldout)  # each shape loses one colour only
    for split in ("train", "reference", "prompts"):
        data = get_dataset("shapes", split, size=300)
        pairs = {(data[i]["attributes"].shape, data[i]["attributes"].color) for i in range(len(data))}
        assert not pairs & heldout, split
    held = get_dataset("shapes", "heldout")
    pairs = {(held[i]["attributes"].shape, held[i]["attributes"].color) for i in range(len(held))}
    assert pairs == heldout
    judge = ShapesDataset("judge", size=2000)
    assert heldout <= {(judge[i]["attributes"].shape, judge[i]["attributes"].color) for i in range(2000)}


def test_default_sizes():
    assert len(get_dataset("shapes", "train")) == 50_000
    assert len(get_dataset("shapes", "reference")) == 2_000
    assert len(get_dataset("shapes", "prompts")) == 64
    assert len(get_dataset("shapes", "train", size=10)) == 10
    with pytest.raises(IndexError):
        get_dataset("shapes", "prompts")[64]


@pytest.mark.parametrize(
    "name, split, resolution, match",
    [
        ("cifar", "train", 32, "unknown dataset"),
        ("shapes", "validation", 32, "unknown shapes split"),
        ("shapes", "train", 48, "resolution 48"),
        ("digits", "reference", 32, "unknown digits split"),
    ],
)
def test_bad_dataset_requests_are_user_errors(name, split, resolution, match):
    with pytest.raises(UserError, match=match):
        get_dataset(name, split, resolution=resolution)
    assert DATASETS == ("shapes", "digits")


def test_bad_size_and_attribute_are_user_errors():
    with pytest.raises(UserError, match="at least 1"):
        get_dataset("shapes", "train", size=0)
    with pytest.raises(UserError, match="no attribute"):
        attribute_values("shapes", "texture")


def test_polygons_lie_within_the_rendered_box():
    from latent_consistency.world.shapes import _EXTENT, _POLYGONS

    for vertices in _POLYGONS.values():
        assert np.hypot(vertices[:, 0], vertices[:, 1]).max() <= _EXTENT
