"""Sample grids' column captions (`grids.wrap_caption`): lines that fit the column, words kept whole where they fit."""

from latent_consistency.grids import wrap_caption


def test_captions_break_between_words_and_a_word_longer_than_the_column_with_a_hyphen():
    assert wrap_caption("a handwritten digit three", 10) == ["a", "handwritt-", "en digit", "three"]
    assert wrap_caption("a red star at the top", 10) == ["a red star", "at the top"]
    assert all(len(line) <= 4 for line in wrap_caption("extraordinarily long", 4))
    assert "".join(wrap_caption("abcdefghij", 4)).replace("-", "") == "abcdefghij"
