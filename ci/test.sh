#!/usr/bin/env bash
# The test command of the README (`make test` runs this). Creates .venv if needed, installs
# backprop with its test extra, then runs, each as its own pytest job:
#   1. the whole suite with the default kernels (numba_cpu on this CPU), the 2- and 3-rank
#      MPI jobs of tests/test_distributed.py included (mpiexec from the mpich wheel);
#   2. the model-level suite again with BACKPROP_KERNELS=reference (the oracle path);
#   3. the model-level suite again on the CuPy backend's kernels, their CUDA C++ compiled
#      for this CPU (tests/cuda_host.py; skipped with the reason where no C++ compiler is);
#   4. the Numba CUDA kernels for real in Numba's CUDA simulator (small shapes), then the
#      layer, loss, optimizer, gradcheck and regularizer tests on them;
#   5. the benchmarks once in smoke mode (--benchmark-disable) so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/venv.sh test
P="$VENV/bin/python -m pytest"
export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-2}
# one pytest worker per core (pytest-xdist): most of the first run is Numba compiling the
# kernels, which it caches on disk for the later jobs. Compilation makes a few hundred tests
# cost seconds and the rest milliseconds: with xdist's default (load) scheduling one worker
# was left with a queue of them while the other sat idle; worksteal hands them over.
WORKERS=${PYTEST_WORKERS:-$(nproc)}
XDIST="-n $WORKERS --dist worksteal"

KERNEL_TESTS="--ignore=tests/test_kernels.py --ignore=tests/test_cupy_compile.py \
  --ignore=tests/test_cupy_launches.py --ignore=tests/test_numba_cuda_compile.py \
  --ignore=tests/test_cuda_host.py"

echo "== 1/5 full suite, default kernels =="
$P tests -q $XDIST

echo "== 2/5 model suite, BACKPROP_KERNELS=reference =="
BACKPROP_KERNELS=reference $P tests -q $XDIST -m "not cudasim" $KERNEL_TESTS

echo "== 3/5 model suite, the CuPy kernels compiled for this CPU =="
# not the codegen checks (they hold numba_cpu's code and its zero allocations; the host
# launchers allocate), nor the MPI jobs of test_distributed (processes of their own, on the
# default kernels)
BACKPROP_TEST_KERNELS=cupy_on_host $P tests -q -ra $XDIST -m "not cudasim and not codegen" \
  $KERNEL_TESTS --ignore=tests/test_distributed.py | grep -v "^SKIPPED.*no CUDA device"

echo "== 4/5 Numba CUDA kernels in the simulator =="
NUMBA_ENABLE_CUDASIM=1 $P tests/test_kernels.py -q -k numba_cuda
# the training loops (test_training, test_model, ...) would take the simulator many minutes
NUMBA_ENABLE_CUDASIM=1 BACKPROP_TEST_KERNELS=numba_cuda_sim $P -q $XDIST -m "not cudasim" \
  tests/test_layers.py tests/test_losses.py tests/test_optim.py tests/test_gradcheck.py \
  tests/test_regularizers.py

echo "== 5/5 benchmarks, smoke mode =="
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  $P benchmarks -q --benchmark-disable
else
  echo "no benchmarks yet"
fi
