"""Text to images: prompts in, decoded images out, with a latent consistency model (Algorithm 3, `LCMGenerator`) or a
diffusion model and an ODE solver (`SolverGenerator`: a teacher with CFG, or a guidance-distilled model).

They are what `lcm generate` (and any other front end) calls. Image i of a call is drawn from its
own generator seeded with `seeds[i]`, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from latent_consistency.compilation import compile_for_sampling
from latent_consistency.denoisers import NegativePromptGuidance
from latent_consistency.errors import UserError
from latent_consistency.models import DiffusionModel, load_diffusion_model, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.preview import load_preview_decoder
from latent_consistency.prompts import PromptCache
from latent_consistency.sampling import check_custom_timesteps, check_gamma, randn, sample_lcm, sample_tcd, sample_teacher
from latent_consistency.upsampling import use_subpixel_upsampling

# Images larger than this multiple of the model's native size are refused (SD 1.5: 4096 px).
MAX_SIZE_FACTOR = 8
# The paper trains ω ∈ [2, 14] (g ∈ [3, 15]); far outside the trained range the ω embedding is meaningless.
MAX_GUIDANCE_SCALE = 30.0
# Default g by `Generator.kind`: an LCM's ω input (the paper's ω = 7), an LCM-LoRA's classifier-free guidance (none:
# its guidance was distilled in; diffusers recommends 1-2 for LCM-LoRA), a diffusion model's CFG or ω input.
DEFAULT_GUIDANCE_SCALE = {"lcm": 8.0, "lora": 1.0, "solver": 7.5}
# Seeds seed torch.Generator, which takes up to 2^63 - 1
MAX_SEED = 2**63 - 1
# λ of an LCM's negative prompt (`NegativePromptGuidance`, every step): on the world it cut the negated shape from 6.0 %
# to 1.2 % (2 steps) and 2.3 % (4 steps) at an FID cost of +6 to +8; λ >= 0.5 over-guides (docs/guide.md, Negative prompts).
DEFAULT_NEGATIVE_SCALE = 0.25


@dataclass
class Generator:
    """A text-to-image model on a device: the image size checks, starting noise and prompt embeddings its samplers share."""

    model: DiffusionModel
    device: torch.device
    dtype: torch.dtype
    prompt_cache: PromptCache = field(default_factory=PromptCache)  # c of the prompts seen, the text encoder run once per prompt

    def __post_init__(self):
        # The same images, faster: nearest-2x-then-3x3-convolution upsamplers as one small convolution (`upsampling`)
        for network in (self.model.unet, self.model.vae):
            use_subpixel_upsampling(network)

    def default_size(self) -> int:
        return self.model.native_size

    def default_guidance_scale(self) -> float:
        """The g to sample at when none is given: the one an LCM's run recorded (`guidance_record`), else the kind's."""
        record = self.model.guidance_record
        return DEFAULT_GUIDANCE_SCALE[self.kind] if record is None else record.guidance_scale

    def guidance_notes(self, guidance_scale: float, given: bool) -> list[str]:
        """Notes for sampling at `guidance_scale` (`GuidanceRecord.notes`; none for a model without a record)."""
        record = self.model.guidance_record
        return [] if record is None else record.notes(guidance_scale, given)

    def check_size(self, height: int, width: int, flag: str = "--") -> None:
        """Image sides the model can make; an error names each side as `flag` + its name ("--height" on the command line,
        "height" for the HTTP API's JSON field)."""
        factor = self.model.codec.downsampling_factor
        # a transformer's latents are cut into patch_size x patch_size patches
        patch = int(self.model.unet.config.get("patch_size") or 1) if self.model.is_transformer else 1
        for name, value in (("height", height), ("width", width)):
            if value < factor * patch or value % (factor * patch):
                raise UserError(f"{flag}{name} {value} must be a positive multiple of the VAE factor {factor}"
                                + (f" times the transformer's patch size {patch}" if patch > 1 else ""))
            if value > MAX_SIZE_FACTOR * self.default_size():
                raise UserError(f"{flag}{name} {value} is more than {MAX_SIZE_FACTOR}x the model's {self.default_size()} px; "
                                "a UNet does not generate coherent images that far from its training size")

    def use_preview_decoder(self, name_or_path: str) -> None:
        """Decode with a tiny preview decoder (`preview`: an AutoencoderTiny folder or hub id, e.g. madebyollin/taesd) instead of
        the VAE's decoder: faster, approximate images. Encoding (img2img) stays the VAE's."""
        codec = self.model.codec
        preview = load_preview_decoder(name_or_path, self.dtype, self.device)
        self.model.preview_decoder = preview.check_fits(codec.latent_channels, codec.downsampling_factor)

    def compile(self) -> None:
        """`torch.compile` the text encoder, network and decoder in place (`compilation.compile_for_sampling`): the first call of each
        input shape compiles, later ones run faster. Call it after `use_preview_decoder`, which swaps the decoder."""
        compile_for_sampling(self.model, self.dtype)

    def start(self, prompts: list[str], seeds: list[int], height: int, width: int):
        """(z_T, prompt embeddings, per-image generators): image i's noise from its own seed."""
        codec = self.model.codec
        factor = codec.downsampling_factor
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = randn((len(prompts), codec.latent_channels, height // factor, width // factor), generators, self.device, self.dtype)
        cond = self.prompt_cache.encode(self.model.prompts, prompts, self.device, (height, width)).to(self.dtype)
        return latents, cond, generators


class LCMGenerator(Generator):
    """An LCM (or a diffusion model with an LCM-LoRA), sampled with Algorithm 3."""

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, lora: str | None = None) -> LCMGenerator:
        model = load_lcm(path, dtype, device) if lora is None else load_lcm_lora(path, lora, dtype, device)
        return cls(model, device, dtype)

    @property
    def kind(self) -> str:
        """lcm: the guidance scale is the ω input; lora: no ω input, the guidance scale is classifier-free guidance."""
        return "lcm" if self.model.time_cond_proj_dim is not None else "lora"

    def timesteps(self, steps: int | None, custom: list[int] | None = None, strength: float = 1.0) -> torch.Tensor:
        """The model's `steps` LCM timesteps, or `custom` ones (strictly decreasing, in [0, T)).

        img2img: below `strength` 1 the `steps` timesteps start at the grid timestep k·⌊s·N⌋ - 1 ≈ s·T
        (`sampling.lcm_timesteps`); custom timesteps already say where img2img starts (their first), so they take no
        strength.
        """
        if custom:
            if strength != 1:
                raise UserError("custom timesteps already set where img2img starts (the first one); give a strength or "
                                "timesteps, not both")
            return check_custom_timesteps(custom, self.model.schedule.num_train_timesteps)
        return self.model.timesteps(steps, strength)

    def img2img_start(self, latents: torch.Tensor, timesteps: torch.Tensor, init_images: torch.Tensor, strength: float) -> torch.Tensor:
        """z_{τ_1} = α_{τ_1}·E(x) + σ_{τ_1}·ε: the init images encoded (the posterior mean) and noised to the first
        timestep with ε = `latents`, each image's seeded noise (the draw that is z_T without an init image).

        `strength` is the one `timesteps` were made with; timesteps that start above its start timestep (those of
        strength 1 with strength 0.5, say) are refused rather than noising the image more than asked.
        """
        if init_images.ndim != 4 or init_images.shape[1] != 3 or init_images.shape[0] not in (1, len(latents)):
            raise UserError(f"init_images must be [B, 3, H, W] or [1, 3, H, W] for {len(latents)} prompts, got {list(init_images.shape)}")
        factor = self.model.codec.downsampling_factor
        if tuple(init_images.shape[2:]) != (latents.shape[2] * factor, latents.shape[3] * factor):
            raise UserError(f"init image is {init_images.shape[3]}x{init_images.shape[2]} px, not the {latents.shape[3] * factor}x"
                            f"{latents.shape[2] * factor} asked for; resize it to the width and height")
        start = int(timesteps[0])
        if start > int(self.model.timesteps(1, strength)[0]):
            raise UserError(f"timesteps start at {start}, above strength {strength:g}'s start timestep "
                            f"{int(self.model.timesteps(1, strength)[0])}: make them with timesteps(steps, strength={strength:g})")
        x0 = self.model.codec.encode(init_images.to(self.device, self.dtype)).to(latents)
        return self.model.schedule.add_noise(x0.expand_as(latents), latents, torch.full((len(latents),), start, dtype=torch.long))

    def consistency_function(self, guidance_scale: float, num_prompts: int, negative_prompts: list[str] | None = None,
                             negative_scale: float | None = None, size: tuple[int, int] | None = None):
        """The consistency function a call samples: the model's, guided away from `negative_prompts` when given.

        An LCM has no unconditional pass to put a negative prompt in (its guidance is the ω input), so it is guided on
        the consistency function at every step, f̃ = f(z, ω, c) + λ·(f(z, ω, c) − f(z, ω, c_neg)) with λ = `negative_scale`
        (default `DEFAULT_NEGATIVE_SCALE`; `NegativePromptGuidance`, twice the network evaluations). An LCM-LoRA has one
        at g > 1: the negative prompt takes the empty prompt's place in classifier-free guidance, as diffusers'
        `negative_prompt` does, at the guidance scale's strength; no λ applies to it.
        """
        if negative_scale is not None and not (math.isfinite(negative_scale) and negative_scale >= 0):
            raise UserError(f"negative scale {negative_scale} must be a finite number >= 0 (0: the negative prompt has no effect)")
        if negative_prompts is None:
            if negative_scale is not None:
                raise UserError("a negative scale applies to a negative prompt: give one, or leave the scale out")
            return self.model.consistency_model(guidance_scale, size=size)
        if len(negative_prompts) not in (1, num_prompts):
            raise UserError(f"give one negative prompt for all prompts or one per prompt ({num_prompts}), got {len(negative_prompts)}")
        negative = self.prompt_cache.encode(self.model.prompts, negative_prompts, self.device, size).to(self.dtype)
        if self.kind == "lora":
            if negative_scale is not None:
                raise UserError("an LCM-LoRA takes a negative prompt into classifier-free guidance at the guidance scale, as diffusers "
                                "does; the negative scale applies to LCMs: leave it out")
            if guidance_scale <= 1:
                raise UserError(f"an LCM-LoRA takes a negative prompt into classifier-free guidance, which needs a guidance scale above 1 "
                                f"(got {guidance_scale:g}; diffusers ignores it there): give e.g. 1.5")
            return self.model.consistency_model(guidance_scale, negative, size)
        scale = DEFAULT_NEGATIVE_SCALE if negative_scale is None else negative_scale
        return NegativePromptGuidance(self.model.consistency_model(guidance_scale, size=size), negative, scale)

    @torch.no_grad()
    def __call__(self, prompts: list[str], timesteps: torch.Tensor, guidance_scale: float, seeds: list[int], height: int, width: int, *,
                 gamma: float | None = None, init_images: torch.Tensor | None = None, strength: float = 1.0,
                 negative_prompts: list[str] | None = None, negative_scale: float | None = None) -> torch.Tensor:
        """Images in [-1, 1] for `prompts`, one generator per image.

        `gamma` None samples with Algorithm 3 (`sample_lcm`, as LCMScheduler); γ ∈ [0, 1] with TCD's strategic stochastic
        sampling (`sample_tcd`, as TCDScheduler with eta = γ). `init_images` ([B, 3, H, W] in [-1, 1], or [1, 3, H, W]
        for every prompt; H, W = height, width) makes it img2img: the images are noised to `timesteps[0]`
        (`img2img_start`), which `timesteps(steps, strength=strength)` puts at `strength`'s start timestep.
        `negative_prompts` (one per prompt, or one for all) guide the images away from them (`consistency_function`).
        """
        f = self.consistency_function(guidance_scale, len(prompts), negative_prompts, negative_scale, (height, width))
        gamma = None if gamma is None else check_gamma(gamma)
        if init_images is None and strength != 1:
            raise UserError(f"strength {strength:g} applies to img2img: give init images, or leave strength at 1")
        latents, cond, generators = self.start(prompts, seeds, height, width)
        if init_images is not None:
            latents = self.img2img_start(latents, timesteps, init_images, strength)
        omega = omega_from_guidance_scale(guidance_scale)
        if gamma is None:
            x0 = sample_lcm(f, latents, timesteps, cond, omega, f.schedule, generators)
        else:
            x0 = sample_tcd(f, latents, timesteps, cond, omega, f.schedule, gamma, generators)
        return self.model.codec.decode(x0)


class SolverGenerator(Generator):
    """A diffusion model sampled with an ODE solver (DDIM, DPM-Solver, DPM-Solver++): classifier-free guidance, or for
    a guidance-distilled model (an ω input) one network evaluation per step."""

    sampler: str = "ddim"
    kind = "solver"

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, sampler: str) -> SolverGenerator:
        model = load_diffusion_model(path, dtype, device)
        if model.is_lcm:
            raise UserError(f"{path} is an LCM: sample it with --sampler lcm")
        generator = cls(model, device, dtype)
        generator.sampler = sampler
        return generator

    def timesteps(self, steps: int, custom: list[int] | None = None) -> int:
        if custom:
            raise UserError("--timesteps applies to LCMs; an ODE solver takes --steps")
        if not 1 <= steps <= self.model.schedule.num_train_timesteps:
            raise UserError(f"steps must be between 1 and {self.model.schedule.num_train_timesteps}, got {steps}")
        return steps

    @torch.no_grad()
    def __call__(self, prompts: list[str], steps: int, guidance_scale: float, seeds: list[int], height: int, width: int) -> torch.Tensor:
        latents, cond, _ = self.start(prompts, seeds, height, width)
        uncond = self.prompt_cache.uncond(self.model.prompts, self.device, (height, width)).to(self.dtype).expand(len(prompts), -1, -1)
        z0 = sample_teacher(self.model.guided_teacher(), self.sampler, latents, cond, uncond, guidance_scale, steps, self.model.scheduler_config)
        return self.model.codec.decode(z0)
