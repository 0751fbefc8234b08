"""Text to images: prompts in, decoded images out, with a latent consistency model (Algorithm 3, `LCMGenerator`) or a
diffusion model and an ODE solver (`SolverGenerator`: a teacher with CFG, or a guidance-distilled model).

They are what `lcm generate` (and any other front end) calls. Image i of a call is drawn from its
own generator seeded with `seeds[i]`, so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from latent_consistency.compilation import compile_for_sampling
from latent_consistency.denoisers import NegativePromptGuidance
from latent_consistency.devices import resolve_device, resolve_dtype, weights_placement
from latent_consistency.errors import UserError
from latent_consistency.models import (
    DiffusionModel,
    LatentCodec,
    add_style_loras,
    check_style_loras,
    fuse_loras,
    guidance_record_of,
    load_diffusion_model,
    load_lcm,
    load_lcm_lora,
)
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.preview import load_preview_decoder
from latent_consistency.prompts import PromptCache, check_prompts
from latent_consistency.sampling import (
    TEACHER_SAMPLERS,
    check_custom_timesteps,
    check_gamma,
    check_strength,
    check_tcd_steps,
    is_integer,
    is_real,
    randn,
    sample_lcm,
    sample_tcd,
    sample_teacher,
)
from latent_consistency.upsampling import use_subpixel_upsampling

# Images larger than this multiple of the model's native size are refused (SD 1.5: 4096 px).
MAX_SIZE_FACTOR = 8
# The paper trains ω ∈ [2, 14] (g ∈ [3, 15]); far outside the trained range the ω embedding is meaningless.
MAX_GUIDANCE_SCALE = 30.0
# What g a model of each `Generator.kind` is sampled at (for one without a guidance record), said with a g far from it
USUAL_GUIDANCE = {"lcm": "LCMs are distilled with guidance scales around 3-15 (paper ω ∈ [2, 14])",
                  "lora": "an LCM-LoRA has its guidance distilled in and samples at guidance scales of 1-2 (diffusers' advice)",
                  "solver": "a diffusion model's classifier-free guidance is usually 5-10 (Stable Diffusion's default 7.5)"}
# Default g by `Generator.kind`: an LCM's ω input (the paper's ω = 7), an LCM-LoRA's classifier-free guidance (none:
# its guidance was distilled in; diffusers recommends 1-2 for LCM-LoRA), a diffusion model's CFG or ω input.
DEFAULT_GUIDANCE_SCALE = {"lcm": 8.0, "lora": 1.0, "solver": 7.5}
# Sampling steps of a call that names none (`lcm generate --steps`): the paper's 4-step LCM
DEFAULT_STEPS = 4
# Image i of a call that names no seeds is drawn at seed DEFAULT_SEED + i (`lcm generate --seed`)
DEFAULT_SEED = 0
# Seeds seed torch.Generator, which takes up to 2^63 - 1
MAX_SEED = 2**63 - 1
# torch's CPU generator (mt19937, which draws every image's noise, as in diffusers) keeps a seed's low 32 bits: seed S draws
# the noise of S mod 2^32, so the seeds from here up repeat the images of smaller ones
DISTINCT_SEEDS = 2**32
# λ of an LCM's negative prompt (`NegativePromptGuidance`, every step): on the world it cut the negated shape from 6.0 %
# to 1.2 % (2 steps) and 2.3 % (4 steps) at an FID cost of +6 to +8; λ >= 0.5 over-guides (docs/guide.md, Negative prompts).
DEFAULT_NEGATIVE_SCALE = 0.25
# img2img's strength when none is given (the Python call, `lcm generate`, `lcm serve`), as diffusers'
# LatentConsistencyModelImg2ImgPipeline: the init image noised to timestep 799 of 1000
DEFAULT_STRENGTH = 0.8
# Init images are in [-1, 1]; this much past it is rounding (a float16 image, a resampling filter), more is another range
INIT_IMAGE_TOLERANCE = 1e-3


class RepeatedSeedWarning(UserWarning):
    """A seed of 2^32 or more, taken as diffusers takes it, whose image is a smaller seed's (`repeated_seed_note`). The
    commands say it their own way (`lcm generate`'s note, `lcm serve`'s X-Seed-Note header) and ignore this warning."""


class UnguidedScaleWarning(UserWarning):
    """A g below 1 given to a model without an ω input (`Generator.unguided_note`): sampled as g = 1, as diffusers samples
    it. `lcm generate` says it in a note and records the g applied, and ignores this warning."""


def repeated_seed_note(seed: int, count: int = 1, flag: str = "--seed") -> str | None:
    """A note when images SEED..SEED+count-1 take seeds of 2^32 or more: their images are those of smaller seeds, though
    seeds up to 2^63 - 1 are taken (`MAX_SEED`). `flag` names the seed where the user gave it (`--seed`, the API's `seed`)."""
    last = seed + count - 1
    if last < DISTINCT_SEEDS:
        return None
    first = max(seed, DISTINCT_SEEDS)
    return (f"seed {first} makes the image of seed {first % DISTINCT_SEEDS}: torch's CPU generator keeps the low 32 bits of a seed "
            f"(diffusers' too), so seeds from 2^32 = {DISTINCT_SEEDS} up repeat smaller ones; give {flag} at most "
            f"{DISTINCT_SEEDS - count}" + (f" for {count} image(s) of their own" if count > 1 else ""))


def check_real(value, name: str, meaning: str) -> None:
    """A real number (a Python or numpy one, not a bool or a string): `meaning` says what `name` is, for the message."""
    if not is_real(value):
        raise UserError(f"{name} must be a number ({meaning}), got {value!r:.40}")


def placement(device: torch.device | str, dtype: torch.dtype | str) -> tuple[torch.device, torch.dtype]:
    """`device` and `dtype` of a `load`, also as `--device` and `--dtype` take them (`devices.resolve_device`,
    `resolve_dtype`): "auto" (the accelerator this machine has), "cuda:1", "bfloat16". `torch.device("auto")` raised
    torch's own RuntimeError, and "bfloat16" was refused for a str. torch.float16 is refused on the CPU as "float16" is."""
    device = resolve_device(device, "device")
    name = "float16" if dtype == torch.float16 else dtype
    return device, resolve_dtype(name, device, "dtype") if isinstance(name, str) else dtype


@dataclass
class Generator:
    """A text-to-image model on a device: the image size checks, starting noise and prompt embeddings its samplers share."""

    model: DiffusionModel
    device: torch.device
    dtype: torch.dtype
    prompt_cache: PromptCache = field(default_factory=PromptCache)  # c of the prompts seen, the text encoder run once per prompt

    def __post_init__(self):
        if not isinstance(self.dtype, torch.dtype):
            raise UserError(f"dtype must be a torch.dtype such as torch.float32, got {self.dtype!r}")
        if self.dtype == torch.float16:  # refused on the CPU, as `load` refuses it (`placement`)
            resolve_dtype("float16", torch.device(self.device), "dtype")
        self.check_placement()
        # The same images, faster: nearest-2x-then-3x3-convolution upsamplers as one small convolution (`upsampling`)
        for network in (self.model.unet, self.model.vae):
            use_subpixel_upsampling(network)

    def check_placement(self) -> None:
        """The model's networks are on the generator's device, and its UNet and text encoders in its dtype (the VAE may stay in
        float32, `DiffusionModel.upcasts_vae`): checked when the generator is made and at every call, since a model moved
        after that (`model.to("cuda")`) would fail deep in the first layer, on latents made on the generator's device."""
        device = torch.device(self.device)
        placements = {module: weights_placement(module) for module in (self.model.unet, self.model.vae, *self.model.text_encoders)}
        weights = next((placements[m][1] for m in (self.model.unet, *self.model.text_encoders) if placements[m][1] != self.dtype), None)
        if weights is not None:
            raise UserError(f"the model's weights are {weights} but the generator's dtype is {self.dtype}: load the model in that dtype "
                            f"({type(self).__name__}.load(path, device, dtype, ...)), or make the generator with the model's")
        for on, _ in placements.values():
            if on.type != device.type or (device.index is not None and on.index is not None and on.index != device.index):
                raise UserError(f"the model is on {on} but the generator's device is {device}: load the model there (or move all "
                                "of it back), or make the generator with the model's device")

    def default_size(self) -> int:
        return self.model.native_size

    def default_steps(self) -> int:
        """The steps to sample in when none are given: `DEFAULT_STEPS` (a progressive round's own, `SolverGenerator`)."""
        return DEFAULT_STEPS

    def default_guidance_scale(self) -> float:
        """The g to sample at when none is given: the one an LCM's run recorded (`guidance_record`), else the kind's."""
        record = self.model.guidance_record
        return DEFAULT_GUIDANCE_SCALE[self.kind] if record is None else record.guidance_scale

    def usual_guidance(self) -> str:
        """The guidance scales this model samples at, for a message about a g far from them: the range its guidance record
        says it was distilled on (an LCM, a guidance-distilled model), else its kind's usual ones (`USUAL_GUIDANCE`)."""
        record = self.model.guidance_record
        if record is None:
            return USUAL_GUIDANCE[self.kind]
        return f"this model was distilled on guidance scales [{record.guidance_scale_min:g}, {record.guidance_scale_max:g}]"

    def guidance_notes(self, guidance_scale: float, given: bool) -> list[str]:
        """Notes for sampling at `guidance_scale` (`GuidanceRecord.notes`; none for a model without a record)."""
        record = self.model.guidance_record
        return [] if record is None else record.notes(guidance_scale, given)

    def check_size(self, height: int, width: int, flag: str = "--") -> None:
        """Image sides the model can make; an error names each side as `flag` + its name ("--height" on the command line,
        "height" for the HTTP API's JSON field)."""
        factor, patch = self.model.codec.downsampling_factor, self.model.patch_size
        for name, value in (("height", height), ("width", width)):
            if not is_integer(value):
                raise UserError(f"{flag}{name} must be an integer number of pixels, got {value!r}")
            if value < factor * patch or value % (factor * patch):
                raise UserError(f"{flag}{name} {value} must be a positive multiple of the VAE factor {factor}"
                                + (f" times the transformer's patch size {patch}" if patch > 1 else ""))
            if value > MAX_SIZE_FACTOR * self.default_size():
                raise UserError(f"{flag}{name} {value} is more than {MAX_SIZE_FACTOR}x the model's {self.default_size()} px; "
                                "a UNet does not generate coherent images that far from its training size")
        unet, vae = getattr(self.model.unet, "config", None), getattr(self.model.vae, "config", None)
        if not normalisable(unet, vae, factor, height, width):
            side = smallest_normalisable_side(unet, vae, factor, factor * patch, 2 * MAX_SIZE_FACTOR * self.default_size())
            raise UserError(f"{flag}height {height} and {flag}width {width} are too small for this model: a feature map of its "
                            f"network would hold one value per normalisation group; use at least {side}x{side} px (or a longer other side)")

    def use_preview_decoder(self, name_or_path: str | None) -> None:
        """Decode with a tiny preview decoder (`preview`: an AutoencoderTiny folder or hub id, e.g. madebyollin/taesd) instead of
        the VAE's decoder: faster, approximate images; None goes back to the VAE's decoder. Encoding (img2img) stays the VAE's.
        Refused when made for latents of another shape (`PreviewDecoder.check_fits`: other channels, size factor or a shifted
        space); one made for another VAE's latents of the same shape gets a note on stderr and is used all the same
        (`check_colours`, against the VAE's own decoder, also when a preview decoder is in use)."""
        if name_or_path is None:
            self.model.preview_decoder = None
            return
        codec = LatentCodec(self.model.vae)
        preview = load_preview_decoder(name_or_path, self.dtype, self.device)
        self.model.preview_decoder = preview.check_fits(codec.latent_channels, codec.downsampling_factor).check_colours(codec)

    def compile(self) -> None:
        """`torch.compile` the text encoder, network and decoder in place (`compilation.compile_for_sampling`): the first call of each
        input shape compiles, later ones run faster. Call it after `use_preview_decoder`, which swaps the decoder."""
        compile_for_sampling(self.model, self.dtype)

    def call_defaults(self, prompts: list[str], guidance_scale: float | None, seeds: list[int] | None, height: int | None,
                      width: int | None) -> tuple[float, list[int], int, int]:
        """A call's guidance scale, seeds and size, each one left out as `lcm generate` leaves it: the model's own g
        (`default_guidance_scale`: its guidance record's), image i at seed `DEFAULT_SEED` + i, the model's native size.
        The prompts are checked first, since the seeds are counted from them. Seeds given as a 1-D numpy array or tensor are
        taken as the list of its values (`check_call` checks them)."""
        check_prompts(prompts)
        guidance_scale = self.default_guidance_scale() if guidance_scale is None else guidance_scale
        if isinstance(seeds, (np.ndarray, torch.Tensor)) and seeds.ndim == 1:
            seeds = seeds.tolist()
        seeds = [DEFAULT_SEED + i for i in range(len(prompts))] if seeds is None else seeds
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        return guidance_scale, seeds, height, width

    def check_call(self, prompts: list[str], seeds: list[int], guidance_scale: float, height: int, width: int) -> None:
        """The arguments every call takes, checked before any work: one seed per prompt, a finite g, a size the model makes,
        and the model still where the generator runs (`check_placement`)."""
        self.check_placement()
        check_prompts(prompts)
        if not prompts:
            raise UserError("prompts is empty; give at least one prompt")
        if isinstance(seeds, str) or not isinstance(seeds, Sequence) or len(seeds) != len(prompts):
            raise UserError(f"give one seed per prompt ({len(prompts)}), got {seeds!r:.80}")
        for seed in seeds:
            if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
                shown = repr(seed) if isinstance(seed, numbers.Number) else f"a {type(seed).__name__}"
                raise UserError(f"seeds must be integers in [0, 2^63 - 1], got {shown}: image i's noise is drawn from "
                                "torch.Generator().manual_seed(seeds[i])")
        repeated = next((int(seed) for seed in seeds if seed >= DISTINCT_SEEDS), None)
        if repeated is not None:  # taken, as diffusers takes it, but not in silence
            warnings.warn(repeated_seed_note(repeated, flag="seeds"), RepeatedSeedWarning, stacklevel=4)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
            raise UserError(f"guidance scale {guidance_scale!r:.40} must be a finite number (diffusers' guidance_scale g; ω = g - 1)")
        self.check_guidance_scale(guidance_scale)
        note = self.unguided_note(guidance_scale)
        if note is not None:  # taken, as diffusers takes it, but not in silence
            warnings.warn(note, UnguidedScaleWarning, stacklevel=4)
        self.check_size(height, width, flag="")

    def check_guidance_scale(self, guidance_scale: float, flag: str = "guidance scale") -> None:
        """A UserError (naming `flag`) for a g this model is not sampled at: outside [0, MAX_GUIDANCE_SCALE], or below 1 for
        a model that takes g through its ω input (ω = g − 1), which was trained on ω ≥ 0. The one rule of `lcm generate`,
        the server and the Python call."""
        if not 0 <= guidance_scale <= MAX_GUIDANCE_SCALE:
            raise UserError(f"{flag} {guidance_scale:.15g} is outside [0, {MAX_GUIDANCE_SCALE:g}]; {self.usual_guidance()}")
        if self.model.time_cond_proj_dim is not None and guidance_scale < 1:
            raise UserError(f"{flag} {guidance_scale:.15g} is below 1: {self.model.source} takes g through its ω input (ω = g - 1), "
                            "which was trained on ω >= 0")

    def applied_guidance_scale(self, guidance_scale: float) -> float:
        """The g sampling applies: `guidance_scale`, but 1 for a g below 1 on a model without an ω input (kind lora: an
        LCM-LoRA, PixArt-LCM), whose classifier-free guidance runs at g > 1 alone (`DiffusionModel.consistency_model`, as
        diffusers' `do_classifier_free_guidance`): every g ≤ 1 gives the image of g = 1. A g below 1 on an LCM's ω input
        is refused (`check_guidance_scale`), and the teacher samplers are not LCMs."""
        return 1.0 if self.kind == "lora" and guidance_scale < 1 else guidance_scale

    def unguided_note(self, guidance_scale: float, flag: str = "guidance scale") -> str | None:
        """A note for a g below 1 on a model without an ω input: its image is g = 1's (`applied_guidance_scale`)."""
        if self.applied_guidance_scale(guidance_scale) == guidance_scale:
            return None
        return (f"{flag} {guidance_scale:g} is below 1: {self.model.source} has no ω input and runs classifier-free guidance at "
                "g > 1 alone, as diffusers does; the image is that of guidance scale 1")

    def start(self, prompts: list[str], seeds: list[int], height: int, width: int):
        """(z_T, prompt embeddings, per-image generators): image i's noise from its own seed."""
        codec = self.model.codec
        factor = codec.downsampling_factor
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = randn((len(prompts), codec.latent_channels, height // factor, width // factor), generators, self.device, self.dtype)
        cond = self.prompt_cache.encode(self.model.prompts, prompts, self.device, (height, width)).to(self.dtype)
        return latents, cond, generators


def normalisable(unet_config, vae_config, factor: int, height: int, width: int) -> bool:
    """Whether every GroupNorm of a UNet of `unet_config` and a VAE of `vae_config` (their diffusers configs, loaded or
    read from the folder before any weights: `lcm cache`; None or a transformer's, without down blocks, is not checked),
    whose latents are `factor` times smaller than the image, sees more than one value per group in an image of this size.
    The one rule of generation's sizes (`Generator.check_size`) and of a run's --resolution (`training.batches.
    check_resolution`).

    Level i of a UNet holds its latent map halved i times (stride-2 convolutions: ⌈r/2⌉), and its first norm takes
    level i-1's channels. At one value per group GroupNorm fails for a batch of one ("Expected more than 1 value per
    channel") and returns its bias alone for larger ones: an image would depend on its batch, when it is made at all."""
    for config, h, w in ((unet_config, height // factor, width // factor), (vae_config, height, width)):
        config = config or {}
        channels = list(config.get("block_out_channels") or [])
        if "down_block_types" not in config or not channels:
            continue
        groups = int(config.get("norm_num_groups") or 32)
        for i, c in enumerate(channels):
            if i:
                h, w = -(-h // 2), -(-w // 2)
            if min(c, channels[max(i - 1, 0)]) // groups * h * w <= 1:
                return False
    return True


def smallest_normalisable_side(unet_config, vae_config, factor: int, step: int, limit: int) -> int:
    """The smallest square side, a multiple of `step` below `limit`, that `normalisable` takes: the size a refusal names."""
    return next(side for side in range(step, limit, step) if normalisable(unet_config, vae_config, factor, side, side))


def lcm_kind(model: DiffusionModel) -> str:
    """How an LCM takes its guidance scale (the key of `DEFAULT_GUIDANCE_SCALE`): lcm, through its ω input; lora, no ω input
    (an LCM-LoRA, PixArt-LCM), as classifier-free guidance."""
    return "lcm" if model.time_cond_proj_dim is not None else "lora"


class LCMGenerator(Generator):
    """An LCM (or a diffusion model with an LCM-LoRA), sampled with Algorithm 3."""

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32, lora: str | None = None,
             style_loras: Sequence[tuple[str, float]] = (), *, lora_flag: str = "lora") -> LCMGenerator:
        """An LCM, or a diffusion model with the LCM-LoRA `lora`, on `device` in `dtype` (by default float32 on the CPU, as
        `models.load_lcm`); `style_loras` (a file, folder or hub id and its weight each) are mixed in beside it as diffusers'
        `set_adapters` mixes LoRAs (`models.add_style_loras`). The LoRAs are fused into the weights (`models.fuse_loras`):
        a generator samples with them as loaded, and an unfused LoRA's layers cost a third more per network call. An error
        names `lora` as `lora_flag` takes it (`models.load_lcm_lora`: `--lora` where a command's flag gave it)."""
        check_style_loras(style_loras)  # before the model loads: a single (LoRA, weight) pair would be unpacked wrongly
        device, dtype = placement(device, dtype)
        model = load_lcm(path, dtype, device) if lora is None else load_lcm_lora(path, lora, dtype, device, lora_flag=lora_flag)
        return cls(fuse_loras(add_style_loras(model, list(style_loras), dtype, device)), device, dtype)

    @property
    def kind(self) -> str:
        return lcm_kind(self.model)

    def timesteps(self, steps: int | None, custom: list[int] | None = None, strength: float = 1.0) -> torch.Tensor:
        """The model's `steps` LCM timesteps, or `custom` ones (strictly decreasing, in [0, T)).

        img2img: below `strength` 1 the `steps` timesteps start at the grid timestep k·⌊s·N⌋ - 1 ≈ s·T
        (`sampling.lcm_timesteps`); custom timesteps already say where img2img starts (their first), so they take no
        strength.
        """
        if custom is not None:
            if strength != 1:
                raise UserError("custom timesteps already set where img2img starts (the first one); give a strength or "
                                "timesteps, not both")
            return check_custom_timesteps(custom, self.model.schedule.num_train_timesteps)
        return self.model.timesteps(steps, strength)

    def call_timesteps(self, timesteps, steps: int | None, strength: float) -> torch.Tensor:
        """A call's timesteps: the custom ones given, else `steps` (`default_steps` without either) of the model's, which
        start at `strength`'s start timestep for img2img. Both at once would say the step count twice."""
        if timesteps is None:
            return self.timesteps(self.default_steps() if steps is None else steps, strength=strength)
        if steps is not None:
            raise UserError("give steps or timesteps, not both: custom timesteps set the steps (steps=N picks N of the model's)")
        return check_custom_timesteps(timesteps, self.model.schedule.num_train_timesteps)

    def img2img_start(self, latents: torch.Tensor, timesteps: torch.Tensor, init_images: torch.Tensor, strength: float) -> torch.Tensor:
        """z_{τ_1} = α_{τ_1}·E(x) + σ_{τ_1}·ε: the init images encoded (the posterior mean) and noised to the first
        timestep with ε = `latents`, each image's seeded noise (the draw that is z_T without an init image).

        `strength` is the one `timesteps` were made with; timesteps that start above its start timestep (those of
        strength 1 with strength 0.5, say) are refused rather than noising the image more than asked.
        """
        if not isinstance(init_images, torch.Tensor):
            raise UserError(f"init_images must be a torch.Tensor [B, 3, H, W] in [-1, 1], got a {type(init_images).__name__}; "
                            "an RGB image's uint8 pixels p as a [3, H, W] tensor are p / 127.5 - 1")
        if not init_images.is_floating_point():
            raise UserError(f"init_images must be a floating-point tensor in [-1, 1], got {init_images.dtype}; uint8 pixels p are "
                            "p / 127.5 - 1")
        if init_images.ndim != 4 or init_images.shape[1] != 3 or init_images.shape[0] not in (1, len(latents)):
            raise UserError(f"init_images must be [B, 3, H, W] or [1, 3, H, W] for {len(latents)} prompts, got {list(init_images.shape)}")
        factor = self.model.codec.downsampling_factor
        if tuple(init_images.shape[2:]) != (latents.shape[2] * factor, latents.shape[3] * factor):
            raise UserError(f"init image is {init_images.shape[3]}x{init_images.shape[2]} px, not the {latents.shape[3] * factor}x"
                            f"{latents.shape[2] * factor} asked for; resize it, or ask for its size (height={init_images.shape[2]}, "
                            f"width={init_images.shape[3]})")
        lo, hi = (float(v) for v in torch.aminmax(init_images.float()))
        if not (lo >= -1 - INIT_IMAGE_TOLERANCE and hi <= 1 + INIT_IMAGE_TOLERANCE):  # NaN fails too
            raise UserError(f"init_images must hold values in [-1, 1], got values in [{lo:g}, {hi:g}]: pixels p in [0, 255] are "
                            "p / 127.5 - 1, in [0, 1] 2p - 1")
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
        if negative_scale is not None:
            check_real(negative_scale, "negative_scale", "λ >= 0 of the negative prompt's guidance")
            if not (math.isfinite(negative_scale) and negative_scale >= 0):
                raise UserError(f"negative scale {negative_scale} must be a finite number >= 0 (0: the negative prompt has no effect)")
        if negative_prompts is None:
            if negative_scale is not None:
                raise UserError("a negative scale applies to a negative prompt: give one, or leave the scale out")
            if self.kind == "lora" and guidance_scale > 1:  # ∅ of its CFG from the cache, not the text encoder at every call
                return self.model.consistency_model(guidance_scale, self.prompt_cache.uncond(self.model.prompts, self.device, size), size)
            return self.model.consistency_model(guidance_scale, size=size)
        check_prompts(negative_prompts, "negative_prompts")
        if len(negative_prompts) not in (1, num_prompts):
            raise UserError(f"give one negative prompt for all prompts or one per prompt ({num_prompts}), got {len(negative_prompts)}")
        negative = self.prompt_cache.encode(self.model.prompts, negative_prompts, self.device, size).to(self.dtype)
        if self.kind == "lora":
            if negative_scale is not None:
                raise UserError("an LCM without an ω input (an LCM-LoRA, PixArt-LCM) takes a negative prompt into classifier-free guidance "
                                "at the guidance scale, as diffusers does; the negative scale applies to LCMs: leave it out")
            if guidance_scale <= 1:
                raise UserError(f"an LCM without an ω input (an LCM-LoRA, PixArt-LCM) takes a negative prompt into classifier-free "
                                f"guidance, which needs a guidance scale above 1 (got {guidance_scale:g}; diffusers ignores it there): "
                                "give e.g. 1.5")
            return self.model.consistency_model(guidance_scale, negative, size)
        scale = DEFAULT_NEGATIVE_SCALE if negative_scale is None else negative_scale
        return NegativePromptGuidance(self.model.consistency_model(guidance_scale, size=size), negative, scale)

    @torch.no_grad()
    def __call__(self, prompts: list[str], timesteps: torch.Tensor | None = None, guidance_scale: float | None = None,
                 seeds: list[int] | None = None, height: int | None = None, width: int | None = None, *, steps: int | None = None,
                 gamma: float | None = None, init_images: torch.Tensor | None = None, strength: float | None = None,
                 negative_prompts: list[str] | None = None, negative_scale: float | None = None) -> torch.Tensor:
        """Images in [-1, 1] for `prompts` (the VAE's output clamped, as diffusers' postprocessing clamps it), one generator
        per image: `generator(["a prompt"], steps=4)`, and `grids.to_pil` makes them PIL images.

        `timesteps` (custom ones) or `steps` (N of the model's; 4 without either) set the steps. What is left out is
        what `lcm generate` takes (`call_defaults`): the model's recorded g, image i at seed i, the model's native size.

        `gamma` None samples with Algorithm 3 (`sample_lcm`, as LCMScheduler); γ ∈ [0, 1] with TCD's strategic stochastic
        sampling (`sample_tcd`, as TCDScheduler with eta = γ). `init_images` ([B, 3, H, W] in [-1, 1], or [1, 3, H, W]
        for every prompt; H, W = height, width) makes it img2img: the images are noised to `timesteps[0]`
        (`img2img_start`), which `timesteps(steps, strength=strength)` puts at `strength`'s start timestep; left out,
        strength is `DEFAULT_STRENGTH` (0.8, as `lcm generate`, `lcm serve` and diffusers) with `steps`, 1 with custom
        timesteps (their first says where img2img starts). `gamma` needs 2 steps or more (`sampling.check_tcd_steps`).
        `negative_prompts` (one per prompt, or one for all) guide the images away from them (`consistency_function`).
        """
        guidance_scale, seeds, height, width = self.call_defaults(prompts, guidance_scale, seeds, height, width)
        self.check_call(prompts, seeds, guidance_scale, height, width)
        if strength is None:
            strength = DEFAULT_STRENGTH if init_images is not None and timesteps is None else 1.0
        check_real(strength, "strength", "img2img's fraction of the noise schedule, in (0, 1]")
        check_strength(strength)
        timesteps = self.call_timesteps(timesteps, steps, strength)
        if gamma is not None:
            gamma = check_gamma(gamma)
            check_tcd_steps(len(timesteps))
        f = self.consistency_function(guidance_scale, len(prompts), negative_prompts, negative_scale, (height, width))
        if init_images is None and strength != 1:
            raise UserError(f"strength {strength:g} applies to img2img: give init images, or leave strength out")
        latents, cond, generators = self.start(prompts, seeds, height, width)
        if init_images is not None:
            latents = self.img2img_start(latents, timesteps, init_images, strength)
        omega = omega_from_guidance_scale(guidance_scale)
        if gamma is None:
            x0 = sample_lcm(f, latents, timesteps, cond, omega, f.schedule, generators)
        else:
            x0 = sample_tcd(f, latents, timesteps, cond, omega, f.schedule, gamma, generators)
        return self.model.codec.decode(x0).clamp(-1, 1)  # the VAE's output overshoots; diffusers' postprocess clamps too


class SolverGenerator(Generator):
    """A diffusion model sampled with an ODE solver (DDIM, DPM-Solver, DPM-Solver++): classifier-free guidance, or for
    a guidance-distilled model (an ω input) one network evaluation per step."""

    sampler: str = "ddim"
    kind = "solver"

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
             sampler: str = "ddim", *, sampler_flag: str | None = None) -> SolverGenerator:
        """A diffusion model on `device` in `dtype` (by default float32 on the CPU, as `LCMGenerator.load`), sampled with
        `sampler` (one of `sampling.TEACHER_SAMPLERS`, checked before the model loads). An LCM is refused, pointing to
        `LCMGenerator.load`, or to `sampler_flag` lcm where a command's flag (`--sampler`) chose the sampler."""
        if sampler not in TEACHER_SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(TEACHER_SAMPLERS)}")
        device, dtype = placement(device, dtype)
        model = load_diffusion_model(path, dtype, device)
        if model.is_lcm:
            raise UserError(f"{path} is an LCM: sample it with " + (f"{sampler_flag} lcm" if sampler_flag else "LCMGenerator.load"))
        if model.time_cond_proj_dim is not None:  # a guidance-distilled model: the range its ω input learned, and its default g
            model.guidance_record = guidance_record_of(model.source)
        generator = cls(model, device, dtype)
        generator.sampler = sampler
        return generator

    def default_steps(self) -> int:
        """A progressive round's own DDIM steps (`DiffusionModel.distilled_steps`: it samples in the steps it was distilled
        for), else `DEFAULT_STEPS`."""
        return self.model.distilled_steps or DEFAULT_STEPS

    def timesteps(self, steps: int, custom: list[int] | None = None) -> int:
        """`steps`, checked: an ODE solver spaces its own timesteps (`sampling.sample_teacher`), so it takes no `custom` ones."""
        if custom is not None:
            raise UserError("custom timesteps apply to LCMs; an ODE solver takes a step count: timesteps(steps), without custom=")
        if not is_integer(steps) or not 1 <= steps <= self.model.schedule.num_train_timesteps:
            raise UserError(f"steps must be an integer between 1 and {self.model.schedule.num_train_timesteps}, got {steps!r}")
        return steps

    @torch.no_grad()
    def __call__(self, prompts: list[str], steps: int | None = None, guidance_scale: float | None = None, seeds: list[int] | None = None,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Images in [-1, 1] for `prompts`, one generator per image: `generator(["a prompt"], steps=25)`. What is left out is
        what `lcm generate --sampler` takes (`default_steps`, `call_defaults`)."""
        guidance_scale, seeds, height, width = self.call_defaults(prompts, guidance_scale, seeds, height, width)
        self.check_call(prompts, seeds, guidance_scale, height, width)
        steps = self.timesteps(self.default_steps() if steps is None else steps)
        latents, cond, _ = self.start(prompts, seeds, height, width)
        uncond = self.prompt_cache.uncond(self.model.prompts, self.device, (height, width)).to(self.dtype).expand(len(prompts), -1, -1)
        z0 = sample_teacher(self.model.guided_teacher(), self.sampler, latents, cond, uncond, guidance_scale, steps, self.model.scheduler_config)
        return self.model.codec.decode(z0).clamp(-1, 1)  # as `LCMGenerator.__call__`
