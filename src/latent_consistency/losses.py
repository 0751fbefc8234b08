"""The training objectives as small callables returning a per-sample loss [B].

- `LCDLoss`: latent consistency distillation, Algorithm 1 of Luo et al. 2023. The target comes from one
  jump of the guided teacher from t_{n+k} to t_n (Eq. 17) and the EMA target network θ⁻.
- `GuidancePairLCDLoss`: LCD with each example at two guidance scales and a term on their difference (ours).
- `GuidanceDistillationLoss`: stage one of Guided-Distill (Meng et al. 2023): CFG's output learned as an ω input.
- `ProgressiveDistillationLoss`: its stage two, one round of progressive distillation (Salimans & Ho 2022).
- `ODERegressionLoss`: the student regressed onto the teacher's exact ODE solutions at two ω each (ours,
  `training.ode_targets`): LCD's fixed point as the target instead of the bootstrapped f_θ⁻.
- `LCFLoss`: latent consistency fine-tuning, Algorithm 4. No teacher: z_{t_n} and z_{t_{n+k}} are noised
  from the same latent with the same ε.

All draw (n, ω, ε) the same way (`draw_point`) and weight each sample's distance by λ(t_n) (1 for the
paper's uniform weighting, `consistency_weight` for iCT's), so they share one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.parameterization import (
    check_guidance_scale_range,
    check_prediction_type,
    model_output_from,
    omega_from_guidance_scale,
    x0_and_eps,
)
from latent_consistency.schedule import NoiseSchedule, append_dims, batch_rows, consistency_pairs, skipping_grid
from latent_consistency.solvers import Solver, ddim_jump, guide_increments_of, guided_jump, unguided_jumps


def _squared(diff: torch.Tensor, huber_c: float) -> torch.Tensor:
    return diff**2


def _pseudo_huber(diff: torch.Tensor, huber_c: float) -> torch.Tensor:
    return torch.sqrt(diff**2 + huber_c**2) - huber_c


# d(·,·) per element, by name: mean squared error, or the pseudo-Huber √((a-b)² + c²) - c (Song & Dhariwal 2023, Sec. 3.3,
# where it is taken of the whole sample's norm ‖a - b‖ with c = 0.00054·√dim; per element here, as diffusers' LCD scripts do)
DISTANCES = {"l2": _squared, "huber": _pseudo_huber}


def check_distance(name: str) -> str:
    if name not in DISTANCES:
        raise UserError(f"unknown loss {name!r}; use one of {', '.join(DISTANCES)}")
    return name


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """d(·,·) of Algorithm 1 per sample: the `DISTANCES` entry per element, averaged over each sample's elements
    (pseudo-Huber per element, as diffusers' LCD scripts do)."""
    return DISTANCES[check_distance(kind)](pred.float() - target.float(), huber_c).flatten(1).mean(1)


def consistency_weight(schedule: NoiseSchedule, t_n_plus_k: torch.Tensor, t_n: torch.Tensor) -> torch.Tensor:
    """λ(t_n) = 1 / (σ̃(t_{n+k}) − σ̃(t_n)) with σ̃ = σ_t/α_t, the improved consistency training weighting
    (Song & Dhariwal 2023, Sec. 3.1) on the VP schedule's EDM noise levels.

    It weights a pair by the inverse of its noise-level gap, so the small and middle noise levels, where the
    distance between consistent outputs is small, are not drowned by the large errors near t = T. A pair
    with no gap (t_{n+k} = t_n = 0, skip 1) is weighted 0: both sides are z_0 by the boundary condition.
    """
    a, s = schedule.alpha_sigma(t_n_plus_k)
    a_n, s_n = schedule.alpha_sigma(t_n)
    gap = s / a - s_n / a_n
    return torch.where(gap > 0, 1.0 / gap.clamp_min(torch.finfo(gap.dtype).tiny), torch.zeros_like(gap))


def uniform_weight(schedule: NoiseSchedule, t_n_plus_k: torch.Tensor, t_n: torch.Tensor) -> torch.Tensor:
    """λ(t_n) = 1: the paper's Algorithm 1."""
    return torch.ones(t_n.shape, dtype=torch.float64)


# λ(t_n) per grid pair, by name
WEIGHTINGS = {"uniform": uniform_weight, "ict": consistency_weight}


def check_weighting(name: str) -> str:
    if name not in WEIGHTINGS:
        raise UserError(f"unknown loss weighting {name!r}; use one of {', '.join(WEIGHTINGS)}")
    return name


@dataclass
class TrainingPoint:
    """One draw of Algorithm 1/4: grid pair (t_{n+k}, t_n), guidance ω and noise ε per sample."""

    t_n_plus_k: torch.Tensor
    t_n: torch.Tensor
    omega: torch.Tensor
    noise: torch.Tensor
    weight: torch.Tensor  # λ(t_n) of the loss weighting; ones for "uniform"


@dataclass(frozen=True)
class MicroBatchDraws:
    """The random draws of micro-batch `index` of the `count` equal ones a batch is split into: each draw is made for the
    whole batch from `generator` (one seeded alike for every micro-batch) and sliced to this micro-batch's rows, so that
    an example draws the same n, ω and ε however its batch is split (--grad-accumulation, `training.loop`)."""

    generator: torch.Generator
    index: int
    count: int


def draw(sample, size: tuple[int, ...], generator: torch.Generator | MicroBatchDraws | None, **kwargs) -> torch.Tensor:
    """`sample(size, generator=generator, **kwargs)` (torch.rand, torch.randn, torch.randint with its range bound); for
    `MicroBatchDraws`, the micro-batch's rows of that draw for the whole batch."""
    if not isinstance(generator, MicroBatchDraws):
        return sample(size, generator=generator, **kwargs)
    rows = size[0]
    whole = sample((rows * generator.count, *size[1:]), generator=generator.generator, **kwargs)
    return whole[generator.index * rows:(generator.index + 1) * rows]


@dataclass
class ConsistencyObjective:
    """What LCD and LCF share: the schedule, the skipping step k, the ω range and the distance."""

    schedule: NoiseSchedule
    skip: int = 20
    guidance_scale_range: tuple[float, float] = (3.0, 15.0)  # diffusers' g; the paper's ω ∈ [2, 14]
    distance: str = "huber"
    huber_c: float = 0.001
    weighting: str = "uniform"  # "uniform" (the paper's Algorithm 1) or "ict" (`consistency_weight`)

    def __post_init__(self):
        self.grid = skipping_grid(self.schedule.num_train_timesteps, self.skip)
        check_distance(self.distance)
        check_guidance_scale_range(*self.guidance_scale_range)
        # λ per grid pair, normalised to mean 1 over the grid, so that the learning rate keeps its meaning
        weights = WEIGHTINGS[check_weighting(self.weighting)](self.schedule, *consistency_pairs(self.grid, torch.arange(len(self.grid)), self.skip))
        self.grid_weights = weights.float() / weights.float().mean()

    def draw_point(self, latents: torch.Tensor, generator: torch.Generator | MicroBatchDraws | None = None) -> TrainingPoint:
        """n ~ U{grid}, ω ~ U[ω_min, ω_max], ε ~ N(0, I), all from `generator` (on the latents' device)."""
        b, device = latents.shape[0], latents.device
        index = draw(partial(torch.randint, 0, len(self.grid)), (b,), generator, device=device)
        t_n_plus_k, t_n = consistency_pairs(self.grid.to(device), index, self.skip)
        omega = self.draw_omega(b, device, generator)
        noise = draw(torch.randn, latents.shape, generator, device=device, dtype=latents.dtype)
        return TrainingPoint(t_n_plus_k, t_n, omega, noise, self.grid_weights.to(device)[index])

    def draw_omega(self, b: int, device, generator: torch.Generator | MicroBatchDraws | None = None) -> torch.Tensor:
        """ω ~ U[ω_min, ω_max] per example (ω = g − 1 of the guidance scale range)."""
        w_min, w_max = (omega_from_guidance_scale(g) for g in self.guidance_scale_range)
        return w_min + (w_max - w_min) * draw(torch.rand, (b,), generator, device=device)

    def d(self, pred: torch.Tensor, target: torch.Tensor, point: TrainingPoint) -> torch.Tensor:
        """λ(t_n)·d(pred, target) per sample."""
        return point.weight * consistency_distance(pred, target, self.distance, self.huber_c)


@dataclass(kw_only=True)
class LCDLoss(ConsistencyObjective):
    """Latent consistency distillation (Algorithm 1):

    d( f_θ(z_{t_{n+k}}, ω, c, t_{n+k}),  f_θ⁻(ẑ_{t_n}, ω, c, t_n) ),  ẑ_{t_n} = Ψ(z_{t_{n+k}}, t_{n+k}, t_n, c; ω).
    """

    teacher: GuidedTeacher
    solver: Solver
    guide_increments: bool = False

    def __call__(self, student, target, latents, cond, uncond, generator=None) -> torch.Tensor:
        p = self.draw_point(latents, generator)
        z = self.schedule.add_noise(latents, p.noise, p.t_n_plus_k)
        with torch.no_grad():
            # Teacher jump t_{n+k} -> t_n along the augmented PF-ODE (Eq. 17)
            z_hat = guided_jump(self.solver, self.teacher, z, p.t_n_plus_k, p.t_n, cond, uncond, p.omega, self.guide_increments)
            # Target f_θ⁻ at the earlier point
            tgt = target(z_hat.to(z.dtype), p.t_n, cond, p.omega)
        pred = student(z, p.t_n_plus_k, cond, p.omega)
        return self.d(pred, tgt, p)


@dataclass(kw_only=True)
class GuidancePairLCDLoss(LCDLoss):
    """LCD with every example drawn at two guidance scales (ours, not the paper's).

    With the same z, n and ε at ω and a second draw ω', the loss is

        ½ [d(f(ω), F(ω)) + d(f(ω'), F(ω'))] + λ_Δ · d(f(ω) − f(ω'), F(ω) − F(ω')),   F(ω) = f_θ⁻(ẑ_{t_n}^ω, ω),

    whose last term is the target's dependence on ω alone: with one ω per example it is a small part of a
    residual dominated by errors common to all ω, and a student can end a run ignoring its ω input
    (`evaluation.ode_error.guidance_response`). It costs a second target and student evaluation per
    example, and a second teacher jump less its first evaluation, which both ω share.

    With `pair_steps` N > 0 the difference term applies for the first N training steps only (the loop sets `step`);
    after them the loss is Algorithm 1's on both draws. That loss copies the ω dependence learned so far to the larger t
    but loses it at the small t, so the term cannot stop early; a plain tail after a long pair phase sharpens the
    images and keeps most of it (docs/notes/2026-12-02-omega.md).
    """

    guidance_pair_weight: float  # λ_Δ
    pair_steps: int = 0  # the difference term's last step + 1 (0: every step)
    step: int = 0  # the training step, set by the loop before each call

    def __post_init__(self):
        super().__post_init__()
        if not self.guidance_pair_weight > 0:
            raise UserError(f"guidance_pair_weight must be > 0, got {self.guidance_pair_weight}")
        if self.pair_steps < 0:
            raise UserError(f"pair_steps must be 0 or more, got {self.pair_steps}")

    @property
    def pair_weight(self) -> float:
        """λ_Δ at the current step."""
        return self.guidance_pair_weight if self.pair_steps == 0 or self.step < self.pair_steps else 0.0

    def __call__(self, student, target, latents, cond, uncond, generator=None) -> torch.Tensor:
        p = self.draw_point(latents, generator)
        z = self.schedule.add_noise(latents, p.noise, p.t_n_plus_k)
        cond, uncond = batch_rows(cond, len(z)), batch_rows(uncond, len(z))  # before the rows are doubled
        omega = torch.cat([p.omega, self.draw_omega(latents.shape[0], latents.device, generator)])  # ω, then ω'
        z2, t_n_plus_k, t_n, cond2 = (_twice(x) for x in (z, p.t_n_plus_k, p.t_n, cond))
        with torch.no_grad():
            z_hat = self._teacher_jumps(z, p.t_n_plus_k, p.t_n, cond, uncond, omega)
            tgt = target(z_hat.to(z.dtype), t_n, cond2, omega)
        pred = student(z2, t_n_plus_k, cond2, omega)
        (pred, pred_pair), (tgt, tgt_pair) = pred.chunk(2), tgt.chunk(2)
        loss = 0.5 * (self.d(pred, tgt, p) + self.d(pred_pair, tgt_pair, p))
        if self.pair_weight == 0:
            return loss
        return loss + self.pair_weight * self.d(pred - pred_pair, tgt - tgt_pair, p)

    def _teacher_jumps(self, z, t, s, cond, uncond, omega) -> torch.Tensor:
        """Ψ(z_t, t, s, c; ω) for the 2B values of `omega` (ω for the B rows, then ω'), 2B rows.

        What does not depend on ω runs once on the B rows: the first evaluation (guidance per evaluation), or
        both unguided solver runs (per increment).
        """
        if not self.teacher.shares_guidance_work:
            return guided_jump(self.solver, self.teacher, *(_twice(x) for x in (z, t, s, cond, uncond)), omega, self.guide_increments)
        if self.guide_increments:
            z_c, z_u = unguided_jumps(self.solver, self.teacher, z, t, s, cond, uncond)
            return guide_increments_of(*(_twice(x) for x in (z, z_c, z_u)), omega)
        out_c, out_u = self.teacher.outputs(z, t, cond, uncond)
        z, t, s, cond, uncond, out_c, out_u = (_twice(x) for x in (z, t, s, cond, uncond, out_c, out_u))
        first = self.teacher.x0_and_eps(self.teacher.guide(out_c, out_u, omega, z), z, t)
        return self.solver.jump(lambda z_, t_: self.teacher.guided(z_, t_, cond, uncond, omega), z, t, s, self.teacher.schedule,
                                first=first)


def _twice(x: torch.Tensor) -> torch.Tensor:
    """The batch x followed by itself."""
    return x.repeat(2, *[1] * (x.ndim - 1))


@dataclass(kw_only=True)
class GuidanceDistillationLoss:
    """Stage one of Guided-Distill (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Eq. 5): an
    ω-conditioned student matches the teacher's classifier-free guided output in one network evaluation,

        d( out_θ(z_t, ω, c, t),  (1+ω)·out(z_t, c, t) − ω·out(z_t, ∅, t) ),   t ~ U{0..T-1}, ω ~ U[ω_min, ω_max],

    both in the student's parameterisation (the guided teacher's x̂0 and ε̂ are converted to it). Not a
    consistency loss: `target` (the EMA of the student, exported) is not used.
    """

    schedule: NoiseSchedule
    teacher: GuidedTeacher
    prediction_type: str  # the student's
    guidance_scale_range: tuple[float, float] = (3.0, 15.0)
    distance: str = "l2"
    huber_c: float = 0.001

    def __post_init__(self):
        check_distance(self.distance)
        check_guidance_scale_range(*self.guidance_scale_range)
        check_prediction_type(self.prediction_type)

    def __call__(self, student, target, latents, cond, uncond, generator=None) -> torch.Tensor:
        b, device = latents.shape[0], latents.device
        t = draw(partial(torch.randint, 0, self.schedule.num_train_timesteps), (b,), generator, device=device)
        w_min, w_max = (omega_from_guidance_scale(g) for g in self.guidance_scale_range)
        omega = w_min + (w_max - w_min) * draw(torch.rand, (b,), generator, device=device)
        noise = draw(torch.randn, latents.shape, generator, device=device, dtype=latents.dtype)
        z = self.schedule.add_noise(latents, noise, t)
        with torch.no_grad():
            # The teacher's guided output, as the student's parameterisation
            x0, eps = self.teacher.guided(z, t, cond, uncond, omega)
            alpha, sigma = self.schedule.alpha_sigma(t)
            guided = model_output_from(x0, eps, alpha, sigma, self.prediction_type)
        return consistency_distance(student.output(z, t, cond, omega), guided, self.distance, self.huber_c)


def progressive_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The `steps` DDIM timesteps of a progressively distilled model, T−1 first, evenly spaced ("trailing", as diffusers'
    DDIMScheduler spaces them with timestep_spacing="trailing"); each round's grid is every other one of its teacher's."""
    if steps < 1 or num_train_timesteps % steps:
        raise UserError(f"progressive distillation needs a step count that divides the {num_train_timesteps} training timesteps, got {steps}")
    return torch.arange(steps, 0, -1) * (num_train_timesteps // steps) - 1


@dataclass(kw_only=True)
class ProgressiveDistillationLoss:
    """One round of progressive distillation (Salimans & Ho 2022), stage two of Guided-Distill (Meng et al. 2023): a
    student that samples in `student_steps` DDIM steps learns in one step what its (ω-conditioned) teacher does in two.

    For a student step t → s on its grid, with the teacher's grid point m between them, the teacher's two DDIM jumps
    give z_s from z_t; the student's x̂0 must be the x̃ whose one DDIM jump lands there,

        x̃ = (z_s − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t),

    with the weight max(α_t²/σ_t², 1) (truncated SNR) on d(x̂0, x̃) (the paper: squared L2). The last step ends at
    t = 0, as diffusers' DDIM does without set_alpha_to_one.
    """

    schedule: NoiseSchedule
    teacher: GuidedTeacher
    student_steps: int
    guidance_scale_range: tuple[float, float] = (3.0, 15.0)
    distance: str = "l2"
    huber_c: float = 0.001

    def __post_init__(self):
        check_guidance_scale_range(*self.guidance_scale_range)
        teacher_grid = progressive_timesteps(self.schedule.num_train_timesteps, 2 * self.student_steps)
        self.path = torch.cat([teacher_grid, torch.zeros(1, dtype=torch.long)]).view(-1)  # t_0 > m_0 > t_1 > ... > 0

    def __call__(self, student, target, latents, cond, uncond, generator=None) -> torch.Tensor:
        b, device = latents.shape[0], latents.device
        k = draw(partial(torch.randint, 0, self.student_steps), (b,), generator, device=device)
        path = self.path.to(device)
        t, m, s = path[2 * k], path[2 * k + 1], path[2 * k + 2]
        w_min, w_max = (omega_from_guidance_scale(g) for g in self.guidance_scale_range)
        omega = w_min + (w_max - w_min) * draw(torch.rand, (b,), generator, device=device)
        noise = draw(torch.randn, latents.shape, generator, device=device, dtype=latents.dtype)
        z = self.schedule.add_noise(latents, noise, t)
        with torch.no_grad():
            # The teacher's two DDIM steps t -> m -> s, guided by ω
            def denoise(z_, t_):
                return self.teacher.guided(z_, t_, cond, uncond, omega)

            z_s = ddim_jump(denoise, ddim_jump(denoise, z, t, m, self.schedule), m, s, self.schedule)
            (a_t, s_t), (a_s, s_s) = (tuple(append_dims(v, z.ndim).to(z) for v in self.schedule.alpha_sigma(x)) for x in (t, s))
            x_tilde = (z_s - (s_s / s_t) * z) / (a_s - (s_s / s_t) * a_t)
            snr = (a_t / s_t) ** 2
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0 = x0_and_eps(student.output(z, t, cond, omega), z, alpha, sigma, student.prediction_type)[0]
        return snr.clamp(min=1).flatten() * consistency_distance(x0, x_tilde, self.distance, self.huber_c)


@dataclass
class ODERegressionLoss:
    """Regression onto the guided teacher's ODE solutions (`training.ode_targets.ODETargets`), per drawn bank row:

        ½ [d(f_θ(z_t, ω, c, t), ψ(ω)) + d(f_θ(z_t, ω', c, t), ψ(ω'))] + λ_Δ · d(f_θ(ω) − f_θ(ω'), ψ(ω) − ψ(ω')),

    ψ(ω) = f*(z_t, ω, c, t) the teacher's solution from z_t to 0 (Algorithm 1's fixed point). Without λ_Δ the guidance
    effect ψ(ω) − ψ(ω') is a small part of each residual; the last term fits it alone, as `GuidancePairLCDLoss` does
    for LCD's bootstrapped targets. A micro-batch of B draws B/2 rows with replacement from the step's generator (so a
    resumed run draws what the uninterrupted one would have), two student evaluations each: B per step, as LCD. The
    batch's latents are not used (the bank was built from the data), nor is the target network.
    """

    bank: object  # ODETargets
    distance: str = "l2"
    huber_c: float = 0.001
    guidance_pair_weight: float = 0.0  # λ_Δ

    def __post_init__(self):
        check_distance(self.distance)
        if self.guidance_pair_weight < 0:
            raise UserError(f"guidance_pair_weight must be 0 or more, got {self.guidance_pair_weight}")

    def __call__(self, student, target, latents, cond=None, uncond=None, generator=None) -> torch.Tensor:
        bank = self.bank  # on the run's device (`training.ode_targets.ode_targets_for_run`)
        rows = draw(partial(torch.randint, 0, len(bank)), (max(1, latents.shape[0] // 2),), generator, device=bank.z.device)
        z, t, c, omega, psi = (x[rows] for x in (bank.z, bank.t, bank.cond, bank.omega, bank.solution))
        pred = student(_twice(z), _twice(t), _twice(c), torch.cat([omega[:, 0], omega[:, 1]]))
        pred, pred_pair = pred.chunk(2)
        loss = 0.5 * (self.d(pred, psi[:, 0]) + self.d(pred_pair, psi[:, 1]))
        if self.guidance_pair_weight == 0:
            return loss
        return loss + self.guidance_pair_weight * self.d(pred - pred_pair, psi[:, 0] - psi[:, 1])

    def d(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return consistency_distance(pred, target, self.distance, self.huber_c)


@dataclass
class LCFLoss(ConsistencyObjective):
    """Latent consistency fine-tuning (Algorithm 4): both points from the same data and the same ε.

    d( f_θ(z_{t_{n+k}}, ω, c, t_{n+k}),  f_θ⁻(z_{t_n}, ω, c, t_n) ).
    """

    def __call__(self, student, target, latents, cond, uncond=None, generator=None) -> torch.Tensor:
        p = self.draw_point(latents, generator)
        z = self.schedule.add_noise(latents, p.noise, p.t_n_plus_k)
        with torch.no_grad():
            tgt = target(self.schedule.add_noise(latents, p.noise, p.t_n), p.t_n, cond, p.omega)
        pred = student(z, p.t_n_plus_k, cond, p.omega)
        return self.d(pred, tgt, p)
