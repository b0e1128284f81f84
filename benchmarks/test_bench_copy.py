"""The copy bandwidth of each device, measured in the same run as the kernels.

A 64 MB float32 copy moves 128 MB (read + write). The report divides each kernel's achieved
GB/s by the best copy bandwidth of its device. On the CPU, ``np.copyto`` uses one thread, so a
Numba ``prange`` copy (every thread) is measured too, and one with ordinary stores (see
``workloads.parallel_copy``: the ceiling of a kernel that writes a fresh buffer); on the GPU,
``cupy.copyto``.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from backprop.backend import to_numpy
from report import PLAIN_STORES
from workloads import (COPY_BYTES, array_module, copy_buffers, device_unavailable_reason,
                       parallel_copy)

SMOKE_COPY_BYTES = 64 * 1024
METHODS = [("cpu", "numpy_copyto"), ("cpu", "numba_prange"), ("cpu", PLAIN_STORES),
           ("cuda", "cupy_copyto")]


@pytest.mark.parametrize("device,method", METHODS, ids=[f"{d}-{m}" for d, m in METHODS])
def test_copy_bandwidth(measure, smoke, device, method):
    reason = device_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    if method.startswith("numba") and importlib.util.find_spec("numba") is None:
        pytest.skip("Numba is not installed")
    xp = array_module(device)
    src, dst = copy_buffers(xp, SMOKE_COPY_BYTES if smoke else COPY_BYTES)
    if method.startswith("numba"):
        copy = parallel_copy(plain_stores=method == PLAIN_STORES)

        def fn():
            copy(dst, src)
    else:
        def fn():
            xp.copyto(dst, src)
    measure(fn, device=device, group="copy:64MB", kind="copy", method=method,
            bytes=2 * src.nbytes, flops=0, shape=[src.size])
    assert np.array_equal(to_numpy(dst), to_numpy(src)), f"{method} did not copy"
