"""Samplers: the LCM multistep consistency sampler (Algorithm 3) and guided teacher baselines.

`sample_lcm` is a plain function over a consistency model `f(z, t, cond, omega) -> x̂0`
(`ConsistencyModel`); its timesteps are the ones diffusers' LCMScheduler picks, so a student behaves
the same here and in `LatentConsistencyModelPipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from latent_consistency.errors import UserError
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.schedule import NoiseSchedule, append_dims

TEACHER_SAMPLERS = ("ddim", "dpm", "dpm++")


def lcm_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """The n inference timesteps of Algorithm 3, chosen as diffusers' LCMScheduler.set_timesteps does.

    The skipping-step grid {k-1, 2k-1, ..., T-1} with k = T / original_inference_steps (Section 4.3) is
    reversed, and n entries are taken at the evenly spaced indices floor(i·N/n), i = 0..n-1.
    """
    if original_inference_steps < 1 or original_inference_steps > num_train_timesteps:
        raise UserError(f"original_inference_steps must be in 1..{num_train_timesteps}, got {original_inference_steps}")
    k = num_train_timesteps // original_inference_steps
    grid = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    if num_steps < 1 or num_steps > len(grid):
        raise UserError(
            f"steps must be between 1 and {len(grid)} (the model's T/k = {original_inference_steps} "
            f"distillation timesteps), got {num_steps}"
        )
    grid = grid[::-1]
    indices = np.floor(np.linspace(0, len(grid), num=num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(grid[indices].copy())


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> torch.Tensor:
    """Validate user-given inference timesteps: strictly decreasing integers in [0, T)."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise UserError("custom timesteps must not be empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise UserError(f"custom timesteps must be strictly decreasing, got {ts}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise UserError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}], got {ts}")
    return torch.tensor(ts, dtype=torch.long)


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it (same generator, same values)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


@torch.no_grad()
def sample_lcm(
    model,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    omega: float | torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Multistep latent consistency sampling, Algorithm 3 of Luo et al. 2023.

    For τ_1 > τ_2 > ... > τ_n: x̂0 = f(z, τ_i); if i < n, z = α_{τ_{i+1}}·x̂0 + σ_{τ_{i+1}}·ε with fresh ε.
    `latents` is the starting noise z_T ~ N(0, I). Returns the last x̂0.
    """
    z = latents
    x0 = z
    for i, tau in enumerate(timesteps):
        x0 = model(z, tau.to(z.device).expand(z.shape[0]), cond, omega)
        if i + 1 < len(timesteps):
            alpha, sigma = schedule.alpha_sigma(timesteps[i + 1].reshape(1))
            noise = randn(z.shape, generator, z.device, z.dtype)
            z = append_dims(alpha, z.ndim).to(z) * x0 + append_dims(sigma, z.ndim).to(z) * noise
    return x0


def teacher_scheduler(name: str, scheduler_config: dict):
    """A diffusers scheduler for a guided-teacher baseline: DDIM, DPM-Solver-2 or DPM-Solver++(2M)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=False, clip_sample=False)
    if name == "dpm":
        # diffusers' noise-prediction DPM-Solver cannot end at σ = 0; it ends at the schedule's σ_min instead
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise UserError(f"unknown teacher sampler {name!r}; use one of {', '.join(TEACHER_SAMPLERS)}")


@torch.no_grad()
def sample_teacher(
    teacher,
    sampler: str,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    num_steps: int,
    scheduler_config: dict,
) -> torch.Tensor:
    """Sample a `GuidedTeacher` with CFG (guidance in diffusers' g) using a diffusers scheduler.

    The three samplers are deterministic given the starting noise `latents`; returns the final latents.
    """
    if num_steps < 1:
        raise UserError(f"steps must be at least 1, got {num_steps}")
    # the scheduler reads the network's output as the teacher does
    scheduler = teacher_scheduler(sampler, dict(scheduler_config) | {"prediction_type": teacher.prediction_type})
    scheduler.set_timesteps(num_steps, device=latents.device)
    z = latents * scheduler.init_noise_sigma
    omega = omega_from_guidance_scale(guidance_scale)
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, t)
        out = teacher.guided_output(z_in, t, cond, uncond, omega)
        z = scheduler.step(out, t, z, return_dict=False)[0]
    return z
