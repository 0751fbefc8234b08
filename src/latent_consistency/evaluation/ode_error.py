"""How far a consistency model is from the fixed point LCD trains it towards, per timestep; and that fixed point
itself as a consistency model (`TeacherConsistencyFunction`), the best any student of this teacher, solver and k can do.

For data latents x0, noise ε and timesteps t on the LCD grid, z_t = α_t·x0 + σ_t·ε is carried by the guided
teacher's solver Ψ along the grid t → t−k → … → 0 (the last jump clamped to 0, as `consistency_pairs`
does). With f_θ⁻ = f_θ that chain is exactly the fixed point of Algorithm 1's recursion
f(z_{t_{n+k}}) = f(Ψ(z_{t_{n+k}}, t_{n+k}, t_n)), anchored by c_skip(0) = 1. The mean squared error of
f(z_t, ω, c, t) against it, per t, says where on the trajectory a student is (in)accurate; the FID of
few-step samples mixes all the timesteps the sampler visits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent_consistency.errors import UserError
from latent_consistency.sampling import lcm_timesteps
from latent_consistency.schedule import skipping_grid
from latent_consistency.solvers import Solver, guided_jump


def error_timesteps(num_train_timesteps: int, skip: int) -> list[int]:
    """Where to measure: the 4-step sampler's timesteps and the grid point nearest T/10."""
    grid = skipping_grid(num_train_timesteps, skip)
    small = int(grid[(grid - num_train_timesteps // 10).abs().argmin()])
    return sorted({*lcm_timesteps(4, num_train_timesteps, num_train_timesteps // skip).tolist(), small}, reverse=True)


class TeacherConsistencyFunction:
    """f*(z_t, ω, c, t): the guided teacher's ODE solution from z_t, by its solver Ψ in jumps of k, t → t−k → … → 0
    (the last jump clamped to 0, as `consistency_pairs` does).

    On the skipping grid this is exactly the fixed point of Algorithm 1's recursion f(z_{t_{n+k}}) =
    f(Ψ(z_{t_{n+k}}, t_{n+k}, t_n)) with f(z, 0) = z (Eq. 9's boundary condition, c_skip(0) = 1): what a perfect LCD
    student of this teacher, solver and k would compute. It has the `ConsistencyModel` call signature, so Algorithm 3
    samples with it (`evaluation.compare.sample_consistency`) to score that ceiling. A t off the grid starts with the
    same jump of k. Costs ⌈t/k⌉ solver jumps, each a cond-and-uncond teacher batch per solver evaluation.
    """

    def __init__(self, teacher, solver: Solver, skip: int, uncond: torch.Tensor, max_rows: int | None = None):
        self.teacher, self.solver, self.skip, self.uncond, self.max_rows = teacher, solver, skip, uncond, max_rows
        self.schedule = teacher.schedule

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, omega) -> torch.Tensor:
        """The solution for each row of z at its timestep t (rows may differ in t); `uncond` [1 or B, L, D].

        Rows that are at the same time are jumped as one batch (in parts of at most `max_rows`), from the latest time down:
        a row starting at t joins the rows that started earlier on the chain when they reach t, so a batch of mixed t costs
        the passes of its largest.
        """
        b = z.shape[0]
        now = torch.as_tensor(t, device=z.device).reshape(-1).expand(b).clone()
        if torch.is_floating_point(now):
            if not bool((now == now.round()).all()):  # the chain jumps between integer timesteps: a real t never joins it
                raise UserError(f"the teacher's consistency function takes integer timesteps, got {now.tolist()[:8]}")
            now = now.long()
        uncond = self.uncond.expand(b, *self.uncond.shape[1:]) if len(self.uncond) == 1 else self.uncond
        omega = omega.reshape(-1).expand(b) if torch.is_tensor(omega) and omega.ndim else omega
        out = z.clone()
        while bool((now > 0).any()):
            start = int(now.max())
            rows = (now == start).nonzero().squeeze(1)
            end = max(start - self.skip, 0)
            for part in rows.split(self.max_rows or len(rows)):
                w = omega[part] if torch.is_tensor(omega) and omega.ndim else omega
                out[part] = guided_jump(self.solver, self.teacher, out[part], torch.tensor(start), torch.tensor(end), cond[part],
                                        uncond[part], w).to(z.dtype)
            now[rows] = end
        return out


@dataclass
class ODESolutions:
    """z_t per timestep and the teacher's ODE solution from it, for one set of (x0, ε, c, ω)."""

    z: dict[int, torch.Tensor]
    solution: dict[int, torch.Tensor]
    cond: torch.Tensor
    omega: float


# Latent elements per teacher call when the rows of several timesteps and scales are solved together: 256 latents of the
# built-in world (4 x 8 x 8). Small latents share calls, where a call's overhead, not its arithmetic, is the cost; on the
# 2-core CPU calls of 2,048 world latents were slower again (docs/benchmarks.md). A Stable Diffusion latent (4 x 64 x 64)
# solves as many rows per call as it is given latents, as one set per call did, so its peak memory is unchanged.
ELEMENTS_PER_CALL = 2**16


@torch.no_grad()
def ode_solution_sets(teacher, solver: Solver, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, omegas: list[float],
                      timesteps: list[int], skip: int, generator: torch.Generator | None = None) -> list[ODESolutions]:
    """Noise `x0` to each t in `timesteps` (grid points k−1 + j·k) with one ε and solve the guided ODE to 0, at each ω of
    `omegas`: every (ω, t) row set on one staircase of the teacher's chain (`TeacherConsistencyFunction`), which costs
    the jumps from the largest t once, not once per set."""
    off_grid = [t for t in timesteps if (t + 1) % skip]
    if off_grid:
        raise UserError(f"timesteps {off_grid} are not on the grid of skip {skip}")
    b, sets = x0.shape[0], len(omegas) * len(timesteps)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    z = {t: teacher.schedule.add_noise(x0, noise, torch.full((b,), t, device=x0.device)) for t in timesteps}
    rows_uncond = uncond if len(uncond) == 1 else uncond.repeat(sets, *[1] * (uncond.ndim - 1))
    exact = TeacherConsistencyFunction(teacher, solver, skip, rows_uncond, max_rows=max(b, ELEMENTS_PER_CALL // x0[0].numel()))
    t = torch.tensor(timesteps, device=x0.device).repeat_interleave(b).repeat(len(omegas))
    # One ω is passed as the number, which keeps the teacher's one-pass path at ω = 0 (`GuidedTeacher.guided_output`)
    omega = omegas[0] if len(omegas) == 1 else torch.tensor(omegas, dtype=x0.dtype, device=x0.device).repeat_interleave(b * len(timesteps))
    solved = exact(torch.cat([z[t_] for t_ in timesteps] * len(omegas)), t, cond.repeat(sets, *[1] * (cond.ndim - 1)), omega)
    parts = iter(solved.split(b))
    return [ODESolutions(z, {t_: next(parts) for t_ in timesteps}, cond, w) for w in omegas]


@torch.no_grad()
def ode_error(f, solutions: ODESolutions) -> dict[int, float]:
    """Mean squared error of f(z_t, ω, c, t) against the ODE solution from z_t, per t."""
    errors = {}
    for t, z in solutions.z.items():
        pred = f(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device), solutions.cond, solutions.omega)
        errors[t] = float(((pred.float() - solutions.solution[t].float()) ** 2).mean())
    return errors


@torch.no_grad()
def guidance_response(f, low: ODESolutions, high: ODESolutions) -> dict[int, float]:
    """How much of the teacher's guidance effect f reproduces, per t.

    From the same z_t (same x0, ε and c), the teacher's ODE solutions at two guidance scales differ by
    Δψ = ψ(z_t; ω_high) − ψ(z_t; ω_low); the student's outputs by Δf = f(z_t, ω_high) − f(z_t, ω_low). The
    response is the least-squares coefficient ⟨Δf, Δψ⟩ / ⟨Δψ, Δψ⟩: 1 when f has learned the ω input (Section
    4.2's guided distillation), 0 when it ignores ω, negative when it moves the wrong way.
    """
    if low.z.keys() != high.z.keys() or any(not torch.equal(low.z[t], high.z[t]) for t in low.z):
        raise ValueError("guidance_response needs both solution sets from the same z_t (same x0, noise and timesteps)")
    response = {}
    for t, z in low.z.items():
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        # the sums in float64, on the CPU: an Apple GPU (MPS) has no float64
        delta_f = (f(z, tt, high.cond, high.omega) - f(z, tt, low.cond, low.omega)).cpu().double()
        delta_psi = (high.solution[t] - low.solution[t]).cpu().double()
        response[t] = float((delta_f * delta_psi).sum() / (delta_psi * delta_psi).sum())
    return response
