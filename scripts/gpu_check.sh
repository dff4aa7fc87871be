#!/usr/bin/env bash
# GPU check of issue #11, for a machine with an NVIDIA GPU and CUDA-enabled torch:
# 10 users with simulation=gpu (four ClientApps per GPU), the same run on the CPU, the filter
# scored on CUDA and on the CPU, peak GPU memory. Results: OUT/gpu_check.json, OUT/summary.md.
# Usage: scripts/gpu_check.sh [OUT]   (creates .venv through `make` when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
if [ ! -x .venv/bin/python ]; then make .venv/.installed; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
exec .venv/bin/python scripts/gpu_check.py --out "$OUT"
