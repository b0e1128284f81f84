#!/usr/bin/env bash
# The benchmark suite (`make bench` runs this). Creates .venv if needed, installs backprop with
# its test extra, then writes into benchmarks/results/<machine-slug>-<date>/:
#   machine.json     CPU model, cores, memory, BLAS, GPU, library versions
#   benchmark.json   pytest-benchmark results: kernels, copy bandwidth, training steps, floors
#   pytest.txt       the pytest-benchmark tables (grouped: CPU/GPU, fused/reference side by side)
#   torch.json       PyTorch vs backprop training steps, each in its own process (if torch imports)
#   report.md/.png   the report (python benchmarks/report.py RESULTS_DIR)
# Extra arguments go to pytest, e.g. `bash ci/bench.sh -k step`. Environment: BENCH_THREADS
# (default: all usable CPUs, for Numba, BLAS and torch alike), BENCH_OUT (results folder).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/venv.sh test
PYBIN="$VENV/bin/python"

THREADS=${BENCH_THREADS:-$(nproc)}
export NUMBA_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS \
  MKL_NUM_THREADS=$THREADS
OUT=${BENCH_OUT:-benchmarks/results/$("$PYBIN" benchmarks/report.py --slug)-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
echo "== machine -> $OUT/machine.json"
"$PYBIN" benchmarks/report.py --machine | tee "$OUT/machine.json"

echo "== benchmark suite ($THREADS threads) -> $OUT/benchmark.json"
"$PYBIN" -m pytest benchmarks --benchmark-only --benchmark-group-by=group \
  --benchmark-sort=name --benchmark-columns=min,median,iqr,rounds \
  --benchmark-json="$OUT/benchmark.json" "$@" | tee "$OUT/pytest.txt"

echo "== PyTorch comparison"
if "$PYBIN" -c "import torch" 2>/dev/null; then
  "$PYBIN" benchmarks/torch_compare.py --threads "$THREADS" --out "$OUT/torch.json"
else
  echo "PyTorch is not installed: skipping the comparison (pip install torch to add it)"
fi

echo "== report"
"$PYBIN" benchmarks/report.py "$OUT"
