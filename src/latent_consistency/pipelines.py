"""Text to images: prompts in, decoded images out, with a latent consistency model (Algorithm 3, `LCMGenerator`) or a
diffusion model and an ODE solver (`SolverGenerator`: a teacher with CFG, or a guidance-distilled model).

They are what `lcm generate` (and any other front end) calls. Image i of a call is drawn from its
own generator seeded with `seeds[i]`, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent_consistency.errors import UserError
from latent_consistency.models import DiffusionModel, encode_prompts, load_diffusion_model, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import check_custom_timesteps, randn, sample_lcm, sample_teacher

# Images larger than this multiple of the model's native size are refused (SD 1.5: 4096 px).
MAX_SIZE_FACTOR = 8


@dataclass
class Generator:
    """A text-to-image model on a device: the image size checks, starting noise and prompt embeddings its samplers share."""

    model: DiffusionModel
    device: torch.device
    dtype: torch.dtype

    def default_size(self) -> int:
        return int(self.model.unet.config.sample_size) * self.model.codec.downsampling_factor

    def check_size(self, height: int, width: int) -> None:
        factor = self.model.codec.downsampling_factor
        for name, value in (("height", height), ("width", width)):
            if value < factor or value % factor:
                raise UserError(f"--{name} {value} must be a positive multiple of the VAE factor {factor}")
            if value > MAX_SIZE_FACTOR * self.default_size():
                raise UserError(f"--{name} {value} is more than {MAX_SIZE_FACTOR}x the model's {self.default_size()} px; "
                                "a UNet does not generate coherent images that far from its training size")

    def start(self, prompts: list[str], seeds: list[int], height: int, width: int):
        """(z_T, prompt embeddings, per-image generators): image i's noise from its own seed."""
        codec = self.model.codec
        factor = codec.downsampling_factor
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = randn((len(prompts), codec.latent_channels, height // factor, width // factor), generators, self.device, self.dtype)
        cond = encode_prompts(self.model.tokenizer, self.model.text_encoder, prompts, self.device).to(self.dtype)
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

    def timesteps(self, steps: int | None, custom: list[int] | None = None) -> torch.Tensor:
        """The model's `steps` LCM timesteps, or `custom` ones (strictly decreasing, in [0, T))."""
        if custom:
            return check_custom_timesteps(custom, self.model.schedule.num_train_timesteps)
        return self.model.timesteps(steps)

    @torch.no_grad()
    def __call__(self, prompts: list[str], timesteps: torch.Tensor, guidance_scale: float, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Images in [-1, 1] for `prompts`, one generator per image."""
        latents, cond, generators = self.start(prompts, seeds, height, width)
        f = self.model.consistency_model(guidance_scale)
        x0 = sample_lcm(f, latents, timesteps, cond, omega_from_guidance_scale(guidance_scale), f.schedule, generators)
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
        uncond = encode_prompts(self.model.tokenizer, self.model.text_encoder, [""], self.device).to(self.dtype).expand(len(prompts), -1, -1)
        z0 = sample_teacher(self.model.guided_teacher(), self.sampler, latents, cond, uncond, guidance_scale, steps, self.model.scheduler_config)
        return self.model.codec.decode(z0)
