"""Negative prompts for an LCM on the built-in world: does the judge read the negated attribute less often, and at what cost?

An LCM has no unconditional pass (guidance is distilled into its ω input), so a negative prompt is guided against on
the consistency function (`denoisers.NegativePromptGuidance`): f̃ = f(z, ω, c) + λ·(f(z, ω, c) − f(z, ω, c_neg)).

The measurement: the world's LCM most often gets the *shape* wrong, and in specific ways (a square drawn as a circle,
a star as a triangle). A calibration run (the "reference" split's captions) finds, per prompted shape, the wrong shape
the judge reads most often. Each evaluation prompt (the "prompts" split, and the "heldout" split of (shape, colour)
pairs never seen in training, where the LCM errs more) gets a negative caption that differs from it in the shape only,
naming that confusion: "a large blue square ..." against "a large blue circle ...". For every candidate method we report
how often the judge reads the negated shape, the shape and mean prompt alignment, FID against the prompts' real images
(judge features) and the time per image. Candidates:

- none: plain Algorithm 3 (λ = 0);
- f λ: guidance on the consistency function at every step (2 network evaluations per step);
- f[:1] λ, f[:half] λ: the same at the first step, or the first ⌈n/2⌉ of n steps, only (fewer evaluations);
- emb λ: extrapolation in the text embedding, c + λ·(c − c_neg) (1 evaluation per step, no extra cost).

    python benchmarks/negative_prompts.py --out runs/negative-prompts        # 4-6 minutes on 1 CPU core

Writes `negative_prompts.md`, `negative_prompts.json` and `grid.png` (rows: prompts whose plain sample shows the
negated shape; columns: each method) into --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path

import torch

from latent_consistency.denoisers import NegativePromptGuidance
from latent_consistency.evaluation.fid import fid_score
from latent_consistency.grids import image_grid, save_png
from latent_consistency.models import load_lcm
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import randn, sample_lcm
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.datasets import attribute_values, get_dataset
from latent_consistency.world.judge import prompt_alignment
from latent_consistency.world.shapes import SHAPES, caption

STEPS = (2, 4)
BATCH = 200


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str  # none, f (consistency function), emb (text embedding)
    scale: float = 0.0
    first_steps: int | str | None = None  # guide only the first n steps; "half": the first ⌈n/2⌉; None: all

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        steps = {None: "", "half": "[:half]"}.get(self.first_steps, f"[:{self.first_steps}]")
        return f"{self.kind}{steps} lam={self.scale:g}"

    def evaluations(self, steps: int) -> int:
        """Network evaluations per image."""
        if self.kind != "f":
            return steps
        return steps + len(self.guided(range(steps)))

    def guided(self, timesteps):
        """The timesteps of a sampling run that are guided against the negative prompt."""
        if self.first_steps is None:
            return timesteps
        return timesteps[:(len(timesteps) + 1) // 2 if self.first_steps == "half" else self.first_steps]


METHODS = [Method("none")] + [Method("f", s) for s in (0.125, 0.25, 0.5)] + [Method("f", 2.0, 1)] + \
    [Method("f", s, "half") for s in (1.0, 2.0)] + [Method("emb", 0.25)]


@torch.no_grad()
def generate(lcm, prompts: list[str], negatives: list[str], steps: int, g: float, method: Method, seed: int) -> torch.Tensor:
    """Images in [-1, 1]; image i starts from seed `seed + i` and re-noises from `10**6 + seed + i` (as `compare.sample`)."""
    timesteps, omega, out = lcm.timesteps(steps), omega_from_guidance_scale(g), []
    for start in range(0, len(prompts), BATCH):
        n = len(prompts[start:start + BATCH])
        c, s = lcm.unet.config.in_channels, lcm.unet.config.sample_size
        z_T = randn((n, c, s, s), [torch.Generator().manual_seed(seed + start + i) for i in range(n)], "cpu", torch.float32)
        cond = lcm.prompts.encode(prompts[start:start + n])
        neg = lcm.prompts.encode(negatives[start:start + n])
        f = lcm.consistency_model(g)
        if method.kind == "f":
            f = NegativePromptGuidance(f, neg, method.scale, method.guided(timesteps))
        elif method.kind == "emb":
            cond = cond + method.scale * (cond - neg)
        generators = [torch.Generator().manual_seed(10**6 + seed + start + i) for i in range(n)]
        out.append(lcm.codec.decode(sample_lcm(f, z_T, timesteps, cond, omega, f.schedule, generators)).clamp(-1, 1))
    return torch.cat(out)


def shape_confusions(lcm, judge, items, g: float) -> dict[str, str]:
    """Per prompted shape, the wrong shape the judge reads most often on plain samples (2 and 4 steps pooled)."""
    prompts, counts = [it["caption"] for it in items], collections.Counter()
    for steps in STEPS:
        read = judge.predict(generate(lcm, prompts, prompts, steps, g, Method("none"), seed=0))["shape"].tolist()
        counts.update((it["attributes"].shape, SHAPES[r]) for it, r in zip(items, read) if SHAPES[r] != it["attributes"].shape)
    confusion = {}
    for shape in SHAPES:
        wrong = [(n, other) for (s, other), n in counts.items() if s == shape]
        confusion[shape] = max(wrong)[1] if wrong else SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    return confusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lcm", default="runs/demo/distill/lcm")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="the demo LCM was distilled on g in [1, 2]")
    parser.add_argument("--prompts", type=int, default=400, help="evaluation prompts of the 'prompts' split")
    parser.add_argument("--heldout", type=int, default=200, help="evaluation prompts of the 'heldout' split")
    parser.add_argument("--calibration", type=int, default=400, help="captions of the 'reference' split that find the confusions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lcm, world = load_lcm(args.lcm), load_world(default_world_path())
    judge, g = world.judge, args.guidance_scale

    reference = get_dataset("shapes", "reference", world.resolution, size=args.calibration)
    confusion = shape_confusions(lcm, judge, [reference[i] for i in range(args.calibration)], g)
    print("confusions:", confusion, flush=True)
    items = [it for split, n in (("prompts", args.prompts), ("heldout", args.heldout))
             for ds in [get_dataset("shapes", split, world.resolution, size=n)] for it in (ds[i] for i in range(n))]
    prompts, attributes = [it["caption"] for it in items], [it["attributes"] for it in items]
    negated = [confusion[a.shape] for a in attributes]
    negatives = [caption(dataclasses.replace(a, shape=s)) for a, s in zip(attributes, negated)]
    negated_index = torch.tensor([SHAPES.index(s) for s in negated])
    real = torch.stack([it["image"] for it in items])
    heldout = torch.arange(len(items)) >= args.prompts
    assert attribute_values("shapes", "shape") == SHAPES

    rows, samples = [], {}
    for steps in STEPS:
        for method in METHODS:
            start = time.perf_counter()
            images = generate(lcm, prompts, negatives, steps, g, method, seed=1000)
            seconds = time.perf_counter() - start
            hit = judge.predict(images)["shape"].cpu() == negated_index
            alignment = prompt_alignment(judge, images, attributes)
            row = dict(steps=steps, method=method.label, scale=method.scale, evaluations=method.evaluations(steps),
                       negated=hit.float().mean().item(), negated_count=int(hit.sum()), negated_heldout=hit[heldout].float().mean().item(),
                       negated_seen=hit[~heldout].float().mean().item(), shape=alignment["shape"], alignment=alignment["mean"],
                       fid=fid_score(judge, real, images), ms_per_image=1000 * seconds / len(items))
            rows.append(row)
            samples[(steps, method.label)] = images
            print(json.dumps(row), flush=True)

    n = len(items)
    lines = [f"# Negative prompts on the world's LCM ({args.lcm}, g = {g:g})", "",
             f"{n} prompt/seed pairs ({args.prompts} of the 'prompts' split, {args.heldout} held-out (shape, colour) pairs); "
             f"each negative caption differs from its prompt in the shape only, naming the shape the LCM most often draws "
             f"instead (calibrated on {args.calibration} 'reference' captions): {confusion}.", "",
             "| steps | method | network evals / image | negated shape read | (seen / held-out) | shape alignment | mean alignment | FID | ms / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['method']} | {r['evaluations']} | {r['negated']:.3f} ({r['negated_count']}/{n}) | "
                     f"{r['negated_seen']:.3f} / {r['negated_heldout']:.3f} | {r['shape']:.3f} | {r['alignment']:.3f} | "
                     f"{r['fid']:.2f} | {r['ms_per_image']:.1f} |")
    (out / "negative_prompts.md").write_text("\n".join(lines) + "\n")
    (out / "negative_prompts.json").write_text(json.dumps(dict(confusion=confusion, guidance_scale=g, rows=rows), indent=2))

    # The grid: prompts whose plain 2-step sample shows the negated shape, under every method
    plain = judge.predict(samples[(2, "none")])["shape"].cpu() == negated_index
    pick = plain.nonzero().flatten()[:10].tolist()
    labels = [m.label for m in METHODS]
    grid = image_grid([torch.stack([samples[(2, label)][i] for i in pick]) for label in labels], labels, scale=3,
                      column_labels=[f"{prompts[i]} / not {negated[i]}" for i in pick])
    save_png(grid, out / "grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
