"""Load teachers, make students, save and load LCM pipelines, encode prompts and images.

The one way from a loaded UNet and its scheduler config to the paper's two contracts:
`guided_teacher` (Eq. 12) and `consistency_model` (Eq. 9), also as methods of `DiffusionModel`.
Models on disk are diffusers folders with safetensors weights; nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, OmegaConditionedTeacher, UNetNetwork
from latent_consistency.errors import UserError
from latent_consistency.parameterization import SIGMA_DATA, TIMESTEP_SCALING, check_prediction_type, omega_from_guidance_scale
from latent_consistency.sampling import lcm_timesteps
from latent_consistency.schedule import NoiseSchedule

DEFAULT_TIME_COND_PROJ_DIM = 256
# A progressively distilled model's DDIM step count (Guided-Distill's stage two): kept beside its scheduler config,
# in PROGRESSIVE_FILE, since diffusers' schedulers have no such field
PROGRESSIVE_STEPS, PROGRESSIVE_FILE = "distilled_steps", "progressive.json"
# diffusers' LCMScheduler default, for an LCM(-LoRA) whose scheduler config does not say
DEFAULT_ORIGINAL_INFERENCE_STEPS = 50


def prediction_type_of(scheduler_config: dict) -> str:
    """What the network predicts (ε, v or x0), as its scheduler config says."""
    return check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))


def is_lcm_config(scheduler_config: dict) -> bool:
    """An LCMScheduler config (an LCM, or a model with an LCM-LoRA): it names the distillation's timesteps."""
    return "original_inference_steps" in scheduler_config


def guided_teacher(unet, scheduler_config: dict) -> GuidedTeacher:
    """The guided denoiser of Eq. 12 around a diffusion UNet and its scheduler config: classifier-free guidance, or
    for a diffusion UNet with an ω input (a guidance-distilled one, Guided-Distill's stage one) that input."""
    schedule, prediction_type = NoiseSchedule.from_config(scheduler_config), prediction_type_of(scheduler_config)
    dim = unet.config.get("time_cond_proj_dim")
    if dim is not None and not is_lcm_config(scheduler_config):
        return OmegaConditionedTeacher(UNetNetwork(unet), schedule, prediction_type, dim)
    return GuidedTeacher(UNetNetwork(unet), schedule, prediction_type)


def consistency_model(unet, scheduler_config: dict, network=None) -> ConsistencyModel:
    """f_θ of Eq. 9 around a UNet read under an LCMScheduler config (its noise schedule, prediction type and
    `timestep_scaling`); the ω input is the UNet's `time_cond_proj_dim` (None: no ω input, an LCM-LoRA).

    `network`, when given, stands in for the UNet's own network contract (a guided wrapper, say).
    """
    return ConsistencyModel(
        network or UNetNetwork(unet),
        NoiseSchedule.from_config(scheduler_config),
        prediction_type_of(scheduler_config),
        unet.config.get("time_cond_proj_dim"),
        timestep_scaling=float(scheduler_config.get("timestep_scaling", TIMESTEP_SCALING)),
    )


def inference_timesteps(scheduler_config: dict, steps: int, strength: float = 1.0) -> torch.Tensor:
    """The `steps` timesteps of Algorithm 3 that diffusers' LCMScheduler picks under this config (img2img: from the
    start timestep of `strength`, `sampling.lcm_timesteps`)."""
    return lcm_timesteps(steps, int(scheduler_config.get("num_train_timesteps", 1000)),
                         int(scheduler_config.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS)), strength)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Text embeddings c as Stable Diffusion computes them: pad to max_length, last hidden state."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = device if device is not None else text_encoder.device
    return text_encoder(tokens.input_ids.to(device))[0]


