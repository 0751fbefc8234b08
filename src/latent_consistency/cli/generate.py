"""`lcm generate`: prompts -> PNG files with a latent consistency model (Algorithm 3): a full LCM (its guidance
scale is the ω input), or a diffusion model with an LCM-LoRA (`--lora`; no ω input, so g > 1 is classifier-free
guidance, as in diffusers).

Every input is checked before the first file is written. Image i of a run is drawn from its own
generator seeded with `seed + i`, so an image does not depend on the batch size it was made in.
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latent_consistency.denoisers import ConsistencyModel, GuidedTeacher, UNetNetwork
from latent_consistency.errors import UserError
from latent_consistency.grids import save_png, to_pil
from latent_consistency.models import DiffusionModel, encode_prompts, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import check_custom_timesteps, lcm_timesteps, randn, sample_lcm
from latent_consistency.schedule import NoiseSchedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The paper trains ω ∈ [2, 14] (g ∈ [3, 15]); far outside the trained range the ω embedding is meaningless.
MAX_GUIDANCE_SCALE = 30.0
# Default g: an LCM's ω input (the paper's ω = 7), and an LCM-LoRA's classifier-free guidance (none: its guidance
# was distilled in; diffusers recommends 1-2 for LCM-LoRA).
DEFAULT_GUIDANCE_SCALE = {"lcm": 8.0, "lora": 1.0}


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise UserError("float16 is not supported on the CPU; use --dtype float32 or bfloat16")
    return DTYPES[name]


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """Prompts from the command line, then from a file ('-': standard input; one per line, blank lines ignored)."""
    prompts = [p for p in prompts if p.strip()]
    if prompt_file is not None:
        path = Path(prompt_file)
        if prompt_file != "-" and not path.exists():
            raise UserError(f"prompt file {prompt_file} does not exist")
        if path.is_dir():
            raise UserError(f"prompt file {prompt_file} is a folder; give a text file with one prompt per line")
        try:  # a regular file, or a pipe such as <(...)
            text = sys.stdin.read() if prompt_file == "-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read prompt file {prompt_file}: {err}") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip()]
        if not from_file:
            raise UserError(f"prompt file {prompt_file} holds no prompts; write one prompt per line")
        prompts += from_file
    if not prompts:
        raise UserError("no prompts given; pass prompts as arguments or --prompt-file FILE")
    return prompts


def check_output_folder(out: str) -> Path:
    """Create the output folder and prove it is writable, before any work is done."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {out}: {err.strerror or err}") from None
    return path


