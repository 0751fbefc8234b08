"""More cross-checks against diffusers on the same tiny models and the same noise: the pieces of the library that diffusers
also implements and that no other test compares with diffusers' own scheduler, pipeline or function.

Already cross-checked elsewhere (grep for `diffusers` in tests/): ᾱ and add_noise (test_schedule), c_skip/c_out and the ω
embedding in float32 (test_parameterization), the DDIM jump for ε and v at ω = 0 (test_solvers), LCM timesteps and
sampling for ε and v, zero terminal SNR, T = 500, timestep_scaling and LCM-LoRA (test_diffusers_crosscheck), TCD
(test_tcd), strength and img2img (test_img2img), an LCM-LoRA's negative prompt (test_negative_prompts), SDXL and PixArt-α
(test_sdxl, test_pixart), the preview decoder (test_preview_decoder), the replaced upsamplers (test_upsampling).
"""

import copy
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)

from latent_consistency.grids import to_pil
from latent_consistency.models import guided_teacher, inference_timesteps, load_diffusion_model, load_lcm
from latent_consistency.parameterization import model_output_from, omega_from_guidance_scale
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.prompts import truncated_prompts
from latent_consistency.sampling import sample_lcm, sample_teacher
from latent_consistency.schedule import NoiseSchedule, consistency_pairs, skipping_grid
from latent_consistency.solvers import SOLVERS, guided_jump
from latent_consistency.training.ema import ema_update

CPU = torch.device("cpu")
PROMPTS = ["a red star", "a blue ring at the top"]


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd):
    return quiet(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None))


@pytest.fixture(scope="module")
def sd_model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


# --- LCMScheduler options: timestep_spacing, steps_offset, the full skipping grid -----------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_lcm_timesteps_ignore_timestep_spacing_and_steps_offset_as_lcm_scheduler(spacing, steps_offset):
    """Downloaded LCM configs say timestep_spacing "leading" and steps_offset 1 (SD's): LCMScheduler.set_timesteps reads
    neither, and the timesteps a model's config gives here (`inference_timesteps`) are LCMScheduler's for every such config,
    at every step count and at an img2img strength."""
    for original, T in ((50, 1000), (25, 1000), (8, 400)):
        scheduler = LCMScheduler(num_train_timesteps=T, original_inference_steps=original, timestep_spacing=spacing,
                                 steps_offset=steps_offset)
        config = dict(scheduler.config)
        for n in range(1, original + 1, 3):
            scheduler.set_timesteps(n)
            assert inference_timesteps(config, n).tolist() == scheduler.timesteps.tolist()
        scheduler.set_timesteps(3, strength=0.5)
        assert inference_timesteps(config, 3, strength=0.5).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("T,skip", [(1000, 20), (1000, 10), (1000, 1), (500, 20), (400, 50)])
def test_skipping_grid_is_lcm_schedulers_full_schedule(T, skip):
    """The LCD grid {k-1, 2k-1, ..., T-1} (Eq. 16) is the schedule LCMScheduler samples from: all T/k of its timesteps."""
    scheduler = LCMScheduler(num_train_timesteps=T, original_inference_steps=T // skip)
    scheduler.set_timesteps(T // skip)
    assert skipping_grid(T, skip).flip(0).tolist() == scheduler.timesteps.tolist()


# --- custom timesteps -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("custom", [[999, 759, 499, 259], [900, 450, 100, 7], [3]])
def test_custom_timesteps_sample_as_latent_consistency_pipeline(tiny_lcm, custom):
    """`lcm generate --timesteps` (LCMGenerator.timesteps(custom=...)) against the pipeline's `timesteps=` (LCMScheduler's
    custom schedule), on the grid and off it (diffusers only warns there)."""
    pipe = quiet(LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, safety_checker=None))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, timesteps=custom, guidance_scale=7.5, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(11)).images
    generator = LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)
    timesteps = generator.timesteps(None, custom=custom)
    assert timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    f = generator.model.consistency_model()
    ours = sample_lcm(f, latents.clone(), timesteps, generator.model.prompts.encode(PROMPTS), omega_from_guidance_scale(7.5), f.schedule,
                      torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --- x0 ("sample") prediction and LCMScheduler's clip_sample --------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_sample_prediction_lcm_equals_pipeline(tmp_path, steps):
    """An LCM whose network predicts x0 (prediction_type "sample"): f = c_skip·z + c_out·out, as LCMScheduler.step."""
    from tiny_models import save_tiny_lcm

    folder = save_tiny_lcm(tmp_path / "x0-lcm", prediction_type="sample")
    pipe = quiet(LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(2)).images
    model = load_lcm(str(folder))
    f = model.consistency_model()
    assert f.prediction_type == "sample"
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), model.prompts.encode(PROMPTS), 4.0, f.schedule,
                      torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", [dict(clip_sample=True), dict(clip_sample=True, clip_sample_range=2.0),
                                     dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)],
                         ids=["clip", "clip range 2", "thresholding"])
