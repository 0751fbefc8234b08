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

BATCH = 250  # images sampled at once; `lcm evaluate` samples and scores a row this many at a time (`table.score_row`)


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
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Images in [-1, 1] on the CPU for `prompts` with the sampler `spec`; image i uses seed `seed + i`."""
    if spec.kind == "lcm":
        return sample_consistency(lcm.consistency_model(spec.guidance_scale), lcm.timesteps(spec.steps), lcm, prompts, spec.guidance_scale,
                                  seed, device)
    return sample_guided(teacher, spec.sampler, spec.steps, prompts, spec.guidance_scale, seed, device)


@torch.no_grad()
def sample_consistency(f: ConsistencyModel, timesteps: torch.Tensor, parts: DiffusionModel, prompts: list[str], guidance_scale: float,
                       seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Algorithm 3 with the consistency model f at `timesteps`; `parts` (an LCM or its teacher) encodes the prompts,
    shapes the noise and decodes. Images in [-1, 1] on the CPU; image i is drawn from seed `seed + i`, its z_T and its
    noise between steps, as `lcm generate` draws it (`_noise`)."""
    out = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        z_T, generators = _noise(parts, range(seed + start, seed + start + len(chunk)), device)
        cond = parts.prompts.encode(chunk, device)
        z0 = sample_lcm(f, z_T, timesteps, cond, omega_from_guidance_scale(guidance_scale), f.schedule, generators)
        out.append(parts.codec.decode(z0).clamp(-1, 1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_guided(teacher: DiffusionModel, sampler: str, steps: int, prompts: list[str], guidance_scale: float, seed: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher with classifier-free guidance g and a diffusers scheduler (`sampling.sample_teacher`).
    Images in [-1, 1] on the CPU; image i starts from seed `seed + i`."""
    guided = teacher.guided_teacher()
    out = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        z_T, _ = _noise(teacher, range(seed + start, seed + start + len(chunk)), device)
        cond = teacher.prompts.encode(chunk, device)
        uncond = teacher.prompts.uncond(device).expand(len(chunk), -1, -1)
        z0 = sample_teacher(guided, sampler, z_T, cond, uncond, guidance_scale, steps, teacher.scheduler_config)
        out.append(teacher.codec.decode(z0).clamp(-1, 1).float().cpu())
    return torch.cat(out)
