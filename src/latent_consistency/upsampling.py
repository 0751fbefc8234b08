"""Nearest-neighbour 2× upsampling followed by a 3×3 convolution, computed as one 2×2 convolution of the small input.

Every UNet and VAE decoder of the Stable Diffusion family upsamples this way (diffusers' `Upsample2D`):
U(x)[2i + a, 2j + b] = x[i, j], then y = W ⋆ U(x) with a 3×3 kernel and padding 1. Each output pixel of phase (a, b)
reads only two rows and two columns of x, so its three kernel rows (and columns) collapse to two:

    phase a = 0 reads rows (i − 1, i) with weights (W₀, W₁ + W₂);   a = 1 reads rows (i, i + 1) with (W₀ + W₁, W₂),

and y[2i + a, 2j + b] = (R_a W R_bᵀ ⋆ x)[i + a, j + b] for a 2×2 kernel, R₀ = [[1, 0, 0], [0, 1, 1]],
R₁ = [[1, 1, 0], [0, 0, 1]]. One convolution with the four phases' kernels stacked as output channels, then an
interleave, gives y exactly (up to float rounding): 16 multiply-adds per input pixel and channel pair instead of 36, and
the 4× larger upsampled tensor is never made. On the 2-core CPU (`benchmarks/upsampling_speed.py`, docs/benchmarks.md):
a Stable Diffusion VAE decode (random weights, 256² px) 1.15-1.21× faster; the world's 4-step text to image 1.05× eager
at batch 64 and 0.97× at batch 1; no change measured under `torch.compile`.

Sampling uses it (`pipelines.Generator`); training keeps diffusers' module, the reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _collapse(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps of `weight` along `dim` gathered into phase 0's two, (W₀, W₁ + W₂), and phase 1's, (W₀ + W₁, W₂)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The four phases' 2×2 kernels of a 3×3 `weight` (O, I, 3, 3), stacked as (4·O, I, 2, 2) in phase order (0, 0),
    (0, 1), (1, 0), (1, 1): K_ab = R_a W R_bᵀ."""
    return torch.cat([kernel for rows in _collapse(weight, 2) for kernel in _collapse(rows, 3)])


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for a 3×3 `weight`, computed as one
    2×2 convolution of x (module docstring) with `kernels`, `phase_kernels(weight)` unless given. Differentiable in x,
    weight and bias."""
    n, _, h, w = x.shape
    out_channels = weight.shape[0]
    kernels = phase_kernels(weight) if kernels is None else kernels
    phases = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)  # (n, 4·O, h + 1, w + 1)
    phases = phases.reshape(n, 2, 2, out_channels, h + 1, w + 1)  # a copy only for a channels-last input
    y = phases.new_empty(n, out_channels, h, 2, w, 2)  # the convolution's dtype (under autocast, not x's)
    for a in (0, 1):
        for b in (0, 1):
            y[:, :, :, a, :, b] = phases[:, a, b, :, a:a + h, b:b + w]
    return y.view(n, out_channels, 2 * h, 2 * w)


class SubpixelUpsample(torch.nn.Module):
    """A diffusers `Upsample2D` (nearest 2×, then its 3×3 `conv`) run through `upsample_conv`. It holds the same `conv`, so
    its parameters and state-dict keys are the original's; an `output_size` other than twice the input falls back to the
    plain computation (a UNet asks for one when the input is odd-sized)."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._kernels, self._kernels_of = None, None  # phase kernels of the weight as it was when they were made

    def kernels(self) -> torch.Tensor | None:
        """The phase kernels of a weight that is not being trained, made once per weight (its storage, in-place version,
        dtype and device) rather than at every call; None where they must be made in the call (gradients flow to the
        weight, or inside torch.compile, which folds or fuses them)."""
        weight = self.conv.weight
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
            return None
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._kernels_of != key:
            self._kernels, self._kernels_of = phase_kernels(weight.detach()), key
        return self._kernels

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.conv(F.interpolate(hidden_states, size=output_size, mode="nearest"))
        return upsample_conv(hidden_states, self.conv.weight, self.conv.bias, self.kernels())


def _replaceable(module: torch.nn.Module) -> bool:
    """A diffusers Upsample2D that is nearest 2× then a plain 3×3 convolution with padding 1."""
    from diffusers.models.upsampling import Upsample2D

    if type(module) is not Upsample2D or not module.use_conv or module.use_conv_transpose or not module.interpolate:
        return False
    conv = getattr(module, "conv", None)
    return (module.norm is None and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def use_subpixel_upsampling(model: torch.nn.Module) -> int:
    """Replace every replaceable `Upsample2D` inside `model` by a `SubpixelUpsample` holding its convolution, in place;
    returns how many were replaced."""
    names = [name for name, module in model.named_modules() if _replaceable(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, SubpixelUpsample(getattr(parent, child).conv))
    return len(names)
