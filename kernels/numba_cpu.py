"""Numba CPU kernels: every op of the registry as one fused, parallel pass over memory.

Each public function has the signature and the semantics of the function of the same name in
:mod:`reference`, whose docstring states the math; tests/test_kernels.py holds them to it.
A public function is a thin wrapper: it checks dtypes, shapes and C-contiguity (a clear error
instead of a silent copy), computes host-side scalars (bias corrections, the effective
learning rate) and calls one kernel.

How the kernels are built
- Each kernel is compiled twice (:class:`_Loops`): with ``parallel=True`` (``prange`` over
  Numba's threads) and serially; calls with fewer than :data:`PARALLEL_MIN_ELEMENTS`
  elements run serially, because waking the threads costs more than the work. Both run the
  same loops in the same order, so results never depend on which one ran.
- Compiled lazily, on first use, for the dtypes and the ``None`` pattern of the call (Numba
  specialises on ``None``: an optimizer without momentum has no buffer code at all), and
  cached on disk (``cache=True``), so the next process loads them instead of compiling.
- ``error_model="numpy"``: a division by zero gives inf/NaN as in NumPy instead of raising;
  Python's model puts a test and a branch before every division, which stops LLVM from
  vectorising any loop that divides.
- Activations: one kernel per activation name. The name is a compile-time string constant
  (a closure variable of :func:`_forward_kernel` / :func:`_backward_kernel`), and
  :func:`_activate` / :func:`_derivative` choose their formula by that literal and by the
  element type, so each activation's inner loop holds only its own formula, with constants
  of the array's dtype: branch-free and vectorisable, and a program that uses relu never
  compiles gelu. ``exp``, ``tanh``, the normal CDF (GELU) and ``softplus`` come from
  :mod:`vecmath`, polynomials that vectorise (libm's are scalar calls). Every such call is
  inlined by LLVM (:func:`inline.inlined`): a loop is vectorised only if nothing in it is a
  call, and Numba's own IR inlining compiled several times slower. A kernel that inlines one
  vectorises to the CPU's widest registers (512 bits with AVX-512, where LLVM's default is
  256); the memory-bound kernels without such math (BatchNorm, the optimizers) keep the
  default, which wider vectors do not speed up (docs/design.md).
- Precision: elementwise math runs in the dtype of the arrays, as the reference's does
  (float32 SIMD has twice the lanes of float64, and float32 division and square root cost a
  quarter); every sum over rows or columns accumulates in float64, in a loop of its own so
  that the float32 loop keeps its full vector width. The optimizers, too, compute in the
  parameters' dtype (as PyTorch's do), their coefficients rounded to it once per call
  (:func:`_like_all`); BatchNorm normalises with its statistics rounded to the input's
  dtype, as the reference does.
- Optimizers: the update formulas are the records of :mod:`optimizers`, compiled into one
  loop per record (:func:`_optimizer_kernel`); Numba compiles each variant (which states
  are None) apart, so an optimizer without momentum has no buffer code at all.
- Sums over rows (bias gradient, BatchNorm statistics) never accumulate into one shared
  vector from parallel rows (that races). The rows are cut into chunks whose number depends
  on N alone (:func:`_row_chunks`, never on the thread count); each chunk sums its rows in
  order into its own float64 row of a partial-sum array, and the partials are then added in
  chunk order, in parallel over columns. The result is therefore the same for any number of
  threads, serial or parallel. Partial sums live in a reused scratch buffer
  (:func:`_scratch`): once warm, no kernel allocates.
- In place: Numba marks the array arguments of a ``prange`` body ``noalias`` unless it sees
  an alias inside the body, and LLVM may then move a read of an input after a write to the
  output. Every kernel whose output may be one of its inputs therefore takes an
  output argument that is None when the call is in place (:func:`_separate`), and names
  the alias inside the loop body (``dst = src if out is None else out``), which keeps reads
  before writes. Numba compiles the None case apart, so the in-place loop writes through the
  very pointer it reads: had the alias been a run-time flag, LLVM's overlap check before
  each vectorised loop would see the two arrays overlap and fall back to its scalar loop
  (several times slower in place: docs/design.md).
- ``fastmath``: never ``nnan``/``ninf``/``afn`` (NaN and inf propagate exactly as in the
  reference). The activation kernels use ``{"contract"}`` (FMA); the softmax kernels
  ``{"reassoc", "contract", "nsz", "arcp"}`` so that LLVM may vectorise their row sums, and
  take row maxima with :func:`vecmath.fmax`. Everything else is strict IEEE.
- Low-precision copies (``out_lp``, ``delta_lp``, ``data_lp``; ``kernels/lowp.py``): the
  epilogues and the optimizers store the copy in the loop that stores the float32 value,
  from that very value (:func:`_lowp_bits`): its bits as an integer, then integer arithmetic
  (:func:`lowp.bf16_bits`, :func:`f16_bits`), which vectorises. The copy is a kernel
  argument that is None without one, so Numba compiles the float32-only loop exactly as
  before. Numba has no float16 on the CPU: a float16 copy reaches the kernels as its
  ``int16`` view, whose type selects the float16 formula at compile time (the ``uint16``
  of bfloat16 bits selects bfloat16's). float16 is a GPU format; the CPU kernels write it
  for tests and emulation, by the same one-pass loop.
"""
from __future__ import annotations

import functools
import hashlib
import math
import threading
import types as pytypes
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.caching import FunctionCache
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import activations, inline, lowp, optimizers, reference, vecmath
from .inline import inlined, jit
from .activations import RECORDS, Math
from .optimizers import RECORDS as OPTIMIZERS
from .optimizers import SLOTS, UpdateMath, entry_point, flush_function, slotted
from .reference import ACTIVATIONS, GOLDEN32, NEEDS_Z

_ROW_SUM_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_CONTRACT = {"contract"}  # a·b + c may become one FMA (one rounding instead of two)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ROW_CHUNKS = 32  # at most this many row chunks in a column sum ...
_ROWS_PER_CHUNK = 8  # ... and at least this many rows in each (a function of N alone)
_ROW_GROUP = 4  # a chunk adds its rows to its partial sums four at a time (written out): the
# partial row (float64, often larger than L1) is loaded and stored once per group, not per
# row
PARALLEL_MIN_ELEMENTS_OWN_POOLS = 1 << 19
"""Serial below this many elements while OpenBLAS keeps its own threads (see _Loops)."""
PARALLEL_MIN_ELEMENTS_SHARED_POOL = 1 << 17
"""Serial below this many elements once OpenBLAS's jobs run on Numba's threads
(:mod:`backprop.blas_pool` sets it when it installs): the workers that ran the last product
are awake, and two threads win from here (docs/design.md)."""
PARALLEL_MIN_ELEMENTS = PARALLEL_MIN_ELEMENTS_OWN_POOLS  # smaller calls run serially (_Loops)
_PIPELINE_MIN_ELEMENTS = 1 << 19  # softmax rows pipelined in chunks from here (_pipeline)
_DEPENDENCIES = hashlib.sha256(b"".join(  # see _KernelCache
    Path(module.__file__).read_bytes()
    for module in (inline, vecmath, reference, activations, optimizers, lowp))).hexdigest()


