from collections import Counter

import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.world.datasets import attribute_values, get_dataset, parse_caption
from latent_consistency.world.digits import (
    DIGIT_WORDS,
    DigitAttributes,
    DigitsDataset,
    digit_caption,
    parse_digit_caption,
)


def test_split_is_ninety_ten_stratified_and_fixed_by_seed():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 180
    per_digit_test = Counter(int(d) for d in test.digits)
    per_digit_all = per_digit_test + Counter(int(d) for d in train.digits)
    for digit in range(10):
        assert abs(per_digit_test[digit] - 0.1 * per_digit_all[digit]) <= 1
    # No scan is in both splits.
    flat_train = {tuple(x.flatten().tolist()) for x in DigitsDataset("train", resolution=8).images}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in DigitsDataset("test", resolution=8).images)
    assert torch.equal(DigitsDataset("test", seed=0).images, test.images)
    assert not torch.equal(DigitsDataset("test", seed=1).images, test.images)


@pytest.mark.parametrize("resolution", [32, 64])
def test_items_are_rgb_light_ink_on_dark(resolution):
    data = get_dataset("digits", "test", resolution=resolution)
    item = data[3]
    image = item["image"]
    assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert image.median() < -0.5 and image.max() > 0.5  # mostly dark paper, light ink
    assert parse_caption("digits", item["caption"]) == item["attributes"]


def test_caption_round_trip_for_every_digit():
    assert attribute_values("digits", "digit") == tuple(range(10))
    for digit, word in enumerate(DIGIT_WORDS):
        a = DigitAttributes(digit)
        assert digit_caption(a) == f"a handwritten digit {word}"
        assert parse_digit_caption(digit_caption(a)) == a
    with pytest.raises(UserError, match="cannot read"):
        parse_digit_caption("a handwritten digit ten")
    with pytest.raises(UserError, match="0-9"):
        DigitAttributes(12)


def test_size_and_bad_requests():
    assert len(get_dataset("digits", "train", size=50)) == 50
    with pytest.raises(UserError, match="180 images"):
        get_dataset("digits", "test", size=500)
    with pytest.raises(UserError, match="unknown digits split"):
        DigitsDataset("heldout")
