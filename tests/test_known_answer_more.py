"""Known answers for the formulas that had only a cross-check against diffusers, a round trip, or a loose bound.

Each test compares a formula with a closed form, a hand-computed small case, or analytic Gaussian data:

- the noise schedule on a 3-step schedule by hand (ᾱ, λ, α/σ between integers, the zero-terminal-SNR rescale), the
  cosine schedule's telescoping ᾱ;
- the ω embedding by hand; `SampleClipping` on hand-made rows;
- point-mass data N(μ, 0): x̂0 and ε̂ are constant along the PF-ODE, so every solver's jump is exact for any step
  (and so is the guided one: CFG of two point masses is the point mass at μ_c + ω(μ_c − μ_u)); the teacher consistency
  function, the ω response and the progressive-distillation target are then exact too;
- CFG (Eq. 12) on two same-variance Gaussians, in all three parameterisations;
- `GaussianMixtureEps` against Tweedie's formula ε̂ = −σ·∇log p_t(z), by autograd of the mixture density;
- Algorithm 3 with an affine consistency function and the sampler's noise replayed;
- FID of two feature sets whose sample statistics are known exactly; KID of a 1-D hand case.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from latent_consistency.denoisers import GuidedTeacher, SampleClipping
from latent_consistency.evaluation.fid import feature_rms, fid_score, kid_score
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.losses import ProgressiveDistillationLoss
from latent_consistency.parameterization import guidance_embedding, model_output_from, x0_and_eps
from latent_consistency.sampling import sample_lcm
from latent_consistency.schedule import NoiseSchedule, make_betas
from latent_consistency.solvers import SOLVERS, guided_jump
from latent_consistency.testing.analytic import GaussianMixtureEps
from latent_consistency.training.omega_response import omega_response

SD = NoiseSchedule.from_config({})
F64 = torch.float64


# --- schedule.py ---------------------------------------------------------------------------------------------------


def test_three_step_schedules_by_hand():
    """Linear β = (0.1, 0.2, 0.3): ᾱ = (0.9, 0.72, 0.504), λ_0 = ½·log(0.9/0.1) = log 3. Scaled-linear from 0.01 to 0.09
    interpolates √β: β = (0.01, 0.04, 0.09), ᾱ = (0.99, 0.9504, 0.864864)."""
    linear = NoiseSchedule.from_betas(make_betas(3, 0.1, 0.3, "linear"))
    torch.testing.assert_close(linear.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(linear.lambdas, torch.tensor([math.log(3), 0.5 * math.log(0.72 / 0.28), 0.5 * math.log(0.504 / 0.496)],
                                                            dtype=F64), rtol=0, atol=1e-5)
    scaled = NoiseSchedule.from_betas(make_betas(3, 0.01, 0.09, "scaled_linear"))
    torch.testing.assert_close(scaled.alphas_cumprod, torch.tensor([0.99, 0.9504, 0.864864], dtype=F64), rtol=0, atol=1e-6)
    # add_noise: z = √ᾱ·x0 + √(1-ᾱ)·ε at t = 0 of the linear schedule: √0.9·2 + √0.1·(-1)
    z = linear.add_noise(torch.tensor([[2.0]], dtype=F64), torch.tensor([[-1.0]], dtype=F64), torch.tensor([0]))
    assert z.item() == pytest.approx(0.9**0.5 * 2 - 0.1**0.5, abs=1e-6)


def test_lambda_is_linear_between_integers_and_alpha_sigma_follow_it():
    """At t = 0.5 of the linear 3-step schedule λ = (log 3 + ½·log(0.72/0.28))/2, and α² = e^{2λ}/(1 + e^{2λ}) = sigmoid(2λ),
    σ² = 1 − α²; at t = 1.75, λ = ¼λ_1 + ¾λ_2."""
    s = NoiseSchedule.from_betas(make_betas(3, 0.1, 0.3, "linear"))
    lam0, lam1, lam2 = math.log(3), 0.5 * math.log(0.72 / 0.28), 0.5 * math.log(0.504 / 0.496)
    lam = s.lambda_(torch.tensor([0.5, 1.75], dtype=F64))
    torch.testing.assert_close(lam, torch.tensor([(lam0 + lam1) / 2, 0.25 * lam1 + 0.75 * lam2], dtype=F64), rtol=0, atol=1e-5)
    alpha, sigma = s.alpha_sigma(torch.tensor([0.5], dtype=F64))
    e = math.exp(lam0 + lam1)  # e^{2λ}
    assert alpha.item() ** 2 == pytest.approx(e / (1 + e), abs=1e-6)
    assert sigma.item() ** 2 == pytest.approx(1 / (1 + e), abs=1e-6)


def test_cosine_schedule_telescopes_to_its_alpha_bar_function():
    """β_i = 1 − ā((i+1)/T)/ā(i/T) with ā(u) = cos²((u + 0.008)/1.008·π/2): the product telescopes, ᾱ_i = ā((i+1)/T)/ā(0),
    wherever β is not clipped at 0.999 (every i but the last)."""
    T = 1000
    s = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": T})

    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([abar((i + 1) / T) / abar(0) for i in range(T - 1)], dtype=F64)
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected, rtol=1e-4, atol=1e-6)


def test_zero_terminal_snr_rescale_by_hand():
    """Lin et al. 2023, Algorithm 1 on ᾱ = (0.9, 0.72, 0.504): √ᾱ ↦ (√ᾱ − √ᾱ_last)·√ᾱ_0/(√ᾱ_0 − √ᾱ_last), so ᾱ_0 stays 0.9,
    the middle one is ((√0.72 − √0.504)·√0.9/(√0.9 − √0.504))², and the last is 0 (raised to 2^-24); the last β is 1."""
    betas = make_betas(3, 0.1, 0.3, "linear", rescale_betas_zero_snr=True)
    a0, a1, a2 = math.sqrt(0.9), math.sqrt(0.72), math.sqrt(0.504)
    middle = ((a1 - a2) * a0 / (a0 - a2)) ** 2
    assert betas[-1].item() == pytest.approx(1.0, abs=1e-6)
    s = NoiseSchedule.from_betas(betas)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, middle, 2.0**-24], dtype=F64), rtol=0, atol=1e-6)
    assert s.zero_terminal_snr


# --- parameterization.py ------------------------------------------------------------------------------------------


def test_guidance_embedding_by_hand():
    """dim 4: frequencies 10000^(-i/(2-1)) = (1, 1e-4); ω = 0.5 is scaled to 500: (sin 500, sin 0.05, cos 500, cos 0.05).
    An odd dim gets one zero column."""
    emb = guidance_embedding(torch.tensor([0.5, 0.0]), 4)
    expected = torch.tensor([[math.sin(500), math.sin(0.05), math.cos(500), math.cos(0.05)], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(emb, expected, rtol=0, atol=2e-5)
    odd = guidance_embedding(torch.tensor([0.5]), 5)
    torch.testing.assert_close(odd, torch.cat([expected[:1], torch.zeros(1, 1)], dim=1), rtol=0, atol=2e-5)


# --- denoisers.py ---------------------------------------------------------------------------------------------------


def test_sample_clipping_by_hand():
    """clip_sample: a clamp to ±range. Thresholding: s = the ratio-quantile of |x̂0| per row (linear interpolation),
    clamped to [1, max]; the row is clamped to ±s and divided by s."""
    x = torch.tensor([[-2.0, 0.5, 3.0, 0.0]])
    torch.testing.assert_close(SampleClipping(clip_range=1.0)(x), torch.tensor([[-1.0, 0.5, 1.0, 0.0]]))
    rows = torch.tensor([[0.5, -4.0, 2.0, 1.0],  # |x| sorted (0.5, 1, 2, 4): the 0.5-quantile is 1.5
                         [0.1, -0.2, 0.3, 0.0]])  # quantile 0.15 -> s = 1: unchanged
    out = SampleClipping(threshold_ratio=0.5, threshold_max=3.0)(rows)
    torch.testing.assert_close(out, torch.tensor([[0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5], [0.1, -0.2, 0.3, 0.0]]))
    # ratio 1: the max |x̂0| = 4, capped at sample_max_value 3
    out = SampleClipping(threshold_ratio=1.0, threshold_max=3.0)(rows[:1])
    torch.testing.assert_close(out, torch.tensor([[0.5 / 3, -1.0, 2.0 / 3, 1.0 / 3]]))
    config = SampleClipping.of_config({"thresholding": True, "dynamic_thresholding_ratio": 0.5, "sample_max_value": 3.0})
    torch.testing.assert_close(config(rows), SampleClipping(threshold_ratio=0.5, threshold_max=3.0)(rows))
    assert SampleClipping.of_config({}) is None


class AsParameterisation:
    """An exact ε-network re-expressed as a v- or x0-prediction network (x̂0, ε̂ unchanged)."""

    def __init__(self, eps_net, schedule, prediction_type):
        self.eps_net, self.schedule, self.prediction_type = eps_net, schedule, prediction_type

    def __call__(self, z, t, cond, timestep_cond=None):
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0, eps = x0_and_eps(self.eps_net(z, t, cond), z, alpha, sigma, "epsilon")
        return model_output_from(x0, eps, alpha, sigma, self.prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cfg_of_two_same_variance_gaussians_is_the_gaussian_at_the_guided_mean(prediction_type):
    """ε of N(μ, s²I) at z_t is σ(z − αμ)/v, affine in μ: (1+ω)ε_c − ωε_u (Eq. 12) is ε of N(μ_c + ω(μ_c − μ_u), s²I). The
    teacher guides its network's own output; since every parameterisation is affine in it, x̂0 and ε̃ are the same."""
    means, std, omega = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64), 0.4, 2.5
    net = GaussianMixtureEps(means, std, SD)
    teacher = GuidedTeacher(AsParameterisation(net, SD, prediction_type), SD, prediction_type)
    n = 6
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([999, 700, 400, 100, 20, 1])
    cond, uncond = torch.tensor([[1.0, 0.0]] * n, dtype=F64), torch.tensor([[0.0, 1.0]] * n, dtype=F64)
    x0, eps = teacher.guided(z, t, cond, uncond, omega)
    guided_mean = means[0] + omega * (means[0] - means[1])
    exact_eps = GaussianMixtureEps(guided_mean[None], std, SD)(z, t, torch.ones(n, 1, dtype=F64))
    alpha, sigma = (v[:, None] for v in SD.alpha_sigma(t))
    torch.testing.assert_close(eps, exact_eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(x0, (z - sigma * exact_eps) / alpha, rtol=0, atol=1e-7)


# --- solvers.py and the teacher consistency function: point-mass data --------------------------------------------


class PointMassEps:
    """The exact ε-network of point-mass data x0 = c·means (one-hot c: class k's point μ_k): ε̂ = (z_t − α_t μ)/σ_t.
    (Written out here rather than taken from `GaussianMixtureEps` with std 0, so that the test stands on its own.)
    The condition may come as [B, K] or [B, 1, K]."""

    def __init__(self, means):
        self.means = means

    def __call__(self, z, t, cond, timestep_cond=None):
        alpha, sigma = (v.to(z)[:, None] for v in SD.alpha_sigma(t))
        return (z - alpha * (cond.reshape(len(z), -1).to(z) @ self.means.to(z))) / sigma


def point_mass_teacher(means):
    return GuidedTeacher(PointMassEps(means), SD, "epsilon")


def point_mass_flow(z, t, s, mu):
    """The exact PF-ODE solution of x0 = μ: ε̂ = (z_t − α_t μ)/σ_t is constant, z_s = α_s μ + σ_s ε̂."""
    a_t, s_t = (v[:, None] for v in SD.alpha_sigma(t))
    a_s, s_s = (v[:, None] for v in SD.alpha_sigma(s))
    return a_s * mu + s_s * (z - a_t * mu) / s_t


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("guide_increments", [False, True])
def test_every_solver_is_exact_for_guided_point_masses_at_any_step(name, guide_increments):
    """x̂0 and ε̂ of point-mass data are constant along its PF-ODE, so DDIM (z_s = α_s x̂0 + σ_s ε̂), DPM-Solver-2 (exact for
    constant ε̂) and DPM-Solver++(2S) (exact for constant x̂0) land on the exact solution for any step, 999 -> 0 included;
    CFG of two point masses is the point mass μ_c + ω(μ_c − μ_u), so the guided jump is exact too."""
    means, omega = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64), 1.5
    teacher = point_mass_teacher(means)
    n = 5
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.3
    t = torch.tensor([999.0, 999.0, 640.5, 300.0, 20.0], dtype=F64)
    s = torch.tensor([0.0, 500.0, 17.25, 280.0, 0.0], dtype=F64)
    cond, uncond = torch.tensor([[1.0, 0.0]] * n, dtype=F64), torch.tensor([[0.0, 1.0]] * n, dtype=F64)
    out = guided_jump(SOLVERS[name], teacher, z, t, s, cond, uncond, omega, guide_increments)
    exact = point_mass_flow(z, t, s, means[0] + omega * (means[0] - means[1]))
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_teacher_consistency_function_of_point_masses_is_exact(name):
    """f*(z_t, t) = α_0 μ_g + σ_0 (z_t − α_t μ_g)/σ_t for every row, on and off the grid, at any t; f*(z, 0) = z."""
    means, omega = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64), 2.0
    teacher = point_mass_teacher(means)
    n = 6
    uncond = torch.tensor([[0.0, 1.0]], dtype=F64)
    f = TeacherConsistencyFunction(teacher, SOLVERS[name], 20, uncond)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([999, 759, 500, 259, 7, 0])
    cond = torch.tensor([[1.0, 0.0]] * n, dtype=F64)
    exact = point_mass_flow(z, t, torch.zeros_like(t), means[0] + omega * (means[0] - means[1]))
    torch.testing.assert_close(f(z, t, cond, omega), exact, rtol=0, atol=1e-9)


