#!/usr/bin/env bash
# The GPU check (issue 17), for one H100/H200: the CUDA tests, then PTQ4SAM and CAR-SAM W4A4 on random-init vit_b
# with a reduced budget (time per unit, peak GPU memory, extrapolated to the paper budget). Under 8 minutes.
#   bash bench/gpu_check.sh [OUT]        (OUT defaults to runs/gpu_check; results: OUT/gpu_check.{md,json})
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
# the CUDA subset first: a failure here stops the check before the long part
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -rs --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
timeout 360 "$PY" bench/gpu_check.py --out "$OUT" --iters "${ITERS:-100}" 2>&1 | tee "$OUT/gpu_check.log"
