"""The world's preview decoder (`lcm world preview-decoder`) against its VAE's decoder: PSNR, FID and prompt alignment.

    python benchmarks/preview_decoder_world.py --preview runs/world-preview --out runs/preview-quality [--samples 1000]

The same latents are decoded both ways: E(x) of the world's held-out reference images; the teacher's samples for the
reference prompts (classifier-free guidance g = 7.5) with DPM-Solver++ at 25 steps (the world's quality check) and
DDIM at 4 steps; and, when --lcm names an LCM folder (`lcm demo` writes runs/demo/distill/lcm), its 4-step samples at
the demo's g = 2. Per set: the preview's PSNR against the VAE's images, and the world judge's FID (its features,
against the real reference images) and prompt alignment of each decoding. Writes preview_decoder.json, a markdown
table preview_decoder.md and grid.png (the first 12 of each set, VAE row over preview row) into OUT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latent_consistency.grids import image_grid, save_png
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.preview import load_preview_decoder
from latent_consistency.sampling import randn, sample_teacher
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.demo import reference_set
from latent_consistency.world.judge import judge_scores
from latent_consistency.world.preview_decoder import psnr

TEACHER = (("teacher DPM-Solver++ 25 steps", "dpm++", 25), ("teacher DDIM 4 steps", "ddim", 4))
TEACHER_GUIDANCE, LCM_GUIDANCE, BATCH = 7.5, 2.0, 250


@torch.no_grad()
def teacher_latents(world, prompts: list[str], sampler: str, steps: int) -> torch.Tensor:
    model, out = world.model, []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        z_T = randn((len(chunk), model.unet.config.in_channels, world.preset.latent_size, world.preset.latent_size), generators, "cpu", torch.float32)
        cond, uncond = model.prompts.encode(chunk), model.prompts.uncond().expand(len(chunk), -1, -1)
        out.append(sample_teacher(model.guided_teacher(), sampler, z_T, cond, uncond, TEACHER_GUIDANCE, steps, model.scheduler_config))
    return torch.cat(out)


@torch.no_grad()
def decode_both(world, preview, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.cat([world.codec.decode(latents[i:i + BATCH]).clamp(-1, 1) for i in range(0, len(latents), BATCH)])
    fast = torch.cat([preview.decode(latents[i:i + BATCH]).clamp(-1, 1) for i in range(0, len(latents), BATCH)])
    return full, fast


def lcm_images(lcm: str, preview_dir: str | None, prompts: list[str], size: int) -> torch.Tensor:
    generator = LCMGenerator.load(lcm, torch.device("cpu"), torch.float32)
    if preview_dir is not None:
        generator.use_preview_decoder(preview_dir)
    timesteps = generator.timesteps(4)
    return torch.cat([generator(prompts[i:i + BATCH], timesteps, LCM_GUIDANCE, list(range(i, i + len(prompts[i:i + BATCH]))), size, size)
                      .clamp(-1, 1) for i in range(0, len(prompts), BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preview", required=True, help="the preview decoder folder (`lcm world preview-decoder --out`)")
    parser.add_argument("--world", default=None, help="world folder (default: the shipped one)")
    parser.add_argument("--lcm", default="runs/demo/distill/lcm", help="an LCM of the world; skipped when missing")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    world = load_world(args.world or default_world_path())
    preview = load_preview_decoder(args.preview).check_fits(world.codec.latent_channels, world.codec.downsampling_factor)
    prompts, attributes, real = reference_set(world, world.dataset, args.samples)

    sets = {"real images' latents E(x)": decode_both(world, preview, world.codec.encode(real))}
    for label, sampler, steps in TEACHER:
        sets[f"{label}, g={TEACHER_GUIDANCE:g}"] = decode_both(world, preview, teacher_latents(world, prompts, sampler, steps))
        print(f"[{time.perf_counter() - t0:.0f}s] {label}", flush=True)
    if (Path(args.lcm) / "model_index.json").is_file():
        sets[f"LCM 4 steps, g={LCM_GUIDANCE:g}"] = tuple(lcm_images(args.lcm, p, prompts, world.resolution) for p in (None, args.preview))
    else:
        print(f"no LCM at {args.lcm}: LCM samples not measured", flush=True)

    results, lines = {}, ["| latents | decoder | FID (judge) | alignment | PSNR vs VAE (dB) |", "|---|---|---|---|---|"]
    for label, (full, fast) in sets.items():
        row = {"psnr_preview_vs_vae": psnr(fast, full), "vae": judge_scores(world.judge, full, attributes, real),
               "preview": judge_scores(world.judge, fast, attributes, real)}
        results[label] = row
        for name in ("vae", "preview"):
            r = row[name]
            lines.append(f"| {label} | {name} | {r['fid']:.2f} | {r['alignment']['mean']:.3f} | "
                         f"{row['psnr_preview_vs_vae']:.1f} |" if name == "preview" else f"| {label} | {name} | {r['fid']:.2f} | "
                         f"{r['alignment']['mean']:.3f} | |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "samples": len(prompts), "preview": args.preview, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / "preview_decoder.json").write_text(json.dumps(meta | {"sets": results}, indent=2))
    (out / "preview_decoder.md").write_text("\n".join(lines) + "\n")
    rows = [images[:12] for pair in sets.values() for images in pair]
    labels = [f"{label[:22]} {name}" for label in sets for name in ("VAE", "preview")]
    save_png(image_grid(rows, labels, scale=3, label_width=220), out / "grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