# --- testing/analytic.py ------------------------------------------------------------------------------------------


def test_mixture_eps_is_tweedies_formula_and_its_samples_have_the_mixture_moments():
    """E[ε | z_t] = −σ_t·∇ log p_t(z_t) (Tweedie), with p_t = Σ π_k N(α_t μ_k, v_t I), v_t = α_t² s² + σ_t², differentiated by
    autograd; `sample` draws the mixture: mean Σ π_k μ_k, covariance s²I + Σ π_k (μ_k − m)(μ_k − m)ᵀ."""
    means, std = torch.tensor([[1.0, 0.5], [-1.2, -0.3], [0.2, 1.5]], dtype=F64), 0.35
    net = GaussianMixtureEps(means, std, SD)
    n = 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g, dtype=F64).requires_grad_(True)
    t = torch.tensor([999, 800, 500, 300, 150, 60, 10, 0])
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    alpha, sigma = (v[:, None] for v in SD.alpha_sigma(t))
    v = alpha**2 * std**2 + sigma**2
    sq = ((z[:, None, :] - alpha[:, :, None] * means[None]) ** 2).sum(-1)  # [n, K]
    log_p = torch.logsumexp(torch.log(weights)[None] - 0.5 * sq / v - torch.log(2 * math.pi * v), dim=1)  # D = 2
    (grad,) = torch.autograd.grad(log_p.sum(), z)
    eps = net(z.detach(), t, weights.expand(n, -1))
    torch.testing.assert_close(eps, -sigma * grad, rtol=0, atol=1e-10)

    x = net.sample(40_000, weights, torch.Generator().manual_seed(1))
    m = weights @ means
    cov = std**2 * torch.eye(2, dtype=F64) + ((means - m).T * weights) @ (means - m)
    torch.testing.assert_close(x.mean(0), m, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.03)


