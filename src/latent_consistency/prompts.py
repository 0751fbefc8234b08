"""Prompt encoders: the condition c (and the unconditional ∅ of Eq. 12) as the model's own diffusers pipeline makes it.

- `CLIPPromptEncoder`: Stable Diffusion 1.x/2.x, one CLIP text encoder, its last hidden state.
- `SDXLPromptEncoder`: the SDXL family (SDXL, SSD-1B, Vega): two CLIP text encoders' penultimate hidden states side by
  side, the second one's pooled projection and the size micro-conditioning, packed into c by
  `conditioning.AddedConditioning`; ∅ is zeros where the pipeline's `force_zeros_for_empty_prompt` says so.
- `T5PromptEncoder`: PixArt-α, one T5 encoder's last hidden state with its attention mask (and a 1024-px model's
  resolution and aspect ratio), packed into c by `conditioning.PixArtConditioning`; ∅ is the empty prompt's encoding.

All return c for `prompts` (a list of one or more: `check_batch`) as one tensor [B, L', D] that every solver, loss,
sampler and the latent cache handle alike. `PromptCache` keeps the c of prompts a sampler has seen, so that the text
encoder runs once per distinct prompt.

Prompts from a user pass `check_prompt` (command line), `check_prompts` (a list from Python: a str would be one prompt
per character) or `read_prompt_file` (a text file, `#` lines comments): text that is not UTF-8 is one line naming the
input, not a tokenizer's TypeError; a file's byte-order mark is not part of its first prompt.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from latent_consistency.conditioning import AddedConditioning, PixArtConditioning, time_ids
from latent_consistency.errors import UserError


def utf8_error(text: str) -> str | None:
    """Where `text` is not UTF-8, e.g. "byte 0xff at character 7": a lone surrogate, which a byte that was not UTF-8
    becomes in Python's command-line arguments (surrogateescape) and a JSON escape such as "\\ud800" makes, and which no
    tokenizer takes; None for text that is UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at character {err.start + 1}"
    return None


def check_prompts(prompts, what: str = "prompts") -> None:
    """A list of strings: a str is a sequence of characters, which would make one image per character. Each is UTF-8
    text (`utf8_error`): a lone surrogate, which no tokenizer takes, is refused naming the prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{what} must be a list of strings, e.g. ['a red star'], got {prompts!r:.80}")
    for i, prompt in enumerate(prompts):
        problem = utf8_error(prompt)
        if problem is not None:
            raise UserError(f"{what}[{i}] is not UTF-8 text ({problem}); give prompts as text that encodes to UTF-8")


def check_batch(prompts) -> None:
    """What a prompt encoder's `encode` takes: a list of one string or more (`check_prompts`), one row of c each."""
    check_prompts(prompts)
    if not prompts:
        raise UserError("prompts is empty; give at least one prompt")


def check_prompt(text: str, source: str) -> str:
    """`text`, a prompt from the user; a UserError naming `source` (e.g. "--negative-prompt") if it is not UTF-8."""
    problem = utf8_error(text)
    if problem is not None:
        raise UserError(f"{source} is not UTF-8 text ({problem}); give prompts in UTF-8 (check the terminal's or file's encoding)")
    return text


# A prompt file's line whose first non-blank character is this is a comment, not a prompt
COMMENT = "#"


def read_prompt_file(name: str) -> list[str]:
    """The prompts of text file `name` ('-': standard input), one per line: UTF-8 with or without a byte-order mark,
    each line stripped; blank lines and comment lines (first non-blank character `#`) are ignored. A missing, unreadable
    or non-UTF-8 file, or one with no prompt left, is a UserError. The one reader of prompt files: `lcm generate
    --prompt-file` and `lcm evaluate --prompts FILE.txt`."""
    path = Path(name)
    if name != "-" and not path.exists():
        raise UserError(f"prompt file {name} does not exist")
    if name != "-" and path.is_dir():
        raise UserError(f"prompt file {name} is a folder; give a text file with one prompt per line")
    try:  # a regular file, or a pipe such as <(...)
        data = sys.stdin.buffer.read() if name == "-" else path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read prompt file {name}: {err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_number = err.object[:err.start].count(b"\n") + 1
        raise UserError(f"prompt file {name} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line_number}); "
                        "save it as UTF-8") from None
    lines = re.split(r"\r\n|\r|\n", text)  # not str.splitlines: a U+2028, form feed or NEL inside a line would make it several prompts
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith(COMMENT)]
    if not prompts:
        raise UserError(f"prompt file {name} holds no prompts (blank and {COMMENT} comment lines are skipped); write one prompt per line")
    return prompts


