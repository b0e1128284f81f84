"""The vectorisable elementary functions behind the Numba CPU kernels, measured in ulps.

Each function of ``kernels/vecmath.py`` is compiled into a loop the way the kernels compile it
(``error_model="numpy"``, FMA contraction) and evaluated on dense grids over its whole
domain, on random points, and on special values. The error is counted in units in the last
place (ulps) of the exact result rounded to the dtype under test; the exact result is the
float64 (for float32) or extended-precision (for float64) evaluation of the same function.
Results below the smallest normal float32 may be flushed to zero (``vecmath._exp32``): there
the error allowed is the smallest normal number, as in the kernel tests.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from backprop.kernels import vecmath as V  # noqa: E402
from conftest import outlined_calls  # noqa: E402

LD = np.longdouble
HAS_EXTENDED = np.finfo(LD).eps < np.finfo(np.float64).eps


def _exact_sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _exact_ndtr(x):
    return 0.5 * np.vectorize(math.erfc, otypes=[float])(-np.asarray(x, np.float64) / math.sqrt(2))


def _exact_softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


# name -> (exact function on float64/longdouble arrays, float32 bound, float64 bound, domain).
# float64 tanh, ndtr and softplus are libm's; ndtr's reference rounds -x/√2 once, an error
# that erfc's tail amplifies by 2u² (u = x/√2), so float64 ndtr is measured where 2u² ≤ 2.25.
FUNCTIONS = {
    "exp": (np.exp, 1.5, 1.05, (-110.0, 90.0)),
    "sigmoid": (_exact_sigmoid, 2.5, 3.0, (-110.0, 40.0)),
    "tanh": (np.tanh, 2.5, 2.5, (-12.0, 12.0)),
    "ndtr": (_exact_ndtr, 6.0, 6.0, (-16.0, 9.0)),
    "softplus": (_exact_softplus, 3.0, 2.0, (-110.0, 40.0)),
    "expm1": (np.expm1, 3.0, 1.0, (-110.0, 80.0)),
}
FLOAT64_DOMAIN = {"ndtr": (-1.5, 1.5)}
LIBM_FLOAT64 = ("tanh", "ndtr", "softplus", "expm1")  # scalar libm calls in float64: no SIMD there
_LOOPS: dict = {}


def evaluate(name: str, x: np.ndarray) -> np.ndarray:
    """``vecmath.<name>`` applied elementwise in a compiled loop like the kernels'."""
    if name not in _LOOPS:
        fn = getattr(V, name)

        @numba.njit(error_model="numpy", fastmath={"contract"})
        def loop(a, out):
            for i in range(a.size):
                out[i] = fn(a[i])

        _LOOPS[name] = loop
    out = np.empty_like(x)
    _LOOPS[name](x, out)
    return out


def points(dtype, lo: float, hi: float) -> np.ndarray:
    rng = np.random.default_rng(11)
    x = np.concatenate([np.linspace(lo, hi, 400_001), rng.uniform(lo, hi, 200_000),
                        rng.uniform(-1, 1, 100_000), rng.uniform(-1e-3, 1e-3, 20_000),
                        [0.0, -0.0, 1e-30, -1e-30, 1e-40, lo, hi]])
    return x.astype(dtype)


