"""Numba CUDA kernels: every op of the registry as ``@cuda.jit`` kernels.

Each public function has the signature and semantics of the function of the same name in
:mod:`reference` (the math is stated there); the kernels below state it in one line.

Arrays. On a GPU the wrappers take CuPy arrays (anything with ``__cuda_array_interface__``),
wrap them zero-copy and launch on CuPy's current stream, so they are ordered with the CuPy
matmuls around them. With ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in Numba's CUDA
simulator on NumPy arrays (slow: small shapes only). tests/test_numba_cuda_compile.py
compiles exactly what the wrappers launch to PTX, which the simulator cannot check.

Layouts
- Element-wise kernels: 1-D grid-stride loops over the flat index, ``TPB`` threads a block.
- Row kernels (softmax, softmax cross-entropy): blocks of ``LANES × ROWS`` threads, one
  warp of ``LANES`` lanes per row (coalesced along the row), ``ROWS`` rows a block; the
  row reductions go through shared memory (each thread stores its partial, then reads
  its row back in a fixed order: deterministic, two barriers per reduction).
- Column kernels (bias gradient, batchnorm): the same blocks, ``LANES`` consecutive columns
  × ``ROWS`` row lanes; each thread sums a column over a strip of rows, then the ``ROWS``
  partial sums are combined in shared memory. The bias gradient splits the rows into
  chunks (one block row per chunk) and sums the chunk partials in a second, fixed-order
  pass, so ``db`` is deterministic and needs no atomics.

Dtypes. float32 and float64; kernels that need constants (activations, optimizers) or
casts (row and column kernels) are built once per dtype by a cached factory, so float32
kernels compute in float32 (their PTX holds no f64 instruction), while every reduction
accumulates in float64. Hyperparameters are kernel arguments cast to the array dtype on the
host.

Low-precision copies (mixed precision, ``kernels/lowp.py``): given ``out_lp``, ``delta_lp`` or
``data_lp``, the Dense epilogues and the optimizer updates launch a variant of their kernel
(built by the same factory, keyed by the format) that also stores, next to each float32 value
it stores, that value's copy: bf16 bits by ``kernels.lowp.bf16_bits`` (the CPU's formula, so
the bits agree, NaN payloads included), float16 by the store's own conversion
(``cvt.rn.f16.f32``, NumPy's in the simulator). The float32-only kernels are unchanged, and
only float32 data has a copy (``reference.check_lowp``, before any launch).
"""
from __future__ import annotations

import functools
import math
import sys
import threading

import numba
import numpy as np
from numba import cuda

from . import reference
from .activations import RECORDS, Math
from .lowp import bf16_bits, lowp_kind
from .optimizers import RECORDS as OPTIMIZERS
from .optimizers import SLOTS, UpdateMath, entry_point, flush_function, slotted
from .reference import (ACTIVATIONS, GOLDEN32, INV_SQRT2, INV_SQRT_2PI, MASK32, NEEDS_Z,
                        check_lowp)

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

# Launch geometry: TPB threads per block of the element-wise kernels; 2-D blocks of LANES
# lanes along a row × ROWS rows (powers of two); at most MAX_BLOCKS blocks on a grid-stride
# loop. Every simulated thread is a Python thread, so the simulator runs the same code with
# small blocks: launches take milliseconds, and small test shapes span several lanes,
# tiles, chunks and grid-stride steps.
if SIMULATOR:
    TPB, LANES, ROWS, MAX_BLOCKS = 32, 4, 2, 2
else:
    TPB, LANES, ROWS, MAX_BLOCKS = 256, 32, 8, 2048
SIMULATOR_SWITCH_INTERVAL = 2e-4   # seconds, see _launch
MAX_CHUNKS = 128            # row chunks of the bias-gradient reduction (grid y)
MIN_CHUNK_ROWS = 4 * ROWS   # rows per chunk at least (4 per row lane)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_ZERO64 = np.float64(0.0)   # typed literal: starts a float64 accumulator (also in the simulator)
# Dropout hash constants (reference.mix32). They are uint64 so that a uint32 times one is
# exact in the simulator's NumPy scalars (no overflow warning); the kernel casts each product
# back to uint32, which LLVM narrows to a 32-bit multiply (NVIDIA GPUs emulate 64-bit ones).
_GOLDEN = np.uint64(GOLDEN32)
_MIX1 = np.uint64(0x7FEB352D)
_MIX2 = np.uint64(0x846CA68B)


def _checked_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"numba_cuda kernels take float32 or float64 arrays; got {dtype} "
                        "(cast with .astype(np.float32))")
    return dtype


