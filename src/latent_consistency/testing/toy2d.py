"""A known-answer check of latent consistency distillation: an analytic 2-D teacher and a small MLP student.

The data are a two-class Gaussian mixture in 2-D (`TOY_MEANS`, `TOY_STD`); `GaussianMixtureEps` is its
exact ε-network, so the guided teacher of Eq. 12 is exact and the augmented PF-ODE (Eq. 13) can be
integrated to any accuracy (`reference_flow`). That makes the true consistency function known
(`ExactConsistency`). `distill_toy2d` runs LCD (Algorithm 1 of Luo et al. 2023) from the teacher into
`ToyStudent`; `evaluate_toy2d` measures any consistency model against the exact answers (`ToyReference`),
per class and guidance scale:

- n-step samples (Algorithm 3) against Algorithm 3 run with the exact f from the same noise; for one step
  that is the exact guided ODE solution of the starting noise z_T;
- the 2-step sampler's second step against the exact ODE solution from the point it actually visited;
- the sliced Wasserstein distance between n-step samples and exact teacher ODE samples.

Reading aids: `evaluate_teacher_ddim` (guided DDIM of the teacher and the finite-sample floor of the
distance), `SolverChain` (what LCD converges to with a given solver if the network fitted exactly) and
`FlippedGuidanceTeacher` (a wrong teacher whose student must fail).
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, OmegaConditionedTeacher
from latent_consistency.losses import GuidanceDistillationLoss, LCDLoss, LCFLoss, ProgressiveDistillationLoss
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps, randn, sample_lcm
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver, guided_jump
from latent_consistency.testing.analytic import GaussianMixtureEps, reference_flow
from latent_consistency.training.ema import ema_update

TOY_MEANS = ((1.5, 0.5), (-1.5, -0.5))
TOY_STD = 0.4
TOY_GUIDANCE_SCALE_RANGE = (1.0, 4.0)  # diffusers' g; the paper's ω ∈ [0, 3]
EVAL_GUIDANCE_SCALES = (1.5, 2.5, 3.5)


def toy_teacher(schedule: NoiseSchedule | None = None) -> GuidedTeacher:
    """The exact ε-teacher of the two-class mixture on SD's scaled-linear schedule (T = 1000)."""
    schedule = schedule or NoiseSchedule.from_config({})
    return GuidedTeacher(GaussianMixtureEps(torch.tensor(TOY_MEANS), TOY_STD, schedule), schedule, "epsilon")


class FlippedGuidanceTeacher(GuidedTeacher):
    """A deliberately wrong teacher, the control of the check: guidance with the sign of ω flipped,
    ε_c - ω(ε_c - ε_u). A student distilled from it must fail `evaluate_toy2d` against the true teacher."""

    def guide(self, out_c, out_u, omega, z):
        return super().guide(out_c, out_u, -torch.as_tensor(omega), z)


def class_weights(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """The condition c of a class label: one-hot class weights [B, K]."""
    return torch.nn.functional.one_hot(labels, num_classes).to(dtype)


def prior_weights(batch: int, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """The null condition ∅: the uniform class prior [B, K]."""
    return torch.full((batch, num_classes), 1.0 / num_classes, dtype=dtype)


class ToyStudent(torch.nn.Module):
    """A residual MLP under the network contract `net(z, t, cond, timestep_cond)`.

    The embedding mirrors a diffusers UNet with `time_cond_proj_dim`: sinusoidal t -> `TimestepEmbedding`
    whose `cond_proj` adds the ω embedding (Section 4.2), plus a linear embedding of the class weights c.
    Each residual block sees the embedding through its own projection.
    """

    def __init__(self, dim: int = 2, num_classes: int = 2, width: int = 64, depth: int = 3,
                 time_channels: int = 32, time_cond_proj_dim: int = 32):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, width, cond_proj_dim=time_cond_proj_dim)
        self.class_embedding = torch.nn.Linear(num_classes, width)
        self.input = torch.nn.Linear(dim, width)
        self.emb_proj = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width)
            )
            for _ in range(depth)
        )
        self.output = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, z, t, cond, timestep_cond=None):
        emb = self.time_embedding(self.time_proj(t).to(z), timestep_cond)
        emb = torch.nn.functional.silu(emb + self.class_embedding(cond.to(z)))
        h = self.input(z)
        for proj, block in zip(self.emb_proj, self.blocks):
            h = h + block(h + proj(emb))
        return self.output(h)


