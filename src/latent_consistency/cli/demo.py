"""`lcm demo`: the README's main job on the built-in world (`world.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latent_consistency.cli.arguments import positive_int


def run(args) -> None:
    from latent_consistency.errors import UserError
    from latent_consistency.world.demo import run_demo

    if not args.out.strip():
        raise UserError("--out is empty; give the demo's output folder (default runs/demo)")
    run_demo(Path(args.out), args.world, args.distill_steps, args.eval_samples, args.device, args.world_preset, args.finetune_steps)


def register(subparsers) -> None:
    from latent_consistency.world import demo

    p = subparsers.add_parser("demo", help="the main job: distil the built-in world's teacher into an LCM and compare samplers",
                              description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--world", help="world folder (default: the world shipped with the package)")
    p.add_argument("--distill-steps", type=positive_int, help="distillation steps (default: the `world` preset's)")
    p.add_argument("--finetune-steps", type=positive_int, help="fine-tuning steps on digits (default: the `world` fine-tuning preset's)")
    p.add_argument("--eval-samples", type=positive_int, default=200, help="reference prompts in the evaluation (default 200)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--world-preset", default="default",
                   help="world preset: default (shipped) or one to build, e.g. tiny (a plumbing run in minutes) or tiny-sdxl "
                        "(the same with an SDXL-architecture teacher)")
    p.set_defaults(run=run)
