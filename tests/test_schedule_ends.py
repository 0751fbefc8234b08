"""The noisy end of a schedule (t = T-1, ᾱ → 0) against closed forms: a zero-terminal-SNR schedule keeps ᾱ and λ
decreasing where it raises ᾱ_{T-1} = 0, so the second-order jumps from T-1 are finite; and DPM-Solver-2's jump from
T-1 on a cosine schedule is as accurate in float32 as DDIM's (its first-order part in data form)."""

from __future__ import annotations

import pytest
import torch

from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import SOLVERS

# Zero-terminal-SNR schedules whose ᾱ_{T-2} is below 2^-24: raising ᾱ_{T-1} = 0 to 2^-24 put it above its neighbour
SMALL_END = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),  # DDPM's default betas
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=2000),
]


@pytest.mark.parametrize("config", SMALL_END)
def test_a_raised_zero_keeps_the_schedule_decreasing_and_the_jumps_from_the_end_finite(config):
    """Was: ᾱ_999 = 2^-24 above ᾱ_998 = 4.2e-9, `t_of_lambda` found no intermediate point between them, and the DPM-Solver
    jumps from 999 were NaN (every batch drawing that pair skipped as non-finite)."""
    schedule = NoiseSchedule.from_config(dict(config, rescale_betas_zero_snr=True))
    a = schedule.alphas_cumprod
    assert (a[1:] < a[:-1]).all() and (schedule.lambdas[1:] < schedule.lambdas[:-1]).all()
    assert schedule.ends_at_zero_snr and schedule.zero_terminal_snr and 0 < a[-1] < 2.0**-24
    last = schedule.num_train_timesteps - 1

    def denoise(z, t):  # x0 ~ N(0.5, 0.2²): the exact (x̂0, ε̂)
        alpha, sigma = (v.float()[:, None] for v in schedule.alpha_sigma(t))
        var = alpha**2 * 0.04 + sigma**2
        return 0.5 + alpha * 0.04 * (z - alpha * 0.5) / var, sigma * (z - alpha * 0.5) / var

    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 20):
        t, s = torch.full((8,), last), torch.full((8,), last - k)
        for name in ("ddim", "dpm", "dpm++"):
            assert torch.isfinite(SOLVERS[name].jump(denoise, z, t, s, schedule)).all(), (name, k)


def test_diffusers_raised_value_stays_where_the_schedule_allows_it():
    """SD's own betas rescaled (the world's --zero-terminal-snr) keep diffusers' 2^-24; a cosine schedule, whose ᾱ_{T-1}
    was never 0, is not said to end at zero SNR."""
    sd = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True))
    assert sd.alphas_cumprod[-1] == 2.0**-24 and sd.ends_at_zero_snr
    cosine = NoiseSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2"))
    assert cosine.zero_terminal_snr and not cosine.ends_at_zero_snr


def test_dpm_solver_2_from_the_end_of_a_cosine_schedule_is_as_accurate_as_ddim_in_float32():
    """Was: the noise form (α_u/α_t)·z - σ_u·(e^{rh} - 1)·ε cancels two terms of 10²-10³ × z at α_t = 4.9e-5, leaving
    float32 rounding of 6.3e-3 at k = 20 and 4.9e-2 at k = 50 against DDIM's 3.4e-4 and 2.1e-3."""
    schedule = NoiseSchedule.from_config(dict(beta_schedule="squaredcos_cap_v2"))
    mean, std = 1.0, 0.4

    def moments(t):
        alpha, sigma = schedule.alpha_sigma(t)
        return alpha[:, None], sigma[:, None]

    def denoise(z, t):  # the exact (x̂0, ε̂) of x0 ~ N(1, 0.4²), rounded to float32 as a network's output is
        alpha, sigma = moments(t)
        var, centred = alpha**2 * std**2 + sigma**2, z.double() - alpha * mean
        return (mean + alpha * std**2 * centred / var).float(), (sigma * centred / var).float()

    def flow(z, t, s):  # the exact PF-ODE solution: the standardised z is constant
        (alpha_t, sigma_t), (alpha_s, sigma_s) = moments(t), moments(s)
        ratio = ((alpha_s**2 * std**2 + sigma_s**2) / (alpha_t**2 * std**2 + sigma_t**2)).sqrt()
        return alpha_s * mean + ratio * (z.double() - alpha_t * mean)

    z = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    for k in (20, 50):
        t, s = torch.full((4096,), 999), torch.full((4096,), 999 - k)
        error = {name: (SOLVERS[name].jump(denoise, z, t, s, schedule).double() - flow(z, t, s)).abs().max().item()
                 for name in ("ddim", "dpm", "dpm++")}
        assert error["dpm"] <= 2 * error["ddim"] and error["dpm++"] <= 2 * error["ddim"], (k, error)
