"""Low-precision matrix products and conversions on the GPU (the CUDA side of mixed precision).

The GPU counterpart of :mod:`backprop.bf16`, for CuPy arrays, in both low-precision formats
of ``backprop.kernels.lowp``: **bfloat16**, stored as ``uint16`` bit patterns (CuPy has no
bfloat16 dtype; the same storage as on the CPU, so one buffer layout serves every backend),
and **float16** (``float16`` arrays).

- :func:`gemm_lowp`: ``out = alpha·op(a)·op(b) + beta·out`` with bf16 or fp16 operands and
  float32 accumulation and output, one ``cublasGemmEx`` call (``CUBLAS_COMPUTE_32F``) on
  the current CuPy stream; tensor cores where the GPU has them for the format.
- :func:`plan_gemm_lowp` → :class:`GemmLowpPlan`: the same, checked once; ``plan()`` reruns
  the call on the same buffers (the form a training step's products take).
- :func:`to_lowp`: float32 → bf16 bits (round to nearest, ties to even, by the integer
  formula ``CUDA_BF16_BITS`` of ``backprop.kernels.lowp``, so NaN payloads and every other
  bit agree with the CPU's :func:`backprop.bf16.to_bf16`) or → float16 (round to nearest
  even), one ``cupy.ElementwiseKernel`` pass; :func:`from_bf16`: bf16 bits → float32, exact.
- :func:`support`: what this GPU and installation offer (compute capability, whether bf16
  and fp16 run on tensor cores, the cuBLAS version), and why; answers without a GPU too.

Importing this module imports neither CuPy nor cuBLAS: a CPU-only installation can import
it, and the argument planning (:func:`_gemm_ex_args`, a pure function of shapes, strides,
dtypes and addresses) is tested on the CPU against an emulation of ``cublasGemmEx``.

How a row-major product maps onto cuBLAS. cuBLAS reads every matrix column-major: a block
of memory with leading dimension ``ld`` holds the matrix whose element (i, j) is at
``i + j·ld``. A C-ordered array ``x`` (rows × cols, row stride ``ld``) is therefore, to
cuBLAS, the column-major matrix ``xᵀ``; a Fortran-ordered array or a transposed view
(``x.T`` of a C-ordered one) is ``x`` itself. A C-ordered ``out`` is computed as
``outᵀ = op(b)ᵀ·op(a)ᵀ`` (operands swapped, M and N swapped); a Fortran-ordered one as
``out = op(a)·op(b)``. Each operand's transpose flag is then "does the memory hold the
transpose of the matrix cuBLAS must multiply", and its leading dimension is the stride of
its non-unit axis. Nothing is copied: transposed views and blocks of a larger matrix go to
cuBLAS as flags and leading dimensions, as in :func:`backprop.bf16.gemm_bf16`.
"""
from __future__ import annotations

import numbers
import threading
from typing import NamedTuple

import numpy as np

from backprop.kernels.cupy_kernels import ElementwiseSpec
from backprop.kernels.lowp import CUDA_BF16_BITS

__all__ = ["gemm_lowp", "plan_gemm_lowp", "GemmLowpPlan", "to_lowp", "from_bf16", "support",
           "CONVERSION_KERNELS", "CUDA_R_16F", "CUDA_R_16BF", "CUDA_R_32F",
           "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT"]

# cuBLAS and CUDA library constants (library_types.h, cublas_api.h): CuPy exposes some of
# them only once libcublas is loaded, so they are spelled out here for the planning that must
# run without it
CUDA_R_32F = 0
"""``cudaDataType`` of float32 (the output)."""
CUDA_R_16F = 2
"""``cudaDataType`` of IEEE float16 operands."""
CUDA_R_16BF = 14
"""``cudaDataType`` of bfloat16 operands."""
CUBLAS_COMPUTE_32F = 68
"""``cublasComputeType_t``: accumulate in float32 (tensor cores allowed for 16-bit inputs)."""
CUBLAS_GEMM_DEFAULT = -1
"""``cublasGemmAlgo_t``: cuBLAS's heuristic picks the kernel (tensor-core kernels included
since CUDA 11; ``CUBLAS_GEMM_DEFAULT_TENSOR_OP`` is deprecated and means the same)."""
_OP_N, _OP_T = 0, 1  # cublasOperation_t
_POINTER_MODE_HOST = 0  # cublasPointerMode_t
_INT_MAX = 2**31 - 1

