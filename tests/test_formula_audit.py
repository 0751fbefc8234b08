"""Known answers for the formulas that had none, and the edge cases of the ones that had: t = 0 and t = T-1, ᾱ of 0 or 1,
float16/32/64, batches of mixed t, ω = 0.

- x̂0 and ε̂ from each parameterisation, and its inverse, by hand for a batch of mixed (α, σ);
- the consistency function f = c_skip·z + c_out·x̂0 (Eq. 9) by hand at t = 0, 1, T-1 in one batch, for diffusers'
  timestep_scaling 10 and another, as diffusers' LCMScheduler computes it;
- t(λ), the inverse of the λ interpolation, by hand on a 3-step schedule;
- ᾱ = 1 (β_0 = 0): a finite schedule, and every solver's jump to t = 0 exact on point masses;
- the ω embedding's smallest size;
- Algorithm 1 (LCD) on point masses, where the exact consistency function is known: 0 for it at ω = 0 and over a ω range,
  and a t-dependent shift scores its square, for every solver;
- stage one of Guided-Distill (`GuidanceDistillationLoss`) on point masses, in each student parameterisation;
- the iCT weighting by hand on a 3-step schedule.

Point-mass data x0 = μ_k (class k, one-hot c) has ε̂ = (z_t − α_t μ)/σ_t constant along its PF-ODE, so the exact ODE solution
is z_s = α_s μ + σ_s ε̂ and CFG of two classes is the point mass μ_c + ω(μ_c − μ_u): `GaussianMixtureEps` with std 0 and
`gaussian_flow` with std 0.
"""

import math

import pytest
import torch
from diffusers import LCMScheduler

from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.losses import GuidanceDistillationLoss, LCDLoss, consistency_weight
from latent_consistency.parameterization import (
    PREDICTION_TYPES,
    boundary_scalings,
    consistency_output,
    guidance_embedding,
    model_output_from,
    x0_and_eps,
)
from latent_consistency.schedule import NoiseSchedule, make_betas
from latent_consistency.solvers import SOLVERS, guided_jump
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow

F64 = torch.float64
SD = NoiseSchedule.from_config({})
MEANS = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64)  # class 0 (c) and class 1 (∅)


def point_mass_teacher(schedule=SD):
    return GuidedTeacher(GaussianMixtureEps(MEANS, 0.0, schedule), schedule, "epsilon")


def guided_point(omega) -> torch.Tensor:
    """μ_c + ω(μ_c − μ_u), per row of ω ([B] or a number)."""
    omega = torch.as_tensor(omega, dtype=F64).reshape(-1, 1)
    return MEANS[0] + omega * (MEANS[0] - MEANS[1])


def one_hot(n: int, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full((n,), k), 2).to(F64)


# --- parameterization.py ------------------------------------------------------------------------------------------


def test_each_parameterisation_by_hand_for_rows_of_mixed_alpha_sigma():
    """Row 1: α = 0.6, σ = 0.8, x0 = 2, ε = 1: z = 2, v = αε − σx0 = −1. Row 2: α = 0.28, σ = 0.96, x0 = −1, ε = 0.5: z = 0.2,
    v = 0.14 + 0.96 = 1.1. Each output gives back (x0, ε) and is what `model_output_from` makes of them, in float64 and float16."""
    alpha, sigma = torch.tensor([0.6, 0.28], dtype=F64), torch.tensor([0.8, 0.96], dtype=F64)
    x0, eps = torch.tensor([[2.0], [-1.0]], dtype=F64), torch.tensor([[1.0], [0.5]], dtype=F64)
    z = torch.tensor([[2.0], [0.2]], dtype=F64)
    outputs = {"epsilon": eps, "v_prediction": torch.tensor([[-1.0], [1.1]], dtype=F64), "sample": x0}
    for prediction_type in PREDICTION_TYPES:
        out = outputs[prediction_type]
        torch.testing.assert_close(model_output_from(x0, eps, alpha, sigma, prediction_type), out, rtol=0, atol=1e-12)
        x0_back, eps_back = x0_and_eps(out, z, alpha, sigma, prediction_type)
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-12)
        half = x0_and_eps(out.half(), z.half(), alpha, sigma, prediction_type)  # the schedule's float64 cast to z's dtype
        assert all(v.dtype == torch.float16 for v in half)
        torch.testing.assert_close(half[0].double(), x0, rtol=0, atol=1e-2)


