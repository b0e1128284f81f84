"""Once warm, a training step allocates nothing in its fused kernels and no array in Python.

Two counters watch five steps after three warm-up steps: Numba's runtime allocation count
(every array a compiled kernel creates goes through it; so does the small record that wraps
each array argument on entry, which the test counts and subtracts) and the peak of Python's
traced memory (NumPy reports every array buffer to ``tracemalloc``). The model has every kind of
layer with a fused kernel: Dense with a NEEDS_Z activation (GELU writes Z) and one without,
BatchNorm1d, Dropout, softmax cross-entropy and Adam; the batch is large enough that any
temporary array (≥ 16 KB here) would exceed the allowance for small Python objects. On a GPU,
a CuPy MemoryHook counts the requests to the memory pool instead.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import backprop as bp
from backprop import gemm
from backprop import kernels as K

pytestmark = pytest.mark.codegen  # allocation checks: every test of this file

SMALL_OBJECTS = 8 * 1024  # bytes of loss scalars, views and tuples a step may keep alive
SMALL_REQUEST = 4 * 1024  # bytes: on the GPU, a request below this is no array of the batch


def _step_and_model(dtype, rows=256):
    model = bp.Sequential([
        bp.Dense(20, 64, activation="gelu", rng=0, dtype=dtype), bp.BatchNorm1d(64, dtype=dtype),
        bp.Dropout(0.2, seed=0), bp.Dense(64, 64, activation="relu", rng=1, dtype=dtype),
        bp.Dense(64, 5, rng=2, dtype=dtype)])
    loss = bp.SoftmaxCrossEntropyLoss()
    loss.validate_labels = False  # as in fit, which validates its data once, before the steps
    optimizer = bp.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = bp.asarray(rng.standard_normal((rows, 20)).astype(dtype))
    y = bp.asarray(rng.integers(0, 5, rows))

    def step():
        optimizer.zero_grad()
        value = loss.forward(model.forward(x), y)
        model.backward(loss.backward(), need_input_grad=False)
        optimizer.step()
        return value

    return step


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_numba_cpu_training_step_allocates_nothing_once_warm(dtype, monkeypatch):
    pytest.importorskip("numba")
    from numba.core.runtime import _nrt_python, rtsys

    from backprop.kernels import numba_cpu

    try:
        cpu_kernels = K.backend_name("cpu")
    except K.KernelBackendError as exc:
        pytest.skip(f"no CPU kernels under this BACKPROP_KERNELS: {exc}")
    if cpu_kernels != "numba_cpu":
        pytest.skip(f"the CPU kernels are {cpu_kernels!r}, not numba_cpu "
                    "(BACKPROP_KERNELS selects them); the reference allocates by design")
    with bp.use_device("cpu"):
        step = _step_and_model(dtype)
    for _ in range(3):
        step()
    arguments = [0]  # array arguments handed to compiled kernels: one wrapper record each
    run = numba_cpu._Loops.__call__

    def counting(self, work, *args):
        arguments[0] += sum(isinstance(a, np.ndarray) for a in args)
        return run(self, work, *args)

    monkeypatch.setattr(numba_cpu._Loops, "__call__", counting)
    call = gemm._STATE.get("call")  # MKL's or the tiles' call, where they run the products
    if call is not None:
        # arrays their compiled entry receives: MKL's caller a, b, out; the tiles' also the
        # scratch pair (backprop.kernels.matmul.run)
        per_call = {"mkl": 3, "numba": 5}[gemm.backend()]

        def counting_products(*args):
            ran = call(*args)
            arguments[0] += per_call if ran else 0
            return ran

        monkeypatch.setitem(gemm._STATE, "call", counting_products)
    _nrt_python.memsys_enable_stats()
    tracemalloc.start()
    try:
        kernel_allocs = rtsys.get_allocation_stats().alloc
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5):
            step()
        _, peak = tracemalloc.get_traced_memory()
        kernel_allocs = rtsys.get_allocation_stats().alloc - kernel_allocs - arguments[0]
    finally:
        tracemalloc.stop()
        _nrt_python.memsys_disable_stats()
    assert kernel_allocs == 0, f"the kernels allocated {kernel_allocs} arrays in five steps"
    assert peak - base < SMALL_OBJECTS, (
        f"five warm steps raised traced memory by {peak - base} bytes: an array is "
        "allocated per step")


def test_cuda_training_step_allocates_nothing_once_warm():
    """The same model on the GPU: in five warm steps CuPy's memory pool is asked for no array
    of the batch (a MemoryHook sees every request, cached blocks included). Allowed: requests
    under SMALL_REQUEST bytes, the loss value (a fresh 0-d array each step, which a caller may
    keep) and its reduction's scratch; the smallest array of this batch is 16 KB."""
    from conftest import skip_unless_device

    skip_unless_device("cuda")
    import cupy

    kernels = K.backend_name("cuda")
    if kernels == "reference":
        pytest.skip("the reference kernels allocate by design (BACKPROP_KERNELS selects them)")

    class CountRequests(cupy.cuda.MemoryHook):
        name = "CountRequests"

        def __init__(self):
            self.sizes = []

        def malloc_preprocess(self, **kwargs):
            if kwargs["size"] >= SMALL_REQUEST:
                self.sizes.append(kwargs["size"])

    with bp.use_device("cuda"):
        step = _step_and_model(np.float32, rows=4096)
    for _ in range(3):
        step()
    hook = CountRequests()
    with hook:
        for _ in range(5):
            step()
    cupy.cuda.Device().synchronize()
    assert not hook.sizes, (f"five warm steps with the {kernels} kernels asked the memory pool "
                            f"for {len(hook.sizes)} arrays (bytes: {hook.sizes[:10]})")
