"""Conditioning beyond the prompt's token embeddings, carried inside the one tensor `cond` that every contract passes.

Solvers, losses, samplers, the training loop and the latent cache handle the condition c as one tensor [B, L, D]: they
concatenate cond and uncond into one batch, expand ∅ to a batch, index rows and store one row per caption. An
SDXL-family UNet (`addition_embed_type = "text_time"`) needs more: a pooled text embedding [B, P] and six
micro-conditioning numbers [B, 6] (original height and width, crop top and left, target height and width: Podell et al.
2023, Section 2.2), passed as `added_cond_kwargs`. `AddedConditioning` packs them into one extra token row after the
L prompt tokens, [pooled | time ids | zeros] (P + 6 <= D: SDXL has P = 1280, D = 2048), so every row operation on c
keeps them with their prompt; only the network adapter (`denoisers.UNetNetwork`) unpacks them.

A PixArt-α transformer (`PixArtTransformer2DModel`, Chen et al. 2023) reads T5 token embeddings [B, L, D] with their
attention mask [B, L] (`encoder_attention_mask`), and the 1024-px models (`use_additional_conditions`) a resolution
[B, 2] and aspect ratio [B, 1] (Section 2.3 of the PixArt-α paper). `PixArtConditioning` packs the mask as one extra
feature column [B, L, D + 1], so that rows of tokens keep their mask, and the size conditions as one extra token row.

The time ids travel in c's dtype, as diffusers' StableDiffusionXLPipeline makes them (sizes up to 2048 are exact in
float16; bfloat16 rounds sizes above 256 to its 8-bit mantissa, as the pipeline does in bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# original size (h, w) + crop top-left (top, left) + target size (h, w)
TIME_IDS = 6


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning, in the order its UNet reads it (`StableDiffusionXLPipeline._get_add_time_ids`)."""
    return [*original_size, *crop_top_left, *target_size]


@dataclass(frozen=True)
class AddedConditioning:
    """The layout of the extra token row of an SDXL-family condition: `pooled_dim` numbers, then the TIME_IDS."""

    pooled_dim: int

    @classmethod
    def of_unet(cls, unet_config) -> AddedConditioning | None:
        """The layout a UNet config asks for; None for a UNet that takes the prompt tokens only (SD 1.x/2.x)."""
        if unet_config.get("addition_embed_type") != "text_time":
            return None
        # The UNet projects concat(pooled, sinusoidal embeddings of the time ids) with one linear layer
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(unet_config["addition_time_embed_dim"])
        return cls(pooled)

    def pack(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, L, D] tokens, [B, P] pooled, [B, 6] time ids -> c of shape [B, L + 1, D]."""
        b, _, d = prompt_embeds.shape
        if pooled.shape != (b, self.pooled_dim) or ids.shape != (b, TIME_IDS):
            raise ValueError(f"pooled {list(pooled.shape)} and time ids {list(ids.shape)} do not fit [{b}, {self.pooled_dim}] and [{b}, {TIME_IDS}]")
        if self.pooled_dim + TIME_IDS > d:
            raise ValueError(f"a pooled embedding of {self.pooled_dim} and {TIME_IDS} time ids do not fit a token row of {d}")
        row = prompt_embeds.new_zeros(b, 1, d)
        row[:, 0, : self.pooled_dim] = pooled
        row[:, 0, self.pooled_dim : self.pooled_dim + TIME_IDS] = ids
        return torch.cat([prompt_embeds, row], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """c -> (encoder_hidden_states [B, L, D], added_cond_kwargs {"text_embeds": [B, P], "time_ids": [B, 6]})."""
        row = cond[:, -1]
        return cond[:, :-1], {"text_embeds": row[:, : self.pooled_dim], "time_ids": row[:, self.pooled_dim : self.pooled_dim + TIME_IDS]}


# PixArt-α's added conditions: resolution (height, width) + aspect ratio height / width
SIZE_CONDITIONS = 3


@dataclass(frozen=True)
class PixArtConditioning:
    """The layout of a PixArt-α condition: the T5 tokens, each with its attention mask in an extra last feature, and
    for a transformer with `use_additional_conditions` an extra row [height, width, height / width, zeros]."""

    additional_conditions: bool

    @classmethod
    def of_transformer(cls, transformer) -> PixArtConditioning:
        """The layout a `PixArtTransformer2DModel` asks for (its `use_additional_conditions`: by default its sample size
        is 128, the 1024-px models')."""
        return cls(bool(getattr(transformer, "module", transformer).use_additional_conditions))

    def pack(self, prompt_embeds: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, L, D] tokens, [B, L] attention mask, the images' (height, width) -> c of shape [B, L (+ 1), D + 1]."""
        b, length, _ = prompt_embeds.shape
        if mask.shape != (b, length):
            raise ValueError(f"attention mask {list(mask.shape)} does not fit tokens {list(prompt_embeds.shape)}")
        c = torch.cat([prompt_embeds, mask.to(prompt_embeds)[..., None]], dim=-1)
        if not self.additional_conditions:
            return c
        row = c.new_zeros(b, 1, c.shape[-1])
        # as PixArtAlphaPipeline makes them: in the embeddings' dtype, the aspect ratio from a Python float
        row[:, 0, :SIZE_CONDITIONS] = torch.tensor([size[0], size[1], float(size[0] / size[1])]).to(c)
        return torch.cat([c, row], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
        """c -> (encoder_hidden_states [B, L, D], encoder_attention_mask [B, L], added_cond_kwargs {"resolution": [B, 2],
        "aspect_ratio": [B, 1]}, both None for a transformer without additional conditions)."""
        if not self.additional_conditions:
            return cond[..., :-1], cond[..., -1], {"resolution": None, "aspect_ratio": None}
        tokens, row = cond[:, :-1], cond[:, -1]
        return tokens[..., :-1], tokens[..., -1], {"resolution": row[:, :2], "aspect_ratio": row[:, 2:SIZE_CONDITIONS]}
