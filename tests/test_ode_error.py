import pytest
import torch

from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import ode_error, ode_solution_sets
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow


def test_the_exact_consistency_function_of_gaussian_data_has_no_ode_error():
    """For x0 ~ N(μ, s²I) the PF-ODE solution is known (`gaussian_flow`): the grid solver reproduces it,
    so the exact consistency function scores ~0 at every t and one offset by 0.1 scores 0.01."""
    schedule = NoiseSchedule.from_config({})
    mean, std = torch.tensor([[0.5, -0.5]]), 0.4
    net = GaussianMixtureEps(mean, std, schedule)
    teacher = GuidedTeacher(net, schedule, "epsilon")
    x0 = net.sample(512, torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0))
    cond = torch.ones(512, 1, dtype=torch.float64)
    (sols,) = ode_solution_sets(teacher, get_solver("dpm++"), x0, cond, cond, [2.0], [999, 259, 19], skip=20,
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
        ode_solution_sets(teacher, get_solver("ddim"), x0, cond, cond, [2.0], [500], skip=20)


def test_error_timesteps_are_the_4_step_sampler_s_and_one_small_t():
    from latent_consistency.evaluation.ode_error import error_timesteps

    assert error_timesteps(1000, 20) == [999, 759, 499, 259, 99]
    assert error_timesteps(1000, 50) == [999, 749, 499, 249, 99]


def test_guidance_response_is_one_for_the_guided_consistency_function_and_zero_without_omega():
    """Cond N(μ_c, s²) and uncond N(μ_u, s²) share a variance, and ε of Gaussian data is affine in its mean,
    so the guided ε at ω is that of N(μ_c + ω(μ_c − μ_u), s²) and its exact ODE solution is `gaussian_flow`
    with that mean (the solver reproduces it); a consistency function whose mean moves half as far with ω
    responds exactly 0.5, one that ignores ω 0."""
    from latent_consistency.evaluation.ode_error import guidance_response

    schedule = NoiseSchedule.from_config({})
    means, std = torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), 0.4
    net = GaussianMixtureEps(means, std, schedule)
    teacher = GuidedTeacher(net, schedule, "epsilon")
    cond, uncond = torch.tensor([[1.0, 0.0]]).expand(512, 2), torch.tensor([[0.0, 1.0]]).expand(512, 2)
    x0 = net.sample(512, cond, torch.Generator().manual_seed(0))

    def f_with(strength):
        def f(z, t, c, omega):
            mean = means[0] + strength * omega * (means[0] - means[1])
            return gaussian_flow(z, t, torch.zeros_like(t), mean, std, schedule)
        return f

    def solved(omega, seed=1):
        (sols,) = ode_solution_sets(teacher, get_solver("dpm++"), x0, cond, uncond, [omega], [999, 499, 99], skip=20,
                                    generator=torch.Generator().manual_seed(seed))
        for t, z in sols.z.items():
            exact = f_with(1.0)(z, torch.full((512,), t), cond, omega)
            assert (sols.solution[t] - exact).abs().max() < 0.1 * (exact - x0).abs().max()
            sols.solution[t] = exact  # the closed form, free of the grid solver's small error
        return sols

    low, high = solved(0.0), solved(2.0)
    assert guidance_response(f_with(1.0), low, high) == pytest.approx({999: 1.0, 499: 1.0, 99: 1.0}, abs=1e-6)
    assert guidance_response(f_with(0.5), low, high) == pytest.approx({999: 0.5, 499: 0.5, 99: 0.5}, abs=1e-6)
    assert guidance_response(f_with(0.0), low, high) == {999: 0.0, 499: 0.0, 99: 0.0}
    with pytest.raises(ValueError, match="same z_t"):
        guidance_response(f_with(1.0), low, solved(2.0, seed=2))


def test_the_teacher_consistency_function_is_the_ode_solution_per_row():
    """f* of Gaussian data is `gaussian_flow` to 0 (within the grid solver's error), for rows at different t in one
    batch, on and off the grid; at t = 0 it is the identity (c_skip(0) = 1); `ode_solution_sets` uses it."""
    from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction

    schedule = NoiseSchedule.from_config({})
    mean, std = torch.tensor([[0.5, -0.5]]), 0.4
    net = GaussianMixtureEps(mean, std, schedule)
    teacher = GuidedTeacher(net, schedule, "epsilon")
    cond = torch.ones(6, 1, dtype=torch.float64)
    f = TeacherConsistencyFunction(teacher, get_solver("dpm++"), 20, cond[:1])
    t = torch.tensor([999, 999, 259, 500, 7, 0])
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = f(z, t, cond, 2.0)
    exact = gaussian_flow(z, t, torch.zeros_like(t), mean[0], std, schedule)
    assert torch.allclose(out[:5], exact[:5], atol=3e-2) and torch.equal(out[5], z[5])
    assert not torch.allclose(out[:5], z[:5], atol=0.1)  # it moved the noisy rows
    x0 = net.sample(4, torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0))
    (sols,) = ode_solution_sets(teacher, get_solver("dpm++"), x0, cond[:4], cond[:4], [2.0], [259], skip=20,
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(sols.solution[259], f(sols.z[259], torch.tensor(259), cond[:4], 2.0))


def test_solution_sets_of_several_scales_on_one_staircase_equal_each_set_solved_alone(monkeypatch):
    """`ode_solution_sets` solves every (ω, t) row set on one chain, in parts of at most `max_rows` rows per teacher call:
    the same solutions as each ω's set solved alone, from the same z_t, whatever the part size."""
    from latent_consistency.evaluation import ode_error as module

    schedule = NoiseSchedule.from_config({})
    means, std = torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), 0.4
    teacher = GuidedTeacher(GaussianMixtureEps(means, std, schedule), schedule, "epsilon")
    cond, uncond = torch.tensor([[1.0, 0.0]]).expand(6, 2), torch.tensor([[0.0, 1.0]]).expand(6, 2)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timesteps = [999, 499, 99]
    alone = [ode_solution_sets(teacher, get_solver("dpm++"), x0, cond, uncond, [w], timesteps, 20, torch.Generator().manual_seed(1))[0]
             for w in (0.0, 2.0)]
    for elements in (module.ELEMENTS_PER_CALL, 1):  # every row set in one call per jump, or parts of 6 rows
        monkeypatch.setattr(module, "ELEMENTS_PER_CALL", elements)
        together = ode_solution_sets(teacher, get_solver("dpm++"), x0, cond, uncond, [0.0, 2.0], timesteps, 20,
                                     torch.Generator().manual_seed(1))
        for one, other in zip(alone, together):
            assert one.omega == other.omega and all(torch.equal(one.z[t], other.z[t]) for t in timesteps)
            assert all(torch.allclose(one.solution[t], other.solution[t], atol=1e-12) for t in timesteps)
        assert not torch.allclose(together[0].solution[999], together[1].solution[999])
