"""PF-ODE solvers against known answers (Gaussian data) and against diffusers' DDIM step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.solvers import SOLVERS, get_solver, guided_jump
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow, reference_flow

SCHEDULE_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def schedule():
    from latent_consistency.schedule import NoiseSchedule

    return NoiseSchedule.from_config(SCHEDULE_CONFIG)


def one_jump_errors(schedule, solver, exact_fn, teacher, cond, uncond, omega, t0=600.0, hs=(0.4, 0.2, 0.1), n=64):
    """Max error of one jump from t0 over λ-steps h, against the exact flow, for the same z_t."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.3
    t = torch.full((n,), t0, dtype=torch.float64)
    errors = []
    for h in hs:
        s = schedule.t_of_lambda(schedule.lambda_(t) + h)
        z_s = guided_jump(solver, teacher, z, t, s, cond, uncond, omega)
        errors.append((z_s - exact_fn(z, t, s)).abs().max().item())
    return errors


@pytest.mark.parametrize("name,expected_ratio", [("ddim", 4.0), ("dpm", 8.0), ("dpm++", 8.0)])
def test_local_error_order_on_gaussian_data(schedule, name, expected_ratio):
    mean, std = torch.tensor([[0.7, -0.4]]), 0.5
    teacher = GuidedTeacher(GaussianMixtureEps(mean, std, schedule), schedule, "epsilon")
    cond = torch.ones(64, 1, dtype=torch.float64)
    errors = one_jump_errors(
        schedule, get_solver(name), lambda z, t, s: gaussian_flow(z, t, s, mean[0], std, schedule), teacher, cond, cond, 0.0
    )
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    # Local error O(h^{p+1}): halving h divides it by 2^{p+1}.
    for r in ratios:
        assert expected_ratio * 0.75 < r < expected_ratio * 1.3, (errors, ratios)
    assert errors[-1] < (2e-3 if name == "ddim" else 1e-4)


def two_class_teacher(schedule):
    means = torch.tensor([[1.0, 0.5], [-1.0, -0.5]])
    return GuidedTeacher(GaussianMixtureEps(means, 0.3, schedule), schedule, "epsilon")


@pytest.mark.parametrize("name,expected_ratio", [("ddim", 4.0), ("dpm", 8.0), ("dpm++", 8.0)])
def test_guided_local_error_order_on_two_class_data(schedule, name, expected_ratio):
    teacher = two_class_teacher(schedule)
    n, omega = 64, 3.0
    cond = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(n, 2)
    uncond = torch.full((n, 2), 0.5, dtype=torch.float64)

    def guided_eps(z, t):
        return teacher.guided(z, t, cond, uncond, omega)[1]

    errors = one_jump_errors(
        schedule, get_solver(name), lambda z, t, s: reference_flow(guided_eps, z, t, s, schedule, steps=60),
        teacher, cond, uncond, omega, t0=400.0, hs=(0.2, 0.1, 0.05),
    )
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    for r in ratios:
        assert expected_ratio * 0.7 < r < expected_ratio * 1.4, (errors, ratios)


