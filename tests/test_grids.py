"""Sample grids' column captions (`grids.wrap_caption`): lines that fit the column, words kept whole where they fit."""

from latent_consistency.grids import wrap_caption


def test_captions_break_between_words_and_a_word_longer_than_the_column_with_a_hyphen():
    assert wrap_caption("a handwritten digit three", 10) == ["a", "handwritt-", "en digit", "three"]
    assert wrap_caption("a red star at the top", 10) == ["a red star", "at the top"]
    assert all(len(line) <= 4 for line in wrap_caption("extraordinarily long", 4))
    assert "".join(wrap_caption("abcdefghij", 4)).replace("-", "") == "abcdefghij"


def test_words_of_a_drawn_caption_stay_apart_and_a_long_row_label_stays_left_of_the_images():
    """Pillow >= 10.1 drew the labels in a FreeType font whose space after a "t" is a pixel wide ("digitsix" in the demo's
    digits grid) and narrower than the wrapping counts; the grid draws in PIL's bitmap font, every character 6 px."""
    import numpy as np
    import torch

    from latent_consistency.grids import CHAR_WIDTH, image_grid

    white = torch.ones(1, 3, 64, 64)  # 10 characters wide: "digit six" on one line
    grid = np.asarray(image_grid([white], ["x"], scale=1, label_width=4, column_labels=["digit six"]).convert("L"))
    ink = (grid[:13, 4:] < 128).any(axis=0)  # the caption line: which pixel columns right of the row label hold text
    start = int(np.argmax(ink))
    assert not ink[start + 5 * CHAR_WIDTH: start + 6 * CHAR_WIDTH].any()  # the space's 6 px column, between "digit" and "six"
    assert ink[start + 6 * CHAR_WIDTH: start + 9 * CHAR_WIDTH].any()

    label = "a row label of forty-two characters, long"
    dark = torch.full((1, 3, 8, 8), -1.0)
    grid = np.asarray(image_grid([dark], [label], scale=1, label_width=10).convert("L"))
    assert grid.shape[1] >= CHAR_WIDTH * len(label) + 8  # the images start after the label
    assert (grid[:, -8:] == 0).all() and (grid[:, : CHAR_WIDTH * len(label)] > 0).any()


def test_a_caption_outside_latin1_is_drawn():
    """PIL's bitmap font has Latin-1 only: a caption with "☕" or Chinese raised UnicodeEncodeError from the grid (the
    first fix's, caught by the tests of users' own data); such a line is drawn in the FreeType font where there is one."""
    import numpy as np
    import torch

    from latent_consistency.grids import drawable, image_grid

    grid = image_grid([torch.ones(1, 3, 64, 64)], ["行 ☕"], scale=1, column_labels=["a ☕ on a table", "一只猫"])
    assert (np.asarray(grid.convert("L"))[:13] < 128).any()
    assert drawable("digit six")[0] == "digit six"


def test_neighbouring_columns_captions_do_not_run_together():
    """A line as wide as its column ("black background" over 96 px, 16 bitmap characters) ran into the next column's
    ("black backgroundblack background" in the demo's grid.png): a line now ends short of the column's edge."""
    import numpy as np
    import torch

    from latent_consistency.grids import image_grid

    grid = image_grid([torch.ones(2, 3, 96, 96)], ["x"], scale=1, label_width=10, column_labels=["black background"] * 2)
    left = grid.width - 2 * 96  # the first column's left edge
    ink = (np.asarray(grid.convert("L"))[: 4 * 11] < 128).any(axis=0)
    assert not ink[left + 96 - 2: left + 96 + 2].any()  # blank either side of the edge between the two columns
