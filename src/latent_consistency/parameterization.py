"""Prediction-type conversions, consistency boundary scalings, guidance embedding and ω <-> g.

One module imported by both the trainer and the samplers, so that the consistency function of Eq. 9
of Luo et al. 2023 is defined once:

    f(z, ω, c, t) = c_skip(t)·z + c_out(t)·x̂0(z, ω, c, t).
"""

from __future__ import annotations

import math

import torch

from latent_consistency.errors import UserError
from latent_consistency.schedule import append_dims, float64_on_host

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults of diffusers' LCMScheduler: t is scaled by 10 before the EDM-style scalings with σ_data = 0.5,
# which makes c_skip ≈ 0 already at t = 1 while keeping c_skip(0) = 1 exactly.
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def x0_and_eps(
    model_output: torch.Tensor,
    z: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a network output, using z = α·x0 + σ·ε and v = α·ε - σ·x0 (α² + σ² = 1).

    `alpha` and `sigma` are [B] or scalars; they are broadcast over z.
    """
    alpha = append_dims(alpha, z.ndim).to(z)
    sigma = append_dims(sigma, z.ndim).to(z)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * z - sigma * model_output
        eps = sigma * z + alpha * model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (z - alpha * x0) / sigma
    else:
        check_prediction_type(prediction_type)
        raise AssertionError  # unreachable
    return x0, eps


def model_output_from(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The network output of `prediction_type` that corresponds to (x0, ε): the inverse of `x0_and_eps`."""
    alpha = append_dims(alpha, x0.ndim).to(x0)
    sigma = append_dims(sigma, x0.ndim).to(x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    check_prediction_type(prediction_type)
    raise AssertionError  # unreachable


@float64_on_host
def boundary_scalings(
    t: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of Eq. 9 with c_skip(0) = 1, c_out(0) = 0.

    c_skip = σ_d² / (s² + σ_d²), c_out = s / √(s² + σ_d²), s = timestep_scaling·t (diffusers' LCMScheduler). In float64
    (float32 on MPS, `float64_on_host`).
    """
    s = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def omega_from_guidance_scale(guidance_scale: float | torch.Tensor) -> float | torch.Tensor:
    """The paper's guidance weight ω (Eq. 12) from diffusers' guidance_scale g: ω = g - 1.

    diffusers writes CFG as ε_u + g(ε_c - ε_u); the paper as (1+ω)ε_c - ωε_u. They agree when g = 1 + ω.
    """
    return guidance_scale - 1


def check_guidance_scale_range(lo: float, hi: float) -> tuple[float, float]:
    """A range of diffusers' guidance scales g to draw from: 1 <= min <= max, finite (ω = g - 1 >= 0)."""
    if not (1.0 <= lo <= hi and math.isfinite(hi)):
        raise UserError(f"the guidance scale range must satisfy 1 <= min <= max (finite), got [{lo}, {hi}]")
    return lo, hi


# The ω embedding's frequencies 10000^(-i/(dim/2 - 1)) need dim/2 >= 2: at dim 2 or 3 they divide by zero (diffusers' pipeline
# then feeds NaN), at dim 1 there are none (the embedding is a constant 0, and ω is never seen)
MIN_GUIDANCE_EMBEDDING_DIM = 4


def check_guidance_embedding_dim(dim: int) -> int:
    """The size of an ω embedding (a UNet's `time_cond_proj_dim`): at least MIN_GUIDANCE_EMBEDDING_DIM."""
    if dim < MIN_GUIDANCE_EMBEDDING_DIM:
        raise UserError(f"the ω embedding (time_cond_proj_dim) needs at least {MIN_GUIDANCE_EMBEDDING_DIM} dimensions, got {dim}: its "
                        "sinusoids have dim/2 frequencies 10000^(-i/(dim/2 - 1)); use e.g. 64 or 256 (diffusers' LCMs: 256)")
    return dim


def guidance_embedding(omega: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ω (the student's extra input, Section 4.2), shape [B, dim], in float32.

    The same embedding diffusers' LatentConsistencyModelPipeline feeds to the UNet's `timestep_cond`:
    ω is scaled by 1000 and embedded with frequencies 10000^(-i/(dim/2 - 1)), sines then cosines. A half-precision
    run casts it afterwards, as the pipeline does (ω·1000 in float16 or bfloat16 would lose most of its digits).
    """
    check_guidance_embedding_dim(dim)
    omega = torch.as_tensor(omega, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = omega[:, None] * freqs.to(omega.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def consistency_output(
    z: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> torch.Tensor:
    """f = c_skip(t)·z + c_out(t)·x̂0 (Eq. 9), for t of shape [B] or a scalar."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    return append_dims(c_skip, z.ndim).to(z) * z + append_dims(c_out, z.ndim).to(z) * x0
