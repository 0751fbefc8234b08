"""A v-prediction teacher of the default world, distilled: loss falls and samples are images, not noise.

    python benchmarks/vprediction_world.py --from-world WORLD --out DIR [--teacher-steps 1500] [--distill-steps 300]
    python benchmarks/vprediction_world.py --from-world src/latent_consistency/assets/world_default \
        --latents runs/demo/latents --zero-terminal-snr --teacher-steps 3000 --samples 1000 --out DIR

`WORLD` is a finished ε-prediction build of the default preset (`lcm world build`), or an export with
`--latents` naming its latent cache (the demo writes one). Its tokenizer, judge, VAE, text encoder and
latent cache do not depend on the teacher, so they are copied and only the teacher (with
`--teacher-steps`, shorter than the preset's on a CPU; with `--zero-terminal-snr` on SD's schedule rescaled
to zero terminal SNR) and the quality report are rebuilt, with `build_world` and `prediction_type=
"v_prediction"`. The teacher is then distilled with the `world` training preset (the student learns
from the teacher's v outputs and predicts v, as the preset asks) and its 1/2/4-step samples are scored
with the judge next to the teacher's 25-step DPM-Solver++ ones, all at the preset's validation guidance scale. Writes `vprediction.md` into DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from latent_consistency.evaluation.compare import SamplerSpec, sample, sample_consistency
from latent_consistency.models import consistency_model, load_lcm, make_student_unet
from latent_consistency.training.config import DistillConfig, resolve_config
from latent_consistency.training.loop import train
from latent_consistency.world.artifact import WORLD_FILE, load_world
from latent_consistency.world.build import OUTPUTS, PHASES, STATE_FILE, build_world, world_spec
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores
from latent_consistency.world.presets import WorldPreset

SHARED_PHASES = PHASES[: PHASES.index("teacher")]


def make_world(src: Path, dst: Path, teacher_steps: int, samples: int, latents: Path | None, zero_terminal_snr: bool) -> Path:
    spec = json.loads((src / WORLD_FILE).read_text())
    base = WorldPreset.from_dict(spec["preset"])
    teacher = dataclasses.replace(base.teacher, steps=teacher_steps, zero_terminal_snr=zero_terminal_snr)
    preset = dataclasses.replace(base, name=f"{base.name}-v", teacher=teacher,
                                 quality=dataclasses.replace(base.quality, num_samples=samples, vae_samples=samples))
    if not (dst / STATE_FILE).is_file():
        dst.mkdir(parents=True)
        for phase in SHARED_PHASES:
            for entry in OUTPUTS[phase]:
                origin = latents if entry == "latents" and latents else src / entry
                if entry.startswith("logs/") and not origin.exists():  # an export ships no training logs
                    continue
                (dst / entry).parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if origin.is_dir() else shutil.copy2)(origin, dst / entry)
        (dst / WORLD_FILE).write_text(json.dumps(world_spec(preset, "v_prediction"), indent=2))
        (dst / STATE_FILE).write_text(json.dumps({"done": list(SHARED_PHASES), "seconds": {}, "device": "cpu"}))
    return build_world(preset, dst, "cpu", prediction_type="v_prediction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-world", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--latents", type=Path, help="the latent cache of WORLD, when WORLD is an export")
    parser.add_argument("--zero-terminal-snr", action="store_true", help="the teacher on SD's schedule rescaled to zero terminal SNR")
    args = parser.parse_args()

    world_dir = make_world(args.from_world, args.out / "world", args.teacher_steps, args.samples, args.latents, args.zero_terminal_snr)
    world = load_world(world_dir)
    run = args.out / "distill"
    config = resolve_config(DistillConfig, "world", overrides=dict(teacher=str(world_dir), data=str(world_dir / "latents"), out=str(run),
                                                    steps=args.distill_steps, validate_every=0))
    if not (run / "lcm" / "model_index.json").is_file():
        train(config, resume=(run / "config.json").is_file())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    fifth = max(1, len(losses) // 5)
    lcm = load_lcm(str(run / "lcm"))

    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(args.samples)]
    prompts, attributes = [it["caption"] for it in items], [it["attributes"] for it in items]
    real = torch.stack([it["image"] for it in items])
    g = config.validation_guidance_scale
    teacher = judge_scores(world.judge, sample(SamplerSpec("teacher", 25, g, "dpm++"), None, world.model, prompts), attributes, real)
    names = [a for a in teacher["alignment"] if a != "mean"]
    kind = "v-prediction, zero-terminal-SNR" if args.zero_terminal_snr else "v-prediction"
    lines = [f"{kind} teacher ({args.teacher_steps} steps) of `{args.from_world}`, distilled {args.distill_steps} "
             f"steps with the `world` preset; {args.samples} reference prompts, g = {g:g}.\n",
             f"LCD loss (logged means): first fifth {sum(losses[:fifth]) / fifth:.3g}, last fifth {sum(losses[-fifth:]) / fifth:.3g}\n",
             "| sampler | FID (judge) | alignment | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]

    def row(label: str, fid: float, alignment: dict) -> str:
        return f"| {label} | {fid:.1f} | {alignment['mean']:.3f} | " + " | ".join(f"{alignment[a]:.2f}" for a in names) + " |"

    lines.append(row("teacher dpm++ 25-step", teacher["fid"], teacher["alignment"]))
    for n in (1, 2, 4):
        s = judge_scores(world.judge, sample(SamplerSpec("lcm", n, g), lcm, world.model, prompts), attributes, real)
        lines.append(row(f"LCM {n}-step", s["fid"], s["alignment"]))
    start = consistency_model(make_student_unet(world.model.unet, lcm.time_cond_proj_dim).eval(),
                              lcm.scheduler_config | {"prediction_type": world.prediction_type})
    s = judge_scores(world.judge, sample_consistency(start, lcm.timesteps(1), world.model, prompts, g), attributes, real)
    lines.append(row("undistilled start, consistency sampler 1-step", s["fid"], s["alignment"]))
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = judge_scores(world.judge, noise, attributes, real)
    lines.append(row("uniform noise images (what failure looks like)", s["fid"], s["alignment"]))
    (args.out / "vprediction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
