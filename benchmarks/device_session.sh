#!/usr/bin/env bash
# One rented-GPU session (see docs/benchmarks.md), one device command of at most 10 minutes: first ours against diffusers
# at SD 1.5 and SDXL size (gpu_speed.py, within its own time budget), then the Stable-Diffusion-scale speed benchmark of
# our UNet-only paths, then, only when the session has the time left for it, the over-training sweep of the `world`
# distillation preset. Run from the repository root with diffusers' wheel in .whl/ and $OUT set to the folder whose
# files come back. SESSION_SECONDS (default 570) is what the whole script may take; GPU_SPEED_SECONDS=0 skips gpu_speed.
# (The first session's job, `lcm world build --preset default --device cuda`, is in docs/benchmarks.md.)
set -uo pipefail
SESSION_SECONDS=${SESSION_SECONDS:-570} GPU_SPEED_SECONDS=${GPU_SPEED_SECONDS:-300} BENCH_SECONDS=${BENCH_SECONDS:-130}
TRAIN_SECONDS=${TRAIN_SECONDS:-230} EVAL_SECONDS=${EVAL_SECONDS:-100}
left() { echo $(( SESSION_SECONDS - SECONDS )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$OUT/gpu.txt"

# 1. Ours against diffusers (sampling, LCD step, SDXL LCD steps, torch.compile): its rows stop 30 s before the timeout,
#    and a SIGTERM still prints the table, which is the end of gpu_speed.md; every number is in gpu_speed.json
if (( GPU_SPEED_SECONDS > 0 )); then
    timeout --kill-after=20 "$GPU_SPEED_SECONDS" python3 benchmarks/gpu_speed.py --out "$OUT" --budget-seconds $(( GPU_SPEED_SECONDS - 30 )) \
        > "$OUT/gpu_speed.md" 2> "$OUT/gpu_speed.log"
    echo "gpu_speed exit $?" >> "$OUT/gpu.txt"
fi

# 2. SD-scale speed of the library's sampling and LCD training steps (random weights), in what is left
bench=$(( $(left) - 20 < BENCH_SECONDS ? $(left) - 20 : BENCH_SECONDS ))
if (( bench >= 60 )); then
    timeout "$bench" python3 benchmarks/sd_scale.py --device cuda --dtype float16 --out "$OUT" > "$OUT/sd_scale.md" 2>&1
    echo "benchmark exit $?" >> "$OUT/gpu.txt"
else
    echo "benchmark skipped: $(left) s left" >> "$OUT/gpu.txt"
fi

# 3. Quality over training of the world preset's variants (all at once), then the scores of every checkpoint: it needs
#    its training and evaluation time and about a minute for loading and the latent cache
if (( $(left) < TRAIN_SECONDS + EVAL_SECONDS + 60 )); then
    echo "sweep skipped: $(left) s left, $(( TRAIN_SECONDS + EVAL_SECONDS + 60 )) s needed (lower TRAIN_SECONDS, or GPU_SPEED_SECONDS=0)" >> "$OUT/gpu.txt"
    exit 0
fi
python3 benchmarks/over_training_sweep.py --out /tmp/sweep --steps "${SWEEP_STEPS:-3000}" --every 500 --samples 500 \
    --device cuda --train-seconds "$TRAIN_SECONDS" --eval-seconds "$EVAL_SECONDS" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?" >> "$OUT/gpu.txt"
cp /tmp/sweep/sweep.json /tmp/sweep/sweep.md "$OUT/" 2>/dev/null
tar czf "$OUT/sweep_runs.tgz" -C /tmp/sweep logs $(cd /tmp/sweep && ls -d */metrics.jsonl */over_training.* */config.json 2>/dev/null)
