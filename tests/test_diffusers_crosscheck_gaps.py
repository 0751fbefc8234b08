"""Cross-checks against diffusers for pieces no other test compares with diffusers' own pipeline, on the same tiny models,
inputs and noise (see test_diffusers_crosscheck*.py for the rest):

- the public `LCMGenerator.__call__` / `SolverGenerator.__call__` end to end (seeds -> per-image generators, prompt cache,
  decode) against the pipelines' `output_type="pt"` images, for LCM, TCD and ODE-solver sampling;
- a guidance-distilled diffusion model (ω input, no LCMScheduler) sampled with DDIM / DPM-Solver++, which diffusers'
  StableDiffusionPipeline feeds ω = g - 1 as `timestep_cond` without CFG;
- TCD with custom timesteps, and TCD on an LCM-LoRA (classifier-free guided, g > 1);
- img2img noising and sampling of an LCM-LoRA (LCMScheduler) and of TCD (TCDScheduler) against diffusers' generic
  StableDiffusionImg2ImgPipeline, and of an SDXL LCM against StableDiffusionXLImg2ImgPipeline. The generic pipelines pick
  other timesteps for a strength (issue #7651, documented in `sampling.lcm_timesteps` and tested in test_img2img), so both
  sides are given the same custom timesteps at strength 1; the init image goes in as latents (the pipelines' 4-channel
  `image`), since diffusers samples the VAE posterior where we take its mean (also documented, test_img2img);
- a LoRA with lora_alpha != rank and text-encoder layers, against `load_lora_weights`;
- an SDXL LCM-LoRA's negative prompt against StableDiffusionXLPipeline's `negative_prompt`;
- LCD's DPM-Solver-2 / DPM-Solver++(2S) teacher jumps against DPMSolverSinglestepScheduler;
- a scheduler config with `trained_betas` against LCMScheduler.

Tolerances: float32 throughout. The latents here are O(1)-O(30) and come out of a few UNet passes whose operations are
arranged slightly differently on the two sides (CFG written c + ω(c - u) vs u + g(c - u); the subpixel upsamplers the
generators install; the ω embedding computed once vs per call), so they agree to float32 round-off, ~1e-6 relative: the
same 1e-5 (atol and rtol) the existing cross-checks use. Images are compared in the pipelines' [0, 1] range.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    TCDScheduler,
)

from latent_consistency.models import load_diffusion_model, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.pipelines import LCMGenerator, SolverGenerator
from latent_consistency.sampling import randn, sample_lcm

CPU = torch.device("cpu")
PROMPTS = ["a red star", "a blue ring at the top"]
SEEDS = [5, 6]
TOL = dict(rtol=1e-5, atol=1e-5)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Our images in [-1, 1] as the pipelines' output_type="pt" ([0, 1], VaeImageProcessor's denormalize)."""
    return (images / 2 + 0.5).clamp(0, 1)


def init_latents(generator, n=2, size=16, seed=0):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return images, generator.model.codec.encode(images)


@pytest.fixture(scope="module")
def lcm_generator(tiny_lcm):
    return LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)


@pytest.fixture(scope="module")
def lora(tiny_sd, tmp_path_factory):
    from tiny_models import save_tiny_lora

    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "lora", tiny_sd)


@pytest.fixture(scope="module")
def lora_generator(tiny_sd, lora):
    return LCMGenerator.load(str(tiny_sd), CPU, torch.float32, lora=str(lora))


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd, lora):
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None))
    pipe.load_lora_weights(lora)
    return pipe