class _Loops:
    """One kernel compiled twice: ``serial`` (``prange`` is ``range``) and ``parallel``.

    Waking Numba's worker threads costs tens of microseconds (more right after a GEMM, while
    OpenBLAS's threads still spin), far more than a small batch takes on one core, so a call
    with fewer than :data:`PARALLEL_MIN_ELEMENTS` elements of work runs serially. The
    threshold is where two threads began to win on a 2-core AVX-512 VM, measured on the
    lightest and the heaviest activation and on Adam (docs/design.md):
    :data:`PARALLEL_MIN_ELEMENTS_OWN_POOLS` while OpenBLAS has its own threads,
    :data:`PARALLEL_MIN_ELEMENTS_SHARED_POOL` once they are Numba's. Both
    versions execute the same loops in the same order (sums are cut into the same fixed
    chunks), so the choice never changes a result. The serial copy of the function gets its
    own qualified name: Numba's on-disk cache keys entries by name and bytecode, not by the
    ``parallel`` flag, and the two would otherwise load each other's machine code.
    """

    __slots__ = ("serial", "parallel")

    def __init__(self, fn, fastmath):
        serial = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                      fn.__defaults__, fn.__closure__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        flags = dict(fastmath=fastmath, error_model="numpy")
        self.serial = _cached(njit(**flags)(serial))
        self.parallel = _cached(njit(parallel=True, **flags)(fn))

    def __call__(self, work: int, *args):
        """Run on ``args``; ``work`` (elements touched) picks serial or parallel."""
        if work < PARALLEL_MIN_ELEMENTS:
            return self.serial(*args)
        return run_parallel(self.parallel, *args)


def run_parallel(fn, *args):
    """``fn(*args)`` for a Numba function compiled with ``parallel=True``: at once from any
    number of threads under the OpenMP and TBB layers, one launch at a time under workqueue
    (see :data:`_PARALLEL`)."""
    if _PARALLEL["serialize"] is False:
        return fn(*args)
    with _PARALLEL["lock"]:
        result = fn(*args)
        if _PARALLEL["serialize"] is None:  # the layer is known after the first launch
            _PARALLEL["serialize"] = _threading_layer() == "workqueue"
    return result


def _threading_layer() -> str | None:
    """The threading layer Numba's parallel kernels run on (None with NUMBA_DISABLE_JIT,
    where no layer is ever started)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


# Numba's workqueue threading layer (chosen where neither TBB nor OpenMP loads) aborts the
# process when two threads launch parallel kernels at once; the OpenMP and TBB layers
# allow it. Under workqueue, parallel launches therefore take turns.
_PARALLEL: dict = {"lock": threading.Lock(), "serialize": None}


class _KernelCache(FunctionCache):
    """Numba's on-disk cache, with one more part in each entry's key: the source of
    :mod:`inline`, :mod:`vecmath`, :mod:`reference`, :mod:`activations`,
    :mod:`optimizers` and :mod:`lowp` (the formulas), whose functions and constants the
    kernels compile in. Numba keys entries by the kernel's own file alone, so an edit of
    those modules would otherwise keep loading stale machine code."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (_DEPENDENCIES,)


def _cached(dispatcher):
    """``dispatcher`` with the on-disk cache of :class:`_KernelCache` (under
    ``NUMBA_DISABLE_JIT=1`` njit returns the Python function itself: nothing to cache)."""
    if hasattr(dispatcher, "py_func"):
        dispatcher._cache = _KernelCache(dispatcher.py_func)
    return dispatcher


def _loops(fastmath=False):
    """Decorator: compile a kernel as :class:`_Loops` (serial and parallel, cached)."""
    return lambda fn: _Loops(fn, fastmath)


# ---------------------------------------------------------------------------------------
# Validation (the wrappers are thin: these checks are all they add)
def _describe(a) -> str:
    if not isinstance(a, np.ndarray):
        return f"a {type(a).__name__}"
    layout = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"a {layout} {a.dtype} array of shape {a.shape}"


def _fail(op: str, name: str, expected: str, a) -> None:
    raise ValueError(
        f"{op}: {name} must be {expected}; got {_describe(a)}. The numba_cpu kernels read and "
        "write raw C-ordered memory: pass NumPy arrays of one float dtype, allocated with "
        "np.empty/np.zeros (or np.ascontiguousarray), with the shapes of the inputs")


def _array(op: str, name: str, a, dtype, shape, out: bool = False) -> None:
    """``a`` is a C-contiguous ``dtype`` ndarray of ``shape`` (writeable when ``out``)."""
    if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
        ok = False
    else:
        flags = a.flags  # one flags object for both tests (each access builds one)
        ok = flags.c_contiguous and (flags.writeable or not out)
    if not ok:
        expected = f"a C-contiguous {'writeable ' if out else ''}{dtype} array of shape {shape}"
        _fail(op, name, expected, a)


def _batch(op: str, name: str, a) -> np.dtype:
    """``a`` is a C-contiguous 2-D float32/float64 ndarray; returns its dtype."""
    if (type(a) is not np.ndarray or a.ndim != 2 or a.dtype not in _FLOATS
            or not a.flags.c_contiguous):
        _fail(op, name, "a C-contiguous 2-D float32 or float64 array (N, M)", a)
    return a.dtype


def _flat(op: str, names: tuple, arrays: tuple) -> list:
    """Optimizer buffers: ``arrays`` (``p``, ``g``, then the states; named ``names``) share
    shape, dtype and C-contiguity, None aside; returns the raveled (1-D view) version of
    each."""
    p = arrays[0]
    if type(p) is not np.ndarray or p.dtype not in _FLOATS:
        _fail(op, "p", "a C-contiguous float32 or float64 array", p)
    dtype, shape = p.dtype, p.shape
    flat = []
    for name, a in zip(names, arrays):
        if a is not None:
            _array(op, name, a, dtype, shape, out=name != "g")
            a = a if a.ndim == 1 else a.reshape(-1)
        flat.append(a)
    return flat


