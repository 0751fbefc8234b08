"""Load teachers, make students, save and load LCM pipelines, encode prompts and images.

The one way from a loaded denoising network (a UNet, or a PixArt-α transformer) and its scheduler config to the paper's two contracts:
`guided_teacher` (Eq. 12) and `consistency_model` (Eq. 9), also as methods of `DiffusionModel`.
Models on disk are diffusers folders with safetensors weights; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latent_consistency.batch_parts import in_parts, part_size
from latent_consistency.conditioning import AddedConditioning, PixArtConditioning
from latent_consistency.denoisers import (
    ConsistencyModel,
    GuidedTeacher,
    OmegaConditionedTeacher,
    SampleClipping,
    TransformerNetwork,
    UNetNetwork,
    WithoutAdapters,
    denoising_network,
    is_transformer,
)
from latent_consistency.devices import given, resolve_device, weights_placement
from latent_consistency.errors import UserError, first_line
from latent_consistency.guidance_record import RECORD, GuidanceRecord, read_record, write_record
from latent_consistency.hub import (
    PICKLE_SUFFIXES,
    PIPELINE_WEIGHTS,
    TOP_FILES,
    TOP_IGNORED,
    check_hub_id,
    given_name,
    hub_snapshot,
    looks_like_hub_id,
    pipeline_files,
    weights_hint,
)
from latent_consistency.outputs import permit_as_umask
from latent_consistency.parameterization import SIGMA_DATA, TIMESTEP_SCALING, check_prediction_type, omega_from_guidance_scale
from latent_consistency.prompts import CLIPPromptEncoder, SDXLPromptEncoder, T5PromptEncoder
from latent_consistency.sampling import is_real, lcm_timesteps
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


def guided_teacher(unet, scheduler_config: dict, network=None) -> GuidedTeacher:
    """The guided denoiser of Eq. 12 around a diffusion UNet and its scheduler config: classifier-free guidance, or
    for a diffusion UNet with an ω input (a guidance-distilled one, Guided-Distill's stage one) that input.
    `network`, when given, stands in for the UNet's own network contract."""
    schedule, prediction_type = NoiseSchedule.from_config(scheduler_config), prediction_type_of(scheduler_config)
    network = network or denoising_network(unet)
    dim = unet.config.get("time_cond_proj_dim")
    if dim is not None and not is_lcm_config(scheduler_config):
        return OmegaConditionedTeacher(network, schedule, prediction_type, dim)
    return GuidedTeacher(network, schedule, prediction_type)


def consistency_model(unet, scheduler_config: dict, network=None) -> ConsistencyModel:
    """f_θ of Eq. 9 around a UNet read under an LCMScheduler config (its noise schedule, prediction type and
    `timestep_scaling`); the ω input is the UNet's `time_cond_proj_dim` (None: no ω input, an LCM-LoRA or a PixArt-α
    transformer).

    `network`, when given, stands in for the UNet's own network contract (a guided wrapper, say). The UNet is the
    module whose inputs a sampler checks its noise and condition against (`ConsistencyModel.check_inputs`).
    """
    return ConsistencyModel(
        network or denoising_network(unet),
        NoiseSchedule.from_config(scheduler_config),
        prediction_type_of(scheduler_config),
        unet.config.get("time_cond_proj_dim"),
        timestep_scaling=float(scheduler_config.get("timestep_scaling", TIMESTEP_SCALING)),
        clipping=SampleClipping.of_config(scheduler_config),
        module=unet,
    )


def inference_timesteps(scheduler_config: dict, steps: int, strength: float = 1.0) -> torch.Tensor:
    """The `steps` timesteps of Algorithm 3 that diffusers' LCMScheduler picks under this config (img2img: from the
    start timestep of `strength`, `sampling.lcm_timesteps`)."""
    return lcm_timesteps(steps, int(scheduler_config.get("num_train_timesteps", 1000)),
                         int(scheduler_config.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS)), strength)


def _latent_statistics(vae_config) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The per-channel mean μ and standard deviation σ of the VAE's latents that its config gives (`latents_mean`,
    `latents_std`: Playground v2.5's), or (None, None) unless it gives both, where diffusers' SDXL pipelines use neither."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is None or std is None:
        return None, None
    return torch.tensor(mean), torch.tensor(std)


