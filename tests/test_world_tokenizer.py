"""The world's CLIP BPE tokenizer: trained on captions, saved, loaded by transformers' CLIPTokenizer."""

import pytest
from transformers import CLIPTokenizer

from latent_consistency.errors import UserError
from latent_consistency.world.datasets import get_dataset
from latent_consistency.world.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def captions():
    data = get_dataset("shapes", "train", size=200)
    return [data[i]["caption"] for i in range(len(data))]


def test_tokenizer_trains_saves_and_loads_as_clip_tokenizer(tmp_path, captions):
    tokenizer = train_tokenizer(captions, vocab_size=700, max_length=20)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path))

    assert len(loaded) == len(tokenizer) <= 700
    assert loaded.model_max_length == 20
    caption = captions[0]
    ids = loaded(caption).input_ids
    assert ids == tokenizer(caption).input_ids
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    # BPE learnt whole words of the captions: one token per word.
    assert len(ids) == len(caption.split()) + 2
    assert loaded.decode(ids, skip_special_tokens=True) == caption
    padded = loaded([caption, ""], padding="max_length", max_length=loaded.model_max_length).input_ids
    assert [len(p) for p in padded] == [20, 20]


def test_unseen_text_still_tokenizes_byte_by_byte(captions):
    tokenizer = train_tokenizer(captions, vocab_size=700, max_length=20)
    assert tokenizer.decode(tokenizer("A Zebra, 42!").input_ids, skip_special_tokens=True) == "a zebra , 4 2 !"


def test_too_small_vocabulary_is_a_user_error(captions):
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(captions, vocab_size=100, max_length=20)
