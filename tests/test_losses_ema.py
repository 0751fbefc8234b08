import pytest
import torch

from latent_consistency.analytic import GaussianMixtureEps, gaussian_flow
from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.losses import LCDLoss, LCFLoss, consistency_distance
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver
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
