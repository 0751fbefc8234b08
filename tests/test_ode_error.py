import pytest
import torch

from latent_consistency.analytic import GaussianMixtureEps, gaussian_flow
from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import ode_error, ode_solutions
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver


def test_the_exact_consistency_function_of_gaussian_data_has_no_ode_error():
    """For x0 ~ N(μ, s²I) the PF-ODE solution is known (`gaussian_flow`): the grid solver reproduces it,
    so the exact consistency function scores ~0 at every t and one offset by 0.1 scores 0.01."""
    schedule = NoiseSchedule.from_config({})
    mean, std = torch.tensor([[0.5, -0.5]]), 0.4
    net = GaussianMixtureEps(mean, std, schedule)
    teacher = GuidedTeacher(net, schedule, "epsilon")
    x0 = net.sample(512, torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0))
    cond = torch.ones(512, 1, dtype=torch.float64)
    sols = ode_solutions(teacher, get_solver("dpm++"), x0, cond, cond, 2.0, [999, 259, 19], skip=20,
                         generator=torch.Generator().manual_seed(1))
    for t, z in sols.z.items():
        exact = gaussian_flow(z, torch.full((512,), t), torch.zeros(512, dtype=torch.long), mean[0], std, schedule)
        assert torch.allclose(sols.solution[t], exact, atol=3e-2)

    def exact_f(z, t, cond, omega):
        return gaussian_flow(z, t, torch.zeros_like(t), mean[0], std, schedule)

    exact_error = ode_error(exact_f, sols)
    assert all(e < 1e-4 for e in exact_error.values())
    offset = ode_error(lambda z, t, c, w: exact_f(z, t, c, w) + 0.1, sols)
    assert offset == pytest.approx({999: 0.01, 259: 0.01, 19: 0.01}, rel=2e-2)
    with pytest.raises(UserError, match="not on the grid"):
        ode_solutions(teacher, get_solver("ddim"), x0, cond, cond, 2.0, [500], skip=20)


def test_error_timesteps_are_the_4_step_sampler_s_and_one_small_t():
    from latent_consistency.evaluation.over_training import error_timesteps

    assert error_timesteps(1000, 20) == [999, 759, 499, 259, 99]
    assert error_timesteps(1000, 50) == [999, 749, 499, 249, 99]
