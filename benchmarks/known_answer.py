"""Known answer: LCD of an analytic 2-D Gaussian-mixture teacher into a small MLP, for all three solvers.

    python benchmarks/known_answer.py                       # the setting of tests/test_known_answer.py
    python benchmarks/known_answer.py --steps 3000 --out results/known-answer.md

The teacher's guided PF-ODE (Eq. 13) is solved exactly (RK4), so every number is a distance to a known
answer (see `latent_consistency.testing.toy2d`). Rows:
- one LCD student per solver (DDIM, DPM-Solver-2, DPM-Solver++(2S)), and the consistency function LCD
  converges to with that solver if the network fitted exactly (`SolverChain`): the solver's share;
- controls: the untrained student, a student distilled with the sign of ω flipped, guided DDIM of the
  teacher, Algorithm 3 run with the exact consistency function, and the finite-sample floor of the SW.
Columns are the mean over (guidance scale, class) cases with the worst case in parentheses.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from latent_consistency.solvers import SOLVERS
from latent_consistency.testing.toy2d import (
    EVAL_GUIDANCE_SCALES,
    TOY_GUIDANCE_SCALE_RANGE,
    FlippedGuidanceTeacher,
    SolverChain,
    ToyReference,
    distill_toy2d,
    evaluate_teacher_ddim,
    evaluate_toy2d,
)

COLUMNS = ("error_1", "error_2", "local_error_2", "error_4", "sw_1", "sw_2", "sw_4")


def cell(result: dict, metric: str) -> str:
    if metric not in result:
        return "–"
    return f"{result[metric]:.3f} ({result[metric + '_max']:.3f})"


def markdown(rows: list[tuple[str, dict, float | None]], floor: dict) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " | train s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, result, seconds in rows:
        train = f"{seconds:.1f}" if seconds is not None else "–"
        lines.append(f"| {name} | " + " | ".join(cell(result, m) for m in COLUMNS) + f" | {train} |")
    lines.append(f"\nSW floor (two independent sets of exact teacher samples): {floor['sw_floor']:.3f} "
                 f"(worst case {floor['sw_floor_max']:.3f}).")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="LCD training steps per student")
    parser.add_argument("--ema-decay", type=float, default=0.9, help="μ of the target network θ⁻")
    parser.add_argument("--skip", type=int, default=20, help="skipping step k")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=list(EVAL_GUIDANCE_SCALES),
                        help="diffusers' g to evaluate at")
    parser.add_argument("--num-samples", type=int, default=500, help="samples per (guidance scale, class) case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the markdown table here and a .json next to it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    reference = ToyReference(guidance_scales=args.guidance_scales, num_samples=args.num_samples,
                             original_inference_steps=1000 // args.skip, seed=args.seed)
    print(f"reference answers: {time.perf_counter() - t0:.1f} s", flush=True)
    train = dict(steps=args.steps, ema_decay=args.ema_decay, skip=args.skip, seed=args.seed)

    rows = []
    for solver in SOLVERS:
        t0 = time.perf_counter()
        student = distill_toy2d(solver, **train)
        seconds = time.perf_counter() - t0
        rows.append((f"LCD student, {solver}", evaluate_toy2d(student, reference), seconds))
        chain = SolverChain(reference.teacher, solver, args.skip)
        rows.append((f"exact LCD limit, {solver} (SolverChain)", evaluate_toy2d(chain, reference), None))
        print(rows[-2][0], f"{seconds:.1f} s", flush=True)
    rows.append(("untrained student", evaluate_toy2d(distill_toy2d(steps=0, seed=args.seed), reference), None))
    flipped = FlippedGuidanceTeacher(reference.teacher.net, reference.schedule, "epsilon")
    t0 = time.perf_counter()
    wrong = distill_toy2d("dpm++", teacher=flipped, **train)
    rows.append(("student distilled with -ω (dpm++)", evaluate_toy2d(wrong, reference), time.perf_counter() - t0))
    ddim = evaluate_teacher_ddim(reference)
    rows.append(("teacher, guided DDIM n steps", ddim, None))
    rows.append(("Algorithm 3 with the exact f", evaluate_toy2d(reference.exact_f, reference), None))

    table = markdown(rows, ddim)
    header = (f"guidance scales g = {', '.join(map(str, args.guidance_scales))} (trained on g ∈ "
              f"{list(TOY_GUIDANCE_SCALE_RANGE)}); {args.num_samples} samples per case; {args.steps} LCD steps, "
              f"μ = {args.ema_decay}, k = {args.skip}; {date.today()}, {platform.machine()}, "
              f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print(header + "\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "\n" + table + "\n")
        summary = {name: {k: v for k, v in r.items() if k != "cases"} | {"train_s": s} for name, r, s in rows}
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
