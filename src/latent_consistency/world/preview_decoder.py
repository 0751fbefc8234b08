"""A preview decoder for the world (`lcm world preview-decoder`): a tiny TAESD-style `AutoencoderTiny` (Bohan 2023;
`latent_consistency.preview`) distilled from the world VAE, for `lcm generate --preview-decoder`.

As TAESD is distilled from SD's VAE: the tiny decoder learns the VAE's decoder, D(z) (clamped to [-1, 1]), not the
images, on the latents z = E(x) of the world's training images (scaled, `models.LatentCodec`; the tiny model's
`scaling_factor` is 1.0, as TAESD's), with the world VAE's foreground-weighted L1 + L2 loss (`world.vae.vae_loss`: an
object covers a few % of an image). Sampled latents are not exactly E(x) of any image, so as many again are perturbed,
z + σ·ε with σ ~ U[0, `latent_noise`], with D of those as targets (in a trial of about 1000 steps this raised the
preview's PSNR against D on the world's teacher samples from 25.8 to 27.3 dB). Its small encoder learns E(x) on the same images (the decoder is what
previews use; the encoder makes the folder a whole AutoencoderTiny that diffusers can also encode with).

The latents and targets are computed once, into `<out>.partial/`, with the training's checkpoints (`world.fit`): a
rerun resumes, of the same settings and the same world VAE only (its weights' digest is recorded, as a training run
records its models': a resume on another VAE at the world's path is refused, where it would train on the old VAE's
targets); the finished folder is `AutoencoderTiny.save_pretrained`'s plus `preview_quality.json` (PSNR against D
on held-out latents) and `preview_grid.png` (real, VAE, preview rows).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latent_consistency.errors import UserError
from latent_consistency.grids import image_grid, save_png
from latent_consistency.outputs import check_partial, move_into_place, partial_folder, permit_as_umask, write_atomic, write_json_atomic
from latent_consistency.preview import PreviewDecoder
from latent_consistency.progress import progress_bar
from latent_consistency.training.sources import model_digest
from latent_consistency.world.artifact import World, load_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.fit import Checkpointer, Phase
from latent_consistency.world.presets import warmup_cosine
from latent_consistency.world.vae import foreground_weights

QUALITY_FILE, GRID_FILE, DATA_FILE = "preview_quality.json", "preview_grid.png", "data.safetensors"
BATCH = 256  # latents per call of the world's VAE while the targets are made
# The widest preview decoder made: 4x TAESD's 64, already ~250x the default's weights (they grow as the width squared);
# --channels 100000 asked for ~10^11 weights and ended in the memory allocator's traceback
MAX_CHANNELS = 256


@dataclass(frozen=True)
class PreviewDecoderConfig:
    """How the world's preview decoder is made; the defaults take about 5 minutes on one CPU thread (2 shared with other jobs)."""

    channels: int = 16  # the width of every stage (TAESD's is 64; diffusers' DecoderTiny keeps one width throughout)
    blocks: int = 2  # AutoencoderTinyBlocks per decoder stage below full resolution (one at full resolution, as TAESD)
    steps: int = 2000
    batch_size: int = 64  # latents per step; the encoder learns from a quarter as many images
    lr: float = 5e-3
    images: int = 2048  # training images, each encoded once; as many perturbed latents again
    latent_noise: float = 0.6  # the largest σ of a perturbed latent's noise
    foreground_weight: float = 20.0  # as the world VAE's loss
    held_out: int = 512  # reference images whose latents measure the PSNR against D
    checkpoint_every: int = 250
    seed: int = 0


def make_preview_decoder(latent_channels: int, factor: int, config: PreviewDecoderConfig):
    """A random `AutoencoderTiny` for latents `factor`x smaller than the images: log2(factor) upsamplings."""
    from diffusers import AutoencoderTiny

    stages = int(math.log2(factor)) + 1
    if 2 ** (stages - 1) != factor:
        raise UserError(f"a tiny decoder upsamples by powers of 2; the world VAE's factor is {factor}")
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(config.channels,) * stages,
        decoder_block_out_channels=(config.channels,) * stages,
        num_encoder_blocks=(1,) * stages,
        num_decoder_blocks=(config.blocks,) * (stages - 1) + (1,),
        scaling_factor=1.0,  # it takes the scaled latents the diffusion model sees, as TAESD does
    )


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) of `images` (clamped) against `reference`, both in [-1, 1] read as [0, 1]."""
    mse = ((images.clamp(-1, 1) - reference.clamp(-1, 1)) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


@torch.no_grad()
def encode_decode(world: World, images: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z = E(x), D(z) clamped to [-1, 1]) of images in [-1, 1], on the CPU."""
    codec, device = world.codec, world.model.vae.device
    latents, decoded = [], []
    for start in progress_bar(range(0, len(images), BATCH), desc="encode and decode", unit="batch", disable=not progress):
        z = codec.encode(images[start : start + BATCH].to(device))
        latents.append(z.float().cpu())
        decoded.append(codec.decode(z).clamp(-1, 1).float().cpu())
    return torch.cat(latents), torch.cat(decoded)