# --- the public generators end to end, images out ------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_lcm_generator_images_equal_latent_consistency_model_pipeline(tiny_lcm, lcm_generator, steps):
    """`LCMGenerator.__call__` (what `lcm generate` and the server call): seeds -> one generator per image, z_T and the
    step noise drawn from them, prompts through the cache, decoded; against LatentConsistencyModelPipeline with the same
    per-image generators, output_type "pt"."""
    g = 7.5
    ours = lcm_generator(PROMPTS, lcm_generator.timesteps(steps), g, SEEDS, 16, 16)
    pipe = quiet(LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, safety_checker=None))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, height=16, width=16, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_lcm_generator_tcd_images_equal_stable_diffusion_pipeline_with_tcd_scheduler(tiny_lcm, lcm_generator, gamma):
    """`LCMGenerator(gamma=γ)` end to end against StableDiffusionPipeline + TCDScheduler(eta=γ) (ω = g - 1 as timestep_cond),
    3 steps: all timesteps >= 100, where the boundary scalings' difference (documented in `sample_tcd`) is < 1e-6."""
    g = 7.5
    ours = lcm_generator(PROMPTS, lcm_generator.timesteps(3), g, SEEDS, 16, 16, gamma=gamma)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_lcm, safety_checker=None))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=g, eta=gamma, height=16, width=16, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_solver_generator_images_equal_stable_diffusion_pipeline(tiny_sd, sampler):
    """`SolverGenerator.__call__` (`lcm generate --sampler ddim|dpm++` on a diffusion model) end to end with CFG."""
    generator = SolverGenerator.load(str(tiny_sd), CPU, torch.float32, sampler)
    g = 6.0
    ours = generator(PROMPTS, 4, g, SEEDS, 16, 16)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None))
    if sampler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False, clip_sample=False)
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=g, height=16, width=16, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


# --- a guidance-distilled diffusion model (ω input, DDIM scheduler) -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_guided(tmp_path_factory):
    """Stage one of Guided-Distill as diffusers holds one: a StableDiffusionPipeline whose UNet has time_cond_proj_dim."""
    from tiny_models import make_tiny_components

    folder = tmp_path_factory.mktemp("models") / "tiny-guided"
    parts = make_tiny_components(folder.parent / ".guided-build", time_cond_proj_dim=32, seed=3)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "dpm++"])
@pytest.mark.parametrize("g", [1.0, 6.0])
def test_guidance_distilled_model_samples_as_stable_diffusion_pipeline(tiny_guided, sampler, g):
    """A UNet with an ω input under a DDIM config is sampled with one pass per step, ω = g - 1 through timestep_cond
    (`OmegaConditionedTeacher`); StableDiffusionPipeline does the same (`do_classifier_free_guidance` is False when
    time_cond_proj_dim is set, and it embeds g - 1 as timestep_cond). End to end through SolverGenerator."""
    kwargs = {"ddim": dict(set_alpha_to_one=False, clip_sample=False),
              "dpm": dict(algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"),
              "dpm++": dict(algorithm_type="dpmsolver++", solver_order=2)}[sampler]
    generator = SolverGenerator.load(str(tiny_guided), CPU, torch.float32, sampler)
    assert type(generator.model.guided_teacher()).__name__ == "OmegaConditionedTeacher"
    ours = generator(PROMPTS, 3, g, SEEDS, 16, 16)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_guided, safety_checker=None))
    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=g, height=16, width=16, generator=seeded(), output_type="pt").images
    assert not pipe.do_classifier_free_guidance
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


# --- TCD: custom timesteps, and an LCM-LoRA's CFG ------------------------------------------------------------------------------

@pytest.mark.parametrize("custom", [[999, 499, 259], [900, 450, 120]])
def test_tcd_with_custom_timesteps_equals_tcd_scheduler(tiny_lcm, lcm_generator, custom):
    """`lcm generate --timesteps ... --gamma γ` against the pipeline's `timesteps=` with TCDScheduler (its s = ⌊(1-γ)·τ_next⌋
    over the custom list, and τ_next = 0 at the end), on the grid and off it; all τ >= 100 (see `sample_tcd`)."""
    g, gamma = 7.5, 0.3
    ours = lcm_generator(PROMPTS, lcm_generator.timesteps(None, custom=custom), g, SEEDS, 16, 16, gamma=gamma)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_lcm, safety_checker=None))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, timesteps=custom, guidance_scale=g, eta=gamma, height=16, width=16, generator=seeded(), output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == custom
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