_TYPES = {np.dtype(np.uint16): ("bfloat16", CUDA_R_16BF),
          np.dtype(np.float16): ("float16", CUDA_R_16F)}


# ---------------------------------------------------------------------------------------
# Argument checks and the gemmEx arguments: pure functions of array metadata
class _Matrix(NamedTuple):
    """What the planning reads of an array: shape, strides (bytes), dtype, address of
    element [0, 0]. Built from CuPy arrays here, from NumPy arrays in the CPU tests."""

    shape: tuple
    strides: tuple
    dtype: np.dtype
    ptr: int


def _matrix(x) -> _Matrix:
    data = x.data
    ptr = data.ptr if hasattr(data, "ptr") else x.ctypes.data  # CuPy | NumPy
    return _Matrix(tuple(x.shape), tuple(x.strides), np.dtype(x.dtype), int(ptr))


class _GemmExArgs(NamedTuple):
    """One ``cublasGemmEx`` call, in the order of its parameters (alpha, beta and the
    handle aside), or the work done without it: ``work`` is ``"gemm"``, ``"scale"``
    (K = 0: ``out = beta·out``) or ``"none"`` (an empty ``out``)."""

    work: str
    transa: int
    transb: int
    m: int
    n: int
    k: int
    A: int
    Atype: int
    lda: int
    B: int
    Btype: int
    ldb: int
    C: int
    Ctype: int
    ldc: int
    compute_type: int
    algo: int


def _layout(name: str, x: _Matrix) -> tuple[bool, int]:
    """``(holds_transpose, ld)``: the column-major matrix cuBLAS sees in ``x``'s memory is
    ``xᵀ`` (a row-major array: unit stride along a row) or ``x`` (column-major: unit stride
    down a column), with leading dimension ``ld`` (elements). Raises where neither axis has
    unit stride, or the other axis's stride is not a positive multiple of the element size
    at least the unit axis's length (a broadcast, a reversed or a strided view)."""
    rows, cols = x.shape
    size = x.dtype.itemsize
    if rows == 0 or cols == 0:  # nothing is read: any strides will do
        return True, max(cols, 1)
    s0, s1 = x.strides
    if cols <= 1 or s1 == size:  # row-major
        ld = max(cols, 1) if rows <= 1 else s0 // size
        if rows <= 1 or (s0 > 0 and s0 % size == 0 and ld >= max(cols, 1)):
            return True, ld
    if rows <= 1 or s0 == size:  # column-major
        ld = max(rows, 1) if cols <= 1 else s1 // size
        if cols <= 1 or (s1 > 0 and s1 % size == 0 and ld >= max(rows, 1)):
            return False, ld
    fix = ("write into a C-contiguous out and copy" if name == "out" else
           f"pass cupy.ascontiguousarray({name})")
    raise ValueError(
        f"gemm_lowp: {name} (shape {x.shape}, strides {x.strides}) is not a cuBLAS matrix: "
        "one of its two axes must have unit stride and the other a positive stride of at "
        "least the first axis's length (a C-contiguous array, its .T view, or a block of "
        f"one); {fix}")


def _span(x: _Matrix) -> tuple[int, int] | None:
    """The byte range ``[first, end)`` that ``x`` may touch (None for an empty array)."""
    if 0 in x.shape:
        return None
    low = x.ptr + sum(s * (n - 1) for s, n in zip(x.strides, x.shape) if s < 0)
    high = x.ptr + sum(s * (n - 1) for s, n in zip(x.strides, x.shape) if s > 0)
    return low, high + x.dtype.itemsize


