"""backprop.bf16: bf16 conversion (exact, round to nearest even) and the bf16 GEMM.

Conversion is checked on every one of the 65536 bf16 bit patterns, on half a million float32
patterns that include every rounding boundary of every binade against an oracle that
rounds by comparing distances in float64 (no bit tricks), and against ml_dtypes and PyTorch
where they are installed. The GEMM is checked, for each backend (the emulation always; MKL
where the ``mkl`` wheel is installed, else skipped with the reason), against a float64
product of the same bf16 operands, to the documented bound
``(K + 2)·2⁻²⁴·(|alpha|·|A||B| + |beta|·|C₀|) + K·2⁻¹²⁶·|alpha|``.
"""
from __future__ import annotations

import ctypes.util
import warnings

import numpy as np
import pytest

from backprop import bf16
from backprop.bf16 import (Bf16FallbackWarning, bf16_round, bf16_support, from_bf16,
                           gemm_bf16, plan_gemm_bf16, to_bf16)

U = 2.0**-24  # unit roundoff of float32
TINY = 2.0**-126  # smallest normal float32


# ---------------------------------------------------------------------------------------
# Conversion
def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _both_paths(x: np.ndarray) -> np.ndarray:
    """to_bf16 through the Numba kernel and through the vectorised NumPy path (must agree)."""
    fast = to_bf16(x)
    slow = bf16._to_bf16_numpy(x, np.empty(x.shape, np.uint16))
    np.testing.assert_array_equal(fast, slow)
    return fast