class LatentCodec:
    """The encoder E and decoder D of the paper's latent space, z = E(x) (Section 3).

    The VAE's `scaling_factor` s is applied here and nowhere else: latents handed to the rest of the
    library are already scaled to about unit variance, z = s·E(x). A VAE config with per-channel `latents_mean` μ and
    `latents_std` σ (Playground v2.5's SDXL VAE) standardises them instead, z = (E(x) − μ)·s/σ, as diffusers' SDXL
    pipelines do when it has both (with one of the two they use s alone, and so does this). On a CPU both run in parts
    of the batch whose feature maps fit malloc's heap (`batch_parts`). With a `preview` decoder
    (`preview.PreviewDecoder`, a TAESD-style tiny decoder) `decode` is its fast approximation of D; `encode` is always
    the VAE's.
    """

    def __init__(self, vae, preview=None):
        self.vae, self.preview = vae, preview
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latents_mean, self.latents_std = _latent_statistics(vae.config)

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents E(x) -> z: s·E(x), or (E(x) − μ)·s/σ in diffusers' StableDiffusionXLImg2ImgPipeline's order
        of operations."""
        if self.latents_mean is None:
            return latents * self.scaling_factor
        mean, std = self._statistics_like(latents)
        return (latents - mean) * self.scaling_factor / std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """z -> the VAE's latents, the inverse of `scale`: z/s, or z·σ/s + μ as diffusers' SDXL pipelines decode."""
        if self.latents_mean is None:
            return latents / self.scaling_factor
        mean, std = self._statistics_like(latents)
        return latents * std / self.scaling_factor + mean

    def _statistics_like(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and σ as [1, C, 1, 1] in the dtype and on the device of `latents`, as diffusers casts them."""
        return tuple(v.view(1, -1, 1, 1).to(latents) for v in (self.latents_mean, self.latents_std))

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1], [B,3,H,W] -> latents z (`scale`). The posterior mean unless `sample`."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # diffusers is imported when a model loads

        images = images.to(self.vae.device, self.vae.dtype)
        parts = part_size(self.feature_map_bytes(*images.shape[-2:]), images.device)
        # The posterior's moments in parts; one draw for the whole batch, as from one call
        posterior = DiagonalGaussianDistribution(in_parts(lambda x: self.vae.encode(x).latent_dist.parameters, images, parts))
        latents = posterior.sample(generator) if sample else posterior.mean
        return self.scale(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents z -> images in [-1, 1] (not clamped): D(z) (`unscale`), or the preview decoder's approximation of it."""
        if self.preview is not None:
            return self.preview.decode(latents)
        latents = self.unscale(latents.to(*weights_placement(self.vae)))
        height, width = (self.downsampling_factor * n for n in latents.shape[-2:])
        return in_parts(lambda z: self.vae.decode(z).sample, latents, part_size(self.feature_map_bytes(height, width), latents.device))

    def feature_map_bytes(self, height: int, width: int) -> int:
        """The largest feature map of one height × width image in the VAE's encoder or decoder: level i holds
        `block_out_channels[i]` channels at 1/2^i of the image's size. It sets the size of the parts that `encode` and
        `decode` run in on a CPU (`batch_parts`)."""
        levels = enumerate(self.vae.config.block_out_channels)
        return weights_placement(self.vae)[1].itemsize * max(channels * max(1, height >> i) * max(1, width >> i) for i, channels in levels)


@dataclass
class DiffusionModel:
    """A text-to-image latent diffusion model's parts, as a diffusers pipeline folder holds them: Stable Diffusion 1.x/2.x
    (one text encoder), the SDXL family (a second text encoder with a pooled projection; `is_sdxl`), or PixArt-α (a
    transformer and a T5 text encoder; `is_transformer`).

    `unet` is the denoising network: a `UNet2DConditionModel`, or a `PixArtTransformer2DModel` (whose config has the
    same `sample_size` and `in_channels`, and no `time_cond_proj_dim`); `denoisers.denoising_network` adapts either.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL pipelines: ∅ is zeros, not the empty prompt's encoding
    # The UNet also carries a LoRA student's adapters (`training.students`): this model's own network runs with them off
    unet_carries_student: bool = False
    # A tiny decoder that decodes in the VAE's place (`preview.PreviewDecoder`; decode only, the VAE still encodes)
    preview_decoder: Any = None
    # An LCM's distilled guidance range, default g and ω response (`guidance_record`; None where its folder has none)
    guidance_record: GuidanceRecord | None = None

    @property
    def is_sdxl(self) -> bool:
        return AddedConditioning.of_unet(self.unet.config) is not None

    @property
    def upcasts_vae(self) -> bool:
        """Whether the VAE stays in float32 when the rest runs in float16: as diffusers' SDXL pipelines do when the VAE's
        config says `force_upcast` (SDXL's VAE overflows in float16). SD 1.x/2.x pipelines never upcast (their VAE configs
        predate the key, whose default is True)."""
        return self.is_sdxl and bool(self.vae.config.get("force_upcast"))

    @property
    def is_transformer(self) -> bool:
        """A PixArt-α model: its denoising network is a transformer, its text encoder a T5 encoder."""
        return is_transformer(self.unet)

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def patch_size(self) -> int:
        """The latent patch a transformer cuts its input into (PixArt-α: 2); 1 for a UNet (`transformer_patch_size`). Image
        sides are multiples of the VAE factor times this."""
        return transformer_patch_size(self.unet.config if self.is_transformer else None)

    @property
    def native_size(self) -> int:
        """The image size (px) the UNet was made for."""
        return int(self.unet.config.sample_size) * self.codec.downsampling_factor

    @property
    def prompts(self) -> CLIPPromptEncoder | SDXLPromptEncoder | T5PromptEncoder:
        """This model's prompt encoder: c and ∅ as its diffusers pipeline makes them."""
        if self.is_transformer:
            return T5PromptEncoder(self.tokenizer, self.text_encoder, PixArtConditioning.of_transformer(self.unet),
                                   (self.native_size, self.native_size))
        added = AddedConditioning.of_unet(self.unet.config)
        if added is None:
            return CLIPPromptEncoder(self.tokenizer, self.text_encoder)
        if self.text_encoder_2 is None:
            raise UserError(f"{self.source}: its UNet takes SDXL's pooled text embedding, but the folder has no text_encoder_2")
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return SDXLPromptEncoder(pairs, added, (self.native_size, self.native_size), self.force_zeros_for_empty_prompt)

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
    def skip(self) -> int:
        """An LCM's skipping step k (Eq. 16): T / its scheduler's original_inference_steps."""
        steps = int(self.scheduler_config.get("original_inference_steps", DEFAULT_ORIGINAL_INFERENCE_STEPS))
        return int(self.scheduler_config.get("num_train_timesteps", 1000)) // steps

    @property
    def time_cond_proj_dim(self) -> int | None:
        return self.unet.config.get("time_cond_proj_dim")

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec(self.vae, self.preview_decoder)

    def network(self) -> UNetNetwork | TransformerNetwork | WithoutAdapters:
        """This model's denoising network (`denoisers`): with a LoRA student's adapters on its UNet, run with them off."""
        network = denoising_network(self.unet)
        return WithoutAdapters(network, self.unet) if self.unet_carries_student else network

    def guided_teacher(self) -> GuidedTeacher:
        """This model as the guided teacher of Eq. 12 (classifier-free guidance, cond and uncond in one batch)."""
        return guided_teacher(self.unet, self.scheduler_config, self.network())

    def consistency_model(self, guidance_scale: float = 1.0, negative_cond: torch.Tensor | None = None,
                          size: tuple[int, int] | None = None) -> ConsistencyModel:
        """This LCM as f_θ of Eq. 9. An LCM takes g through its ω input at call time; a model without one (an
        LCM-LoRA, PixArt-LCM) is classifier-free guided against the empty prompt when g > 1, as diffusers' StableDiffusionPipeline
        with an LCMScheduler guides it; `negative_cond` (a negative prompt's embedding, [1, L, D] or one per row) then
        takes the empty prompt's place, as diffusers' `negative_prompt` does. An LCM's negative prompt has no such
        place: see `denoisers.NegativePromptGuidance`. `size` (height, width) is the images' (an SDXL ∅'s micro-conditioning;
        default the native size)."""
        if self.time_cond_proj_dim is not None or guidance_scale <= 1:
            if negative_cond is not None:
                raise UserError("a negative prompt enters the classifier-free guidance of a model without an ω input (an LCM-LoRA, PixArt-LCM), "
                                "which needs a guidance scale above 1; "
                                "an LCM (ω input) takes it through NegativePromptGuidance")
            return consistency_model(self.unet, self.scheduler_config)
        uncond = self.prompts.uncond(self.unet.device, size) if negative_cond is None else negative_cond
        uncond = uncond.to(self.unet.device, self.unet.dtype)
        teacher, omega = self.guided_teacher(), omega_from_guidance_scale(guidance_scale)

        def guided(z, t, cond, timestep_cond=None):
            return teacher.guided_output(z, t, cond, uncond.expand(len(z), -1, -1), omega)

        return consistency_model(self.unet, self.scheduler_config, network=guided)

    def timesteps(self, steps: int, strength: float = 1.0) -> torch.Tensor:
        """The LCM's `steps` sampling timesteps (Algorithm 3); below strength 1, img2img's, from a lower start."""
        return inference_timesteps(self.scheduler_config, steps, strength)

    def to(self, device) -> DiffusionModel:
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self


def _check_model_folder(path: str, name: str) -> None:
    """`path`, where the model `name` is read from (`check_hub_id`: a hub id's snapshot), is a pipeline folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model folder {path} does not exist; give a diffusers pipeline folder or a hub id")
    if not (p / "model_index.json").is_file() or not ((p / "unet").is_dir() or (p / "transformer").is_dir()):
        where = "folder" if path == name else "hub repo"
        raise UserError(f"{name} is not a diffusers pipeline {where} (no model_index.json and unet/ or transformer/); "
                        + (_what_the_folder_is(p) or f"give a {where} saved by save_pretrained or by `lcm distill`"))


# The folders a training run exports its model to (`training.run_folder`): an LCM, an LCM-LoRA, a guidance-distilled model
RUN_EXPORTS = ("lcm", "lora", "guided")
# What to give for a LoRA given as a model, in words that fit every command that loads a model (`lcm distill` takes no LoRA;
# `lcm evaluate` names the model --lcm)
LORA_HINT = ("adapters for the model it was distilled from, no model of its own: give that model, and the LoRA as --lora beside "
             "it where the command takes one (lcm generate, serve, evaluate, finetune)")


def _what_the_folder_is(folder: Path) -> str:
    """What to give instead of a folder that is no pipeline but one of the other folders a user has at hand: a training
    run (its exported model), a LoRA (--lora), one component of a pipeline (the pipeline) or a single-file checkpoint (a
    diffusers folder made from it); "" for any other."""
    if folder.is_file():
        return _what_the_file_is(folder)
    if _is_run(folder):
        return f"it is a training run: {_run_export(folder)}"
    if folder.parent.name == "checkpoints" and _is_run(folder.parent.parent):
        return (f"it is the checkpoint {folder.name} of the training run {folder.parent.parent}, its training state (no command "
                f"exports a checkpoint as a model): {_run_export(folder.parent.parent)}")
    if (folder / LORA_WEIGHTS_FILE).is_file():
        return f"it is a LoRA: {LORA_HINT}"
    if (folder.parent / "model_index.json").is_file():
        return f"it is the {folder.name}/ folder of a pipeline: give the pipeline folder {folder.parent}"
    return ""


def _is_run(folder: Path) -> bool:
    """Whether `folder` is a training run's folder (`training.run_folder`: its config and checkpoints)."""
    return (folder / "config.json").is_file() and (folder / "checkpoints").is_dir()


def _run_export(run: Path) -> str:
    """What to give for the model of the training run `run`: the model it exported (`RUN_EXPORTS`), or when it exports one."""
    exports = [run / name for name in RUN_EXPORTS if (run / name).is_dir() and any((run / name).iterdir())]
    if not exports:
        return "it has exported no model yet; it exports lcm/ (or lora/, guided/) when it finishes: run its command again with --resume"
    if exports[0].name == "lora":
        return f"it exported the LoRA {exports[0]}, {LORA_HINT}"
    return f"give the model it exported, {exports[0]}"


def _what_the_file_is(file: Path) -> str:
    """What to give instead of a weights file given as a model: a LoRA file as --lora, a single-file checkpoint (A1111's,
    CivitAI's) as the diffusers folder diffusers makes of it; "" for any other file."""
    from safetensors import SafetensorError, safe_open

    if file.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        return ""
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, "pt") as weights:
                names = weights.keys()
        except (OSError, SafetensorError):
            return ""
        if any("lora" in name for name in names):
            return f"it is a LoRA file: {LORA_HINT}"
    return (f"it is a single-file checkpoint: make a diffusers folder of it, e.g. StableDiffusionPipeline.from_single_file(\"{file}\")"
            ".save_pretrained(FOLDER) (StableDiffusionXLPipeline for SDXL), and give that folder")


# The class a pipeline's diffusers component folder holds (its config.json's `_class_name`), and the `model_type` of its
# text encoders' config.json, as `load_diffusion_model` loads them
COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "transformer": "PixArtTransformer2DModel"}
TEXT_ENCODER_TYPES = {"clip": "clip_text_model", "t5": "t5"}
# A tokenizer folder holds at least one of these (a fast tokenizer's, CLIP's BPE vocabulary, T5's sentencepiece model);
# without one, transformers makes an empty tokenizer that fails only when a prompt is encoded
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


def transformer_patch_size(config: Mapping | None) -> int:
    """The latent patch a denoising transformer of `config` cuts its input into (PixArt-α: 2), 1 where the config gives
    none; 1 for None, a model without a transformer (a UNet's latents are not cut). `config`: the loaded network's
    (`DiffusionModel.patch_size`) or its transformer/config.json read before any weights load (`model_json`: `lcm cache
    --resolution`), the one rule for both."""
    return int((config or {}).get("patch_size") or 1)


