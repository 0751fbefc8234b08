"""TCD's strategic stochastic sampling (`sample_tcd`): its formulas on known answers, and against diffusers'
StableDiffusionPipeline with TCDScheduler on the same tiny LCM, noise and generators."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, TCDScheduler

from latent_consistency.errors import UserError
from latent_consistency.models import load_lcm
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import randn, sample_lcm, sample_tcd, tcd_timestep
from latent_consistency.schedule import NoiseSchedule


def test_tcd_timestep_known_values():
    assert tcd_timestep(759, 0.0) == 759  # γ = 0: straight to the next timestep
    assert tcd_timestep(759, 1.0) == 0  # γ = 1: all the way to the data end
    assert tcd_timestep(759, 0.3) == 531  # ⌊0.7·759⌋ = ⌊531.3⌋
    assert tcd_timestep(300, 0.16) == 252  # 0.84·300 = 252 exactly (float32 gives 251.99998)
    assert tcd_timestep(0, 0.5) == 0


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.6, 1.0])
def test_tcd_timestep_matches_tcd_scheduler_on_the_lcm_grid(gamma):
    """On the timesteps an LCM samples (τ = 20j - 1) our exact floor and TCDScheduler's float32 one agree."""
    for tau in range(19, 1000, 20):
        assert tcd_timestep(tau, gamma) == int(torch.floor((1 - gamma) * torch.tensor(tau)))


class Oracle:
    """A consistency model whose x̂0 is a fixed x (for any z): the exact sampler is then known in closed form."""

    def __init__(self, x, schedule):
        self.x, self.schedule = x, schedule

    def __call__(self, z, t, cond, omega):
        return self.x.expand_as(z)


def test_one_step_is_ddim_to_timestep_zero():
    """One step from τ: z_0 = α_0·x̂0 + σ_0·ε̂, ε̂ = (z - α_τ·x̂0)/σ_τ, at every γ (no noise on the last step)."""
    schedule = NoiseSchedule.from_config({})
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    a_t, s_t = schedule.alpha_sigma(torch.tensor(999))
    a_0, s_0 = schedule.alpha_sigma(torch.tensor(0))
    expected = a_0 * x + s_0 * (z - a_t * x) / s_t
    for gamma in (0.0, 0.5, 1.0):
        out = sample_tcd(Oracle(x, schedule), z, torch.tensor([999]), None, 0.0, schedule, gamma, torch.Generator().manual_seed(2))
        torch.testing.assert_close(out, expected.float(), rtol=0, atol=1e-6)


def test_gamma_zero_is_deterministic_ddim_and_gamma_one_renoises_from_timestep_zero():
    """With x̂0 fixed, two steps (999, 499): γ = 0 is DDIM through 499 and draws no noise; γ = 1 re-noises z_0 to 499
    with fresh noise, z = √(ᾱ_499/ᾱ_0)·z_0 + √(1 - ᾱ_499/ᾱ_0)·ε."""
    schedule = NoiseSchedule.from_config({})
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    ab = schedule.alphas_cumprod
    a = ab.sqrt()
    s = (1 - ab).sqrt()
    ts = torch.tensor([999, 499])
    # γ = 0: a deterministic DDIM walk: same output for any generator, and the generator is not advanced
    g = torch.Generator().manual_seed(3)
    out0 = sample_tcd(Oracle(x, schedule), z, ts, None, 0.0, schedule, 0.0, g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())
    eps = (z - a[999] * x) / s[999]
    z499 = a[499] * x + s[499] * eps
    eps = (z499 - a[499] * x) / s[499]
    torch.testing.assert_close(out0, (a[0] * x + s[0] * eps).float(), rtol=0, atol=1e-6)
    # γ = 1
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    out1 = sample_tcd(Oracle(x, schedule), z, ts, None, 0.0, schedule, 1.0, torch.Generator().manual_seed(4))
    z_0 = a[0] * x + s[0] * (z - a[999] * x) / s[999]
    z499 = (ab[499] / ab[0]).sqrt() * z_0 + (1 - ab[499] / ab[0]).sqrt() * noise
    expected = a[0] * x + s[0] * (z499 - a[499] * x) / s[499]
    torch.testing.assert_close(out1, expected.float(), rtol=0, atol=1e-6)


def test_gamma_outside_unit_interval_is_a_user_error():
    schedule = NoiseSchedule.from_config({})
    z = torch.zeros(1, 4, 2, 2)
    for gamma in (-0.1, 1.5):
        with pytest.raises(UserError, match="gamma must be in"):
            sample_tcd(Oracle(z, schedule), z, torch.tensor([999]), None, 0.0, schedule, gamma)