def _overlaps(x: _Matrix, y: _Matrix) -> bool:
    a, b = _span(x), _span(y)
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def _gemm_ex_args(a: _Matrix, b: _Matrix, out: _Matrix, trans_a: bool,
                  trans_b: bool) -> _GemmExArgs:
    """Check the arrays of :func:`gemm_lowp` (shapes, dtypes, layouts, overlap) and compute
    the ``cublasGemmEx`` arguments of ``out = op(a)·op(b)`` for row- or column-major
    ``out`` (see the module's docstring). Pure: reads only the metadata given, touches no
    device, so the CPU tests run it on NumPy arrays and execute the result with an
    emulation of cuBLAS."""
    for name, x in (("a", a), ("b", b)):
        if len(x.shape) != 2:
            raise ValueError(f"gemm_lowp: {name} must be 2-D; got shape {x.shape}")
        if x.dtype not in _TYPES:
            hint = (": convert float32 data with backprop.cuda_lowp.to_lowp (or multiply "
                    "float32 with cupy.matmul)" if x.dtype == np.float32 else "")
            raise TypeError(f"gemm_lowp: {name} must hold a low-precision format: uint16 "
                            f"(bfloat16 bit patterns) or float16; got {x.dtype}{hint}")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm_lowp: a and b must be in the same format; got "
                        f"{_TYPES[a.dtype][0]} ({a.dtype}) and {_TYPES[b.dtype][0]} "
                        f"({b.dtype})")
    if out.dtype != np.float32:
        raise TypeError(f"gemm_lowp: out must be a float32 array (the product is "
                        f"accumulated and written in float32); got {out.dtype}")
    if len(out.shape) != 2:
        raise ValueError(f"gemm_lowp: out must be 2-D; got shape {out.shape}")
    m, k = a.shape[::-1] if trans_a else a.shape
    kb, n = b.shape[::-1] if trans_b else b.shape
    if k != kb or out.shape != (m, n):
        raise ValueError(
            f"gemm_lowp: shapes do not match: op(a) is {m}×{k} (a {a.shape}, trans_a="
            f"{trans_a}) and op(b) is {kb}×{n} (b {b.shape}, trans_b={trans_b})"
            + (f": their inner dimensions differ ({k} ≠ {kb})" if k != kb else
               f", so out must be {m}×{n}; got {out.shape}"))
    pa, lda = _layout("a", a)
    pb, ldb = _layout("b", b)
    pc, ldc = _layout("out", out)
    if _overlaps(out, a) or _overlaps(out, b):
        raise ValueError("gemm_lowp: out overlaps a or b in memory")
    if max(m, n, k, lda, ldb, ldc) > _INT_MAX:
        raise ValueError("gemm_lowp: a dimension or leading dimension exceeds 2³¹−1, the "
                         "limit of cuBLAS's 32-bit interface")
    dtype = _TYPES[a.dtype][1]
    work = "none" if m == 0 or n == 0 else "scale" if k == 0 else "gemm"
    # cuBLAS's C is out's memory read column-major: outᵀ (N×M) when out is row-major, so
    # outᵀ = op(b)ᵀ·op(a)ᵀ with b first; out itself (M×N) when column-major, a first. Each
    # operand is transposed by cuBLAS where its memory holds the transpose of what it must
    # multiply ("want": is that the transpose of the array?)
    if pc:
        first, p1, ld1, want1 = b, pb, ldb, not trans_b
        second, p2, ld2, want2 = a, pa, lda, not trans_a
        mm, nn = n, m
    else:
        first, p1, ld1, want1 = a, pa, lda, trans_a
        second, p2, ld2, want2 = b, pb, ldb, trans_b
        mm, nn = m, n
    return _GemmExArgs(work, _OP_T if p1 != want1 else _OP_N, _OP_T if p2 != want2 else _OP_N,
                       mm, nn, k, first.ptr, dtype, ld1, second.ptr, dtype, ld2, out.ptr,
                       CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)


def _scalar(name: str, value) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gemm_lowp: {name} must be a real number; got {value!r}")
    return float(value)


def _cupy_array(who: str, name: str, x):
    """``x`` if it is a CuPy ndarray; a TypeError naming the alternative otherwise. CuPy is
    imported only for an object whose type comes from it."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        if isinstance(x, cupy.ndarray):
            return cupy
    what = f"a NumPy {x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__
    cpu = {"gemm_lowp": "backprop.bf16.gemm_bf16", "to_lowp": "backprop.kernels.lowp.to_lowp",
           "from_bf16": "backprop.bf16.from_bf16"}[who]
    raise TypeError(f"{who}: {name} must be a CuPy array (this is the GPU module); got "
                    f"{what}. On the CPU use {cpu}")


def _same_device(who: str, **arrays) -> int:
    """The device id shared by ``arrays``; ValueError naming each one's otherwise."""
    ids = {name: x.device.id for name, x in arrays.items()}
    if len(set(ids.values())) > 1:
        where = ", ".join(f"{name} on cuda:{i}" for name, i in ids.items())
        raise ValueError(f"{who}: the arrays must be on one device; got {where}")
    return next(iter(ids.values()))


