import pytest
import torch

from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.losses import GuidancePairLCDLoss, LCDLoss, LCFLoss, consistency_distance, consistency_weight
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import SOLVERS, get_solver, guided_jump
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow
from latent_consistency.training.ema import ema_update


def test_distances_known_values():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert consistency_distance(a, b, "l2").item() == pytest.approx((9 + 16) / 2)
    c = 0.5
    expected = ((9 + c**2) ** 0.5 - c + (16 + c**2) ** 0.5 - c) / 2
    assert consistency_distance(a, b, "huber", c).item() == pytest.approx(expected)
    with pytest.raises(UserError):
        consistency_distance(a, b, "l1")


def test_ema_update_known_values_and_buffers():
    src, tgt = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        src.weight.fill_(1.0)
        tgt.weight.fill_(0.0)
        src.running_mean.fill_(5.0)
    ema_update(tgt, src, decay=0.9)
    torch.testing.assert_close(tgt.weight, torch.full((2,), 0.1))
    torch.testing.assert_close(tgt.running_mean, torch.full((2,), 5.0))
    ema_update(tgt, src, decay=0.0)
    torch.testing.assert_close(tgt.weight, src.weight)


def test_fused_ema_update_equals_the_formula_per_tensor_and_dtype():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Conv2d(5, 2, 3), torch.nn.LayerNorm(4))
    tgt = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Conv2d(5, 2, 3), torch.nn.LayerNorm(4))
    tgt[1].to(torch.float64)  # a target tensor in another dtype gets its own fused group
    before = {name: p.detach().clone() for name, p in tgt.named_parameters()}
    ema_update(tgt, src, decay=0.7)
    for name, param in src.named_parameters():
        expected = 0.7 * before[name] + 0.3 * param.detach().to(before[name].dtype)
        torch.testing.assert_close(dict(tgt.named_parameters())[name], expected, rtol=1e-6, atol=1e-7)


def test_lcd_loss_is_small_for_the_exact_consistency_function_and_lcf_needs_no_teacher():
    """The true consistency function of Gaussian data scores ~0 (up to the solver's error); a shifted one
    scores the shift squared."""
    schedule = NoiseSchedule.from_config({})
    mean, std = torch.tensor([[0.5, -0.5]]), 0.4
    net = GaussianMixtureEps(mean, std, schedule)
    teacher = GuidedTeacher(net, schedule, "epsilon")

    def exact_f(z, t, cond, omega):  # the true consistency function of single-Gaussian data (ω irrelevant)
        return gaussian_flow(z, t, torch.zeros_like(t), mean[0], std, schedule)

    def biased_f(z, t, cond, omega):
        return exact_f(z, t, cond, omega) + 0.1

    x0 = net.sample(256, torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0))
    cond = torch.ones(256, 1, dtype=torch.float64)
    loss = LCDLoss(schedule, skip=20, distance="l2", teacher=teacher, solver=get_solver("dpm++"))
    exact = loss(exact_f, exact_f, x0, cond, cond, torch.Generator().manual_seed(1)).mean().item()
    wrong = loss(biased_f, exact_f, x0, cond, cond, torch.Generator().manual_seed(1)).mean().item()
    assert exact < 1e-6 and wrong == pytest.approx(0.01, rel=1e-3)
    lcf = LCFLoss(schedule, skip=20, distance="l2")
    assert lcf(exact_f, exact_f, x0, cond, generator=torch.Generator().manual_seed(1)).shape == (256,)


def test_lcd_loss_requires_teacher_and_valid_range():
    schedule = NoiseSchedule.from_config({})
    with pytest.raises(TypeError):
        LCDLoss(schedule)
    with pytest.raises(UserError, match="guidance scale range"):
        LCFLoss(schedule, guidance_scale_range=(5.0, 2.0))