def model_json(name: str, relative: str) -> dict | None:
    """The JSON object in file `relative` of the model `name`: in its folder, or in a hub id's snapshot (online, that file
    downloaded first); None where there is none to read, for a check made before the model loads."""
    try:
        folder = hub_snapshot(name, "the configs of", (relative,), ()) if looks_like_hub_id(name) else Path(name)
        value = json.loads((folder / relative).read_text(encoding="utf-8"))
    except (UserError, OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`, a file of a model folder (`what` says which, for the message); a UserError when it is
    missing, not JSON or not an object."""
    if not path.is_file():
        raise UserError(f"{path} is missing; {what} needs it: give a complete diffusers folder")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {what} needs it: save the folder again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not the object {what} needs: save the folder again")
    return value


def _check_components(path: str, index: dict, pixart: bool) -> None:
    """Every component folder a pipeline folder's model_index.json names and `load_diffusion_model` loads is there, with a
    config that is a JSON object naming the class loaded from it (a tokenizer: its vocabulary), before any weights load."""
    if index.get("requires_aesthetics_score"):  # with or without the base's first text encoder beside it: its UNet reads 5 time ids
        first = "no first text encoder; " if (index.get("text_encoder") or [None])[0] is None else ""
        raise UserError(f"{path} is an SDXL refiner ({first}aesthetic-score micro-conditioning): it refines the "
                        "base model's images and is no text-to-image teacher or LCM; give the SDXL base model")
    names = ["transformer" if pixart else "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    names += [n for n in ("text_encoder_2", "tokenizer_2") if (index.get(n) or [None])[0] is not None]
    for name in names:
        folder = Path(path) / name
        if not folder.is_dir() or not any(folder.iterdir()):
            state = "is empty" if folder.is_dir() else "is missing"
            raise UserError(f"the {name}/ folder of {path} {state}; its model_index.json needs it: give a complete folder saved by "
                            "save_pretrained or by `lcm distill`")
        kind = name.removesuffix("_2")
        if kind == "tokenizer":
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                raise UserError(f"{folder} holds no tokenizer vocabulary (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer there again")
            continue
        config = read_json_object(folder / ("scheduler_config.json" if kind == "scheduler" else "config.json"), f"its {name}")
        expected = COMPONENT_CLASSES.get(kind)
        if expected and config.get("_class_name", expected) != expected:
            raise UserError(f"{folder}/config.json names the class {config['_class_name']}, not the {expected} a pipeline's {name}/ "
                            f"holds; put the model's {name} there")
        expected = TEXT_ENCODER_TYPES["t5" if pixart and name == "text_encoder" else "clip"] if kind == "text_encoder" else None
        if expected and config.get("model_type", expected) != expected:
            raise UserError(f"{folder}/config.json is a {config['model_type']} model's, not the {expected} text encoder this pipeline "
                            f"needs in {name}/; put the model's own text encoder there")


def guidance_record_of(name_or_path: str) -> GuidanceRecord | None:
    """The guidance record (`guidance_record`) beside a model's weights: in its folder, or in a hub id's snapshot (online,
    downloaded first: the record alone, for a config resolved before the model loads); None where there is none, or for a
    hub id that cannot be had (its loader says why)."""
    if not looks_like_hub_id(name_or_path):
        return read_record(name_or_path)
    try:
        return read_record(hub_snapshot(name_or_path, "the guidance record of", (RECORD,), ()))
    except UserError:
        return None


def model_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of a model folder whose names end in `suffixes`, sorted (or the file itself, given a file), through
    symlinked folders too: a folder assembled of links (a pipeline whose unet/ links to another, a hub cache's snapshot)
    holds the files its loader reads through them. A link back to a folder above is not walked again."""
    if path.is_file():
        return [path]
    files, seen = [], set()
    for folder, subfolders, names in os.walk(path, followlinks=True):
        if os.path.realpath(folder) in seen:
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        files += [Path(folder) / name for name in names if name.endswith(suffixes) and (Path(folder) / name).is_file()]
    return sorted(files)


def load_component(cls, name_or_path: str, subfolder: str, **kwargs):
    """`cls.from_pretrained` of one weighted component of a model folder (a UNet, VAE, transformer or text encoder), with a
    UserError naming the component when its files do not load (truncated or corrupt weights, a config that does not fit
    them) or when its weights and its config.json's model do not hold the same tensors: a missing one would be left
    uninitialised, an unexpected one dropped (diffusers and transformers only log a warning), either way the weights are
    another model's. Keys a library drops by design (`_keys_to_ignore_on_load_unexpected`) are not reported to us."""
    from safetensors import SafetensorError

    config = Path(name_or_path) / subfolder / "config.json"
    if config.is_file():  # diffusers would take a config that is not a JSON object for a hub id to download
        read_json_object(config, f"its {subfolder}")
    try:
        with _diffusers_errors_unlogged():  # diffusers logs a missing weights file as well as raising it
            model, info = cls.from_pretrained(name_or_path, subfolder=subfolder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # RuntimeError: transformers' size mismatches
        hint = weights_hint(Path(name_or_path) / subfolder, "DiffusionPipeline") if isinstance(err, OSError) else ""
        raise UserError(f"cannot load the {subfolder} of {name_or_path}: {hint or first_line(err)}") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"the {subfolder} weights of {name_or_path} lack {len(missing)} tensor(s) that its config.json's model has "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the weights and config.json are of "
                        "different models; save the folder again")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise UserError(f"the {subfolder} weights of {name_or_path} hold {len(unexpected)} tensor(s) that its config.json's model "
                        f"does not have (e.g. {unexpected[0]}): the weights and config.json are of different models; save the "
                        "folder again")
    return model


def _load_tokenizer(cls, name_or_path: str, subfolder: str):
    """`cls.from_pretrained` of a model folder's tokenizer, with a UserError naming it when its files do not load."""
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the {subfolder} of {name_or_path}: {first_line(err)}") from err


def cast(module, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """`module` moved to `device` and cast to `dtype`, as `module.to` does: diffusers' `ModelMixin.to` (0.42) warns at every
    dtype cast that the model has modules "that should be kept in float32: []" and that the cast "can lead to inconsistent
    results", also for a model that keeps none (every UNet, VAE and transformer we load), which a Python caller then read
    at each load of a LoRA or fp16 model. Such a model is cast as torch casts it; one that keeps modules in float32, by
    its own `to`."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def restore_frozen_parts_in_float32(model: DiffusionModel) -> None:
    """The VAE and text encoders back in float32, with the weights the model's folder holds: where mixed precision ran
    them in half precision (`training.objectives.freeze_in_half_precision`), they are read again from `model.source`,
    since casting the rounded weights back would export another decoder and text encoder than the model's."""
    parts = {"vae": model.vae, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    folder = check_hub_id(model.source, "a diffusers model from")
    for subfolder, module in parts.items():
        if module is None or module.dtype == torch.float32:
            continue
        cast(module, dtype=torch.float32)
        module.load_state_dict(load_component(type(module), folder, subfolder, torch_dtype=torch.float32, use_safetensors=True).state_dict())


def check_dtype(dtype) -> None:
    """The weights' dtype is a floating-point torch.dtype: diffusers would load a model asked for in "float16" (a string) in
    float32, with only a logged warning, and one in torch.int8 fail in its first component."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"dtype must be a floating-point torch.dtype such as torch.float32, torch.float16 or torch.bfloat16, "
                        f"got {dtype!r}")


def load_diffusion_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """A text-to-image latent diffusion model and its scheduler config from a diffusers folder or hub id.

    Works for Stable Diffusion 1.x/2.x folders (ε- or v-prediction, read from the scheduler config), SDXL-family folders
    (`StableDiffusionXLPipeline`: a second text encoder and tokenizer), LCM folders of either (a UNet with
    `time_cond_proj_dim`), and PixArt-α folders (`PixArtAlphaPipeline`: a transformer/ and a T5 text encoder, no unet/;
    PixArt-LCM's too, an LCMScheduler config). Only safetensors weights are accepted. An SDXL VAE that asks to be upcast
    (it overflows in float16) stays in float32 (`DiffusionModel.upcasts_vae`). The folder's components (a hub id's: its
    snapshot's, `check_hub_id`) are checked before any weights load (`_check_components`).
    """
    device = resolve_device(device, "device")  # "cuda" on a machine without one is a one-line error here, not torch's assertion later
    check_dtype(dtype)
    name_or_path = given_name(name_or_path, "a diffusers model from")  # a pathlib.Path as its text (`~` expanded): the model's `source`
    folder, index, pixart, scheduler_config = _read_pipeline_folder(name_or_path)
    subfolder, network = _network_class(pixart)
    model = _load_parts(name_or_path, folder, index, pixart, scheduler_config, dtype,
                        lambda: load_component(network, folder, subfolder, torch_dtype=dtype, use_safetensors=True))
    return model.to(device)


def load_latent_and_prompt_encoders(
    name_or_path: str, device: str | torch.device = "cpu"
) -> tuple[LatentCodec, CLIPPromptEncoder | SDXLPromptEncoder | T5PromptEncoder, int]:
    """The encoders of the model `name_or_path` in float32, its VAE as a `LatentCodec` and its prompt encoder
    (`DiffusionModel.prompts`), and its native size (px), without its denoising network's weights: all that a full latent
    cache needs (`lcm cache`), where loading the whole model read SD 1.5's UNet (3.4 GB in float32) or SDXL's (10 GB) to
    leave it unused. The folder is checked, and its VAE, text encoder(s) and tokenizer(s) loaded, as `load_diffusion_model`
    checks and loads them, so the latents and text embeddings are the whole model's; the network is made from its config
    alone (`_network_without_weights`), which gives what the prompt encoder and the checks read of it: SDXL's pooled
    embedding and micro-conditioning, PixArt-α's additional conditions, the width the text encoders must make, the sample
    size. Of a hub id, the network's weights are not downloaded either."""
    device = resolve_device(device, "device")
    name_or_path = given_name(name_or_path, "a diffusers model from")
    folder, index, pixart, scheduler_config = _read_pipeline_folder(name_or_path, ("vae", "text_encoder", "text_encoder_2"))
    subfolder, network = _network_class(pixart)
    model = _load_parts(name_or_path, folder, index, pixart, scheduler_config, torch.float32,
                        lambda: _network_without_weights(network, folder, subfolder))
    for module in (model.vae, *model.text_encoders):
        module.to(device)
    return model.codec, model.prompts, model.native_size


def _load_parts(name_or_path: str, folder: str, index: dict, pixart: bool, scheduler_config: dict, dtype: torch.dtype,
                load_network: Callable[[], Any]) -> DiffusionModel:
    """The model `name_or_path` (read from `folder`, its model_index.json `index`: `_read_pipeline_folder`) in `dtype` on the
    CPU, frozen, its parts checked to fit together (`_check_parts_fit`); its denoising network is what `load_network()` gives."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    kwargs = dict(torch_dtype=dtype, use_safetensors=True)
    try:
        vae = load_component(AutoencoderKL, folder, "vae", **kwargs)
        unet = load_network()
        if pixart:
            text_encoder = load_component(T5EncoderModel, folder, "text_encoder", **kwargs)
            tokenizer = _load_tokenizer(AutoTokenizer, folder, "tokenizer")
        else:
            text_encoder = load_component(CLIPTextModel, folder, "text_encoder", **kwargs)
            tokenizer = _load_tokenizer(CLIPTokenizer, folder, "tokenizer")
        second = {}
        if (index.get("text_encoder_2") or [None])[0] is not None:
            second = dict(text_encoder_2=load_component(CLIPTextModelWithProjection, folder, "text_encoder_2", **kwargs),
                          tokenizer_2=_load_tokenizer(CLIPTokenizer, folder, "tokenizer_2"),
                          force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a diffusers model from {name_or_path}: {first_line(err)}") from err
    model = DiffusionModel(unet, vae, text_encoder, tokenizer, scheduler_config, source=name_or_path, **second)
    if dtype == torch.float16 and model.upcasts_vae:
        cast(vae, dtype=torch.float32)
    if model.is_sdxl != bool(second):
        raise UserError(f"{name_or_path}: its UNet {'takes' if model.is_sdxl else 'does not take'} SDXL's pooled text embedding but the "
                        f"folder has {'no' if model.is_sdxl else 'a'} second text encoder; give a complete StableDiffusion(XL)Pipeline folder")
    _check_parts_fit(model)
    for module in (unet, vae, *model.text_encoders):
        module.requires_grad_(False).eval()
    return model


def _network_class(pixart: bool) -> tuple[str, type]:
    """The subfolder and diffusers class of a pipeline folder's denoising network: PixArt-α's transformer, else a UNet."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    return ("transformer", PixArtTransformer2DModel) if pixart else ("unet", UNet2DConditionModel)


def _network_without_weights(cls, folder: str, subfolder: str):
    """The `cls` network of `folder`/`subfolder` made from its config.json on the meta device: its config and attributes
    as loading gives them, no weights read and no memory taken (SDXL's UNet in 0.3 s). It cannot run: only what a
    model's encoders read of their network (`load_latent_and_prompt_encoders`) is asked of it."""
    with torch.device("meta"):
        return cls.from_config(cls.load_config(folder, subfolder=subfolder))


def _read_pipeline_folder(name_or_path: str, weights: tuple[str, ...] = PIPELINE_WEIGHTS) -> tuple[str, dict, bool, dict]:
    """Where the model `name_or_path` is read from (the folder, or a hub id's snapshot in the cache, downloaded first when
    online with the weights of the components `weights`: `check_hub_id`), its model_index.json, whether it is PixArt-α,
    and its scheduler config: all checked before any weights load, since what they say may refuse the model
    (`_check_components`, `_check_terminal_prediction`)."""
    from diffusers import DiffusionPipeline

    folder = check_hub_id(name_or_path, "a diffusers model from", pipeline_files(weights))
    _check_model_folder(folder, name_or_path)
    read_json_object(Path(folder) / "model_index.json", "a pipeline folder")
    try:
        index = dict(DiffusionPipeline.load_config(folder))
        pixart = _is_pixart(name_or_path, index)
        _check_components(folder, index, pixart)
        scheduler_config = _read_scheduler_config(name_or_path, folder)
        _check_terminal_prediction(name_or_path, scheduler_config)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a diffusers model from {name_or_path}: {first_line(err)}") from err
    return folder, index, pixart, scheduler_config


def load_latent_codec(name_or_path: str, device: str | torch.device = "cpu") -> tuple[LatentCodec, int]:
    """The VAE of the model `name_or_path` in float32 as its `LatentCodec`, and the model's native size (px), without its
    denoising network's or text encoders' weights: all that a captions-only latent cache needs (`lcm cache
    --captions-only`), where loading the whole model took SD 1.5's UNet and text encoder (3.9 GB more in float32) and
    PixArt-α's T5-XXL (19 GB) to leave them unused. The folder is checked as `load_diffusion_model` checks it and the VAE
    loaded as it loads it, so the latents are the whole model's; the size comes from the denoising network's config, which
    must take the VAE's latents (`_check_latent_channels`). Of a hub id, only the VAE's weights are downloaded."""
    from diffusers import AutoencoderKL

    device = resolve_device(device, "device")
    name_or_path = given_name(name_or_path, "a diffusers model from")
    folder, _, pixart, _ = _read_pipeline_folder(name_or_path, ("vae",))
    name, network = _network_class(pixart)
    try:
        config = _config_with_defaults(network, folder, name)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a diffusers model from {name_or_path}: {first_line(err)}") from err
    vae = load_component(AutoencoderKL, folder, "vae", torch_dtype=torch.float32, use_safetensors=True)
    codec = LatentCodec(vae.requires_grad_(False).eval().to(device))
    _check_latent_channels(name_or_path, codec, config, name)
    return codec, int(config["sample_size"]) * codec.downsampling_factor


def _config_with_defaults(cls, folder: str, subfolder: str) -> dict:
    """The config of the `cls` model in `folder`/`subfolder` as loading it makes it, its weights left on disk: the
    config.json's keys over the defaults of `cls`'s arguments (a key the file leaves out takes its default)."""
    import inspect

    parameters = inspect.signature(cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    return defaults | dict(cls.load_config(folder, subfolder=subfolder))


def _check_latent_channels(source: str, codec: LatentCodec, config, name: str) -> None:
    """The denoising network `name` (its `config`) of the model `source` takes the latents its VAE makes."""
    if codec.latent_channels != int(config["in_channels"]):
        raise UserError(f"{source}: its vae makes {codec.latent_channels}-channel latents, but its {name} takes "
                        f"{config['in_channels']}-channel ones: parts of different models (or an inpainting or depth {name}, which takes more "
                        f"than latents and is not supported here); put the vae of the {name}'s model in vae/")
    _check_latent_statistics(source, codec)


def _check_latent_statistics(source: str, codec: LatentCodec) -> None:
    """The VAE config's `latents_mean` and `latents_std` (`LatentCodec`), where it gives both, hold one value per latent
    channel: else they would fail to broadcast only when the first image is decoded."""
    for key, values in (("latents_mean", codec.latents_mean), ("latents_std", codec.latents_std)):
        if values is not None and tuple(values.shape) != (codec.latent_channels,):
            raise UserError(f"{source}: its vae config's {key} is {values.tolist()}, not one number for each of its "
                            f"{codec.latent_channels} latent channels; give the values its latents were standardised with")


def _check_parts_fit(model: DiffusionModel) -> None:
    """The parts of a pipeline folder are of one model: the VAE makes the latents the denoising network takes, and the text
    encoder(s) make embeddings as wide as it attends to (an SDXL UNet: the two side by side) and the pooled embedding it takes,
    of the tokens their tokenizers make. Parts of another family (SD3's
    16-channel VAE, SD 2's text encoder on SD 1.5) would fail only when the first image is made, after the output folder."""
    config, name = model.unet.config, "transformer" if model.is_transformer else "unet"
    _check_latent_channels(model.source, model.codec, config, name)
    width = config.get("caption_channels") if model.is_transformer else config.get("encoder_hid_dim") or config.get("cross_attention_dim")
    made = sum(int(encoder.config.hidden_size) for encoder in model.text_encoders)
    if isinstance(width, int) and made != width:
        encoders = " and ".join(f"{int(e.config.hidden_size)}-wide" for e in model.text_encoders)
        raise UserError(f"{model.source}: its text encoder(s) make {encoders} embeddings, but its {name} takes {width}-wide ones: "
                        f"parts of different models; put the text encoder(s) of the {name}'s model in the folder")
    for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
        if encoder is not None and len(tokenizer) > int(encoder.config.vocab_size):
            raise UserError(f"{model.source}: a tokenizer of {len(tokenizer)} tokens goes with a text encoder of {encoder.config.vocab_size}: "
                            "parts of different models; put the tokenizer of the text encoder's model beside it")
    added = AddedConditioning.of_unet(config)
    pooled = model.text_encoder_2.config.projection_dim if added is not None and model.text_encoder_2 is not None else None
    if pooled is not None and int(pooled) != added.pooled_dim:
        raise UserError(f"{model.source}: its text_encoder_2 makes {pooled}-wide pooled embeddings, but its unet takes {added.pooled_dim}-wide "
                        "ones: parts of different models; put the second text encoder of the unet's model in text_encoder_2/")


def _is_pixart(name_or_path: str, index: dict) -> bool:
    """A pipeline index that names a transformer and no UNet: a PixArt-α pipeline, the one transformer family loaded here."""
    if (index.get("unet") or [None])[0] is not None or (index.get("transformer") or [None])[0] is None:
        return False
    if index.get("_class_name") != "PixArtAlphaPipeline":
        raise UserError(f"{name_or_path} is a {index.get('_class_name')} folder; of the transformer pipelines only PixArtAlphaPipeline "
                        "(PixArt-α, PixArt-LCM) is supported")
    return True


def _read_scheduler_config(name_or_path: str, folder: str) -> dict:
    """The scheduler config of the model `name_or_path`, read from `folder` (`check_hub_id`), with its class's defaults
    and a progressively distilled model's step count; refused where it describes a noise process not sampled here."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler"))
    _check_noise_schedule(name_or_path, config.get("_class_name"))
    config = _schedule_defaults(config.get("_class_name")) | config
    if config.get("timestep_type") == "continuous" and prediction_type_of(config) == "v_prediction":
        raise UserError(f"{name_or_path}: its scheduler config says timestep_type \"continuous\" with v-prediction: the network takes "
                        "0.25·log σ_t as its time input (EDM's c_noise, as in CosXL), not the integer timestep t this library gives it; "
                        "give a model trained on discrete timesteps")
    progressive = Path(folder) / PROGRESSIVE_FILE
    extra = read_json_object(progressive, "a progressively distilled model") if progressive.is_file() else {}
    return {k: v for k, v in config.items() if not k.startswith("_")} | extra | {"_class_name": config.get("_class_name")}


def _check_terminal_prediction(name_or_path: str, scheduler_config: dict) -> None:
    """A UserError for a model that predicts ε on a schedule ending at zero SNR (`NoiseSchedule.ends_at_zero_snr`: the flag
    rescale_betas_zero_snr, or trained betas ending at β = 1): at t = T-1 it gives no x̂0 (diffusers' schedulers divide by α
    = 0 there, with no defined result), so every command refuses it when it loads, before any weights."""
    if prediction_type_of(scheduler_config) != "epsilon" or not NoiseSchedule.from_config(scheduler_config).ends_at_zero_snr:
        return
    how = "rescale_betas_zero_snr" if scheduler_config.get("rescale_betas_zero_snr") else "its betas end at β = 1"
    raise UserError(f"{name_or_path} predicts ε on a zero-terminal-SNR schedule ({how}), where ε says nothing about the image at "
                    "t = T-1 (x̂0 = (z - σ·ε̂)/α with α = 0: its first step makes NaN or noise); such models predict v (Lin et al. 2024): "
                    "set its scheduler config to what it was trained with (prediction_type \"v_prediction\")")


# What a scheduler config says about the noise process and, for an LCM, its timesteps. A config that leaves one out means its
# class's default, as diffusers reads it: DDIM, PNDM, Euler and DPM-Solver default to linear betas 0.0001..0.02, LCMScheduler to
# scaled_linear 0.00085..0.012 (NoiseSchedule's defaults) and original_inference_steps 50. Other keys (timestep_spacing) are left
# out as diffusers' from_config leaves them out: a scheduler made from the config takes its own default.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
                 "prediction_type", "original_inference_steps", "timestep_scaling")


def _schedule_defaults(class_name: str | None) -> dict:
    """The defaults of `SCHEDULE_KEYS` of the diffusers scheduler class a config names (none for a class diffusers has not)."""
    import inspect

    import diffusers

    scheduler = getattr(diffusers, class_name or "", None)
    if not inspect.isclass(scheduler):
        return {}
    parameters = inspect.signature(scheduler.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.name in SCHEDULE_KEYS and p.default is not p.empty}


def _check_noise_schedule(name_or_path: str, class_name: str | None) -> None:
    """A scheduler config of a diffusers class without a beta schedule (a flow-matching one, SD3's and FLUX's, or an EDM
    one) describes another noise process than the α_t, σ_t of `NoiseSchedule`: refused, rather than sampled with SD's
    default betas. A class diffusers does not have (or has only as a placeholder for a missing dependency, which takes any
    arguments) is left to the config's keys."""
    import inspect

    import diffusers

    scheduler = getattr(diffusers, class_name or "", None)
    if not inspect.isclass(scheduler):
        return
    parameters = inspect.signature(scheduler.__init__).parameters.values()
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)
    if not variadic and "beta_schedule" not in [p.name for p in parameters]:
        raise UserError(f"{name_or_path}: its scheduler, {class_name}, has no beta schedule: the model was trained on another "
                        "noise schedule than the DDPM-type α_t, σ_t this library samples (flow matching: SD3, FLUX; EDM: Playground "
                        "v2.5); give a Stable Diffusion, SDXL or PixArt-α model")


def make_student_unet(teacher_unet, time_cond_proj_dim: int = DEFAULT_TIME_COND_PROJ_DIM):
    """The student θ: the teacher's UNet with a guidance-scale input ω (Section 4.2).

    The UNet gets `time_cond_proj_dim`, a linear projection of the ω embedding added to the time
    embedding. That projection starts at zero, so the student starts as the teacher exactly.
    """
    from diffusers import UNet2DConditionModel

    # Private keys ("_use_default_values" among them) would make from_config ignore the new setting.
    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = time_cond_proj_dim
    with torch.device(teacher_unet.device):  # initialised where the teacher is (an SDXL UNet is 2.6 B parameters)
        student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise UserError(f"teacher UNet does not fit a student UNet: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return cast(student, teacher_unet.device, teacher_unet.dtype)


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


def save_pipeline(out_dir: str | Path, unet, base: DiffusionModel, scheduler_config: dict) -> Path:
    """Write `unet` with `base`'s VAE and text encoder(s) as the diffusers pipeline folder of base's family (safetensors, no
    safety checker or watermarker): an LCMScheduler config (an LCM) makes a `LatentConsistencyModelPipeline` (SD 1.x/2.x) or
    a `StableDiffusionXLPipeline` with an LCMScheduler (the SDXL family, as diffusers loads LCM-SDXL); any other a
    `StableDiffusion(XL)Pipeline` with a DDIM scheduler. A PixArt-α model's is a `PixArtAlphaPipeline` with the one
    scheduler or the other (PixArt-LCM's is one with an LCMScheduler); `unet` is then its transformer.

    A model saved as it was loaded (`unet` is base's own network: an LCM saved again, or with its LoRAs fused) keeps its
    guidance record (`guidance.json`, the range and default g it was distilled with): without it, loaded again, it would
    sample at its kind's default g. Another network (a student) gets none here: its run writes its own."""
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        PixArtAlphaPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    _check_no_adapters({"unet": unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2})
    # a progressive round's step count goes to PROGRESSIVE_FILE: in the scheduler's config diffusers warns of it at every load
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_") and k != PROGRESSIVE_STEPS}
    lcm = is_lcm_config(scheduler_config)
    scheduler = LCMScheduler.from_config(config) if lcm else DDIMScheduler.from_config(config)
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=scheduler)
    if base.is_transformer:
        parts["transformer"] = parts.pop("unet")
        pipe = PixArtAlphaPipeline(**parts)
    elif base.is_sdxl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                                         force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        family = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
        pipe = family(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if unet is base.unet and base.guidance_record is not None:
        write_record(Path(out_dir), base.guidance_record)
    if PROGRESSIVE_STEPS in scheduler_config:
        (Path(out_dir) / PROGRESSIVE_FILE).write_text(json.dumps({PROGRESSIVE_STEPS: scheduler_config[PROGRESSIVE_STEPS]}))
    return permit_as_umask(out_dir)  # safetensors writes the weights readable by their owner alone


def _check_no_adapters(networks: dict) -> None:
    """No network to be saved in a pipeline folder carries LoRA adapters: peft's layers would be saved under their own names
    (`to_q.base_layer.weight`, `to_q.lora_A.<adapter>.weight`), which no diffusers loader reads back as the model's layers."""
    for name, network in networks.items():
        adapters = list(getattr(network, "peft_config", None) or {})
        if adapters:
            how = ("unet.fuse_lora(); unet.unload_lora()" if name == "unet" else
                   f"a diffusers pipeline's fuse_lora(components=[\"{name}\"]); unload_lora_weights()")
            raise UserError(f"the {name} carries LoRA adapters ({', '.join(adapters)}), which a pipeline folder does not hold: fuse them "
                            f"into its weights first ({how}), or save the LoRA on its own")


def save_diffusion_pipeline(out_dir: str | Path, unet, vae, text_encoder, tokenizer, scheduler_config: dict) -> Path:
    """Write a diffusers `StableDiffusionPipeline` folder with a DDIM scheduler from its parts (`save_pipeline`)."""
    return save_pipeline(out_dir, unet, DiffusionModel(unet, vae, text_encoder, tokenizer, scheduler_config, source=""), scheduler_config)


def save_lcm_pipeline(out_dir: str | Path, student_unet, base: DiffusionModel, scheduler_config: dict) -> Path:
    """Write a complete diffusers LCM pipeline folder (`save_pipeline`) for a student with an ω input, or a PixArt-α
    transformer (which has none: its guidance scale was fixed in distillation, as PixArt-LCM's)."""
    if student_unet.config.get("time_cond_proj_dim") is None and not is_transformer(student_unet):
        raise UserError("the UNet has no guidance input (time_cond_proj_dim); make it with make_student_unet")
    if not is_lcm_config(scheduler_config):
        raise ValueError("an LCM pipeline needs an LCMScheduler config (lcm_scheduler_config)")
    return save_pipeline(out_dir, student_unet, base, scheduler_config)


def lora_pipeline_class(model: DiffusionModel):
    """The diffusers pipeline class whose LoRA loader and saver fit this model's family (PixArtAlphaPipeline has none)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_transformer:
        # `lcm distill` and `lcm finetune` both ask here: the advice fits either
        raise UserError(f"{model.source} is a PixArt-α model; diffusers' PixArtAlphaPipeline cannot load LoRA weights: train the whole "
                        "transformer (leave --adapter lora out)")

    return StableDiffusionXLPipeline if model.is_sdxl else StableDiffusionPipeline


class NotAnLCM(UserError):
    """A diffusion model (a teacher: no ω input, no LCMScheduler) given where an LCM is loaded. Its message says how to make an
    LCM of it; a command that can also sample it as it is (`lcm generate --sampler`) adds that."""


def load_lcm(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load an LCM in diffusers format (ours, any LatentConsistencyModelPipeline folder, or a pipeline folder with an
    LCMScheduler: LCM-SDXL, PixArt-LCM).

    A plain diffusion model cannot run as an LCM: that is a user error, with a hint at what to do instead. An LCM without
    an ω input (PixArt-LCM: its guidance scale was fixed in distillation) samples as an LCM-LoRA does.
    """
    model = load_diffusion_model(name_or_path, dtype=dtype, device=device)
    if model.is_transformer and not model.is_lcm:  # no ω input and no LoRA loader: the hint below would send it to --lora
        raise NotAnLCM(f"{name_or_path} is a PixArt-α diffusion model (its scheduler is no LCMScheduler), not an LCM; distil it first with "
                       f"`lcm distill --teacher {name_or_path} --guidance-scale-min 4.5 --guidance-scale-max 4.5` (one guidance scale: "
                       "a PixArt transformer has no ω input, and PixArtAlphaPipeline loads no LCM-LoRA)")
    if model.time_cond_proj_dim is None and not model.is_lcm:
        raise NotAnLCM(
            f"{name_or_path} is a diffusion model without the guidance input of an LCM "
            "(its UNet has no time_cond_proj_dim); distil it first with `lcm distill --teacher ...`, or load its LCM-LoRA (--lora)"
        )
    if not model.is_lcm:
        raise UserError(f"{name_or_path} is a guidance-distilled diffusion model (ω input, no LCMScheduler), not an LCM; sample it with "
                        "an ODE solver (`lcm generate --sampler ddim`), or distil it into an LCM with `lcm distill --teacher ...`")
    if model.time_cond_proj_dim is not None:
        model.guidance_record = guidance_record_of(model.source)  # the name as read (`~` expanded)
    return model


@contextlib.contextmanager
def _diffusers_errors_unlogged():
    """diffusers' logged errors off for the duration (its warnings stay): for a load whose failure is raised, and said, here."""
    import logging

    handlers = logging.getLogger("diffusers").handlers

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    for handler in handlers:
        handler.addFilter(below_error)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(below_error)


@contextlib.contextmanager
def _beside_other_adapters():
    """peft's warning that a network already has adapters ("Already found a `peft_config` attribute in the model. This will
    lead to having multiple adapters ...") off for the duration, and no other warning: a style LoRA goes beside the LCM's
    adapters on purpose (`add_style_loras`), and the CLI's output is one line per thing, not a library's warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model", category=UserWarning)
        yield


@contextlib.contextmanager
def _warnings_unless_refused():
    """The warnings of the block shown after it only if it ends without an exception: a LoRA that does not fit makes peft
    warn first (a RuntimeWarning listing every module of the LoRA the model lacks; a UserWarning that the adapter was
    deleted), and the refusal raised here says it in one line (DESIGN.md: one line, no traceback). A load that succeeds
    shows its warnings as it would have."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno, source=warning.source)


def _unloaded_lora_tensors(state_dict: dict, components: dict, adapter_name: str | None = None) -> list[str]:
    """The keys of a LoRA state dict (`lora_state_dict`'s, "<component>.<module>...") that did not load into the model's
    `components` (by name: "unet", "text_encoder", ...) with their shape, in order. diffusers loads a LoRA's layers for
    which the model has a module and only logs the rest (`_maybe_warn_for_unhandled_keys`); a tensor whose component the
    model lacks is not even logged. Each key is mapped as diffusers maps it before loading (`PeftAdapterMixin.load_lora_adapter`,
    `_load_lora_into_text_encoder`) and looked up in the adapter's state dict (`adapter_name`'s, else the last loaded) as peft
    reads it back."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    unmatched = [key for key in state_dict if key.split(".")[0] not in components]
    for name, module in components.items():
        keys = [key for key in state_dict if key.startswith(f"{name}.")]
        if not keys:
            continue
        part = {key.removeprefix(f"{name}."): state_dict[key] for key in keys}
        if name == "unet":
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(module, "text_model"):
                part = {key.removeprefix("text_model."): value for key, value in part.items()}
        adapters = list(getattr(module, "peft_config", {}))
        adapter = adapter_name or (adapters[-1] if adapters else None)
        loaded = get_peft_model_state_dict(module, adapter_name=adapter) if adapter in adapters else {}
        if len(part) != len(keys):  # two keys mapped onto one: name them as mapped
            keys = [f"{name}.{key}" for key in part]
        unmatched += [original for original, (key, value) in zip(keys, part.items())
                      if key not in loaded or loaded[key].shape != value.shape]
    return unmatched


LORA_SCHEDULER_FILE = "scheduler_config.json"  # the LCMScheduler config `lcm distill --adapter lora` saves next to the weights
# The title of the card (README.md) beside LoRA adapters distilled (or fine-tuned) on a base without an ω input: an LCM-LoRA,
# made against its teacher's weights (`training.model_card`'s); those fine-tuned on an LCM are "LoRA for the LCM ..."
LCM_LORA_TITLE = "# LCM-LoRA for "
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the weights file of a LoRA folder, as diffusers' `save_lora_weights` names it
# A PEFT adapter folder, as peft's `save_pretrained` writes one: its LoraConfig and its weights, keyed "base_model.model.<module>"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, PEFT_KEY_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
# The components a pipeline's LoRA file names its tensors by (`save_lora_weights`)
LORA_COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
# The keys of a LoRA folder's scheduler config that are the model's to say, not the LoRA's: its noise schedule and what it predicts
LORA_MODEL_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
                            "prediction_type")


# The first bytes of what torch.save writes: a zip archive (torch >= 1.6), or a pickle (protocol 2-5) in the legacy format
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _pickled_lora(path: Path) -> Path | None:
    """The pickled weights file a local LoRA is (a pickle by its suffix or first bytes, `_is_pickle`, that is no safetensors
    file, `_holds_safetensors`) or holds in place of safetensors weights (a folder); None for any other."""
    if path.is_file():
        return path if _is_pickle(path) and not _holds_safetensors(path) else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    return next((f for f in sorted(path.iterdir()) if f.name.endswith(PICKLE_SUFFIXES)), None)


def _holds_safetensors(path: Path) -> bool:
    """Whether the file `path` is a safetensors file by its content, whatever its name: `--style-lora s.safetensors:0.5`
    names a file of that very name where one exists, which was refused as "a PyTorch pickle" by its suffix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return True
    except (OSError, SafetensorError):
        return False


def _is_pickle(path: Path) -> bool:
    """Whether the file `path` is a PyTorch pickle: by its suffix (`hub.PICKLE_SUFFIXES`) or by its first bytes
    (`PICKLE_MAGIC`), so that a pickle named `style.safetensors:0.5` is one and a README.md or a .json is not."""
    if path.name.endswith(PICKLE_SUFFIXES):
        return True
    try:
        with path.open("rb") as file:
            return file.read(4).startswith(PICKLE_MAGIC)
    except OSError:  # unreadable: not known to be one
        return False


@contextlib.contextmanager
def _safetensors_named(path: Path) -> Iterator[Path]:
    """`path`, or, for a safetensors file named otherwise (`s.safetensors:0.5`), a link to it named LORA_WEIGHTS_FILE in a
    temporary folder: diffusers goes by the name, and unpickled such a file (a failure, under `weights_only`)."""
    if not path.is_file() or path.suffix == ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lcm-lora-") as folder:
        link = Path(folder) / LORA_WEIGHTS_FILE
        link.symlink_to(path.resolve())
        yield link


def _check_lora_path(path: Path, lora: str) -> None:
    """A local LoRA is a LoRA's safetensors file or folder: a pickled one, a pipeline folder or a training run is refused
    with what to give instead."""
    pickle = _pickled_lora(path)
    if pickle is not None:
        what = "is" if path.is_file() else "holds its weights only as"
        raise UserError(f"the LoRA {lora} {what} {pickle.name}, a PyTorch pickle, which is not loaded here (models are safetensors files); "
                        f"convert it: safetensors.torch.save_file(torch.load(\"{pickle.name}\"), \"{LORA_WEIGHTS_FILE}\")")
    if path.is_file() and path.suffix != ".safetensors" and not _holds_safetensors(path):
        raise UserError(f"the LoRA {lora} is not a LoRA weights file (give the lora/ folder or its .safetensors)")
    if (path / "model_index.json").is_file():
        raise UserError(f"the LoRA {lora} is a diffusers pipeline folder, not a LoRA: give it as --model (an LCM samples without --lora)")
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir() and (path / "lora").is_dir():
        raise UserError(f"the LoRA {lora} is a training run: give the LoRA it exported, {path / 'lora'}")
    checkpoint = path.parent if path.is_file() else path
    if (checkpoint / "state.json").is_file() and (checkpoint / "student.safetensors").is_file():
        raise UserError(f"the LoRA {lora} is a training checkpoint, whose student weights are not a LoRA file (no unet. prefix, no adapter "
                        f"config): give the LoRA its run exported, {checkpoint.parent.parent / 'lora'} (`--resume` the run to finish it)")


def _one_networks_lora(state_dict: dict, metadata: dict | None, unet) -> tuple[dict, dict | None]:
    """The tensors (and adapter config) of a LoRA that holds one network's layers without the pipeline's "unet." prefix, as
    diffusers' `unet.save_lora_adapter`, its older `save_attn_procs` and peft's `save_pretrained` ("base_model.model.") save
    them, prefixed as `load_lora_into_unet` reads them. diffusers' `load_lora_weights` loads none of such a file's layers,
    silently; `unet.load_lora_adapter(prefix=None)` loads them all. Any other state dict is returned as it is."""
    if any(key.startswith(LORA_COMPONENT_PREFIXES) for key in state_dict):
        return state_dict, metadata
    unprefixed = {key.removeprefix(PEFT_KEY_PREFIX): value for key, value in state_dict.items()}
    children = dict(unet.named_children())
    if not all(key.split(".")[0] in children for key in unprefixed):
        return state_dict, metadata
    metadata = {f"unet.{key}": value for key, value in metadata.items()} if metadata else None
    return {f"unet.{key}": value for key, value in unprefixed.items()}, metadata


def _peft_adapter_config(path: Path, lora: str) -> dict | None:
    """The LoraConfig of a PEFT adapter folder (peft's `save_pretrained`: adapter_config.json beside adapter_model.safetensors),
    as diffusers reads a LoRA's adapter metadata; None for any other LoRA. An adapter of another PEFT method is refused."""
    if not (path.is_dir() and (path / PEFT_CONFIG_FILE).is_file() and (path / PEFT_WEIGHTS_FILE).is_file()):
        return None
    from peft import LoraConfig

    config = read_json_object(path / PEFT_CONFIG_FILE, "a PEFT adapter folder")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"the LoRA {lora} is a PEFT {config['peft_type']} adapter, not a LoRA; only LoRA adapters load here")
    return LoraConfig.from_pretrained(str(path)).to_dict()


def _lora_state_dict(family, path: Path, lora: str, model: DiffusionModel) -> tuple[dict, dict | None, dict | None]:
    """A LoRA file's or folder's tensors, network alphas and adapter metadata, keyed by component ("unet.", "text_encoder.")
    as diffusers' loaders take them: diffusers' own formats, kohya's and A1111's (lora_unet_/lora_te_ keys, alphas), in
    SDXL's SGM block names too (input_blocks, output_blocks: diffusers' SDXL pipeline maps them by the UNet's config; so
    does this for every family), one network's LoRA (`_one_networks_lora`) and a PEFT adapter folder."""
    peft_config = _peft_adapter_config(path, lora)
    with _safetensors_named(path) as named:
        source, kwargs = (str(named.parent), {"weight_name": named.name}) if named.is_file() else (str(named), {})
        if peft_config is not None:
            kwargs["weight_name"] = PEFT_WEIGHTS_FILE
        state_dict, alphas, metadata = family.lora_state_dict(source, return_lora_metadata=True, use_safetensors=True,
                                                              unet_config=model.unet.config, **kwargs)
    state_dict, metadata = _one_networks_lora(state_dict, peft_config or metadata, model.unet)
    return state_dict, alphas, metadata


# The names of a LoRA layer's two factors, down (A) and up (B), in peft's, diffusers' older and kohya's keys
LORA_FACTOR_PAIRS = (("lora_A", "lora_B"), ("lora.down", "lora.up"), ("lora_linear_layer.down", "lora_linear_layer.up"),
                     ("lora_down", "lora_up"))


def _lacked_factor(key: str) -> str | None:
    """What a LoRA lacks whose tensor `key`, one factor of a layer's update B·A (lora_A/down, lora_B/up), is missing:
    "<layer> has lora_A but no lora_B"; None for a key that names no factor."""
    for down, up in LORA_FACTOR_PAIRS:
        for lack, have in ((up, down), (down, up)):
            layer, found, _ = key.partition(f".{lack}.")
            if found:
                return f"{layer} has {have} but no {lack}"
    return None


def _incomplete_lora_layer(keys) -> str | None:
    """What the first layer of a LoRA's tensor `keys` that has one factor of its update without the other lacks
    (`_lacked_factor`); None when every layer has both. The factors' weights are paired, not their biases (peft's
    `lora_bias` has lora_B.bias alone). diffusers fails on such a file with "list index out of range" (a LoRA without any
    lora_B: no rank to read) or with another layer's shapes."""
    keys = set(keys)
    for key in sorted(key for key in keys if key.endswith(".weight")):
        for down, up in LORA_FACTOR_PAIRS:
            for have, lack in ((down, up), (up, down)):
                partner = key.replace(f".{have}.", f".{lack}.", 1)
                if partner != key and partner not in keys:
                    return _lacked_factor(partner)
    return None


def _incomplete(lora: str, lacked: str) -> UserError:
    return UserError(f"cannot load the LoRA {lora}: it is incomplete, its layer {lacked} (a truncated or damaged file?); give the "
                     "whole LoRA file")


def _lora_does_not_fit(lora: str, name_or_path: str, unmatched: list[str], total: int) -> UserError:
    return UserError(f"the LoRA {lora} does not fit {name_or_path}: {len(unmatched)} of its {total} tensors have no layer of that "
                     f"name and shape in the model to load into (e.g. {unmatched[0]}): a LoRA of another model (other layers or layer "
                     "names, e.g. SDXL's on SD 1.5)? Give a LoRA made for this model's family")


def _load_lora(model: DiffusionModel, path: Path, lora: str, name_or_path: str, adapter_name: str | None = None) -> None:
    """Load the LoRA at `path` onto the model's UNet and text encoders (those it has layers for), as diffusers'
    `load_lora_weights` loads it, under `adapter_name` (None: diffusers' default name); a LoRA that does not load whole is a
    UserError saying why."""
    from safetensors import SafetensorError

    family = lora_pipeline_class(model)
    components = {"unet": model.unet} | dict(zip(("text_encoder", "text_encoder_2"), model.text_encoders))
    state_dict, loading = {}, "unet"
    with _warnings_unless_refused():  # peft warns of a LoRA that does not fit (each module it lacks) before our refusal says it
        try:
            with _diffusers_errors_unlogged():  # diffusers logs a failed load as well as raising it: the message below says it once
                state_dict, alphas, metadata = _lora_state_dict(family, path, lora, model)
                if not state_dict or not all("lora" in key for key in state_dict):
                    raise ValueError("not a LoRA state dict (every key must name a lora layer)")
                # of the components the model has: a LoRA for another (text_encoder_2 on SD) does not fit (`_unloaded_lora_tensors`)
                if (lacked := _incomplete_lora_layer(k for k in state_dict if k.split(".")[0] in components)) is not None:
                    raise _incomplete(lora, lacked)
                family.load_lora_into_unet(state_dict, alphas, model.unet, adapter_name=adapter_name, metadata=metadata)
                for loading, text_encoder in list(components.items())[1:]:
                    family.load_lora_into_text_encoder(state_dict, alphas, text_encoder, prefix=loading, adapter_name=adapter_name,
                                                       metadata=metadata)
        except RuntimeError as err:
            if "size mismatch" in str(err):  # the UNet's (torch's load_state_dict): every such tensor, "<module>.lora_A.<adapter>.weight"
                keys = [f"{loading}.{re.sub(r'[.][^.]+(?=[.][a-z]+$)', '', key)}"
                        for key in re.findall(r"size mismatch for (\S+?):", str(err))]
            elif "ignore_mismatched_sizes" in str(err):  # a text encoder's (transformers'): its adapter stays, in the model's shapes
                tried = list(components)[:list(components).index(loading) + 1]
                keys = _unloaded_lora_tensors({k: v for k, v in state_dict.items() if k.split(".")[0] in tried}, components, adapter_name)
            else:
                raise UserError(f"cannot load the LoRA {lora} onto {name_or_path}: {first_line(err)}") from err
            which = f"{len(keys)} of its {len(state_dict)} tensors have" if keys else "its layers have"
            example = f" (e.g. {keys[0]})" if keys else ""
            raise UserError(f"the LoRA {lora} does not fit {name_or_path}: {which} other shapes than the model's layers{example}: a LoRA "
                            "of another model family or size, e.g. SDXL's on SD 1.5? Give the LoRA distilled from this model") from err
        except (OSError, ValueError, KeyError, IndexError, SafetensorError) as err:
            if isinstance(err, KeyError) and (lacked := _lacked_factor(str(err.args[0]))) is not None:
                raise _incomplete(lora, lacked) from err  # kohya's lora_down without its lora_up: diffusers' converter's KeyError
            if "not found in the base model" in str(err):  # peft: none of a component's layers is the model's
                raise _lora_does_not_fit(lora, name_or_path, [k for k in state_dict if k.startswith(f"{loading}.")], len(state_dict)) from err
            if "not been correctly renamed" in str(err):  # diffusers' converter of kohya's format met keys of no LoRA layer
                keys = [key.strip() for key in str(err).split(":", 1)[1].split(",")]
                example = next((key for key in keys if not key.endswith(".alpha")), keys[0])
                raise UserError(f"cannot load the LoRA {lora}: its tensors are not all LoRA layers (e.g. {example}): a LyCORIS LoHa, "
                                "LoKr or other adapter, which diffusers does not load? Give a LoRA (lora_down/lora_up or lora_A/lora_B "
                                "layers)") from err
            raise UserError(f"cannot load the LoRA {lora} onto {name_or_path}: {first_line(err)}") from err
        unmatched = _unloaded_lora_tensors(state_dict, components, adapter_name)
        if unmatched:
            raise _lora_does_not_fit(lora, name_or_path, unmatched, len(state_dict))


def _local_lora(lora: str) -> Path:
    """A LoRA argument (a local file or folder, or a hub id: downloaded) as a local path, checked (`_check_lora_path`)."""
    lora = given_name(lora, "the LoRA", "a .safetensors file, a LoRA folder or a hub id")  # `~` expanded; "" is no current folder
    path = Path(check_hub_id(lora, "the LoRA", TOP_FILES, TOP_IGNORED))
    if not path.exists():
        raise UserError(f"LoRA {lora} does not exist; give the lora/ folder of `lcm distill --adapter lora`, a .safetensors file or a hub id")
    _check_lora_path(path, lora)
    return path


def _settle_adapters(model: DiffusionModel, dtype: torch.dtype, device: str | torch.device) -> None:
    """The model's networks on its device and dtype, in eval mode, after LoRA layers were loaded onto them."""
    for module in (model.unet, *model.text_encoders):  # the LoRA layers need not be made on the model's device and dtype
        cast(module, device, dtype)
        # ... and peft makes them in training mode: a LoRA whose config has lora_dropout > 0 (diffusers' LCM-LoRA scripts
        # take --lora_dropout, and save it in the file's metadata) would drop activations at random from torch's global
        # generator, so that a seed no longer fixes the image. Eval mode, as from_pretrained leaves the model
        module.eval()


def load_lcm_lora(name_or_path: str, lora: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                  lora_flag: str = "lora") -> DiffusionModel:
    """A diffusion model with an LCM-LoRA (Luo et al. 2023b) loaded onto its UNet (and text encoder, if the file has
    layers for it), as diffusers' `load_lora_weights` loads it; the result samples as an LCM without an ω input.
    The model may also be an LCM with a LoRA fine-tuned on it (`lcm finetune --adapter lora`); it keeps its ω input.

    `lora` is a folder or .safetensors file (ours, or a downloaded LCM-LoRA) or a hub id. Its scheduler config is
    the LCMScheduler one `lcm distill`/`lcm finetune` save in the folder, else an LCM's own, else diffusers' default
    (original_inference_steps 50) over the model's noise schedule; the parameterisation is the model's either way.
    An error that says to leave the LoRA out names it as `lora_flag` took it: `lora='x'`, or `--lora x` for a command's flag.
    """
    path = _local_lora(lora)
    # Read before the model loads: a broken file is known at once. A weights file given in its LoRA folder (lora/
    # pytorch_lora_weights.safetensors) samples under the LCMScheduler config beside it, as the folder does
    saved = (path.parent if path.is_file() else path) / LORA_SCHEDULER_FILE
    saved_config = read_json_object(saved, "the LoRA folder") if saved.is_file() else None
    if path.is_file() and saved_config is not None and not is_lcm_config(saved_config):
        saved_config = None  # another scheduler's config that happens to lie beside the file: not the LoRA's
    model = load_diffusion_model(name_or_path, dtype=dtype, device=device)
    if model.is_transformer:  # said here for loading: `_load_lora`'s refusal (`lora_pipeline_class`) is advice for distillation
        then = ": a PixArt-LCM samples as it is" if model.is_lcm else (
            f", and distil it into a PixArt-LCM first: `lcm distill --teacher {name_or_path} --guidance-scale-min 4.5 "
            "--guidance-scale-max 4.5` (a full student, one guidance scale)")
        raise UserError(f"{name_or_path} is a PixArt-α model, which takes no LoRA (diffusers' PixArtAlphaPipeline loads none): leave "
                        f"{given(lora_flag, str(lora))} out{then}")
    _load_lora(model, path, lora, name_or_path)
    _settle_adapters(model, dtype, device)
    if saved_config is not None:  # its sampler settings (T/k, timestep scaling, clipping) over the model's noise schedule and
        # parameterisation, as diffusers' recipe LCMScheduler.from_config(pipe.scheduler.config) takes them: an LCM-LoRA applied
        # to a fine-tune of its teacher (a v-prediction one, say) reads the fine-tune's output as what it is
        lcm = {k: v for k, v in saved_config.items() if k not in LORA_MODEL_SCHEDULE_KEYS}
    elif model.time_cond_proj_dim is not None:
        lcm = model.scheduler_config
    else:
        lcm = lcm_scheduler_config(model.scheduler_config, skip=1) | {"original_inference_steps": DEFAULT_ORIGINAL_INFERENCE_STEPS}
    model.scheduler_config = model.scheduler_config | {k: v for k, v in lcm.items() if not k.startswith("_")}
    if not model.is_lcm:  # an ω input, a DDIM scheduler and a LoRA without an LCMScheduler config of its own
        raise UserError(f"{name_or_path} is a guidance-distilled diffusion model (ω input, no LCMScheduler) and the LoRA {lora} brings "
                        "no LCMScheduler config: together they are not an LCM; give an LCM, or the model an LCM-LoRA was distilled "
                        "from, as the model")
    if model.time_cond_proj_dim is not None:  # an LCM with a LoRA fine-tuned on it: its ω input is the LCM's, and so is its record
        _check_not_a_teachers_lcm_lora(path, lora, name_or_path, lora_flag)
        model.guidance_record = guidance_record_of(model.source)
    return model


