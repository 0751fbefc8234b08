#!/usr/bin/env bash
# One rented-GPU session (see docs/benchmarks.md): the Stable-Diffusion-scale speed benchmark, then the
# over-training sweep of the `world` distillation preset on the shipped default world. Run from the
# repository root with diffusers' wheel in .whl/ and $OUT set to the folder whose files come back.
# (The first session's job, `lcm world build --preset default --device cuda`, is in docs/benchmarks.md.)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$OUT/gpu.txt"

# 1. SD-scale speed of the library's sampling and LCD training steps (random weights), GPU to itself
timeout "${BENCH_SECONDS:-130}" python3 benchmarks/sd_scale.py --device cuda --dtype float16 --out "$OUT" > "$OUT/sd_scale.md" 2>&1
echo "benchmark exit $?" >> "$OUT/gpu.txt"

# 2. Quality over training of the world preset's variants (all at once), then the scores of every checkpoint
python3 benchmarks/over_training_sweep.py --out /tmp/sweep --steps "${SWEEP_STEPS:-3000}" --every 500 --samples 500 \
    --device cuda --train-seconds "${TRAIN_SECONDS:-230}" --eval-seconds "${EVAL_SECONDS:-100}" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?" >> "$OUT/gpu.txt"
cp /tmp/sweep/sweep.json /tmp/sweep/sweep.md "$OUT/" 2>/dev/null
tar czf "$OUT/sweep_runs.tgz" -C /tmp/sweep logs $(cd /tmp/sweep && ls -d */metrics.jsonl */over_training.* */config.json 2>/dev/null)
