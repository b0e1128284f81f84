"""The NaN/inf check that ``fit``, ``evaluate`` and ``predict`` run on every input before
any work (``backprop.data.validate``): ``isfinite(X).all()`` against
``backprop.data.all_finite``'s BLAS row sums, on the CPU, on a prediction batch of the
mnist MLP (4096×784) and on mnist's training set (60000×784), float32.
"""
from __future__ import annotations

import numpy as np
import pytest

from backprop import data

SHAPES = [(4096, 784), (60000, 784)]
SMOKE_SHAPE = (256, 256)  # still above data.PRODUCT_CHECK_MIN_VALUES: the row-sum path
METHODS = {"isfinite": lambda X: bool(np.isfinite(X).all()), "row_sums": data.all_finite}


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("method", list(METHODS))
def test_finite_check(measure, smoke, method, shape):
    if smoke:
        shape = SMOKE_SHAPE
    assert shape[0] * shape[1] >= data.PRODUCT_CHECK_MIN_VALUES
    X = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    check = METHODS[method]
    measure(lambda: check(X), device="cpu", group=f"check:finite:{shape[0]}x{shape[1]}",
            kind="check", method=method, bytes=X.nbytes, flops=X.size, shape=list(shape))
    assert check(X)
    X[-1, -1] = np.nan
    assert not check(X), f"{method} missed a NaN"