def ulp_error(got, exact, dtype) -> np.ndarray:
    """``|got - exact|`` in ulps of ``exact`` rounded to ``dtype`` (subnormals: their own
    spacing; results the function may flush to zero count as exact)."""
    exact64 = np.asarray(exact, dtype=np.float64) if dtype == np.float32 else exact
    rounded = np.asarray(exact64, dtype=dtype)
    err = np.abs(np.asarray(got, LD) - np.asarray(exact, LD))
    ulps = np.asarray(err / np.spacing(np.abs(rounded)).astype(LD), np.float64)
    flushed = (np.abs(exact64) < np.finfo(dtype).tiny) & (err <= np.finfo(dtype).tiny)
    return np.where(flushed, 0.0, ulps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_accuracy_in_ulps(name, dtype):
    exact_fn, bound32, bound64, (lo, hi) = FUNCTIONS[name]
    if dtype == np.float64:
        lo, hi = FLOAT64_DOMAIN.get(name, (lo, hi))
    if dtype == np.float64 and name in ("exp", "sigmoid") and not HAS_EXTENDED:
        pytest.skip("no extended precision long double here to measure float64 ulps")
    x = points(dtype, lo, hi)
    got = evaluate(name, x)
    assert got.dtype == dtype
    with np.errstate(over="ignore", under="ignore"):
        exact = exact_fn(x.astype(LD if dtype == np.float64 else np.float64))
    finite = np.isfinite(np.asarray(exact, np.float64)) & (
        np.abs(np.asarray(exact, np.float64)) <= np.finfo(dtype).max)
    err = ulp_error(got[finite], exact[finite], dtype)
    bound = bound32 if dtype == np.float32 else bound64
    worst = int(np.argmax(err))
    assert err.max() <= bound, (f"{name} {np.dtype(dtype).name}: {err.max():.2f} ulps at "
                                f"x={x[finite][worst]!r} (bound {bound})")
    over = ~finite & (np.asarray(exact, np.float64) > 0)
    assert np.all(np.isinf(got[over])), f"{name}: an overflowing result is not inf"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, at_nan, at_minus_inf, at_inf", [
    ("exp", np.nan, 0.0, np.inf), ("sigmoid", np.nan, 0.0, 1.0), ("tanh", np.nan, -1.0, 1.0),
    ("ndtr", np.nan, 0.0, 1.0), ("softplus", np.nan, 0.0, np.inf)])
def test_special_values(name, dtype, at_nan, at_minus_inf, at_inf):
    got = evaluate(name, np.array([np.nan, -np.inf, np.inf], dtype))
    np.testing.assert_array_equal(got, np.array([at_nan, at_minus_inf, at_inf], dtype))


