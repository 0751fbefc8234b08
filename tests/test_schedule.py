import pytest
import torch
from diffusers import DDPMScheduler

from latent_consistency.errors import UserError
from latent_consistency.schedule import NoiseSchedule, consistency_pairs, skipping_grid


@pytest.mark.parametrize(
    "config",
    [
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
    ],
)
def test_alphas_cumprod_match_diffusers(config):
    ref = DDPMScheduler(**config).alphas_cumprod.double()
    ours = NoiseSchedule.from_config(DDPMScheduler(**config).config).alphas_cumprod
    # Zero-terminal-SNR: the last ᾱ = 0 is raised to 2^-24 so that λ stays finite, or to half the ᾱ before it where that is
    # smaller (here: DDPMScheduler's default betas 1e-4..0.02 rescaled), so that ᾱ still decreases; a small positive one
    # (squaredcos_cap_v2's 2.4e-9) is diffusers' own and kept.
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=0, atol=1e-6)
    raised = min(2.0**-24, ref[-2].item() / 2)
    assert ours[-1].item() == pytest.approx(ref[-1].item() if ref[-1] > 0 else raised, rel=1e-6, abs=0)


def test_alpha_sigma_exact_at_integers_and_continuous_between():
    s = NoiseSchedule.from_config({})
    t = torch.arange(0, 1000)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, s.alphas_cumprod)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64))
    a_int, _ = s.alpha_sigma(torch.tensor([10.0, 11.0]))
    torch.testing.assert_close(a_int, alpha[10:12])
    a_mid, _ = s.alpha_sigma(torch.tensor([10.5]))
    assert alpha[11] < a_mid < alpha[10]


def test_t_of_lambda_inverts_lambda():
    s = NoiseSchedule.from_config({})
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.t_of_lambda(s.lambda_(t)), t)


def test_skipping_grid_and_pairs():
    grid = skipping_grid(1000, 20)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999 and len(grid) == 50
    t_n_plus_k, t_n = consistency_pairs(grid, torch.tensor([0, 1, 49]), 20)
    assert t_n_plus_k.tolist() == [19, 39, 999]
    assert t_n.tolist() == [0, 19, 979]


@pytest.mark.parametrize("skip", [0, 3, 1001])
def test_skipping_grid_rejects_bad_skip(skip):
    with pytest.raises(UserError):
        skipping_grid(1000, skip)


def test_add_noise_matches_diffusers():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    ours = NoiseSchedule.from_config(sched.config).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, sched.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