@pytest.mark.parametrize("g", [1.0, 1.5])
def test_lcm_lora_tcd_equals_stable_diffusion_pipeline_with_tcd_scheduler(lora_generator, lora_pipe, g):
    """An LCM-LoRA sampled with TCD (`--lora ... --gamma`): classifier-free guidance at g > 1 inside the TCD step, as
    StableDiffusionPipeline + load_lora_weights + TCDScheduler."""
    gamma = 0.3
    ours = lora_generator(PROMPTS, lora_generator.timesteps(3), g, SEEDS, 16, 16, gamma=gamma)
    lora_pipe.scheduler = TCDScheduler.from_config(lora_pipe.scheduler.config)
    ref = lora_pipe(PROMPTS, num_inference_steps=3, guidance_scale=g, eta=gamma, height=16, width=16, generator=seeded(),
                    output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


# --- img2img through diffusers' generic img2img pipelines ---------------------------------------------------------------------

@pytest.mark.parametrize("g", [1.0, 1.5])
def test_lcm_lora_img2img_equals_stable_diffusion_img2img_pipeline(tiny_sd, lora, lora_generator, g):
    """An LCM-LoRA's img2img (`LCMGenerator` with init images) against StableDiffusionImg2ImgPipeline + LCMScheduler (what
    AutoPipelineForImage2Image gives an LCM-LoRA): noising E(x) to τ_1 with the image's first draw, then Algorithm 3 with
    CFG. Same custom timesteps on both sides (the pipeline's strength slicing differs by design, issue #7651)."""
    custom = [499, 259]
    images, latents = init_latents(lora_generator)
    ours = lora_generator(PROMPTS, lora_generator.timesteps(None, custom=custom), g, SEEDS, 16, 16, init_images=images)
    pipe = quiet(StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd, safety_checker=None))
    pipe.load_lora_weights(lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, image=latents, timesteps=custom, strength=1.0, guidance_scale=g, generator=seeded(), output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == custom
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_tcd_img2img_equals_stable_diffusion_img2img_pipeline_with_tcd_scheduler(tiny_lcm, lcm_generator, gamma):
    """TCD img2img (`LCMGenerator(gamma=γ, init_images=...)`) against StableDiffusionImg2ImgPipeline + TCDScheduler(eta=γ),
    which also feeds an LCM's ω input as timestep_cond; same custom timesteps on both sides."""
    custom, g = [599, 299], 6.0
    images, latents = init_latents(lcm_generator, seed=1)
    ours = lcm_generator(PROMPTS, lcm_generator.timesteps(None, custom=custom), g, SEEDS, 16, 16, gamma=gamma, init_images=images)
    pipe = quiet(StableDiffusionImg2ImgPipeline.from_pretrained(tiny_lcm, safety_checker=None))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, image=latents, timesteps=custom, strength=1.0, guidance_scale=g, eta=gamma, generator=seeded(),
               output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


def test_sdxl_lcm_img2img_equals_stable_diffusion_xl_img2img_pipeline(tiny_sdxl_lcm):
    """An SDXL LCM's img2img at a non-native size (24 x 16): micro-conditioning of the images' size, noising, ω input,
    against StableDiffusionXLImg2ImgPipeline + its LCMScheduler; same custom timesteps on both sides."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    generator = LCMGenerator.load(str(tiny_sdxl_lcm), CPU, torch.float32)
    custom, g, (h, w) = [699, 299], 6.0, (24, 16)
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = generator.model.codec.encode(images)
    ours = generator(PROMPTS, generator.timesteps(None, custom=custom), g, SEEDS, h, w, init_images=images)
    pipe = quiet(StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_lcm))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    ref = pipe(PROMPTS, image=latents, timesteps=custom, strength=1.0, guidance_scale=g, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


# --- LoRA loading: lora_alpha != rank, text-encoder layers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scaled_lora(tiny_sd, tmp_path_factory):
    """A LoRA whose scale lora_alpha / r is 3 (not 1), on the UNet and on the text encoder, saved as
    StableDiffusionPipeline.save_lora_weights saves one (with its adapter metadata)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(4)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    unet_config = LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_config = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unet.add_adapter(unet_config)
    text_encoder = inject_adapter_in_model(text_config, text_encoder)  # transformers' add_adapter wants a newer PEFT
    folder = tmp_path_factory.mktemp("lora") / "scaled-lora"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
        safe_serialization=True)
    return folder


