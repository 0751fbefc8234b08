"""Batch parts (`batch_parts.py`) against one call per batch, on the CPU, side by side in one process.

    python benchmarks/batch_parts_speed.py --lcm runs/demo/distill/lcm     # after `make demo`

Each row runs the same code twice in turn: as shipped (parts of `PART_BYTES` of feature maps) and with the part size
raised past the batch (one call, as before). Median of --repeats; the largest difference between the two outputs.
1. The world's VAE encoding a batch of 256 images (the latent cache's batch) and decoding 200 latents (a Table 1 row).
2. The world's LCM, 4-step text to image at batch 64, float32, eager (its decode is the part that changes).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager

import torch

from latent_consistency import batch_parts
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.world.artifact import default_world_path, load_world
from upsampling_speed import PROMPT, in_turn


@contextmanager
def one_call():
    """Parts larger than any batch: every network call takes the whole batch."""
    shipped, batch_parts.PART_BYTES = batch_parts.PART_BYTES, 2**62
    try:
        yield
    finally:
        batch_parts.PART_BYTES = shipped


def row(name: str, fn, repeats: int, unit: str = "ms") -> dict:
    def plain():
        with one_call():
            return fn()

    difference = (fn() - plain()).abs().max().item()
    t_parts, t_plain = in_turn([fn, plain], repeats)
    return {"row": f"{name} ({unit})", "plain": 1e3 * t_plain, "ours": 1e3 * t_parts, "speedup": t_plain / t_parts,
            "difference": difference}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm", default="runs/demo/distill/lcm")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    world = load_world(default_world_path(), torch.device("cpu"))
    torch.manual_seed(0)
    images = torch.rand(256, 3, 32, 32) * 2 - 1
    latents = world.codec.encode(images)
    generator = LCMGenerator.load(args.lcm, torch.device("cpu"), torch.float32)
    size = generator.default_size()
    rows = [
        row("world VAE, encode 256 images", lambda: world.codec.encode(images), args.repeats),
        row("world VAE, decode 200 latents", lambda: world.codec.decode(latents[:200]), args.repeats),
        row("world LCM, 4 steps, batch 64, float32, eager", lambda: generator([PROMPT] * 64, generator.timesteps(4), 2.0,
                                                                             list(range(64)), size, size), args.repeats),
    ]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, parts of {batch_parts.PART_BYTES // 2**20} MiB of feature maps\n")
    print("| measured | one call | in parts | speed-up | max abs difference |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['plain']:.1f} | {r['ours']:.1f} | {r['speedup']:.2f}x | {r['difference']:.1e} |")


if __name__ == "__main__":
    main()
