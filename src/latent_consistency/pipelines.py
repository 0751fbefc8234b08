"""Text to images with a latent consistency model: prompts in, decoded images out (Algorithm 3).

`LCMGenerator` is what `lcm generate` (and any other front end) calls. Image i of a call is drawn from its
own generator seeded with `seeds[i]`, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent_consistency.errors import UserError
from latent_consistency.models import DiffusionModel, encode_prompts, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import check_custom_timesteps, randn, sample_lcm

# Images larger than this multiple of the model's native size are refused (SD 1.5: 4096 px).
MAX_SIZE_FACTOR = 8


@dataclass
class LCMGenerator:
    """An LCM (or a diffusion model with an LCM-LoRA) on a device, ready to turn prompts into images."""

    model: DiffusionModel
    device: torch.device
    dtype: torch.dtype

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

    @torch.no_grad()
    def __call__(self, prompts: list[str], timesteps: torch.Tensor, guidance_scale: float, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Images in [-1, 1] for `prompts`, one generator per image."""
        codec = self.model.codec
        factor = codec.downsampling_factor
        shape = (len(prompts), codec.latent_channels, height // factor, width // factor)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = randn(shape, generators, self.device, self.dtype)
        cond = encode_prompts(self.model.tokenizer, self.model.text_encoder, prompts, self.device).to(self.dtype)
        f = self.model.consistency_model(guidance_scale)
        x0 = sample_lcm(f, latents, timesteps, cond, omega_from_guidance_scale(guidance_scale), f.schedule, generators)
        return codec.decode(x0)
