"""Dense layers' float32/float64 matrix products: on MKL where it is installed, else on
backprop's own tiled kernels where they are faster than NumPy's BLAS.

A Dense layer runs three products per training step: ``Z = X Wᵀ`` (forward),
``∂W (+)= δᵀ X`` and ``∂X = δ W`` (backward). NumPy runs them on the BLAS it was built with
(OpenBLAS in the PyPI wheels). This module may run them instead on

- ``mkl``: MKL's ``cblas_sgemm``/``cblas_dgemm``, where the ``mkl`` wheel is installed (the
  ``backprop[mkl]`` extra; ``[bf16]`` installs it too), on the GNU OpenMP threads that
  backprop's kernels use (MKL is loaded as :mod:`backprop.bf16` loads it). ``∂W``
  accumulated into an existing gradient uses MKL's ``beta = 1``. MKL is called from
  compiled code (a Numba function that checks the operands and calls ``cblas_?gemm`` by
  its registered symbol): a call costs about what NumPy's own does, not the microseconds
  of a ctypes call. On the 2-core AVX-512 VM MKL ran the ``X Wᵀ`` products 1.5–2× as fast
  as OpenBLAS from 2¹⁸ multiply-adds (OpenBLAS's form for it is slow on small shapes), the
  others 1.1–1.9× from 2²⁰, within 0.86–1.13× between (``benchmarks/README.md``, "Matrix
  products on MKL").
- ``numba``: :mod:`backprop.kernels.matmul`, products tiled in vector registers on the
  kernels' Numba threads (``Z = X Wᵀ`` through a transposed copy of the batch), for the
  shapes of a small model's step where they beat OpenBLAS: the forward product below
  :data:`NUMBA_FORWARD_MAX_MACS` multiply-adds, ``∂W`` and ``∂X`` from
  :data:`NUMBA_BACKWARD_MIN_MACS` to below :data:`NUMBA_MAX_MACS` (float64 multiply-adds
  weigh :data:`NUMBA_FLOAT64_WEIGHT` toward the upper bounds), all three only for a layer
  of at least :data:`NUMBA_MIN_OUTPUTS` outputs. The other products stay on NumPy's BLAS,
  whose packed, cache-blocked kernels win there (``benchmarks/README.md``, "Matrix
  products in compiled tiles").

Which products. At least :data:`MIN_MACS` multiply-adds: the ones OpenBLAS would split over
its threads (more than ``blas.SINGLE_THREADED_MACS`` = 2¹⁸); the smaller ones OpenBLAS runs
on one thread, where it was as fast as MKL or the tiles or faster (a call of either costs a
fraction of a microsecond more). So a model whose products run on MKL needs no OpenBLAS
thread cap (``Sequential`` takes none, see :func:`runs`).

Selection, read once per process (or :func:`set_backend`): ``BACKPROP_GEMM`` = ``auto``
(MKL where installed; else the tiles on a CPU with AVX-512, the only kind they were
measured on; else NumPy) | ``numpy`` | ``mkl`` (an error where MKL cannot load) | ``numba``
(the tiles on any CPU; an error under ``NUMBA_DISABLE_JIT=1``). Results differ from
NumPy's in rounding only (another summation order). Under ``NUMBA_DISABLE_JIT=1`` there is
no compiled code: ``auto`` means NumPy.

Thread-safe: MKL's gemm may be called from several threads at once (the compiled caller
releases the GIL); each product sets the calling thread's MKL thread count
(``MKL_Set_Num_Threads_Local``) to one thread per ``blas.MACS_PER_THREAD`` multiply-adds,
as the OpenBLAS cap does (at most the calling thread's Numba thread count, which
:mod:`backprop.thread_governor` may lower), and puts the count it found back afterwards.
The tiles take as many Numba threads (at most the calling thread's
``numba.get_num_threads()``), release the GIL, and keep their scratch (the transposed
batch) per calling thread.
"""
from __future__ import annotations

import ctypes
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from backprop import blas, checks
from backprop.kernels import matmul

__all__ = ["BACKENDS", "MIN_MACS", "NUMBA_MAX_MACS", "NUMBA_BACKWARD_MIN_MACS",
           "NUMBA_FORWARD_MAX_MACS", "NUMBA_FLOAT64_WEIGHT", "NUMBA_MIN_OUTPUTS", "backend",
           "set_backend", "runs", "product"]

BACKENDS = ("auto", "numpy", "mkl", "numba")

MIN_MACS = blas.SINGLE_THREADED_MACS + 1
"""The least multiply-adds of a product run on MKL or the tiles: the smaller ones stay on
NumPy's BLAS, which runs them on one thread by itself."""

