"""Once warm, a training step allocates nothing in its fused kernels and no array in Python.

Two counters watch five steps after three warm-up steps: Numba's runtime allocation count
(every array a compiled kernel creates goes through it; so does the small record that wraps
each array argument on entry, which the test counts and subtracts) and the peak of Python's
traced memory (NumPy reports every array buffer to ``tracemalloc``). The model has every kind of
layer with a fused kernel: Dense with a NEEDS_Z activation (GELU writes Z) and one without,
BatchNorm1d, Dropout, softmax cross-entropy and Adam; the batch is large enough that any
temporary array (≥ 16 KB here) would exceed the allowance for small Python objects.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import backprop as bp
from backprop import kernels as K

SMALL_OBJECTS = 8 * 1024  # bytes of loss scalars, views and tuples a step may keep alive


def _step_and_model(dtype):
    model = bp.Sequential([
        bp.Dense(20, 64, activation="gelu", rng=0, dtype=dtype), bp.BatchNorm1d(64, dtype=dtype),
        bp.Dropout(0.2, seed=0), bp.Dense(64, 64, activation="relu", rng=1, dtype=dtype),
        bp.Dense(64, 5, rng=2, dtype=dtype)])
    loss = bp.SoftmaxCrossEntropyLoss()
    optimizer = bp.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 20)).astype(dtype)
    y = rng.integers(0, 5, 256)

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

    if K.backend_name("cpu") != "numba_cpu":
        pytest.skip(f"the CPU kernels are {K.backend_name('cpu')!r}, not numba_cpu "
                    "(BACKPROP_KERNELS selects them); the reference allocates by design")
    step = _step_and_model(dtype)
    for _ in range(3):
        step()
    arguments = [0]  # array arguments handed to compiled kernels: one wrapper record each
    run = numba_cpu._Loops.__call__

    def counting(self, work, *args):
        arguments[0] += sum(isinstance(a, np.ndarray) for a in args)
        return run(self, work, *args)

    monkeypatch.setattr(numba_cpu._Loops, "__call__", counting)
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
