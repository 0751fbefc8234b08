"""The README's main job (`lcm demo`, `make demo`): distil the built-in world's teacher into an LCM, then compare.

0. Use the default world shipped with the package, or build the world of `--world-preset` (resumable).
1. Encode the world's training images once into a latent cache (D_z = {E(x)}).
2. Latent consistency distillation (Algorithm 1) with the `world` training preset.
3. A sample grid: for the same prompts and noise, the teacher's 25-step DPM-Solver++ samples next to the
   1-, 2- and 4-step LCM samples.
4. A small evaluation with the world's judge: prompt alignment and FID of the LCM at 1/2/4 steps against
   the teacher's DDIM at 2/4 steps and DPM-Solver++ at 25 steps (all with CFG), and against the
   undistilled starting point (the teacher's weights run through the consistency sampler).

Rerunning continues an interrupted run and reuses finished parts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from latent_consistency.data.latent_cache import write_latent_cache
from latent_consistency.devices import resolve_device
from latent_consistency.errors import UserError
from latent_consistency.evaluation.compare import SamplerSpec, sample, sample_consistency
from latent_consistency.evaluation.fid import fid_score
from latent_consistency.grids import image_grid, save_png
from latent_consistency.models import consistency_model, load_lcm, make_student_unet
from latent_consistency.outputs import writable_folder
from latent_consistency.training.config import resolve_config
from latent_consistency.training.loop import train
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.build import build_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores


def _table(rows: list[tuple[str, dict]]) -> str:
    attrs = [a for a in rows[0][1]["alignment"] if a != "mean"]
    lines = ["| sampler | FID (judge) | alignment | " + " | ".join(attrs) + " |", "|---" * (3 + len(attrs)) + "|"]
    for label, r in rows:
        a = r["alignment"]
        lines.append(f"| {label} | {r['fid']:.2f} | {a['mean']:.3f} | " + " | ".join(f"{a[k]:.2f}" for k in attrs) + " |")
    return "\n".join(lines)


def ensure_latent_cache(world, cache: Path, device) -> Path:
    """D_z = {E(x)}: the world's training split encoded once into a latent cache (reused when present)."""
    if not (cache / "manifest.json").is_file():
        train_split = get_dataset(world.dataset, "train", world.resolution, seed=world.preset.seed, size=world.preset.train_size)
        print(f"[demo] encoding {len(train_split)} training images into {cache}", flush=True)
        write_latent_cache(train_split, cache, world.codec, world.model.tokenizer, world.model.text_encoder,
                           source={"dataset": world.dataset, "split": "train", "resolution": world.resolution},
                           device=device)
    return cache


def run_demo(out: Path, world_dir: Path | None, distill_steps: int | None, eval_samples: int, device: str,
             world_preset: str = "default") -> Path:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    writable_folder(out, "--out")
    if world_dir is None:
        try:
            if world_preset != "default":
                raise UserError("only the default world is shipped")
            world_dir = default_world_path()
        except UserError as reason:
            # Build the world here (resumable; the default preset takes about 40 minutes on a 2-core CPU)
            world_dir = out / f"world-{world_preset}"
            print(f"[demo] {reason}; building the {world_preset!r} world into {world_dir} "
                  "(resumable: rerun to continue)", flush=True)
            build_world(world_preset, world_dir, dev)
    world = load_world(Path(world_dir), dev)

    # 1. Latent cache of the training split
    cache = ensure_latent_cache(world, out / "latents", dev)

    # 2. Distillation
    run = out / "distill"
    overrides = dict(teacher=str(world_dir), data=str(cache), out=str(run), steps=distill_steps)
    config = resolve_config("world", overrides=overrides)
    # Every sampler is compared at the guidance scale of the preset's validation grid, inside its ω range
    guidance = config.validation_guidance_scale
    lcm_dir = run / "lcm"
    if not (lcm_dir / "model_index.json").is_file():
        print(f"[demo] distilling {config.steps} steps into {run}", flush=True)
        train(config, resume=(run / "config.json").is_file())
    lcm = load_lcm(str(lcm_dir), device=dev)

    # 3. Sample grid: teacher 25-step DPM-Solver++ next to the 1-, 2-, 4-step LCM
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(min(eval_samples, len(reference)))]
    prompts = [it["caption"] for it in items]
    attributes = [it["attributes"] for it in items]
    real = torch.stack([it["image"] for it in items])
    grid_specs = [SamplerSpec("teacher", 25, guidance, "dpm++")] + [SamplerSpec("lcm", n, guidance) for n in (1, 2, 4)]
    rows = [real[:8]] + [sample(s, lcm, world.model, prompts[:8], device=dev) for s in grid_specs]
    grid = out / "grid.png"
    save_png(image_grid(rows, ["real"] + [s.label for s in grid_specs], scale=3, label_width=190), grid)
    (out / "grid_prompts.txt").write_text("\n".join(prompts[:8]) + "\n")

    # 4. Evaluation with the judge
    specs = [SamplerSpec("lcm", n, guidance) for n in (1, 2, 4)] + [
        SamplerSpec("teacher", 2, guidance, "ddim"), SamplerSpec("teacher", 4, guidance, "ddim"),
        SamplerSpec("teacher", 25, guidance, "dpm++")]
    results = [(s.label, judge_scores(world.judge, sample(s, lcm, world.model, prompts, device=dev), attributes, real)) for s in specs]
    # The undistilled starting point: the teacher's weights with a zero ω input, read in the teacher's
    # parameterisation, through the same 1-step sampler
    start = consistency_model(make_student_unet(world.model.unet, lcm.time_cond_proj_dim).eval(),
                              lcm.scheduler_config | {"prediction_type": world.prediction_type})
    results.append(("undistilled start, consistency sampler 1-step", judge_scores(
        world.judge, sample_consistency(start, lcm.timesteps(1), world.model, prompts, guidance, device=dev), attributes, real)))
    # Real images of other prompts against the reference: a scale for FID, not a floor (samples made for the
    # reference's own prompts share its attribute mix and can score below it)
    train_items = get_dataset(world.dataset, "train", world.resolution, seed=world.preset.seed)
    unpaired = [train_items[i]["image"] for i in range(len(items))]
    fid_unpaired = fid_score(world.judge, real, torch.stack(unpaired))
    minutes = (time.perf_counter() - t0) / 60
    report = (f"# Demo report\n\nWorld: `{world_dir}` ({world.dataset}, {world.resolution}px). Distillation: "
              f"{config.steps} steps, solver {config.solver}, skip {config.skip}, g in [{config.guidance_scale_min:g}, "
              f"{config.guidance_scale_max:g}]. Evaluation: {len(items)} reference prompts at g = {guidance:g}, judge features.\n\n"
              f"{_table(results)}\n\nFID of {len(items)} real training images (other prompts) against the reference: "
              f"{fid_unpaired:.2f} (a scale, not a floor: samples for the reference's own prompts can score below it)\n\n"
              f"Grid: `grid.png` (prompts in `grid_prompts.txt`). Wall time: {minutes:.1f} min.\n")
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"results": dict(results), "fid_real_unpaired": fid_unpaired, "minutes": minutes}, indent=1))
    print(report)
    return out
