"""Ψ: one jump t -> s of the (augmented) PF-ODE, the teacher solver of LCD (Eq. 13-17).

Each solver is a plain function over a *denoiser* `denoise(z, t) -> (x̂0, ε̂)` and the noise schedule;
`first`, when given, is the denoiser's output at (z_t, t), already computed by the caller.
All are exponential integrators written in the half-log-SNR λ = log(α/σ), h = λ_s - λ_t:

- DDIM (Song et al. 2021): z_s = α_s·x̂0 + σ_s·ε̂ — first order, one evaluation.
- DPM-Solver-2 (Lu et al. 2022a, Algorithm 1, singlestep, r = 1/2), noise prediction — two evaluations.
- DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1), data prediction — two evaluations.

`guided_jump` applies classifier-free guidance in one of two ways:
- per evaluation (default): every evaluation uses the guided ε̃ of Eq. 12, i.e. the solver integrates
  the augmented PF-ODE of Eq. 13;
- per increment (`guide_increments=True`), the literal Eq. 17: the unguided solver runs for c and ∅ and
  the increments are combined, ẑ_s = z_t + (1+ω)(Ψ(z_t,t,s,c) - z_t) - ω(Ψ(z_t,t,s,∅) - z_t).
For DDIM both are the same; for the second-order solvers they differ at O(h²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latent_consistency.errors import UserError
from latent_consistency.schedule import NoiseSchedule, append_dims, batch_rows, batch_timesteps, float64_on_host

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """(α_t, σ_t) broadcast over `like` and in its dtype and device."""
    return [append_dims(v, like.ndim).to(like) for v in schedule.alpha_sigma(t)]


def ddim_jump(denoise: Denoise, z, t, s, schedule: NoiseSchedule, first=None) -> torch.Tensor:
    """DDIM (η = 0): z_s = α_s·x̂0(z_t) + σ_s·ε̂(z_t)."""
    x0, eps = denoise(z, t) if first is None else first
    alpha_s, sigma_s = _alpha_sigma(schedule, s, z)
    return alpha_s * x0 + sigma_s * eps


@dataclass
class _Singlestep:
    """α, σ at t, the intermediate u (λ_u = λ_t + r·h) and s; h = λ_s - λ_t; r as u actually lands."""

    u: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    alpha_u: torch.Tensor
    sigma_u: torch.Tensor
    alpha_s: torch.Tensor
    sigma_s: torch.Tensor
    h: torch.Tensor
    r: torch.Tensor

    @classmethod
    def of(cls, schedule: NoiseSchedule, z: torch.Tensor, t, s, r: float) -> _Singlestep:
        u, *coefficients = _singlestep_coefficients(schedule, t, s, r)
        return cls(u, *(append_dims(v, z.ndim).to(z) for v in coefficients))


@float64_on_host
def _singlestep_coefficients(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor, r: float) -> tuple[torch.Tensor, ...]:
    """u, α_t, σ_t, α_u, σ_u, α_s, σ_s, h and r as u lands, per row, in float64 (on the CPU for MPS): e^{r·h} - 1 of a small
    h loses its digits in float32."""
    lam_t, lam_s = schedule.lambda_(t), schedule.lambda_(s)
    u = schedule.t_of_lambda(lam_t + r * (lam_s - lam_t))
    (alpha_t, sigma_t), (alpha_u, sigma_u), (alpha_s, sigma_s) = pairs = [schedule.alpha_sigma(x) for x in (t, u, s)]
    lam_t, lam_u, lam_s = (torch.log(alpha) - torch.log(sigma) for alpha, sigma in pairs)
    # A zero-length jump (t = s: skip k = 1's first pair, t_{n+k} = t_n = 0) has no r to measure; any finite r makes
    # the jump the identity there (e^{r·0} - 1 = 0), which the exact ODE solution is
    r_actual = torch.where(lam_s == lam_t, torch.full_like(lam_t, r), (lam_u - lam_t) / (lam_s - lam_t))
    return u, alpha_t, sigma_t, alpha_u, sigma_u, alpha_s, sigma_s, lam_s - lam_t, r_actual


def dpm_solver_2_jump(denoise: Denoise, z, t, s, schedule: NoiseSchedule, first=None, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022a), noise prediction, singlestep with λ_u = λ_t + r·h:

    z_u = (α_u/α_t) z_t - σ_u (e^{r h} - 1) ε_t
    z_s = (α_s/α_t) z_t - σ_s (e^h - 1) ε_t - σ_s/(2r) (e^h - 1) (ε_u - ε_t)

    computed with the first-order part in its data form, (α_u/α_t) z_t - σ_u (e^{r h} - 1) ε_t = α_u x_t + σ_u ε_t
    (e^{r h} = α_u σ_t / (σ_u α_t), x_t = (z_t - σ_t ε_t)/α_t): the same numbers in exact arithmetic, but near t = T-1, where
    α_t is small (4.9e-5 on a cosine schedule), the two terms of the noise form are 10²-10³ × z and cancel, leaving float32
    rounding 20 × DDIM's error (and overflow in half precision).
    """
    c = _Singlestep.of(schedule, z, t, s, r)
    x_t, eps_t = denoise(z, t) if first is None else first
    z_u = c.alpha_u * x_t + c.sigma_u * eps_t
    _, eps_u = denoise(z_u, c.u)
    return c.alpha_s * x_t + c.sigma_s * eps_t - c.sigma_s / (2 * c.r) * torch.expm1(c.h) * (eps_u - eps_t)


