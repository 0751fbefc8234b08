"""Exponential moving averages of a network: the target θ⁻ of Algorithm 1 and an evaluation EMA."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """θ⁻ <- μ·θ⁻ + (1-μ)·θ for parameters; buffers are copied (k-diffusion's `ema_update`).

    decay μ = 0 makes the target a copy of the source (no EMA). The parameters are updated by one fused
    `torch._foreach_lerp_` over all tensors of a dtype, not one kernel per tensor. Sharded by FSDP2 alike (`training.sharding`),
    the two networks' parameters are DTensors whose local shards hold the same elements: the update runs on those.
    """
    target_params = dict(target.named_parameters())
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for name, param in source.named_parameters():
        ema, param = _local(target_params[name]), _local(param.detach())
        if ema.shape != param.shape:
            raise ValueError(f"{name}: target {tuple(ema.shape)} and source {tuple(param.shape)} are not sharded alike")
        targets, sources = groups.setdefault(ema.dtype, ([], []))
        targets.append(ema)
        sources.append(param.to(ema.dtype))
    for targets, sources in groups.values():
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
    target_buffers = dict(target.named_buffers())
    for name, buf in source.named_buffers():
        target_buffers[name].copy_(buf)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2's parameters); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
