"""bfloat16 storage, conversion and matrix products (the foundation of mixed precision).

bfloat16 ("bf16") is the upper half of an IEEE float32: sign, the same 8 exponent bits,
7 stored significand bits. Here a bf16 array is a NumPy ``uint16`` array holding those bit
patterns (``ml_dtypes.bfloat16`` arrays are accepted wherever bf16 input is read and are
viewed, never copied). Why ``uint16`` and not ``ml_dtypes.bfloat16`` as the storage type:
CuPy has no bfloat16 dtype and Numba cannot compile over ml_dtypes' custom dtype, so the GPU
buffers and every fused kernel must see ``uint16`` anyway; one representation on every
backend needs no extra dependency; and a ``uint16`` array cannot be silently promoted by
NumPy arithmetic to a float dtype mid-expression (a bf16 array is a storage format here,
never computed on directly). ml_dtypes stays useful for printing (``x.view(bfloat16)``) and
as an independent conversion oracle in the tests.

- :func:`to_bf16`: float32 → bf16 bits, round to nearest, ties to even (RNE), the IEEE
  default that AMX/AVX512-BF16 (VCVTNEPS2BF16), cuBLAS and PyTorch use. NaN stays NaN (made
  quiet: bit 6 of the bf16 significand set; sign and the upper payload bits kept); ±inf stay
  ±inf; finite values at or above ``0x1.FFp127 + ½ulp`` overflow to ±inf, as RNE does;
  float32 subnormals round to bf16 subnormals (no flush to zero).
- :func:`from_bf16`: bf16 bits → float32, exact (a shift by 16 bits; every bit kept).
- :func:`gemm_bf16`: ``out = alpha·op(A)·op(B) + beta·out`` with bf16 operands and float32
  accumulation and output, on MKL's ``cblas_gemm_bf16bf16f32`` (AMX / AVX512-BF16) where
  the ``mkl`` wheel is installed, else an exact emulation in float32 (see its docstring).
- :func:`bf16_support`: what this machine and this installation can do, and why.

The design of the rest of the mixed-precision mode, and the measurements behind the choices
made here, are in ``docs/bf16.md``; ``benchmarks/bf16_gemm.py`` reproduces them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import numbers
import os
import re
import sys
import threading
import warnings

import numpy as np

__all__ = ["to_bf16", "from_bf16", "bf16_round", "as_bf16_bits", "gemm_bf16", "plan_gemm_bf16",
           "GemmBf16Plan", "bf16_support", "Bf16FallbackWarning", "BF16_MACS_PER_THREAD",
           "GEMM_BACKENDS"]

GEMM_BACKENDS = ("auto", "mkl", "emulate")
"""Values of ``gemm_bf16(backend=...)`` and of the ``BACKPROP_BF16_GEMM`` environment
variable (the default of ``backend``): ``auto`` uses MKL where it is installed and the
emulation elsewhere (warning once); ``mkl`` requires MKL (an error where it is missing);
``emulate`` always emulates."""

BF16_MACS_PER_THREAD = 32_000_000
"""Multiply-adds of a bf16 product per MKL thread (``threads=None``): one thread up to
twice this, two up to three times, and so on, never more than MKL's own maximum. A bf16
product runs several times faster than a float32 one, so waking a second thread pays only
at a much larger size than :data:`backprop.blas.MACS_PER_THREAD` (1.5 M) for OpenBLAS
float32: on the 2-core AMX Xeon (docs/bf16.md) one thread won at every product of tiny,
digits and mnist (≤ 25.7 M multiply-adds); 32 M gives the wide MLP's products (0.5-1.1 G)
two threads. Provisional: to be set from whole training steps, as the float32 cap was."""


class Bf16FallbackWarning(RuntimeWarning):
    """bf16 products are emulated in float32 here: correct, but not faster than float32."""


# ---------------------------------------------------------------------------------------
# Conversion
def _bits_in(name: str, a) -> np.ndarray:
    """``a`` (a uint16 or ml_dtypes.bfloat16 ndarray) as uint16, without a copy."""
    if type(a) is not np.ndarray:
        raise TypeError(f"{name} must be a NumPy array of bf16 bit patterns (uint16 or "
                        f"ml_dtypes.bfloat16); got {type(a).__name__}")
    if a.dtype == np.uint16:
        return a
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:
        return a.view(np.uint16)
    raise TypeError(f"{name} must hold bf16 bit patterns: dtype uint16 or "
                    f"ml_dtypes.bfloat16; got {a.dtype}. Convert float32 data with "
                    "backprop.bf16.to_bf16")


def as_bf16_bits(a) -> np.ndarray:
    """The ``uint16`` view of a bf16 array (``uint16`` itself, or ``ml_dtypes.bfloat16``):
    the storage type every function here works on."""
    return _bits_in("a", a)


def _out_array(name: str, out, shape, dtype) -> np.ndarray:
    if type(out) is not np.ndarray:
        raise TypeError(f"{name} must be a NumPy array; got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have the input's shape {shape}; got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return out


def _to_bf16_numpy(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The vectorised NumPy conversion (any strides); the Numba kernel's reference."""
    u = x.view(np.uint32)
    t = u >> 16
    t &= 1
    t += 0x7FFF
    t += u  # NaN patterns may wrap around here; they are replaced below
    t >>= 16
    np.copyto(out, t, casting="unsafe")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def _to_bf16_loop(u, out):  # compiled by Numba (serial: see _kernel)
    for i in range(u.size):
        v = u[i]
        if (v & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep sign and upper payload, make quiet
            out[i] = (v >> 16) | 0x40
        else:  # round to nearest, ties to even; the carry may round up into inf
            out[i] = (v + 0x7FFF + ((v >> 16) & 1)) >> 16


_KERNEL: dict = {}


def _kernel():
    """The compiled :func:`_to_bf16_loop`, or None where Numba does not compile
    (``NUMBA_DISABLE_JIT=1``: the interpreted loop would be far slower than NumPy).

    Serial on purpose: one pass at memory speed, 6-8x faster than the vectorised NumPy
    (which makes six passes) at 256x2048; Numba's parallel version was never faster on the
    2-core VM, and far slower whenever the other core was busy (docs/bf16.md)."""
    if "to" not in _KERNEL:
        import numba

        if numba.config.DISABLE_JIT:
            _KERNEL["to"] = None
        else:
            _KERNEL["to"] = numba.njit(cache=True, nogil=True)(_to_bf16_loop)
    return _KERNEL["to"]


def to_bf16(x, out=None) -> np.ndarray:
    """float32 → bf16 bit patterns (``uint16``), rounded to nearest, ties to even.

    ``x``: a float32 ndarray of any shape and strides (float64 is refused: converting it
    through float32 could round twice; ``x.astype(np.float32)`` first is the caller's
    explicit choice). ``out``: a uint16 (or ml_dtypes.bfloat16) array of ``x``'s shape to
    write into, or None for a new one. Returns ``out`` (as uint16).

    NaN → quiet NaN with the same sign and upper payload bits; ±inf → ±inf; values that
    round past the largest bf16 (3.3895e38) → ±inf; subnormals are rounded, not flushed.
    """
    if isinstance(x, np.float32):
        x = np.asarray(x)
    if type(x) is not np.ndarray or x.dtype != np.float32:
        what = f"a {x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"to_bf16 converts float32 arrays; got {what}. Pass "
                        "x.astype(np.float32) (a float64 value may then round twice)")
    if out is None:
        out = np.empty(x.shape, np.uint16)
    else:
        out = _bits_in("out", _out_array("out", out, x.shape, None))
    kernel = _kernel() if x.size else None
    if kernel is not None and x.flags.c_contiguous and out.flags.c_contiguous:
        kernel(x.reshape(-1).view(np.uint32), out.reshape(-1))
    elif kernel is not None and x.flags.f_contiguous and out.flags.f_contiguous:
        kernel(x.T.reshape(-1).view(np.uint32), out.T.reshape(-1))
    else:
        _to_bf16_numpy(x, out)
    return out


