"""The sub-pixel upsamplers (`upsampling.py`) against diffusers' `Upsample2D`, on the CPU, side by side in one process.

    python benchmarks/upsampling_speed.py --lcm runs/demo/distill/lcm     # after `make demo`

1. The world's LCM, 4-step text to image at batch 64 (and 1), float32, eager: our generator as it is (sub-pixel) against
   the same generator with diffusers' modules put back; calls in turn, median of --repeats.
2. A Stable Diffusion-architecture VAE decoder (random weights, `[128, 256, 512, 512]`), a 32² latent to 256² px,
   batch 1: diffusers' `AutoencoderKL` as it is against a copy with its upsamplers replaced.
Each row also gives the largest difference between the two outputs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from latent_consistency.pipelines import LCMGenerator
from latent_consistency.upsampling import SubpixelUpsample, use_subpixel_upsampling

PROMPT = "a large red star at the top left on a gray background"


def with_diffusers_upsamplers(network: torch.nn.Module) -> None:
    """Put diffusers' `Upsample2D` back in place of every `SubpixelUpsample`, holding the same convolution."""
    from diffusers.models.upsampling import Upsample2D

    for name, module in list(network.named_modules()):
        if isinstance(module, SubpixelUpsample):
            plain = Upsample2D(module.conv.in_channels, use_conv=True, out_channels=module.conv.out_channels)
            plain.conv = module.conv
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent), child, plain)


def in_turn(fns, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, called in turn after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    return [statistics.median(record) for record in times]


@torch.no_grad()
def generator_row(lcm: str, batch: int, repeats: int) -> dict:
    ours, plain = (LCMGenerator.load(lcm, torch.device("cpu"), torch.float32) for _ in range(2))
    for network in (plain.model.unet, plain.model.vae):
        with_diffusers_upsamplers(network)
    size = ours.default_size()
    calls = [lambda g=g: g([PROMPT] * batch, g.timesteps(4), 2.0, list(range(batch)), size, size) for g in (ours, plain)]
    difference = (calls[0]() - calls[1]()).abs().max().item()
    t_ours, t_plain = in_turn(calls, repeats)
    return {"row": f"world LCM, 4 steps, batch {batch}, float32, eager (images/s)", "plain": batch / t_plain, "ours": batch / t_ours,
            "speedup": t_plain / t_ours, "difference": difference}


@torch.no_grad()
def sd_vae_row(repeats: int) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    plain = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                          block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=256).eval()
    ours = copy.deepcopy(plain)
    use_subpixel_upsampling(ours)
    z = torch.randn(1, 4, 32, 32)
    difference = (ours.decode(z).sample - plain.decode(z).sample).abs().max().item()
    t_ours, t_plain = in_turn([lambda: ours.decode(z), lambda: plain.decode(z)], repeats)
    return {"row": "SD-architecture VAE decoder, 32² latent to 256² px, batch 1 (s)", "plain": t_plain, "ours": t_ours,
            "speedup": t_plain / t_ours, "difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm", default="runs/demo/distill/lcm")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rows = [generator_row(args.lcm, 64, args.repeats), generator_row(args.lcm, 1, args.repeats), sd_vae_row(max(3, args.repeats // 3))]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| measured | diffusers' Upsample2D | sub-pixel | speed-up | max abs difference |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['plain']:.3g} | {r['ours']:.3g} | {r['speedup']:.2f}x | {r['difference']:.1e} |")


if __name__ == "__main__":
    main()