def test_an_lcm_config_that_clips_x0_samples_as_the_pipeline(tmp_path, setting):
    """An LCMScheduler config may say clip_sample: true (DDIMScheduler's default, which `LCMScheduler.from_config` of an old
    DDIM config inherits) or thresholding: true. The pipeline then clamps x̂0 (to ±clip_sample_range, or each row to its
    dynamic threshold) before the boundary scalings; so does `denoisers.SampleClipping`."""
    from tiny_models import save_tiny_lcm

    folder = save_tiny_lcm(tmp_path / "lcm")
    pipe = quiet(LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def pipeline_latents():
        return pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, latents=latents.clone(), output_type="latent",
                    generator=torch.Generator().manual_seed(2)).images

    unclipped = pipeline_latents()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **setting)
    pipe.save_pretrained(folder)  # the folder's scheduler config now clips
    ref = pipeline_latents()
    assert (ref - unclipped).abs().max() > 0.1  # the setting changes this LCM's samples: the comparison below can fail
    model = load_lcm(str(folder))
    f = model.consistency_model()
    ours = sample_lcm(f, latents.clone(), model.timesteps(2), model.prompts.encode(PROMPTS), 4.0, f.schedule,
                      torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --- teacher baselines of a v-prediction teacher with SD 2's scheduler settings -------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd_v(tmp_path_factory):
    from tiny_models import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.mark.parametrize("sampler,scheduler_cls,kwargs", [
    ("ddim", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    ("dpm", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
def test_teacher_baselines_of_a_v_prediction_teacher_equal_the_pipeline(tiny_sd_v, sampler, scheduler_cls, kwargs):
    """`sample_teacher` for a v-prediction teacher whose config says steps_offset 1 (SD 2.x's), against StableDiffusionPipeline
    with the same diffusers scheduler made from that config."""
    import diffusers

    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_v, safety_checker=None))
    config = dict(pipe.scheduler.config) | {"steps_offset": 1}
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(config, **kwargs)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=6.0, latents=latents.clone(), output_type="latent").images

    model = load_diffusion_model(str(tiny_sd_v))
    assert model.prediction_type == "v_prediction"
    teacher = model.guided_teacher()
    cond, uncond = model.prompts.encode(PROMPTS), model.prompts.uncond().expand(2, -1, -1)
    ours = sample_teacher(teacher, sampler, latents.clone(), cond, uncond, 6.0, 4, model.scheduler_config | {"steps_offset": 1})
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --- the DDIM teacher jump of LCD, guided, on the skipping grid -------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcd_ddim_jump_equals_ddim_scheduler_step_with_classifier_free_guidance(sd_model, prediction_type):
    """Ψ(z_{t_{n+k}}, t_{n+k}, t_n; ω) of Eq. 17 with DDIM, for the tiny UNet read as each parameterisation, against
    DDIMScheduler.step (50 steps, so prev = t - 20; ᾱ_prev = ᾱ_0 below 0, set_alpha_to_one False) on the pipeline's CFG
    output ε_u + g(ε_c - ε_u). The pairs include the first one, (19, 0): t_n = -1 clamped to 0 (consistency_pairs)."""
    config = sd_model.scheduler_config | {"prediction_type": prediction_type}
    teacher = guided_teacher(sd_model.unet, config)
    prompts = ["a red star", "a blue ring", "two green squares", ""]
    cond, uncond = sd_model.prompts.encode(prompts), sd_model.prompts.uncond().expand(4, -1, -1)
    t_n_plus_k, t_n = consistency_pairs(skipping_grid(1000, 20), torch.tensor([0, 1, 24, 49]), 20)
    assert t_n.tolist() == [0, 19, 479, 979]
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.tensor([1.0, 3.0, 7.5, 15.0])
    ours = guided_jump(SOLVERS["ddim"], teacher, z, t_n_plus_k, t_n, cond, uncond, omega_from_guidance_scale(g))
    increments = guided_jump(SOLVERS["ddim"], teacher, z, t_n_plus_k, t_n, cond, uncond, omega_from_guidance_scale(g), guide_increments=True)

    ddim = DDIMScheduler.from_config(config, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    ref = []
    with torch.no_grad():
        for i in range(4):
            t = int(t_n_plus_k[i])
            out_c, out_u = (sd_model.unet(z[i:i + 1], t, encoder_hidden_states=e[i:i + 1]).sample for e in (cond, uncond))
            ref.append(ddim.step(out_u + g[i] * (out_c - out_u), t, z[i:i + 1]).prev_sample)
    ref = torch.cat(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(increments, ref, rtol=1e-5, atol=1e-5)  # for DDIM, Eq. 17 literally is the same jump


# --- prompt encoding: long prompts, negative prompts, the empty prompt --------------------------------------------------------

# The tiny CLIP tokenizer is character-level with model_max_length 16 (14 tokens and BOS, EOS): 14 letters fit exactly
LONG = ["abcdefghijklmn", "abcdefghijklmno", "a blue ring at the top of a tall picture", "a red star"]


def diffusers_truncation_warnings(pipe, prompt: str) -> list[str]:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever verbosity another test left diffusers' loggers at
    try:
        pipe.encode_prompt([prompt], CPU, 1, False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [r.getMessage() for r in records if "truncated" in r.getMessage()]


def test_prompt_encoding_of_long_and_negative_prompts_equals_encode_prompt(sd_pipe, sd_model):
    """c of long prompts (cut to the tokenizer's length as diffusers cuts them), of negative prompts, and ∅ (the empty
    prompt), against StableDiffusionPipeline.encode_prompt; `truncated_prompts` names the prompts diffusers warns about."""
    encoder = sd_model.prompts
    negatives = ["a green square in the lower left corner", "x", "", "blur"]
    embeds, negative = sd_pipe.encode_prompt(LONG, CPU, 1, True, negative_prompt=negatives)
    torch.testing.assert_close(encoder.encode(LONG), embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode(negatives), negative, rtol=0, atol=0)
    _, empty = sd_pipe.encode_prompt(LONG[:1], CPU, 1, True)  # ∅ of one row (a batch of 4 rounds its matmuls otherwise)
    torch.testing.assert_close(encoder.uncond(), empty, rtol=0, atol=0)
    warned = [i for i, p in enumerate(LONG) if diffusers_truncation_warnings(sd_pipe, p)]
    assert warned == [1, 2]
    assert [i for i, _, _ in truncated_prompts(encoder, LONG)] == warned


def test_sdxl_prompt_encoding_of_long_and_negative_prompts_equals_encode_prompt(tiny_sdxl):
    """SDXL's c with a negative prompt (which replaces the zeros of force_zeros_for_empty_prompt) and long prompts: tokens,
    pooled embeddings and the negative's time ids against StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids."""
    from latent_consistency.conditioning import AddedConditioning
    from tiny_models import load_pipeline

    pipe = load_pipeline(tiny_sdxl)
    model = load_diffusion_model(str(tiny_sdxl))
    negatives = ["a green square in the lower left corner", "x", "", "blur"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(LONG, device="cpu", do_classifier_free_guidance=True,
                                                                   negative_prompt=negatives)
    added = AddedConditioning.of_unet(model.unet.config)
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, text_encoder_projection_dim=32).expand(4, -1)
    for ours, (tokens, pooled_ref) in ((model.prompts.encode(LONG, size=(16, 24)), (embeds, pooled)),
                                       (model.prompts.encode(negatives, size=(16, 24)), (negative, negative_pooled))):
        c, extra = added.unpack(ours)
        torch.testing.assert_close(c, tokens, rtol=0, atol=0)
        torch.testing.assert_close(extra["text_embeds"], pooled_ref, rtol=0, atol=0)
        torch.testing.assert_close(extra["time_ids"], ids, rtol=0, atol=0)


# --- the ω embedding in half precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_omega_embedding_in_half_precision_equals_the_pipelines_timestep_cond(tiny_lcm, dtype):
    """The ω input of an LCM run in float16/bfloat16 (`denoisers.omega_embedding`, through ConsistencyModel.output) is what
    LatentConsistencyModelPipeline feeds as timestep_cond: the float32 embedding cast to the latents' dtype."""
    from latent_consistency.denoisers import omega_embedding

    w = omega_from_guidance_scale(torch.tensor([1.0, 2.5, 8.0, 15.0]))
    z = torch.zeros(4, 4, 8, 8, dtype=dtype)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32).to(dtype=dtype)
    assert torch.equal(omega_embedding(w, z, 32), ref)


# --- v-prediction targets ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_target_equals_scheduler_get_velocity(zero_terminal_snr):
    """v = α·ε - σ·x0 (`model_output_from`, the world teacher's and the guidance-distillation loss's target) against
    DDPMScheduler.get_velocity, at timesteps from 0 to T-1."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zero_terminal_snr)
    schedule = NoiseSchedule.from_config(scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 250, 700, 998])  # T-1 of a zero-SNR schedule differs by design (α raised to 2^-12, schedule.py)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(model_output_from(x0, eps, alpha, sigma, "v_prediction"), scheduler.get_velocity(x0, eps, t),
                               rtol=1e-6, atol=1e-6)


# --- VAE: posterior sampling and the images written -----------------------------------------------------------------------

def test_posterior_sample_equals_the_pipelines_retrieve_latents(sd_model, sd_pipe):
    """LatentCodec.encode(sample=True) draws as the img2img pipelines' `retrieve_latents(sample_mode="sample")` does (one
    generator), times the scaling factor; the default (mean) is its `sample_mode="argmax"`."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale = sd_pipe.vae.config.scaling_factor
    with torch.no_grad():
        ref = retrieve_latents(sd_pipe.vae.encode(images), torch.Generator().manual_seed(5), "sample") * scale
        mode = retrieve_latents(sd_pipe.vae.encode(images), sample_mode="argmax") * scale
    codec = sd_model.codec
    torch.testing.assert_close(codec.encode(images, torch.Generator().manual_seed(5), sample=True), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codec.encode(images), mode, rtol=1e-6, atol=1e-6)


def test_images_written_equal_the_pipelines_pil_output(sd_model, sd_pipe):
    """What `lcm generate` writes (to_pil of LatentCodec.decode) is the pipeline's output_type="pil": VAE decode of
    latents / scaling_factor, then VaeImageProcessor's [-1, 1] -> uint8; also at the rounding boundaries k + 0.5."""
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        decoded = sd_pipe.vae.decode(latents / sd_pipe.vae.config.scaling_factor).sample
    ref = sd_pipe.image_processor.postprocess(decoded, output_type="pil")
    ours = to_pil(sd_model.codec.decode(latents))
    assert [np.asarray(a).tolist() for a in ours] == [np.asarray(b).tolist() for b in ref]
    # every uint8 boundary (x + 1)·127.5 = k + 0.5 and 8 float32 neighbours either side, plus values outside [-1, 1]
    boundary = torch.tensor([(k + 0.5) / 127.5 - 1 for k in range(255)] + [-1.5, -1.0, 1.0, 1.5], dtype=torch.float32)
    values = [boundary]
    up, down = boundary, boundary
    for _ in range(8):
        up, down = torch.nextafter(up, torch.full_like(up, 2.0)), torch.nextafter(down, torch.full_like(down, -2.0))
        values += [up, down]
    grid = torch.cat(values).reshape(1, 1, 17, 259).expand(1, 3, 17, 259)
    assert np.array_equal(np.asarray(to_pil(grid)[0]), np.asarray(sd_pipe.image_processor.postprocess(grid, output_type="pil")[0]))


# --- EMA ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [0.95, 0.999943, 0.0])
def test_ema_update_equals_diffusers_ema_model(sd_model, decay):
    """θ⁻ <- μ·θ⁻ + (1-μ)·θ (`ema_update`) over three steps of a changing tiny UNet, against diffusers' EMAModel.step past its
    (1+n)/(10+n) warm-up (so that it uses μ itself; paper μ = 0.999943, diffusers' LCD scripts 0.95)."""
    from diffusers.training_utils import EMAModel

    source = copy.deepcopy(sd_model.unet).requires_grad_(True)
    target = copy.deepcopy(sd_model.unet).requires_grad_(True)
    ema = EMAModel(target.parameters(), decay=decay)
    ema.optimization_step = 10**7
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ema.step(source.parameters())
        assert ema.cur_decay_value == decay
        ema_update(target, source, decay)
    for ours, ref in zip(target.parameters(), ema.shadow_params):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert (list(target.parameters())[0] - list(source.parameters())[0]).abs().max() > 0.01 or decay == 0.0