def test_lora_with_alpha_and_text_encoder_layers_equals_load_lora_weights(tiny_sd, scaled_lora):
    """`load_lcm_lora` of a LoRA with lora_alpha = 3r and text-encoder layers: the prompt embeddings (through the LoRA'd text
    encoder) and 2 steps of CFG-guided Algorithm 3 against StableDiffusionPipeline.load_lora_weights + LCMScheduler."""
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None))
    plain = pipe.encode_prompt(PROMPTS, CPU, 1, False)[0]
    pipe.load_lora_weights(scaled_lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    model = load_lcm_lora(str(tiny_sd), str(scaled_lora))
    embeds = pipe.encode_prompt(PROMPTS, CPU, 1, False)[0]
    ours_embeds = model.prompts.encode(PROMPTS)
    assert (embeds - plain).abs().max() > 1e-3  # the text-encoder layers act
    torch.testing.assert_close(ours_embeds, embeds, **TOL)

    g = 1.5
    generators = seeded()
    latents = randn((2, 4, 8, 8), generators, "cpu", torch.float32)
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=g, latents=latents.clone(), generator=generators, output_type="latent").images
    generators = seeded()
    randn((2, 4, 8, 8), generators, "cpu", torch.float32)
    f = model.consistency_model(g)
    ours = sample_lcm(f, latents.clone(), model.timesteps(2), ours_embeds, omega_from_guidance_scale(g), f.schedule, generators)
    torch.testing.assert_close(ours, ref, **TOL)


# --- an SDXL LCM-LoRA's negative prompt -----------------------------------------------------------------------------------------

def test_sdxl_lcm_lora_negative_prompt_equals_the_pipelines_negative_prompt(tiny_sdxl, tmp_path):
    """`LCMGenerator(negative_prompts=...)` on an SDXL LCM-LoRA at g > 1: the negative prompt's tokens, pooled embedding
    and time ids replace ∅'s zeros in CFG, as StableDiffusionXLPipeline's `negative_prompt`; images end to end."""
    from tiny_models import load_pipeline, save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sdxl)
    generator = LCMGenerator.load(str(tiny_sdxl), CPU, torch.float32, lora=str(lora))
    negatives, g = ["a blue star", "a red ring"], 1.5
    ours = generator(PROMPTS, generator.timesteps(2), g, SEEDS, 16, 16, negative_prompts=negatives)
    pipe = load_pipeline(tiny_sdxl, "LCMScheduler")
    pipe.load_lora_weights(lora)
    ref = pipe(PROMPTS, negative_prompt=negatives, num_inference_steps=2, guidance_scale=g, height=16, width=16, generator=seeded(),
               output_type="pt").images
    torch.testing.assert_close(to_unit(ours), ref, **TOL)


