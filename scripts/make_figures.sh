#!/usr/bin/env bash
# Regenerate every benchmark table and figure in docs/ (docs/results.md quotes them).
#   bash scripts/make_figures.sh            # full run: 7 min 16 s measured on 2 CPU cores, plus ~5 minutes
#                                           # the first time, to build the stores in expert-store/bench
#   bash scripts/make_figures.sh --quick    # seconds-long smoke run of the same pipeline
# The routing trace is shipped; to re-record it after retraining assets/tiny-mixtral:
#   python -m moe_runtime.bench --record-trace assets/traces/tiny-mixtral.json
set -euo pipefail
cd "$(dirname "$0")/.."
trace=assets/traces/tiny-mixtral.json
out=docs/bench
sim=docs/simulate
if [ "${1:-}" = "--quick" ]; then
  out=bench-results/quick
  sim=bench-results/quick/simulate
fi
mkdir -p "$out" "$sim"
python -m moe_runtime.bench --out "$out" "$@"
python -m moe_runtime.sim "$trace" --cache-sizes 1,2,3,4,5,6,7 --prefetch 0,2 \
  --markdown "$sim/simulate.md" --json "$sim/simulate.json"
echo "make_figures: wrote $out and $sim"
