"""backprop.kernels.matmul: the tiled products against NumPy's matmul (the oracle), on
shapes with every remainder the tiles handle, random and extreme values, one to three
threads; its refusals; several Python threads at once."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from backprop.kernels import matmul
from conftest import run_threads

pytestmark = pytest.mark.skipif(numba.config.DISABLE_JIT,
                                reason="NUMBA_DISABLE_JIT=1: the tiles are compiled code")

DTYPES = [(np.float32, 3e-6), (np.float64, 1e-14)]
# (rows of C, sum length, columns of C): rows left over after strips of 8 and 4 (1–7),
# columns in pairs of vectors, one vector and a masked partial one, sums of 1 upwards
SHAPES = [(1, 1, 1), (3, 5, 2), (7, 3, 17), (13, 33, 40), (37, 19, 11), (64, 64, 48),
          (21, 100, 129)]


def empty(dtype):
    return np.empty((0, 0), dtype)


def close(got, want, a, b, rtol):
    scale = np.abs(a).max() * np.abs(b).max() * a.shape[1 if a.shape[1] == b.shape[0]
                                                         else 0] + 1e-30
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale * 4)


def forward(x, w, parts, out=None):
    """``x wᵀ`` through run's forward form, with its scratch."""
    sx, sz = matmul.forward_scratch(x.shape[0], x.shape[1], w.shape[0], x.dtype, parts)
    z = np.full((x.shape[0], w.shape[0]), np.nan, x.dtype) if out is None else out
    assert matmul.run(x, w, z, False, True, False, np.empty(sx, x.dtype),
                      np.empty(sz, x.dtype), parts)
    return z


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_every_form_matches_numpy(dtype, rtol):
    """∂X = δ W, ∂W (+)= δᵀ X and Z = X Wᵀ against NumPy, on 1, 2 and 3 threads; the
    split over threads never changes a bit (each tile sums over k in order)."""
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        at = np.ascontiguousarray(a.T)
        bt = np.ascontiguousarray(b.T)
        start = rng.standard_normal((m, n)).astype(dtype)
        want = a @ b
        results = []
        for parts in (1, 2, 3):
            plain = np.full((m, n), np.nan, dtype)
            assert matmul.run(a, b, plain, False, False, False, empty(dtype), empty(dtype),
                              parts)
            close(plain, want, a, b, rtol)
            summed = start.copy()
            assert matmul.run(at, b, summed, True, False, True, empty(dtype), empty(dtype),
                              parts)
            close(summed, want + start, a, b, rtol)
            z = forward(a, bt, parts)
            close(z, want, a, b, rtol)
            results.append((plain, summed, z))
        for other in results[1:]:
            for got, first in zip(other, results[0]):
                assert np.array_equal(got, first)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_split_over_threads_covers_every_element(dtype, rtol):
    """Rows split in strips, or columns in pairs of vectors where the rows are few, on as
    many threads as the shape allows: every element written, each once."""
    count = 16 if dtype == np.float32 else 8
    assert matmul.split(100, 64, count, 1) == (1, 1)
    assert matmul.split(64, 64, count, 2) == (2, 1)  # rows: two strips of 8 each at least
    assert matmul.split(10, 8 * count, count, 2) == (1, 2)  # few rows: columns
    assert matmul.split(10, count, count, 2) == (1, 1)  # neither: one thread
    # the forward form splits the outputs in whole vectors
    assert matmul.forward_parts(5 * count + 3, count, 2) == (2, 3 * count)
    assert matmul.forward_parts(count - 1, count, 4) == (1, count)
    assert matmul.forward_scratch(7, 5, 3 * count, dtype, 2) == ((2 * 5, 7), (3 * count, 7))
    rng = np.random.default_rng(1)
    for m, k, n in [(10, 7, 8 * count + 5), (48, 9, 3), (17, 4, 2 * count),
                    (9, 6, 3 * count + 1)]:
        a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(
            dtype)
        for parts in (2, 3, 4):
            out = np.full((m, n), np.nan, dtype)
            assert matmul.run(a, b, out, False, False, False, empty(dtype), empty(dtype),
                              parts)
            close(out, a @ b, a, b, rtol)
            close(forward(a, np.ascontiguousarray(b.T), parts), a @ b, a, b, rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_values_propagate_as_in_numpy(dtype):
    """NaN, ±inf, inf·0, overflow and denormals come out where NumPy puts them (each
    output is a sum of products; these inputs make its value independent of the order)."""
    big = np.finfo(dtype).max
    tiny = np.finfo(dtype).smallest_subnormal
    a = np.zeros((19, 5), dtype)
    b = np.ones((5, 21), dtype)
    a[0, 0] = np.nan
    a[1, 1] = np.inf
    a[2, 2] = -np.inf
    a[3, 3] = big
    a[3, 4] = big  # big + big overflows to inf
    a[4, 0] = tiny
    a[5, 1] = np.inf
    b[1, 7] = 0.0  # inf · 0 = NaN in column 7
    a[6, 2] = np.inf
    a[6, 3] = -np.inf  # inf - inf = NaN
    with np.errstate(over="ignore", invalid="ignore"):
        want = a @ b
    out = np.empty_like(want)
    assert matmul.run(a, b, out, False, False, False, empty(dtype), empty(dtype), 2)
    np.testing.assert_array_equal(out, want)
    z = forward(a, np.ascontiguousarray(b.T), 2)
    np.testing.assert_array_equal(z, want)
    assert np.isnan(out[0]).all() and np.isnan(out[1, 7]) and np.isinf(out[3]).all()
    assert out[4, 0] == tiny  # a denormal survives (no flush to zero)


def packed(w):
    """``w`` ``(M, K)`` packed into its panels."""
    wp = np.full((matmul.panels(w.shape[0], w.dtype), w.shape[1], matmul.panel_width(w.dtype)),
                 np.nan, w.dtype)
    for p in range(wp.shape[0]):
        matmul.pack_panel(w, wp, p)
    return wp


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_the_packed_product_matches_numpy(dtype, rtol):
    """``Z = X Wᵀ`` over packed panels: rows left after tiles of 12, 8 and 4, outputs in whole
    panels, a panel of more than one vector and of at most one (both masked), sums of one
    block of features and of several (blocks of equal size, the last partial sums added);
    the same bits as the lanes tiles' ``Zᵀ = W Xᵀ`` (same products, same order)."""
    rng = np.random.default_rng(3)
    width = matmul.panel_width(dtype)
    shapes = [(1, 1, 1), (11, 3, width), (12, 5, width + 1), (13, 33, 2 * width - 1),
              (8, 9, 2 * width - 1), (20, 7, width + 3), (28, 40, 2 * width),
              (29, matmul.PACKED_K + 1, 3 * width + width // 2 + 1),
              (50, 2 * matmul.PACKED_K + 17, 10)]
    for n, k, m in shapes:
        x = rng.standard_normal((n, k)).astype(dtype)
        w = rng.standard_normal((m, k)).astype(dtype)
        wp = packed(w)
        assert np.array_equal(wp[0, :, :min(m, width)], w[:width].T)
        assert not wp[-1, :, m - (wp.shape[0] - 1) * width:].any()  # zero past the outputs
        z = np.full((n, m), np.nan, dtype)
        matmul.packed_product(x, wp, z)
        close(z, x @ w.T, x, np.ascontiguousarray(w.T), rtol)
        lanes = forward(x, w, 1)
        assert np.array_equal(z, lanes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_packed_product_propagates_extreme_values(dtype):
    """NaN, ±inf, inf·0 and overflow as NumPy puts them, across the blocks of features: a
    non-finite value of ``X`` leaves its whole row of ``Z`` non-finite, even against zero
    weights (the inference plans' finiteness check relies on it)."""
    big = np.finfo(dtype).max
    k = matmul.PACKED_K + 40
    x = np.ones((15, k), dtype)
    w = np.ones((21, k), dtype)
    x[0, 0] = np.nan
    x[1, k - 1] = np.inf
    x[2, 3] = -np.inf
    x[3, 5] = big
    x[3, 6] = big
    w[:, k - 1] = 0.0  # inf · 0 = NaN for the whole of row 1
    x[4, 7] = np.inf
    x[4, k - 2] = -np.inf  # inf - inf, in another block of features
    with np.errstate(over="ignore", invalid="ignore"):
        want = x @ w.T
    z = np.empty_like(want)
    matmul.packed_product(x, packed(w), z)
    np.testing.assert_array_equal(z, want)
    assert np.isnan(z[1]).all() and np.isnan(z[4]).all() and np.isinf(z[3]).all()
    assert not np.isfinite(z[:5]).any() and np.isfinite(z[5:]).all()

def test_declines_what_it_cannot_run():
    """Declined calls return False and write nothing: shapes that disagree, overlap,
    both operands transposed, an accumulated forward form, the wrong scratch, read-only,
    strided, mixed, half-precision or big-endian arrays."""
    f = np.float32
    a, b, out = np.ones((8, 6), f), np.ones((6, 4), f), np.zeros((8, 4), f)
    none = empty(f)
    sx, sz = matmul.forward_scratch(8, 6, 4, f, 1)
    xt, zt = np.empty(sx, f), np.empty(sz, f)
    wt = np.ones((4, 6), f)
    readonly = a.copy()
    readonly.flags.writeable = False
    declined = [
        (a, b, np.zeros((8, 5), f), False, False, False, none, none),
        (a, np.ones((5, 4), f), out, False, False, False, none, none),
        (np.ones((6, 8), f), np.ones((4, 6), f), out, True, True, False, none, none),
        (a, wt, out, False, True, True, xt, zt),  # accumulate the forward form
        (a, wt, out, False, True, False, none, none),  # no scratch
        (a, wt, out, False, True, False, np.empty((sx[0], sx[1] + 1), f), zt),
        (a, wt, out, False, True, False, xt, xt),  # the two scratch arrays overlap
        (readonly, b, out, False, False, False, none, none),
        (a[:, ::2], np.ones((3, 4), f), out, False, False, False, none, none),
        (a, b.astype(np.float64), out, False, False, False, none, none),
        (a.astype(np.float16), b.astype(np.float16), out.astype(np.float16), False, False,
         False, empty(np.float16), empty(np.float16)),
        (a, b, out.astype(">f4"), False, False, False, none, none),
        (a.tolist(), b, out, False, False, False, none, none),
        (np.ones((8, 0), f), np.ones((0, 4), f), out, False, False, False, none, none),
    ]
    for args in declined:
        target = args[2]
        before = target.copy() if isinstance(target, np.ndarray) else None
        assert not matmul.run(*args, 1)
        assert before is None or np.array_equal(target, before)
    square = np.ones((6, 6), f)
    assert not matmul.run(square, square, square, False, False, False, none, none, 1)
    block = np.zeros((12, 6), f)
    block[:6] = 1
    assert not matmul.run(block[:6], square, block[5:11], False, False, False, none, none, 1)
    assert matmul.run(block[:6], square, block[6:], False, False, False, none, none, 1)
    assert np.array_equal(block[6:], np.full((6, 6), 6, f))
    assert not matmul.run(a, wt, out, False, True, False, xt, a[:6], 1)  # scratch is an input
    # an unpickled array's dtype equals float32 without being NumPy's canonical object
    thawed = pickle.loads(pickle.dumps(a))
    assert thawed.dtype is not a.dtype and matmul.run(thawed, b, out, False, False, False,
                                                      none, none, 1)
    assert np.array_equal(out, np.full((8, 4), 6, f))


def test_threads_at_once():
    """Three Python threads, each with its own operands and scratch, on two Numba threads
    each: every result right."""
    rng = np.random.default_rng(4)
    jobs = [(rng.standard_normal((48, 40)).astype(np.float32),
             rng.standard_normal((24, 40)).astype(np.float32)) for _ in range(3)]
    wrong = []

    def work(x, w):
        want = x @ w.T
        for _ in range(40):
            try:
                z = forward(x, w, 2, np.empty((48, 24), np.float32))
            except AssertionError:  # declined (an exception in a thread fails nothing)
                wrong.append("declined")
                return
            if not np.allclose(z, want, rtol=1e-5, atol=1e-4):
                wrong.append("wrong")

    run_threads(work, jobs)
    assert not wrong


def test_two_threads_under_the_workqueue_layer():
    """Numba's workqueue layer aborts the process when two threads launch parallel code at
    once: run's parallel products take turns there, as numba_cpu's kernels do."""
    script = textwrap.dedent("""
        import threading, numpy as np
        from backprop.kernels import matmul
        rng = np.random.default_rng(0)
        none = np.empty((0, 0), np.float32)
        bad = []
        def work(seed):
            a = np.random.default_rng(seed).standard_normal((256, 192)).astype(np.float32)
            b = np.random.default_rng(seed + 1).standard_normal((192, 160)).astype(np.float32)
            out = np.empty((256, 160), np.float32)
            for _ in range(60):
                if not matmul.run(a, b, out, False, False, False, none, none, 2) or \\
                        not np.allclose(out, a @ b, rtol=1e-5, atol=1e-4):
                    bad.append(seed)
        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 5)]
        [t.start() for t in threads]; [t.join() for t in threads]
        import numba; print(numba.threading_layer(), len(bad))
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["workqueue", "0"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_panel_is_packed_again_only_when_its_weights_change(dtype):
    """``refresh_panel`` packs where the copy it packed from differs from the weights in
    any bit of the panel's rows (a negative zero for a zero included; an unchanged NaN is
    no change), and keeps the copy in step."""
    width = matmul.panel_width(dtype)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((width + 5, 19)).astype(dtype)
    w[0, 0] = 0.0
    copy = np.full_like(w, np.nan)
    wp = np.empty((2, 19, width), dtype)
    assert matmul.refresh_panel(w, copy, wp, 0, True)
    assert matmul.refresh_panel(w, copy, wp, 1, True)
    assert np.array_equal(copy, w) and np.array_equal(wp, packed(w))
    assert not matmul.refresh_panel(w, copy, wp, 0, False)
    assert not matmul.refresh_panel(w, copy, wp, 1, False)
    for row, value in ((0, -0.0), (width + 4, np.nan), (3, np.nan)):
        w[row, 0] = value
        p = row // width
        assert matmul.refresh_panel(w, copy, wp, p, False)
        assert not matmul.refresh_panel(w, copy, wp, 1 - p, False)
        assert np.array_equal(wp, packed(w), equal_nan=True)
        assert np.signbit(wp[0, 0, 0]) == np.signbit(w[0, 0])
    assert not matmul.refresh_panel(w, copy, wp, 1, False)  # the same bits, NaN or not