# ---------------------------------------------------------------------------------------
# The call
class GemmLowpPlan:
    """One checked low-precision product on fixed CuPy arrays, to run again and again:
    ``plan()`` is ``gemm_lowp(a, b, out, ...)`` without the checks (the arrays' contents may
    change between calls, not their memory: the plan holds them). Each call is queued on
    the stream current at the call (not at planning), on the arrays' device (made current
    for the call where another is). Made by :func:`plan_gemm_lowp`.

    ``kind`` is ``"bfloat16"`` or ``"float16"``; ``args`` the planned ``cublasGemmEx``
    arguments (a named tuple: ``work``, ``transa``, ``transb``, ``m``, ``n``, ``k``,
    ``A``, ``lda``, ``B``, ``ldb``, ``C``, ``ldc``, ...)."""

    __slots__ = ("kind", "args", "alpha", "beta", "_arrays", "_device", "_current", "_run",
                 "_scalars")

    def __call__(self):
        run = self._run
        if run is not None:
            if self._current() != self._device.id:
                with self._device:
                    run()
            else:
                run()
        return self._arrays[2]

    def __repr__(self):
        a, b, out = self._arrays
        return (f"<GemmLowpPlan {self.kind} on cuda:{self._device.id}: out{out.shape} from "
                f"a{a.shape}, b{b.shape} ({self.args.work})>")


