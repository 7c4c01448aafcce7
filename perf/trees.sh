#!/bin/sh
# Tree-model inference, one thread, batch 1/32/128: beast's evaluator vs xgboost,
# lightgbm and the compiled anchors (tl2cgen, lleaves) on the same model files and rows.
# Usage: perf/trees.sh [DIR]   (DIR default /tmp/beast-trees-bench; PY default python3:
# a Python with xgboost, lightgbm, scikit-learn and optionally treelite+tl2cgen, lleaves).
set -e
DIR=${1:-/tmp/beast-trees-bench}
PY=${PY:-python3}
cd "$(dirname "$0")/.."
[ -f "$DIR/rows.csv" ] || "$PY" perf/trees_bench.py prepare "$DIR"
echo "== beast (cargo bench --bench trees), commit $(git rev-parse --short HEAD)"
BEAST_TREES_BENCH_DIR="$DIR" taskset -c 1 cargo bench --bench trees 2>/dev/null | grep -v '^$'
echo "== Python runtimes, one thread"
OMP_NUM_THREADS=1 taskset -c 1 "$PY" perf/trees_bench.py time "$DIR"