# ---------------------------------------------------------------------------------------
# Launching
_streams: dict = {}
# .cache: {key: partial sums}, one per thread: two threads' kernels on one stream interleave,
# so one thread's partial sums could be overwritten between its two launches by the other's
_partials_cache = threading.local()


def _stream():
    """The Numba stream that wraps CuPy's current stream (cached per device and pointer)."""
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0  # CuPy's null stream is the legacy default stream
    key = (cupy.cuda.Device().id, ptr)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams[key] = cuda.external_stream(ptr)
    return stream


def _device_arg(a):
    """A kernel argument: CUDA arrays are wrapped zero-copy (no stream sync: we launch on
    the stream that produced them); scalars pass through."""
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a, sync=False)
    if isinstance(a, np.ndarray):
        raise TypeError(
            "the numba_cuda kernels take CUDA arrays (CuPy), got a NumPy array: move the "
            "data to the GPU (bp.asarray / model.to('cuda')), or use the numba_cpu backend "
            "(or set NUMBA_ENABLE_CUDASIM=1 to run these kernels in the simulator)")
    return a


def _simulator_arg(a):
    """A kernel argument in the simulator: NumPy arrays are wrapped as (fake) device arrays.

    Given plain NumPy arrays, the simulator copies each argument in and back out one by one,
    so aliased arguments (``out`` is ``x``, an unused buffer passed as ``p``) would overwrite
    each other's results; wrapped, they share memory as device arrays do on a GPU."""
    if isinstance(a, np.ndarray):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(a)
    return a


def _launch(kernel, grid, block, *args):
    """Run ``kernel[grid, block]`` on ``args`` (on CuPy's current stream on a GPU)."""
    if SIMULATOR:
        # The simulator's block manager busy-polls its threads for barriers while holding
        # the GIL; a short switch interval hands the GIL on ~10× sooner (restored after).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL)
        try:
            kernel[grid, block](*[_simulator_arg(a) for a in args])
        finally:
            sys.setswitchinterval(interval)
    else:
        kernel[grid, block, _stream()](*[_device_arg(a) for a in args])


