"""Compile every Numba CUDA kernel to PTX, without a GPU.

The CUDA simulator runs the kernels' logic in Python and does not type-check them, so this
test compiles what the wrappers of ``backprop.kernels.numba_cuda`` launch: each op is called
on small NumPy arrays with the launch recorded instead of run, and every recorded kernel is
compiled with ``numba.cuda.compile_ptx`` for the argument types the launch carries, for
float32 and float64 and every activation. It needs libNVVM (pip: nvidia-cuda-nvcc-cu12).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from backprop import kernels
from backprop.kernels import optimizers
from conftest import kernel_arguments

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")
pytestmark = [pytest.mark.kernel_harness,  # ci/gpu.sh runs these in its kernels step
              pytest.mark.skipif(
                  SIMULATED, reason="numba.cuda.compile_ptx is not simulated: run this test "
                                    "without NUMBA_ENABLE_CUDASIM=1")]

CC = (8, 0)  # any compute capability works without a GPU; sm_80 has float64 atomics etc.
DTYPES = (np.float32, np.float64)
ACTIVATION_OPS = ("bias_act_forward", "bias_act_backward")
# Element-wise kernels must compute float32 in float32: no f64 instruction in their PTX.
FLOAT32_ONLY_OPS = ("bias_act_forward", "sgd_step", "rmsprop_step", "adam_step",
                    "adagrad_step", "dropout")


NUMBA_CUDA_OPS = sorted(op for op, backends in kernels.OPS.items() if "numba_cuda" in backends)
CASES = [pytest.param(op, dtype, act, id=f"{op}-{np.dtype(dtype).name}" + (f"-{act}" if act else ""))
         for op in NUMBA_CUDA_OPS for dtype in DTYPES
         for act in (kernels.ACTIVATIONS if op in ACTIVATION_OPS else (None,))]


@pytest.fixture(scope="module")
def numba_cuda():
    """The kernel module, once libNVVM is known to load (else the test is skipped)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:  # any failure to load libNVVM means: cannot compile here
        pytest.skip(f"libNVVM is unavailable, so no PTX can be compiled (pip install "
                    f"nvidia-cuda-nvcc-cu12): {type(exc).__name__}: {exc}")
    from backprop.kernels import numba_cuda

    return numba_cuda


def _recorded_launches(module, monkeypatch, op, args):
    launches = []
    monkeypatch.setattr(module, "_launch",
                        lambda kernel, grid, block, *a: launches.append((kernel, a)))
    getattr(module, op)(*args)
    return launches


@pytest.mark.parametrize("op, dtype, act", CASES)
def test_kernels_compile_to_ptx(numba_cuda, monkeypatch, op, dtype, act):
    import numba
    from numba import cuda

    launches = _recorded_launches(numba_cuda, monkeypatch, op, kernel_arguments(op, dtype, act))
    assert launches, f"{op} launched no kernel"
    for kernel, args in launches:
        signature = tuple(numba.typeof(a) for a in args)
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=CC)  # raises on any error
        assert ".entry" in ptx
        if dtype == np.float32 and op in FLOAT32_ONLY_OPS:
            f64 = [line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line)]
            assert not f64, (f"float32 kernel of {op} ({act}) computes in float64, e.g. "
                             f"{f64[:3]}: cast its constants to the array dtype")



def test_dropout_hash_multiplies_in_32_bits(numba_cuda, monkeypatch):
    """NVIDIA GPUs emulate 64-bit integer multiplies: the hash's must compile to 32-bit ones."""
    import numba
    from numba import cuda

    (kernel, args), = _recorded_launches(numba_cuda, monkeypatch, "dropout",
                                         kernel_arguments("dropout", np.float32, None))
    ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(numba.typeof(a) for a in args), cc=CC)
    constants = {0x7FEB352D, 0x846CA68B, kernels.reference.GOLDEN32}
    spellings = "|".join(str(v) for c in constants for v in (c, c - 2**32))
    wide = re.findall(rf"mul\.lo\.[su]64\s[^;]*\b(?:{spellings});", ptx)
    narrow = re.findall(rf"mul\.lo\.[su]32\s[^;]*\b(?:{spellings});", ptx)
    assert not wide, f"64-bit multiplies in the dropout hash: {wide[:3]}"
    assert narrow, "no 32-bit hash multiply found in the dropout PTX (did the hash change?)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(optimizers.RECORDS))
def test_every_optimizer_variant_compiles_to_ptx(numba_cuda, name, dtype):
    """The ops above launch one variant each; every variant (which states are kept) of every
    optimizer record compiles, float32 ones without an f64 instruction."""
    import numba
    from numba import cuda

    record = optimizers.RECORDS[name]
    array = numba.typeof(np.zeros(4, dtype))
    c = numba.typeof(tuple(np.dtype(dtype).type(0.5) for _ in record.scalars)
                     + (True,) * len(record.flags))
    slots = optimizers.SLOTS
    for present in record.variants:
        kept = tuple(present) + (False,) * (slots - len(present))
        kernel = numba_cuda._optimizer_kernel(name, kept, np.dtype(dtype))
        ptx, _ = cuda.compile_ptx(kernel.py_func, (array,) * (2 + slots) + (c,), cc=CC)
        f64 = [line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line)]
        assert dtype == np.float64 or not f64, (record.variant_name(present), f64[:3])