def image_filename(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"
    return f"{index:04d}-{slug}.png"


@dataclass
class LCMGenerator:
    """An LCM and its sampling settings, ready to turn prompts into images."""

    model: DiffusionModel
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, lora: str | None = None) -> "LCMGenerator":
        model = load_lcm(path, dtype, device) if lora is None else load_lcm_lora(path, lora, dtype, device)
        return cls(model, device, dtype)

    @property
    def kind(self) -> str:
        """lcm: the guidance scale is the ω input; lora: no ω input, the guidance scale is classifier-free guidance."""
        return "lcm" if self.model.time_cond_proj_dim is not None else "lora"

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.model.scheduler_config)

    @property
    def original_inference_steps(self) -> int:
        return int(self.model.scheduler_config.get("original_inference_steps", 50))

    def timesteps(self, steps: int | None, custom: list[int] | None = None) -> torch.Tensor:
        T = self.schedule.num_train_timesteps
        if custom:
            return check_custom_timesteps(custom, T)
        return lcm_timesteps(steps, T, self.original_inference_steps)

    def default_size(self) -> int:
        return int(self.model.unet.config.sample_size) * self.model.codec.downsampling_factor

    def check_size(self, height: int, width: int) -> None:
        factor = self.model.codec.downsampling_factor
        for name, value in (("height", height), ("width", width)):
            if value < factor or value % factor:
                raise UserError(f"--{name} {value} must be a positive multiple of the VAE factor {factor}")

    def consistency_model(self, guidance_scale: float = 1.0) -> ConsistencyModel:
        """f_θ; for an LCM-LoRA with g > 1 its network output is classifier-free guided against the empty prompt,
        as diffusers' StableDiffusionPipeline with an LCMScheduler guides it (an LCM takes g through its ω input)."""
        cfg = self.model.scheduler_config
        network = UNetNetwork(self.model.unet)
        if self.kind == "lora" and guidance_scale > 1:
            uncond = encode_prompts(self.model.tokenizer, self.model.text_encoder, [""], self.device).to(self.dtype)
            guided, omega = GuidedTeacher(network, self.schedule, self.model.prediction_type), omega_from_guidance_scale(guidance_scale)

            def network(z, t, cond, timestep_cond=None):
                return guided.guided_output(z, t, cond, uncond.expand(len(z), -1, -1), omega)
        return ConsistencyModel(
            network,
            self.schedule,
            self.model.prediction_type,
            time_cond_proj_dim=self.model.time_cond_proj_dim,
            timestep_scaling=float(cfg.get("timestep_scaling", 10.0)),
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], timesteps: torch.Tensor, guidance_scale: float, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Images in [-1, 1] for `prompts`, one generator per image."""
        codec = self.model.codec
        factor = codec.downsampling_factor
        shape = (len(prompts), codec.latent_channels, height // factor, width // factor)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = randn(shape, generators, self.device, self.dtype)
        cond = encode_prompts(self.model.tokenizer, self.model.text_encoder, prompts, self.device).to(self.dtype)
        omega = omega_from_guidance_scale(guidance_scale)
        x0 = sample_lcm(self.consistency_model(guidance_scale), latents, timesteps, cond, omega, self.schedule, generators)
        return codec.decode(x0)


def run(args) -> None:
    prompts = read_prompts(args.prompts, args.prompt_file)
    guidance_scale = DEFAULT_GUIDANCE_SCALE["lcm" if args.lora is None else "lora"] if args.guidance_scale is None else args.guidance_scale
    if guidance_scale < 0 or guidance_scale > MAX_GUIDANCE_SCALE:
        raise UserError(
            f"--guidance-scale {guidance_scale} is outside [0, {MAX_GUIDANCE_SCALE:g}]; "
            "LCMs are distilled with guidance scales around 3-15 (paper ω ∈ [2, 14])"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    generator = LCMGenerator.load(args.model, device, dtype, args.lora)
    custom = [int(t) for t in args.timesteps.split(",")] if args.timesteps else None
    timesteps = generator.timesteps(args.steps, custom)
    height = args.height or generator.default_size()
    width = args.width or generator.default_size()
    generator.check_size(height, width)
    out = check_output_folder(args.out)

    batches = [range(i, min(i + args.batch_size, len(prompts))) for i in range(0, len(prompts), args.batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2):
        images = generator([prompts[i] for i in batch], timesteps, guidance_scale, [args.seed + i for i in batch], height, width)
        for i, image in zip(batch, to_pil(images)):
            save_png(image, out / image_filename(i, prompts[i]))
    print(f"wrote {len(prompts)} image(s) to {out}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images from prompts with a latent consistency model",
        description="Generate PNG images from text prompts with a latent consistency model in 1-8 steps "
        "(multistep consistency sampling, Algorithm 3 of Luo et al. 2023): a full LCM, or a diffusion model with an LCM-LoRA.",
    )
    p.add_argument("prompts", nargs="*", help="prompts, one image each")
    p.add_argument("--prompt-file", help="text file with one prompt per line, or - for standard input (added after PROMPTS)")
    p.add_argument("--model", required=True, help="LCM as a diffusers LatentConsistencyModelPipeline folder or hub id; "
                   "with --lora, the diffusion model the LoRA was distilled from")
    p.add_argument("--lora", help="an LCM-LoRA to load onto --model: the lora/ folder of `lcm distill --adapter lora`, "
                   "a .safetensors file or a hub id")
    p.add_argument("--steps", type=int, default=4, help="number of sampling steps, 1..T/k (default 4)")
    p.add_argument("--timesteps", help="custom decreasing timesteps instead of --steps, e.g. 999,759,499,259")
    p.add_argument("--guidance-scale", type=float, help="guidance scale g in diffusers' convention: an LCM's ω input, ω = g - 1 "
                   f"(default {DEFAULT_GUIDANCE_SCALE['lcm']:g}); for an LCM-LoRA, classifier-free guidance when g > 1, "
                   f"as diffusers applies it (default {DEFAULT_GUIDANCE_SCALE['lora']:g})")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of the VAE factor (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of the VAE factor (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--out", required=True, help="output folder for the PNG files (created if missing)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and latents dtype (default float32)")
    p.set_defaults(run=run)
