"""Sampling with glibc's allocator keeping freed memory (`allocator.keep_freed_memory`, what `lcm generate`, `lcm serve`
and `lcm evaluate` set on the CPU) against glibc's defaults, for ours and for diffusers' pipeline.

    python benchmarks/allocator_speed.py --lcm runs/demo/distill/lcm     # after `make demo`

The allocator is a setting of the whole process, so each variant runs in a child process of its own: ours compiled
(`lcm generate --compile`) and eager, and diffusers' `LatentConsistencyModelPipeline` eager, each with glibc's defaults
and with the setting; variants in turn, --rounds times. A child loads, makes one untimed call, then times --repeats
calls of 4-step text to image, float32, at batch 64 and 1 (the median), on --threads torch threads (default: this
process's, which follows OMP_NUM_THREADS), and reports its peak resident memory (VmHWM) and its thread count.
Prints the median over rounds of each variant, and each variant's speed-up over diffusers' pipeline as users run it
(glibc's defaults), pair by pair within a round. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from cpu_speed import diffusers_sampler, ours_sampler

VARIANTS = [("ours, compiled", "ours-compiled"), ("ours, eager", "ours"), ("diffusers' pipeline", "diffusers")]
BATCHES = (64, 1)


def child(lcm: str, who: str, kept: bool, repeats: int, threads: int) -> dict:
    from latent_consistency.allocator import keep_freed_memory

    was_set = keep_freed_memory(torch.device("cpu")) if kept else False
    torch.set_num_threads(threads)
    result = {"allocator_set": was_set, "threads": torch.get_num_threads()}
    for batch in BATCHES:
        call = diffusers_sampler(lcm, batch, 4) if who == "diffusers" else ours_sampler(lcm, batch, 4, compile=who == "ours-compiled")
        call()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        result[f"ms_{batch}"] = 1e3 * statistics.median(times)
    with open("/proc/self/status") as status:
        result["peak_mib"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lcm", default="runs/demo/distill/lcm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of each child (default: %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("WHO", "KEPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.lcm, args.child[0], args.child[1] == "1", args.repeats, args.threads)))
        return
    runs = {(who, kept): [] for _, who in VARIANTS for kept in (False, True)}
    for r in range(args.rounds):
        for who, kept in runs:
            out = subprocess.run([sys.executable, __file__, "--lcm", args.lcm, "--repeats", str(args.repeats), "--threads", str(args.threads),
                                  "--child", who, str(int(kept))], check=True, capture_output=True, text=True).stdout
            runs[who, kept].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}: {who}, allocator {'kept' if kept else 'default'}: {runs[who, kept][-1]}", flush=True)
    reference = runs["diffusers", False]
    threads = sorted({row["threads"] for rows in runs.values() for row in rows})
    print(f"\n{platform.processor() or platform.machine()}, {' / '.join(map(str, threads))} threads per child, torch {torch.__version__}; "
          f"4 steps, float32; median of {args.repeats} calls per process, median over {args.rounds} rounds\n")
    print("| variant | allocator | batch 64 ms | batch 1 ms | speed-up over diffusers (defaults), batch 64 / 1 | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, who in VARIANTS:
        for kept in (False, True):
            rows = runs[who, kept]
            if kept and not all(row["allocator_set"] for row in rows):
                print(f"| {name} | not set (another C library, or MALLOC_* / GLIBC_TUNABLES in the environment) | | | | |")
                continue
            speedups = ["{:.2f}×".format(statistics.median(ref[f"ms_{b}"] / row[f"ms_{b}"] for ref, row in zip(reference, rows))) for b in BATCHES]
            print(f"| {name} | {'kept' if kept else 'glibc defaults'} | {statistics.median(row['ms_64'] for row in rows):.1f} | "
                  f"{statistics.median(row['ms_1'] for row in rows):.1f} | {' / '.join(speedups)} | "
                  f"{statistics.median(row['peak_mib'] for row in rows):.0f} |")


if __name__ == "__main__":
    main()