def _check_not_a_teachers_lcm_lora(path: Path, lora: str, name_or_path: str, lora_flag: str) -> None:
    """A UserError for an LCM-LoRA distilled from a teacher (its card says so: `LCM_LORA_TITLE`) given with an LCM. Its
    deltas are the acceleration vector τ = θ_LCM − θ_teacher of Luo et al. 2023b (Sec. 3), learnt against the teacher's
    weights: on an LCM, itself about θ_teacher + τ and taking g through its ω input, the LCM's distillation is applied twice.
    diffusers' `load_lora_weights` loads it (it matches layer names only); the documented use of an LCM with a LoRA is one
    fine-tuned on that LCM (`lcm finetune --adapter lora`). A LoRA without our card (downloaded) is not judged."""
    card = (path.parent if path.is_file() else path) / "README.md"
    try:
        title = next((line for line in card.read_text(encoding="utf-8").splitlines() if line.startswith("# ")), "")
    except (OSError, UnicodeDecodeError):
        return
    if title.startswith(LCM_LORA_TITLE):
        raise UserError(f"{given(lora_flag, str(lora))} is an LCM-LoRA distilled from a teacher ({card} says so) and {name_or_path} is an "
                        "LCM (ω input): on it the LoRA would apply the distillation a second time; give the teacher as the model, "
                        "or a LoRA fine-tuned on this LCM (lcm finetune --adapter lora)")