@numba.njit(error_model="numpy", fastmath={"contract"})
def _ndtr_pdf_loop(a, cdf, pdf):
    for i in range(a.size):
        cdf[i], pdf[i] = V.ndtr_pdf(a[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_ndtr_pdf_is_ndtr_and_the_normal_density(dtype):
    """Φ bit for bit as :func:`ndtr`'s; φ within a few ulps. float64 φ rounds x²/2 once
    (relative error up to x²/2 ulps), so it is measured where that stays small, |x| ≤ 4."""
    if dtype == np.float64 and not HAS_EXTENDED:
        pytest.skip("no extended precision long double here to measure float64 ulps")
    x = points(dtype, *((-16.0, 16.0) if dtype == np.float32 else (-4.0, 4.0)))
    x = np.concatenate([x, np.array([np.nan, -np.inf, np.inf], dtype)])
    cdf, pdf = np.empty_like(x), np.empty_like(x)
    _ndtr_pdf_loop(x, cdf, pdf)
    np.testing.assert_array_equal(cdf, evaluate("ndtr", x))
    np.testing.assert_array_equal(pdf[-3:], np.array([np.nan, 0.0, 0.0], dtype))
    xl = x[:-3].astype(LD)
    exact = np.exp(-xl * xl / 2) / np.sqrt(2 * np.pi * LD(1))
    err = ulp_error(pdf[:-3], exact, dtype)
    bound = 4.0 if dtype == np.float32 else 10.0
    assert err.max() <= bound, f"φ: {err.max():.2f} ulps at x={x[int(np.argmax(err))]!r}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_huge_finite_arguments_give_the_limits(name, dtype):
    """Far outside any range reduction (float32 ``exp`` rounds ``x·log₂e`` by adding 1.5·2²³,
    valid below 2²¹, and discards the result beyond its range): the exact limits, as NumPy."""
    big = np.finfo(dtype).max
    x = np.array([-big, -1e30, -2.0**22, 2.0**22, 1e30, big], dtype)
    exact_fn = FUNCTIONS[name][0]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(evaluate(name, x), exact_fn(x.astype(np.float64))
                                      .astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_odd_and_even_symmetries_at_zero(dtype):
    x = np.array([0.0, -0.0], dtype)
    np.testing.assert_array_equal(np.signbit(evaluate("tanh", x)), [False, True])
    np.testing.assert_array_equal(evaluate("sigmoid", x), [0.5, 0.5])
    np.testing.assert_array_equal(evaluate("ndtr", x), [0.5, 0.5])


def test_fmax_skips_nan_and_reduces():
    @numba.njit(error_model="numpy")
    def row_max(a):
        top = a[0]
        for i in range(1, a.size):
            top = V.fmax(top, a[i])
        return top

    a = np.array([1.0, np.nan, 3.0, -np.inf, 2.0], np.float32)
    assert row_max(a) == 3.0
    assert np.isnan(row_max(np.array([np.nan, np.nan])))


def _chebyshev_fit(f, lo, hi, degree, nodes=6000):
    """Least-squares fit of ``f`` on ``[lo, hi]`` at Chebyshev nodes, as power-series
    coefficients in the original variable (lowest degree first)."""
    from numpy.polynomial import chebyshev as C

    u = np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes)
    t = 0.5 * (hi - lo) * u + 0.5 * (hi + lo)
    series = np.polynomial.Polynomial(C.cheb2poly(C.chebfit(u, f(t), degree)))
    return series(np.polynomial.Polynomial([-(lo + hi) / (hi - lo), 2 / (hi - lo)])).coef


def test_ndtr_coefficients_are_the_documented_fits():
    """The constants of ``vecmath._ndtr32`` are reproducible: erf(u)/u in u² on [0, ¼], and
    erfc(u)·exp(u²) in t = 1/(1 + u/2) for u in [½, 10.1]."""
    erf, erfc = np.vectorize(math.erf), np.vectorize(math.erfc)
    small = _chebyshev_fit(
        lambda z: np.where(z > 0, erf(np.sqrt(z)) / np.sqrt(np.maximum(z, 1e-300)),
                           2 / np.sqrt(np.pi)), 0.0, 0.25, len(V._ERF_SMALL) - 1)
    u_of = lambda t: 2.0 * (1.0 / t - 1.0)  # noqa: E731  (t = 1/(1 + u/2))
    tail = _chebyshev_fit(lambda t: erfc(u_of(t)) * np.exp(u_of(t) ** 2),
                          1.0 / (1.0 + 0.5 * 10.1), 1.0 / (1.0 + 0.5 * 0.5),
                          len(V._ERFC_TAIL) - 1)
    np.testing.assert_allclose(np.float32(small), V._ERF_SMALL, rtol=1e-6)
    np.testing.assert_allclose(np.float32(tail), V._ERFC_TAIL, rtol=1e-6)


@pytest.mark.codegen
@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inlined_into_the_calling_loop_which_then_vectorises(name, dtype):
    """No call is left in the loop (LLVM inlined the whole function), so the loop runs on
    SIMD vectors (except around float64's libm calls)."""
    evaluate(name, np.zeros(64, dtype))
    loop = _LOOPS[name]
    (signature,) = [s for s in loop.signatures if s[0].dtype == numba.from_dtype(dtype)]
    ir = loop.inspect_llvm(signature)
    assert outlined_calls(ir) == []
    if dtype is np.float32 or name not in LIBM_FLOAT64:
        assert re.search(r"<\d+ x (float|double)>", ir), "the loop was not vectorised"


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_stub_matches_compiled(name):
    """The pure-Python stub (what runs with NUMBA_DISABLE_JIT=1) computes the same function."""
    x = np.linspace(-8, 8, 33)
    stub = np.array([getattr(V, name)(v) for v in x])
    np.testing.assert_allclose(stub, evaluate(name, x), rtol=1e-13, atol=1e-300)
