"""`lcm finetune`: latent consistency fine-tuning (Algorithm 4) of an LCM or LCM-LoRA on a user's data, no teacher;
every `FinetuneConfig` field is a flag."""

from __future__ import annotations

from latent_consistency.cli.training_flags import add_training_flags, run_training
from latent_consistency.training.config import FinetuneConfig


def run(args) -> None:
    run_training(args, FinetuneConfig)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a latent consistency model on your own images, without a teacher (LCF)",
        description="Latent consistency fine-tuning (Algorithm 4 of Luo et al. 2023): z_{t_{n+k}} and z_{t_n} noised from the "
        "same data latent with the same ε; the student f_θ at t_{n+k} is pulled to its EMA target f_θ⁻ at t_n. An LCM "
        "(full, or new LoRA adapters on it) or an LCM-LoRA on its base model; held-out data with --eval-data or "
        "--eval-fraction; exact resume.",
    )
    add_training_flags(p, FinetuneConfig, {})
    p.set_defaults(run=run)