NUMBA_MAX_MACS = 1 << 24
"""A float32 ``∂W`` or ``∂X`` product runs on the tiles (``numba``) below this many
multiply-adds (float64 ones weigh :data:`NUMBA_FLOAT64_WEIGHT` each)."""

NUMBA_BACKWARD_MIN_MACS = 1 << 20
"""The least multiply-adds of a ``∂W`` or ``∂X`` product run on the tiles: below, their
short sums (a batch of 64 rows for ``∂W``) and few tiles lost to OpenBLAS."""

NUMBA_FORWARD_MAX_MACS = 1 << 25
"""A float32 forward product ``X Wᵀ`` runs on the tiles (``numba``) below this many
multiply-adds (float64 ones weigh :data:`NUMBA_FLOAT64_WEIGHT` each): OpenBLAS's kernel
for this form is the slow one on small shapes, so the tiles keep it for longer."""

NUMBA_FLOAT64_WEIGHT = 4
"""What a float64 multiply-add counts toward the tiles' upper windows: half the lanes and
twice the bytes per value; the mnist MLP's 256×256 layer (2²³ multiply-adds per product) ran
slower on the tiles in float64 (step 0.98×, 0/14 rounds) while the digits MLP's products
kept their gain (1.06×, 14/14)."""

NUMBA_MIN_OUTPUTS = 16
"""The fewest outputs of a Dense layer whose products run on the tiles: with fewer, ``∂X``
sums over too few terms, ``∂W`` has too few rows of tiles, and the forward product's
transposition of the batch costs as much as the product."""

_SCRATCH_KEEP = 8  # transposed-batch scratch pairs kept per thread (shapes of recent calls)

_STATE: dict = {}
_LOCK = threading.Lock()

# The names under which MKL's functions are registered with LLVM's symbol table before the
# caller is compiled or loaded from Numba's disk cache: the machine code calls them by name,
# so a cached copy links to this process's MKL.
_SYM_SGEMM = "backprop_mkl_cblas_sgemm"
_SYM_DGEMM = "backprop_mkl_cblas_dgemm"
_SYM_THREADS = "backprop_mkl_set_num_threads_local"
_INT_MAX = 2**31 - 1  # MKL's LP64 interface: 32-bit sizes


def _requested() -> str:
    return checks.env_choice("BACKPROP_GEMM", BACKENDS, "auto")


def _load() -> tuple:
    """``(call, error)``: ``call`` = (the compiled caller of MKL's gemm, :func:`_caller`;
    MKL's thread count), or None and ``error`` saying why not."""
    from backprop import bf16

    if numba.config.DISABLE_JIT:
        return None, "NUMBA_DISABLE_JIT=1: no compiled caller for MKL"
    mkl = bf16._mkl()
    if mkl.get("lib") is None:
        return None, mkl["error"]
    lib = mkl["lib"]
    for name in ("sgemm", "dgemm"):
        if getattr(lib, f"cblas_{name}", None) is None:
            return None, f"{mkl['path']} has no cblas_{name}"
    from llvmlite import binding as llvm  # (binding: loaded when MKL is)

    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    llvm.add_symbol(_SYM_SGEMM, address(lib.cblas_sgemm))
    llvm.add_symbol(_SYM_DGEMM, address(lib.cblas_dgemm))
    llvm.add_symbol(_SYM_THREADS, address(lib.MKL_Set_Num_Threads_Local))
    return (_caller(), mkl["max_threads"]), None


def _mkl_call(caller, max_threads):
    """:func:`product`'s call for MKL: the compiled caller, or False where its signatures
    refuse the operands' types."""
    def call(a, b, out, trans_a, trans_b, accumulate, macs):
        try:  # (no more threads than the calling thread's Numba count: thread_governor)
            return caller(a, b, out, trans_a, trans_b, accumulate, blas.MACS_PER_THREAD,
                          min(max_threads, matmul.threads()))
        except TypeError:  # no compiled signature: another dtype, layout, rank, a read-only out
            return False
    return call


_LOCAL = threading.local()
_NO_SCRATCH = {np.dtype(np.float32): np.empty((0, 0), np.float32),
               np.dtype(np.float64): np.empty((0, 0), np.float64)}


