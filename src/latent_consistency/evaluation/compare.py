"""Few-step LCM sampling against guided-teacher sampling, scored by a world's judge.

Each sampler draws its images for the same prompts from the same starting noise (seeded per image),
so the rows of a comparison differ only in the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, UNetNetwork
from latent_consistency.models import DiffusionModel, encode_prompts
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps, randn, sample_lcm, sample_teacher
from latent_consistency.schedule import NoiseSchedule

BATCH = 250


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


def _noise(model: DiffusionModel, n: int, seeds: range, device) -> torch.Tensor:
    c, s = model.unet.config.in_channels, model.unet.config.sample_size
    generators = [torch.Generator("cpu").manual_seed(i) for i in seeds]
    return randn((n, c, s, s), generators, device, torch.float32)


def consistency_model(model: DiffusionModel) -> ConsistencyModel:
    """f_θ of an LCM in diffusers format, with the boundary scalings of its scheduler config."""
    return ConsistencyModel(UNetNetwork(model.unet), NoiseSchedule.from_config(model.scheduler_config), model.prediction_type,
                            model.time_cond_proj_dim, timestep_scaling=float(model.scheduler_config.get("timestep_scaling", 10.0)))


@torch.no_grad()
def sample(spec: SamplerSpec, lcm: DiffusionModel | None, teacher: DiffusionModel, prompts: list[str], seed: int = 0,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Images in [-1, 1] on the CPU for `prompts` with the sampler `spec`; image i uses seed `seed + i`."""
    model = lcm if spec.kind == "lcm" else teacher
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    out = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        z_T = _noise(model, len(chunk), range(seed + start, seed + start + len(chunk)), device)
        cond = encode_prompts(model.tokenizer, model.text_encoder, chunk, device)
        if spec.kind == "lcm":
            f = consistency_model(model)
            original = int(model.scheduler_config.get("original_inference_steps", 50))
            generators = [torch.Generator("cpu").manual_seed(10**6 + seed + start + i) for i in range(len(chunk))]
            z0 = sample_lcm(f, z_T, lcm_timesteps(spec.steps, schedule.num_train_timesteps, original), cond,
                            omega_from_guidance_scale(spec.guidance_scale), schedule, generators)
        else:
            guided = GuidedTeacher(UNetNetwork(model.unet), schedule, model.prediction_type)
            uncond = encode_prompts(model.tokenizer, model.text_encoder, [""], device).expand(len(chunk), -1, -1)
            z0 = sample_teacher(guided, spec.sampler, z_T, cond, uncond, spec.guidance_scale, spec.steps, model.scheduler_config)
        out.append(model.codec.decode(z0).clamp(-1, 1).float().cpu())
    return torch.cat(out)


def score(judge, images: torch.Tensor, attributes: list, real: torch.Tensor) -> dict:
    """Prompt alignment (per attribute and mean) and FID in the judge's feature space."""
    from latent_consistency.evaluation.alignment import prompt_alignment
    from latent_consistency.evaluation.fid import fid_score

    return {"alignment": prompt_alignment(judge, images, attributes), "fid": fid_score(judge, real, images)}