# --- LCD's singlestep DPM-Solver teacher jumps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,algorithm_type", [("dpm", "dpmsolver"), ("dpm++", "dpmsolver++")])
@pytest.mark.parametrize("t,s", [(999, 979), (499, 479), (259, 199)])
def test_lcd_dpm_solver_jumps_equal_dpm_solver_singlestep_scheduler(tiny_sd, name, algorithm_type, t, s):
    """Ψ(z_t, t, s; ω) of Eq. 17 with DPM-Solver-2 / DPM-Solver++(2S) (`solvers.dpm_solver_2_jump`, `dpm_solver_pp_2s_jump`:
    the `--solver dpm|dpm++` teacher of `lcm distill`) against diffusers' DPMSolverSinglestepScheduler (order 2, midpoint)
    over the custom timesteps [t, u, s]: its order list [1, 2, 1] takes a first-order step to u, then the second-order
    singlestep update from z_t to s with the outputs at t and u. u must be an integer there, so r is set to put our
    intermediate λ_u at that integer u (λ-midpoint rounded); the guided output (CFG, g = 3) is what both evaluate."""
    from diffusers import DPMSolverSinglestepScheduler

    from latent_consistency.solvers import SOLVERS

    model = load_diffusion_model(str(tiny_sd))
    teacher, schedule = model.guided_teacher(), model.schedule
    cond, uncond = model.prompts.encode(PROMPTS), model.prompts.uncond().expand(2, -1, -1)
    omega, g = 2.0, 3.0
    lam_t, lam_s = (schedule.lambda_(torch.tensor(float(v))).double() for v in (t, s))
    u = int(torch.round(schedule.t_of_lambda(lam_t + 0.5 * (lam_s - lam_t))))
    r = float((schedule.lambda_(torch.tensor(float(u))).double() - lam_t) / (lam_s - lam_t))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(schedule.alpha_sigma(torch.tensor(t))[1]) + \
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    with torch.no_grad():
        ours = SOLVERS[name].jump(lambda x, tau: teacher.guided(x, tau, cond, uncond, omega), z, torch.tensor([t, t]), torch.tensor([s, s]),
                                  schedule, r=r)
        scheduler = DPMSolverSinglestepScheduler.from_config(model.scheduler_config, solver_order=2, algorithm_type=algorithm_type,
                                                             solver_type="midpoint", lower_order_final=True,
                                                             final_sigmas_type="sigma_min")  # past s: never reached
        scheduler.set_timesteps(timesteps=[t, u, s])
        assert scheduler.order_list[:2] == [1, 2]
        x = z
        for tau in (t, u):
            out_c, out_u = (model.unet(x, tau, encoder_hidden_states=e).sample for e in (cond, uncond))
            x = scheduler.step(out_u + g * (out_c - out_u), tau, x).prev_sample
    torch.testing.assert_close(ours, x, **TOL)


# --- a scheduler config with trained_betas --------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_trained_betas_schedule_equals_lcm_scheduler(zero_terminal_snr):
    """A config that lists its betas (`trained_betas`, e.g. a model trained on a custom schedule) instead of naming a beta
    schedule: ᾱ as LCMScheduler builds it (float32 cumprod, as `NoiseSchedule.from_betas` documents; rtol 0, atol 1e-6 as
    test_schedule), and the timesteps it picks. A zero-SNR ᾱ_{T-1} = 0 is raised to 2^-24 by design (schedule.py)."""
    from latent_consistency.models import inference_timesteps
    from latent_consistency.schedule import NoiseSchedule

    betas = (torch.linspace(1e-4, 0.03, 400, dtype=torch.float64) ** 1.5).tolist()
    scheduler = LCMScheduler(num_train_timesteps=400, trained_betas=betas, original_inference_steps=20,
                             rescale_betas_zero_snr=zero_terminal_snr)
    ours = NoiseSchedule.from_config(scheduler.config).alphas_cumprod
    ref = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=0, atol=1e-6)
    assert ours[-1].item() == pytest.approx(max(ref[-1].item(), 2.0**-24), abs=1e-12)
    for n in (1, 2, 4, 7):
        scheduler.set_timesteps(n)
        assert inference_timesteps(dict(scheduler.config), n).tolist() == scheduler.timesteps.tolist()
