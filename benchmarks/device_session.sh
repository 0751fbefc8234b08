#!/usr/bin/env bash
# One lent-GPU session (see docs/benchmarks.md), one device command: first ours against diffusers at SD 1.5 and SDXL
# size (gpu_speed.py, within its own time budget), then the Stable-Diffusion-scale speed benchmark of our UNet-only
# paths in what is left. Run from the repository root with $OUT set to the folder whose files come back, and diffusers'
# wheel in .whl/ (`python -m pip download --no-deps diffusers==0.42.1 -d .whl`): .whl/ is git-ignored, so the device
# call must name it (`carry: [".whl"]`). Only diffusers is installed (--no-deps); torch, transformers, peft and
# accelerate are the card's own, and their versions go to $OUT/gpu.txt.
# SESSION_SECONDS (default 420, so that a 15-minute device budget leaves time to rerun a part) is what the whole script
# may take; GPU_SPEED_SECONDS=0 or BENCH_SECONDS=0 skips that part. The over-training sweep of the `world` preset runs
# only when asked for (SWEEP=1) and when it fits: it needs TRAIN_SECONDS + EVAL_SECONDS + 60 s, so give it a session of
# its own (SWEEP=1 GPU_SPEED_SECONDS=0 BENCH_SECONDS=0).
# (The first session's job, `lcm world build --preset default --device cuda`, is in docs/benchmarks.md.)
set -uo pipefail
SESSION_SECONDS=${SESSION_SECONDS:-420} GPU_SPEED_SECONDS=${GPU_SPEED_SECONDS:-300} BENCH_SECONDS=${BENCH_SECONDS:-100}
TRAIN_SECONDS=${TRAIN_SECONDS:-230} EVAL_SECONDS=${EVAL_SECONDS:-100} SWEEP=${SWEEP:-0}
left() { echo $(( SESSION_SECONDS - SECONDS )); }
ls .whl/diffusers-*.whl > /dev/null || { echo "no diffusers wheel in .whl/: carry it (carry: [\".whl\"])" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 - >> "$OUT/gpu.txt" <<'PY'
from importlib import metadata
for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
PY

# 1. Ours against diffusers (sampling, LCD step, SDXL LCD steps, torch.compile): its rows stop 30 s before the timeout,
#    and a SIGTERM still prints the table, which is the end of gpu_speed.md; every number is in gpu_speed.json
if (( GPU_SPEED_SECONDS > 0 )); then
    timeout --kill-after=20 "$GPU_SPEED_SECONDS" python3 benchmarks/gpu_speed.py --out "$OUT" --budget-seconds $(( GPU_SPEED_SECONDS - 30 )) \
        > "$OUT/gpu_speed.md" 2> "$OUT/gpu_speed.log"
    echo "gpu_speed exit $?" >> "$OUT/gpu.txt"
fi

# 2. SD-scale speed of the library's sampling and LCD training steps (random weights), in what is left
bench=$(( $(left) - 20 < BENCH_SECONDS ? $(left) - 20 : BENCH_SECONDS ))
if (( BENCH_SECONDS > 0 && bench >= 60 )); then
    timeout "$bench" python3 benchmarks/sd_scale.py --device cuda --dtype float16 --out "$OUT" > "$OUT/sd_scale.md" 2>&1
    echo "benchmark exit $?" >> "$OUT/gpu.txt"
else
    echo "benchmark skipped: $(left) s left" >> "$OUT/gpu.txt"
fi

# 3. Only with SWEEP=1: quality over training of the world preset's variants (all at once), then the scores of every
#    checkpoint: it needs its training and evaluation time and about a minute for loading and the latent cache
(( SWEEP )) || exit 0
if (( $(left) < TRAIN_SECONDS + EVAL_SECONDS + 60 )); then
    echo "sweep skipped: $(left) s left, $(( TRAIN_SECONDS + EVAL_SECONDS + 60 )) s needed (GPU_SPEED_SECONDS=0 BENCH_SECONDS=0)" >> "$OUT/gpu.txt"
    exit 0
fi
python3 benchmarks/over_training_sweep.py --out /tmp/sweep --steps "${SWEEP_STEPS:-3000}" --every 500 --samples 500 \
    --device cuda --train-seconds "$TRAIN_SECONDS" --eval-seconds "$EVAL_SECONDS" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?" >> "$OUT/gpu.txt"
cp /tmp/sweep/sweep.json /tmp/sweep/sweep.md "$OUT/" 2>/dev/null
tar czf "$OUT/sweep_runs.tgz" -C /tmp/sweep logs $(cd /tmp/sweep && ls -d */metrics.jsonl */over_training.* */config.json 2>/dev/null)