def _fit(student, target, loss_fn, mixture: GaussianMixtureEps, steps: int, batch_size: int, lr: float, generator: torch.Generator,
         ema_decay: float | None = None, lr_decay: bool = True) -> None:
    """The toy's one training loop: x0 from `mixture` under a uniform class label c (∅ = the class prior), Adam with
    the learning rate decaying linearly to 0 (or constant), and the target θ⁻ <- EMA of the student when given."""
    net = student.net
    num_classes = mixture.means.shape[0]
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1) if lr_decay else 1.0)
    uncond = prior_weights(batch_size, num_classes)
    for _ in range(steps):
        # Data: x0 ~ p(x0 | c) with a uniform class c
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        cond = class_weights(labels, num_classes)
        loss = loss_fn(student, target, mixture.sample(batch_size, cond, generator).float(), cond, uncond, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if target is not None and ema_decay is not None:
            # Update target θ⁻ <- μ θ⁻ + (1-μ) θ
            ema_update(target.net, net, ema_decay)


def distill_toy2d(
    solver_name: str = "dpm++",
    steps: int = 800,
    batch_size: int = 256,
    lr: float = 2e-3,
    ema_decay: float = 0.9,
    skip: int = 20,
    guidance_scale_range: tuple[float, float] = TOY_GUIDANCE_SCALE_RANGE,
    seed: int = 0,
    distance: str = "l2",
    huber_c: float = 0.001,
    prediction_type: str = "v_prediction",
    width: int = 64,
    time_cond_proj_dim: int = 32,
    teacher: GuidedTeacher | None = None,
) -> ConsistencyModel:
    """LCD (Algorithm 1 of Luo et al. 2023) of the analytic toy teacher into a fresh `ToyStudent`.

    Data x0 are drawn from the teacher's mixture with a uniform class label; the loss is `LCDLoss` with
    the named solver and skip k; the target θ⁻ is an EMA (μ = `ema_decay`) of the student. The learning
    rate decays linearly to 0. `steps = 0` returns the untrained student (the baseline of the check).

    The defaults are the fastest setting measured to reach the exact answers (docs/known-answer.md).
    The consistency target is bootstrapped from t = 0 up through the T/k grid levels, and an EMA time
    constant of 1/(1-μ) steps slows each level: μ = 0.9 gets to t = T-1 in 800 steps, μ = 0.95 does not.
    A v-prediction student beat x0- and ε-prediction at that budget (an ε-student's x̂0 = (z - σε)/α
    multiplies its error by σ/α ≈ 15 at t = T-1).
    """
    teacher = teacher or toy_teacher()
    schedule = teacher.schedule
    mixture = teacher.net
    num_classes = mixture.means.shape[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student_net = ToyStudent(mixture.means.shape[1], num_classes, width, time_cond_proj_dim=time_cond_proj_dim)
    target_net = copy.deepcopy(student_net).requires_grad_(False)
    student = ConsistencyModel(student_net, schedule, prediction_type, time_cond_proj_dim)
    target = ConsistencyModel(target_net, schedule, prediction_type, time_cond_proj_dim)
    loss_fn = LCDLoss(schedule, skip, guidance_scale_range, distance, huber_c,
                      teacher=teacher, solver=get_solver(solver_name))
    _fit(student, target, loss_fn, mixture, steps, batch_size, lr, generator, ema_decay=ema_decay)
    return student


def finetune_toy2d(
    model: ConsistencyModel,
    means: tuple[tuple[float, ...], ...],
    std: float = TOY_STD,
    steps: int = 800,
    batch_size: int = 256,
    lr: float = 1e-3,
    ema_decay: float = 0.9,
    skip: int = 20,
    guidance_scale_range: tuple[float, float] = TOY_GUIDANCE_SCALE_RANGE,
    seed: int = 0,
) -> ConsistencyModel:
    """LCF (Algorithm 4 of Luo et al. 2023) of a toy consistency model on data alone: x0 from the Gaussian mixture
    with `means` (one component per class) and `std`, no teacher. Returns the fine-tuned student; `model` is untouched."""
    schedule = model.schedule
    data = GaussianMixtureEps(torch.tensor(means), std, schedule)  # only its samples are used
    generator = torch.Generator().manual_seed(seed)
    student_net = copy.deepcopy(model.net).requires_grad_(True)
    target_net = copy.deepcopy(student_net).requires_grad_(False)
    student, target = (ConsistencyModel(net, schedule, model.prediction_type, model.time_cond_proj_dim) for net in (student_net, target_net))
    loss_fn = LCFLoss(schedule, skip, guidance_scale_range, distance="l2")
    _fit(student, target, loss_fn, data, steps, batch_size, lr, generator, ema_decay=ema_decay, lr_decay=False)
    return student


def guidance_distill_toy2d(
    steps: int = 800,
    batch_size: int = 256,
    lr: float = 2e-3,
    prediction_type: str = "epsilon",
    guidance_scale_range: tuple[float, float] = TOY_GUIDANCE_SCALE_RANGE,
    seed: int = 0,
    teacher: GuidedTeacher | None = None,
) -> OmegaConditionedTeacher:
    """Stage one of Guided-Distill (Meng et al. 2023) on the toy: a fresh `ToyStudent` learns the teacher's
    classifier-free guided output from ω as an input (`GuidanceDistillationLoss`). Returns it as a teacher whose guided
    output is one evaluation. The learning rate decays linearly to 0."""
    teacher = teacher or toy_teacher()
    schedule, mixture = teacher.schedule, teacher.net
    num_classes = mixture.means.shape[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyStudent(mixture.means.shape[1], num_classes)
    student = ConsistencyModel(net, schedule, prediction_type, 32)  # its `output` is the ω-conditioned network
    loss_fn = GuidanceDistillationLoss(schedule=schedule, teacher=teacher, prediction_type=prediction_type,
                                       guidance_scale_range=guidance_scale_range)
    _fit(student, None, loss_fn, mixture, steps, batch_size, lr, generator)
    return OmegaConditionedTeacher(net.requires_grad_(False), schedule, prediction_type, 32)


def progressive_distill_toy2d(
    teacher: OmegaConditionedTeacher,
    student_steps: int,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    guidance_scale_range: tuple[float, float] = TOY_GUIDANCE_SCALE_RANGE,
    seed: int = 0,
    data: GuidedTeacher | None = None,
) -> OmegaConditionedTeacher:
    """One round of progressive distillation (`ProgressiveDistillationLoss`) on the toy: the student starts as the teacher
    (Salimans & Ho 2022) and learns to sample in `student_steps` DDIM steps what the teacher does in twice as many.
    Data x0 from the toy mixture (`data`'s, default the toy teacher's)."""
    mixture = (data or toy_teacher()).net
    generator = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(teacher.net).requires_grad_(True)
    student = ConsistencyModel(net, teacher.schedule, teacher.prediction_type, teacher.time_cond_proj_dim)
    loss_fn = ProgressiveDistillationLoss(schedule=teacher.schedule, teacher=teacher, student_steps=student_steps,
                                          guidance_scale_range=guidance_scale_range)
    _fit(student, None, loss_fn, mixture, steps, batch_size, lr, generator)
    return OmegaConditionedTeacher(net.requires_grad_(False), teacher.schedule, teacher.prediction_type, teacher.time_cond_proj_dim)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None, p: int = 2) -> float:
    """Sliced p-Wasserstein distance between two equal-size point sets [N, D].

    SW_p = (E_θ W_p^p(θᵀa, θᵀb))^{1/p} over directions θ uniform on the sphere; each 1-D W_p between
    empirical measures of equal size pairs the sorted projections.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.double() @ theta).sort(dim=0).values
    pb = (b.double() @ theta).sort(dim=0).values
    return ((pa - pb).abs() ** p).mean().pow(1.0 / p).item()


class ExactConsistency:
    """The true consistency function of the guided teacher, f*(z, ω, c, t) = Φ_ω,c(z; t -> 0).

    Φ is the augmented PF-ODE (Eq. 13) solved by `reference_flow` (RK4 in λ, float64; 50 steps reach
    ~1e-5 of a 800-step solution on the toy). Under the consistency-model contract, so `sample_lcm` with
    it is Algorithm 3 run with the exact f: the known answer for an n-step student.
    """

    def __init__(self, teacher: GuidedTeacher, steps: int = 50):
        self.teacher = teacher
        self.steps = steps

    def __call__(self, z, t, cond, omega):
        b = z.shape[0]
        uncond = prior_weights(b, cond.shape[1], torch.float64)
        omega = torch.as_tensor(omega, dtype=torch.float64)

        def guided_eps(z_, t_):
            return self.teacher.guided(z_, t_, cond, uncond, omega)[1]

        t = torch.as_tensor(t, dtype=torch.float64).expand(b)
        s = torch.zeros(b, dtype=torch.float64)
        return reference_flow(guided_eps, z.double(), t, s, self.teacher.schedule, self.steps).to(z.dtype)


class SolverChain:
    """The consistency function LCD converges to with `solver` and skip k if the student fitted exactly.

    The LCD target is f(z, t_{n+k}) = f(Ψ(z, t_{n+k} -> t_n), t_n) with f(z, 0) = z (c_skip(0) = 1), whose
    solution is k-sized guided solver jumps down the skipping grid to t = 0. Evaluated like a student,
    it is the solver's share of a student's error; the rest is the network's.
    """

    def __init__(self, teacher: GuidedTeacher, solver_name: str, skip: int = 20):
        self.teacher = teacher
        self.solver = get_solver(solver_name)
        self.skip = skip

    def __call__(self, z, t, cond, omega):
        b = z.shape[0]
        uncond = prior_weights(b, cond.shape[1], torch.float64)
        omega = torch.as_tensor(omega, dtype=torch.float64).expand(b)
        t = torch.as_tensor(t).long().expand(b)
        x = z.double()
        while (active := t > 0).any():
            s = (t - self.skip).clamp(min=0)
            x[active] = guided_jump(self.solver, self.teacher, x[active], t[active], s[active],
                                    cond[active], uncond[active], omega[active])
            t = torch.where(active, s, t)
        return x.to(z.dtype)


def _data_scale(teacher: GuidedTeacher) -> float:
    """RMS radius of the (uniform-prior) data around its mean: √(E‖x0 - E x0‖²)."""
    means = teacher.net.means
    spread = ((means - means.mean(0)) ** 2).sum(1).mean()
    return math.sqrt(spread.item() + means.shape[1] * teacher.net.std**2)


class ToyReference:
    """The exact answers of the check, computed once and shared by every model evaluated against them.

    Every (guidance scale, class) case gets `num_samples` rows of one batch. Holds the starting noise z_T,
    the samples of Algorithm 3 run with the exact consistency function for each step count (same z_T,
    re-noising noise from a generator seeded `seed + 2`), teacher ODE samples from independent noise
    (the distribution the sliced Wasserstein distance is measured against) and a second independent set
    whose distance to the first is the finite-sample floor of that distance.
    """

    @torch.no_grad()
    def __init__(self, teacher: GuidedTeacher | None = None, guidance_scales=EVAL_GUIDANCE_SCALES,
                 num_samples: int = 1000, step_counts=(1, 2, 4), original_inference_steps: int = 50,
                 reference_steps: int = 50, num_projections: int = 256, seed: int = 0):
        self.teacher = teacher or toy_teacher()
        self.schedule = self.teacher.schedule
        self.exact_f = ExactConsistency(self.teacher, reference_steps)
        self.num_projections, self.seed = num_projections, seed
        num_classes, self.dim = self.teacher.net.means.shape
        self.keys = [(g, k) for g in guidance_scales for k in range(num_classes)]
        self.num_samples = num_samples
        g = torch.tensor([key[0] for key in self.keys], dtype=torch.float64).repeat_interleave(num_samples)
        self.omega = omega_from_guidance_scale(g)
        labels = torch.tensor([key[1] for key in self.keys]).repeat_interleave(num_samples)
        self.cond = class_weights(labels, num_classes, torch.float64)
        self.data_scale = _data_scale(self.teacher)
        t_count = self.schedule.num_train_timesteps
        self.timesteps = {n: lcm_timesteps(n, t_count, original_inference_steps) for n in step_counts}
        self.z_T = self.noise(seed)
        self.exact = {n: self.sample(self.exact_f, n) for n in step_counts}
        self.ode_samples = self.sample(self.exact_f, 1, self.noise(seed + 1))
        self.sw_floor = self.per_case_sw(self.sample(self.exact_f, 1, self.noise(seed + 3)))

    def noise(self, seed: int) -> torch.Tensor:
        """Starting noise z_T for every row, float32 like the student."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(len(self.omega), self.dim, generator=generator, dtype=torch.float32)

    def sample(self, model, n: int, z_T: torch.Tensor | None = None) -> torch.Tensor:
        """n-step Algorithm 3 with `model` from z_T (default: the shared one), float64 result."""
        z_T = self.z_T if z_T is None else z_T
        generator = torch.Generator().manual_seed(self.seed + 2)
        return sample_lcm(model, z_T, self.timesteps[n], self.cond, self.omega, self.schedule, generator).double()

    def split(self, x: torch.Tensor):
        """(key, rows of that case) for every (guidance scale, class) case."""
        return zip(self.keys, x.split(self.num_samples))

    def per_case_error(self, x: torch.Tensor, exact: torch.Tensor) -> dict:
        """Mean ‖x - exact‖ / data scale per case."""
        return {key: e.norm(dim=1).mean().item() / self.data_scale for key, e in self.split(x - exact)}

    def per_case_sw(self, x: torch.Tensor) -> dict:
        """Sliced W2 per case between `x` and the teacher's ODE samples."""
        return {
            key: sliced_wasserstein(a, b, self.num_projections, torch.Generator().manual_seed(self.seed + 4))
            for (key, a), (_, b) in zip(self.split(x), self.split(self.ode_samples))
        }


def _summarise(per_metric: dict) -> dict:
    """For each metric {case: value}: its mean over cases, its worst case (`<metric>_max`) and the cases."""
    out = {}
    for metric, cases in per_metric.items():
        out[metric] = sum(cases.values()) / len(cases)
        out[metric + "_max"] = max(cases.values())
    out["cases"] = per_metric
    return out


@torch.no_grad()
def evaluate_toy2d(model, reference: ToyReference | None = None) -> dict:
    """Measure a consistency model (a student, or `ExactConsistency`) against the exact answers.

    Per (guidance scale, class) case, then averaged (`<metric>`) and worst (`<metric>_max`):
    - `error_n`: mean ‖x_n - x*_n‖ / data scale, x_n the n-step sample (Algorithm 3) and x*_n the same
      sampler run with the exact consistency function, from the same z_T and the same re-noising noise;
      `error_1` is the distance to the exact guided PF-ODE solution of z_T.
    - `local_error_2`: the 2-step sampler's second step alone, ‖f(z_τ2) - Φ(z_τ2)‖ / data scale, at the
      point z_τ2 = α x̂0 + σ ε the sampler visited (its own 1-step x̂0, its own noise ε).
    - `sw_n`: sliced W2 between the n-step samples and the teacher's ODE samples (independent noise).
    """
    reference = reference or ToyReference()
    samples = {n: reference.sample(model, n) for n in reference.exact}
    metrics = {}
    for n, exact in reference.exact.items():
        metrics[f"error_{n}"] = reference.per_case_error(samples[n], exact)
        metrics[f"sw_{n}"] = reference.per_case_sw(samples[n])
    if 1 in samples and 2 in samples:
        # Replay the 2-step sampler: its 1-step x̂0 re-noised to τ2 with the first draw of its generator
        tau2 = reference.timesteps[2][1]
        generator = torch.Generator().manual_seed(reference.seed + 2)
        noise = randn(reference.z_T.shape, generator, "cpu", reference.z_T.dtype)
        z_tau2 = reference.schedule.add_noise(samples[1].to(noise.dtype), noise, tau2.expand(len(noise)))
        exact = reference.exact_f(z_tau2, tau2, reference.cond, reference.omega).double()
        metrics["local_error_2"] = reference.per_case_error(samples[2], exact)
    return _summarise(metrics)


@torch.no_grad()
def evaluate_teacher_ddim(reference: ToyReference | None = None) -> dict:
    """The baseline: guided n-step DDIM of the teacher on the LCM timesteps (then to t = 0).

    `error_1` is 1-step DDIM against the exact ODE solution of the same z_T; `sw_n` as `evaluate_toy2d`;
    `sw_floor` is the distance between two independent sets of exact teacher samples.
    """
    reference = reference or ToyReference()
    uncond = prior_weights(len(reference.omega), reference.cond.shape[1], torch.float64)
    metrics = {}
    ddim = get_solver("ddim")
    for n, timesteps in reference.timesteps.items():
        z = reference.z_T.double()
        for t, s in zip(timesteps.tolist(), timesteps.tolist()[1:] + [0]):
            z = guided_jump(ddim, reference.teacher, z, torch.tensor(t), torch.tensor(s),
                            reference.cond, uncond, reference.omega)
        if n == 1:
            metrics["error_1"] = reference.per_case_error(z, reference.exact[1])
        metrics[f"sw_{n}"] = reference.per_case_sw(z)
    metrics["sw_floor"] = reference.sw_floor
    return _summarise(metrics)
