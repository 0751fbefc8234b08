"""`lcm distill`: latent consistency distillation (Algorithm 1) from the command line.

Every `TrainConfig` field is a flag (`--lr 1e-4`, `--solver dpm++`, `--no-guide-increments`); the config is
resolved as preset <- --config FILE <- flags, printed by --dry-run, and handed to the training loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from latent_consistency.training.config import FIELD_HELP, PRESETS, TrainConfig, resolve_config


def _flag_type(annotation: str):
    if "bool" in annotation:
        return "bool"
    if "list" in annotation:
        return "list"
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return str


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, default None so that unset flags do not override the preset or file."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training configuration (defaults: the preset, then --config FILE)")
    for f in dataclasses.fields(TrainConfig):
        kind = _flag_type(str(hints[f.name]))
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{FIELD_HELP[f.name]} (default: {default!r})"
        if kind == "bool":
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "list":
            group.add_argument(name, dest=f.name, nargs="*", default=None, help=help_text)
        else:
            group.add_argument(name, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return resolve_config(args.preset, args.config, overrides)


def run(args) -> None:
    from latent_consistency.training.loop import train

    config = config_from_args(args)
    if args.dry_run:
        print(json.dumps(config.check().to_dict(), indent=1))
        return
    path = train(config, resume=args.resume)
    if path is not None:
        print(f"exported {path}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a Stable-Diffusion-style teacher into a latent consistency model (LCD)",
        description="Latent consistency distillation (Algorithm 1 of Luo et al. 2023): a guided teacher's "
        "PF-ODE jump t_{n+k} -> t_n supervises a student f_θ against its EMA target f_θ⁻. Full UNet or LoRA, "
        "DDIM / DPM-Solver / DPM-Solver++ teacher solvers, exact resume.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting config: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", help="JSON file of config fields, applied over the preset")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)
    p.set_defaults(run=run)
