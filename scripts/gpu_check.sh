#!/usr/bin/env bash
# The checks that need a GPU, in one run (< 8 minutes on one GPU), with one summary at the end:
#   1. tests/test_cuda.py: greedy parity of the engine on CUDA against transformers, pinned host
#      records, the copy stream, slot reuse, the Triton HQQ kernel against hqq, and the memory
#      hierarchy (exclusive device/host levels, write-back, pinned host arena, counters == simulator);
#   2. the kernel benchmark at decode batch sizes 1 and 8;
#   3. the Mixtral-shaped benchmark (2 layers of H 4096 / I 14336 2-bit experts, routing replayed
#      from the shipped trace) on CUDA, host-RAM cache variant included.
# Works offline on a machine with torch, transformers and accelerate only: missing pure-Python
# packages (hqq built with DISABLE_CUDA=1, termcolor, einops, xxhash, psutil) are installed from the
# git-ignored .whl/ folder (scripts/gpu_wheels.sh fills it on a machine with network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
declare -A status

missing=$(python - <<'PY'
import importlib.util
print(" ".join(m for m in ("hqq", "termcolor", "einops", "xxhash", "psutil", "pytest")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "installing from .whl/: $missing"
    extra=""; case " $missing " in *" pytest "*) extra="iniconfig pluggy";; esac
    # shellcheck disable=SC2086
    pip install --no-index --find-links .whl/ --no-deps $missing $extra >"$OUT/pip.log" 2>&1 || {
        echo "pip install from .whl/ failed (see $OUT/pip.log)"; tail -5 "$OUT/pip.log"; }
fi
python -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" \
    || { echo "no CUDA GPU: nothing to check"; exit 1; }

step() {  # name, timeout (s), command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    status[$name]="rc=$rc, $((SECONDS - start)) s"
    tail -15 "$OUT/$name.log"
}

step cuda-tests 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
step kernel-bench 90 bash -c 'for b in 1 8; do python -m moe_runtime.kernels.bench --device cuda --batch "$b" --repeats 20; done'
step mixtral-bench 240 python -m moe_runtime.bench --parts workload-2bit --device cuda --layers 2 \
    --store-dir "$OUT/store" --out "$OUT/bench"

echo
echo "=== summary ($(date -u +%F' '%H:%MZ), logs in $OUT)"
for name in cuda-tests kernel-bench mixtral-bench; do echo "$name: ${status[$name]:-not run}"; done
grep -E "passed|failed|error" "$OUT/cuda-tests.log" | tail -1
[ -f "$OUT/bench/bench.md" ] && sed -n '/^### Mixtral-8x7B-shaped experts, 2-bit/,/^$/p;/^| variant/,/^$/p' "$OUT/bench/bench.md" | head -20
