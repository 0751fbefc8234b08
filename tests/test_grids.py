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

    from latent_consistency.grids import image_grid

    grid = image_grid([torch.ones(1, 3, 64, 64)], ["行 ☕"], scale=1, column_labels=["a ☕ on a table", "一只猫"])
    assert (np.asarray(grid.convert("L"))[:13] < 128).any()


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


def _caption_ink(label: str):
    """The caption strip of a one-column grid captioned `label`, as a boolean ink mask."""
    import numpy as np
    import torch

    from latent_consistency.grids import image_grid

    grid = image_grid([torch.ones(1, 3, 96, 96)], ["x"], scale=1, label_width=10, column_labels=[label])
    return np.asarray(grid.convert("L"))[: grid.height - 96, 10:] < 128


def test_captions_outside_latin1_are_drawn_as_letters_not_boxes():
    """PIL's default FreeType font (Aileron) has Latin only: "кот" and "дом" came out as the same three boxes. They
    are drawn in a font that has them (DejaVu Sans ships with matplotlib), so two different words look different."""
    import numpy as np

    cat, house = _caption_ink("кот"), _caption_ink("дом")
    assert cat.any() and house.any()
    assert not np.array_equal(cat, house)
    assert not np.array_equal(_caption_ink("ω = 3"), _caption_ink("ψ = 3"))


def test_cjk_captions_use_an_installed_cjk_font():
    """Where a CJK font is installed (not on every machine: skipped without one), "猫" and "犬" are drawn in it, not
    as matplotlib's Last Resort boxes (which look alike for two characters of one block)."""
    import numpy as np
    import pytest

    from latent_consistency import fonts

    found = fonts.font_for("猫")
    if found is None or found[0].startswith("Last Resort"):
        pytest.skip("no CJK font installed")
    assert not np.array_equal(_caption_ink("猫"), _caption_ink("犬"))
    assert fonts.families_for(["一只猫 x"])[:2] == [fonts.PRIMARY, found[0]]


def test_wide_characters_wrap_by_their_width_and_break_without_a_hyphen():
    """A CJK character is two columns wide: a caption without spaces breaks between any two characters, without a
    hyphen (it used to be cut by character count, twice the column's width, with hyphens inside words)."""
    from latent_consistency.grids import text_units, wrap_caption

    assert wrap_caption("一只猫坐在桌子上", 6) == ["一只猫", "坐在桌", "子上"]
    assert wrap_caption("a 猫猫猫猫 b", 6) == ["a", "猫猫猫", "猫 b"]
    assert all(text_units(line) <= 5 for line in wrap_caption("猫" * 9 + " a cat sat", 5))
    assert wrap_caption("a handwritten digit three", 10) == ["a", "handwritt-", "en digit", "three"]  # Latin unchanged


def test_plot_fonts_change_only_for_text_dejavu_lacks():
    """`fonts.for_texts`: matplotlib's settings are left alone for text DejaVu Sans has (plots unchanged byte for
    byte), and get a fallback family for the rest."""
    import contextlib

    from latent_consistency import fonts

    assert fonts.families_for(["ddim-k20", "кот ω ☕"]) == [fonts.PRIMARY]
    assert isinstance(fonts.for_texts(["ddim-k20"]), contextlib.nullcontext)
    assert len(fonts.families_for(["猫"])) == 2  # a CJK font, or matplotlib's Last Resort
