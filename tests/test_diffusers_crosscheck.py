"""Our LCM sampler and timesteps against diffusers' LatentConsistencyModelPipeline on the same tiny model."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from latent_consistency.models import load_lcm
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps, sample_lcm


@pytest.mark.parametrize("original_steps", [50, 25])
def test_timesteps_match_lcm_scheduler(original_steps):
    scheduler = LCMScheduler(original_inference_steps=original_steps)
    for n in range(1, 9):
        scheduler.set_timesteps(n)
        assert lcm_timesteps(n, 1000, original_steps).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_lcm_equals_pipeline(tiny_lcm, steps):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star", "a blue ring at the top"]
    g = 7.5
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(
        prompts, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent",
        generator=torch.Generator().manual_seed(11),
    ).images

    model = load_lcm(str(tiny_lcm))
    f = model.consistency_model()
    cond = model.prompts.encode(prompts)
    ours = sample_lcm(
        f, latents.clone(), model.timesteps(steps), cond, omega_from_guidance_scale(g), f.schedule,
        generator=torch.Generator().manual_seed(11),
    )
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("steps", [1, 3])
def test_the_model_factory_reads_every_lcm_scheduler_setting(tmp_path, steps):
    """T = 500 training timesteps, original_inference_steps 25 and a timestep_scaling of 4: the consistency function
    and timesteps made from the loaded model sample as diffusers' pipeline does."""
    from tiny_models import save_tiny_lcm

    folder = save_tiny_lcm(tmp_path / "lcm-500", num_train_timesteps=500, original_inference_steps=25, timestep_scaling=4.0)
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(["a red star", "a ring"], num_inference_steps=steps, guidance_scale=6.0, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(11)).images
    model = load_lcm(str(folder))
    f = model.consistency_model()
    assert f.schedule.num_train_timesteps == 500 and f.timestep_scaling == 4.0
    pipe.scheduler.set_timesteps(steps)
    assert model.timesteps(steps).tolist() == pipe.scheduler.timesteps.tolist() and model.timesteps(steps).max() < 500
    cond = model.prompts.encode(["a red star", "a ring"])
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), cond, omega_from_guidance_scale(6.0), f.schedule,
                      generator=torch.Generator().manual_seed(11))
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("sampler,scheduler_cls,kwargs", [
    ("ddim", "DDIMScheduler", {}),
    ("dpm", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
@pytest.mark.parametrize("g", [7.5, 1.0])
def test_teacher_baseline_equals_stable_diffusion_pipeline(tiny_sd, sampler, scheduler_cls, kwargs, g):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from latent_consistency.models import load_diffusion_model
    from latent_consistency.sampling import sample_teacher

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    extra = {"set_alpha_to_one": False} if sampler == "ddim" else {}
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **kwargs, **extra)
    prompts, steps = ["a red star", "a ring"], 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent").images

    model = load_diffusion_model(str(tiny_sd))
    teacher = model.guided_teacher()
    cond = model.prompts.encode(prompts)
    uncond = model.prompts.uncond().expand(2, -1, -1)
    ours = sample_teacher(teacher, sampler, latents.clone(), cond, uncond, g, steps, model.scheduler_config)
    # CFG is written (1+ω)c - ωu here and u + g(c - u) in diffusers: equal up to float32 rounding (|x| ~ 10). At g = 1
    # neither runs the unconditional pass: the same single pass, the same numbers
    if g == 1:
        assert torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_sample_lcm_equals_pipeline_for_v_prediction(tmp_path, zero_terminal_snr):
    from tiny_models import save_tiny_lcm

    folder = save_tiny_lcm(tmp_path / "v-lcm", prediction_type="v_prediction", zero_terminal_snr=zero_terminal_snr)
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = pipe(["a star"], num_inference_steps=3, guidance_scale=5.0, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    model = load_lcm(str(folder))
    f = model.consistency_model()
    assert f.prediction_type == "v_prediction"
    cond = model.prompts.encode(["a star"])
    ours = sample_lcm(f, latents.clone(), model.timesteps(3), cond, 4.0, f.schedule, torch.Generator().manual_seed(2))
    # With zero terminal SNR diffusers' LCMScheduler keeps ᾱ_999 = 0 where we use 2^-24 (schedule.py), so the
    # first x̂0 = α·z - σ·v differs by α_999·z = 2^-12·z; nothing else differs.
    tolerance = 2.0**-12 * latents.abs().max().item() if zero_terminal_snr else 1e-5
    assert (ours - ref).abs().max().item() < tolerance


@pytest.mark.parametrize("g", [1.0, 1.5])
def test_lcm_lora_sampling_equals_stable_diffusion_pipeline_with_lcm_scheduler(tiny_sd, tmp_path, g):
    """`lcm generate --lora`'s sampler against diffusers' documented LCM-LoRA recipe: load_lora_weights onto the
    StableDiffusionPipeline, LCMScheduler, guidance_scale g (classifier-free guidance when g > 1)."""
    from diffusers import StableDiffusionPipeline

    from latent_consistency.pipelines import LCMGenerator
    from latent_consistency.sampling import randn
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    prompts, steps = ["a red star", "a ring"], 3
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    latents = randn((2, 4, 8, 8), generators, "cpu", torch.float32)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent",
               generator=generators).images

    generator = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(lora))
    model = generator.model
    assert generator.kind == "lora" and model.scheduler_config["original_inference_steps"] == 50
    cond = model.prompts.encode(prompts)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    randn((2, 4, 8, 8), generators, "cpu", torch.float32)  # advance them past the starting noise, as above
    f = model.consistency_model(g)
    ours = sample_lcm(f, latents.clone(), generator.timesteps(steps), cond, omega_from_guidance_scale(g), model.schedule, generators)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # and the LoRA matters: without it the same sampler gives something else
    plain = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(save_tiny_lora(tmp_path / "lora0", tiny_sd, seed=1)))
    other = sample_lcm(plain.model.consistency_model(g), latents.clone(), generator.timesteps(steps), cond, 0.0, model.schedule,
                       [torch.Generator().manual_seed(s) for s in (5, 6)])
    assert (other - ours).abs().max() > 1e-3