def _numba_call(a, b, out, trans_a, trans_b, accumulate, macs):
    """:func:`product`'s call for the tiles (``numba``), within their windows."""
    large = macs if out.itemsize <= 4 else NUMBA_FLOAT64_WEIGHT * macs
    if trans_b:  # Z = X Wᵀ: b is W, its rows the outputs
        if large >= NUMBA_FORWARD_MAX_MACS or b.shape[0] < NUMBA_MIN_OUTPUTS:
            return False
    elif not (NUMBA_BACKWARD_MIN_MACS <= macs and large < NUMBA_MAX_MACS) or \
            a.shape[1] < NUMBA_MIN_OUTPUTS:  # (a is δ: its columns are the outputs)
        return False
    parts = 1
    if macs >= 2 * blas.MACS_PER_THREAD:
        parts = min(macs // blas.MACS_PER_THREAD, matmul.threads())
    empty = _NO_SCRATCH.get(out.dtype)
    if empty is None:
        return False
    if not trans_b:
        return matmul.run(a, b, out, trans_a, False, accumulate, empty, empty, parts)
    # the forward product: this thread's transposed batch and output
    kept = getattr(_LOCAL, "scratch", None)
    if kept is None:
        kept = _LOCAL.scratch = {}
    key = (a.shape[0], a.shape[1], b.shape[0], parts, out.itemsize)
    pair = kept.get(key)
    if pair is None:
        if len(kept) >= _SCRATCH_KEEP:
            del kept[next(iter(kept))]
        shape_x, shape_z = matmul.forward_scratch(a.shape[0], a.shape[1], b.shape[0],
                                                  out.dtype, parts)
        pair = kept[key] = (np.empty(shape_x, out.dtype), np.empty(shape_z, out.dtype))
    return matmul.run(a, b, out, trans_a, True, accumulate, pair[0], pair[1], parts)


def _numba_error() -> str | None:
    """Why the tiles cannot run here, or None."""
    if numba.config.DISABLE_JIT:
        return "NUMBA_DISABLE_JIT=1: no compiled code for the tiled products"
    return None


def _wide_vectors() -> bool:
    """Whether the CPU has AVX-512 (the tiles' 512-bit vectors as one register each)."""
    from llvmlite import binding as llvm

    try:
        return bool(llvm.get_host_cpu_features().get("avx512f"))
    except RuntimeError:  # (LLVM cannot read this CPU's features)
        return False


def _resolve() -> str:
    """The backend in use, decided at the first product (or after set_backend)."""
    with _LOCK:
        if "backend" not in _STATE:
            wanted = _STATE.get("requested") or _requested()
            name = "numpy"
            if wanted in ("auto", "mkl"):
                call, error = _load()
                if call is not None:
                    # one entry: a set_backend elsewhere swaps it whole
                    _STATE["call"] = _mkl_call(*call)
                    name = "mkl"
                elif wanted == "mkl":
                    raise RuntimeError(f"BACKPROP_GEMM=mkl: {error}")
            if name == "numpy" and wanted in ("auto", "numba"):
                error = _numba_error()
                if error is None and (wanted == "numba" or _wide_vectors()):
                    _STATE["call"] = _numba_call
                    name = "numba"
                elif wanted == "numba":
                    raise RuntimeError(f"BACKPROP_GEMM=numba: {error}")
            _STATE["backend"] = name
        name = _STATE["backend"]
    if name != "numpy":
        # The passes may then take no OpenBLAS cap, whose first call would have moved
        # OpenBLAS's parallel jobs onto the kernels' threads (backprop.blas_pool): do that
        # here, or the products OpenBLAS still runs (predict's NaN check, the caller's own)
        # leave its workers spinning against these threads for the products that follow.
        blas.share_pool()
    return name


def backend() -> str:
    """``"mkl"``, ``"numba"`` or ``"numpy"``: what runs the Dense layers' products."""
    return _STATE.get("backend") or _resolve()


def set_backend(name: str) -> str:
    """Choose the products' backend in code (``auto``, ``numpy``, ``mkl`` or ``numba``, as
    ``BACKPROP_GEMM``); returns the one in use."""
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"gemm backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    with _LOCK:
        _STATE.clear()
        _STATE["requested"] = name
    return _resolve()


def runs(dtype) -> bool:
    """Whether the Dense layers' products of ``dtype`` that OpenBLAS would thread run on MKL
    (all of them where the operands are C-contiguous, as the layers' own buffers are; the
    tiles take only some, so OpenBLAS keeps the rest)."""
    return backend() == "mkl" and (dtype == np.float32 or dtype == np.float64)


def _call():
    """The backend's call, or None where NumPy runs the products (the backend resolved
    first if it is not yet)."""
    call = _STATE.get("call")
    if call is None and "backend" not in _STATE:
        backend()
        call = _STATE.get("call")  # (None again if a set_backend elsewhere just cleared it)
    return call


def product(a, b, out, trans_a: bool, trans_b: bool, accumulate: bool = False) -> bool:
    """``out = op(a) op(b)`` (``out +=`` with ``accumulate``), ``op`` transposing where
    asked, on MKL or the tiles when one is the backend and the product qualifies: at least
    :data:`MIN_MACS` multiply-adds (for the tiles, within their windows; not both operands
    transposed, and the forward form ``a bᵀ`` not accumulated), two-dimensional NumPy
    float32/float64 arrays of one dtype, native byte order, C-contiguous, ``out`` writeable
    and apart from both inputs, shapes that agree. Returns True when it ran; False, having
    done nothing, otherwise (the caller then runs its NumPy product)."""
    call = _STATE.get("call") or _call()
    if call is None:
        return False
    if type(a) is not np.ndarray or type(b) is not np.ndarray or type(out) is not np.ndarray \
            or out.ndim != 2 or a.ndim != 2:
        return False
    macs = a.size * out.shape[1]  # (a.size: m·k)
    if macs < MIN_MACS:
        return False
    return call(a, b, out, trans_a, trans_b, accumulate, macs)


def _caller():
    """Compile (or load from Numba's cache) :func:`_run` with one signature per dtype and
    read-only-ness of the inputs (C-contiguous, two-dimensional; anything else is a
    TypeError, which :func:`product` turns into False)."""
    signatures = []
    for dtype in (types.float32, types.float64):
        out = types.Array(dtype, 2, "C")
        for readonly_a in (False, True):
            for readonly_b in (False, True):
                signatures.append(types.boolean(
                    types.Array(dtype, 2, "C", readonly=readonly_a),
                    types.Array(dtype, 2, "C", readonly=readonly_b), out, types.boolean,
                    types.boolean, types.boolean, types.int64, types.int64))
    return numba.njit(signatures, nogil=True, cache=True)(_run)


_I32 = ir.IntType(32)
_PTR = ir.IntType(8).as_pointer()


@intrinsic
def _cblas_gemm(typingctx, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """``cblas_?gemm(RowMajor, ...)`` with ``alpha = 1``, called by its registered symbol;
    ``beta``'s type picks ``sgemm`` (float32) or ``dgemm``; ``a``, ``b``, ``c`` are
    integer addresses."""
    single = beta == types.float32

    def codegen(context, builder, signature, args):
        real = ir.FloatType() if single else ir.DoubleType()
        fnty = ir.FunctionType(ir.VoidType(), [_I32] * 6 + [real, _PTR, _I32, _PTR, _I32,
                                                            real, _PTR, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty,
                                            _SYM_SGEMM if single else _SYM_DGEMM)
        ta, tb, m_, n_, k_, pa, lda_, pb, ldb_, beta_, pc, ldc_ = args
        builder.call(fn, [_I32(101), ta, tb, m_, n_, k_, ir.Constant(real, 1.0),
                          builder.inttoptr(pa, _PTR), lda_, builder.inttoptr(pb, _PTR), ldb_,
                          beta_, builder.inttoptr(pc, _PTR), ldc_])
        return context.get_dummy_value()

    i = types.int32
    return types.void(i, i, i, i, i, types.intp, i, types.intp, i, beta, types.intp,
                      i), codegen


@intrinsic
def _set_threads_local(typingctx, count):
    """``MKL_Set_Num_Threads_Local(count)``: returns the calling thread's count before."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_I32]),
                                            _SYM_THREADS)
        return builder.call(fn, args)
    return types.int32(types.int32), codegen


def _run(a, b, out, trans_a, trans_b, accumulate, macs_per_thread, max_threads):
    """:func:`product` once the operands' types qualify (compiled by :func:`_caller`): the
    shapes agree and none is empty, ``out`` overlaps neither input; then MKL runs it with
    one thread per ``macs_per_thread`` multiply-adds (at most ``max_threads``), the
    calling thread's MKL count restored after."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if k != kb or out.shape[0] != m or out.shape[1] != n or m == 0 or n == 0 or k == 0:
        return False
    if max(m, n, k) > _INT_MAX:
        return False
    # out must not overlap an input (BLAS reads them while it writes)
    start, end = out.ctypes.data, out.ctypes.data + out.size * out.itemsize
    if a.ctypes.data < end and start < a.ctypes.data + a.size * a.itemsize:
        return False
    if b.ctypes.data < end and start < b.ctypes.data + b.size * b.itemsize:
        return False
    threads = max(1, min(m * n * k // macs_per_thread, max_threads))
    before = _set_threads_local(np.int32(threads))
    _cblas_gemm(np.int32(112 if trans_a else 111), np.int32(112 if trans_b else 111),
                np.int32(m), np.int32(n), np.int32(k), a.ctypes.data, np.int32(a.shape[1]),
                b.ctypes.data, np.int32(b.shape[1]), out.dtype.type(1.0 if accumulate else 0.0),
                out.ctypes.data, np.int32(n))
    _set_threads_local(before)
    return True
