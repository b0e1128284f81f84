#!/usr/bin/env bash
# The test command of the README (`make test` runs this). Creates .venv if needed, installs
# backprop with its test and docs extras, then runs three pytest jobs and the docs build:
#   1. the whole suite. The model-level files (marked `backends`) run once per kernel backend
#      that can run here (tests/conftest.py, --backend): the default dispatch (numba_cpu),
#      the reference oracle, and the CuPy backend's CUDA C++ compiled for this CPU
#      (cupy_on_host; skipped with the reason where no C++ compiler is). The kernel files
#      iterate the backends themselves; the 2- and 3-rank MPI jobs of test_distributed use
#      mpiexec from the mpich wheel;
#   2. the Numba CUDA kernels for real in Numba's CUDA simulator, which must be switched on
#      before Python starts: the kernel harness's numba_cuda cases, then the layer, loss,
#      optimizer, gradcheck and regularizer files on those kernels (the training loops would
#      take the simulator many minutes);
#   3. the documentation site (`make docs`'s build): Sphinx with warnings as errors and every
#      reference checked, so a docstring that breaks the markup or names something that is
#      gone fails here (the pages' examples run in job 1: tests/test_docs.py);
#   4. the benchmarks once in smoke mode (--benchmark-disable) so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/venv.sh test,docs
P="$VENV/bin/python -m pytest"
export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-2}
# one pytest worker per core (pytest-xdist): most of the first run is Numba compiling the
# kernels, which it caches on disk for the later jobs. Compilation makes a few hundred tests
# cost seconds and the rest milliseconds: with xdist's default (load) scheduling one worker
# was left with a queue of them while the other sat idle; worksteal hands them over.
WORKERS=${PYTEST_WORKERS:-$(nproc)}
XDIST="-n $WORKERS --dist worksteal"

echo "== 1/4 the suite; model-level files on each kernel backend =="
$P tests -q -ra $XDIST | grep -v "^SKIPPED.*no CUDA device"

echo "== 2/4 Numba CUDA kernels in the simulator =="
SIM_TESTS=(tests/test_kernels.py tests/test_layers.py tests/test_losses.py tests/test_optim.py
           tests/test_gradcheck.py tests/test_regularizers.py)
# Numba's simulator runs a block's threads as Python threads under a polling block manager;
# on a loaded 2-core machine a kernel whose threads meet at syncthreads (the column sums of
# batchnorm and of the bias gradient) has come out wrong now and then, on kernels that pass
# when rerun and on a GPU. The failed cases run once more: a real bug fails both times.
if ! NUMBA_ENABLE_CUDASIM=1 $P -q $XDIST --backend numba_cuda_sim -k numba_cuda "${SIM_TESTS[@]}"; then
  echo "== 2/4 again: the failed simulator cases, once more, one worker =="
  NUMBA_ENABLE_CUDASIM=1 $P -q --lf --backend numba_cuda_sim -k numba_cuda "${SIM_TESTS[@]}"
fi

echo "== 3/4 the documentation site (build/docs/html) =="
"$VENV/bin/python" -m sphinx -W --keep-going -n -E -q -b html docs build/docs/html

echo "== 4/4 benchmarks, smoke mode =="
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  $P benchmarks -q --benchmark-disable $XDIST
else
  echo "no benchmarks yet"
fi
