"""Discrete DDPM noise schedule and the skipping-step grid of LCD.

The forward process is z_t = α_t·x0 + σ_t·ε with α_t = √ᾱ_t, σ_t = √(1-ᾱ_t) (Section 3 of Luo et al.
2023). ᾱ is built from a diffusers scheduler config exactly as diffusers builds it, so a model trained
with any diffusers scheduler sees the same α_t, σ_t here.

Timesteps are integers 0..T-1 for the network, but second-order solvers need points between them. As
DPM-Solver does for discrete-time models, the schedule is extended to real t by interpolating the
half-log-SNR λ_t = log(α_t/σ_t) linearly between integers; at integer t the values are exact.

The schedule's arithmetic is float64 (`NoiseSchedule`), which Apple's MPS devices do not have: for their tensors it runs on
the CPU and its values go back in float32 (`float64_on_host`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from latent_consistency.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Devices without float64: MPS refuses every float64 tensor ("the MPS framework doesn't support float64")
NO_FLOAT64_DEVICES = ("mps",)


def float64_on_host(function: Callable) -> Callable:
    """`function` of tensors (its positional arguments) whose float64 arithmetic runs on the CPU when a tensor is on a device
    without float64 (`NO_FLOAT64_DEVICES`), the tensors it returns (alone or in a tuple) moved back to that device, float64
    ones as float32: the values the callers cast to the latents' dtype anyway, computed as precisely as on a CPU or a CUDA
    GPU. A timestep on an Apple GPU otherwise stopped every training and sampling step with "Cannot convert a MPS Tensor to
    float64 dtype"."""

    @functools.wraps(function)
    def on_host(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type in NO_FLOAT64_DEVICES), None)
        if device is None:
            return function(*args, **kwargs)
        out = function(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

        def back(x):
            return x.to(device, torch.float32 if x.dtype == torch.float64 else x.dtype) if isinstance(x, torch.Tensor) else x

        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)

    return on_host


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021), as diffusers builds them."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T-1} = 0 (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    # Scale by the ratio computed first: the float32 rounding diffusers gets, so ᾱ matches it bitwise.
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    rescale_betas_zero_snr: bool = False,
    trained_betas: Any = None,
) -> torch.Tensor:
    """β_1..β_T in float32, the same numbers diffusers' DDPM/DDIM/LCM schedulers build."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise UserError(f"unknown beta_schedule {beta_schedule!r}; use one of {', '.join(BETA_SCHEDULES)}")
    if betas.ndim != 1 or len(betas) < 2:  # one step has no t - 1 to step to
        raise UserError(f"a noise schedule needs at least 2 timesteps, got {len(betas.reshape(-1))} (num_train_timesteps "
                        f"{num_train_timesteps}{', trained_betas' if trained_betas is not None else ''})")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t of a discrete variance-preserving diffusion, with α_t, σ_t, λ_t for real t ∈ [0, T-1].

    `alphas_cumprod` is kept in float64: the solvers' exponentials of λ differences lose accuracy in
    float32 near t = 0. Values are returned in float64 (float32 on MPS, `float64_on_host`); callers cast to their working
    dtype.
    """

    alphas_cumprod: torch.Tensor
    # ᾱ_{T-1} was 0 and is raised (`from_betas`): betas ending at β = 1, as `rescale_betas_zero_snr` or trained betas make
    # them. There an ε-prediction network has no x̂0 = (z - σ·ε̂)/α: diffusers' DDIM and LCM schedulers divide by α = 0, ours
    # by the raised α. (A cosine schedule's α_{T-1} = 4.9e-5 is diffusers' own, and both sample an ε model on it alike.)
    ends_at_zero_snr: bool = False

    # Zero-terminal-SNR schedules have ᾱ_{T-1} = 0 (λ = -∞); as diffusers' DPM-Solver and Euler schedulers
    # do, that 0 is raised to 2^-24 so that every λ is finite: to half the ᾱ before it where that is below 2^-23 (rescaled
    # linear 1e-4..0.02 betas, T = 2000 schedules), so that ᾱ and λ still decrease (`t_of_lambda` searches them) — raised
    # above its neighbour, it made the DPM-Solver jumps from T-1 NaN and the iCT weight of the pairs from T-1 zero. (Its DDIM and LCM schedulers keep 0:
    # for a v-prediction model, x̂0 = α·z - σ·v at t = T-1 then differs from ours by α_{T-1}·z = 2^-12·z.)
    # Only a 0 is raised: squaredcos_cap_v2's ᾱ_{T-1} = 2.4e-9 (T = 1000) is kept, as every diffusers scheduler keeps it.
    MIN_ALPHA_CUMPROD = 2.0**-24
    # The other end alike: β_0 = 0 (beta_start 0, or trained betas) makes ᾱ_0 = 1, λ_0 = +∞, and α, σ at every real t in (0, 1)
    # and every DPM-Solver jump to t = 0 NaN; that 1 is lowered to 1 - 2^-24, the float32 just below 1 (σ_0 = 2^-12). (diffusers'
    # DDIM keeps 1: its jump to t = 0 then differs from ours by σ_0·ε̂ = 2^-12·ε̂.)
    MAX_ALPHA_CUMPROD = 1.0 - 2.0**-24

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config (a dict or a scheduler's `.config`)."""
        betas = make_betas(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.00085)),
            beta_end=float(config.get("beta_end", 0.012)),
            beta_schedule=str(config.get("beta_schedule", "scaled_linear")),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
            trained_betas=config.get("trained_betas"),
        )
        return cls.from_betas(betas)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        # diffusers computes the cumulative product in float32; do the same so that α_t matches bitwise.
        alphas_cumprod = torch.cumprod(1.0 - betas.float(), dim=0).double()
        # a 0 (zero terminal SNR) is raised to 2^-24, or half the ᾱ before it where that is smaller, and a 1 (β = 0) lowered
        # to 1 - 2^-24; any other ᾱ is diffusers' own number
        zeros = (alphas_cumprod <= 0).nonzero().flatten().tolist()
        for t in zeros:  # in increasing t: each raised below the one before it, itself raised already
            alphas_cumprod[t] = min(cls.MIN_ALPHA_CUMPROD, float(alphas_cumprod[t - 1]) / 2) if t > 0 else cls.MIN_ALPHA_CUMPROD
        alphas_cumprod = torch.where(alphas_cumprod < 1, alphas_cumprod, torch.full_like(alphas_cumprod, cls.MAX_ALPHA_CUMPROD))
        return cls(alphas_cumprod=alphas_cumprod, ends_at_zero_snr=bool(zeros) and zeros[-1] == len(alphas_cumprod) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def zero_terminal_snr(self) -> bool:
        """ᾱ_{T-1} = 0 (raised to MIN_ALPHA_CUMPROD), or as good as 0 (squaredcos_cap_v2's 2.4e-9, below MIN_ALPHA_CUMPROD):
        z at t = T-1 holds no signal, however the betas were given, and x̂0 = (z - σ·ε̂)/α amplifies ε̂'s error beyond use."""
        return bool(self.alphas_cumprod[-1] <= self.MIN_ALPHA_CUMPROD)

    @property
    def lambdas(self) -> torch.Tensor:
        """λ_t = log α_t - log σ_t at the integer timesteps 0..T-1 (decreasing)."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    @float64_on_host
    def lambda_(self, t: torch.Tensor | float) -> torch.Tensor:
        """λ at real t, linear between integers."""
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = t - lo
        lam = self.lambdas.to(t.device)
        return lam[lo] + frac * (lam[lo + 1] - lam[lo])

    @float64_on_host
    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) at real t; exact at integers: α² = sigmoid(2λ), σ² = sigmoid(-2λ)."""
        t = torch.as_tensor(t)
        if not torch.is_floating_point(t):
            # an integer index out of range would wrap (t = -1 read as T-1, pure noise) or fail deep in indexing; checked
            # where it is free (a CPU tensor), not on a GPU, where it would stop every training step for the host
            if t.device.type == "cpu" and bool(((t < 0) | (t >= self.num_train_timesteps)).any()):
                raise UserError(f"integer timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.reshape(-1).tolist()[:8]}")
            a = self.alphas_cumprod.to(t.device)[t.long()]
            return a.sqrt(), (1 - a).sqrt()
        lam = self.lambda_(t)
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    @float64_on_host
    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """The inverse of `lambda_`: the real t where λ_t = lam (λ is decreasing in t)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        grid = self.lambdas.to(lam.device).flip(0)  # increasing
        lam_c = lam.clamp(grid[0], grid[-1])
        hi = torch.searchsorted(grid, lam_c.contiguous()).clamp(1, len(grid) - 1)
        lo = hi - 1
        frac = (lam_c - grid[lo]) / (grid[hi] - grid[lo])
        t_flipped = lo.double() + frac  # index into the flipped grid
        return (self.num_train_timesteps - 1) - t_flipped

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t·x0 + σ_t·ε for integer t of shape [B] (Eq. 1 of Luo et al. 2023)."""
        alpha, sigma = self.alpha_sigma(t)
        return append_dims(alpha, x0.ndim).to(x0) * x0 + append_dims(sigma, x0.ndim).to(x0) * noise


def batch_timesteps(t, z: torch.Tensor) -> torch.Tensor:
    """t as one value per row of z: a scalar (or one value, shape [1]) is expanded to [B], a [B] tensor is kept (on z's
    device)."""
    t = torch.as_tensor(t, device=z.device)
    return t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t


def batch_rows(x: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """A condition (c or ∅) with one row per row of a batch of b: one row ([1, ...], as a prompt encoder gives one prompt
    or the empty one) is expanded to b rows; any other is kept."""
    return x.expand(b, *x.shape[1:]) if x is not None and x.ndim and x.shape[0] == 1 and b != 1 else x


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions to a [B] (or scalar) tensor until it has `ndim` dims."""
    x = torch.as_tensor(x)
    if x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def skipping_grid(num_train_timesteps: int, skip: int) -> torch.Tensor:
    """The LCD timestep grid {k-1, 2k-1, ..., T-1} for skip k (Section 4.3, "skipping-step").

    These are the `original_inference_steps = T/k` timesteps diffusers' LCMScheduler samples from.
    """
    if skip < 1 or skip > num_train_timesteps:
        raise UserError(f"skip k must be in 1..{num_train_timesteps}, got {skip}")
    if num_train_timesteps % skip:
        raise UserError(f"skip k={skip} must divide the {num_train_timesteps} training timesteps")
    return torch.arange(1, num_train_timesteps // skip + 1, dtype=torch.long) * skip - 1


def consistency_pairs(grid: torch.Tensor, index: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) for grid positions `index` (Eq. 16-17).

    t_{n+k} = grid[index] and t_n = t_{n+k} - k. For the first grid point (t_{n+k} = k-1) t_n would be
    -1; it is clamped to 0, as diffusers' LCD scripts do, where c_skip(0) = 1 makes the target ẑ itself.
    """
    t_n_plus_k = grid[index]
    t_n = (t_n_plus_k - skip).clamp(min=0)
    return t_n_plus_k, t_n
