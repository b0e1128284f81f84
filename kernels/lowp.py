"""Low-precision copies written by the fused kernels (mixed precision, ``backprop.precision``).

Under mixed precision the kernels that produce a float32 tensor a matrix product will read
next (the Dense epilogues' ``A`` and ``δ``, the optimizers' updated weights) also write its
low-precision copy in the same pass, from exactly the float32 value they store:

- **bfloat16**, stored as ``uint16`` bit patterns (``backprop.bf16`` explains why): round to
  nearest, ties to even, by the integer formula of :func:`bf16_bits`; NaN stays NaN (quiet:
  bit 6 of the bf16 significand set, sign and upper payload kept); ±inf stay ±inf; overflow
  rounds to ±inf; subnormals are rounded, never flushed. The same formula in every backend
  (NumPy here, Numba CPU and CUDA through :func:`bf16_bits`, CUDA C++ through
  :data:`CUDA_BF16_BITS`), so every backend's bits are identical, NaN payloads included,
  and identical to :func:`backprop.bf16.to_bf16`.
- **float16** (IEEE binary16, ``float16`` arrays): round to nearest, ties to even, as
  NumPy's and CUDA's ``__float2half_rn`` conversions; overflow gives ±inf (the reason fp16
  training needs loss scaling, :class:`backprop.precision.GradScaler`).

The low-precision output is an optional argument of each op (``out_lp``, ``delta_lp``,
``data_lp``): None costs nothing. Only float32 sources have low-precision copies.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LOWP_DTYPES", "lowp_kind", "check_lowp", "to_lowp", "bf16_bits", "CUDA_BF16_BITS"]

LOWP_DTYPES = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}
"""Storage dtype of each low-precision format."""


def lowp_kind(a) -> str:
    """``"bfloat16"`` for a ``uint16`` array, ``"float16"`` for a ``float16`` one."""
    if a.dtype == np.uint16:
        return "bfloat16"
    if a.dtype == np.float16:
        return "float16"
    raise TypeError(f"a low-precision copy is uint16 (bfloat16 bits) or float16; got {a.dtype}")


def check_lowp(op: str, name: str, out, source) -> None:
    """``out`` is a valid low-precision output for the float32 array ``source``: the same
    array type, shape and C-contiguity, dtype uint16 or float16, writeable, and not
    overlapping ``source``. Raises ValueError/TypeError naming the problem."""
    if type(out) is not type(source):
        raise TypeError(f"{op}: {name} must be a {type(source).__name__} like the float32 "
                        f"data it copies; got {type(out).__name__}")
    if source.dtype != np.float32:
        raise ValueError(f"{op}: {name} (a low-precision copy) needs float32 data; the data "
                         f"here is {source.dtype}: mixed precision keeps float32 master values")
    if out.dtype not in (np.uint16, np.float16):
        raise TypeError(f"{op}: {name} must be uint16 (bfloat16 bits) or float16; got "
                        f"{out.dtype}")
    if out.shape != source.shape:
        raise ValueError(f"{op}: {name} must have the shape {source.shape} of the data it "
                         f"copies; got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous")
    xp = np if isinstance(out, np.ndarray) else _module(out)
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{op}: {name} must be writeable")
    if xp.may_share_memory(out, source):
        raise ValueError(f"{op}: {name} overlaps the float32 data it copies; pass a "
                         "separate buffer")


def _module(a):
    import cupy

    return cupy


def bf16_bits(u):
    """The bfloat16 bits of the float32 whose bits are ``u`` (an unsigned 32-bit integer):
    round to nearest, ties to even; NaN kept (made quiet). Plain integer arithmetic, so
    Numba compiles it for the CPU and for CUDA alike."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


CUDA_BF16_BITS = r"""
__device__ __forceinline__ unsigned short backprop_bf16_bits(float x) {
    // round to nearest, ties to even; NaN kept (quiet bit set): backprop.kernels.lowp.
    // Not __float2bfloat16_rn, whose NaN is canonical: every backend's bits must agree.
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
"""
"""CUDA C++ device function ``backprop_bf16_bits(float) -> unsigned short``, the formula of
:func:`bf16_bits`, for the CuPy kernels."""


def to_lowp(x, out):
    """``out ← x`` in ``out``'s low-precision format (the reference conversion, any array
    module: NumPy or CuPy); ``x`` float32. Returns ``out``."""
    if out.dtype == np.float16:
        with np.errstate(over="ignore"):  # overflow to ±inf is the format's (loss scaling)
            out[...] = x  # IEEE round to nearest even, in NumPy and CuPy alike
        return out
    xp = np if isinstance(x, np.ndarray) else _module(x)
    u = xp.ascontiguousarray(x).view(xp.uint32)
    t = (u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    t = xp.where(nan, (u >> 16) | xp.uint32(0x40), t)
    out[...] = t.astype(xp.uint16)
    return out