def _rne_oracle(x: np.ndarray) -> np.ndarray:
    """Round each non-NaN float32 to bf16 by comparing float64 distances to the two bf16
    neighbours (ties to the even pattern; past the largest bf16, the upper neighbour is
    2¹²⁸ as if the exponent were unbounded, and rounds to inf)."""
    u = x.view(np.uint32).astype(np.int64)
    sign = u & 0x80000000
    mag = u & 0x7FFFFFFF
    lo = mag >> 16  # the bf16 magnitude pattern just below (or equal)
    hi = lo + 1
    value = mag.astype(np.uint32).view(np.float32).astype(np.float64)
    lo_val = (lo << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    hi_val = np.where(hi == 0x7F80, 2.0**128,
                      (np.minimum(hi, 0x7F80) << 16).astype(np.uint32).view(np.float32)
                      .astype(np.float64))
    with np.errstate(invalid="ignore"):  # inf - inf, for the infinities (handled below)
        down, up = value - lo_val, hi_val - value
    exact = (mag & 0xFFFF) == 0
    pick_hi = ~exact & ((up < down) | ((up == down) & (lo % 2 == 1)))
    result = np.where(pick_hi, hi, lo)
    result = np.where(mag == 0x7F800000, 0x7F80, result)  # inf stays inf
    return ((sign >> 16) | result).astype(np.uint16)


@pytest.fixture(scope="module")
def boundary_sample() -> np.ndarray:
    """Every high half (sign, exponent, 7 significand bits) with low halves on and around
    every rounding boundary (0, 1, just under/at/over the tie, all ones) and two random ones:
    524288 float32 values, NaNs and infinities included."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    rng = np.random.default_rng(7)
    lows = [np.uint32(v) for v in (0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    lows += [rng.integers(0, 1 << 16, high.size, dtype=np.uint32) for _ in range(2)]
    return np.concatenate([high | low for low in lows]).view(np.float32)


def test_every_bf16_pattern_round_trips():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = from_bf16(h)
    np.testing.assert_array_equal(f.view(np.uint32), h.astype(np.uint32) << 16)
    back = _both_paths(f)
    nan = np.isnan(f)
    assert nan.sum() == 2 * 127  # the 2·(2⁷−1) NaN patterns
    np.testing.assert_array_equal(back[~nan], h[~nan])
    # NaN stays NaN with its sign and payload, made quiet (bit 6 set)
    np.testing.assert_array_equal(back[nan], h[nan] | 0x40)


def test_rounding_matches_the_distance_oracle(boundary_sample):
    x = boundary_sample
    got = _both_paths(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], _rne_oracle(x[~nan]))
    assert np.isnan(from_bf16(got[nan])).all()


CASES = [  # float32 bits, expected bf16 bits, why
    (0x3F800000, 0x3F80, "1.0 exact"),
    (0x3F808000, 0x3F80, "tie, even below"),
    (0x3F818000, 0x3F82, "tie, odd below: up to even"),
    (0x3F807FFF, 0x3F80, "just under the tie"),
    (0x3F808001, 0x3F81, "just over the tie"),
    (0xBF808000, 0xBF80, "negative tie to even"),
    (0xBF818000, 0xBF82, "negative tie to even, away from zero"),
    (0x3FFFFFFF, 0x4000, "carry into the exponent"),
    (0x7F7F7FFF, 0x7F7F, "largest bf16 (under its half ulp)"),
    (0x7F7F8000, 0x7F80, "tie above the largest bf16: odd, so up: overflow to inf"),
    (0x7F7FFFFF, 0x7F80, "largest float32 overflows to inf"),
    (0xFF7FFFFF, 0xFF80, "negative overflow to -inf"),
    (0x7F800000, 0x7F80, "+inf"),
    (0xFF800000, 0xFF80, "-inf"),
    (0x00000000, 0x0000, "+0"),
    (0x80000000, 0x8000, "-0"),
    (0x00000001, 0x0000, "smallest subnormal rounds to 0"),
    (0x00008000, 0x0000, "subnormal tie to even (0)"),
    (0x00018000, 0x0002, "subnormal tie to even (up)"),
    (0x00008001, 0x0001, "smallest bf16 subnormal"),
    (0x007FFFFF, 0x0080, "largest subnormal rounds to the smallest normal"),
    (0x80008001, 0x8001, "negative subnormal"),
    (0x7FC00000, 0x7FC0, "quiet NaN"),
    (0xFFC00000, 0xFFC0, "negative quiet NaN"),
    (0x7F800001, 0x7FC0, "signalling NaN, payload in the low half only: still NaN"),
    (0x7FA00000, 0x7FE0, "signalling NaN: made quiet, payload kept"),
    (0xFFFFFFFF, 0xFFFF, "all-ones NaN (no wrap-around)"),
]


@pytest.mark.parametrize("bits,expected,why", CASES, ids=[c[2] for c in CASES])
def test_named_cases(bits, expected, why):
    got = _both_paths(_f32([bits]))
    assert int(got[0]) == expected, f"{why}: {bits:#010x} -> {int(got[0]):#06x}"


def test_against_ml_dtypes(boundary_sample):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = boundary_sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ml_dtypes warns on casting NaN
        theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ours = to_bf16(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(theirs[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(from_bf16(h.view(ml_dtypes.bfloat16)).view(np.uint32),
                                  h.view(ml_dtypes.bfloat16).astype(np.float32)
                                  .view(np.uint32))


def test_against_torch(boundary_sample):
    torch = pytest.importorskip("torch")
    x = boundary_sample
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = to_bf16(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(from_bf16(theirs[nan])).all()


def test_shapes_strides_and_out():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10), dtype=np.float32) * np.float32(1e3)
    x[1, 2], x[3, 4] = np.nan, -np.inf
    expected = _both_paths(x)
    np.testing.assert_array_equal(to_bf16(np.asfortranarray(x)), expected)  # F-ordered
    np.testing.assert_array_equal(to_bf16(x[:, ::3]), expected[:, ::3])  # strided
    np.testing.assert_array_equal(to_bf16(x.reshape(2, 3, 10)), expected.reshape(2, 3, 10))
    assert to_bf16(np.zeros((0, 4), np.float32)).shape == (0, 4)
    assert to_bf16(np.array(1.5, np.float32))[()] == 0x3FC0  # 0-d
    assert to_bf16(np.float32(-2.0)).shape == () and to_bf16(np.float32(-2.0))[()] == 0xC000
    out = np.full((6, 10), 7, np.uint16)
    assert to_bf16(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    strided_out = np.zeros((6, 20), np.uint16)[:, ::2]
    to_bf16(x, out=strided_out)
    np.testing.assert_array_equal(strided_out, expected)
    back = np.empty((6, 10), np.float32)
    assert from_bf16(expected, out=back) is back
    np.testing.assert_array_equal(back, bf16_round(x))
    np.testing.assert_array_equal(from_bf16(expected[:, ::2]), back[:, ::2])


def test_ml_dtypes_arrays_are_viewed_not_copied():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    out = np.empty((3, 4), ml_dtypes.bfloat16)
    to_bf16(x, out=out)
    np.testing.assert_array_equal(out.view(np.uint16), to_bf16(x))
    assert bf16.as_bf16_bits(out).base is out or np.shares_memory(bf16.as_bf16_bits(out), out)


@pytest.mark.parametrize("call,error,match", [
    (lambda: to_bf16(np.ones(3)), TypeError, "float32"),  # float64
    (lambda: to_bf16([1.0, 2.0]), TypeError, "float32"),
    (lambda: to_bf16(np.ones(3, np.float32), out=np.empty(4, np.uint16)), ValueError, "shape"),
    (lambda: to_bf16(np.ones(3, np.float32), out=np.empty(3, np.int16)), TypeError, "uint16"),
    (lambda: to_bf16(np.ones(3, np.float32), out=np.empty(3, np.uint16)[::-1].copy().view(
        np.uint16)[:2]), ValueError, "shape"),
    (lambda: from_bf16(np.ones(3, np.float32)), TypeError, "uint16"),
    (lambda: from_bf16(np.ones(3, np.uint16), out=np.empty(3)), TypeError, "float32"),
    (lambda: from_bf16(np.ones(3, np.uint16), out=np.empty(2, np.float32)), ValueError, "shape"),
])
def test_conversion_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_read_only_out_is_refused():
    out = np.empty(3, np.uint16)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        to_bf16(np.ones(3, np.float32), out=out)


# ---------------------------------------------------------------------------------------
# GEMM
def _library_or_skip(backend: str) -> None:
    if backend == "mkl":
        info = bf16_support()
        if info["library"] != "mkl":
            pytest.skip(f"no MKL bf16 GEMM here: {info['reason']}")


@pytest.fixture(params=["emulate", "mkl"])
def backend(request):
    _library_or_skip(request.param)
    return request.param


def _bf16(rng, shape, scale=1.0) -> np.ndarray:
    return to_bf16((rng.standard_normal(shape) * scale).astype(np.float32))


def _check(out, a, b, ta, tb, alpha=1.0, beta=0.0, c0=None, factor=1.0):
    """out against the float64 product of the bf16 operands, to the documented bound."""
    A, B = from_bf16(a).astype(np.float64), from_bf16(b).astype(np.float64)
    A, B = (A.T if ta else A), (B.T if tb else B)
    alpha, beta = float(np.float32(alpha)), float(np.float32(beta))
    k = A.shape[1]
    exact = alpha * (A @ B)
    magnitude = abs(alpha) * (np.abs(A) @ np.abs(B))
    if beta != 0:
        exact += beta * c0
        magnitude += abs(beta) * np.abs(c0)
    bound = factor * ((k + 2) * U * magnitude + k * TINY * abs(alpha))
    err = np.abs(out.astype(np.float64) - exact)
    assert (err <= bound).all(), f"error {err.max():.3g} above the bound {bound.min():.3g}"


# (M, N, K): shapes of the four MLPs' products and odd ones (not multiples of any block)
SHAPES = [(32, 32, 64), (64, 128, 128), (10, 256, 128), (128, 256, 784), (7, 13, 5),
          (1, 9, 3), (5, 1, 300), (33, 17, 1)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_against_float64(backend, m, n, k, ta, tb):
    rng = np.random.default_rng(m * 1000 + n + k)
    a = _bf16(rng, (k, m) if ta else (m, k))
    b = _bf16(rng, (n, k) if tb else (k, n))
    out = np.full((m, n), np.nan, np.float32)  # beta=0: never read
    assert gemm_bf16(a, b, out, ta, tb, backend=backend) is out
    _check(out, a, b, ta, tb)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 1.0), (-2.0, 0.25), (0.1, -1.0),
                                        (1, 0)])
def test_gemm_alpha_beta(backend, alpha, beta):
    rng = np.random.default_rng(3)
    a, b = _bf16(rng, (24, 40)), _bf16(rng, (40, 16))
    c0 = rng.standard_normal((24, 16)).astype(np.float32)
    out = c0.copy()
    gemm_bf16(a, b, out, alpha=alpha, beta=beta, backend=backend)
    _check(out, a, b, False, False, alpha, beta, c0.astype(np.float64))


def test_gemm_beta_one_accumulates_the_weight_gradient(backend):
    """∂W = δᵀX over four micro-batches with beta=1 equals one product over the batch."""
    rng = np.random.default_rng(4)
    delta, x = _bf16(rng, (128, 32)), _bf16(rng, (128, 64))
    dw = np.zeros((32, 64), np.float32)
    for rows in np.split(np.arange(128), 4):
        gemm_bf16(delta[rows], x[rows], dw, trans_a=True, beta=1.0, backend=backend)
    _check(dw, delta, x, True, False, factor=1.0 + 4 / 130)  # four more float32 additions


@pytest.mark.parametrize("layout", ["fortran", "transposed_view", "block", "out_fortran",
                                    "out_block", "out_transposed_view"])
def test_gemm_layouts_without_copies(backend, layout):
    """Operands and out in any BLAS layout; each gives the same product as C order."""
    rng = np.random.default_rng(5)
    a, b = _bf16(rng, (12, 20)), _bf16(rng, (20, 9))
    expected = gemm_bf16(a, b, np.full((12, 9), np.nan, np.float32), backend=backend)
    out = np.full((12, 9), np.nan, np.float32)  # NaN: a product that was not written fails
    if layout == "fortran":
        gemm_bf16(np.asfortranarray(a), np.asfortranarray(b), out, backend=backend)
    elif layout == "transposed_view":
        gemm_bf16(np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T, out,
                  backend=backend)
    elif layout == "block":
        wide_a = np.zeros((15, 31), np.uint16)
        wide_b = np.zeros((22, 40), np.uint16)
        wide_a[2:14, 3:23], wide_b[1:21, 5:14] = a, b
        gemm_bf16(wide_a[2:14, 3:23], wide_b[1:21, 5:14], out, backend=backend)
    elif layout == "out_fortran":
        out = np.full((12, 9), np.nan, np.float32, order="F")
        gemm_bf16(a, b, out, backend=backend)
    elif layout == "out_block":
        wide = np.zeros((14, 20), np.float32)
        out = wide[1:13, 4:13]
        gemm_bf16(a, b, out, backend=backend)
        assert (wide[0] == 0).all() and (wide[:, :4] == 0).all() and (wide[:, 13:] == 0).all()
    else:
        out = np.full((9, 12), np.nan, np.float32).T
        gemm_bf16(a, b, out, backend=backend)
    _check(out, a, b, False, False)
    _check(expected, a, b, False, False)


def test_gemm_mkl_agrees_with_emulation():
    _library_or_skip("mkl")
    rng = np.random.default_rng(6)
    for (m, n, k), (ta, tb) in [((256, 512, 1024), (False, True)),
                                ((512, 1024, 256), (True, False)),
                                ((256, 1024, 512), (False, False))]:
        a = _bf16(rng, (k, m) if ta else (m, k))
        b = _bf16(rng, (n, k) if tb else (k, n))
        lib = gemm_bf16(a, b, np.empty((m, n), np.float32), ta, tb, backend="mkl")
        emu = gemm_bf16(a, b, np.empty((m, n), np.float32), ta, tb, backend="emulate")
        _check(lib, a, b, ta, tb)
        _check(emu, a, b, ta, tb)
        # both within the bound of the exact result: within twice it of each other
        magnitude = from_bf16(a).astype(np.float64)
        magnitude = np.abs(magnitude.T if ta else magnitude) @ np.abs(
            (from_bf16(b).astype(np.float64).T if tb else from_bf16(b).astype(np.float64)))
        assert (np.abs(lib - emu.astype(np.float64)) <= 2 * (k + 2) * U * magnitude).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_thread_counts(threads):
    _library_or_skip("mkl")
    rng = np.random.default_rng(8)
    a, b = _bf16(rng, (128, 300)), _bf16(rng, (300, 200))
    out = gemm_bf16(a, b, np.empty((128, 200), np.float32), threads=threads, backend="mkl")
    _check(out, a, b, False, False)
    # the count is MKL's thread-local setting, made when it changes
    assert bf16._mkl()["lib"].MKL_Get_Max_Threads() == threads


def test_gemm_default_thread_count():
    _library_or_skip("mkl")
    small = plan_gemm_bf16(np.zeros((32, 64), np.uint16), np.zeros((64, 32), np.uint16),
                           np.empty((32, 32), np.float32), backend="mkl")
    assert small.threads == 1
    m = n = k = 1024  # 2³⁰ multiply-adds: every thread MKL has
    large = plan_gemm_bf16(np.zeros((m, k), np.uint16), np.zeros((k, n), np.uint16),
                           np.empty((m, n), np.float32), backend="mkl")
    assert large.threads == min(bf16_support()["max_threads"],
                                m * n * k // bf16.BF16_MACS_PER_THREAD)


def test_gemm_degenerate_shapes(backend):
    rng = np.random.default_rng(9)
    c0 = rng.standard_normal((3, 4)).astype(np.float32)
    out = c0.copy()  # K = 0: out = beta·out
    gemm_bf16(np.empty((3, 0), np.uint16), np.empty((0, 4), np.uint16), out, beta=0.5,
              backend=backend)
    np.testing.assert_array_equal(out, c0 * np.float32(0.5))
    out = np.full((3, 4), np.nan, np.float32)
    gemm_bf16(np.empty((3, 0), np.uint16), np.empty((0, 4), np.uint16), out, backend=backend)
    np.testing.assert_array_equal(out, 0)
    empty = np.empty((0, 4), np.float32)  # M = 0, N = 0: nothing to do
    assert gemm_bf16(np.empty((0, 5), np.uint16), _bf16(rng, (5, 4)), empty,
                     backend=backend) is empty
    gemm_bf16(_bf16(rng, (3, 5)), np.empty((5, 0), np.uint16), np.empty((3, 0), np.float32),
              backend=backend)


def test_gemm_nan_and_inf_propagate(backend):
    a = to_bf16(np.ones((4, 8), np.float32))
    b = to_bf16(np.ones((8, 3), np.float32))
    a[1, 2] = 0x7FC0  # NaN
    a[2, 0] = 0x7F80  # +inf
    out = gemm_bf16(a, b, np.zeros((4, 3), np.float32), backend=backend)
    assert np.isnan(out[1]).all() and np.isposinf(out[2]).all()
    np.testing.assert_array_equal(out[[0, 3]], 8)


def test_gemm_subnormals(backend):
    """The emulation keeps subnormal inputs and products; MKL on bf16 instructions flushes
    them to zero (DAZ/FTZ of AMX and AVX512-BF16), within the documented absolute term."""
    a = np.full((2, 16), 0x0001, np.uint16)  # the smallest bf16 subnormal, 2⁻¹³³
    b = to_bf16(np.ones((16, 2), np.float32))
    out = gemm_bf16(a, b, np.empty((2, 2), np.float32), backend=backend)
    exact = np.float32(16 * 2.0**-133)
    if backend == "emulate":
        np.testing.assert_array_equal(out, exact)
    else:
        assert np.isin(out, [0, exact]).all()
    _check(out, a, b, False, False)


def test_gemm_accepts_ml_dtypes_operands(backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(10)
    a, b = _bf16(rng, (6, 5)), _bf16(rng, (5, 4))
    expected = gemm_bf16(a, b, np.empty((6, 4), np.float32), backend=backend)
    got = gemm_bf16(a.view(ml_dtypes.bfloat16), b.view(ml_dtypes.bfloat16),
                    np.empty((6, 4), np.float32), backend=backend)
    np.testing.assert_array_equal(got, expected)


def test_plan_reruns_the_product_on_new_contents(backend):
    rng = np.random.default_rng(12)
    x, w = _bf16(rng, (16, 24)), _bf16(rng, (8, 24))
    z = np.empty((16, 8), np.float32)
    dw = np.zeros((8, 24), np.float32)
    delta = _bf16(rng, (16, 8))
    forward = plan_gemm_bf16(x, w, z, trans_b=True, backend=backend)
    accumulate = plan_gemm_bf16(delta, x, dw, trans_a=True, beta=1.0, backend=backend)
    assert forward.backend == backend and backend in repr(forward)
    for step in range(3):  # new contents in the same buffers, as a training step's
        x[...] = _bf16(rng, x.shape)
        w[...] = _bf16(rng, w.shape)
        assert forward() is z
        _check(z, x, w, False, True)
        np.testing.assert_array_equal(
            z, gemm_bf16(x, w, np.empty_like(z), trans_b=True, backend=backend))
    before = dw.copy()
    accumulate()
    _check(dw, delta, x, True, False, 1.0, 1.0, before.astype(np.float64))


def _args(**changes):
    rng = np.random.default_rng(11)
    args = dict(a=_bf16(rng, (4, 6)), b=_bf16(rng, (6, 5)), out=np.empty((4, 5), np.float32))
    args.update(changes)
    return args


def _read_only():
    out = np.empty((4, 5), np.float32)
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("changes,error,match", [
    (dict(a=np.ones((4, 6), np.float32)), TypeError, "bf16 bit patterns"),
    (dict(a=[[1, 2]]), TypeError, "NumPy array"),
    (dict(b=np.ones((6, 5), np.int16)), TypeError, "uint16"),
    (dict(out=np.empty((4, 5))), TypeError, "float32"),
    (dict(out=np.empty((4, 5), np.float16)), TypeError, "float32"),
    (dict(a=np.ones((4, 6, 1), np.uint16)), ValueError, "2-D"),
    (dict(out=np.empty(20, np.float32)), ValueError, "2-D"),
    (dict(b=np.ones((7, 5), np.uint16)), ValueError, "shapes do not match"),
    (dict(out=np.empty((5, 4), np.float32)), ValueError, "shapes do not match"),
    (dict(trans_a=True), ValueError, "shapes do not match"),
    (dict(a=np.ones((4, 12), np.uint16)[:, ::2]), ValueError, "not a BLAS matrix"),
    (dict(a=np.ones((4, 6), np.uint16)[::-1]), ValueError, "not a BLAS matrix"),
    (dict(out=np.empty((4, 10), np.float32)[:, ::2]), ValueError, "not a BLAS matrix"),
    (dict(out=_read_only()), ValueError, "writeable"),
    (dict(alpha="1"), TypeError, "alpha"),
    (dict(beta=None), TypeError, "beta"),
    (dict(alpha=True), TypeError, "alpha"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(threads=0), ValueError, "threads"),
    (dict(threads=1.5), ValueError, "threads"),
])
def test_gemm_argument_errors(changes, error, match):
    args = _args(**changes)
    if "threads" in changes:  # validated on either backend
        args.setdefault("backend", "emulate")
    with pytest.raises(error, match=match):
        gemm_bf16(**args)


def test_gemm_refuses_misaligned_and_overlapping_arrays():
    buffer = np.zeros(4 * 6 * 2 + 1, np.uint8)
    misaligned = buffer[1:].view(np.uint16).reshape(4, 6)
    assert not misaligned.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        gemm_bf16(**_args(a=misaligned))
    memory = np.zeros(64, np.float32)
    out = memory[:20].reshape(4, 5)
    a = memory[20:32].view(np.uint16).reshape(4, 6)
    b = np.zeros((6, 5), np.uint16)
    gemm_bf16(a, b, out, backend="emulate")  # adjacent, not overlapping: fine
    with pytest.raises(ValueError, match="overlaps"):
        gemm_bf16(memory[:12].view(np.uint16).reshape(4, 6), b, out, backend="emulate")


# ---------------------------------------------------------------------------------------
# Detection and fallback
@pytest.fixture
def without_library(monkeypatch):
    """As if MKL were not installed (and the fallback warning not yet given)."""
    monkeypatch.setitem(bf16._STATE, "mkl", {"gemm": None, "error": "MKL is not installed "
                                             "(simulated by the test)"})
    monkeypatch.setattr(bf16, "_WARNED", {})
    monkeypatch.delenv("BACKPROP_BF16_GEMM", raising=False)
    monkeypatch.delitem(bf16._STATE, "requested", raising=False)  # read again


def test_fallback_warns_once_and_emulates(without_library):
    args = _args()
    with pytest.warns(Bf16FallbackWarning, match="not installed.*emulated"):
        gemm_bf16(**args)
    _check(args["out"], args["a"], args["b"], False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemm_bf16(**_args())  # once per process
        gemm_bf16(**_args(), backend="emulate")
    with pytest.raises(RuntimeError, match="backend='mkl'.*not installed"):
        gemm_bf16(**_args(), backend="mkl")
    info = bf16_support()
    assert info["library"] is None and info["gemm"] == "emulation" and not info["fast"]
    assert "emulated" in info["reason"]


def test_environment_selects_the_backend(without_library, monkeypatch):
    def select(value):
        monkeypatch.setenv("BACKPROP_BF16_GEMM", value)
        bf16._STATE.pop("requested", None)  # the variable is read once per process

    select("emulate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemm_bf16(**_args())  # chosen: no warning
    assert bf16_support()["requested"] == "emulate"
    select("mkl")
    with pytest.raises(RuntimeError, match="not installed"):
        gemm_bf16(**_args())
    select(" Bogus ")
    with pytest.raises(ValueError, match="BACKPROP_BF16_GEMM"):
        gemm_bf16(**_args())
    assert bf16_support()["requested"].startswith("invalid")


def test_support_is_coherent():
    info = bf16_support()
    assert set(info) == {"cpu_amx_bf16", "cpu_avx512_bf16", "cpu_flags_source", "library",
                         "library_path", "library_version", "threading_layer",
                         "max_threads", "requested", "gemm", "fast", "reason"}
    for key in ("cpu_amx_bf16", "cpu_avx512_bf16"):
        assert info[key] in (True, False, None)
    assert info["library"] in ("mkl", None)
    assert (info["library"] is None) == (info["library_path"] is None)
    assert (info["library"] is None) == (info["library_version"] is None)
    assert info["gemm"] == ("mkl" if info["library"] and info["requested"] != "emulate"
                            else "emulation")
    assert info["fast"] == (info["gemm"] == "mkl" and bool(info["cpu_amx_bf16"]
                                                           or info["cpu_avx512_bf16"]))
    assert isinstance(info["reason"], str) and info["reason"]
    if info["library"]:
        assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        assert info["cpu_amx_bf16"] is None
    else:
        assert info["cpu_amx_bf16"] == ("amx_bf16" in flags)
        assert info["cpu_avx512_bf16"] == ("avx512_bf16" in flags)


@pytest.mark.parametrize("flags,amx,avx", [
    ("fpu sse avx512f amx_tile amx_int8", False, False),  # AMX without its bf16 unit
    ("fpu avx512f avx512_bf16", False, True),  # Cooper Lake
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True, True),  # Sapphire Rapids
])
def test_support_reads_the_cpu_flags(monkeypatch, tmp_path, flags, amx, avx):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    monkeypatch.setattr(bf16, "_CPUINFO", str(cpuinfo))
    info = bf16_support()
    assert (info["cpu_amx_bf16"], info["cpu_avx512_bf16"]) == (amx, avx)
    assert info["fast"] == (info["gemm"] == "mkl" and (amx or avx))
    if info["gemm"] == "mkl" and not (amx or avx):
        assert "neither AMX-BF16 nor AVX512-BF16" in info["reason"]


def test_support_without_cpu_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(bf16, "_CPUINFO", str(tmp_path / "no-cpuinfo"))
    info = bf16_support()
    assert info["cpu_amx_bf16"] is None and info["cpu_avx512_bf16"] is None
    assert info["cpu_flags_source"].startswith("unknown")
    assert not info["fast"]


def test_loader_reports_a_missing_or_wrong_library(monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setattr(bf16, "_mkl_candidates", lambda: [])
        info = bf16._load_mkl()
        assert info["gemm"] is None and "pip install mkl" in info["error"]
    monkeypatch.setenv("BACKPROP_MKL_RT", str(tmp_path / "libmkl_rt.so.3"))
    info = bf16._load_mkl()
    assert info["gemm"] is None and "could not be used" in info["error"]
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load as a library without the bf16 GEMM")
    monkeypatch.setenv("BACKPROP_MKL_RT", libm)
    info = bf16._load_mkl()
    assert info["gemm"] is None and "cblas_gemm_bf16bf16f32" in info["error"]
