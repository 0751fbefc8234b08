"""`lcm distill`: latent consistency distillation (Algorithm 1), its exact-target variant, or a stage of Guided-Distill (`--method`), from the
command line; every `DistillConfig` field is a flag (`--lr 1e-4`, `--solver dpm++`, `--no-guide-increments`)."""

from __future__ import annotations

from latent_consistency.cli.training_flags import add_training_flags, run_training
from latent_consistency.training.config import DistillConfig


def run(args) -> None:
    run_training(args, DistillConfig)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a Stable-Diffusion-style teacher into a latent consistency model (LCD), or Guided-Distill's stages",
        description="Latent consistency distillation (Algorithm 1 of Luo et al. 2023): a guided teacher's "
        "PF-ODE jump t_{n+k} -> t_n supervises a student f_θ against its EMA target f_θ⁻. Full UNet or LoRA, "
        "DDIM / DPM-Solver / DPM-Solver++ teacher solvers, exact resume. --method ode (ours): the same LCM regressed onto a "
        "bank of the teacher's whole ODE solutions, LCD's fixed point, solved once into the run folder. --method guidance and "
        "--method progressive: the two stages of the Guided-Distill baseline (Meng et al. 2023).",
    )
    add_training_flags(p, DistillConfig, {"objective": "is gone: fine-tune an LCM with `lcm finetune`"})
    p.set_defaults(run=run)
