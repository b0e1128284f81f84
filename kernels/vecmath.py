"""Elementary functions that LLVM can vectorise, for the Numba CPU kernels.

libm's ``exp``, ``tanh``, ``erfc`` and ``log1p`` are opaque scalar calls: a loop that calls
them runs one element at a time. The functions here are a range reduction and a polynomial,
branch-free, and inlined into their callers (:func:`inline.inlined`), so inside a kernel's
inner loop they compile to SIMD code. They are compiled on their own, with
:data:`inline.FLAGS` (NumPy's error model, FMA contraction), so every kernel gets the same
results from them. Each is generic in the precision of its argument and returns that
precision:

- float32: computed in float32 (twice the SIMD lanes of float64, and division four to eight
  times cheaper), within a few float32 ulps of the exact value; tests/test_vecmath.py
  measures each function on millions of points and holds it to a stated bound.
- float64: ``exp`` and ``sigmoid`` are the same kind of polynomial in float64 (within 1.01
  ulp of NumPy); ``tanh``, ``ndtr`` and ``softplus`` call libm (float64 models favour
  exactness over speed, and libm is exact to an ulp).

NaN propagates and ±inf gives the limit, as in NumPy. Under ``NUMBA_DISABLE_JIT=1`` each
name runs its plain-Python stub (the same math through ``math``/NumPy).

    exp(x)        eˣ = 2ᵏ·eʳ,  r = x - k ln2 ∈ [-ln2/2, ln2/2],  eʳ by its Taylor polynomial
    sigmoid(x)    1/(1 + e⁻ˣ) (float64: exp only ever sees -|x|)
    tanh(x)       sign(x)·t/(t + 2),  t = expm1(2|x|)  (no cancellation near 0)
    expm1(x)      eˣ - 1: t = expm1(|x|) for x ≥ 0, -t/(t + 1) below (no cancellation near 0)
    ndtr(x)       Φ(x) = ½ erfc(-x/√2), the standard normal CDF (GELU's gate); accurate in
                  both tails: erfc(u) = e^(-u²)·R(1/(1 + u/2)) for u ≥ ½, erf = u·P(u²) below
    ndtr_pdf(x)   (Φ(x), φ(x)), φ = e^(-x²/2)/√(2π) from the e^(-u²) that Φ's tail computes
    softplus(x)   log(1 + eˣ) = log1p(e^-|x|) + max(x, 0),  log1p(e) = 2 atanh(e/(2 + e))
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .inline import inlined, jit
from .reference import INV_SQRT2, INV_SQRT_2PI

F32 = np.float32
LOG2E = 1.4426950408889634

# float64 exp: ln 2 split so that k·LN2_HI is exact for every k in range (Cody-Waite)
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# float32 exp: ln 2 = 355/512 + _LN2_LO32 (355/512 has 9 bits: k·355/512 is exact for |k| ≤ 2¹⁵)
_LN2_HI32 = F32(0.693359375)
_LN2_LO32 = F32(-2.12194440e-4)
_LOG2E32 = F32(LOG2E)
_ROUND32 = F32(1.5 * 2**23)  # x + _ROUND32 - _ROUND32 rounds |x| < 2²² to an integer
_ONE_BITS32 = np.int32(127 << 23)  # the bits of 1.0
# the least float32 x with e^x ≥ 2⁻¹²⁶ (the smallest normal float32), and the greatest with
# e^x < 2¹²⁸: between them 2ᵏ·p, p ∈ [2^-½, 2^½], has a normal exponent for every k
_LN_FLT_MIN = np.nextafter(F32(-126 * math.log(2.0)), F32(0.0))
_LN_FLT_MAX = np.nextafter(F32(128 * math.log(2.0)), F32(0.0))

# ndtr, float32. erf(u)/u for u² ∈ [0, ¼] and erfc(u)·e^(u²) for t = 1/(1 + u/2), u ∈ [½, 10.1]:
# least-squares Chebyshev fits (tests/test_vecmath.py re-derives both and checks they match).
_ERF_SMALL = tuple(F32(c) for c in (
    1.1283791656147941, -0.3761260917334049, 0.11282834739149891, -0.02675794433256551,
    0.004719505354201991))
_ERFC_TAIL = tuple(F32(c) for c in (
    4.118108291983891e-06, 0.28196957907389664, 0.28375906994133127, 0.23411041709684527,
    0.23812690214459376, -0.11474834206620546, 0.41689112589789756, -0.6213826938977289,
    0.35709277296584574, -0.07583316675471406))
_NDTR_SPLIT = F32(0.5)  # |u| below it: ½ + ½ erf(u); above it: the erfc tail
_NDTR_CLAMP = F32(15.0)  # Φ(-15) < 1e-50: past it Φ is 0 or 1 in float32


# ---------------------------------------------------------------------------------------
# Bit casts and exponent-field powers of two
def _bitcast(source, target):
    """An intrinsic that reads the bits of a ``source`` value as a ``target`` (same width)."""
    @intrinsic
    def cast(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return cast


_f64_from_bits = _bitcast(types.int64, types.float64)
_f32_from_bits = _bitcast(types.int32, types.float32)
_f32_bits = _bitcast(types.float32, types.int32)


def _llvm_float_call(name: str, *args):
    """The typing result of an intrinsic that calls LLVM's ``llvm.<name>.f32/.f64`` on
    ``args`` (Numba types), or None unless they are floats of one type."""
    if len(set(args)) != 1 or not isinstance(args[0], types.Float):
        return None

    def codegen(context, builder, signature, values):
        fty = context.get_value_type(signature.args[0])
        suffix = "f32" if fty == ir.FloatType() else "f64"
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(fty, [fty] * len(values)), f"llvm.{name}.{suffix}")
        return builder.call(fn, values)

    return args[0](*args), codegen


@intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's ``maxnum`` of two floats of one type."""
    return _llvm_float_call("maxnum", a, b)


