#!/usr/bin/env bash
# The checks that need a GPU, in one run, with one summary at the end:
#
#   step           budget  what
#   cuda-tests     200 s   tests/test_cuda.py: greedy parity of the engine on CUDA against transformers,
#                          pinned host records, the copy stream, slot reuse, the Triton HQQ kernel against
#                          hqq (bf16 cases skipped below sm_80), the memory hierarchy (exclusive levels,
#                          write-back, pinned arena, counters == simulator), moe_runtime/device.py's
#                          CudaDevice (exact pinned size via cudaHostRegister, threads on cuda:N)
#   kernel-bench    60 s   the kernel benchmark (one Mixtral expert FFN) at decode batch sizes 1 and 8
#   mixtral-bench  180 s   the Mixtral-shaped benchmark (2 layers of H 4096 / I 14336 2-bit experts,
#                          routing replayed from the shipped trace) on CUDA, the engine's variants
#                          (no-cache, lru, lru+prefetch, lru+host, resident; accelerate's baselines
#                          move 16-bit experts and do not fit the budget)
#   total          440 s   + the package check and GPU probe (~20 s): under 8 minutes; the summary says
#                          when a run went over
#
# A budget is the step's timeout: a step over it is stopped and reported (rc=124), the others still run.
# Budgets are reasoned from the CPU runs and the sizes moved, not yet measured on a GPU (docs/results.md).
#
#   bash scripts/gpu_check.sh            on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry-run  anywhere (CI runs it): each step's setup on the CPU, the CUDA
#                                        work skipped: test_cuda.py collected (imports, parameter grids)
#                                        and its CPU stand-ins run (-k emulated), the kernel bench
#                                        and the Mixtral-shaped bench at small sizes on the CPU
#
# Works offline on a machine with torch, transformers and accelerate only: missing pure-Python
# packages (hqq built with DISABLE_CUDA=1, termcolor, einops, xxhash, psutil) are installed from the
# git-ignored .whl/ folder (scripts/gpu_wheels.sh fills it on a machine with network).
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
case "${1:-}" in
    "") ;;
    --dry-run) dry_run=1 ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run]   (unknown argument: $1)" >&2; exit 2 ;;
esac
OUT="${OUT:-$(mktemp -d)}"
TOTAL_BUDGET=480
declare -A status
failed=0

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
if [ "$dry_run" = 1 ]; then
    echo "dry run: every step's setup on the CPU, the CUDA work skipped"
    device=cpu
else
    python -c "import torch; print('GPU:', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), \
'| torch', torch.__version__)" || { echo "no CUDA GPU: nothing to check (--dry-run runs the CPU part)"; exit 1; }
    device=cuda
fi

step() {  # name, budget (s), command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name (budget $limit s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=1
    status[$name]="rc=$rc, $((SECONDS - start)) s of $limit s"
    tail -15 "$OUT/$name.log"
}

engine_variants=no-cache,lru,lru+prefetch,lru+host,resident
start_all=$SECONDS
if [ "$dry_run" = 1 ]; then
    step cuda-tests 120 bash -c 'python -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py | tail -1 &&
        python -m pytest -q -p no:cacheprovider -k emulated tests/test_device.py tests/test_hierarchy_emulated.py'
    step kernel-bench 60 bash -c 'for b in 1 8; do python -m moe_runtime.kernels.bench --device cpu --hidden 64 \
        --intermediate 128 --bits 2 --batch "$b" --repeats 1; done'
    step mixtral-bench 120 python -m moe_runtime.bench --quick --parts workload-2bit --device cpu --layers 2 \
        --variants "$engine_variants" --store-dir "$OUT/store" --out "$OUT/bench"
else
    step cuda-tests 200 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
    step kernel-bench 60 bash -c 'for b in 1 8; do python -m moe_runtime.kernels.bench --device cuda --batch "$b" \
        --repeats 20; done'
    step mixtral-bench 180 python -m moe_runtime.bench --parts workload-2bit --device "$device" --layers 2 \
        --variants "$engine_variants" --store-dir "$OUT/store" --out "$OUT/bench"
fi
elapsed=$((SECONDS - start_all))

echo
echo "=== summary ($(date -u +%F' '%H:%MZ), $([ "$dry_run" = 1 ] && echo "dry run, ")logs in $OUT)"
for name in cuda-tests kernel-bench mixtral-bench; do echo "$name: ${status[$name]:-not run}"; done
echo "steps: $elapsed s of $TOTAL_BUDGET s$([ "$elapsed" -gt "$TOTAL_BUDGET" ] && echo " (over budget)")"
grep -E "passed|failed|error" "$OUT/cuda-tests.log" | tail -1
[ -f "$OUT/bench/bench.md" ] && sed -n '/^### Mixtral-8x7B-shaped experts, 2-bit/,/^$/p;/^| variant/,/^$/p' "$OUT/bench/bench.md" | head -20
exit "$failed"