def test_guided_increments_equal_per_evaluation_for_ddim_only(schedule):
    """Eq. 17 literal (guide the increments) equals guiding each evaluation for DDIM, not for 2nd order."""
    teacher = two_class_teacher(schedule)
    n = 16
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(n, 2)
    uncond = torch.full((n, 2), 0.5, dtype=torch.float64)
    t, s = torch.full((n,), 519), torch.full((n,), 499)
    for name, solver in SOLVERS.items():
        a = guided_jump(solver, teacher, z, t, s, cond, uncond, 5.0)
        b = guided_jump(solver, teacher, z, t, s, cond, uncond, 5.0, guide_increments=True)
        diff = (a - b).abs().max().item()
        if name == "ddim":
            assert diff < 1e-12
        else:
            assert 1e-9 < diff < 0.1


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("guide_increments", [False, True])
def test_teacher_evaluations_per_jump(schedule, name, guide_increments):
    calls = []
    base = GaussianMixtureEps(torch.zeros(2, 2), 1.0, schedule)

    def counting_net(z, t, cond, timestep_cond=None):
        calls.append(z.shape[0])
        return base(z, t, cond)

    teacher = GuidedTeacher(counting_net, schedule, "epsilon")
    z = torch.randn(3, 2, dtype=torch.float64)
    cond = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(3, 2)
    guided_jump(SOLVERS[name], teacher, z, torch.full((3,), 500), torch.full((3,), 480), cond, cond, 2.0, guide_increments)
    assert len(calls) == SOLVERS[name].evaluations_per_jump
    assert calls == [6] * len(calls)  # cond and uncond batched together


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_jump_matches_diffusers_ddim_step(schedule, prediction_type):
    ddim = DDIMScheduler(**SCHEDULE_CONFIG, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    t = int(ddim.timesteps[10])
    prev = t - 1000 // 50
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g) * 0.3

    def net(z_, t_, cond, timestep_cond=None):  # any deterministic function of (z, t)
        return torch.einsum("ij,bjhw->bihw", weight, z_) + 0.001 * t_.float().view(-1, 1, 1, 1)

    teacher = GuidedTeacher(net, schedule, prediction_type)
    cond = torch.zeros(2, 1)
    ours = guided_jump(SOLVERS["ddim"], teacher, z, torch.tensor(t), torch.tensor(prev), cond, cond, 0.0)
    ref = ddim.step(net(z, torch.full((2,), t), None), t, z).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_unknown_solver():
    with pytest.raises(UserError, match="unknown solver"):
        get_solver("heun")


def test_gaussian_flow_matches_reference_integrator(schedule):
    """The closed form and the RK4 integrator agree: each checks the other."""
    mean, std = torch.tensor([[0.3, -1.2]]), 0.7
    net = GaussianMixtureEps(mean, std, schedule)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, s = torch.full((8,), 900.0, dtype=torch.float64), torch.full((8,), 10.0, dtype=torch.float64)
    exact = gaussian_flow(z, t, s, mean[0], std, schedule)
    ref = reference_flow(lambda z_, t_: net(z_, t_, torch.ones(8, 1, dtype=torch.float64)), z, t, s, schedule, steps=200)
    assert (exact - ref).abs().max().item() < 1e-6
    assert math.isfinite(exact.abs().max().item())


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_zero_length_jump_is_the_identity(schedule, name):
    """Skip k = 1's first pair is t_{n+k} = t_n = 0 (`schedule.consistency_pairs` clamps t_n): the exact PF-ODE solution
    over no time is z itself. The singlestep DPM solvers measure r = (λ_u − λ_t)/(λ_s − λ_t), 0/0 there (a run with
    DPM-Solver at k = 1 stopped on non-finite losses)."""
    from latent_consistency.schedule import consistency_pairs, skipping_grid

    t_n_plus_k, t_n = consistency_pairs(skipping_grid(1000, 1), torch.tensor([0, 12, 999]), 1)
    assert t_n_plus_k[0] == t_n[0] == 0
    data = GaussianMixtureEps(torch.tensor([[1.0, -1.0], [-2.0, 0.5]]), 0.3, schedule)
    teacher = GuidedTeacher(data, schedule, "epsilon")
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64), torch.tensor([[0.5, 0.5]] * 3, dtype=torch.float64)
    z_s = guided_jump(get_solver(name), teacher, z, t_n_plus_k, t_n, cond, uncond, torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.isfinite(z_s).all() and torch.equal(z_s[0], z[0])
    assert not torch.equal(z_s[1:], z[1:])


def test_the_dpm_solver_baseline_is_built_without_diffusers_deprecation_warning():
    """diffusers deprecates its noise-prediction DPM-Solver (Table 1's DPM-Solver row) with a FutureWarning at every
    construction, which reached every `lcm evaluate --teacher` user's terminal."""
    import warnings

    from latent_consistency.sampling import teacher_scheduler

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = teacher_scheduler("dpm", {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                              "beta_end": 0.012, "prediction_type": "epsilon"})
    assert scheduler.config.algorithm_type == "dpmsolver"
