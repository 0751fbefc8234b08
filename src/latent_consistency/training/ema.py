"""Exponential moving averages of a network: the target θ⁻ of Algorithm 1 and an evaluation EMA."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """θ⁻ <- μ·θ⁻ + (1-μ)·θ for parameters; buffers are copied (k-diffusion's `ema_update`).

    decay μ = 0 makes the target a copy of the source (no EMA).
    """
    target_params = dict(target.named_parameters())
    for name, param in source.named_parameters():
        target_params[name].lerp_(param.detach().to(target_params[name].dtype), 1.0 - decay)
    target_buffers = dict(target.named_buffers())
    for name, buf in source.named_buffers():
        target_buffers[name].copy_(buf)