class LatentCodec:
    """The encoder E and decoder D of the paper's latent space, z = E(x) (Section 3).

    The VAE's `scaling_factor` is applied here and nowhere else: latents handed to the rest of the
    library are already scaled to about unit variance.
    """

    def __init__(self, vae):
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1], [B,3,H,W] -> scaled latents. The posterior mean unless `sample`."""
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / self.scaling_factor).sample


@dataclass
class DiffusionModel:
    """A text-to-image latent diffusion model's parts, as a diffusers pipeline folder holds them."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    source: str

    @property
    def prediction_type(self) -> str:
        return prediction_type_of(self.scheduler_config)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.scheduler_config)

    @property
    def distilled_steps(self) -> int | None:
        """The DDIM step count of a progressively distilled model (None for any other)."""
        return self.scheduler_config.get(PROGRESSIVE_STEPS)

    @property
    def is_lcm(self) -> bool:
        """A consistency model (sampled with Algorithm 3), not a diffusion model (sampled with an ODE solver)."""
        return is_lcm_config(self.scheduler_config)

    @property
    def time_cond_proj_dim(self) -> int | None:
        return self.unet.config.get("time_cond_proj_dim")

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec(self.vae)

    def guided_teacher(self) -> GuidedTeacher:
        """This model as the guided teacher of Eq. 12 (classifier-free guidance, cond and uncond in one batch)."""
        return guided_teacher(self.unet, self.scheduler_config)

    def consistency_model(self, guidance_scale: float = 1.0, negative_cond: torch.Tensor | None = None) -> ConsistencyModel:
        """This LCM as f_θ of Eq. 9. An LCM takes g through its ω input at call time; a model without one (an
        LCM-LoRA) is classifier-free guided against the empty prompt when g > 1, as diffusers' StableDiffusionPipeline
        with an LCMScheduler guides it; `negative_cond` (a negative prompt's embedding, [1, L, D] or one per row) then
        takes the empty prompt's place, as diffusers' `negative_prompt` does. An LCM's negative prompt has no such
        place: see `denoisers.NegativePromptGuidance`."""
        if self.time_cond_proj_dim is not None or guidance_scale <= 1:
            if negative_cond is not None:
                raise UserError("a negative prompt enters an LCM-LoRA's classifier-free guidance, which needs a guidance scale above 1; "
                                "an LCM (ω input) takes it through NegativePromptGuidance")
            return consistency_model(self.unet, self.scheduler_config)
        uncond = encode_prompts(self.tokenizer, self.text_encoder, [""], self.unet.device) if negative_cond is None else negative_cond
        uncond = uncond.to(self.unet.device, self.unet.dtype)
        teacher, omega = self.guided_teacher(), omega_from_guidance_scale(guidance_scale)

        def guided(z, t, cond, timestep_cond=None):
            return teacher.guided_output(z, t, cond, uncond.expand(len(z), -1, -1), omega)

        return consistency_model(self.unet, self.scheduler_config, network=guided)

    def timesteps(self, steps: int, strength: float = 1.0) -> torch.Tensor:
        """The LCM's `steps` sampling timesteps (Algorithm 3); below strength 1, img2img's, from a lower start."""
        return inference_timesteps(self.scheduler_config, steps, strength)

    def to(self, device) -> DiffusionModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self