@pytest.mark.parametrize("scaling", [10.0, 3.0])
def test_consistency_function_by_hand_at_t_0_1_and_T_minus_1_in_one_batch(scaling):
    """s = scaling·t, σ_d = 0.5: c_skip = 0.25/(s² + 0.25), c_out = s/√(s² + 0.25); at t = 0, f = z exactly. f = c_skip·z +
    c_out·x̂0 for z = 1, x̂0 = 3, in float64 and in z's float32, and as diffusers' LCMScheduler(timestep_scaling) gives them."""
    t = torch.tensor([0, 1, 999])
    s = scaling * t.double()
    c_skip, c_out = 0.25 / (s**2 + 0.25), s / (s**2 + 0.25).sqrt()
    got_skip, got_out = boundary_scalings(t, timestep_scaling=scaling)
    torch.testing.assert_close(got_skip, c_skip, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_out, c_out, rtol=1e-12, atol=0)
    assert got_skip[0].item() == 1.0 and got_out[0].item() == 0.0
    z, x0 = torch.ones(3, 2, 2), torch.full((3, 2, 2), 3.0)
    f = consistency_output(z, x0, t, timestep_scaling=scaling)
    assert f.dtype == torch.float32 and torch.equal(f[0], z[0])
    torch.testing.assert_close(f, (c_skip + 3 * c_out).float()[:, None, None].expand(3, 2, 2), rtol=1e-6, atol=0)
    ref_skip, ref_out = LCMScheduler(timestep_scaling=scaling).get_scalings_for_boundary_condition_discrete(t)
    torch.testing.assert_close(got_skip.float(), ref_skip.float(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got_out.float(), ref_out.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_an_omega_embedding_smaller_than_four_is_a_user_error(dim):
    """Its frequencies 10000^(-i/(dim/2 − 1)) divided by zero at dim 2 and 3 (a ZeroDivisionError from deep in the first
    training step; diffusers' pipeline feeds NaN), and at dim 1 there are none: ω was embedded as a constant 0."""
    with pytest.raises(UserError, match="at least 4"):
        guidance_embedding(torch.tensor([1.0]), dim)
    assert torch.isfinite(guidance_embedding(torch.tensor([1.0]), 4)).all()


# --- schedule.py ----------------------------------------------------------------------------------------------------


def test_t_of_lambda_by_hand_on_a_three_step_schedule():
    """ᾱ = (0.9, 0.72, 0.504): λ_i = ½·log(ᾱ_i/(1 − ᾱ_i)). The midpoint of λ_0 and λ_1 is t = 0.5, ¼λ_1 + ¾λ_2 is t = 1.75;
    a λ above λ_0 or below λ_2 is clamped to t = 0 or T-1."""
    s = NoiseSchedule.from_betas(make_betas(3, 0.1, 0.3, "linear"))
    lam = [0.5 * math.log(a / (1 - a)) for a in (0.9, 0.72, 0.504)]
    query = torch.tensor([(lam[0] + lam[1]) / 2, 0.25 * lam[1] + 0.75 * lam[2], lam[0], lam[2], lam[0] + 1, lam[2] - 1], dtype=F64)
    torch.testing.assert_close(s.t_of_lambda(query), torch.tensor([0.5, 1.75, 0.0, 2.0, 0.0, 2.0], dtype=F64), rtol=0, atol=1e-5)


def test_alpha_bar_of_one_is_lowered_so_the_schedule_stays_finite():
    """β = (0, 0.1, 0.2): ᾱ_0 = 1 had λ_0 = +∞, and α, σ between t = 0 and 1 were NaN. ᾱ_0 is lowered to 1 − 2^-24 (σ_0 = 2^-12),
    the other ᾱ are kept, and λ is finite and decreasing."""
    s = NoiseSchedule.from_betas(make_betas(3, 0.0, 0.2, "linear"))
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([1 - 2.0**-24, 0.9, 0.72], dtype=F64), rtol=0, atol=1e-7)
    assert s.alpha_sigma(torch.tensor([0]))[1].item() == pytest.approx(2.0**-12, rel=1e-6)
    assert torch.isfinite(s.lambdas).all() and (s.lambdas.diff() < 0).all()
    alpha, sigma = s.alpha_sigma(torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=F64))
    assert alpha[2].item() == pytest.approx(0.9**0.5, rel=1e-7)  # ᾱ_1 = 1 − β_1 in float32, as diffusers builds it


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_jump_to_t_0_is_exact_when_beta_0_is_0(name):
    """A linear schedule from β = 0 (ᾱ_0 = 1): the first grid pair's jump 19 → 0 gave NaN for DPM-Solver and DPM-Solver++
    (h = λ_0 − λ_19 = ∞); on point masses every jump lands on the exact solution, as for SD's schedule."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "linear", "beta_start": 0.0, "beta_end": 0.02})
    n, omega = 4, 1.5
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t, s = torch.tensor([19, 19, 999, 500]), torch.tensor([0, 0, 0, 479])
    out = guided_jump(SOLVERS[name], point_mass_teacher(schedule), z, t, s, one_hot(n, 0), one_hot(n, 1), omega)
    torch.testing.assert_close(out, gaussian_flow(z, t, s, guided_point(omega), 0.0, schedule), rtol=0, atol=1e-8)


# --- losses.py ------------------------------------------------------------------------------------------------------


def exact_consistency_function(schedule, shift: float = 0.0):
    """f*(z_t, ω, c, t) of point-mass data: the exact ODE solution to t = 0 of the guided point (+ shift·t/1000)."""

    def f(z, t, cond, omega):
        return gaussian_flow(z, t, torch.zeros_like(t), guided_point(omega), 0.0, schedule) + shift * t.to(z)[:, None] / 1000

    return f


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("guidance_scale_range", [(1.0, 1.0), (2.0, 6.0)])
def test_lcd_loss_of_the_exact_consistency_function_of_point_masses(name, guidance_scale_range):
    """Algorithm 1 with every solver exact: f* scores 0 at every grid pair (t_n = 0 at the first one included), at ω = 0 and over
    a ω range; f* + 0.1·t/1000 scores (0.1·(t_{n+k} − t_n)/1000)², 0.1·20/1000 squared except 0.1·19/1000 at the first pair."""
    n = 128
    loss = LCDLoss(schedule=SD, skip=20, guidance_scale_range=guidance_scale_range, distance="l2", teacher=point_mass_teacher(),
                   solver=SOLVERS[name])
    x0 = MEANS[0].expand(n, 2).clone()
    args = (x0, one_hot(n, 0), one_hot(n, 1))
    exact = loss(exact_consistency_function(SD), exact_consistency_function(SD), *args, generator=torch.Generator().manual_seed(0))
    assert exact.abs().max() < 1e-12
    shifted = exact_consistency_function(SD, shift=0.1)
    got = loss(shifted, shifted, *args, generator=torch.Generator().manual_seed(0))
    t_n_plus_k = loss.grid[torch.randint(0, len(loss.grid), (n,), generator=torch.Generator().manual_seed(0))]  # the loss's first draw
    gap = 0.1 * (t_n_plus_k - (t_n_plus_k - 20).clamp(min=0)).double() / 1000
    assert (t_n_plus_k == 19).any()
    # the distance is taken in float32, of outputs of size ~5: the difference is exact to ~1e-6
    torch.testing.assert_close(got.double().sqrt(), gap, rtol=0, atol=2e-6)


def test_ict_weighting_by_hand_on_a_three_step_schedule():
    """σ̃ = σ/α = √((1 − ᾱ)/ᾱ): for ᾱ = (0.9, 0.72, 0.504), the pair (2, 0) weighs 1/(√(0.496/0.504) − 1/3), (1, 0)
    1/(√(0.28/0.72) − 1/3), and a pair with no gap (0, 0) weighs 0."""
    s = NoiseSchedule.from_betas(make_betas(3, 0.1, 0.3, "linear"))
    w = consistency_weight(s, torch.tensor([2, 1, 0]), torch.tensor([0, 0, 0]))
    expected = [1 / (math.sqrt(0.496 / 0.504) - 1 / 3), 1 / (math.sqrt(0.28 / 0.72) - 1 / 3), 0.0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64), rtol=1e-5, atol=0)


class GuidedPointStudent:
    """A student that outputs, in its parameterisation, the exact guided output of point-mass data at its ω (+ offset)."""

    def __init__(self, prediction_type: str, offset: float = 0.0):
        self.prediction_type, self.offset = prediction_type, offset

    def output(self, z, t, cond, omega):
        alpha, sigma = (v[:, None] for v in SD.alpha_sigma(t))
        x0 = guided_point(omega).expand_as(z)
        return model_output_from(x0, (z - alpha * x0) / sigma, alpha, sigma, self.prediction_type) + self.offset


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guidance_distillation_loss_of_point_masses_in_each_parameterisation(prediction_type):
    """Guided-Distill's stage one: the CFG output (1+ω)·out_c − ω·out_u is the guided point mass's, so a student giving that
    (in any parameterisation, at the ω it is given) scores 0, and one off by 0.1 scores 0.01 (l2), at every t and ω drawn."""
    n = 32
    loss = GuidanceDistillationLoss(schedule=SD, teacher=point_mass_teacher(), prediction_type=prediction_type,
                                    guidance_scale_range=(2.0, 6.0))
    args = (None, MEANS[0].expand(n, 2).clone(), one_hot(n, 0), one_hot(n, 1))
    exact = loss(GuidedPointStudent(prediction_type), *args, generator=torch.Generator().manual_seed(0))
    assert exact.shape == (n,) and exact.abs().max() < 1e-10
    off = loss(GuidedPointStudent(prediction_type, 0.1), *args, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(off.double().sqrt(), torch.full((n,), 0.1, dtype=F64), rtol=0, atol=1e-5)  # in float32, as above


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_student_omega_embedding_smaller_than_four_is_refused_before_the_run(dim):
    """`lcm distill --time-cond-proj-dim 2` passed the config check (>= 1) and failed at the first training step."""
    from latent_consistency.training.config import DistillConfig

    with pytest.raises(UserError, match="at least 4"):
        DistillConfig(teacher="t", data="d", out="o", time_cond_proj_dim=dim).check()