def _separate(op: str, out_name: str, out, src_name: str, src):
    """``out`` for a kernel's output argument, or None when ``out`` is ``src`` (same memory:
    the kernel then writes through ``src``); partial overlap is refused."""
    if out is src:
        return None
    if out.flags.owndata and src.flags.owndata:
        return out  # two arrays that each allocated their memory: apart (and a cheaper test)
    if not np.may_share_memory(out, src):
        return out
    if out.ctypes.data == src.ctypes.data:  # a second view of the same C-ordered buffer
        return None
    raise ValueError(f"{op}: {out_name} overlaps {src_name} without being it; pass "
                     f"{src_name} itself (in place) or a separate buffer")


def _activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------
# Activations, specialised at compile time on the literal name and on the element type
def _literal_name(act):
    return act.literal_value if isinstance(act, types.StringLiteral) else None


def _scalar_type(v):
    """The NumPy scalar type of the float type ``v`` (a Numba type)."""
    return np.float32 if v == types.float32 else np.float64


@functools.lru_cache(maxsize=None)
def _math(scalar) -> Math:
    """The math of the formula builders (``kernels/activations.py``) in compiled code with
    elements of NumPy type ``scalar``: vecmath's vectorisable functions, constants and
    ``alpha`` of that type (a float64 constant would promote float32 arithmetic)."""
    return Math(K=scalar, cast=scalar, where=_select, abs=abs, exp=vecmath.exp,
                expm1=vecmath.expm1, tanh=vecmath.tanh, sigmoid=vecmath.sigmoid,
                softplus=vecmath.softplus, ndtr=vecmath.ndtr, ndtr_pdf=vecmath.ndtr_pdf)


@inline.jit
def _select(c, a, b):
    """``a if c else b``: the ``where`` of the formulas (a select, which vectorises)."""
    return a if c else b


def _activation_impl(act, v, alpha):
    """``σ`` for the literal name ``act`` from its record, with constants of ``v``'s type."""
    record = RECORDS.get(_literal_name(act))
    return None if record is None else record.forward(_math(_scalar_type(v)))


def _derivative_impl(act, s, alpha):
    """``σ'`` for the literal name ``act`` from its record, with constants of ``s``'s type."""
    record = RECORDS.get(_literal_name(act))
    return None if record is None else record.derivative(_math(_scalar_type(s)))


@inlined(_activation_impl)
def _activate(act, v, alpha):
    """``σ(v)``; compiled code runs :func:`_activation_impl`'s function for the literal name,
    inlined. This Python body is what runs under ``NUMBA_DISABLE_JIT=1``."""
    return type(v)(reference.activate(np, np.array([v]), act, alpha)[0])


@inlined(_derivative_impl)
def _derivative(act, s, alpha):
    """``σ'`` from ``s = a`` (σ(z)) or ``s = z`` for activations in NEEDS_Z."""
    a, z = (None, np.array([s])) if act in NEEDS_Z else (np.array([s]), np.array([s]))
    return type(s)(reference.derivative(np, a, z, act, alpha)[0])


