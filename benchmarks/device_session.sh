#!/usr/bin/env bash
# One rented-GPU session (see docs/benchmarks.md): build the default world on the GPU, then the
# Stable-Diffusion-scale benchmark. Run from the repository root with diffusers' wheel in .whl/ and
# $OUT set to the folder whose files come back.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$OUT/gpu.txt"

# 1. The default world (the demo's teacher), exported in fp16
timeout "${WORLD_SECONDS:-400}" python3 -m latent_consistency.cli world build --preset default --out /tmp/world --device cuda \
    > "$OUT/world_build.log" 2>&1
echo "world build exit $?" >> "$OUT/gpu.txt"
if python3 -m latent_consistency.cli world export --from /tmp/world --out /tmp/world_default >> "$OUT/world_build.log" 2>&1; then
    tar czf "$OUT/world_default.tgz" -C /tmp world_default
fi
cp /tmp/world/build_state.json "$OUT/" 2>/dev/null

# 2. SD-scale speed of the library's sampling and LCD training steps (random weights)
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/sd_scale.py --device cuda --dtype float16 --out "$OUT" > "$OUT/sd_scale.md" 2>&1
echo "benchmark exit $?" >> "$OUT/gpu.txt"