@torch.no_grad()
def distillation_data(world: World, config: PreviewDecoderConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """The training set: images x of the world's training split, z = E(x) and z + σ·ε, and D of each; contiguous, as a
    rerun reads them back from DATA_FILE: the VAE gives channels-last tensors, and the convolutions of a run that trained
    on those and of a rerun that trained on the file's came out apart in the last bits, so that a run stopped and run
    again ended on other weights than one left to finish."""
    p = world.preset
    dataset = get_dataset(p.dataset, "train", p.resolution, seed=p.seed, size=min(config.images, p.train_size))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    latents, targets = encode_decode(world, images, progress)
    generator = torch.Generator().manual_seed(config.seed)
    sigma = torch.rand(len(latents), 1, 1, 1, generator=generator) * config.latent_noise
    perturbed = latents + sigma * torch.randn(latents.shape, generator=generator)
    perturbed_targets = torch.cat([world.codec.decode(perturbed[i : i + BATCH].to(world.model.vae.device)).clamp(-1, 1).float().cpu()
                                   for i in range(0, len(perturbed), BATCH)])
    data = {"images": images, "image_latents": latents, "latents": torch.cat([latents, perturbed]),
            "targets": torch.cat([targets, perturbed_targets])}
    return {name: tensor.contiguous() for name, tensor in data.items()}


def train_preview_decoder(tiny, data: dict[str, torch.Tensor], config: PreviewDecoderConfig, phase: Phase) -> list[float]:
    """Distil: per step, the decoder's weighted L1 + L2 against D(z) on `batch_size` latents and the encoder's L1 + L2
    against E(x) on a quarter as many images (separate parameters: the two losses just add). Returns the loss per step."""
    device, generator = phase.device, phase.generator
    latents, targets = data["latents"].to(device), data["targets"].to(device)
    images, image_latents = data["images"].to(device), data["image_latents"].to(device)
    tiny.to(device).train()
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, config.steps)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(len(latents), (config.batch_size,), device=device, generator=generator)
        target = targets[index]
        error = tiny.decode(latents[index]).sample - target
        weights = foreground_weights(target, config.foreground_weight)
        decoder = ((weights * (error.abs() + error.square())).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * 3)).mean()
        index = torch.randint(len(images), (max(1, config.batch_size // 4),), device=device, generator=generator)
        error = tiny.encode(images[index]).latents - image_latents[index]
        return decoder + (error.abs() + error.square()).mean()

    losses = phase.fit(dict(tiny=tiny), optimizer, scheduler, loss_fn, config.steps, "preview decoder")
    tiny.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def preview_quality(world: World, preview: PreviewDecoder, n: int, out: Path | None = None) -> dict:
    """PSNR (dB) of the preview decoder's images against the VAE's D(z) and against the real images, on the latents of
    the first `n` held-out reference images; the VAE's own PSNR against them for scale. With `out`, also writes a grid
    of 12 of them (rows: real, VAE, preview)."""
    p = world.preset
    reference = get_dataset(p.dataset, REFERENCE_SPLITS[p.dataset], p.resolution, seed=p.seed)
    real = torch.stack([reference[i]["image"] for i in range(min(n, len(reference)))])
    latents, decoded = encode_decode(world, real)
    previews = torch.cat([preview.decode(latents[i : i + BATCH]).float().cpu() for i in range(0, len(latents), BATCH)])
    if out is not None:
        save_png(image_grid([real[:12], decoded[:12], previews[:12].clamp(-1, 1)], ["real", "VAE decoder", "preview decoder"], scale=3),
                 out / GRID_FILE)
    return {"num_images": len(real), "psnr_preview_vs_vae": psnr(previews, decoded), "psnr_preview_vs_real": psnr(previews, real),
            "psnr_vae_vs_real": psnr(decoded, real)}


def _read_settings(path: Path) -> dict | None:
    """The settings an unfinished run saved in `path`; None for a file that is not JSON (not ours, or cut short)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError among them
        return None


def run_settings(world_dir: str | Path, config: PreviewDecoderConfig) -> dict:
    """What a run's data and weights depend on, recorded in its work folder: the world (its folder, and its VAE's weights
    and config as `training.sources.model_digest` reads them: D(z) and E(x) are that VAE's) and the config."""
    world = Path(world_dir).resolve()
    return {"world": str(world), "world_vae": model_digest(str(world / "vae")), "config": asdict(config)}


def check_resume(work: Path, settings: dict, world_dir: str | Path) -> None:
    """A UserError unless the unfinished run in `work` (if any) has `settings`: other settings, or the same world folder
    with another VAE in it (trained again, or another world built there), whose data and checkpoints would go on from
    the old VAE's targets. Refused, as a training run on another model at the same path is (`training.sources`): its
    work stays to resume once the world is put back."""
    saved = _read_settings(work / "settings.json") if (work / "settings.json").is_file() else settings
    if saved == settings:
        return
    if isinstance(saved, dict) and "world_vae" in saved and saved | {"world_vae": settings["world_vae"]} == settings:
        raise UserError(f"the world {world_dir} is not the one {work} started from: its VAE's weights or config changed since (its "
                        "settings.json says); put that world back to resume, or remove that folder to start again")
    raise UserError(f"{work} holds an unfinished preview decoder of other settings; give the same settings to resume it, "
                    "or remove that folder")


def check_config(config: PreviewDecoderConfig) -> None:
    """A UserError for settings no run can use, before the world loads or a weight is made: a count below 1, or a width
    outside 1 to MAX_CHANNELS."""
    if config.steps < 1 or config.images < 1 or config.batch_size < 1:
        raise UserError("--steps, --images and --batch-size must be at least 1")
    if not 1 <= config.channels <= MAX_CHANNELS:
        raise UserError(f"--channels {config.channels} is outside 1 to {MAX_CHANNELS}: a preview decoder is a small, fast one "
                        f"(the default is {PreviewDecoderConfig.channels}, TAESD's 64); give at most {MAX_CHANNELS}")


def build_preview_decoder(world_dir: str | Path, out_dir: str | Path, config: PreviewDecoderConfig = PreviewDecoderConfig(),
                          device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Distil the world's preview decoder into `out_dir` (new or empty; resumes from `<out_dir>.partial`); returns it."""
    work = partial_folder(out_dir, "../preview")
    out = Path(out_dir)
    settings = run_settings(world_dir, config)
    if (out / QUALITY_FILE).is_file() and (work / "settings.json").is_file() and _read_settings(work / "settings.json") == settings:
        shutil.rmtree(work)  # a run of these settings killed after it moved its decoder into `out`: only this was left to do
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is a file or a folder that is not empty; give a new or empty folder")
    check_config(config)
    check_partial(work, "settings.json", "`lcm world preview-decoder`")  # resumed from its settings, data and checkpoints
    check_resume(work, settings, world_dir)
    start = time.perf_counter()
    world = load_world(world_dir, device)
    device = world.model.vae.device
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "settings.json", settings, indent=2)
    try:
        data = load_file(str(work / DATA_FILE)) if (work / DATA_FILE).is_file() else None
    except SafetensorError:  # half written when a run was killed: made again
        data = None
    if data is None:
        data = distillation_data(world, config, progress)
        write_atomic(work / DATA_FILE, lambda tmp: save_file(data, str(tmp)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        tiny = make_preview_decoder(world.codec.latent_channels, world.codec.downsampling_factor, config)
    phase = Phase(device, torch.Generator(device).manual_seed(config.seed), Checkpointer(work / "checkpoints", config.checkpoint_every),
                  progress)
    losses = train_preview_decoder(tiny, data, config, phase)
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    tiny.save_pretrained(str(stage), safe_serialization=True)
    quality = preview_quality(world, PreviewDecoder(tiny, str(out)), config.held_out, stage)
    # training_images: --images, or the world's training split where that holds fewer (`distillation_data`)
    report = {"world": str(world_dir), "config": asdict(config), "training_images": len(data["images"]), "quality": quality,
              "first_loss": losses[0], "last_loss": losses[-1],
              "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    (stage / QUALITY_FILE).write_text(json.dumps(report, indent=2))
    permit_as_umask(stage)  # safetensors writes the weights readable by their owner alone
    move_into_place(stage, out)  # empty, checked above, or missing
    shutil.rmtree(work)
    return out