def dpm_solver_pp_2s_jump(denoise: Denoise, z, t, s, schedule: NoiseSchedule, first=None, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b), data prediction, singlestep with λ_u = λ_t + r·h:

    z_u = (σ_u/σ_t) z_t - α_u (e^{-r h} - 1) x_t
    z_s = (σ_s/σ_t) z_t - α_s (e^{-h} - 1) [(1 - 1/(2r)) x_t + 1/(2r) x_u]
    """
    c = _Singlestep.of(schedule, z, t, s, r)
    x_t, _ = denoise(z, t) if first is None else first
    z_u = (c.sigma_u / c.sigma_t) * z - c.alpha_u * torch.expm1(-c.r * c.h) * x_t
    x_u, _ = denoise(z_u, c.u)
    d = (1 - 1 / (2 * c.r)) * x_t + 1 / (2 * c.r) * x_u
    return (c.sigma_s / c.sigma_t) * z - c.alpha_s * torch.expm1(-c.h) * d


@dataclass(frozen=True)
class Solver:
    """A named PF-ODE solver and its cost: teacher forward passes per jump (cond+uncond batched)."""

    name: str
    jump: Callable[..., torch.Tensor]
    evaluations_per_jump: int
    order: int


SOLVERS = {
    "ddim": Solver("ddim", ddim_jump, evaluations_per_jump=1, order=1),
    "dpm": Solver("dpm", dpm_solver_2_jump, evaluations_per_jump=2, order=2),
    "dpm++": Solver("dpm++", dpm_solver_pp_2s_jump, evaluations_per_jump=2, order=2),
}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise UserError(f"unknown solver {name!r}; use one of {', '.join(SOLVERS)}") from None


def guided_jump(
    solver: Solver,
    teacher,
    z: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    omega: torch.Tensor | float,
    guide_increments: bool = False,
) -> torch.Tensor:
    """ẑ_s = Ψ(z_t, t, s, c; ω): one jump of the guided teacher (`GuidedTeacher`), Eq. 13-17.

    Either way, each solver evaluation is one teacher forward pass over the batch [cond; uncond].
    """
    t, s = batch_timesteps(t, z), batch_timesteps(s, z)
    if not guide_increments:
        return solver.jump(lambda z_, t_: teacher.guided(z_, t_, cond, uncond, omega), z, t, s, teacher.schedule)
    return guide_increments_of(z, *unguided_jumps(solver, teacher, z, t, s, cond, uncond), omega)


def unguided_jumps(solver: Solver, teacher, z, t, s, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ψ(z_t, t, s, c), Ψ(z_t, t, s, ∅)): the unguided solver for c and ∅ as one batch."""
    t, s = batch_timesteps(t, z), batch_timesteps(s, z)
    cond, uncond = batch_rows(cond, len(z)), batch_rows(uncond, len(z))
    z_pair = solver.jump(lambda z_, t_: teacher.denoise(z_, t_, torch.cat([cond, uncond])),
                         torch.cat([z, z]), torch.cat([t, t]), torch.cat([s, s]), teacher.schedule)
    return z_pair.chunk(2)


def guide_increments_of(z: torch.Tensor, z_c: torch.Tensor, z_u: torch.Tensor, omega) -> torch.Tensor:
    """Eq. 17 literally: ẑ_s = z_t + (1+ω)(Ψ(z_t,t,s,c) - z_t) - ω(Ψ(z_t,t,s,∅) - z_t)."""
    omega = append_dims(torch.as_tensor(omega, device=z.device), z.ndim).to(z)
    return z + (1 + omega) * (z_c - z) - omega * (z_u - z)