def _row_chunks(n: int) -> int:
    """How many row chunks the column sums over ``n`` rows use: it depends on ``n`` only,
    never on the thread count, so every sum is the same on any machine."""
    return max(1, min(_ROW_CHUNKS, n // _ROWS_PER_CHUNK))


class _Scratch(threading.local):
    """One thread's work memory: a byte buffer and the views carved from it."""

    def __init__(self):
        self.memory = np.empty(0, np.uint8)
        self.views = {}


_SCRATCH = _Scratch()
_SCRATCH_VIEWS_KEPT = 64  # views of this many distinct requests are kept for reuse


def _scratch(*specs) -> list:
    """Work arrays, one per ``(shape, dtype)`` in ``specs`` (partial sums, coefficients),
    carved from one buffer that grows to the largest request and is then reused, so that a
    kernel call allocates nothing once warm; the views of a request are kept too (building
    them costs more than a small kernel). The buffer is per thread: a parallel kernel
    releases the GIL, so two threads' calls may run at once."""
    scratch = _SCRATCH
    views = scratch.views.get(specs)
    if views is not None:
        return views
    nbytes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    starts = [0]
    for size in nbytes:
        starts.append(starts[-1] + -(-size // 64) * 64)  # each array 64-byte aligned
    if scratch.memory.size < starts[-1]:
        scratch.memory = np.empty(starts[-1], np.uint8)
        scratch.views = {}
    if len(scratch.views) >= _SCRATCH_VIEWS_KEPT:
        scratch.views = {}
    memory = scratch.memory
    views = [memory[start:start + size].view(dtype).reshape(shape)
             for start, size, (shape, dtype) in zip(starts, nbytes, specs)]
    scratch.views[specs] = views
    return views


@jit
def _chunk_rows(chunk, chunks, n):
    """Rows ``[start, stop)`` of chunk ``chunk`` out of ``chunks`` over ``n`` rows."""
    return chunk * n // chunks, (chunk + 1) * n // chunks


# ---------------------------------------------------------------------------------------
# Low-precision copies (kernels/lowp.py), stored by the loops that store the float32 values
def f16_bits(u):
    """The IEEE binary16 bits of the float32 whose bits are ``u`` (an unsigned 32-bit
    integer): round to nearest, ties to even, as NumPy's ``astype(np.float16)`` (equal to it
    for all 2³² inputs but NaN payloads); overflow → ±inf; float16 subnormals rounded, never
    flushed. NaN stays NaN, made quiet with sign and upper payload kept (as x86's
    ``vcvtps2ph``; NumPy keeps a signalling payload as it is). Plain integer arithmetic, the
    float16 counterpart of :func:`lowp.bf16_bits`: Numba compiles no float16 conversion on
    the CPU, and this one vectorises."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN
        return sign | 0x7E00 | ((a >> 13) & 0x3FF)
    if a >= 0x38800000:  # |x| ≥ 2⁻¹⁴: normal in binary16, or overflow (the carry may reach it)
        return sign | min((a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13, 0x7C00)
    # a binary16 subnormal or zero: the significand (implicit bit set) shifted down to units
    # of 2⁻²⁴, rounded to even; float32 subnormals and anything below 2⁻²⁵ give 0 (the shift
    # is capped where that holds, below the width of the integer)
    shift = min(126 - (a >> 23), 31)
    m = (a & 0x7FFFFF) | 0x800000
    return sign | ((m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift)


@intrinsic
def _float_bits(typingctx, v):
    """The bits of the float32 ``v`` as a uint32 (a bitcast: no scalar ``view`` in Numba)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(v), codegen


_bf16_bits_compiled = jit(lowp.bf16_bits)
_f16_bits_compiled = jit(f16_bits)
_LOWP_FORMULAS = {  # the element type of the array the kernel stores into -> its formula
    types.uint16: jit(lambda out, v: _bf16_bits_compiled(_float_bits(v))),
    types.int16: jit(lambda out, v: _f16_bits_compiled(_float_bits(v))),  # float16's view
}


def _lowp_impl(out, v):
    if v != types.float32 or not isinstance(out, types.Array):
        return None
    return _LOWP_FORMULAS.get(out.dtype)


@inlined(_lowp_impl)
def _lowp_bits(out, v):
    """The bits that the low-precision array ``out`` (``uint16``: bfloat16; ``int16``: the
    view of a float16 array) stores for the float32 value ``v``, as ``out``'s type. Compiled
    code runs the formula for ``out``'s element type, inlined; this Python body is what runs
    under ``NUMBA_DISABLE_JIT=1``."""
    u = int(np.float32(v).view(np.uint32))
    bits = lowp.bf16_bits(u) if out.dtype == np.uint16 else f16_bits(u)
    return np.array(bits, np.uint16).view(out.dtype)[()]


def _lowp_arg(op: str, name: str, out_lp, source, *others):
    """``out_lp`` as the kernels take it (after :func:`reference.check_lowp` against the
    float32 ``source`` and the call's ``others``): the ``uint16`` array of bfloat16 bits as
    it is, a float16 array as its ``int16`` view (see the module docstring); None stays."""
    if out_lp is None:
        return None
    reference.check_lowp(op, name, out_lp, source, *others)
    return out_lp if out_lp.dtype == np.uint16 else out_lp.view(np.int16)


# ---------------------------------------------------------------------------------------
# 1-2. Dense epilogues
def _forward_kernel(act: str):
    write_z = act in NEEDS_Z

    @_loops(fastmath=_CONTRACT)
    def kernel(z, b, out_arg, alpha, out_lp=None):
        n, m = z.shape
        for i in prange(n):
            out = z if out_arg is None else out_arg
            for j in range(m):
                v = z[i, j]
                if b is not None:
                    v += b[j]
                    if write_z:
                        z[i, j] = v
                y = _activate(act, v, alpha)
                out[i, j] = y
                if out_lp is not None:
                    out_lp[i, j] = _lowp_bits(out_lp, y)

    return kernel


def _backward_kernel(act: str):
    @_loops(fastmath=_CONTRACT)
    def kernel(da, s, alpha, delta_arg, db, accumulate, partial, delta_lp=None):
        n, m = da.shape
        if db is None:
            for i in prange(n):
                delta = da if delta_arg is None else delta_arg
                for j in range(m):
                    d = da[i, j] * _derivative(act, s[i, j], alpha)
                    delta[i, j] = d
                    if delta_lp is not None:
                        delta_lp[i, j] = _lowp_bits(delta_lp, d)
            return
        chunks = partial.shape[0]
        for chunk in prange(chunks):
            delta = da if delta_arg is None else delta_arg
            start, stop = _chunk_rows(chunk, chunks, n)
            for j in range(m):
                partial[chunk, j] = 0.0
            for i in range(start, stop):
                for j in range(m):
                    d = da[i, j] * _derivative(act, s[i, j], alpha)
                    delta[i, j] = d
                    if delta_lp is not None:
                        delta_lp[i, j] = _lowp_bits(delta_lp, d)
                if (i - start) % _ROW_GROUP == _ROW_GROUP - 1:  # apart: float64 sums in the
                    for j in range(m):  # loop above would halve its lanes
                        partial[chunk, j] += (float(delta[i - 3, j]) + delta[i - 2, j]) \
                            + (float(delta[i - 1, j]) + delta[i, j])
            for i in range(stop - (stop - start) % _ROW_GROUP, stop):
                for j in range(m):
                    partial[chunk, j] += delta[i, j]
        for j in prange(m):
            total = 0.0
            for chunk in range(chunks):
                total += partial[chunk, j]
            db[j] = db[j] + total if accumulate else total

    return kernel


_FORWARD: dict = {}
_BACKWARD: dict = {}


def _prepared(checked_call):
    """The ``prepare`` of an op (see ``backprop.kernels.prepare``): ``checked_call`` checks
    the op's arguments and returns ``(kernel, arguments)``; the prepared run is the kernel
    call alone, on those arguments."""
    def prepare(*args, **kwargs):
        kernel, arguments = checked_call(*args, **kwargs)
        return functools.partial(kernel, *arguments)
    return prepare


def bias_act_forward(z, b, out, act: str, alpha: float = 0.0, out_lp=None):
    """``out ← σ(z + b)`` (and ``z ← z + b`` for NEEDS_Z activations with a bias), and
    ``out_lp ← lowp(out)`` when given; see :func:`reference.bias_act_forward`. One pass over
    rows in parallel."""
    kernel, arguments = _bias_act_forward_call(z, b, out, act, alpha, out_lp)
    kernel(*arguments)
    return out


def _bias_act_forward_call(z, b, out, act, alpha=0.0, out_lp=None):
    op = "bias_act_forward"
    dtype = _batch(op, "z", z)
    if b is not None:
        _array(op, "b", b, dtype, z.shape[1:])
    _array(op, "out", out, dtype, z.shape, out=True)
    kernel = _FORWARD.get(act)
    if kernel is None:
        _activation(act)
        kernel = _FORWARD[act] = _forward_kernel(act)
    separate = _separate(op, "out", out, "z", z)
    if out_lp is None:
        return kernel, (z.size, z, b, separate, float(alpha))
    return kernel, (z.size, z, b, separate, float(alpha),
                    _lowp_arg(op, "out_lp", out_lp, out, z, b))


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False,
                      delta_lp=None):
    """``δ = dA ⊙ σ'`` and ``db (+)= Σ_rows δ``, and ``delta_lp ← lowp(δ)`` when given; see
    :func:`reference.bias_act_backward`. ``db`` is summed in float64 per column, threads
    owning blocks of columns."""
    kernel, arguments = _bias_act_backward_call(da, a, z, act, alpha, delta_out, db_out,
                                                accumulate, delta_lp)
    kernel(*arguments)
    return delta_out


def _bias_act_backward_call(da, a, z, act, alpha, delta_out, db_out=None, accumulate=False,
                            delta_lp=None):
    op = "bias_act_backward"
    dtype = _batch(op, "da", da)
    kernel = _BACKWARD.get(act)
    if kernel is None:
        _activation(act)
        kernel = _BACKWARD[act] = _backward_kernel(act)
    source, name = (z, "z") if act in NEEDS_Z else (a, "a")
    _array(op, name, source, dtype, da.shape)
    _array(op, "delta_out", delta_out, dtype, da.shape, out=True)
    if db_out is not None:
        _array(op, "db_out", db_out, dtype, da.shape[1:], out=True)
    separate = _separate(op, "delta_out", delta_out, "da", da)
    lp = _lowp_arg(op, "delta_lp", delta_lp, delta_out, da, source, db_out)
    partial = None if db_out is None else \
        _scratch(((_row_chunks(da.shape[0]), da.shape[1]), np.float64))[0]
    arguments = (da.size, da, source, float(alpha), separate, db_out, bool(accumulate), partial)
    return kernel, arguments if lp is None else arguments + (lp,)


bias_act_forward.prepare = _prepared(_bias_act_forward_call)
bias_act_backward.prepare = _prepared(_bias_act_backward_call)


# ---------------------------------------------------------------------------------------
# Softmax (the layer) and softmax cross-entropy (the loss): rows in parallel, in chunks of
# rows (:func:`_pipeline`). A row is read from memory once, by the pass that takes its
# maximum; its later passes find it in L1. In a large call, taking rows one by one stalls
# the core on that read between two rows' arithmetic, so each chunk is *pipelined*: the
# next row's maximum is read in between the blocks of the current row's exponentials
# (:func:`_exp_row`), where the out-of-order core overlaps the loads with the arithmetic.
# A call small enough to run serially finds its rows in cache, and there rows in order are
# faster, so such calls keep that order (:func:`_pipeline`; figures in docs/design.md).
_EXP_ROW_BLOCK = 256  # elements of the current row per block (the fastest of 128, 256, 512)


@njit(inline="always", **inline.FLAGS)
def _row_max(x, i):
    """``max_j x[i, j]`` (NaNs skipped); the row must not be empty. (Inlined into the kernel
    as Numba IR, so that its loop is vectorised there, knowing the kernel's arrays.)"""
    top = x[i, 0]  # of x's dtype, so that exp runs in it
    # from column 0 again (max is idempotent): over columns 1.. the trip count of a row of
    # 64, 128 or 256 is one short of a whole number of vector steps, and the remainder ran
    # as a scalar chain of maxnums, at twice the time of the whole row
    for j in range(x.shape[1]):  # a NaN is skipped, but exp(NaN - top) makes the row NaN
        top = vecmath.fmax(top, x[i, j])
    return top


@njit(inline="always", **inline.FLAGS)
def _exp_row(x, i, top, dst, ahead):
    """``dst[i, :] = exp(x[i, :] - top)``; returns :func:`_row_max` of row ``ahead``, read
    block by block in between, or ``top`` if ``ahead < 0``. ``dst`` may be ``x``. Column
    indices of the blocks are unsigned: a signed one that LLVM cannot prove nonnegative
    keeps Numba's negative-index wraparound, and the loop then gathers instead of loading
    (and the remainder's maximum then trips an assertion in LLVM 22's loop vectoriser)."""
    m = x.shape[1]
    if ahead < 0:
        for j in range(m):
            dst[i, j] = vecmath.exp(x[i, j] - top)
        return top
    blocks = m // _EXP_ROW_BLOCK
    following = x[ahead, 0]
    for block in range(blocks):  # fixed trip counts: no remainder loops in the blocks
        start = block * _EXP_ROW_BLOCK
        for k in range(_EXP_ROW_BLOCK):
            dst[i, np.uint64(start + k)] = vecmath.exp(x[i, np.uint64(start + k)] - top)
        for k in range(_EXP_ROW_BLOCK):  # apart: one loop doing both does not vectorise
            following = vecmath.fmax(following, x[ahead, np.uint64(start + k)])
    start = blocks * _EXP_ROW_BLOCK
    for k in range(m - start):
        dst[i, np.uint64(start + k)] = vecmath.exp(x[i, np.uint64(start + k)] - top)
    for k in range(m - start):
        following = vecmath.fmax(following, x[ahead, np.uint64(start + k)])
    return following


@njit(inline="always", **inline.FLAGS)
def _chunk_schedule(chunk, chunks, n, pipelined):
    """Rows ``[start, stop)`` of a softmax kernel's chunk: a fixed chunk of rows when
    pipelined, else row ``chunk`` alone (the kernel then has one chunk per row)."""
    return _chunk_rows(chunk, chunks, n) if pipelined else (chunk, chunk + 1)


@njit(inline="always", **inline.FLAGS)
def _row_ahead(i, stop, pipelined):
    """The row whose maximum :func:`_exp_row` reads while it computes row ``i``'s
    exponentials: the next one of the chunk (row ``i`` itself at its end), or -1 for none."""
    return min(i + 1, stop - 1) if pipelined else -1


def _softmax_kernel(pipelined: bool):
    @_loops(fastmath=_ROW_SUM_FASTMATH)
    def kernel(x, chunks, out_arg):
        n, m = x.shape
        if m == 0:
            return
        for chunk in prange(chunks):
            out = x if out_arg is None else out_arg
            start, stop = _chunk_schedule(chunk, chunks, n, pipelined)
            following = _row_max(x, start) if pipelined else x[start, 0]
            for i in range(start, stop):
                top = following if pipelined else _row_max(x, i)
                following = _exp_row(x, i, top, out, _row_ahead(i, stop, pipelined))
                total = 0.0
                for j in range(m):  # apart: a float64 sum in the loop above would halve its lanes
                    total += out[i, j]
                inv = _like(1.0 / total, x)  # of x's dtype: float64 math would halve the lanes too
                for j in range(m):
                    out[i, j] = out[i, j] * inv
    return kernel


_SOFTMAX = {pipelined: _softmax_kernel(pipelined) for pipelined in (False, True)}


def _pipeline(x):
    """``(chunks, pipelined)`` for a softmax kernel over ``x``: a large call is pipelined in
    the fixed chunks of :func:`_row_chunks`; a small one takes its rows one by one."""
    if x.size >= _PIPELINE_MIN_ELEMENTS:
        return _row_chunks(x.shape[0]), True
    return x.shape[0], False


def softmax_forward(x, out):
    """Row softmax; see :func:`reference.softmax_forward`. ``out`` may be ``x``."""
    op = "softmax_forward"
    dtype = _batch(op, "x", x)
    _array(op, "out", out, dtype, x.shape, out=True)
    chunks, pipelined = _pipeline(x)
    _SOFTMAX[pipelined](x.size, x, chunks, _separate(op, "out", out, "x", x))
    return out


@_loops(fastmath=_ROW_SUM_FASTMATH)
def _softmax_backward(dy, y, out_arg):
    n, m = dy.shape
    for i in prange(n):
        out = dy if out_arg is None else out_arg
        dot = 0.0
        for j in range(m):
            dot += float(dy[i, j]) * y[i, j]
        for j in range(m):
            out[i, j] = y[i, j] * (dy[i, j] - dot)


def softmax_backward(dy, y, out):
    """``dx = y ⊙ (dy - Σ dy·y)`` per row; see :func:`reference.softmax_backward`."""
    op = "softmax_backward"
    dtype = _batch(op, "dy", dy)
    _array(op, "y", y, dtype, dy.shape)
    _array(op, "out", out, dtype, dy.shape, out=True)
    _softmax_backward(dy.size, dy, y, _separate(op, "out", out, "dy", dy))
    return out


def _softmax_xent_kernel(pipelined: bool):
    @_loops(fastmath=_ROW_SUM_FASTMATH)
    def kernel(logits, labels, smoothing, scale, chunks, grad_arg, loss):
        n, c = logits.shape
        if c == 0:  # no label is valid
            loss[:] = np.nan
            return
        off = smoothing / c  # the smoothed target of every class; the label's gets 1 - ε more
        miss, hit, step = _like(off, logits), _like(off + (1.0 - smoothing), logits), \
            _like(scale, logits)
        for chunk in prange(chunks):
            grad = logits if grad_arg is None else grad_arg
            start, stop = _chunk_schedule(chunk, chunks, n, pipelined)
            following = _row_max(logits, start) if pipelined else logits[start, 0]
            for i in range(start, stop):
                top = following if pipelined else _row_max(logits, i)
                ahead = _row_ahead(i, stop, pipelined)
                label = np.int64(labels[i])
                if label < 0 or label >= c:  # the caller validates labels: never read past
                    loss[i] = np.nan
                    for k in range(c):
                        grad[i, k] = np.nan
                    if pipelined:
                        following = _row_max(logits, ahead)
                    continue
                picked = logits[i, label] - top
                shifted_sum = 0.0
                if smoothing != 0.0:
                    for k in range(c):
                        shifted_sum += logits[i, k] - top
                # grad may be logits: each logit is read before it is replaced
                following = _exp_row(logits, i, top, grad, ahead)
                total = 0.0
                for k in range(c):
                    total += grad[i, k]
                value = math.log(total) - (1.0 - smoothing) * picked
                if smoothing != 0.0:  # guarded: 0 · (-inf) would turn a masked logit into NaN
                    value -= off * shifted_sum
                loss[i] = value
                inv = _like(1.0 / total, logits)  # the last loop in the logits' dtype, as above
                for k in range(c):
                    target = hit if k == label else miss
                    grad[i, k] = step * (grad[i, k] * inv - target)
    return kernel


_SOFTMAX_XENT = {pipelined: _softmax_xent_kernel(pipelined) for pipelined in (False, True)}


def softmax_xent(logits, labels, smoothing: float, scale: float, grad_out, loss_out):
    """Softmax cross-entropy, loss and gradient in one pass per row; see
    :func:`reference.softmax_xent`. A label outside ``[0, C)`` (which the caller must
    reject first) yields a NaN row instead of an out-of-bounds read."""
    kernel, arguments = _softmax_xent_call(logits, labels, smoothing, scale, grad_out, loss_out)
    kernel(*arguments)
    return loss_out


def _softmax_xent_call(logits, labels, smoothing, scale, grad_out, loss_out):
    op = "softmax_xent"
    dtype = _batch(op, "logits", logits)
    n = logits.shape[0]
    if (type(labels) is not np.ndarray or labels.dtype.kind not in "iu"
            or labels.shape != (n,) or not labels.flags.c_contiguous):
        _fail(op, "labels", f"a C-contiguous integer array of shape {(n,)}", labels)
    _array(op, "grad_out", grad_out, dtype, logits.shape, out=True)
    _array(op, "loss_out", loss_out, dtype, (n,), out=True)
    chunks, pipelined = _pipeline(logits)
    return _SOFTMAX_XENT[pipelined], (logits.size, logits, labels, float(smoothing),
                                      float(scale), chunks,
                                      _separate(op, "grad_out", grad_out, "logits", logits),
                                      loss_out)


softmax_xent.prepare = _prepared(_softmax_xent_call)


# ---------------------------------------------------------------------------------------
# 4. Optimizer updates: one in-place pass over flat buffers per record of
# kernels/optimizers.py, in the parameters' dtype. Every scalar (1 - β, lr / (1 - β1ᵗ), ...)
# is computed on the host as a Python float (the record's ``arguments``) and rounded to that
# dtype once, before the loop (:func:`_like_all`): a float64 scalar inside the loop would
# promote the float32 math to float64, which halves the SIMD lanes and makes division and
# sqrt several times slower; the reference's float32 arithmetic rounds the same scalars the
# same way. Strict IEEE arithmetic (no fastmath), as the reference's.
def _like(x, a):
    """The scalar ``x`` rounded to the element type of the array ``a``."""
    return a.dtype.type(x)


@overload(_like)
def _like_impl(x, a):
    if a.dtype == types.float32:
        return lambda x, a: np.float32(x)
    return lambda x, a: np.float64(x)


def _like_all(values, a):
    """The tuple ``values`` with each float rounded to the element type of the array ``a``
    (booleans stay)."""
    return tuple(a.dtype.type(v) if isinstance(v, float) else v for v in values)


@intrinsic
def _round_floats(typingctx, values, a):
    """:func:`_like_all` in compiled code: one conversion per float of the tuple."""
    if not isinstance(values, types.BaseTuple) or not isinstance(a, types.Array):
        return None
    rounded = types.Tuple([a.dtype if isinstance(t, types.Float) else t for t in values])

    def codegen(context, builder, signature, args):
        items = cgutils.unpack_tuple(builder, args[0], len(values))
        return context.make_tuple(builder, rounded, [
            context.cast(builder, v, t, r) for v, t, r in zip(items, values, rounded)])

    return rounded(values, a), codegen


@overload(_like_all)
def _like_all_impl(values, a):
    return lambda values, a: _round_floats(values, a)


_STRICT = dict(error_model="numpy")  # the optimizers' arithmetic: no fastmath flag


@functools.lru_cache(maxsize=None)
def _formula(name: str, scalar):
    """The update of optimizer record ``name`` for elements of NumPy type ``scalar``, compiled
    in the kernels' fixed form (:func:`optimizers.slotted`); Numba specialises it on which
    slots are None, pruning the branches of the states not kept."""
    record = OPTIMIZERS[name]
    flush = flush_function(scalar, njit(inline="always", **_STRICT))
    m = UpdateMath(K=scalar, where=_select, sqrt=np.sqrt, maximum=_maximum, flush=flush)
    return njit(**_STRICT)(slotted(njit(**_STRICT)(record.update(m)), len(record.states)))


@jit
def _maximum(a, b):
    """``np.maximum`` of two scalars: ``b`` where it is larger or NaN."""
    return b if b > a or b != b else a


@jit
def _at(a, i):
    """Element ``i`` of a state buffer, or None for a state not kept (``a`` None)."""
    return None if a is None else a[i]


@jit
def _put(a, i, x):
    if a is not None:
        a[i] = x


def _update(name, p, g, s0, s1, s2, c):
    """One element's update by the formula of optimizer record ``name`` (a literal in
    compiled code, where :func:`_update_impl` picks the formula); this Python body is what
    runs under ``NUMBA_DISABLE_JIT=1``."""
    return _formula(name, type(p))(p, g, s0, s1, s2, c)


@overload(_update, prefer_literal=True, jit_options=_STRICT)
def _update_impl(name, p, g, s0, s1, s2, c):
    if not isinstance(name, types.StringLiteral) or name.literal_value not in OPTIMIZERS:
        return None
    formula = _formula(name.literal_value, _scalar_type(p))
    return lambda name, p, g, s0, s1, s2, c: formula(p, g, s0, s1, s2, c)


def _optimizer_kernel(name: str):
    """The loop of optimizer record ``name``: ``(p, s) = update(p, g, s, c)`` per element,
    ``c`` rounded to ``p``'s dtype first; unused state slots are None.

    The formula is called twice on the same loaded values, the states taken from the first
    call and ``p`` from the second: inlined, LLVM computes it once, but in this order: the
    states, their stores, then the rest of ``p``'s arithmetic (sqrt, division) and its store.
    Storing every value at the end of the iteration instead made the loop much slower for
    buffers of some sizes (multiples of 2 MB, as the buffers of one call are allocated
    alike), which the hand-written loops, storing each state as soon as computed, were not."""
    @_loops()
    def kernel(p, g, s0, s1, s2, args, data_lp=None):
        c = _like_all(args, p)
        for i in prange(p.size):
            w, d, a0, a1, a2 = p[i], g[i], _at(s0, i), _at(s1, i), _at(s2, i)
            _, x0, x1, x2 = _update(name, w, d, a0, a1, a2, c)
            _put(s0, i, x0)
            _put(s1, i, x1)
            _put(s2, i, x2)
            x = _update(name, w, d, a0, a1, a2, c)[0]
            p[i] = x
            if data_lp is not None:
                data_lp[i] = _lowp_bits(data_lp, x)
    return kernel


def _optimizer_op(record):
    """The op of an optimizer record: validation, then its kernel on raveled buffers."""
    kernel = _optimizer_kernel(record.name)
    names = ("p", "g") + record.states
    unused = (None,) * (SLOTS - len(record.states))

    def run(p, g, states, scalars, flags, data_lp=None):
        flat = _flat(record.op, names, (p, g) + states)
        if data_lp is None:
            kernel(p.size, *flat, *unused, scalars + flags)
        else:
            lp = _lowp_arg(record.op, "data_lp", data_lp, p, g, *states)
            kernel(p.size, *flat, *unused, scalars + flags, lp.reshape(-1))

    return kernel, entry_point(record, run, f"reference.{record.op} in one parallel pass over "
                               f"the flat buffers, from the formula of kernels/optimizers.py "
                               f"({record.name!r}).")


# the kernels as _sgd, _adam, ... and the ops as sgd_step, adam_step, ...
for _record in OPTIMIZERS.values():
    globals()[f"_{_record.name}"], globals()[_record.op] = _optimizer_op(_record)
del _record


# ---------------------------------------------------------------------------------------
# 5. Dropout: the counter hash of reference.dropout, in 32-bit integer lanes
@intrinsic
def _keep_bit(typingctx, index, key, threshold):
    """``mix32((index · φ) ^ key) >> 8 >= threshold`` in 32-bit integer arithmetic, the mask
    bit of :func:`reference.dropout`. Numba widens uint32 arithmetic to 64 bits, and x86 has
    no 64-bit vector multiply before AVX-512: written with uint64s, the hash ran one element
    at a time. In i32 IR it vectorises (``vpmulld``)."""
    if not isinstance(index, types.Integer) or key != types.uint32 or threshold != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        i, k, t = args
        h = builder.trunc(i, i32) if i.type.width > 32 else builder.zext(i, i32)
        h = builder.xor(builder.mul(h, ir.Constant(i32, GOLDEN32)), k)
        for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            h = builder.mul(builder.xor(h, builder.lshr(h, ir.Constant(i32, shift))),
                            ir.Constant(i32, factor))
        h = builder.xor(h, builder.lshr(h, ir.Constant(i32, 16)))
        return builder.icmp_unsigned(">=", builder.lshr(h, ir.Constant(i32, 8)), t)

    return types.boolean(index, key, threshold), codegen


_keep_bit_compiled = jit(lambda index, key, threshold: _keep_bit(index, key, threshold))


@inlined(lambda index, key, threshold: _keep_bit_compiled)
def _dropout_keep(index, key, threshold):
    """The mask bit of element ``index`` (:func:`_keep_bit` in compiled code)."""
    return reference.mix32(int(index) * GOLDEN32 ^ int(key)) >> 8 >= threshold


@_loops()
def _dropout(x, key, threshold, scale, out_arg):
    scale = _like(scale, x)  # x · scale in x's dtype, as the reference's x.dtype.type(scale)
    for i in prange(x.size):
        out = x if out_arg is None else out_arg
        kept = x[i] * scale  # taken unconditionally: a select, not a masked load
        out[i] = kept if _dropout_keep(i, key, threshold) else 0.0


def dropout(x, key: int, threshold: int, scale: float, out):
    """Inverted dropout with the counter-hash mask of :func:`reference.dropout` (the same
    mask bit for bit); ``out`` may be ``x``."""
    op = "dropout"
    if type(x) is not np.ndarray or x.dtype not in _FLOATS or not x.flags.c_contiguous:
        _fail(op, "x", "a C-contiguous float32 or float64 array", x)
    _array(op, "out", out, x.dtype, x.shape, out=True)
    separate = _separate(op, "out", out, "x", x)
    _dropout(x.size, x.reshape(-1), np.uint32(key & 0xFFFFFFFF), np.uint32(threshold),
             float(scale), None if separate is None else separate.reshape(-1))
    return out


# ---------------------------------------------------------------------------------------
# 6. BatchNorm (training mode): per-feature sums from row-chunk partials, then one pass.
# x̂ is never stored: the backward pass recomputes it from x (reference.batchnorm_normalized).
# A second (N, M) output stream cost more than the whole rest of the forward pass.
@njit(inline="always", **inline.FLAGS)
def _normalized(x, i, j, mean, invstd):
    """``x̂[i, j] = (x[i, j] - μ[j]) r[j]`` in x's dtype: :func:`reference.batchnorm_normalized`
    for one element, the same operations in the forward pass and the backward pass."""
    return (x[i, j] - mean[j]) * invstd[j]


@_loops()
def _batchnorm_forward(x, gamma, beta, eps, out, mean_out, var_out, invstd_out, partial):
    n, m = x.shape
    chunks = partial.shape[0]
    # shifted sums Σ(x - x₀), Σ(x - x₀)² in float64: no cancellation when |mean| ≫ std
    for chunk in prange(chunks):
        start, stop = _chunk_rows(chunk, chunks, n)
        for j in range(m):
            partial[chunk, 0, j] = 0.0
            partial[chunk, 1, j] = 0.0
        for i in range(start, stop - _ROW_GROUP + 1, _ROW_GROUP):  # see _ROW_GROUP
            for j in range(m):
                x0 = float(x[0, j])
                t0, t1 = float(x[i, j]) - x0, float(x[i + 1, j]) - x0
                t2, t3 = float(x[i + 2, j]) - x0, float(x[i + 3, j]) - x0
                partial[chunk, 0, j] += (t0 + t1) + (t2 + t3)
                partial[chunk, 1, j] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
        for i in range(stop - (stop - start) % _ROW_GROUP, stop):
            for j in range(m):
                t = float(x[i, j]) - x[0, j]
                partial[chunk, 0, j] += t
                partial[chunk, 1, j] += t * t
    for j in prange(m):
        s1 = 0.0
        s2 = 0.0
        for chunk in range(chunks):
            s1 += partial[chunk, 0, j]
            s2 += partial[chunk, 1, j]
        shift = s1 / n
        var = max(s2 / n - shift * shift, 0.0)
        mean_out[j] = x[0, j] + shift
        var_out[j] = var
        invstd_out[j] = 1.0 / math.sqrt(var + eps)
    # normalising pass in x's dtype with the rounded statistics, as the reference computes it
    for i in prange(n):
        for j in range(m):
            out[i, j] = gamma[j] * _normalized(x, i, j, mean_out, invstd_out) + beta[j]


def batchnorm_forward(x, gamma, beta, eps, out, mean_out, var_out, invstd_out):
    """Training-mode batch normalisation per feature; see :func:`reference.batchnorm_forward`.
    Reads ``x`` twice (statistics, then normalisation)."""
    op = "batchnorm_forward"
    dtype = _batch(op, "x", x)
    vec = x.shape[1:]
    _array(op, "gamma", gamma, dtype, vec)
    _array(op, "beta", beta, dtype, vec)
    _array(op, "out", out, dtype, x.shape, out=True)
    for name, a in (("mean_out", mean_out), ("var_out", var_out), ("invstd_out", invstd_out)):
        _array(op, name, a, dtype, vec, out=True)
    if x.shape[0] == 0:
        raise ValueError(f"{op}: x has no rows; batch statistics need at least one")
    n, m = x.shape
    partial = _scratch(((_row_chunks(n), 2, m), np.float64))[0]
    _batchnorm_forward(x.size, x, gamma, beta, float(eps), out, mean_out, var_out, invstd_out,
                       partial)
    return out


@_loops()
def _batchnorm_backward(dy, x, gamma, mean, invstd, dx_arg, dgamma, dbeta, accumulate,
                        partial, coef):
    n, m = dy.shape
    chunks = partial.shape[0]
    for chunk in prange(chunks):
        start, stop = _chunk_rows(chunk, chunks, n)
        for j in range(m):
            partial[chunk, 0, j] = 0.0
            partial[chunk, 1, j] = 0.0
        for i in range(start, stop - _ROW_GROUP + 1, _ROW_GROUP):
            for j in range(m):
                h0 = _normalized(x, i, j, mean, invstd)
                h1 = _normalized(x, i + 1, j, mean, invstd)
                h2, h3 = _normalized(x, i + 2, j, mean, invstd), \
                    _normalized(x, i + 3, j, mean, invstd)
                g0, g1, g2, g3 = float(dy[i, j]), float(dy[i + 1, j]), float(dy[i + 2, j]), \
                    float(dy[i + 3, j])
                partial[chunk, 0, j] += (g0 + g1) + (g2 + g3)
                partial[chunk, 1, j] += (g0 * h0 + g1 * h1) + (g2 * h2 + g3 * h3)
        for i in range(stop - (stop - start) % _ROW_GROUP, stop):
            for j in range(m):
                g = float(dy[i, j])
                partial[chunk, 0, j] += g
                partial[chunk, 1, j] += g * _normalized(x, i, j, mean, invstd)
    for j in prange(m):  # coef (in dy's dtype): dx = c₀ dy - c₁ - c₂ x̂, c = γ r / N · (N, ∂β, ∂γ)
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for chunk in range(chunks):
            sum_dy += partial[chunk, 0, j]
            sum_dy_xhat += partial[chunk, 1, j]
        dbeta[j] = dbeta[j] + sum_dy if accumulate else sum_dy
        dgamma[j] = dgamma[j] + sum_dy_xhat if accumulate else sum_dy_xhat
        c = gamma[j] * float(invstd[j]) / n
        coef[0, j] = c * n
        coef[1, j] = c * sum_dy
        coef[2, j] = c * sum_dy_xhat
    for i in prange(n):
        dx = dy if dx_arg is None else dx_arg
        for j in range(m):
            dx[i, j] = coef[0, j] * dy[i, j] - coef[1, j] \
                - coef[2, j] * _normalized(x, i, j, mean, invstd)


def batchnorm_backward(dy, x, gamma, mean, invstd, dx_out, dgamma_out, dbeta_out,
                       accumulate=False):
    """Backward of training-mode BatchNorm; see :func:`reference.batchnorm_backward`.
    ``dx_out`` may be ``dy`` (not ``x``). Reads ``dy`` and ``x`` twice (sums, then ``dx``)."""
    op = "batchnorm_backward"
    dtype = _batch(op, "dy", dy)
    vec = dy.shape[1:]
    _array(op, "x", x, dtype, dy.shape)
    for name, a in (("gamma", gamma), ("mean", mean), ("invstd", invstd)):
        _array(op, name, a, dtype, vec)
    _array(op, "dx_out", dx_out, dtype, dy.shape, out=True)
    if np.may_share_memory(dx_out, x):
        raise ValueError(f"{op}: dx_out shares memory with x; pass dy (in place) or a "
                         "separate buffer")
    _array(op, "dgamma_out", dgamma_out, dtype, vec, out=True)
    _array(op, "dbeta_out", dbeta_out, dtype, vec, out=True)
    n, m = dy.shape
    partial, coef = _scratch(((_row_chunks(n), 2, m), np.float64), ((3, m), dtype))
    _batchnorm_backward(dy.size, dy, x, gamma, mean, invstd,
                        _separate(op, "dx_out", dx_out, "dy", dy), dgamma_out, dbeta_out,
                        bool(accumulate), partial, coef)
    return dx_out