def tcd_pipeline(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("steps,gamma", [(1, 0.3), (2, 1.0), (4, 0.0), (4, 0.3), (4, 1.0)])
def test_sample_tcd_equals_stable_diffusion_pipeline_with_tcd_scheduler(tiny_lcm, gamma, steps):
    """StableDiffusionPipeline on a UNet with time_cond_proj_dim feeds ω = g - 1 as timestep_cond and does no CFG (as
    LatentConsistencyModelPipeline); with TCDScheduler and eta = γ it is strategic stochastic sampling."""
    pipe = tcd_pipeline(tiny_lcm)
    assert pipe.unet.config.time_cond_proj_dim is not None
    prompts, g = ["a red star", "a blue ring at the top"], 7.5
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    latents = randn((2, 4, 8, 8), generators, "cpu", torch.float32)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=g, eta=gamma, latents=latents.clone(), output_type="latent",
               generator=generators).images
    assert not pipe.do_classifier_free_guidance

    model = load_lcm(str(tiny_lcm))
    f = model.consistency_model()
    cond = model.prompts.encode(prompts)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    randn((2, 4, 8, 8), generators, "cpu", torch.float32)  # past the starting noise, as above
    ours = sample_tcd(f, latents.clone(), model.timesteps(steps), cond, omega_from_guidance_scale(g), f.schedule, gamma, generators)
    # float32 rounding over the steps (7.6e-6 at most at 4 steps here) is relative to the latents' size
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if steps > 1 and gamma > 0:  # the noise matters: another generator gives another sample
        other = sample_tcd(f, latents.clone(), model.timesteps(steps), cond, omega_from_guidance_scale(g), f.schedule, gamma,
                           [torch.Generator().manual_seed(s) for s in (7, 8)])
        assert (other - ours).abs().max().item() > 1e-3


def test_boundary_scalings_are_the_one_difference_at_small_timesteps(tiny_lcm):
    """At τ = 9 c_skip = 0.25/(90² + 0.25) = 3.1e-5 is no longer negligible: one step from τ = 9 differs from
    TCDScheduler's (which uses the raw x̂0) by exactly (α_0 - σ_0·α_τ/σ_τ)·(f - x̂0_raw), and by nothing else."""
    pipe = tcd_pipeline(tiny_lcm)
    prompts, g, tau = ["a red star"], 7.5, 9
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, timesteps=[tau], guidance_scale=g, eta=0.3, latents=z.clone(), output_type="latent").images

    model = load_lcm(str(tiny_lcm))
    f = model.consistency_model()
    cond = model.prompts.encode(prompts)
    omega = omega_from_guidance_scale(g)
    ours = sample_tcd(f, z.clone(), torch.tensor([tau]), cond, omega, f.schedule, 0.3)
    t = torch.tensor([tau])
    gap = f(z, t, cond, omega) - f.x0(z, t, cond, omega)
    a_t, s_t = f.schedule.alpha_sigma(t)
    a_0, s_0 = f.schedule.alpha_sigma(torch.tensor(0))
    predicted = ((a_0 - s_0 * a_t / s_t).float() * gap)
    assert (ours - ref).abs().max().item() > 1e-5  # a real difference...
    torch.testing.assert_close(ours - ref, predicted, rtol=0, atol=2e-6)  # ...and exactly the boundary scalings'


def test_tcd_differs_from_algorithm_3_by_the_last_step_to_timestep_zero(tiny_lcm):
    """One step: Algorithm 3 returns x̂0 = f(z, τ), TCD the DDIM step to timestep 0; they differ by about σ_0·ε̂."""
    model = load_lcm(str(tiny_lcm))
    f = model.consistency_model()
    cond = model.prompts.encode(["a ring"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = model.timesteps(1)
    lcm = sample_lcm(f, z, ts, cond, 6.5, f.schedule)
    tcd = sample_tcd(f, z, ts, cond, 6.5, f.schedule, 1.0)
    a_t, s_t = f.schedule.alpha_sigma(ts)
    a_0, s_0 = f.schedule.alpha_sigma(torch.tensor(0))
    eps = (z - a_t.float() * lcm) / s_t.float()
    torch.testing.assert_close(tcd, (a_0.float() * lcm + s_0.float() * eps), rtol=0, atol=1e-5)
    assert (tcd - lcm).abs().max() > 0.01
