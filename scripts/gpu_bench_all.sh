#!/usr/bin/env bash
# One device call: every GPU-marked test, then the full `fp4serve bench` on the real 27B geometry (NVFP4 through our
# engine with CUDA graphs, the BF16 baseline, transformers), under one time budget. Run from the repository root
# with the wheels in .whl/ (carry [".whl"]). Files land in $OUT: gpu.txt, pytest_gpu.log, the bench JSON + PNG + log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-140}" python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors -rfE 2>&1 | tail -60 > "$OUT/pytest_gpu.log"
tail -25 "$OUT/pytest_gpu.log"
timeout "${BENCH_S:-400}" python3 -m fp4serve bench --geometry 27b --time-budget "${BUDGET_S:-330}" \
  --output "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-27b.log" | tail -60