def test_ict_weighting_is_the_inverse_noise_level_gap_normalised_over_the_grid():
    """λ = 1/(σ̃(t_{n+k}) − σ̃(t_n)) with σ̃ = √((1−ᾱ)/ᾱ) from the schedule's ᾱ; a constant offset of 0.1
    then costs 0.01·λ(t_n) per sample, λ normalised to mean 1 over the grid."""
    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    abar = schedule.alphas_cumprod.double()
    sigma_edm = ((1 - abar) / abar).sqrt()
    t, s = torch.tensor([999, 259, 19]), torch.tensor([979, 239, 0])
    expected = 1 / (sigma_edm[t] - sigma_edm[s])
    assert torch.allclose(consistency_weight(schedule, t, s).double(), expected, rtol=1e-5)
    assert expected[1] > 20 * expected[0]  # the middle of the schedule outweighs t = T

    def offset_f(z, t, cond, omega):
        return z * 0 + 0.1

    x0 = torch.zeros(512, 2, dtype=torch.float64)
    cond = torch.ones(512, 1, dtype=torch.float64)
    teacher = GuidedTeacher(GaussianMixtureEps(torch.tensor([[0.5, -0.5]]), 0.4, schedule), schedule, "epsilon")
    loss = LCDLoss(schedule, skip=20, distance="l2", weighting="ict", teacher=teacher, solver=get_solver("ddim"))
    zero = lambda z, t, cond, omega: z * 0
    per_sample = loss(offset_f, zero, x0, cond, cond, torch.Generator().manual_seed(1))
    point = loss.draw_point(x0, torch.Generator().manual_seed(1))
    grid_weights = consistency_weight(schedule, *loss_pairs(loss))
    assert torch.allclose(point.weight, (grid_weights / grid_weights.mean())[(point.t_n_plus_k - 19) // 20].float())
    assert torch.allclose(per_sample.double(), 0.01 * point.weight.double(), rtol=1e-5)
    every_step = LCFLoss(schedule, skip=1, weighting="ict").grid_weights  # first pair (0, 0): no gap, weight 0
    assert every_step[0] == 0 and torch.isfinite(every_step).all() and every_step[1:].gt(0).all()
    with pytest.raises(UserError, match="loss weighting"):
        LCFLoss(schedule, weighting="snr")


def loss_pairs(loss):
    from latent_consistency.schedule import consistency_pairs

    return consistency_pairs(loss.grid, torch.arange(len(loss.grid)), loss.skip)


def test_guidance_pair_loss_known_values_and_exact_guided_consistency_function():
    """Each example at ω and ω' (same z, n, ε): ½[d(f(ω), F(ω)) + d(f(ω'), F(ω'))] + λ_Δ·d(Δf, ΔF). With f = ω
    everywhere and F = 0 under L2 that is ½(ω² + ω'²) + λ_Δ(ω − ω')². The exact guided consistency function
    of two same-variance Gaussians (guided mean μ_c + ω(μ_c − μ_u)) scores ~0; one that ignores ω does not."""
    schedule = NoiseSchedule.from_config({})
    means, std = torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), 0.4
    teacher = GuidedTeacher(GaussianMixtureEps(means, std, schedule), schedule, "epsilon")
    cond, uncond = torch.tensor([[1.0, 0.0]]).expand(256, 2), torch.tensor([[0.0, 1.0]]).expand(256, 2)
    x0 = GaussianMixtureEps(means, std, schedule).sample(256, cond, torch.Generator().manual_seed(0))
    loss = GuidancePairLCDLoss(schedule, skip=20, guidance_scale_range=(1.0, 3.0), distance="l2", teacher=teacher,
                               solver=get_solver("dpm++"), guidance_pair_weight=10.0)
    seen = []

    def omega_f(z, t, c, omega):
        seen.append(omega)
        return omega[:, None].to(z).expand_as(z)

    per_example = loss(omega_f, lambda z, t, c, omega: z * 0, x0, cond, uncond, torch.Generator().manual_seed(1))
    omega, omega_pair = seen[0].double().chunk(2)
    assert per_example.shape == (256,) and omega.min() >= 0 and omega_pair.max() <= 2 and not torch.equal(omega, omega_pair)
    assert torch.allclose(per_example.double(), 0.5 * (omega**2 + omega_pair**2) + 10 * (omega - omega_pair) ** 2, rtol=1e-6)

    def flow_f(strength):
        def f(z, t, c, omega):
            mean = means[0].double()[None] + strength * omega.double()[:, None] * (means[0] - means[1]).double()[None]
            return torch.stack([gaussian_flow(z[i:i + 1], t[i:i + 1], torch.zeros(1, dtype=torch.long), mean[i], std, schedule)[0]
                                for i in range(z.shape[0])])
        return f

    exact = loss(flow_f(1.0), flow_f(1.0), x0, cond, uncond, torch.Generator().manual_seed(1)).mean().item()
    ignores_omega = loss(flow_f(0.0), flow_f(1.0), x0, cond, uncond, torch.Generator().manual_seed(1)).mean().item()
    assert exact < 1e-5 and ignores_omega > 100 * exact
    with pytest.raises(UserError, match="guidance_pair_weight"):
        GuidancePairLCDLoss(schedule, teacher=teacher, solver=get_solver("ddim"), guidance_pair_weight=-1.0)


def test_guidance_pair_term_applies_for_its_steps_only():
    """With pair_steps N the λ_Δ term is there at steps < N and gone from step N on: the known values
    ½(ω² + ω'²) + λ_Δ(ω − ω')² before, ½(ω² + ω'²) after, for f = ω and F = 0 under L2."""
    schedule = NoiseSchedule.from_config({})
    teacher = GuidedTeacher(GaussianMixtureEps(torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), 0.4, schedule), schedule, "epsilon")
    cond, uncond = torch.tensor([[1.0, 0.0]]).expand(64, 2), torch.tensor([[0.0, 1.0]]).expand(64, 2)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    loss = GuidancePairLCDLoss(schedule, guidance_scale_range=(1.0, 3.0), distance="l2", teacher=teacher, solver=get_solver("ddim"),
                               guidance_pair_weight=10.0, pair_steps=3)
    seen = []

    def omega_f(z, t, c, omega):
        seen.append(omega.double())
        return omega[:, None].to(z).expand_as(z)

    for step, weight in ((0, 10.0), (2, 10.0), (3, 0.0), (50, 0.0)):
        loss.step, seen[:] = step, []
        per_example = loss(omega_f, lambda z, t, c, omega: z * 0, x0, cond, uncond, torch.Generator().manual_seed(step))
        omega, omega_pair = seen[0].chunk(2)
        assert loss.pair_weight == weight
        assert torch.allclose(per_example.double(), 0.5 * (omega**2 + omega_pair**2) + weight * (omega - omega_pair) ** 2, rtol=1e-6)
    with pytest.raises(UserError, match="pair_steps"):
        GuidancePairLCDLoss(schedule, teacher=teacher, solver=get_solver("ddim"), guidance_pair_weight=1.0, pair_steps=-1)