def test_a_component_of_weight_zero_contributes_nothing_to_the_mixture_eps():
    """One-hot c = (1, 0) is class 0 alone: ε̂ = σ(z − αμ_0)/v exactly, however far z is from μ_0. Means (0, 0) and (3, 0),
    s = 0.1, t = 0 (v = α²s² + σ² ≈ 0.0109), z = (10, 0): ‖z − αμ_0‖² − ‖z − αμ_1‖² ≈ 51 > 2·690.8·v ≈ 15, so the zero-weight
    class 1 takes over: ε̂ ≈ σ(z − αμ_1)/v ≈ 18.9 instead of 26.9."""
    means, std = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=F64), 0.1
    z, t = torch.tensor([[10.0, 0.0]], dtype=F64), torch.tensor([0])
    alpha, sigma = (v.item() for v in SD.alpha_sigma(t))
    expected = sigma * (z - alpha * means[0]) / (alpha**2 * std**2 + sigma**2)
    eps = GaussianMixtureEps(means, std, SD)(z, t, torch.tensor([[1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(eps, expected, rtol=1e-9, atol=1e-9)


# --- sampling.py ----------------------------------------------------------------------------------------------------


def test_algorithm_3_with_an_affine_consistency_function_and_replayed_noise():
    """f(z, τ) = a·z + ω: three steps τ = (999, 499, 99) give x1 = a z_T + ω, x2 = a(α_499 x1 + σ_499 ε_1) + ω,
    x3 = a(α_99 x2 + σ_99 ε_2) + ω, with ε_1, ε_2 the generator's first two draws; no draw after the last step."""
    a, omega = 0.5, 0.3
    seen = []

    def f(z, t, cond, w):
        seen.append(t.tolist())
        return a * z + w

    z_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    out = sample_lcm(f, z_T, torch.tensor([999, 499, 99]), None, omega, SD, g)
    replay = torch.Generator().manual_seed(7)
    eps1, eps2 = (torch.randn(3, 4, generator=replay) for _ in range(2))
    (a499, s499), (a99, s99) = (tuple(float(v) for v in SD.alpha_sigma(torch.tensor(t))) for t in (499, 99))
    x1 = a * z_T + omega
    x2 = a * (a499 * x1 + s499 * eps1) + omega
    x3 = a * (a99 * x2 + s99 * eps2) + omega
    torch.testing.assert_close(out, x3, rtol=0, atol=1e-6)
    assert seen == [[999] * 3, [499] * 3, [99] * 3]
    assert torch.equal(g.get_state(), replay.get_state())


# --- losses.py: progressive distillation's target ------------------------------------------------------------------


class FixedX0Student:
    """A student whose x̂0 is a fixed x (x0-prediction)."""

    prediction_type = "sample"

    def __init__(self, x):
        self.x = x

    def output(self, z, t, cond, omega):
        return self.x.to(z).expand_as(z)


def test_progressive_target_of_point_masses_is_the_guided_point_and_its_weight_the_truncated_snr():
    """With point-mass data the teacher's two DDIM jumps are exact, so x̃ = (z_s − (σ_s/σ_t) z_t)/(α_s − (σ_s/σ_t) α_t) is the
    guided point μ_c + ω(μ_c − μ_u) itself: a student at it scores 0, one off by 0.1 scores max(α_t²/σ_t², 1)·0.01."""
    means = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64)
    teacher = point_mass_teacher(means)
    loss = ProgressiveDistillationLoss(schedule=SD, teacher=teacher, student_steps=4, guidance_scale_range=(2.0, 2.0))  # ω = 1
    n = 64
    cond, uncond = torch.tensor([[1.0, 0.0]] * n, dtype=F64), torch.tensor([[0.0, 1.0]] * n, dtype=F64)
    x0 = means[0].expand(n, 2).clone()
    guided = means[0] + (means[0] - means[1])
    exact = loss(FixedX0Student(guided), None, x0, cond, uncond, torch.Generator().manual_seed(0))
    assert exact.abs().max() < 1e-12
    off = loss(FixedX0Student(guided + 0.1), None, x0, cond, uncond, torch.Generator().manual_seed(0))
    k = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(0))  # the draw the loss makes first
    alpha, sigma = SD.alpha_sigma(loss.path[2 * k])
    # the distance is taken in float32 (`consistency_distance`)
    torch.testing.assert_close(off, ((alpha / sigma) ** 2).clamp(min=1) * 0.01, rtol=1e-5, atol=0)
    assert off.max() > 0.01  # t = 249 on this grid has α/σ > 1: the SNR weight is not all 1


# --- training/omega_response.py ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_omega_response_of_point_masses_is_the_fraction_of_the_guidance_effect(strength):
    """With point masses the teacher's ODE solutions at g_min and g_max are exact; an f whose guided point moves `strength`
    as far with ω responds exactly `strength` at every measured t."""
    means = torch.tensor([[1.0, 0.5], [-0.6, 0.2]], dtype=F64)
    teacher = point_mass_teacher(means)  # the condition comes as text-encoder-shaped [B, 1, K] rows here
    config = SimpleNamespace(omega_response_samples=6, skip=20, solver="dpm++", guidance_scale_min=1.5, guidance_scale_max=4.0, seed=0)
    latents = means[0].expand(8, 2).clone()
    cond, uncond = torch.tensor([[[1.0, 0.0]]] * 8, dtype=F64), torch.tensor([[[0.0, 1.0]]], dtype=F64)

    def f(z, t, c, omega):
        return point_mass_flow(z, t, torch.zeros_like(t), means[0] + strength * omega * (means[0] - means[1]))

    response = omega_response(config, teacher, f, latents, cond, uncond)
    assert set(response) == {999, 759, 499, 259, 99}
    assert response == pytest.approx(dict.fromkeys(response, strength), abs=1e-6)  # `omega_response` runs in float32


# --- evaluation/fid.py ----------------------------------------------------------------------------------------------


class Identity(torch.nn.Module):
    """A feature network whose features are the images' values: feature sets with known statistics."""

    def __init__(self, feature_dim):
        super().__init__()
        self.feature_dim = feature_dim

    def features(self, images):
        return images.reshape(len(images), -1)


def cross(scale, centre):
    """The 2F points centre ± scale·e_i: sample mean `centre`, unbiased covariance 2·scale²/(2F − 1)·I."""
    eye = torch.eye(len(centre), dtype=F64)
    return torch.cat([centre + scale * eye, centre - scale * eye]).reshape(-1, 1, 1, len(centre))


def test_fid_of_feature_sets_with_known_gaussian_statistics():
    """FID = |m_1 − m_2|² + tr(Σ_1 + Σ_2 − 2(Σ_1Σ_2)^½); for Σ = c·I that is |Δm|² + F(√c_1 − √c_2)². F = 3, N = 6, scales 1 and 2:
    c = 2/5 and 8/5, so FID = 25 + 3·(2/5) = 26.2 for centres 0 and (3, 4, 0)."""
    net = Identity(3)
    a = cross(1.0, torch.zeros(3, dtype=F64))
    b = cross(2.0, torch.tensor([3.0, 4.0, 0.0], dtype=F64))
    assert fid_score(net, a, b, batch_size=4) == pytest.approx(26.2, rel=1e-6)
    assert fid_score(net, a, cross(1.0, torch.tensor([3.0, 4.0, 0.0], dtype=F64))) == pytest.approx(25.0, rel=1e-6)


def test_kid_and_feature_rms_by_hand():
    """KID's unbiased MMD² with k(x, y) = (x·y/F + 1)³, F = 1, X = {1, −1}, Y = {2, 0} (subsets of 2 are the whole sets):
    k_XX off the diagonal 0, k_YY 1 (twice, /2), k_XY sums to 27 + 1 − 1 + 1 = 28 (·2/4): 0 + 1 − 14 = −13. Features
    divided by 2: 1.421875 − 2.75 = −1.328125."""
    net = Identity(1)
    x, y = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1), torch.tensor([2.0, 0.0]).reshape(2, 1, 1, 1)
    assert kid_score(net, x, y, subsets=3) == pytest.approx(-13.0, rel=1e-6)
    assert kid_score(net, x, y, subsets=3, feature_scale=2.0) == pytest.approx(-1.328125, rel=1e-6)
    assert feature_rms(Identity(2), torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(12.5**0.5 / 2**0.5)
