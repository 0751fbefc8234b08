"""Few-step LCM sampling against guided-teacher sampling, for the same prompts from the same noise.

Each sampler draws its images for the same prompts from the same starting noise (seeded per image),
so the rows of a comparison differ only in the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent_consistency.denoisers import ConsistencyModel
from latent_consistency.models import DiffusionModel
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import randn, sample_lcm, sample_teacher

# Images sampled at once by default (`batch_size`), and so scored at once by `lcm evaluate` (`table.score_row`): at most
# MAX_BATCH (the world's 32 px images), at most BATCH_PIXELS pixels, for a batch's activations grow with its pixels: the
# VAE decoder's full-size feature maps of one 512 × 512 image are about 0.5 GB in half precision, 250 of them 125 GB.
MAX_BATCH = 250
BATCH_PIXELS = 16 * 512 * 512


def batch_size(model: DiffusionModel) -> int:
    """Images of `model` sampled at once unless told (`lcm evaluate --batch-size`): 250 at the world's 32 px, 16 at Stable
    Diffusion 1.5's 512 px, 4 at SDXL's 1024 px."""
    return max(1, min(MAX_BATCH, BATCH_PIXELS // model.native_size ** 2))


@dataclass(frozen=True)
class SamplerSpec:
    """One row of a comparison: the LCM at n steps, or the teacher with `sampler` at n steps (CFG g)."""

    kind: str  # "lcm" or "teacher"
    steps: int
    guidance_scale: float
    sampler: str = "lcm"

    @property
    def label(self) -> str:
        name = "LCM" if self.kind == "lcm" else f"teacher {self.sampler}"
        return f"{name} {self.steps}-step g={self.guidance_scale:g}"


def _noise(model: DiffusionModel, seeds: range, device) -> tuple[torch.Tensor, list[torch.Generator]]:
    """z_T of image i from its own generator seeded with `seeds[i]`, in the model's dtype, as `lcm generate` draws it, and
    the generators, which go on to draw an LCM's noise between its steps as `lcm generate`'s do: image i is the one `lcm
    generate --seed` makes from that seed."""
    c, s = model.unet.config.in_channels, model.unet.config.sample_size
    generators = [torch.Generator("cpu").manual_seed(i) for i in seeds]
    return randn((len(seeds), c, s, s), generators, device, model.unet.dtype), generators


def sample(spec: SamplerSpec, lcm: DiffusionModel | None, teacher: DiffusionModel, prompts: list[str], seed: int = 0,
           device: torch.device | str = "cpu", batch: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] on the CPU for `prompts` with the sampler `spec`; image i uses seed `seed + i`; `batch` of them at
    once (default `batch_size`)."""
    if spec.kind == "lcm":
        return sample_consistency(lcm.consistency_model(spec.guidance_scale), lcm.timesteps(spec.steps), lcm, prompts, spec.guidance_scale,
                                  seed, device, batch)
    return sample_guided(teacher, spec.sampler, spec.steps, prompts, spec.guidance_scale, seed, device, batch)


@torch.no_grad()
def sample_consistency(f: ConsistencyModel, timesteps: torch.Tensor, parts: DiffusionModel, prompts: list[str], guidance_scale: float,
                       seed: int = 0, device: torch.device | str = "cpu", batch: int | None = None) -> torch.Tensor:
    """Algorithm 3 with the consistency model f at `timesteps`; `parts` (an LCM or its teacher) encodes the prompts,
    shapes the noise and decodes. Images in [-1, 1] on the CPU, `batch` at a time (default `batch_size`); image i is
    drawn from seed `seed + i`, its z_T and its noise between steps, as `lcm generate` draws it (`_noise`)."""
    out, batch = [], batch or batch_size(parts)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        z_T, generators = _noise(parts, range(seed + start, seed + start + len(chunk)), device)
        cond = parts.prompts.encode(chunk, device)
        z0 = sample_lcm(f, z_T, timesteps, cond, omega_from_guidance_scale(guidance_scale), f.schedule, generators)
        out.append(parts.codec.decode(z0).clamp(-1, 1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_guided(teacher: DiffusionModel, sampler: str, steps: int, prompts: list[str], guidance_scale: float, seed: int = 0,
                  device: torch.device | str = "cpu", batch: int | None = None) -> torch.Tensor:
    """The teacher with classifier-free guidance g and a diffusers scheduler (`sampling.sample_teacher`).
    Images in [-1, 1] on the CPU, `batch` at a time (default `batch_size`); image i starts from seed `seed + i`."""
    guided = teacher.guided_teacher()
    out, batch = [], batch or batch_size(teacher)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        z_T, _ = _noise(teacher, range(seed + start, seed + start + len(chunk)), device)
        cond = teacher.prompts.encode(chunk, device)
        uncond = teacher.prompts.uncond(device).expand(len(chunk), -1, -1)
        z0 = sample_teacher(guided, sampler, z_T, cond, uncond, guidance_scale, steps, teacher.scheduler_config)
        out.append(teacher.codec.decode(z0).clamp(-1, 1).float().cpu())
    return torch.cat(out)