def check_style_loras(styles) -> None:
    """Style LoRAs as `add_style_loras` takes them: a list of (LoRA, weight) pairs, each weight a finite number. A single pair
    (`style_loras=("papercut.safetensors", 0.8)`), a bare name or a pair without its weight is refused, not unpacked wrongly."""
    example = "e.g. [(\"papercut.safetensors\", 0.8)]"
    if isinstance(styles, (str, bytes, os.PathLike)) or not isinstance(styles, (list, tuple)):
        raise UserError(f"style LoRAs must be a list of (LoRA, weight) pairs, {example}, got {styles!r:.80}")
    for style in styles:
        if not isinstance(style, (list, tuple)) or len(style) != 2:
            raise UserError(f"each style LoRA must be a (LoRA, weight) pair, {example}, got {style!r:.80}")
        lora, weight = style
        if not is_real(weight) or not math.isfinite(weight):
            raise UserError(f"the weight {weight!r:.40} of the style LoRA {lora} must be a finite number (1: as trained, 0: off)")


def add_style_loras(model: DiffusionModel, styles: list[tuple[str, float]], dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> DiffusionModel:
    """Style LoRAs, each (a .safetensors file, a LoRA folder or a hub id; its weight), loaded beside the adapters the LCM
    already carries (an LCM-LoRA's: weight 1) and mixed as diffusers' `load_lora_weights(..., adapter_name=...)` and
    `set_adapters(names, adapter_weights)` mix them: each adapter's output scaled by its weight, in the UNet and the text
    encoders. This is the LCM-LoRA's use as an acceleration module beside style LoRAs (Luo et al. 2023b, Sec. 3); on a
    full LCM the style LoRA adapts its network as it does its teacher's (the LCM keeps its ω input). `model` is an LCM as
    `load_lcm` or `load_lcm_lora` gave it, on `device` in `dtype`; its sampler settings are its own. No styles: the model
    as it is."""
    check_style_loras(styles)
    if not styles:
        return model
    if model.is_transformer:
        raise UserError(f"{model.source} is a PixArt-α model; diffusers' PixArtAlphaPipeline loads no LoRA weights, so no style LoRA "
                        "goes with it")
    networks = [model.unet, *model.text_encoders]
    carried = sorted({name for network in networks for name in getattr(network, "peft_config", {}) if name.startswith("style_")})
    if carried:  # set_adapters below would set their weights back to 1: their own weights are not read back from peft's layers
        raise UserError(f"{model.source} already carries style LoRAs ({', '.join(carried)}); give every style LoRA in one call "
                        "(add_style_loras(model, [(lora, weight), ...]), LCMGenerator.load(..., style_loras=[...])) on a freshly loaded model")
    paths = [_local_lora(lora) for lora, _ in styles]  # all checked before any loads
    weights = dict.fromkeys((name for network in networks for name in getattr(network, "peft_config", {})), 1.0)
    for i, (path, (lora, weight)) in enumerate(zip(paths, styles)):
        name = f"style_{i}"
        with _beside_other_adapters():
            _load_lora(model, path, lora, model.source, adapter_name=name)
        weights[name] = weight
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    model.unet.set_adapters(list(weights), list(weights.values()))
    for text_encoder in model.text_encoders:
        set_adapters_for_text_encoder(list(weights), text_encoder, list(weights.values()))
    _settle_adapters(model, dtype, device)
    return model


def fuse_loras(model: DiffusionModel) -> DiffusionModel:
    """The LoRA adapters on the model's UNet and text encoders (an LCM-LoRA's, style LoRAs' at their `add_style_loras`
    weights) fused into the layers they adapt, W ← W + w·(α/r)·B·A, and peft's layers removed, as diffusers'
    `fuse_lora(adapter_names=...)` and `unload_lora_weights()` leave a pipeline: the same function of the input (to float
    rounding), without the cost of peft's extra layers (a rank-64 LCM-LoRA made a 4-step image 1.5× slower). For sampling
    only: a fused model has no adapters to train, switch or save as a LoRA. Each layer is fused in float32 and rounded to
    the model's dtype once, which keeps a bfloat16 model closer to the float32 one than diffusers' fusing in bfloat16
    (docs/guide.md, "Sampling fuses the LoRAs"). A model without adapters is returned as it is."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for network in (model.unet, *model.text_encoders):
        if not getattr(network, "peft_config", None):
            continue
        for layer in [module for module in network.modules() if isinstance(module, BaseTunerLayer)]:
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            layer.to(torch.float32)
            if base.bias is None and any(getattr(layer, "lora_bias", {}).get(name) for name in layer.active_adapters):
                # peft's lora_bias adds B's bias to the output: fused into a zero bias (peft refuses a layer without one)
                base.bias = torch.nn.Parameter(base.weight.new_zeros(base.weight.shape[0]), requires_grad=False)
            layer.merge()  # its active adapters, each at the scale set_adapters gave it
            base.to(dtype)
        recurse_remove_peft_layers(network)
        del network.peft_config
        network._hf_peft_config_loaded = None  # as diffusers' unload_lora and _remove_text_encoder_monkey_patch leave it
    return model
