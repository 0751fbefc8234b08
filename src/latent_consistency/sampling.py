"""Samplers: the LCM multistep consistency sampler (Algorithm 3), TCD's strategic stochastic sampling, and guided
teacher baselines.

`sample_lcm` and `sample_tcd` are plain functions over a consistency model `f(z, t, cond, omega) -> x̂0`
(`ConsistencyModel`); their timesteps are the ones diffusers' LCMScheduler (and TCDScheduler) picks, so a student
behaves the same here and in `LatentConsistencyModelPipeline` (or a pipeline with `TCDScheduler`). For img2img the
timesteps start lower (`lcm_timesteps(strength=...)`) and the sampler starts from the noised init latents.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from latent_consistency.errors import UserError
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.schedule import NoiseSchedule, append_dims

TEACHER_SAMPLERS = ("ddim", "dpm", "dpm++")


def floor_of_product(a: float, b: float) -> int:
    """⌊a·b⌋ of the decimals a user typed: 0.58·50 is 28.999999999999996 in floating point, and 29 here."""
    return math.floor(a * b + 1e-9)


def is_integer(value) -> bool:
    """An int (numpy's included), not a bool: a step count, seed or size a user gave."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (numpy's included), not a bool: a scale, strength or weight a user gave."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_strength(strength: float) -> None:
    """img2img's strength s ∈ (0, 1], NaN refused."""
    if not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1] (the fraction of the noise schedule the init image is noised to), got {strength:g}")