def _gemm_runner(args: _GemmExArgs, scalars: np.ndarray):
    """The closure that issues the planned ``cublasGemmEx`` on the current device."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    get_handle = cupy.cuda.device.get_cublas_handle
    current_stream = cupy.cuda.get_current_stream
    call = (args.transa, args.transb, args.m, args.n, args.k, scalars.ctypes.data,
            args.A, args.Atype, args.lda, args.B, args.Btype, args.ldb,
            scalars.ctypes.data + scalars.itemsize, args.C, args.Ctype, args.ldc,
            args.compute_type, args.algo)
    set_stream, set_pointer_mode, gemm_ex = (cublas.setStream, cublas.setPointerMode,
                                             cublas.gemmEx)

    def run():
        # The handle is CuPy's, per thread and device: fetched per call, never cached.
        # CuPy's gemmEx binding moves it to the current stream only once some stream was
        # made current in the process; set explicitly, the product is ordered on the stream
        # current now (the null stream, a Stream in a `with`, or the per-thread default).
        # alpha and beta are host pointers: host mode is CuPy's standing mode (its matmul
        # passes host pointers without setting it), set here in case other code left the
        # handle in device mode.
        handle = get_handle()
        set_stream(handle, current_stream().ptr)
        set_pointer_mode(handle, _POINTER_MODE_HOST)
        gemm_ex(handle, *call)

    return run


def plan_gemm_lowp(a, b, out, trans_a: bool = False, trans_b: bool = False,
                   alpha: float = 1.0, beta: float = 0.0) -> GemmLowpPlan:
    """Check the arguments of :func:`gemm_lowp` once and return a :class:`GemmLowpPlan` that
    computes that product on those arrays whenever it is called (nothing is computed now;
    cuBLAS is loaded now, so a missing library fails here)."""
    cupy = _cupy_array("gemm_lowp", "a", a)
    _cupy_array("gemm_lowp", "b", b)
    _cupy_array("gemm_lowp", "out", out)
    trans_a, trans_b = bool(trans_a), bool(trans_b)
    alpha = _scalar("alpha", alpha)
    beta = _scalar("beta", beta)
    args = _gemm_ex_args(_matrix(a), _matrix(b), _matrix(out), trans_a, trans_b)
    device = _same_device("gemm_lowp", a=a, b=b, out=out)
    plan = GemmLowpPlan()
    plan.kind = _TYPES[np.dtype(a.dtype)][0]
    plan.args = args
    # cuBLAS takes float alpha and beta for CUBLAS_COMPUTE_32F: rounded to float32 here,
    # kept in the plan so that the host pointers stay valid for its lifetime
    plan._scalars = np.array([alpha, beta], np.float32)
    plan.alpha, plan.beta = (float(v) for v in plan._scalars)
    plan._arrays = (a, b, out)
    plan._device = cupy.cuda.Device(device)
    plan._current = cupy.cuda.runtime.getDevice
    if args.work == "gemm":
        plan._run = _gemm_runner(args, plan._scalars)
    elif args.work == "scale":  # K = 0: no product, out = beta·out (beta = 0 clears NaN)
        beta32 = plan._scalars[1]
        if beta32 == 0:
            plan._run = lambda: out.fill(0)
        else:
            plan._run = lambda: cupy.multiply(out, beta32, out=out)
    else:
        plan._run = None
    return plan


def gemm_lowp(a, b, out, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
              beta: float = 0.0):
    """``out = alpha · op(a) · op(b) + beta · out`` on the GPU: bf16 or fp16 operands,
    float32 sums and output, through cuBLAS (``cublasGemmEx``, ``CUBLAS_COMPUTE_32F``).

    ``a``, ``b``: 2-D CuPy arrays of one low-precision format: ``uint16`` (bfloat16 bit
    patterns, as :func:`to_lowp` writes them) or ``float16``; ``op(x)`` is ``x.T`` where
    ``trans_x`` is set, else ``x``; ``op(a)`` is M×K, ``op(b)`` K×N. ``out``: a float32
    M×N CuPy array, not overlapping ``a`` or ``b``; read only where ``beta != 0``
    (``beta=0`` overwrites NaN too, as BLAS does; ``beta=1`` accumulates). All three on one
    device. Each array may be C-contiguous, a transposed view of one (Fortran order), or a
    block of a larger matrix with unit stride along one axis: the layout goes to cuBLAS as
    its transpose flag and leading dimension, nothing is copied; anything else (a strided
    or broadcast view) is refused, naming ``cupy.ascontiguousarray``. ``alpha`` and
    ``beta`` are rounded to float32. The product is queued on the current CuPy stream and
    returns at once; ``out`` is returned. For the same product on the same arrays many
    times, check once with :func:`plan_gemm_lowp`.

    Precision. A product of two bf16 numbers (8 + 8 significant bits) or two fp16 numbers
    (11 + 11) is exact in float32, so the result differs from the exact product of the
    operands only by float32 rounding of the sums:
    ``|out − exact| ≤ (K + 2)·2⁻²⁴·(|alpha|·(|op(a)|·|op(b)|) + |beta|·|out₀|)`` elementwise
    for any order of summation with round-to-nearest additions (docs/bf16.md, "Precision").
    Tensor cores may instead align the products of a block to the largest and truncate
    (Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores",
    2021), which at worst doubles the error per addition; the GPU tests hold cuBLAS to the
    bound above on random data. The summation order is cuBLAS's choice: results are not
    bitwise reproducible across GPUs or cuBLAS versions, nor equal to the CPU's
    :func:`backprop.bf16.gemm_bf16`. bf16 has float32's exponent range; fp16 overflows past
    65504, which is why fp16 training scales its loss.

    Speed: bf16 runs on tensor cores from compute capability 8.0 (A100, H100), fp16 from
    7.0; :func:`support` says which this GPU has. Elsewhere cuBLAS may refuse bf16
    (``CUBLAS_STATUS_NOT_SUPPORTED``) or run it no faster than float32.
    """
    return plan_gemm_lowp(a, b, out, trans_a, trans_b, alpha, beta)()


# ---------------------------------------------------------------------------------------
# Conversions
CONVERSION_KERNELS = {
    "to_bf16": ElementwiseSpec("bp_lowp_to_bf16", "float32 x", "uint16 y",
                               "y = backprop_bf16_bits(x)", preamble=CUDA_BF16_BITS),
    "to_fp16": ElementwiseSpec("bp_lowp_to_fp16", "float32 x", "float16 y",
                               "y = float16(x)"),
    "from_bf16": ElementwiseSpec("bp_lowp_from_bf16", "uint16 h", "float32 y",
                                 "y = __uint_as_float(((unsigned int)h) << 16)"),
}
"""The conversion kernels as data (``ElementwiseSpec`` of ``backprop.kernels.cupy_kernels``):
``to_bf16`` uses ``backprop_bf16_bits`` (``CUDA_BF16_BITS``), not ``__float2bfloat16_rn``,
whose NaN is canonical; ``to_fp16`` rounds to nearest even (``__float2half``, through CuPy's
``float16``); ``from_bf16`` is a 16-bit shift. CuPy compiles each at its first launch."""

_KERNELS: dict = {}
_KERNELS_LOCK = threading.Lock()


def _conversion_kernel(name: str):
    """The ``cupy.ElementwiseKernel`` of :data:`CONVERSION_KERNELS` ``[name]``, created once
    (creating one needs no device; CuPy compiles at the first launch)."""
    kernel = _KERNELS.get(name)
    if kernel is None:
        import cupy

        spec = CONVERSION_KERNELS[name]
        with _KERNELS_LOCK:
            kernel = _KERNELS.setdefault(name, cupy.ElementwiseKernel(
                spec.in_params, spec.out_params, spec.operation, spec.name,
                preamble=spec.preamble))
    return kernel


def to_lowp(x, out):
    """``out ← x`` in ``out``'s low-precision format, on the GPU; returns ``out``.

    ``x``: a float32 CuPy array (any shape and strides; float64 is refused, as it could
    round twice). ``out``: a CuPy array of ``x``'s shape on its device, not overlapping it:
    ``uint16`` for bfloat16 bits (round to nearest, ties to even; NaN stays NaN, made quiet
    with sign and upper payload kept; ±inf kept; overflow to ±inf; subnormals rounded, not
    flushed: bit for bit :func:`backprop.bf16.to_bf16`), or ``float16`` (IEEE round to
    nearest even; overflow past 65504 to ±inf). One elementwise kernel on the current
    stream."""
    _cupy_array("to_lowp", "x", x)
    cupy = _cupy_array("to_lowp", "out", out)
    if x.dtype != np.float32:
        raise TypeError(f"to_lowp converts float32 arrays; got {x.dtype}. Pass "
                        "x.astype(cupy.float32) (a float64 value may then round twice)")
    if out.dtype == np.uint16:
        name = "to_bf16"
    elif out.dtype == np.float16:
        name = "to_fp16"
    else:
        raise TypeError(f"to_lowp: out must be uint16 (bfloat16 bits) or float16; got "
                        f"{out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"to_lowp: out must have x's shape {x.shape}; got {out.shape}")
    _same_device("to_lowp", x=x, out=out)
    if cupy.may_share_memory(out, x):
        raise ValueError("to_lowp: out overlaps x; pass a separate buffer")
    if x.size:
        with x.device:
            _conversion_kernel(name)(x, out)
    return out


def from_bf16(h, out=None):
    """bfloat16 bit patterns (a ``uint16`` CuPy array, any shape and strides) → float32,
    exactly (every bf16 value is a float32 value; NaN payloads kept). ``out``: a float32
    CuPy array of ``h``'s shape on its device, or None for a new one. Returns ``out``."""
    cupy = _cupy_array("from_bf16", "h", h)
    if h.dtype != np.uint16:
        raise TypeError(f"from_bf16: h must hold bfloat16 bit patterns (uint16); got "
                        f"{h.dtype}")
    if out is None:
        with h.device:
            out = cupy.empty(h.shape, cupy.float32)
    else:
        _cupy_array("from_bf16", "out", out)
        if out.dtype != np.float32:
            raise TypeError(f"from_bf16: out must be a float32 array; got {out.dtype}")
        if out.shape != h.shape:
            raise ValueError(f"from_bf16: out must have h's shape {h.shape}; got "
                             f"{out.shape}")
        _same_device("from_bf16", h=h, out=out)
        if cupy.may_share_memory(out, h):
            raise ValueError("from_bf16: out overlaps h; pass a separate buffer")
    if h.size:
        with h.device:
            _conversion_kernel("from_bf16")(h, out)
    return out