@pytest.mark.parametrize("guide_increments", [False, True])
@pytest.mark.parametrize("name", ["ddim", "dpm", "dpm++"])
def test_guidance_pair_teacher_jumps_equal_tiled_rows_and_share_teacher_work(name, guide_increments):
    """The pair loss's teacher jumps for ω and ω': the same as LCD's jump on two explicit copies of the rows, with
    fewer network rows (what does not depend on ω runs once)."""
    schedule = NoiseSchedule.from_config({})
    teacher = GuidedTeacher(GaussianMixtureEps(torch.tensor([[1.0, 0.5], [-1.0, -0.5]]), 0.3, schedule), schedule, "epsilon")
    rows = []
    network = teacher.net
    teacher.net = lambda z, t, cond: rows.append(z.shape[0]) or network(z, t, cond)
    g = torch.Generator().manual_seed(5)
    b = 6
    z = torch.randn(b, 2, generator=g, dtype=torch.float64)
    cond = torch.nn.functional.one_hot(torch.arange(b) % 2, 2).double()
    uncond = torch.full((b, 2), 0.5, dtype=torch.float64)
    t, s = torch.full((b,), 700.0, dtype=torch.float64), torch.full((b,), 640.0, dtype=torch.float64)
    omega = torch.rand(2 * b, generator=g, dtype=torch.float64) * 4
    loss = GuidancePairLCDLoss(schedule, teacher=teacher, solver=SOLVERS[name], guide_increments=guide_increments,
                               guidance_pair_weight=1.0)

    shared = loss._teacher_jumps(z, t, s, cond, uncond, omega)
    shared_rows, rows[:] = sum(rows), []
    tiled = guided_jump(SOLVERS[name], teacher, torch.cat([z, z]), torch.cat([t, t]), torch.cat([s, s]),
                        torch.cat([cond, cond]), torch.cat([uncond, uncond]), omega, guide_increments)
    torch.testing.assert_close(shared, tiled, rtol=1e-12, atol=1e-12)
    evaluations = SOLVERS[name].evaluations_per_jump
    # per evaluation: the first evaluation (at z_t, the same for every ω) runs once; per increment: all do
    saved = evaluations if guide_increments else 1
    assert sum(rows) == 4 * b * evaluations and shared_rows == 4 * b * evaluations - 2 * b * saved
