#!/usr/bin/env bash
# Fill the git-ignored .whl/ folder with what scripts/gpu_check.sh installs on an offline GPU machine
# that has torch, transformers and accelerate: a pure-Python hqq (its CUDA extension is not built),
# and the small packages the engine and tests import. Binary wheels (xxhash) for CPython 3.10-3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
DISABLE_CUDA=1 pip wheel --no-deps hqq==0.2.8.post1 -w .whl/
pip download --no-deps -d .whl/ termcolor einops psutil pytest iniconfig pluggy
for py in 3.10 3.11 3.12; do
    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$py" \
        -d .whl/ "xxhash>=3.4"
done
ls -la .whl/
