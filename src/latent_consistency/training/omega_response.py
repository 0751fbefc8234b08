"""The end-of-run check that guided distillation learned its ω input (Section 4.2): does the student's output move
with ω the way the guided teacher's PF-ODE solution does?

On a few training latents, noised to the 4-step sampler's timesteps and one small t, the teacher's ODE solutions
at the ends of the trained guidance range are compared with the student's outputs at the same two ω
(`evaluation.ode_error.guidance_response`): 1 = the teacher's guidance effect reproduced, 0 = ω ignored. A user
whose `--guidance-scale` does nothing sees it here, for any teacher.
"""

from __future__ import annotations

import torch

from latent_consistency.evaluation.ode_error import error_timesteps, guidance_response, ode_solution_sets
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.solvers import get_solver
from latent_consistency.training.config import LCM_METHODS


def applies(config) -> bool:
    """A distillation into an LCM (a teacher to solve with) of a full student (an ω input) over a guidance range."""
    return (getattr(config, "method", None) in LCM_METHODS and config.adapter == "full" and config.omega_response_samples > 0
            and config.guidance_scale_min < config.guidance_scale_max)


@torch.no_grad()
def omega_response(config, teacher, f, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> dict[int, float]:
    """The ω response of the consistency function `f` per t, on `latents` (their first `omega_response_samples`)."""
    n = config.omega_response_samples
    x0, cond, uncond = latents[:n].float(), cond[:n], uncond.expand(len(latents[:n]), -1, -1)
    timesteps = error_timesteps(teacher.schedule.num_train_timesteps, config.skip)
    omegas = [omega_from_guidance_scale(g) for g in (config.guidance_scale_min, config.guidance_scale_max)]
    ends = ode_solution_sets(teacher, get_solver(config.solver), x0, cond, uncond, omegas, timesteps, config.skip,
                             torch.Generator().manual_seed(config.seed))
    return guidance_response(f, *ends)
