"""The world's text encoder: a small `CLIPTextModel`, pre-trained to read every attribute of a caption.

No pretrained text encoder exists here, and one trained only through the diffusion loss gives the
UNet little to tell captions apart by at first. So the encoder is pre-trained on its own, before the
teacher, with one linear classifier per caption attribute (shape, colour, size, position, background
for `shapes`; the digit for `digits`) on the mean of its last hidden state over all `max_length`
positions: the very tensor Stable Diffusion's UNet cross-attends to (padding included). Every
attribute, position included, is then linearly readable from the conditioning before the teacher
starts, and the encoder stays frozen while the teacher trains (as SD's does), which lets the latent
cache hold the text embeddings once.

An SDXL-architecture world (`TeacherConfig.architecture == "sdxl"`) reads other tensors: the penultimate hidden state
(SDXL's UNet cross-attends to `hidden_states[-2]` of both encoders) and the second encoder's pooled projection (the
final-layer-normed state of the first <|endoftext|> token, projected). Its pre-training therefore puts the classifiers
on those two, so that the attributes are linearly readable from what that UNet reads. Its second text encoder, the
`CLIPTextModelWithProjection` SDXL's pipeline needs, is the same pre-trained encoder with an identity projection
(`second_text_encoder`): a learned projection would add nothing, since the UNet's first layer on the pooled embedding
(`add_embedding.linear_1`) is itself linear and learns whatever projection it needs; and a second, separately trained
encoder would cost a phase for no information the captions do not already give the first.
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


def second_text_encoder(text_encoder):
    """SDXL's second text encoder derived from `text_encoder`: a `CLIPTextModelWithProjection` with the same weights and
    an identity `text_projection` (projection_dim = hidden_size), so its pooled embedding is the encoder's pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden = text_encoder.config.hidden_size
    config = CLIPTextConfig.from_dict({k: v for k, v in text_encoder.config.to_dict().items() if k != "architectures"} | {"projection_dim": hidden})
    second = CLIPTextModelWithProjection(config)
    # transformers 5's CLIPTextModel holds the transformer itself, 4's in `text_model`, as the projection model does
    second.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    with torch.no_grad():
        second.text_projection.weight.copy_(torch.eye(hidden))
    return second.to(text_encoder.device).eval().requires_grad_(False)


def conditioning_features(text_encoder, ids: torch.Tensor, architecture: str = "sd") -> list[torch.Tensor]:
    """The [B, hidden] summaries of what a teacher of `architecture` reads from the encoder: the mean over all positions of
    the last hidden state ("sd"), or of the penultimate one and the pooled output ("sdxl")."""
    if architecture == "sd":
        return [text_encoder(ids).last_hidden_state.mean(dim=1)]
    out = text_encoder(ids, output_hidden_states=True)
    return [out.hidden_states[-2].mean(dim=1), out.pooler_output]


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
    architecture: str = "sd",
) -> list[float]:
    """Train on caption -> attribute classes (`labels`: [N, A] class indices, `NO_LABEL` where a caption does not name
    attribute a); returns the loss per step.

    The heads (one per attribute and `conditioning_features` entry) are discarded afterwards: only the encoder is kept.
    """
    device, generator = phase.device, phase.generator
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    ids, labels = ids.to(device), labels.to(device)
    text_encoder.to(device).train()
    reads = 1 if architecture == "sd" else 2
    heads = torch.nn.ModuleList(torch.nn.Linear(config.hidden_size, n) for _ in range(reads) for n in num_classes).to(device)
    modules = dict(encoder=text_encoder, heads=heads)
    optimizer = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=config.lr, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, config.steps)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(len(ids), (config.batch_size,), device=device, generator=generator)
        features = conditioning_features(text_encoder, ids[index], architecture)
        return sum(_head_loss(heads[r * len(num_classes) + a](hidden), labels[index, a])
                   for r, hidden in enumerate(features) for a in range(len(num_classes))) / len(heads)

    losses = phase.fit(modules, optimizer, scheduler, loss_fn, config.steps, "text encoder")
    text_encoder.eval().requires_grad_(False)
    return losses