@intrinsic
def _fma(typingctx, a, b, c):
    """LLVM's ``fma``: ``a·b + c`` with one rounding (never two, as a contraction may be)."""
    return _llvm_float_call("fma", a, b, c)


_fmax = jit(lambda a, b: _maxnum(a, b))


@inlined(lambda a, b: _fmax)
def fmax(a, b):
    """``max(a, b)`` ignoring a NaN operand (C's ``fmax``, LLVM's ``maxnum``). A loop that
    reduces with it vectorises; one that compares and selects does not (the order of NaN
    comparisons would change), which makes a row maximum ten times slower."""
    return type(a)(np.fmax(a, b))


# ---------------------------------------------------------------------------------------
# float64
@jit
def _exp64(x):
    """Taylor polynomial of degree 13 on the reduced argument (truncation < 1e-17); ``2ᵏ``
    as two exponent-field powers so that results near overflow and in the subnormal range
    are scaled exactly."""
    clamped = min(max(x, -746.0), 710.0)  # beyond these exp is 0 or inf already
    k = math.floor(clamped * LOG2E + 0.5)
    r = (clamped - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0  # Horner, written out: a loop over a tuple would not vectorise
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    n = np.int64(k)
    half = n >> 1
    y = p * _f64_from_bits((half + 1023) << 52) * _f64_from_bits((n - half + 1023) << 52)
    return y if x == x else x  # NaN in, NaN out


@jit
def _sigmoid64(x):
    e = exp(-abs(x))
    t = 1.0 / (1.0 + e)
    return t if x >= 0.0 else e * t


@jit
def _tanh64(x):
    return math.tanh(x)


@jit
def _ndtr64(x):
    return 0.5 * math.erfc(-x * INV_SQRT2)


@jit
def _ndtr_pdf64(x):
    return _ndtr64(x), exp(-0.5 * x * x) * INV_SQRT_2PI


@jit
def _softplus64(x):
    return math.log1p(exp(-abs(x))) + (0.0 if x < 0.0 else x)


# ---------------------------------------------------------------------------------------
# float32 (every constant is a float32: a float64 one would promote the whole expression)
@jit
def _reduce32(x):
    """``(k, r, n)`` with ``x = k ln2 + r``, ``|r| ≤ ln2/2`` (Cody-Waite: k·_LN2_HI32 is
    exact) and ``n = k·2²³``, what adding k to a float32's exponent field adds to its bits.
    Adding 1.5·2²³ rounds x·log₂e to an integer k and leaves k in the sum's low mantissa
    bits, so the sum's bits shifted left by 23 are n (mod 2³²): no float-to-int conversion.
    Valid for |x| < 2²¹; outside it r and n are meaningless, and the callers select."""
    t = x * _LOG2E32 + _ROUND32
    k = t - _ROUND32
    return k, (x - k * _LN2_HI32) - k * _LN2_LO32, np.int32(_f32_bits(t) << 23)


@jit
def _taylor_tail32(r):
    """``Σ rʲ/(j+2)!`` for j = 0..5, so that ``eʳ = 1 + r + r²·tail`` to degree 7 (the
    truncation, r⁸/8!, is under 0.1 ulp on the reduced range)."""
    p = F32(1.0 / 5040.0) * r + F32(1.0 / 720.0)
    p = p * r + F32(1.0 / 120.0)
    p = p * r + F32(1.0 / 24.0)
    p = p * r + F32(1.0 / 6.0)
    return p * r + F32(0.5)


@jit
def _exp32(x):
    """``2ᵏ·eʳ``, scaled by an integer add to the exponent field. Results below the smallest
    normal float32 (x < ln 2⁻¹²⁶) are flushed to 0: subnormal arithmetic takes a microcode
    assist of ~100 cycles per instruction on x86, and would make a loop whose inputs reach
    that range (confident softmax rows) many times slower. The error is < 1.2e-38. Outside
    [ln 2⁻¹²⁶, ln 2¹²⁸) the polynomial's result is discarded, not clamped into range: 0 below,
    x + inf above (inf, or NaN for NaN)."""
    k, r, n = _reduce32(x)
    p = (_taylor_tail32(r) * r + F32(1.0)) * r + F32(1.0)
    y = _f32_from_bits(np.int32(_f32_bits(p) + n))
    y = y if x <= _LN_FLT_MAX else x + F32(np.inf)
    return F32(0.0) if x < _LN_FLT_MIN else y


@jit
def _expm1_32_nonneg(y):
    """``eʸ - 1`` for ``0 ≤ y ≤ 18``: ``2ᵏ·expm1(r) + (2ᵏ - 1)``, exact in its last step for
    k = 0, so small arguments keep full relative accuracy."""
    k, r, n = _reduce32(y)
    p = _taylor_tail32(r) * r * r + r
    s = _f32_from_bits(np.int32(n + _ONE_BITS32))
    return s * p + (s - F32(1.0))


@jit
def _tanh32(x):
    a = min(abs(x), F32(9.0))  # tanh(9) rounds to 1 in float32
    t = _expm1_32_nonneg(a + a)
    y = math.copysign(t / (t + F32(2.0)), x)
    return y if x == x else x


@jit
def _expm1_32(x):
    a = min(abs(x), F32(18.0))  # expm1(-18) rounds to -1 in float32
    t = _expm1_32_nonneg(a)
    below = -t / (t + F32(1.0))  # eˣ - 1 = -(e^|x| - 1)/e^|x| for x < 0
    above = t if x <= F32(18.0) else _exp32(x) - F32(1.0)
    y = above if x >= F32(0.0) else below
    return y if x == x else x


@jit
def _expm1_64(x):
    return math.expm1(x)  # libm's, a scalar call (as float64 tanh and ndtr)


@jit
def _sigmoid32(x):
    return F32(1.0) / (F32(1.0) + exp(-x))  # e⁻ˣ = inf for x < -88.7 gives 0, exactly


@jit
def _ndtr_pdf32(x):
    """``(Φ(x), φ(x))``: the tail of Φ holds e^(-x²/2) already, so φ costs one multiply."""
    a = min(abs(x), _NDTR_CLAMP)
    u = a * F32(INV_SQRT2)
    # centre: ½ ± ½ erf(u), erf(u) = u·P(u²)
    z = u * u
    c = _ERF_SMALL
    erf = u * (c[0] + z * (c[1] + z * (c[2] + z * (c[3] + z * c[4]))))
    centre = F32(0.5) + math.copysign(F32(0.5) * erf, x)
    # tails: ½ erfc(u) = ½ e^(-u²) R(t); u² = x²/2 carried as hi + lo (hi rounded, lo its
    # exact error by an FMA) so that e^(-u²) keeps float32 accuracy where u² is large
    hi = (F32(0.5) * a) * a
    lo = _fma(F32(0.5) * a, a, -hi)
    e = exp(-hi) * (F32(1.0) - lo)
    t = F32(1.0) / (F32(1.0) + F32(0.5) * u)
    c = _ERFC_TAIL
    r = c[9] * t + c[8]
    r = r * t + c[7]
    r = r * t + c[6]
    r = r * t + c[5]
    r = r * t + c[4]
    r = r * t + c[3]
    r = r * t + c[2]
    r = r * t + c[1]
    r = r * t + c[0]
    half = F32(0.5) * e * r
    tail = half if x < F32(0.0) else F32(1.0) - half
    y = centre if u < _NDTR_SPLIT else tail
    pdf = e * F32(INV_SQRT_2PI)  # past the clamp e^(-x²/2) < 1e-48: 0 in float32 either way
    return (y, pdf) if x == x else (x, x)


@jit
def _ndtr32(x):
    return ndtr_pdf(x)[0]  # inlined, and φ's one multiply is then dead code


@jit
def _softplus32(x):
    e = exp(-abs(x))
    s = e / (F32(2.0) + e)  # log1p(e) = 2 atanh(s), s ∈ [0, 1/3]: the odd series, 8 terms
    z = s * s
    p = F32(1.0 / 15.0) * z + F32(1.0 / 13.0)
    p = p * z + F32(1.0 / 11.0)
    p = p * z + F32(1.0 / 9.0)
    p = p * z + F32(1.0 / 7.0)
    p = p * z + F32(1.0 / 5.0)
    p = p * z + F32(1.0 / 3.0)
    p = p * z + F32(1.0)
    return F32(2.0) * s * p + (F32(0.0) if x < F32(0.0) else x)


# ---------------------------------------------------------------------------------------
# The generic names: Python stubs (what runs with the JIT disabled); from compiled code, the
# implementation of the argument's precision, inlined at the call site
def _by_precision(f32, f64):
    return lambda x: f32 if x == types.float32 else f64 if isinstance(x, types.Float) else None


@inlined(_by_precision(_exp32, _exp64))
def exp(x):
    """``eˣ``."""
    with np.errstate(over="ignore"):
        return type(x)(np.exp(x))


@inlined(_by_precision(_expm1_32, _expm1_64))
def expm1(x):
    """``eˣ - 1``, accurate near 0."""
    with np.errstate(over="ignore"):
        return type(x)(np.expm1(x))


@inlined(_by_precision(_sigmoid32, _sigmoid64))
def sigmoid(x):
    """``1/(1 + e⁻ˣ)``."""
    e = exp(-abs(x))
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


@inlined(_by_precision(_tanh32, _tanh64))
def tanh(x):
    """``tanh x``."""
    return type(x)(np.tanh(x))


@inlined(_by_precision(_ndtr32, _ndtr64))
def ndtr(x):
    """``Φ(x) = ½ erfc(-x/√2)``, the standard normal CDF."""
    return ndtr_pdf(x)[0]


@inlined(_by_precision(_ndtr_pdf32, _ndtr_pdf64))
def ndtr_pdf(x):
    """``(Φ(x), φ(x))``, the standard normal CDF and density ``φ(x) = e^(-x²/2)/√(2π)``
    (GELU's derivative ``Φ + xφ``); Φ is :func:`ndtr`'s, and in float32 both come from one
    exponential."""
    f = float(x)
    return (type(x)(0.5 * math.erfc(-f * INV_SQRT2)),
            type(x)(math.exp(-0.5 * f * f) * INV_SQRT_2PI))


@inlined(_by_precision(_softplus32, _softplus64))
def softplus(x):
    """``log(1 + eˣ)``."""
    return type(x)(math.log1p(math.exp(-abs(float(x)))) + max(float(x), 0.0))
