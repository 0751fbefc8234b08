"""LCF on data the teacher never saw, on the built-in world: the paper's Figure 6 in miniature.

Two customised datasets of the world:
- digits: the `digits` training split (90 %), scored on the held-out 10 % with the digits judge;
- heldout: the held-out (shape, colour) pairs of `shapes`, the first N images for training and the next M scored,
  with the shapes judge (alignment: shape and colour).

Each run starts from an LCM (the demo's), fine-tunes it with `lcm finetune`'s loop (LCF, Algorithm 4, the
`world` fine-tuning preset plus --set overrides) or, with --method lcd, distils the world's teacher on the same
data for comparison (LCD, Algorithm 1, the `world` distillation preset), and scores the start and the result at
1/2/4 steps on the held-out prompts (FID in the judge's features, alignment):

    python benchmarks/lcf_world.py --lcm runs/demo/distill/lcm --case digits --out runs/lcf-digits
    python benchmarks/lcf_world.py --lcm runs/demo/distill/lcm --case digits --method lcd --out runs/lcd-digits
    python benchmarks/lcf_world.py --lcm runs/demo/distill/lcm --case heldout --out runs/lcf-heldout --set steps=4000
    python benchmarks/lcf_world.py --lcm runs/demo/distill/lcm --case heldout --replay 2000 --forgetting 2000 \
        --out runs/lcf-heldout-replay --set steps=2000     # old data mixed in; what each model scores on the old prompts

Writes `lcf.md` and `lcf.json` into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latent_consistency.data.latent_cache import write_latent_cache
from latent_consistency.evaluation.compare import SamplerSpec, sample
from latent_consistency.evaluation.fid import fid_score
from latent_consistency.grids import image_grid, save_png
from latent_consistency.models import load_lcm
from latent_consistency.training.config import FINETUNE_PRESETS, DistillConfig, FinetuneConfig, resolve_config
from latent_consistency.training.loop import train
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.datasets import get_dataset
from latent_consistency.world.judge import judge_scores

STEPS = (1, 2, 4)


def case_data(world, case: str, train_size: int, eval_size: int):
    """(training dataset, held-out items, judge, attributes the alignment is read on) of a case."""
    if case == "digits":
        return get_dataset("digits", "train", world.resolution), list(get_dataset("digits", "test", world.resolution)), \
            world.judges["digits"], ("digit",)
    heldout = get_dataset("shapes", "heldout", world.resolution, size=train_size + eval_size)
    train_items = torch.utils.data.Subset(heldout, range(train_size))
    return train_items, [heldout[i] for i in range(train_size, train_size + eval_size)], world.judge, ("shape", "color")


def score(judge, model, world, items, attributes_read, guidance: float) -> dict:
    prompts, attributes = [it["caption"] for it in items], [it["attributes"] for it in items]
    real = torch.stack([it["image"] for it in items])
    rows = {}
    for n in STEPS:
        s = judge_scores(judge, sample(SamplerSpec("lcm", n, guidance), model, world.model, prompts), attributes, real)
        both = s["alignment"]  # per attribute; "read" = every attribute of the case read back
        rows[n] = {"fid": s["fid"], "alignment": {a: both[a] for a in attributes_read}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm", required=True, help="the LCM to start from (LCF), e.g. runs/demo/distill/lcm")
    parser.add_argument("--world", help="world folder (default: the shipped one)")
    parser.add_argument("--case", choices=("digits", "heldout"), default="digits")
    parser.add_argument("--method", choices=("lcf", "lcd"), default="lcf")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-size", type=int, default=2000, help="heldout case: training images")
    # 2,000 scored images: less noise, and a real-against-real line that means something. Two independent real sets of
    # these pairs score FID 50 at 300 images, 6.4 at 1,000 and 4.3 at 2,000 in the judge's features (their mixes of
    # attributes differ by chance); a model's row compares its images with the real images of the same prompts.
    parser.add_argument("--eval-size", type=int, default=2000, help="heldout case: scored images")
    parser.add_argument("--replay", type=int, default=0,
                        help="also train on this many images of `shapes` (the LCM's own distribution), mixed into the case's data")
    parser.add_argument("--forgetting", type=int, default=0,
                        help="also score both models on this many `shapes` reference prompts (what fine-tuning forgets)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE (JSON values)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = Path(args.world) if args.world else default_world_path()
    world = load_world(world_dir)
    train_data, items, judge, attributes_read = case_data(world, args.case, args.train_size, args.eval_size)
    case_images = len(train_data)
    if args.replay:
        train_data = torch.utils.data.ConcatDataset([train_data, get_dataset("shapes", "train", world.resolution, size=args.replay)])
    cache = out / "latents"
    if not (cache / "manifest.json").is_file():
        write_latent_cache(train_data, cache, world.codec, world.model.prompts,
                           source={"case": args.case, "size": case_images, "replay": args.replay}, progress=False)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.method == "lcf":
        config = resolve_config(FinetuneConfig, "world", overrides=dict(model=args.lcm, data=str(cache), out=str(out / "run")) | overrides)
    else:
        # the same number of steps as LCF's preset: the comparison is at equal training
        steps = {"steps": FINETUNE_PRESETS["world"]["steps"]}
        config = resolve_config(DistillConfig, "world", overrides=dict(teacher=str(world_dir), data=str(cache), out=str(out / "run"))
                                | steps | overrides)
    t0 = time.perf_counter()
    if not (out / "run" / "lcm" / "model_index.json").is_file():
        train(config, resume=(out / "run" / "config.json").is_file())
    minutes = (time.perf_counter() - t0) / 60
    g = config.validation_guidance_scale
    start, result = load_lcm(args.lcm), load_lcm(str(out / "run" / "lcm"))
    before, after = score(judge, start, world, items, attributes_read, g), score(judge, result, world, items, attributes_read, g)
    real = torch.stack([it["image"] for it in items])
    train_real = torch.stack([train_data[i]["image"] for i in range(min(len(items), case_images))])
    scale = fid_score(judge, real, train_real)
    lines = [f"{args.method.upper()} on {args.case} ({case_images} training images"
             + (f" and {args.replay} of `shapes` mixed in" if args.replay else "") + f", {len(items)} held-out prompts, g = {g:g}); "
             f"{config.steps} steps, lr {config.lr:g}, batch {config.batch_size}; {minutes:.1f} min of training.\n",
             "| model | " + " | ".join(f"FID {n}-step" for n in STEPS) + " | " + " | ".join(f"read {n}-step" for n in STEPS) + " |",
             "|---" * (1 + 2 * len(STEPS)) + "|"]
    for label, rows in (("start (the LCM)", before), (f"after {args.method.upper()}", after)):
        read = {n: min(rows[n]["alignment"].values()) for n in STEPS}
        lines.append(f"| {label} | " + " | ".join(f"{rows[n]['fid']:.2f}" for n in STEPS) + " | "
                     + " | ".join(f"{read[n]:.3f}" for n in STEPS) + " |")
    lines.append(f"\nReal training images against the held-out ones: FID {scale:.2f}. 'read': the judge reads "
                 f"{' and '.join(attributes_read)} back (the lowest of their accuracies).")
    forgetting = {}
    if args.forgetting:
        reference = get_dataset("shapes", "reference", world.resolution, size=args.forgetting)
        old = [reference[i] for i in range(args.forgetting)]
        forgetting = {label: score(world.judge, model, world, old, ("shape", "color"), g) for label, model in (("before", start), ("after", result))}
        lines.append(f"\nOn {args.forgetting} `shapes` reference prompts (the LCM's own distribution), FID 1 / 2 / 4 steps: before "
                     + " / ".join(f"{forgetting['before'][n]['fid']:.2f}" for n in STEPS) + ", after "
                     + " / ".join(f"{forgetting['after'][n]['fid']:.2f}" for n in STEPS) + ".")
    (out / "lcf.md").write_text("\n".join(lines) + "\n")
    (out / "lcf.json").write_text(json.dumps({"before": before, "after": after, "fid_real": scale, "minutes": minutes, "forgetting": forgetting,
                                              "config": config.to_dict()}, indent=1))
    prompts = [it["caption"] for it in items[:10]]
    grid = [real[:10]] + [sample(SamplerSpec("lcm", n, g), model, world.model, prompts) for model, n in ((start, 4), (result, 1), (result, 4))]
    save_png(image_grid(grid, ["real", "start, 4 steps", "after, 1 step", "after, 4 steps"], scale=3, label_width=120,
                        column_labels=prompts), out / "grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