# ---------------------------------------------------------------------------------------
# What the GPU offers
def _device_index(device) -> int | None:
    """None (the current device), an int, ``"cuda:N"``, a backprop Device or a CuPy
    Device, as an index (None stays None)."""
    if device is None:
        return None
    if isinstance(device, numbers.Integral) and not isinstance(device, bool):
        return int(device)
    if hasattr(device, "id") and type(device).__module__.startswith("cupy"):
        return int(device.id)
    from backprop.backend import Device, parse_device

    parsed = parse_device(device) if not isinstance(device, Device) else device
    if not isinstance(parsed, Device) or parsed.kind != "cuda":
        raise ValueError(f"support: device must be a CUDA device (an index, 'cuda:N', or "
                         f"None for the current one); got {device!r}")
    return parsed.index


def support(device=None) -> dict:
    """What low-precision products this GPU and installation offer, and why.

    ``device``: None (CuPy's current device), an index, ``"cuda:N"`` or a device object.
    Keys: ``available`` (a usable CUDA device and cuBLAS), ``device`` (``"cuda:N"``),
    ``name``, ``compute_capability`` (``"9.0"``), ``sm`` (90), ``cublas_version``
    (cuBLAS's integer, e.g. 120905 for 12.9.5), ``bf16_fast`` (bf16 products on tensor
    cores: compute capability 8.0 or later), ``fp16_fast`` (fp16 on tensor cores: 7.0 or
    later), ``bf16_reason``, ``fp16_reason`` and ``reason`` (sentences saying why). Where
    CUDA is unusable (:func:`backprop.backend.cuda_status`), ``available`` is False, the
    rest None or False, and every reason says why; this function never raises for that.
    The mixed-precision mode should train in float32 where the format's ``*_fast`` is
    False."""
    from backprop.backend import cuda_status

    info = {"available": False, "device": None, "name": None, "compute_capability": None,
            "sm": None, "cublas_version": None, "bf16_fast": False, "fp16_fast": False,
            "bf16_reason": "", "fp16_reason": "", "reason": ""}

    def unavailable(why: str) -> dict:
        info["reason"] = info["bf16_reason"] = info["fp16_reason"] = why
        return info

    index = _device_index(device)
    status = cuda_status()
    if not status["available"]:
        return unavailable(f"CUDA is unavailable: {status['reason']}")
    import cupy

    if index is None:
        index = cupy.cuda.runtime.getDevice()
    if not 0 <= index < status["devices"]:
        raise ValueError(f"support: no device cuda:{index}; {status['devices']} CUDA "
                         "device(s) exist")
    dev = cupy.cuda.Device(index)
    cc = dev.compute_capability  # "90"
    sm = int(cc)
    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info.update(device=f"cuda:{index}", name=name, sm=sm,
                compute_capability=f"{sm // 10}.{sm % 10}")
    try:
        from cupy_backends.cuda.libs import cublas

        with dev:
            info["cublas_version"] = int(cublas.getVersion(cupy.cuda.device.get_cublas_handle()))
    except Exception as exc:  # libcublas missing or broken: no products at all
        return unavailable(f"cuBLAS cannot be used on cuda:{index} ({name}): "
                           f"{type(exc).__name__}: {exc}")
    info["available"] = True
    where = f"{name} (sm_{sm})"
    info["bf16_fast"] = sm >= 80
    info["bf16_reason"] = (f"bf16 products on tensor cores: {where}" if sm >= 80 else
                           f"{where} has no bf16 tensor cores (compute capability 8.0+): "
                           "cuBLAS refuses bf16 products or runs them no faster than float32")
    info["fp16_fast"] = sm >= 70
    info["fp16_reason"] = (f"fp16 products on tensor cores: {where}" if sm >= 70 else
                           f"{where} has no tensor cores (compute capability 7.0+): fp16 "
                           "products are no faster than float32")
    version = info["cublas_version"]
    info["reason"] = (f"cuBLAS {version // 10000}.{version // 100 % 100}.{version % 100} on "
                      f"{where}: " + ("bf16 and fp16 on tensor cores" if sm >= 80 else
                                      "fp16 on tensor cores, bf16 not" if sm >= 70 else
                                      "no tensor cores"))
    return info