def _check_model_folder(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder {path} does not exist; give a diffusers pipeline folder or a hub id")
    if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
        raise UserError(
            f"{path} is not a diffusers pipeline folder (no model_index.json and unet/); "
            "give a folder saved by save_pretrained or by `lcm distill`"
        )


def _looks_like_hub_id(name: str) -> bool:
    return not os.path.isabs(name) and name.count("/") == 1 and not name.startswith(".") and not Path(name).exists()


def load_diffusion_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load unet, vae, text encoder, tokenizer and scheduler config from a diffusers folder or hub id.

    Works for Stable Diffusion 1.x/2.x folders (ε- or v-prediction, read from the scheduler config) and
    for LCM folders (a UNet with `time_cond_proj_dim`). Only safetensors weights are accepted.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not _looks_like_hub_id(name_or_path):
        _check_model_folder(name_or_path)
    kwargs = dict(torch_dtype=dtype, use_safetensors=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        scheduler_config = _read_scheduler_config(name_or_path)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a diffusers model from {name_or_path}: {first_line}") from err
    model = DiffusionModel(unet, vae, text_encoder, tokenizer, scheduler_config, source=name_or_path)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return model.to(device)


def _read_scheduler_config(name_or_path: str) -> dict:
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(name_or_path, subfolder="scheduler"))
    progressive = Path(name_or_path) / PROGRESSIVE_FILE
    extra = json.loads(progressive.read_text()) if progressive.is_file() else {}
    return {k: v for k, v in config.items() if not k.startswith("_")} | extra | {"_class_name": config.get("_class_name")}


def make_student_unet(teacher_unet, time_cond_proj_dim: int = DEFAULT_TIME_COND_PROJ_DIM):
    """The student θ: the teacher's UNet with a guidance-scale input ω (Section 4.2).

    The UNet gets `time_cond_proj_dim`, a linear projection of the ω embedding added to the time
    embedding. That projection starts at zero, so the student starts as the teacher exactly.
    """
    from diffusers import UNet2DConditionModel

    # Private keys ("_use_default_values" among them) would make from_config ignore the new setting.
    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise UserError(f"teacher UNet does not fit a student UNet: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=teacher_unet.device, dtype=teacher_unet.dtype)


def lcm_scheduler_config(
    teacher_scheduler_config: dict,
    skip: int,
    prediction_type: str | None = None,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> dict:
    """An LCMScheduler config matching a student distilled from this teacher with skip k.

    prediction_type is the student network's (default: the teacher's); the boundary scalings wrap it either
    way. original_inference_steps = T/k.
    """
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr", "prediction_type")
    config = {k: teacher_scheduler_config[k] for k in keys if k in teacher_scheduler_config}
    if prediction_type is not None:
        config["prediction_type"] = check_prediction_type(prediction_type)
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    config.update(
        original_inference_steps=num_train_timesteps // skip,
        timestep_scaling=timestep_scaling,
        set_alpha_to_one=True,
        clip_sample=False,
        timestep_spacing="leading",
    )
    if sigma_data != SIGMA_DATA:
        raise UserError("diffusers' LCMScheduler fixes sigma_data = 0.5; a student trained otherwise cannot be exported")
    return config


def save_diffusion_pipeline(out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler_config: dict) -> Path:
    """Write a diffusers `StableDiffusionPipeline` folder with a DDIM scheduler (safetensors, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config({k: v for k, v in scheduler_config.items() if not k.startswith("_")}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if PROGRESSIVE_STEPS in scheduler_config:
        (Path(out_dir) / PROGRESSIVE_FILE).write_text(json.dumps({PROGRESSIVE_STEPS: scheduler_config[PROGRESSIVE_STEPS]}))
    return Path(out_dir)


def save_lcm_pipeline(out_dir: str | Path, student_unet, base: DiffusionModel, scheduler_config: dict) -> Path:
    """Write a complete diffusers `LatentConsistencyModelPipeline` folder (safetensors)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    if student_unet.config.get("time_cond_proj_dim") is None:
        raise UserError("the UNet has no guidance input (time_cond_proj_dim); make it with make_student_unet")
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=student_unet,
        scheduler=LCMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_lcm(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load an LCM in diffusers format (ours, or any LatentConsistencyModelPipeline folder).

    A plain diffusion model without the ω input cannot run as an LCM: that is a user error, with a
    hint at what to do instead.
    """
    model = load_diffusion_model(name_or_path, dtype=dtype, device=device)
    if model.time_cond_proj_dim is None:
        raise UserError(
            f"{name_or_path} is a diffusion model without the guidance input of an LCM "
            "(its UNet has no time_cond_proj_dim); distil it first with `lcm distill --teacher ...`, or load its LCM-LoRA (--lora)"
        )
    if not model.is_lcm:
        raise UserError(f"{name_or_path} is a guidance-distilled diffusion model (ω input, no LCMScheduler), not an LCM; sample it with "
                        "an ODE solver (`lcm generate --sampler ddim`), or distil it into an LCM with `lcm distill --teacher ...`")
    return model


LORA_SCHEDULER_FILE = "scheduler_config.json"  # the LCMScheduler config `lcm distill --adapter lora` saves next to the weights


def load_lcm_lora(name_or_path: str, lora: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """A diffusion model with an LCM-LoRA (Luo et al. 2023b) loaded onto its UNet (and text encoder, if the file has
    layers for it), as diffusers' `load_lora_weights` loads it; the result samples as an LCM without an ω input.
    The model may also be an LCM with a LoRA fine-tuned on it (`lcm finetune --adapter lora`); it keeps its ω input.

    `lora` is a folder or .safetensors file (ours, or a downloaded LCM-LoRA) or a hub id. Its scheduler config is
    the LCMScheduler one `lcm distill`/`lcm finetune` save in the folder, else an LCM's own, else diffusers' default
    (original_inference_steps 50) over the model's noise schedule; the parameterisation is the model's either way.
    """
    from diffusers import LCMScheduler, StableDiffusionPipeline

    model = load_diffusion_model(name_or_path, dtype=dtype, device=device)
    path = Path(lora)
    if not path.exists() and not _looks_like_hub_id(lora):
        raise UserError(f"LoRA {lora} does not exist; give the lora/ folder of `lcm distill --adapter lora`, a .safetensors file or a hub id")
    source, kwargs = (str(path.parent), {"weight_name": path.name}) if path.is_file() else (lora, {})
    try:
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("not a LoRA state dict (every key must name a lora layer)")
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, model.unet, metadata=metadata)
        StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, model.text_encoder, metadata=metadata)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the LoRA {lora} onto {name_or_path}: {first_line}") from err
    for module in (model.unet, model.text_encoder):  # the LoRA layers need not be made on the model's device and dtype
        module.to(device=device, dtype=dtype)
    if (path / LORA_SCHEDULER_FILE).is_file():
        lcm = dict(LCMScheduler.load_config(str(path)))
    elif model.time_cond_proj_dim is not None:
        lcm = model.scheduler_config
    else:
        lcm = lcm_scheduler_config(model.scheduler_config, skip=1) | {"original_inference_steps": DEFAULT_ORIGINAL_INFERENCE_STEPS}
    model.scheduler_config = model.scheduler_config | {k: v for k, v in lcm.items() if not k.startswith("_")}
    return model