def _blocks(count: int, per_block: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-count // per_block)))


def _flat(a, name: str):
    """A 1-D view of a C-contiguous array (kernels update it in place)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous to be updated in place by a flat "
                         f"kernel; got shape {a.shape} with strides {a.strides} "
                         "(pass a contiguous array, e.g. from backprop.parameter.flatten)")
    return a.reshape(-1)


def _partials(like, size: int):
    """A float64 scratch vector of at least ``size`` for the bias-gradient chunk sums, kept
    per thread, device and stream (on the host in the simulator), so steady state allocates
    nothing."""
    if isinstance(like, np.ndarray):
        key, xp = "host", np
    else:
        import cupy

        key, xp = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr), cupy
    cache = vars(_partials_cache).setdefault("cache", {})
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = xp.empty(max(size, 1), dtype=np.float64)
    return buf


# ---------------------------------------------------------------------------------------
# Shared-memory reductions inside a LANES × ROWS block (every thread must call them). Each
# thread stores its value, then reads its row (or column) of the block back and combines it
# in a fixed order: two barriers per reduction, and every thread holds the same result.
# Device functions here are inlined into their kernels at the Numba IR level
# (inline="always"): a separately compiled device function asks the current GPU for its
# compute capability, which would stop compile_ptx (and the PTX test) on a machine without one.
@cuda.jit(device=True, inline="always")
def _lane_sum(sh, v, tx, ty):
    """Σ of ``v`` over the LANES threads of row lane ``ty``."""
    sh[ty, tx] = v
    cuda.syncthreads()
    total = sh[ty, 0]
    for k in range(1, LANES):
        total += sh[ty, k]
    cuda.syncthreads()
    return total


@cuda.jit(device=True, inline="always")
def _lane_sum_pair(sh, sh2, v, w, tx, ty):
    """(Σ v, Σ w) over the LANES threads of row lane ``ty``."""
    sh[ty, tx] = v
    sh2[ty, tx] = w
    cuda.syncthreads()
    total, total2 = sh[ty, 0], sh2[ty, 0]
    for k in range(1, LANES):
        total += sh[ty, k]
        total2 += sh2[ty, k]
    cuda.syncthreads()
    return total, total2


@cuda.jit(device=True, inline="always")
def _lane_max(sh, v, tx, ty):
    """max of ``v`` over the LANES threads of row lane ``ty``."""
    sh[ty, tx] = v
    cuda.syncthreads()
    best = sh[ty, 0]
    for k in range(1, LANES):
        if sh[ty, k] > best:
            best = sh[ty, k]
    cuda.syncthreads()
    return best


@cuda.jit(device=True, inline="always")
def _column_sum(sh, v, tx, ty):
    """Σ of ``v`` over the ROWS threads of column lane ``tx``."""
    sh[ty, tx] = v
    cuda.syncthreads()
    total = sh[0, tx]
    for r in range(1, ROWS):
        total += sh[r, tx]
    cuda.syncthreads()
    return total


@cuda.jit(device=True, inline="always")
def _column_sum_pair(sh, sh2, v, w, tx, ty):
    """(Σ v, Σ w) over the ROWS threads of column lane ``tx``."""
    sh[ty, tx] = v
    sh2[ty, tx] = w
    cuda.syncthreads()
    total, total2 = sh[0, tx], sh2[0, tx]
    for r in range(1, ROWS):
        total += sh[r, tx]
        total2 += sh2[r, tx]
    cuda.syncthreads()
    return total, total2


# ---------------------------------------------------------------------------------------
# Activations: σ and σ' as device functions with constants of the array dtype
@cuda.jit(device=True, inline="always")
def _select(c, a, b):
    return a if c else b


@functools.lru_cache(maxsize=None)
def _math(dtype) -> Math:
    """The math of the formula builders (``kernels/activations.py``) in device code with
    elements of ``dtype``: ``math`` functions, constants and ``alpha`` of that type."""
    t = _checked_dtype(dtype).type
    zero, half, one = t(0.0), t(0.5), t(1.0)
    inv_sqrt2, inv_sqrt_2pi = t(INV_SQRT2), t(INV_SQRT_2PI)
    device = cuda.jit(device=True, inline="always")

    @device
    def sigmoid(z):
        e = math.exp(-abs(z))  # exp only sees -|z|: no overflow
        return one / (one + e) if z >= zero else e / (one + e)

    @device
    def softplus(z):
        return math.log1p(math.exp(-abs(z))) + (zero if z < zero else z)

    @device
    def ndtr(z):
        return half * math.erfc(-z * inv_sqrt2)

    @device
    def ndtr_pdf(z):
        return half * math.erfc(-z * inv_sqrt2), math.exp(-half * z * z) * inv_sqrt_2pi

    return Math(K=t, cast=t, where=_select, abs=abs, exp=math.exp, expm1=math.expm1,
                tanh=math.tanh, sigmoid=sigmoid, softplus=softplus, ndtr=ndtr,
                ndtr_pdf=ndtr_pdf)


@functools.lru_cache(maxsize=None)
def _activation(act: str, dtype):
    """Device functions ``(σ(z, α), σ'(s, α))`` for ``act`` in ``dtype`` from its record, where
    ``s`` is ``z`` for activations in NEEDS_Z and ``a = σ(z)`` otherwise."""
    if act not in RECORDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    record, m = RECORDS[act], _math(dtype)
    as_device = cuda.jit(device=True, inline="always")
    return as_device(record.forward(m)), as_device(record.derivative(m))


def _needed_input(act, a, z):
    """``z`` for activations in NEEDS_Z, else ``a`` (the argument σ' is computed from)."""
    name, src = ("z", z) if act in NEEDS_Z else ("a", a)
    if src is None:
        raise ValueError(f"bias_act_backward with activation {act!r} computes σ' from "
                         f"{name!r}, but {name}=None was given")
    return src


# ---------------------------------------------------------------------------------------
# Low-precision copies: the value a kernel stores in the copy's array for a float32 ``x``
if SIMULATOR:
    @cuda.jit(device=True)
    def _float_bits(x):
        """The bits of the float32 ``x`` as a uint32 (the simulator runs Python)."""
        return np.float32(x).view(np.uint32)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def _float_bits(x):
        """The bits of the float32 ``x`` as a uint32: a register move (__nv_float_as_int)."""
        return numba.uint32(libdevice.float_as_int(x))

_bf16_bits = cuda.jit(device=True, inline="always")(bf16_bits)


@cuda.jit(device=True, inline="always")
def _to_bf16(x):
    """bf16 bits of ``x``, the formula of kernels/lowp.py (not the hardware conversion,
    whose NaN is canonical: every backend's bits must agree)."""
    return _bf16_bits(_float_bits(x))


@cuda.jit(device=True, inline="always")
def _to_f16(x):
    """``x`` itself: storing it in a float16 array rounds to nearest even."""
    return x


_LOWP_CONVERT = {"bfloat16": _to_bf16, "float16": _to_f16}


def _lowp_format(op: str, name: str, out, source, *others):
    """The format of ``out``, the low-precision copy of ``source``, checked as the reference
    checks it: overlapping none of the call's ``others`` either. (The ops call it only for
    a copy: without one, nothing is added to the float32 path.)"""
    check_lowp(op, name, out, source, *others)
    return lowp_kind(out)


# ---------------------------------------------------------------------------------------
# 1-2. Dense epilogues
@functools.lru_cache(maxsize=None)
def _bias_act_forward_kernel(act: str, dtype, lowp=None):
    forward, _ = _activation(act, dtype)
    if lowp is not None:
        return _bias_act_forward_lowp_kernel(forward, _LOWP_CONVERT[lowp])

    @cuda.jit
    def kernel(z, b, out, alpha, has_b, write_z):
        """out_ij = σ(z_ij + b_j) (b_j = 0 unless has_b); z_ij ← z_ij + b_j when write_z."""
        m = z.shape[1]
        for k in range(cuda.grid(1), z.size, cuda.gridsize(1)):
            i = k // m
            j = k - i * m
            pre = z[i, j]
            if has_b:
                pre += b[j]
                if write_z:
                    z[i, j] = pre
            out[i, j] = forward(pre, alpha)

    return kernel


def _bias_act_forward_lowp_kernel(forward, convert):
    """The float32 forward kernel that also stores ``out_lp_ij = convert(out_ij)``."""

    @cuda.jit
    def kernel(z, b, out, out_lp, alpha, has_b, write_z):
        """The forward kernel, and out_lp_ij = lowp(out_ij) of the float32 value stored."""
        m = z.shape[1]
        for k in range(cuda.grid(1), z.size, cuda.gridsize(1)):
            i = k // m
            j = k - i * m
            pre = z[i, j]
            if has_b:
                pre += b[j]
                if write_z:
                    z[i, j] = pre
            a = numba.float32(forward(pre, alpha))
            out[i, j] = a
            out_lp[i, j] = convert(a)

    return kernel


@functools.lru_cache(maxsize=None)
def _bias_act_backward_kernel(act: str, dtype, lowp=None):
    _, slope = _activation(act, dtype)
    if lowp is not None:
        return _bias_act_backward_lowp_kernel(slope, _LOWP_CONVERT[lowp])

    @cuda.jit
    def kernel(da, s, alpha, delta, partials, chunk_rows, want_db):
        """δ_ij = da_ij σ'(s_ij); partials[chunk, j] = Σ_{i in chunk} δ_ij (float64)."""
        sh = cuda.shared.array((ROWS, LANES), numba.float64)
        n, m = da.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * LANES + tx
        first = cuda.blockIdx.y * chunk_rows
        last = min(first + chunk_rows, n)
        acc = _ZERO64
        if j < m:
            for i in range(first + ty, last, ROWS):
                d = da[i, j] * slope(s[i, j], alpha)
                delta[i, j] = d
                acc += d
        if want_db:
            total = _column_sum(sh, acc, tx, ty)
            if ty == 0 and j < m:
                partials[cuda.blockIdx.y * m + j] = total

    return kernel


def _bias_act_backward_lowp_kernel(slope, convert):
    """The float32 backward kernel that also stores ``delta_lp_ij = convert(δ_ij)``."""

    @cuda.jit
    def kernel(da, s, alpha, delta, delta_lp, partials, chunk_rows, want_db):
        """The backward kernel, and delta_lp_ij = lowp(δ_ij) of the float32 value stored."""
        sh = cuda.shared.array((ROWS, LANES), numba.float64)
        n, m = da.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * LANES + tx
        first = cuda.blockIdx.y * chunk_rows
        last = min(first + chunk_rows, n)
        acc = _ZERO64
        if j < m:
            for i in range(first + ty, last, ROWS):
                d = numba.float32(da[i, j] * slope(s[i, j], alpha))
                delta[i, j] = d
                delta_lp[i, j] = convert(d)
                acc += d
        if want_db:
            total = _column_sum(sh, acc, tx, ty)
            if ty == 0 and j < m:
                partials[cuda.blockIdx.y * m + j] = total

    return kernel


@cuda.jit
def _chunk_sum_kernel(partials, chunks, db, accumulate):
    """db_j = Σ_c partials[c, j] in chunk order (db_j += … when accumulate)."""
    m = db.shape[0]
    for j in range(cuda.grid(1), m, cuda.gridsize(1)):
        total = _ZERO64
        for c in range(chunks):
            total += partials[c * m + j]
        if accumulate:
            db[j] += total
        else:
            db[j] = total


def bias_act_forward(z, b, out, act: str, alpha: float = 0.0, out_lp=None):
    """``A = σ(Z + b)`` (and ``out_lp ← lowp(A)`` when given); see
    :func:`reference.bias_act_forward`."""
    lowp = None if out_lp is None else _lowp_format("bias_act_forward", "out_lp", out_lp,
                                                    out, z, b)
    reference.check_shape("bias_act_forward", z.shape, out=out)
    reference.check_shape("bias_act_forward", z.shape[-1:], b=b)
    kernel = _bias_act_forward_kernel(act, z.dtype, lowp)
    if z.size == 0:
        return out
    has_b = b is not None
    copy = () if lowp is None else (out_lp,)
    _launch(kernel, _blocks(z.size, TPB), TPB, z, b if has_b else z[0], out, *copy,
            z.dtype.type(alpha), has_b, has_b and act in NEEDS_Z)
    return out


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False,
                      delta_lp=None):
    """``δ = dA ⊙ σ'(Z)``, ``db = Σ_rows δ`` (and ``delta_lp ← lowp(δ)`` when given); see
    :func:`reference.bias_act_backward`."""
    lowp = None if delta_lp is None else _lowp_format("bias_act_backward", "delta_lp",
                                                      delta_lp, delta_out, da, a, z, db_out)
    kernel = _bias_act_backward_kernel(act, da.dtype, lowp)
    src = _needed_input(act, a, z)
    n, m = da.shape
    reference.check_shape("bias_act_backward", da.shape, source=src, delta_out=delta_out)
    reference.check_shape("bias_act_backward", (m,), db_out=db_out)
    if m == 0:
        return delta_out
    chunk_rows = max(MIN_CHUNK_ROWS, -(-n // MAX_CHUNKS))
    chunks = max(1, -(-n // chunk_rows))
    want_db = db_out is not None
    partials = _partials(da, chunks * m)
    copy = () if lowp is None else (delta_lp,)
    _launch(kernel, (-(-m // LANES), chunks), (LANES, ROWS), da, src, da.dtype.type(alpha),
            delta_out, *copy, partials, chunk_rows, want_db)
    if want_db:
        _launch(_chunk_sum_kernel, _blocks(m, TPB), TPB, partials, chunks, db_out,
                bool(accumulate))
    return delta_out


# ---------------------------------------------------------------------------------------
# Softmax and softmax cross-entropy: one warp per row
@functools.lru_cache(maxsize=None)
def _softmax_forward_kernel(dtype):
    ntype = numba.from_dtype(_checked_dtype(dtype))

    @cuda.jit
    def kernel(x, out):
        """out_ij = exp(x_ij - max_k x_ik) / Σ_k exp(x_ik - max_k x_ik)."""
        shm = cuda.shared.array((ROWS, LANES), ntype)
        shs = cuda.shared.array((ROWS, LANES), numba.float64)
        n, c = x.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for base in range(cuda.blockIdx.x * ROWS, n, cuda.gridDim.x * ROWS):
            row = base + ty
            r = min(row, n - 1)  # idle row lanes repeat the last row and write nothing
            mx = x[r, 0]
            for k in range(tx, c, LANES):
                if x[r, k] > mx:
                    mx = x[r, k]
            mx = _lane_max(shm, mx, tx, ty)
            acc = _ZERO64
            for k in range(tx, c, LANES):
                acc += math.exp(x[r, k] - mx)
            total = ntype(_lane_sum(shs, acc, tx, ty))
            if row < n:
                for k in range(tx, c, LANES):
                    out[row, k] = math.exp(x[row, k] - mx) / total

    return kernel


@functools.lru_cache(maxsize=None)
def _softmax_backward_kernel(dtype):
    ntype = numba.from_dtype(_checked_dtype(dtype))

    @cuda.jit
    def kernel(dy, y, out):
        """out_ij = y_ij (dy_ij - Σ_k dy_ik y_ik)."""
        shs = cuda.shared.array((ROWS, LANES), numba.float64)
        n, c = dy.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for base in range(cuda.blockIdx.x * ROWS, n, cuda.gridDim.x * ROWS):
            row = base + ty
            r = min(row, n - 1)
            acc = _ZERO64
            for k in range(tx, c, LANES):
                acc += dy[r, k] * y[r, k]
            dot = ntype(_lane_sum(shs, acc, tx, ty))
            if row < n:
                for k in range(tx, c, LANES):
                    out[row, k] = y[row, k] * (dy[row, k] - dot)

    return kernel


@functools.lru_cache(maxsize=None)
def _softmax_xent_kernel(dtype):
    ntype = numba.from_dtype(_checked_dtype(dtype))
    nan = ntype(math.nan)

    @cuda.jit
    def kernel(logits, labels, on, off, keep, spread, scale, grad, loss):
        """loss_i = log Σ_k e^(z_ik - m_i) - (1-ε)(z_iy - m_i) - ε/C Σ_k (z_ik - m_i) (float64);
        grad_ik = scale (softmax(z_i)_k - (on if k = y_i else off)); a label outside [0, C)
        gives a NaN row."""
        shm = cuda.shared.array((ROWS, LANES), ntype)
        shs = cuda.shared.array((ROWS, LANES), numba.float64)
        shz = cuda.shared.array((ROWS, LANES), numba.float64)
        n, c = logits.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for base in range(cuda.blockIdx.x * ROWS, n, cuda.gridDim.x * ROWS):
            row = base + ty
            r = min(row, n - 1)
            label = labels[r]
            valid = 0 <= label < c  # the caller validates labels: never read past the row
            # read before grad (which may alias) is written
            z_label = _ZERO64 + logits[r, label if valid else 0]
            mx = logits[r, 0]
            for k in range(tx, c, LANES):
                if logits[r, k] > mx:
                    mx = logits[r, k]
            mx = _lane_max(shm, mx, tx, ty)
            acc = _ZERO64
            acc_z = _ZERO64
            for k in range(tx, c, LANES):
                acc += math.exp(logits[r, k] - mx)
                acc_z += logits[r, k]
            sum_exp, sum_z = _lane_sum_pair(shs, shz, acc, acc_z, tx, ty)
            if row < n and not valid:  # a NaN row (the lanes stay for the sums above)
                for k in range(tx, c, LANES):
                    grad[row, k] = nan
                if tx == 0:
                    loss[row] = nan
            elif row < n:
                total = ntype(sum_exp)
                for k in range(tx, c, LANES):
                    p = math.exp(logits[row, k] - mx) / total
                    grad[row, k] = (p - (on if k == label else off)) * scale
                if tx == 0:
                    m64 = _ZERO64 + mx
                    nll = math.log(sum_exp) - keep * (z_label - m64)
                    if spread != 0.0:  # skipped without smoothing: -inf logits stay finite
                        nll -= spread * (sum_z - c * m64)
                    loss[row] = nll

    return kernel


def softmax_forward(x, out):
    """Row softmax; see :func:`reference.softmax_forward`."""
    kernel = _softmax_forward_kernel(x.dtype)
    if x.shape[0]:
        _launch(kernel, _blocks(x.shape[0], ROWS), (LANES, ROWS), x, out)
    return out


def softmax_backward(dy, y, out):
    """``dx = y ⊙ (dy - Σ dy y)`` per row; see :func:`reference.softmax_backward`."""
    kernel = _softmax_backward_kernel(dy.dtype)
    if dy.shape[0]:
        _launch(kernel, _blocks(dy.shape[0], ROWS), (LANES, ROWS), dy, y, out)
    return out


def softmax_xent(logits, labels, smoothing: float, scale: float, grad_out, loss_out):
    """Softmax cross-entropy loss and gradient; see :func:`reference.softmax_xent`."""
    kernel = _softmax_xent_kernel(logits.dtype)
    n, c = logits.shape
    if n == 0:
        return loss_out
    t = logits.dtype.type
    off = t(smoothing / c)
    on = off + t(1.0 - smoothing)  # as the reference builds its target: ε/C, then += 1-ε
    _launch(kernel, _blocks(n, ROWS), (LANES, ROWS), logits, labels, on, off,
            np.float64(1.0 - smoothing), np.float64(smoothing / c), t(scale), grad_out, loss_out)
    return loss_out


# ---------------------------------------------------------------------------------------
# 4. Optimizer updates: one thread per element of the flat buffers, the formula of a record
# of kernels/optimizers.py compiled per variant (the states kept) and dtype; the scalars are
# kernel arguments, rounded to the dtype on the host. A state not kept is passed as ``p``
# (a kernel argument cannot be None on a GPU) and neither read nor written.
@cuda.jit(device=True, inline="always")
def _maximum(a, b):
    """``np.maximum`` of two scalars: ``b`` where it is larger or NaN."""
    return b if b > a or b != b else a


@cuda.jit(device=True, inline="always")
def _element(a, i):
    return a[i]


@cuda.jit(device=True, inline="always")
def _not_kept(a, i):
    return None


@cuda.jit(device=True, inline="always")
def _store(a, i, x):
    a[i] = x


@cuda.jit(device=True, inline="always")
def _discard(a, i, x):
    pass


@functools.lru_cache(maxsize=None)
def _optimizer_kernel(name: str, kept: tuple, dtype, lowp=None):
    """The kernel of optimizer record ``name`` in ``dtype`` for the state slots ``kept``;
    with ``lowp`` (a format), the float32 kernel that also stores ``p_lp ← lowp(p)``."""
    record = OPTIMIZERS[name]
    t = _checked_dtype(dtype).type
    device = cuda.jit(device=True, inline="always")
    m = UpdateMath(K=t, where=_select, sqrt=math.sqrt, maximum=_maximum,
                   flush=flush_function(t, device))
    update = device(slotted(device(record.update(m)), len(record.states)))
    (load0, store0), (load1, store1), (load2, store2) = (
        (_element, _store) if k else (_not_kept, _discard) for k in kept)
    if lowp is not None:
        convert = _LOWP_CONVERT[lowp]

        @cuda.jit
        def kernel_lowp(p, g, s0, s1, s2, p_lp, c):
            """The update, and p_lp_i = lowp(p_i) of the float32 value stored."""
            for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
                w, x0, x1, x2 = update(p[i], g[i], load0(s0, i), load1(s1, i), load2(s2, i),
                                       c)
                w = numba.float32(w)
                p[i] = w
                p_lp[i] = convert(w)
                store0(s0, i, x0)
                store1(s1, i, x1)
                store2(s2, i, x2)

        return kernel_lowp

    @cuda.jit
    def kernel(p, g, s0, s1, s2, c):
        """(p, s) = update(p, g, s, c) per element, by the record's formula."""
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            w, x0, x1, x2 = update(p[i], g[i], load0(s0, i), load1(s1, i), load2(s2, i), c)
            p[i] = w
            store0(s0, i, x0)
            store1(s1, i, x1)
            store2(s2, i, x2)

    return kernel


def _optimizer_op(record):
    """The op of an optimizer record: one launch over ``p`` and its kept states."""
    names = record.states + ("",) * (SLOTS - len(record.states))

    def run(p, g, states, scalars, flags, data_lp=None):
        t = _checked_dtype(p.dtype).type
        pf = _flat(p, "p")
        lowp = None if data_lp is None else _lowp_format(record.op, "data_lp", data_lp, p,
                                                         g, *states)
        if pf.size:
            slots = states + (None,) * (SLOTS - len(states))
            kernel = _optimizer_kernel(record.name, tuple(s is not None for s in slots), p.dtype,
                                       lowp)
            copy = () if lowp is None else (data_lp.reshape(-1),)
            _launch(kernel, _blocks(pf.size, TPB), TPB, pf, _flat(g, "g"),
                    *(pf if s is None else _flat(s, n) for s, n in zip(slots, names)), *copy,
                    tuple(map(t, scalars)) + flags)

    return entry_point(record, run, f"reference.{record.op} with one thread per element, "
                       f"from the formula of kernels/optimizers.py ({record.name!r}).")


globals().update({record.op: _optimizer_op(record) for record in OPTIMIZERS.values()})


# ---------------------------------------------------------------------------------------
# 5. Dropout: the counter hash of reference.dropout in uint32 registers
@cuda.jit(device=True, inline="always")
def _mix32(h):
    """reference.mix32 ('lowbias32') of a uint32."""
    h ^= h >> 16
    h = numba.uint32(h * _MIX1)
    h ^= h >> 15
    h = numba.uint32(h * _MIX2)
    h ^= h >> 16
    return h


@cuda.jit
def _dropout_kernel(x, out, key, threshold, scale):
    """out_i = x_i · scale if mix32((i φ) ^ key) >> 8 >= threshold else 0 (flat index i).

    The counter c = i φ (mod 2³²) advances by (grid size) φ per grid-stride step: an add, not
    a multiply; the select stores without a branch.
    """
    start, stride = cuda.grid(1), cuda.gridsize(1)
    c = numba.uint32(numba.uint32(start) * _GOLDEN)
    dc = numba.uint64(numba.uint32(numba.uint32(stride) * _GOLDEN))  # < 2³²: c + dc is exact
    for i in range(start, x.size, stride):
        keep = (_mix32(c ^ key) >> 8) >= threshold
        v = x[i] * scale
        out[i] = v if keep else 0
        c = numba.uint32(c + dc)


def dropout(x, key: int, threshold: int, scale: float, out):
    """Inverted dropout with the counter-hash mask; see :func:`reference.dropout`."""
    t = _checked_dtype(x.dtype).type
    xf = _flat(x, "x")
    if xf.size:
        _launch(_dropout_kernel, _blocks(xf.size, TPB), TPB, xf, _flat(out, "out"),
                np.uint32(key & MASK32), np.uint32(threshold), t(scale))
    return out


# ---------------------------------------------------------------------------------------
# 6. BatchNorm (training mode): one block column of LANES features over all rows
@functools.lru_cache(maxsize=None)
def _batchnorm_forward_kernel(dtype):
    ntype = numba.from_dtype(_checked_dtype(dtype))

    @cuda.jit
    def kernel(x, gamma, beta, eps, out, mean_out, var_out, invstd_out):
        """μ_j = mean_i x_ij; σ²_j = mean_i (x_ij-μ_j)²; r_j = 1/√(σ²_j+eps); out = γ(x-μ)r + β."""
        sh = cuda.shared.array((ROWS, LANES), numba.float64)
        n, m = x.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for tile in range(cuda.blockIdx.x, -(-m // LANES), cuda.gridDim.x):
            j = tile * LANES + tx
            jj = min(j, m - 1)  # idle lanes repeat the last column and write nothing
            acc = _ZERO64
            for i in range(ty, n, ROWS):
                acc += x[i, jj]
            mean = _column_sum(sh, acc, tx, ty) / n
            acc = _ZERO64
            for i in range(ty, n, ROWS):
                d = x[i, jj] - mean
                acc += d * d
            var = _column_sum(sh, acc, tx, ty) / n
            invstd = 1.0 / math.sqrt(var + eps)
            if j < m:
                mu, r, g, b = ntype(mean), ntype(invstd), gamma[j], beta[j]
                for i in range(ty, n, ROWS):
                    out[i, j] = g * ((x[i, j] - mu) * r) + b
                if ty == 0:
                    mean_out[j] = mean
                    var_out[j] = var
                    invstd_out[j] = invstd

    return kernel


@functools.lru_cache(maxsize=None)
def _batchnorm_backward_kernel(dtype):
    ntype = numba.from_dtype(_checked_dtype(dtype))

    @cuda.jit
    def kernel(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, accumulate):
        """x̂ = (x-μ)r; ∂β_j = Σ_i dy_ij; ∂γ_j = Σ_i dy_ij x̂_ij;
        dx_ij = γ_j r_j/N (N dy_ij - ∂β_j - x̂_ij ∂γ_j)."""
        sh = cuda.shared.array((ROWS, LANES), numba.float64)
        sh2 = cuda.shared.array((ROWS, LANES), numba.float64)
        n, m = dy.shape
        nf = ntype(n)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for tile in range(cuda.blockIdx.x, -(-m // LANES), cuda.gridDim.x):
            j = tile * LANES + tx
            jj = min(j, m - 1)
            mu, r = mean[jj], invstd[jj]
            acc_b = _ZERO64
            acc_g = _ZERO64
            for i in range(ty, n, ROWS):
                acc_b += dy[i, jj]
                acc_g += dy[i, jj] * ((x[i, jj] - mu) * r)
            sum_b, sum_g = _column_sum_pair(sh, sh2, acc_b, acc_g, tx, ty)
            db, dg = ntype(sum_b), ntype(sum_g)
            if j < m:
                k = gamma[j] * r / nf
                for i in range(ty, n, ROWS):
                    dx[i, j] = k * (nf * dy[i, j] - db - (x[i, j] - mu) * r * dg)
                if ty == 0:
                    if accumulate:
                        dgamma[j] += dg
                        dbeta[j] += db
                    else:
                        dgamma[j] = dg
                        dbeta[j] = db

    return kernel


def batchnorm_forward(x, gamma, beta, eps, out, mean_out, var_out, invstd_out):
    """Training-mode batch normalisation; see :func:`reference.batchnorm_forward`."""
    kernel = _batchnorm_forward_kernel(x.dtype)
    if x.shape[1]:
        _launch(kernel, _blocks(x.shape[1], LANES), (LANES, ROWS), x, gamma, beta, float(eps),
                out, mean_out, var_out, invstd_out)
    return out


def batchnorm_backward(dy, x, gamma, mean, invstd, dx_out, dgamma_out, dbeta_out,
                       accumulate=False):
    """Backward of training-mode BatchNorm; see :func:`reference.batchnorm_backward`."""
    kernel = _batchnorm_backward_kernel(dy.dtype)
    if dy.shape[1]:
        _launch(kernel, _blocks(dy.shape[1], LANES), (LANES, ROWS), dy, x, gamma, mean, invstd,
                dx_out, dgamma_out, dbeta_out, bool(accumulate))
    return dx_out