def lcm_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """The n inference timesteps of Algorithm 3, chosen as diffusers' LCMScheduler.set_timesteps does.

    The skipping-step grid {k-1, 2k-1, ..., T-1} with k = T / original_inference_steps (Section 4.3) is
    reversed, and n entries are taken at the evenly spaced indices floor(i·N/n), i = 0..n-1.

    img2img, strength s ∈ (0, 1]: the grid is cut to its first ⌊s·N⌋ points, so the n steps start at the grid
    timestep τ_1 = k·⌊s·N⌋ - 1 ≈ s·T, where the init image is noised to. This is what
    `LCMScheduler.set_timesteps(strength=s)` and so `LatentConsistencyModelImg2ImgPipeline` compute, except that
    ⌊s·N⌋ is taken of the decimal s (diffusers' int(N·s) floors 0.58·50 to 28, starting at 559 instead of 579). It is
    not what diffusers' generic img2img pipelines compute (`get_timesteps`, diffusers issue #7651, which an LCM-LoRA
    in `StableDiffusionImg2ImgPipeline` gets): they make the n timesteps of s = 1 and keep the last int(n·s), so the
    start is whichever of those lands there (4 steps at s = 0.6: 2 steps from 499) and n·s < 1 leaves no step.
    """
    if not is_integer(num_steps):
        raise UserError(f"steps must be an integer number of sampling steps, e.g. 4, got {num_steps!r}")
    if original_inference_steps < 1 or original_inference_steps > num_train_timesteps:
        raise UserError(f"original_inference_steps must be in 1..{num_train_timesteps}, got {original_inference_steps}")
    check_strength(strength)
    k = num_train_timesteps // original_inference_steps
    kept = floor_of_product(original_inference_steps, strength)
    if kept < 1:
        raise UserError(f"strength {strength:g} leaves no step: the model's lowest timestep {k - 1} needs strength >= "
                        f"{1 / original_inference_steps:g} (1 of its {original_inference_steps} distillation timesteps)")
    grid = np.arange(1, kept + 1) * k - 1
    if strength < 1 and num_steps > len(grid):
        raise UserError(f"strength {strength:g} keeps {kept} of the model's {original_inference_steps} distillation timesteps, "
                        f"fewer than {num_steps} steps: use steps <= {kept} or strength >= {num_steps / original_inference_steps:g}")
    if num_steps < 1 or num_steps > len(grid):
        raise UserError(
            f"steps must be between 1 and {len(grid)} (the model's T/k = {original_inference_steps} "
            f"distillation timesteps), got {num_steps}"
        )
    grid = grid[::-1]
    indices = np.floor(np.linspace(0, len(grid), num=num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(grid[indices].copy())


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> torch.Tensor:
    """Validate user-given inference timesteps (a sequence, or a 1-D or 0-d tensor or array on any device): strictly
    decreasing integers in [0, T). A bare number is refused, not read as one timestep: `timesteps=4` is most likely meant
    as 4 steps, which are `generator.timesteps(4)`."""
    if isinstance(timesteps, (torch.Tensor, np.ndarray)):
        if isinstance(timesteps, torch.Tensor) and timesteps.is_meta:
            raise UserError("custom timesteps are a tensor on the meta device, which holds no values: give them on the CPU")
        if timesteps.ndim > 1:
            raise UserError(f"custom timesteps must be one timestep per step (a 1-D tensor), got shape {list(timesteps.shape)}")
        values = timesteps.reshape(-1).tolist()
    elif isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Iterable):
        raise UserError(f"timesteps must be a list or 1-D tensor of timesteps, e.g. generator.timesteps(4) for 4 steps, "
                        f"got {timesteps!r:.40}")
    else:
        values = list(timesteps)
    if any(isinstance(t, bool) or not isinstance(t, numbers.Real) or not float(t).is_integer() for t in values):
        raise UserError(f"custom timesteps must be integers, got {values}")
    ts = [int(t) for t in values]
    if not ts:
        raise UserError("custom timesteps must not be empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise UserError(f"custom timesteps must be strictly decreasing, got {ts}")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise UserError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}], got {ts}")
    return torch.tensor(ts, dtype=torch.long)


def check_start(model, latents: torch.Tensor, cond: torch.Tensor, generator, omega) -> None:
    """A sampler's starting noise, condition, ω and generators, refused in one line where they would fail deep in the network
    or in `randn`: floating-point latents and a condition the model's network takes (`ConsistencyModel.check_inputs`, where
    the model knows its network), ω for every latent (`check_omega`), and a torch.Generator, None, or a list of them with
    one per latent (row i's noise is drawn from the i-th)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        what = latents.dtype if isinstance(latents, torch.Tensor) else f"a {type(latents).__name__}"
        raise UserError(f"the latents must be a floating-point tensor (the starting noise z_T), got {what}")
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(latents) or not all(isinstance(g, torch.Generator) for g in generator):
            raise UserError(f"give one torch.Generator per latent ({len(latents)}), got {len(generator)} item(s): row i's noise is "
                            "drawn from generator[i]")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise UserError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), a list of them, one per "
                        f"latent, or None, got {generator!r:.40}")
    check_omega(omega, len(latents))
    check = getattr(model, "check_inputs", None)
    if check is not None:
        check(latents, cond)


def check_omega(omega, rows: int) -> None:
    """ω of Eq. 12 (ω = g - 1) as a consistency model takes it (`denoisers.omega_embedding`): a real number, or a tensor (a
    list) of one value for every row or one per row of `rows` latents, in any shape ([B] or [B, 1]). Refused in one line
    where torch failed deep in the network (another number of values) or took it in silence (NaN: NaN images)."""
    try:
        values = omega if isinstance(omega, torch.Tensor) else torch.as_tensor(omega, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or isinstance(omega, (bool, str)) or values.dtype == torch.bool or values.is_complex():
        raise UserError(f"omega must be a number (ω = g - 1, g the guidance scale) or a tensor of them, got {omega!r:.40}")
    if values.numel() not in (1, rows):
        raise UserError(f"omega must be one number or one per latent ({rows}), got shape {list(values.shape)}: row i is "
                        "guided with omega[i]")
    if not bool(torch.isfinite(values).all()):
        raise UserError("omega holds NaN or infinity: ω = g - 1 must be a finite number")


def check_tcd_steps(steps: int, gamma: str = "gamma", more: str = "2 or more steps (or 2 timesteps)") -> None:
    """γ with one step, refused: TCD re-injects fresh noise between steps (`sample_tcd`), and one step has no next one,
    so every γ makes the same image, which is not Algorithm 3's either (it keeps σ_0·ε̂). The one rule of the Python call,
    `lcm generate` and `lcm serve`, each naming γ and the steps as its user gives them (`gamma`, `more`)."""
    if steps == 1:
        raise UserError(f"{gamma} is TCD's share of fresh noise between steps, and one step has no next one: every {gamma} makes "
                        f"the same image; give {more}, or leave {gamma} out")


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
    timesteps = check_custom_timesteps(timesteps, schedule.num_train_timesteps)  # a list too; decreasing ints in [0, T)
    check_start(model, latents, cond, generator, omega)
    z = latents
    x0 = z
    for i, tau in enumerate(timesteps):
        x0 = model(z, tau.to(z.device).expand(z.shape[0]), cond, omega)
        if i + 1 < len(timesteps):
            alpha, sigma = schedule.alpha_sigma(timesteps[i + 1].reshape(1))
            noise = randn(z.shape, generator, z.device, z.dtype)
            z = append_dims(alpha, z.ndim).to(z) * x0 + append_dims(sigma, z.ndim).to(z) * noise
    return x0


def tcd_timestep(tau_next: int, gamma: float) -> int:
    """s = ⌊(1-γ)·τ_{i+1}⌋: where strategic stochastic sampling (Zheng et al. 2024) goes deterministically before
    re-noising to τ_{i+1}. γ = 0: s = τ_{i+1} (no fresh noise); γ = 1: s = 0 (all fresh noise, as Algorithm 3)."""
    return floor_of_product(1 - gamma, int(tau_next))


def check_gamma(gamma: float) -> float:
    """γ of strategic stochastic sampling (`sample_tcd`) as a float: a real number in [0, 1] (NaN and bools refused)."""
    if not is_real(gamma):
        raise UserError(f"gamma must be a number in [0, 1] (0: deterministic, 1: fresh noise every step), got {gamma!r:.40}")
    if not 0 <= gamma <= 1:
        raise UserError(f"gamma must be in [0, 1] (0: deterministic, 1: fresh noise every step), got {gamma:.15g}")
    return float(gamma)


@torch.no_grad()
def sample_tcd(
    model,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    omega: float | torch.Tensor,
    schedule: NoiseSchedule,
    gamma: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Strategic stochastic sampling (Zheng et al. 2024, Trajectory Consistency Distillation, arXiv:2402.19159) with a
    consistency model; γ ∈ [0, 1] is diffusers' `TCDScheduler.step(eta=γ)`.

    For τ_1 > ... > τ_n (the timesteps of Algorithm 3) and τ_{n+1} = 0, step i:

        x̂0 = f(z, τ_i)                                   the consistency function (Eq. 9 of Luo et al. 2023)
        ε̂  = (z - α_{τ_i}·x̂0) / σ_{τ_i}                    the noise x̂0 implies at τ_i
        s  = ⌊(1-γ)·τ_{i+1}⌋
        z_s = α_s·x̂0 + σ_s·ε̂                              DDIM from τ_i to s along the model's trajectory
        z  = (α_{τ_{i+1}}/α_s)·z_s + √(1 - ᾱ_{τ_{i+1}}/ᾱ_s)·ε     forward noising from s to τ_{i+1}, fresh ε (i < n)

    and the result is the last z_s, at s = 0. No noise is drawn when γ = 0 (a deterministic sampler) or at the last
    step, as in diffusers, so a generator's draws (and images) match `StableDiffusionPipeline` with `TCDScheduler`.

    Where this differs from `TCDScheduler` (its arithmetic is otherwise the same):
    - On a zero-terminal-SNR schedule ε̂ = (z - α·x̂0)/σ at τ = T-1 takes our α_{T-1}, raised from 0 (`NoiseSchedule`),
      where TCDScheduler's is 0: up to 1.6e-4 in the images (γ 0-0.3, 4-8 steps).
    - x̂0 is f, with the boundary scalings c_skip, c_out of Eq. 9 that the LCM was distilled with; TCDScheduler takes
      the network's raw x̂0 (TCD's own models have no c_skip). z_s differs by (α_s - σ_s·α_τ/σ_τ)·(f - x̂0_raw), with
      f - x̂0_raw = c_skip·(z - x̂0_raw) + (c_out - 1)·x̂0_raw, of order c_skip(τ) ≈ (σ_data / (10·τ))²: 2.5e-7 at
      τ = 100 (every τ of 1-8 steps on a 50-point grid is above 100), 7e-6 at τ = 19.
    - ⌊(1-γ)·τ⌋ is taken of the decimal γ (`floor_of_product`); TCDScheduler floors a float32 product, which for
      some round τ (γ = 0.16, τ = 300: 251, not 252) is one lower. On the LCM grid (τ = jk - 1) they agree at the
      γ the tests try.
    - The last step lands on timestep 0, as in TCDScheduler and TCD's reference code (its `final_alpha_cumprod` is
      never reached): the output keeps σ_0·ε̂ (σ_0 = 0.029 on SD's schedule), where Algorithm 3 returns x̂0. For an LCM
      both are samples: timestep 0 is the data end of its trajectory (c_skip(0) = 1, f(z, 0) = z). So γ = 1 is
      Algorithm 3 up to that σ_0 and the re-noising from z_0 rather than x̂0; `sample_lcm` is Algorithm 3 exactly.
    """
    gamma = check_gamma(gamma)
    taus = check_custom_timesteps(timesteps, schedule.num_train_timesteps).tolist()
    check_start(model, latents, cond, generator, omega)
    z = latents
    for i, tau in enumerate(taus):
        x0 = model(z, torch.full((z.shape[0],), tau, dtype=torch.long, device=z.device), cond, omega)
        alpha, sigma = (v.to(z) for v in schedule.alpha_sigma(torch.tensor(tau)))
        eps = (z - alpha * x0) / sigma
        tau_next = taus[i + 1] if i + 1 < len(taus) else 0
        s = tcd_timestep(tau_next, gamma)
        alpha_s, sigma_s = (v.to(z) for v in schedule.alpha_sigma(torch.tensor(s)))
        z = alpha_s * x0 + sigma_s * eps
        if i + 1 < len(taus) and gamma > 0:
            ratio = (schedule.alphas_cumprod[tau_next] / schedule.alphas_cumprod[s]).to(z)
            z = ratio.sqrt() * z + (1 - ratio).sqrt() * randn(z.shape, generator, z.device, z.dtype)
    return z


def teacher_scheduler(name: str, scheduler_config: dict):
    """A diffusers scheduler for a guided-teacher baseline: DDIM, DPM-Solver-2 or DPM-Solver++(2M)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=False, clip_sample=False)
    if name == "dpm":
        # diffusers' noise-prediction DPM-Solver cannot end at σ = 0; it ends at the schedule's σ_min instead. diffusers
        # deprecates it in favour of DPM-Solver++, with a FutureWarning on every construction: Table 1 has both rows
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`?algorithm_types? dpmsolver", category=FutureWarning)
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise UserError(f"unknown teacher sampler {name!r}; use one of {', '.join(TEACHER_SAMPLERS)}")


def usable_steps(scheduler, num_steps: int) -> bool:
    """Whether `scheduler.set_timesteps(num_steps)` gives `num_steps` distinct timesteps in [0, T)."""
    scheduler.set_timesteps(num_steps)
    ts = [int(t) for t in scheduler.timesteps]
    return len(ts) == num_steps and len(set(ts)) == num_steps and max(ts) < int(scheduler.config.num_train_timesteps)


def check_teacher_steps(sampler: str, scheduler_config: dict, num_steps: int):
    """`sampler`'s diffusers scheduler (`teacher_scheduler`) with its `num_steps` timesteps set; a UserError, naming the most
    steps that work, where they are not distinct timesteps in [0, T). Front ends call it before they write anything."""
    if not is_integer(num_steps):
        raise UserError(f"steps must be an integer number of sampling steps, e.g. 4, got {num_steps!r}")
    if num_steps < 1:
        raise UserError(f"steps must be at least 1, got {num_steps}")
    scheduler = teacher_scheduler(sampler, scheduler_config)
    if not usable_steps(scheduler, num_steps):
        # "leading" spacing adds steps_offset (SD's 1) to the timesteps: near T steps they start past T-1 (DDIM would index ᾱ_T
        # and fail; DPM-Solver clamps σ, repeats it and divides by the zero step: NaN) or repeat one timestep (DPM-Solver at T)
        most = next(n for n in range(num_steps - 1, 0, -1) if usable_steps(scheduler, n))
        raise UserError(f"{num_steps} {sampler} steps under this model's scheduler config (timestep_spacing "
                        f"{scheduler.config.timestep_spacing!r}, steps_offset {scheduler.config.steps_offset}) are not distinct timesteps "
                        f"in 0..{int(scheduler.config.num_train_timesteps) - 1}: use at most {most}")
    return scheduler


# An ODE solver's start timestep with ᾱ above this reads the starting noise as more signal than noise (SNR > 1)
CLEAN_START_ALPHA_CUMPROD = 0.5


def solver_start_note(model, sampler: str, steps: int, steps_flag: str | None = "--steps") -> str | None:
    """A note when `steps` steps of `sampler` start where the model reads pure noise as a nearly clean latent: SD's "leading"
    spacing puts one DDIM step at timestep 1, so the image is the starting noise itself (diffusers' pipelines do the same).
    `lcm generate --sampler` and the teacher's rows of `lcm evaluate` say it, with the fewest steps that start elsewhere
    as a value of their `steps_flag`; a caller with no such flag (`lcm demo`, whose table is fixed at 1/2/4/8 steps) gives
    None and the note names no flag."""
    schedule = model.schedule

    def clean_start(n: int) -> int | None:
        scheduler = teacher_scheduler(sampler, model.scheduler_config)
        if not usable_steps(scheduler, n):  # sets its n timesteps; counts that are no distinct timesteps are refused elsewhere
            return None
        t = int(scheduler.timesteps[0])
        return t if float(schedule.alphas_cumprod[t]) > CLEAN_START_ALPHA_CUMPROD else None

    start = clean_start(steps)
    if start is None:
        return None
    fewest = next((n for n in range(steps + 1, schedule.num_train_timesteps + 1) if clean_start(n) is None), None)
    config = model.scheduler_config
    return (f"{steps} {sampler} step(s) under this model's scheduler config (timestep_spacing {config.get('timestep_spacing')!r}, "
            f"steps_offset {config.get('steps_offset')}) start at timestep {start}, where the network reads the starting noise as a "
            f"nearly clean latent (ᾱ = {float(schedule.alphas_cumprod[start]):.3f}), so the images keep that noise, as in diffusers' "
            "pipelines" + (f"; give {steps_flag} {fewest} or more" if fewest and steps_flag else ""))


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
    # the scheduler reads the network's output as the teacher does
    scheduler = check_teacher_steps(sampler, dict(scheduler_config) | {"prediction_type": teacher.prediction_type}, num_steps)
    scheduler.set_timesteps(num_steps, device=latents.device)
    z = latents * scheduler.init_noise_sigma
    # g <= 1 runs no unconditional pass, as diffusers' pipelines (`do_classifier_free_guidance` is g > 1): the conditional
    # output alone, not (1+ω)·ε_c - ω·ε_u with ω < 0, which moves towards the unconditional (g = 0: it is ε_u)
    # (a teacher of cond and uncond passes, `shares_guidance_work`; an ω-conditioned one takes its ω input as given)
    cfg = getattr(teacher, "shares_guidance_work", False)
    omega = omega_from_guidance_scale(1.0 if cfg and guidance_scale <= 1 else guidance_scale)
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, t)
        out = teacher.guided_output(z_in, t, cond, uncond, omega)
        z = scheduler.step(out, t, z, return_dict=False)[0]
    return z
