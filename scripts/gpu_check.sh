#!/usr/bin/env bash
# The checks that need a GPU: the CUDA tests (pinned memory, copy stream, the Triton HQQ kernel
# against hqq's dequantization) and the kernel benchmark at decode batch sizes 1 and 8.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests/test_cuda.py
for batch in 1 8; do
    python -m moe_runtime.kernels.bench --device cuda --batch "$batch" --repeats 20
done
