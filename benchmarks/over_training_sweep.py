"""Quality over training for variants of the `world` distillation preset, side by side (a GPU session's job).

    python benchmarks/over_training_sweep.py --out /tmp/sweep --steps 3000 --every 500 --samples 500 --device cuda
    python benchmarks/over_training_sweep.py --out /tmp/sweep --steps 20 --every 10 --samples 16 --only base lr2e-5 \\
        --latents runs/demo/latents --device cpu                                   # plumbing check on a CPU

Each variant is the `world` preset with a few fields changed (VARIANTS), distilled from the shipped default
world (or --world) for --steps with a checkpoint every --every steps, all variants at once as separate processes (a small
UNet leaves a GPU mostly idle, so they share it well). Training stops at --train-seconds whatever the step;
then every complete checkpoint of every run is scored by `lcm world over-training`
(1/2/4-step FID and prompt alignment with the world's judge). Writes sweep.json and sweep.md in --out:
per variant the final against the best FID at each step count, the no-drift criterion (final within 10 % of the best).

The sweep in docs/notes/2026-11-27-distillation.md ran on 2026-11-26, when the preset's guidance range was g ∈ [2, 8] and its
loss weighting uniform; to repeat it on today's preset add
`--set guidance_scale_min=2 guidance_scale_max=8 loss_weighting=uniform --guidance-scale 7.5`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "base": {},
    "uniform": dict(loss_weighting="uniform"),
    "cosine": dict(lr_schedule="cosine"),
    "lr2e-5": dict(lr=2e-5),
    "dpm++": dict(solver="dpm++"),
    "skip50": dict(skip=50),
    "ema0.999": dict(ema_decay=0.999),
    "b256": dict(batch_size=256),
    "huber": dict(loss="huber"),
    "g4-8": dict(guidance_scale_min=4.0, guidance_scale_max=8.0),
    "lr1e-4-cosine": dict(lr=1e-4, lr_schedule="cosine"),
    "b256-huber": dict(batch_size=256, loss="huber"),
    "g1": dict(guidance_scale_min=1.0, guidance_scale_max=1.0, validation_guidance_scale=1.0),
    "g1-2": dict(guidance_scale_min=1.0, guidance_scale_max=2.0, validation_guidance_scale=1.5),
    "g1-3": dict(guidance_scale_min=1.0, guidance_scale_max=3.0, validation_guidance_scale=3.0),  # the preset until late 2026-11-27
}
STEPS = (1, 2, 4)


def flags(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def run_all(commands: dict[str, list[str]], logs: Path, seconds: float, env: dict) -> dict[str, int | None]:
    """Start every command at once; kill what is still running after `seconds`. Exit codes (None: killed)."""
    procs = {name: subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
             for name, cmd in commands.items()}
    deadline = time.monotonic() + seconds
    for p in procs.values():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {name: (None if p.returncode < 0 else p.returncode) for name, p in procs.items()}


def summary(name: str, rows: list[dict], metrics: list[dict]) -> dict:
    out = {"variant": name, "overrides": VARIANTS[name], "rows": rows,
           "samples_per_s": metrics[-1].get("samples_per_s") if metrics else None,
           "last_step": metrics[-1]["step"] if metrics else 0}
    for n in STEPS:
        if rows:
            best = min(r[f"fid_{n}"] for r in rows)
            out[f"final_{n}"], out[f"best_{n}"] = rows[-1][f"fid_{n}"], best
            out[f"within10_{n}"] = rows[-1][f"fid_{n}"] <= 1.1 * best
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--samples", type=int, default=500, help="reference prompts per evaluation")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--world", help="the world whose teacher is distilled (default: the shipped default world)")
    parser.add_argument("--latents", help="an existing latent cache of that world (else built into OUT/latents)")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides applied to every variant first")
    parser.add_argument("--guidance-scale", help="evaluation guidance scale (default: each run's validation guidance scale)")
    parser.add_argument("--train-seconds", type=float, default=240)
    parser.add_argument("--eval-seconds", type=float, default=120)
    args = parser.parse_args()
    import torch

    from latent_consistency.world.artifact import default_world_path, load_world
    from latent_consistency.world.demo import ensure_latent_cache

    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    world_dir = Path(args.world) if args.world else default_world_path()
    t0 = time.perf_counter()
    latents = Path(args.latents) if args.latents else ensure_latent_cache(load_world(world_dir, torch.device(args.device)),
                                                                          out / "latents", torch.device(args.device))
    print(f"latent cache ready in {time.perf_counter() - t0:.0f} s", flush=True)
    names = args.only or list(VARIANTS)
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    distill = {name: [sys.executable, "-m", "latent_consistency.cli", "distill", "--preset", "world", "--teacher", str(world_dir),
                      "--data", str(latents), "--out", str(out / name), "--steps", str(args.steps),
                      "--checkpoint-every", str(args.every), "--keep-checkpoints", "1000", "--validate-every", "0",
                      *flags(dict(kv.split("=", 1) for kv in args.set) | VARIANTS[name])] for name in names}
    t0 = time.perf_counter()
    codes = run_all(distill, logs, args.train_seconds, env)
    print(f"training: {time.perf_counter() - t0:.0f} s, exit codes {codes}", flush=True)
    evaluate = {f"{name}-eval": [sys.executable, "-m", "latent_consistency.cli", "world", "over-training", "--run", str(out / name),
                                 "--world", str(world_dir), "--samples", str(args.samples), "--device", args.device,
                                 *(["--guidance-scale", args.guidance_scale] if args.guidance_scale else [])]
                for name in names if (out / name / "checkpoints").is_dir()}
    t0 = time.perf_counter()
    codes = run_all(evaluate, logs, args.eval_seconds, env)
    print(f"evaluation: {time.perf_counter() - t0:.0f} s, exit codes {codes}", flush=True)

    results = []
    for name in names:
        report = out / name / "over_training.json"
        metrics_file = out / name / "metrics.jsonl"
        rows = json.loads(report.read_text()) if report.is_file() else []
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
        results.append(summary(name, rows, metrics))
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    lines = ["| variant | last step | samples/s | " + " | ".join(f"{n}-step final / best" for n in STEPS) + " |",
             "|---" * (3 + len(STEPS)) + "|"]
    for r in results:
        cells = [f"{r[f'final_{n}']:.1f} / {r[f'best_{n}']:.1f}{'' if r[f'within10_{n}'] else ' ✗'}" if r["rows"] else "-"
                 for n in STEPS]
        speed = f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "-"
        lines.append(f"| {r['variant']} | {r['last_step']} | {speed} | " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
