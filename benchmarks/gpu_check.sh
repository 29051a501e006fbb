#!/usr/bin/env bash
# The prepared GPU check (issue 13): training speed vs the plain PyTorch loop, seconds per defense run at 1 and 4
# workers per GPU, the survey grid's projected GPU-hours; under 12 minutes on one H100/H200, inputs made on the
# spot (benchmarks/gpu_check.py says what and how). Results: <out>/gpu_check.json and the printed lines.
#   bash benchmarks/gpu_check.sh [--out runs/gpu_check]      # needs a CUDA device and the project's dependencies
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/check  # the same stages at toy sizes on the CPU (the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
