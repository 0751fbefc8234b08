"""The world's text encoder: a small `CLIPTextModel`, pre-trained to read every attribute of a caption.

No pretrained text encoder exists here, and one trained only through the diffusion loss gives the
UNet little to tell captions apart by at first. So the encoder is pre-trained on its own, before the
teacher, with one linear classifier per caption attribute (shape, colour, size, position, background
for `shapes`; the digit for `digits`) on the mean of its last hidden state over all `max_length`
positions: the very tensor Stable Diffusion's UNet cross-attends to (padding included). Every
attribute, position included, is then linearly readable from the conditioning before the teacher
starts, and the encoder stays frozen while the teacher trains (as SD's does), which lets the latent
cache hold the text embeddings once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latent_consistency.world.fit import Phase
from latent_consistency.world.presets import TextEncoderConfig, warmup_cosine


def make_text_encoder(tokenizer, config: TextEncoderConfig):
    """A randomly initialised `CLIPTextModel` sized by `config` for `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_heads,
            num_hidden_layers=config.num_layers,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


NO_LABEL = -100  # a caption that does not name this attribute (another dataset's caption)


def _head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the captions that name the head's attribute (0 when none in the batch does)."""
    losses = F.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="none")
    return losses.sum() / (labels != NO_LABEL).sum().clamp(min=1)


def pretrain_text_encoder(
    text_encoder,
    tokenizer,
    captions: list[str],
    labels: torch.Tensor,
    num_classes: list[int],
    config: TextEncoderConfig,
    phase: Phase,
) -> list[float]:
    """Train on caption -> attribute classes (`labels`: [N, A] class indices, `NO_LABEL` where a caption does not name
    attribute a); returns the loss per step.

    The heads are discarded afterwards: only the encoder is kept.
    """
    device, generator = phase.device, phase.generator
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    ids, labels = ids.to(device), labels.to(device)
    text_encoder.to(device).train()
    heads = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, n) for n in num_classes).to(device)
    modules = dict(encoder=text_encoder, heads=heads)
    optimizer = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=config.lr, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, config.steps)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(len(ids), (config.batch_size,), device=device, generator=generator)
        hidden = text_encoder(ids[index]).last_hidden_state.mean(dim=1)
        return sum(_head_loss(head(hidden), labels[index, a]) for a, head in enumerate(heads)) / len(heads)

    losses = phase.fit(modules, optimizer, scheduler, loss_fn, config.steps, "text encoder")
    text_encoder.eval().requires_grad_(False)
    return losses