def truncated_prompts(encoder, prompts: list[str]) -> list[tuple[int, int, int]]:
    """(index, tokens, the most the text encoder reads) of each of `prompts` that `encoder` truncates: its tokens past the
    tokenizer's max length (CLIP: 77, special tokens included; PixArt-α's T5: 120) are dropped, as diffusers drops them."""
    if isinstance(encoder, T5PromptEncoder):
        limits = [(encoder.tokenizer, encoder.max_sequence_length)]
        prompts = [p.lower().strip() for p in prompts]
    else:
        tokenizers = [encoder.tokenizer] if isinstance(encoder, CLIPPromptEncoder) else [pair[0] for pair in encoder.pairs]
        limits = [(tokenizer, tokenizer.model_max_length) for tokenizer in tokenizers]
    long = {}
    for tokenizer, limit in limits:
        for i, ids in enumerate(tokenizer(list(prompts), truncation=False).input_ids):
            if len(ids) > limit:
                long[i] = (i, len(ids), min(limit, long.get(i, (0, 0, limit))[2]))
    return sorted(long.values())


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Text embeddings c as Stable Diffusion computes them: pad to max_length, last hidden state."""
    device = device if device is not None else _device_of(text_encoder)
    return text_encoder(_tokens(tokenizer, prompts).to(device))[0]


class CLIPPromptEncoder:
    """Stable Diffusion 1.x/2.x's c (`encode_prompts`); ∅ is the empty prompt's embedding."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def encode(self, prompts: list[str], device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """c for `prompts`, [B, L, D]; `size` does not enter a Stable Diffusion 1.x/2.x condition."""
        check_batch(prompts)
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, device)

    def uncond(self, device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """∅, [1, L, D]."""
        return self.encode([""], device)


class SDXLPromptEncoder:
    """The SDXL family's c, as `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` make it.

    Tokens: each (tokenizer, text encoder) pair's penultimate hidden state, concatenated along the feature axis; pooled:
    the last encoder's projected embedding (a `CLIPTextModelWithProjection`); micro-conditioning: original size = target
    size = `size` (height, width), crop (0, 0), as the pipeline's defaults for an image of that size. `default_size` is the
    UNet's native size.
    """

    def __init__(self, pairs: list[tuple], added: AddedConditioning, default_size: tuple[int, int], force_zeros_for_empty_prompt: bool):
        self.pairs, self.added, self.default_size = pairs, added, default_size
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode(self, prompts: list[str], device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """c for `prompts`: [B, L + 1, D], the L tokens and the packed row of pooled embedding and time ids."""
        check_batch(prompts)
        device = device if device is not None else _device_of(self.pairs[-1][1])
        hidden, pooled = [], None
        for tokenizer, text_encoder in self.pairs:
            out = text_encoder(_tokens(tokenizer, prompts).to(device), output_hidden_states=True)
            pooled = out[0] if out[0].ndim == 2 else pooled
            hidden.append(out.hidden_states[-2])
        tokens = torch.cat(hidden, dim=-1)
        if pooled is None:
            raise ValueError("no text encoder gives a pooled embedding: the last one must be a CLIPTextModelWithProjection")
        return self.added.pack(tokens, pooled.to(tokens), self._time_ids(len(prompts), size).to(tokens))

    def uncond(self, device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """∅, [1, L + 1, D]: zero tokens and pooled embedding (with this size's time ids) when the pipeline forces zeros for
        an empty negative prompt (SDXL's default), else the empty prompt's encoding."""
        if not self.force_zeros_for_empty_prompt:
            return self.encode([""], device, size)
        c = self.encode([""], device, size)
        tokens, added = self.added.unpack(c)
        return self.added.pack(torch.zeros_like(tokens), torch.zeros_like(added["text_embeds"]), added["time_ids"])

    def _time_ids(self, n: int, size: tuple[int, int] | None) -> torch.Tensor:
        size = tuple(size or self.default_size)
        return torch.tensor([time_ids(size, (0, 0), size)], dtype=torch.float32).expand(n, -1)


class T5PromptEncoder:
    """PixArt-α's c, as `PixArtAlphaPipeline.encode_prompt` makes it with `clean_caption=False` (the caption cleaning
    needs bs4 and ftfy, and is not done here): the prompt lower-cased and stripped, padded to `max_sequence_length` (the
    pipeline's 120) tokens, the T5 encoder's last hidden state under the attention mask, in the encoder's dtype; the
    mask and (for a 1024-px transformer) the images' size `conditioning.PixArtConditioning` packs with it.
    `default_size` is the transformer's native size."""

    def __init__(self, tokenizer, text_encoder, conditioning: PixArtConditioning, default_size: tuple[int, int],
                 max_sequence_length: int = 120):
        self.tokenizer, self.text_encoder, self.conditioning = tokenizer, text_encoder, conditioning
        self.default_size, self.max_sequence_length = default_size, max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str], device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """c for `prompts`: [B, L (+ 1), D + 1], the L tokens with their mask (and the row of size conditions)."""
        check_batch(prompts)
        device = device if device is not None else _device_of(self.text_encoder)
        inputs = self.tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = inputs.attention_mask.to(device)
        tokens = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0].to(self.text_encoder.dtype)
        return self.conditioning.pack(tokens, mask, tuple(size or self.default_size))

    def uncond(self, device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """∅, [1, L (+ 1), D + 1]: the empty prompt's encoding, PixArt-α's negative prompt by default."""
        return self.encode([""], device, size)


class PromptCache:
    """c per (prompt, image size, device), the least recently used dropped past `capacity` prompts: a sampler that is asked
    for a prompt again (a server, a batch of one prompt's seeds) does not run the text encoder for it again, and a batch's
    repeated prompts are encoded once. The distinct new prompts of a call are encoded as one batch; c is the encoder's
    own output, so a cached row equals a fresh encoding up to the rounding of the batch it was encoded in. Threads may
    share one (a front end calling one generator from several): a lock keeps a call's rows from being evicted under it."""

    def __init__(self, capacity: int = 256):  # SD 1.5 in float32: 236 KB a prompt, 60 MB in all
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.encoded = 0  # prompts run through the text encoder, for tests and benchmarks
        self.lock = threading.Lock()

    def encode(self, encoder, prompts: list[str], device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`encoder.encode(prompts, device, size)`, [B, L', D], from the cache where it can."""
        keys = [(p, size, str(device)) for p in prompts]
        with self.lock:
            new = list(dict.fromkeys(k for k in keys if k not in self.rows))
            if new:
                for key, row in zip(new, encoder.encode([k[0] for k in new], device, size)):
                    self.rows[key] = row.clone()  # not a view that keeps the whole batch alive
                self.encoded += len(new)
            for key in keys:
                self.rows.move_to_end(key)
            c = torch.stack([self.rows[k] for k in keys])
            self._evict()
        return c

    def uncond(self, encoder, device=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`encoder.uncond(device, size)`, [1, L', D], computed once per size and device."""
        key = ("", size, str(device), "uncond")
        with self.lock:
            if key not in self.rows:
                self.rows[key] = encoder.uncond(device, size)[0]
            self.rows.move_to_end(key)
            uncond = self.rows[key][None]
            self._evict()
            return uncond

    def _evict(self) -> None:
        """Drop the least recently used rows past `capacity` (the lock held): ∅ of each size counts as a prompt."""
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
