"""A CLIP-style byte-level BPE tokenizer trained on the world's captions.

The pipeline is CLIP's (Radford et al. 2021), as transformers' `CLIPTokenizer` runs it: NFC, collapsed
whitespace and lower case; words split by CLIP's pattern; bytes mapped to printable symbols; the last
symbol of each word marked with "</w>". Only the merges are learnt here (`tokenizers`' BPE trainer);
the vocabulary is laid out as CLIP's is: the byte symbols, the same with "</w>", one entry per merge,
then <|startoftext|> and <|endoftext|>. The result is a plain `CLIPTokenizer`, saved by
`save_pretrained`, which `CLIPTokenizer.from_pretrained` and diffusers' pipelines load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from latent_consistency.errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_END_OF_WORD = "</w>"
# CLIP's word pattern, as in transformers' CLIPTokenizer.
_CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_symbols() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def train_tokenizer(captions: Iterable[str], vocab_size: int, max_length: int):
    """Learn BPE merges from `captions`; returns a `CLIPTokenizer` with `model_max_length = max_length`."""
    from transformers import CLIPTokenizer

    base = 2 * len(_byte_symbols()) + 2
    if vocab_size <= base:
        raise UserError(f"tokenizer vocab_size must exceed the {base} byte and special symbols, got {vocab_size}")
    if max_length < 3:
        raise UserError(f"tokenizer max_length must hold <|startoftext|>, a word and <|endoftext|>, got {max_length}")
    bpe = Tokenizer(BPE(end_of_word_suffix=_END_OF_WORD, unk_token=EOS))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - base + len(_byte_symbols()),  # the trainer counts the bare alphabet only
        initial_alphabet=_byte_symbols(),
        end_of_word_suffix=_END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = _byte_symbols()
    tokens = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
