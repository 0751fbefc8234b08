"""Quality over training: 1/2/4-step FID and prompt alignment of every checkpoint of a distillation run.

    python -m latent_consistency.evaluation.over_training --run runs/demo/distill --world WORLD [--samples 500]

Each checkpoint's target θ⁻ (the network that is exported) is sampled for the same reference prompts
and noise and scored with the world's judge. Writes `over_training.json`, `.md` and `.png` into the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from latent_consistency.evaluation.compare import SamplerSpec, sample, score
from latent_consistency.models import make_student_unet
from latent_consistency.training.config import config_from_dict
from latent_consistency.training.checkpoint import list_checkpoints

STEPS = (1, 2, 4)


def evaluate_run(run: Path, world, samples: int, guidance_scale: float | None = None, device="cpu") -> list[dict]:
    from latent_consistency.data.datasets import REFERENCE_SPLITS, get_dataset
    from safetensors.torch import load_file

    config = config_from_dict(json.loads((run / "config.json").read_text()))
    guidance_scale = config.validation_guidance_scale if guidance_scale is None else guidance_scale
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(min(samples, len(reference)))]
    prompts, attributes = [it["caption"] for it in items], [it["attributes"] for it in items]
    real = torch.stack([it["image"] for it in items])
    student = make_student_unet(world.model.unet, config.time_cond_proj_dim).to(device).eval()
    lcm = dataclasses.replace(world.model, unet=student, scheduler_config=world.model.scheduler_config | {
        "original_inference_steps": 1000 // config.skip, "prediction_type": config.student_prediction_type(world.prediction_type)})
    rows = []
    for path in list_checkpoints(run):
        weights = path / ("target.safetensors" if (path / "target.safetensors").is_file() else "student.safetensors")
        student.load_state_dict(load_file(str(weights), device=str(device)))
        step = json.loads((path / "state.json").read_text())["step"]
        row = {"step": step}
        for n in STEPS:
            s = score(world.judge, sample(SamplerSpec("lcm", n, guidance_scale), lcm, world.model, prompts, device=device), attributes, real)
            row[f"fid_{n}"], row[f"alignment_{n}"] = s["fid"], s["alignment"]["mean"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_report(run: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run / "over_training.json").write_text(json.dumps(rows, indent=1))
    lines = ["| step | " + " | ".join(f"FID {n}-step" for n in STEPS) + " | " + " | ".join(f"align {n}-step" for n in STEPS) + " |",
             "|---" * (1 + 2 * len(STEPS)) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[f'fid_{n}']:.2f}" for n in STEPS) + " | "
                     + " | ".join(f"{r[f'alignment_{n}']:.3f}" for n in STEPS) + " |")
    for n in STEPS:
        best = min(r[f"fid_{n}"] for r in rows)
        lines.append(f"\n{n}-step: final FID {rows[-1][f'fid_{n}']:.2f}, best {best:.2f} "
                     f"({100 * (rows[-1][f'fid_{n}'] / best - 1):.1f} % above the best)")
    (run / "over_training.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n in STEPS:
        ax.plot([r["step"] for r in rows], [r[f"fid_{n}"] for r in rows], marker="o", label=f"{n}-step")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (judge features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "over_training.png", dpi=120)


def main(argv=None) -> int:
    from latent_consistency.generate import resolve_device
    from latent_consistency.world.build import default_world_path, load_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a distillation run folder (full student) with checkpoints")
    parser.add_argument("--world", help="the world the run distilled (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--guidance-scale", type=float, help="default: the run's validation guidance scale")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    world = load_world(args.world or default_world_path(), device)
    rows = evaluate_run(Path(args.run), world, args.samples, args.guidance_scale, device)
    write_report(Path(args.run), rows)
    print((Path(args.run) / "over_training.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