def from_bf16(h, out=None) -> np.ndarray:
    """bf16 bit patterns (``uint16`` or ml_dtypes.bfloat16, any shape and strides) →
    float32, exactly (every bf16 value is a float32 value; NaN payloads are kept as they
    are). ``out``: a float32 array of ``h``'s shape, or None for a new one."""
    h = _bits_in("h", h)
    if out is None:
        out = np.empty(h.shape, np.float32)
    else:
        _out_array("out", out, h.shape, None)
        if out.dtype != np.float32:
            raise TypeError(f"out must be a float32 array; got {out.dtype}")
    np.left_shift(h, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def bf16_round(x) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bf16 value, as float32 (``from_bf16(to_bf16(x))``):
    the value a bf16 GEMM sees of an operand."""
    return from_bf16(to_bf16(x))


# ---------------------------------------------------------------------------------------
# Run-time detection
_STATE: dict = {}
_LOCK = threading.Lock()
_CPUINFO = "/proc/cpuinfo"
_LOCAL = threading.local()  # the MKL thread count last set from this thread


def _cpu_flags() -> tuple[bool | None, bool | None, str]:
    """(AMX-BF16, AVX512-BF16, source): None each where it cannot be read (not Linux)."""
    try:
        with open(_CPUINFO, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "amx_bf16" in flags, "avx512_bf16" in flags, _CPUINFO
    except OSError:
        pass
    return None, None, f"unknown ({_CPUINFO} not readable on {sys.platform})"


def _mkl_candidates() -> list[str]:
    """Where libmkl_rt may be: $BACKPROP_MKL_RT alone if set; else the files of the
    installed ``mkl`` distribution (the PyPI wheel puts them in <prefix>/lib), then the
    prefixes' lib folders, then the loader's search path."""
    explicit = os.environ.get("BACKPROP_MKL_RT")
    if explicit:
        return [explicit]
    names = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "mkl_rt.2.dll",
             "libmkl_rt.3.dylib", "libmkl_rt.2.dylib")
    found: list[str] = []
    try:
        from importlib import metadata

        dist = metadata.distribution("mkl")
        for file in dist.files or ():
            if file.name in names:
                found.append(os.path.normpath(str(dist.locate_file(file))))
    except Exception:  # no mkl distribution, or an unreadable RECORD
        pass
    found.sort(key=lambda p: names.index(os.path.basename(p)))
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for sub in ("lib", "Library/bin"):
            found += [os.path.join(prefix, sub, n) for n in names]
    found = [p for p in dict.fromkeys(found) if os.path.exists(p)]
    if not found:  # the loader's search path (slow: find_library may run ldconfig)
        library = ctypes.util.find_library("mkl_rt")
        if library:
            found.append(library)
    return found


_LAYERS = {0: "intel", 1: "sequential", 2: "pgi", 3: "gnu", 4: "tbb"}


def _load_mkl() -> dict:
    """Load libmkl_rt and its bf16 GEMM once: a dict with ``gemm`` (the ctypes function,
    or None) and what :func:`bf16_support` reports about it."""
    info = {"gemm": None, "path": None, "version": None, "threading_layer": None,
            "max_threads": None, "error": None}
    candidates = _mkl_candidates()
    if not candidates:
        info["error"] = ("MKL is not installed (pip install mkl, or the backprop[bf16] "
                         "extra; or set BACKPROP_MKL_RT to a libmkl_rt path)")
        return info
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(str(e) if path in str(e) else f"{path}: {e}")
            continue
        if not hasattr(lib, "cblas_gemm_bf16bf16f32"):
            errors.append(f"{path}: no cblas_gemm_bf16bf16f32 (an MKL without bf16 GEMMs)")
            continue
        break
    else:
        info["error"] = "MKL could not be used: " + "; ".join(errors)
        return info
    c_int = ctypes.c_int
    # Before any other MKL call: 32-bit integers (the argtypes below), and MKL's threads on
    # GNU OpenMP, the runtime Numba's OpenMP layer already uses (with the wait policy
    # backprop.kernels sets), instead of a second pool, Intel OpenMP's (where a small
    # two-thread product cost 38 µs against 4 µs: docs/bf16.md). MKL_THREADING_LAYER in the
    # environment wins; without libgomp MKL would abort the process, so it keeps its
    # default then.
    lib.MKL_Set_Interface_Layer.restype = c_int
    if lib.MKL_Set_Interface_Layer(c_int(0)) != 0:  # MKL_INTERFACE_LP64
        info["error"] = (f"{path}: MKL is already initialised with 64-bit integers "
                         "(MKL_INTERFACE_LAYER=ILP64?); bf16 GEMMs need the LP64 interface")
        return info
    lib.MKL_Set_Threading_Layer.restype = c_int
    wanted = None
    if not os.environ.get("MKL_THREADING_LAYER"):
        try:
            ctypes.CDLL("libgomp.so.1")
            wanted = 3  # MKL_THREADING_GNU
        except OSError:
            pass
    if wanted is not None:
        layer = lib.MKL_Set_Threading_Layer(c_int(wanted))
        info["threading_layer"] = _LAYERS.get(layer, str(layer))
    else:
        info["threading_layer"] = (os.environ.get("MKL_THREADING_LAYER", "").lower()
                                   or "intel (MKL's default: no libgomp here)")
    gemm = lib.cblas_gemm_bf16bf16f32
    p = ctypes.c_void_p
    gemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, ctypes.c_float, p, c_int, p,
                     c_int, ctypes.c_float, p, c_int]
    gemm.restype = None
    lib.MKL_Get_Max_Threads.restype = c_int
    lib.MKL_Set_Num_Threads_Local.argtypes = [c_int]
    lib.MKL_Set_Num_Threads_Local.restype = c_int
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, c_int(len(buf)))
    version = re.search(r"Version (\S+?)(?:-Product)?\s", buf.value.decode(errors="replace"))
    info.update(gemm=gemm, path=path, lib=lib, version=version.group(1) if version else "?",
                max_threads=int(lib.MKL_Get_Max_Threads()),
                set_threads=lib.MKL_Set_Num_Threads_Local)
    return info


def _mkl() -> dict:
    if "mkl" not in _STATE:
        with _LOCK:
            if "mkl" not in _STATE:
                _STATE["mkl"] = _load_mkl()
    return _STATE["mkl"]


def _requested() -> str:
    """$BACKPROP_BF16_GEMM, read once per process (at the first product or report)."""
    wanted = _STATE.get("requested")
    if wanted is None:
        wanted = os.environ.get("BACKPROP_BF16_GEMM", "auto").strip().lower() or "auto"
        _STATE["requested"] = wanted
    if wanted not in GEMM_BACKENDS:
        raise ValueError(f"BACKPROP_BF16_GEMM must be one of {', '.join(GEMM_BACKENDS)}; "
                         f"got {wanted!r}")
    return wanted


def bf16_support() -> dict:
    """What bf16 arithmetic this machine and installation offer, and why.

    Keys: ``cpu_amx_bf16``, ``cpu_avx512_bf16`` (bool; None where the CPU flags cannot be
    read: only Linux's /proc/cpuinfo is read), ``cpu_flags_source``, ``library`` ("mkl" or
    None), ``library_path``, ``library_version``, ``threading_layer`` (MKL's: "gnu",
    "intel", ...), ``max_threads``, ``requested`` ($BACKPROP_BF16_GEMM or "auto"), ``gemm``
    (what :func:`gemm_bf16` runs by default: "mkl" or "emulation"), ``fast`` (True where
    bf16 products run on bf16 instructions, i.e. faster than float32; the mixed-precision
    mode should fall back to float32 elsewhere) and ``reason`` (a sentence saying why).
    Loads MKL on the first call (once per process)."""
    amx, avx, source = _cpu_flags()
    try:
        requested = _requested()
    except ValueError as e:
        requested = f"invalid: {e}"
    mkl = _mkl()
    have = mkl["gemm"] is not None
    runs = "mkl" if have and requested != "emulate" else "emulation"
    hardware = bool(amx or avx)
    if requested == "emulate":
        reason = "BACKPROP_BF16_GEMM=emulate: bf16 products are emulated in float32"
    elif have:
        units = " and ".join(n for n, f in (("AMX-BF16", amx), ("AVX512-BF16", avx)) if f)
        reason = (f"bf16 GEMMs on MKL {mkl['version']} with {units}" if hardware else
                  "MKL is installed, but " + ("this CPU has neither AMX-BF16 nor "
                                              "AVX512-BF16" if amx is not None else
                                              "the CPU's bf16 support is unknown")
                  + ": MKL emulates bf16 products, no faster than float32")
    else:
        reason = (f"{mkl['error']}: bf16 products are emulated in float32 (exact products,"
                  " float32 sums; correct but not faster than float32)")
        if hardware:
            reason += "; this CPU has bf16 instructions, so installing MKL would pay"
    return {
        "cpu_amx_bf16": amx,
        "cpu_avx512_bf16": avx,
        "cpu_flags_source": source,
        "library": "mkl" if have else None,
        "library_path": mkl.get("path") if have else None,
        "library_version": mkl.get("version") if have else None,
        "threading_layer": mkl.get("threading_layer") if have else None,
        "max_threads": mkl.get("max_threads") if have else None,
        "requested": requested,
        "gemm": runs,
        "fast": runs == "mkl" and hardware,
        "reason": reason,
    }


# ---------------------------------------------------------------------------------------
# GEMM
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_INT_MAX = 2**31 - 1


def _operand(name: str, x, trans: bool) -> tuple[np.ndarray, int, bool]:
    """Validate a bf16 operand; describe it to BLAS as (array, leading dimension, trans):
    a row-major matrix with unit column stride, or a column-major one (a transposed view,
    a Fortran array) as the transpose of a row-major one. Nothing is copied."""
    if type(x) is not np.ndarray:
        raise TypeError(f"gemm_bf16: {name} must be a NumPy array of bf16 bit patterns "
                        f"(uint16 or ml_dtypes.bfloat16); got {type(x).__name__}")
    if x.dtype != np.uint16:
        x = _bits_in(name, x)
    if x.ndim != 2:
        raise ValueError(f"gemm_bf16: {name} must be 2-D; got shape {x.shape}")
    if not x.flags.aligned:
        raise ValueError(f"gemm_bf16: {name} is not aligned to 2 bytes")
    rows, cols = x.shape
    if x.size == 0:  # nothing is read: any strides will do
        return x, max(cols, 1), trans
    s0, s1 = x.strides
    if cols <= 1 or s1 == 2:  # row-major (unit stride along a row)
        ld = max(cols, 1) if rows <= 1 else s0 // 2
        if rows <= 1 or (s0 > 0 and s0 % 2 == 0 and ld >= max(cols, 1)):
            return x, ld, trans
    if rows <= 1 or s0 == 2:  # column-major: the transpose of a row-major cols×rows matrix
        ld = max(rows, 1) if cols <= 1 else s1 // 2
        if cols <= 1 or (s1 > 0 and s1 % 2 == 0 and ld >= max(rows, 1)):
            return x, ld, not trans
    raise ValueError(
        f"gemm_bf16: {name} (shape {x.shape}, strides {x.strides}) is not a BLAS matrix: "
        "one of its two axes must have unit stride and the other a positive stride at least "
        "the first axis's length (a C- or Fortran-ordered array, a transposed view, or a "
        f"block of one). Pass np.ascontiguousarray({name})")


def _check_out(out) -> None:
    if type(out) is not np.ndarray or out.dtype != np.float32:
        what = f"a {out.dtype} array" if isinstance(out, np.ndarray) else type(out).__name__
        raise TypeError(f"gemm_bf16: out must be a float32 NumPy array (the product is "
                        f"accumulated and written in float32); got {what}")
    if out.ndim != 2:
        raise ValueError(f"gemm_bf16: out must be 2-D; got shape {out.shape}")
    if not out.flags.writeable:
        raise ValueError("gemm_bf16: out must be writeable")
    if not out.flags.aligned:
        raise ValueError("gemm_bf16: out is not aligned to 4 bytes")


def _scalar(name: str, value) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gemm_bf16: {name} must be a real number; got {value!r}")
    return float(value)


def _thread_count(threads) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"gemm_bf16: threads must be a positive integer or None; got "
                         f"{threads!r}")
    return int(threads)


_WARNED: dict = {}


def _backend(backend) -> str:
    """The backend that runs: "mkl" or "emulate" (warning once when auto falls back)."""
    wanted = _requested() if backend is None else backend
    if wanted not in GEMM_BACKENDS:
        raise ValueError(f"gemm_bf16: backend must be one of {', '.join(GEMM_BACKENDS)} or "
                         f"None; got {wanted!r}")
    if wanted == "emulate":
        return "emulate"
    mkl = _mkl()
    if mkl["gemm"] is not None:
        return "mkl"
    if wanted == "mkl":
        raise RuntimeError(f"gemm_bf16(backend='mkl'): {mkl['error']}")
    if not _WARNED:
        _WARNED["auto"] = True
        warnings.warn(f"backprop.bf16: {mkl['error']}. bf16 matrix products are emulated "
                      "in float32 (exact products, float32 sums): correct, but no faster "
                      "than float32. See bf16_support()", Bf16FallbackWarning, stacklevel=4)
    return "emulate"


class GemmBf16Plan:
    """One checked bf16 product on fixed arrays, to run again and again:
    ``plan()`` is ``gemm_bf16(a, b, out, ...)`` without the checks (the arrays' contents
    may change between calls, not their memory: the plan holds them). For the products of
    a training step, whose buffers live as long as the model, this leaves only the ctypes
    call (a few microseconds less per product than :func:`gemm_bf16`, which matters for
    the small MLPs). Made by :func:`plan_gemm_bf16`."""

    __slots__ = ("backend", "threads", "_call", "_args", "_arrays")

    def __call__(self) -> np.ndarray:
        call = self._call
        if call is not None:
            threads = self.threads  # MKL's (None for the emulation)
            if threads is not None and getattr(_LOCAL, "threads", None) != threads:
                _mkl()["set_threads"](threads)
                _LOCAL.threads = threads
            call(*self._args)
        return self._arrays[2]

    def __repr__(self):
        a, b, out = self._arrays
        return (f"<GemmBf16Plan {self.backend}: out{out.shape} from a{a.shape}, b{b.shape}"
                f"{'' if self.threads is None else f', {self.threads} threads'}>")


def plan_gemm_bf16(a, b, out, trans_a: bool = False, trans_b: bool = False,
                   alpha: float = 1.0, beta: float = 0.0, *, threads: int | None = None,
                   backend: str | None = None) -> GemmBf16Plan:
    """Check the arguments of :func:`gemm_bf16` once and return a :class:`GemmBf16Plan`
    that computes that product on those arrays whenever it is called (nothing is computed
    now)."""
    a, lda, ta = _operand("a", a, bool(trans_a))
    b, ldb, tb = _operand("b", b, bool(trans_b))
    _check_out(out)
    alpha = _scalar("alpha", alpha)
    beta = _scalar("beta", beta)
    threads = _thread_count(threads)
    m, k = a.shape[::-1] if trans_a else a.shape
    kb, n = b.shape[::-1] if trans_b else b.shape
    if k != kb or out.shape != (m, n):
        raise ValueError(
            f"gemm_bf16: shapes do not match: op(a) is {m}×{k} (a {a.shape}, trans_a="
            f"{bool(trans_a)}) and op(b) is {kb}×{n} (b {b.shape}, trans_b={bool(trans_b)})"
            + (f": their inner dimensions differ ({k} ≠ {kb})" if k != kb else
               f", so out must be {m}×{n}; got {out.shape}"))
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        raise ValueError("gemm_bf16: out overlaps a or b in memory")
    # BLAS layout of out: row-major with unit column stride, or column-major (computed as
    # outᵀ = op(b)ᵀ·op(a)ᵀ, which is row-major)
    s0, s1 = out.strides
    if out.size == 0 or ((n <= 1 or s1 == 4)
                         and (m <= 1 or (s0 > 0 and s0 % 4 == 0 and s0 // 4 >= n))):
        ldc, swap = (n if m <= 1 else s0 // 4), False
    elif (m <= 1 or s0 == 4) and (n <= 1 or (s1 > 0 and s1 % 4 == 0 and s1 // 4 >= m)):
        ldc, swap = (m if n <= 1 else s1 // 4), True
    else:
        raise ValueError(
            f"gemm_bf16: out (shape {out.shape}, strides {out.strides}) is not a BLAS matrix: "
            "one axis must have unit stride and the other a stride of at least the first "
            "axis's length")
    plan = GemmBf16Plan()
    plan.backend = _backend(backend)
    plan.threads = None
    plan._arrays = (a, b, out)
    if m == 0 or n == 0:  # nothing to compute
        plan._call, plan._args = None, ()
    elif k == 0 or plan.backend == "emulate":
        plan.backend = "emulate"
        plan._call = _emulate
        plan._args = (a, b, out, bool(trans_a), bool(trans_b), alpha, beta, k)
    else:
        if swap:
            a, lda, ta, b, ldb, tb = b, ldb, not tb, a, lda, not ta
            m, n = n, m
        if max(m, n, k, lda, ldb, ldc) > _INT_MAX:
            raise ValueError("gemm_bf16: a dimension or leading dimension exceeds 2³¹−1, "
                             "the limit of MKL's 32-bit (LP64) interface")
        mkl = _mkl()
        plan.threads = threads or max(1, min(mkl["max_threads"],
                                             m * n * k // BF16_MACS_PER_THREAD))
        plan._call = mkl["gemm"]
        plan._args = (_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                      m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, beta,
                      out.ctypes.data, ldc)
    return plan


def gemm_bf16(a, b, out, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
              beta: float = 0.0, *, threads: int | None = None,
              backend: str | None = None) -> np.ndarray:
    """``out = alpha · op(a) · op(b) + beta · out``: bf16 operands, float32 sums and output.

    ``a``, ``b``: 2-D bf16 arrays (uint16 bit patterns, or ml_dtypes.bfloat16); ``op(x)``
    is ``x.T`` where ``trans_x`` is set, else ``x``; ``op(a)`` is M×K, ``op(b)`` K×N.
    ``out``: a writeable float32 M×N array, not overlapping ``a`` or ``b``; read only
    where ``beta != 0`` (``beta=0`` overwrites NaN too, as BLAS does; ``beta=1``
    accumulates, e.g. ∂W over micro-batches). Each array may be C-ordered, Fortran-ordered,
    a transposed view or a block of a larger matrix with unit stride along one axis: the
    layout goes to BLAS as its transpose flag and leading dimension, nothing is copied.
    ``alpha`` and ``beta`` are rounded to float32 (BLAS's ``float`` arguments).
    ``threads``: MKL threads for this call (None: one per :data:`BF16_MACS_PER_THREAD`
    multiply-adds, within MKL's maximum; set with MKL's thread-local setting, so other
    threads and NumPy's OpenBLAS are not affected). ``backend``: one of
    :data:`GEMM_BACKENDS`; None: ``$BACKPROP_BF16_GEMM`` (read once per process) or
    "auto". Returns ``out``. For the same product on the same arrays many times, check
    once with :func:`plan_gemm_bf16`.

    Precision. Every product of two bf16 numbers is exact in float32 (8 + 8 significant
    bits ≤ 24), so both backends differ from the exact result only by float32 rounding of
    the sums: ``|out − exact| ≤ (K + 2)·2⁻²⁴·(|alpha|·(|op(a)|·|op(b)|) + |beta|·|out₀|)``
    elementwise, for any order of summation. The backends sum in different orders, so they
    agree to that bound, not bit for bit. MKL on AMX / AVX512-BF16 also treats bf16
    subnormal inputs and subnormal products as zero (the instructions' DAZ/FTZ), which adds
    at most ``K·2⁻¹²⁶·|alpha|`` (absolute) per element; the emulation keeps them. NaN and
    ±inf propagate as in float32 arithmetic.

    The emulation (``backend="emulate"``, or "auto" without MKL: a :class:`Bf16FallbackWarning`
    once per process says why) converts both operands to float32 exactly and multiplies them
    with NumPy; it is exact in the same sense, only not faster than float32.
    """
    return plan_gemm_bf16(a, b, out, trans_a, trans_b, alpha, beta, threads=threads,
                          backend=backend)()


def _emulate(a, b, out, trans_a, trans_b, alpha, beta, k) -> np.ndarray:
    """The float32 emulation: exact bf16→float32 operands, NumPy's float32 product.
    Silent about NaN and overflow, as BLAS is (NumPy would warn)."""
    with np.errstate(all="ignore"):
        return _emulate_quietly(a, b, out, trans_a, trans_b, alpha, beta, k)


def _emulate_quietly(a, b, out, trans_a, trans_b, alpha, beta, k) -> np.ndarray:
    alpha32, beta32 = np.float32(alpha), np.float32(beta)
    if k == 0:
        product = np.zeros(out.shape, np.float32)
    else:
        a32, b32 = from_bf16(a), from_bf16(b)
        product = np.matmul(a32.T if trans_a else a32, b32.T if trans_b else b32)
        if alpha32 != 1:
            product *= alpha32
    if beta32 == 0:
        out[...] = product
    else:
        if beta32 != 1:
            out *= beta32
        out += product
    return out
