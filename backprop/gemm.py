"""Dense layers' float32/float64 matrix products on MKL, where MKL is installed.

A Dense layer runs three products per training step: ``Z = X Wᵀ`` (forward),
``∂W (+)= δᵀ X`` and ``∂X = δ W`` (backward). NumPy runs them on the BLAS it was built with
(OpenBLAS in the PyPI wheels). Where the ``mkl`` wheel is installed (the ``backprop[mkl]``
extra; ``[bf16]`` installs it too), a product of at least :data:`MKL_MIN_MACS`
multiply-adds runs on MKL's ``cblas_sgemm``/``cblas_dgemm`` instead, on the GNU OpenMP
threads that backprop's kernels use (MKL is loaded as :mod:`backprop.bf16` loads it): on the
2-core AVX-512 VM MKL ran the products of the 784-256-256-10 MLP at batch 128 1.2–1.7× as
fast as OpenBLAS (``benchmarks/README.md``, "Matrix products on MKL"). Smaller products stay
on NumPy, where MKL's fixed cost per call (a few microseconds through ctypes) costs more
than it saves. ``∂W`` accumulated into an existing gradient uses MKL's ``beta = 1``.

Selection, read once per process (or :func:`set_backend`): ``BACKPROP_GEMM`` = ``auto``
(MKL where installed, else NumPy) | ``numpy`` | ``mkl`` (an error where MKL cannot load).
Results differ from NumPy's in rounding only (another summation order).

Thread-safe: MKL's gemm may be called from several threads at once; the MKL thread count
is set per calling thread (``MKL_Set_Num_Threads_Local``), each product asking for one
thread per ``blas.MACS_PER_THREAD`` multiply-adds, as the OpenBLAS cap does.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

__all__ = ["BACKENDS", "MKL_MIN_MACS", "backend", "set_backend", "product"]

BACKENDS = ("auto", "numpy", "mkl")

MKL_MIN_MACS = 1 << 22
"""Products with fewer multiply-adds stay on NumPy: around 2²⁰–2²¹ (one thread each) MKL
and OpenBLAS took turns being faster, product by product; from 2²² (two threads) MKL was
faster or even on every product measured."""

_STATE: dict = {}
_LOCK = threading.Lock()
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _requested() -> str:
    wanted = os.environ.get("BACKPROP_GEMM", "auto").strip().lower() or "auto"
    if wanted not in BACKENDS:
        raise ValueError(f"BACKPROP_GEMM must be one of {', '.join(BACKENDS)}; got {wanted!r}")
    return wanted


def _load() -> dict:
    """``{"sgemm", "dgemm", "error", "max_threads", "set_threads"}``: MKL's gemm functions
    with their argument types and its thread controls (:mod:`backprop.bf16`'s), or None
    each and why not."""
    from backprop import bf16

    mkl = bf16._mkl()
    if mkl.get("lib") is None:
        return {"sgemm": None, "dgemm": None, "error": mkl["error"]}
    lib, c_int, p = mkl["lib"], ctypes.c_int, ctypes.c_void_p
    functions = {}
    for name, scalar in (("sgemm", ctypes.c_float), ("dgemm", ctypes.c_double)):
        fn = getattr(lib, f"cblas_{name}", None)
        if fn is None:
            return {"sgemm": None, "dgemm": None,
                    "error": f"{mkl['path']} has no cblas_{name}"}
        fn.argtypes = [c_int] * 6 + [scalar, p, c_int, p, c_int, scalar, p, c_int]
        fn.restype = None
        functions[name] = fn
    return {**functions, "error": None, "max_threads": mkl["max_threads"],
            "set_threads": mkl["set_threads"]}


def _resolve() -> str:
    """The backend in use, decided at the first product (or after set_backend)."""
    with _LOCK:
        if "backend" not in _STATE:
            wanted = _STATE.get("requested") or _requested()
            name = "numpy"
            if wanted != "numpy":
                mkl = _load()
                if mkl["error"] is None:
                    _STATE["mkl"] = mkl
                    name = "mkl"
                elif wanted == "mkl":
                    raise RuntimeError(f"BACKPROP_GEMM=mkl: {mkl['error']}")
            _STATE["backend"] = name
        return _STATE["backend"]


def backend() -> str:
    """``"mkl"`` or ``"numpy"``: what runs the Dense layers' large products."""
    return _STATE.get("backend") or _resolve()


def set_backend(name: str) -> str:
    """Choose the products' backend in code (``auto``, ``numpy`` or ``mkl``, as
    ``BACKPROP_GEMM``); returns the one in use."""
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"gemm backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    with _LOCK:
        _STATE.clear()
        _STATE["requested"] = name
    return _resolve()


def product(a, b, out, trans_a: bool, trans_b: bool, accumulate: bool = False) -> bool:
    """``out = op(a) op(b)`` (``out +=`` with ``accumulate``) on MKL, ``op`` transposing
    where asked, when MKL is the backend and the product qualifies: NumPy float32/float64
    arrays of one dtype, C-contiguous, ``out`` writeable and apart from both inputs, shapes
    that agree, at least :data:`MKL_MIN_MACS` multiply-adds. Returns True when MKL ran it;
    False, having done nothing, otherwise (the caller then runs its NumPy product)."""
    if backend() != "mkl" or type(a) is not np.ndarray or type(b) is not np.ndarray \
            or type(out) is not np.ndarray:
        return False
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb or out.shape != (m, n) or m * n * k < MKL_MIN_MACS:
        return False
    dtype = out.dtype
    if dtype not in (np.float32, np.float64) or a.dtype != dtype or b.dtype != dtype:
        return False
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous
            and out.flags.writeable) or np.may_share_memory(out, a) \
            or np.may_share_memory(out, b):
        return False
    from backprop import bf16
    from backprop.blas import MACS_PER_THREAD

    mkl = _STATE["mkl"]
    threads = max(1, min(m * n * k // MACS_PER_THREAD, mkl["max_threads"]))
    if getattr(bf16._LOCAL, "threads", None) != threads:  # (the count bf16 also tracks)
        mkl["set_threads"](threads)
        bf16._LOCAL.threads = threads
    gemm = mkl["sgemm"] if dtype == np.float32 else mkl["dgemm"]
    gemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
         m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1],
         1.0 if accumulate else 0.0, out.ctypes.data, n)
    return True
