#!/usr/bin/env bash
# Set up a machine to run the app and the tests: Python packages, then Chromium for the browser test.
# torch: if none is installed, take 2.13.0 (on these CPU machines a CPU build is on disk; elsewhere pip
# fetches the default build). Install another torch first to keep it (any torch >= 2.4 works).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q torch==2.13.0
fi
# DISABLE_CUDA=1: hqq builds from source; the engine uses its PyTorch (de)quantizer, not its CUDA kernels
DISABLE_CUDA=1 python -m pip install -q -r requirements.txt
# Debian's Chromium for the end-to-end browser test (skipped with a message where it is missing).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped"
fi
echo "setup: done ($(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
