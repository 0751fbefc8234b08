import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from latent_consistency.errors import UserError
from latent_consistency.parameterization import (
    PREDICTION_TYPES,
    boundary_scalings,
    consistency_output,
    guidance_embedding,
    model_output_from,
    omega_from_guidance_scale,
    x0_and_eps,
)
from latent_consistency.schedule import NoiseSchedule


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    schedule = NoiseSchedule.from_config({})
    t = torch.tensor([0, 1, 250, 700, 999])
    alpha, sigma = schedule.alpha_sigma(t)
    z = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out = model_output_from(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = x0_and_eps(out, z, alpha, sigma, prediction_type)
    # x0-prediction recovers ε by dividing by σ_0 ≈ 0.03: a looser but still tight bound there.
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-7)


def test_v_prediction_definition():
    # v = α·ε - σ·x0 (Salimans & Ho 2022), by hand for one number.
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    v = model_output_from(torch.tensor([2.0]), torch.tensor([1.0]), alpha, sigma, "v_prediction")
    assert v.item() == pytest.approx(0.6 * 1.0 - 0.8 * 2.0)


def test_unknown_prediction_type():
    with pytest.raises(UserError, match="prediction_type"):
        x0_and_eps(torch.zeros(1), torch.zeros(1), torch.tensor(1.0), torch.tensor(0.0), "flow")


def test_boundary_condition_at_zero():
    c_skip, c_out = boundary_scalings(torch.tensor(0))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    z, x0 = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(consistency_output(z, x0, torch.zeros(2, dtype=torch.long)), z)


@pytest.mark.parametrize("t", [1, 20, 999])
def test_boundary_scalings_match_diffusers(t):
    ref_skip, ref_out = LCMScheduler().get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    c_skip, c_out = boundary_scalings(torch.tensor(t))
    assert c_skip.item() == pytest.approx(float(ref_skip), rel=1e-6)
    assert c_out.item() == pytest.approx(float(ref_out), rel=1e-6)


def test_boundary_scalings_known_values():
    # s = 10·t, σ_d = 0.5: at t = 1, c_skip = 0.25/100.25, c_out = 10/√100.25.
    c_skip, c_out = boundary_scalings(torch.tensor(1))
    assert c_skip.item() == pytest.approx(0.25 / 100.25)
    assert c_out.item() == pytest.approx(10 / 100.25**0.5)


def test_omega_guidance_scale_convention():
    # The paper's ω and diffusers' g: (1+ω)ε_c - ωε_u = ε_u + g(ε_c - ε_u) iff g = ω + 1.
    assert omega_from_guidance_scale(8.5) == 7.5
    eps_c, eps_u = torch.randn(3), torch.randn(3)
    g = 8.5
    w = omega_from_guidance_scale(g)
    torch.testing.assert_close((1 + w) * eps_c - w * eps_u, eps_u + g * (eps_c - eps_u))


@pytest.mark.parametrize("dim", [256, 32, 7])
def test_guidance_embedding_matches_diffusers_pipeline(dim):
    omega = torch.tensor([0.0, 1.5, 7.5, 13.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, omega, embedding_dim=dim)
    torch.testing.assert_close(guidance_embedding(omega, dim), ref)
