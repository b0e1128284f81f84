"""backprop.cuda_lowp: low-precision products and conversions on the GPU.

Two halves:

* Here, without a GPU. The ``cublasGemmEx`` arguments are planned by a pure function of the
  arrays' shapes, strides, dtypes and addresses (``cuda_lowp._gemm_ex_args``); the tests
  plan every transpose combination and operand layout (C-contiguous, ``.T`` views, blocks
  of larger matrices, row- and column-major ``out``) on NumPy buffers and *execute* the
  planned call with :func:`gemm_ex_emulated`, written from the cuBLAS documentation's
  definition of ``cublasGemmEx`` (column-major matrices at an address with a leading
  dimension; its argument rules), independently of the module. A wrong flag, swap or
  leading dimension reads the wrong elements or out of bounds, and fails. The argument
  checks that need no device, NVRTC compilation of the conversion kernels (CuPy's own
  generated source, as tests/test_cupy_compile.py does) and the bf16 conversion bodies run
  on the host through tests/cuda_host.py complete it.
* On a GPU (``ci/gpu.sh``, step ``lowp``): real products against a float64 reference of the
  low-precision operands within the float32 summation bound of docs/bf16.md, every
  transpose combination, alpha/beta, odd shapes, both formats, streams and plans; the
  conversions bit for bit against ``backprop.kernels.lowp.to_lowp`` on NumPy. These take the
  ``device`` fixture with "cuda" only, so they skip here with the reason
  (``cuda_status()["reason"]``).
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop import cuda_lowp
from backprop.bf16 import from_bf16 as np_from_bf16
from backprop.kernels import lowp

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["bfloat16", "float16"]
DTYPES = {"bfloat16": np.uint16, "float16": np.float16}
CUDA = pytest.mark.parametrize("device", ["cuda"], indirect=True)  # skipped without a GPU


# ---------------------------------------------------------------------------------------
# Operands
def lowp_array(kind: str, values: np.ndarray) -> np.ndarray:
    """float32 ``values`` in ``kind``'s storage (bf16 bits or float16), by the reference."""
    out = np.empty(values.shape, DTYPES[kind])
    return lowp.to_lowp(np.ascontiguousarray(values, np.float32), out)


def as_float64(x: np.ndarray) -> np.ndarray:
    """The exact values of a low-precision (or float32) array."""
    if x.dtype == np.uint16:
        return np_from_bf16(np.ascontiguousarray(x)).astype(np.float64)
    return x.astype(np.float64)


LAYOUTS = ["C", "T", "block", "Tblock"]


def operand(kind: str, shape, layout: str, rng) -> np.ndarray:
    """A ``shape`` low-precision matrix laid out as ``layout``: C-contiguous, the ``.T``
    view of a C-contiguous array, a block of a larger C-contiguous matrix (row stride
    larger than its width, not at the start of the buffer), or the ``.T`` of such a
    block."""
    rows, cols = shape
    transposed = layout.startswith("T")
    r, c = (cols, rows) if transposed else (rows, cols)
    if layout.endswith("block"):
        full = lowp_array(kind, rng.standard_normal((r + 3, c + 5)).astype(np.float32))
        x = full[2:2 + r, 1:1 + c]
    else:
        x = lowp_array(kind, rng.standard_normal((r, c)).astype(np.float32))
    return x.T if transposed else x


def out_array(shape, layout: str, rng) -> np.ndarray:
    """A float32 output: C-ordered, Fortran-ordered, or a row block of a wider array."""
    m, n = shape
    if layout == "C":
        return rng.standard_normal((m, n)).astype(np.float32)
    if layout == "F":
        return np.asfortranarray(rng.standard_normal((m, n)).astype(np.float32))
    return rng.standard_normal((m + 2, n + 4)).astype(np.float32)[1:1 + m, 3:3 + n]


# ---------------------------------------------------------------------------------------
# cublasGemmEx, emulated from its documented definition
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
TYPE_CODES = {14: np.uint16, 2: np.float16, 0: np.float32}  # CUDA_R_16BF, _16F, _32F


class DeviceMemory:
    """Addresses → bytes, as a device sees its memory: the registered arrays are whole
    allocations (each array's owner, contiguous); a pointer resolves to the bytes of its
    allocation from that address to the allocation's end."""

    def __init__(self, *arrays):
        self.blocks = []
        for x in arrays:
            while x.base is not None:
                x = x.base
            flat = x.ravel(order="K")  # memory order: a view of a contiguous owner
            assert np.shares_memory(flat, x) and flat.ctypes.data == x.ctypes.data
            self.blocks.append(flat.view(np.uint8))

    def flat(self, ptr: int, dtype) -> np.ndarray:
        for block in self.blocks:
            start = block.ctypes.data
            if start <= ptr < start + block.size:
                tail = block[ptr - start:]
                size = np.dtype(dtype).itemsize
                return tail[:tail.size // size * size].view(dtype)
        raise AssertionError(f"pointer {ptr:#x} is in no allocation")


def column_major(flat: np.ndarray, rows: int, cols: int, ld: int, what: str) -> np.ndarray:
    """The rows×cols column-major matrix whose (i, j) is ``flat[i + j·ld]`` (a view)."""
    if rows and cols:
        last = (rows - 1) + (cols - 1) * ld
        assert last < flat.size, (f"{what}: a {rows}×{cols} matrix with ld={ld} reads "
                                  f"element {last}, past the allocation's {flat.size}")
    size = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (size, ld * size))


def gemm_ex_emulated(memory: DeviceMemory, transa, transb, m, n, k, alpha, A, Atype, lda,
                     B, Btype, ldb, beta, C, Ctype, ldc, compute_type, algo) -> None:
    """``C = alpha·op(A)·op(B) + beta·C`` with cuBLAS's definitions: op(A) is m×k, op(B)
    k×n, C m×n, all column-major; A is m×k (``OP_N``, lda ≥ max(1, m)) or k×m (``OP_T``,
    lda ≥ max(1, k)); B is k×n (ldb ≥ max(1, k)) or n×k (ldb ≥ max(1, n)); ldc ≥
    max(1, m); C is not read where beta is 0. Invalid arguments fail as cuBLAS's
    ``CUBLAS_STATUS_INVALID_VALUE`` would. Sums in float64 (the check here is the layout,
    not the rounding)."""
    assert transa in (CUBLAS_OP_N, CUBLAS_OP_T) and transb in (CUBLAS_OP_N, CUBLAS_OP_T)
    assert min(m, n, k) >= 0, "INVALID_VALUE: negative dimension"
    assert Atype == Btype and Atype in (14, 2) and Ctype == 0, (Atype, Btype, Ctype)
    assert compute_type == 68, compute_type  # CUBLAS_COMPUTE_32F
    a_rows, a_cols = (m, k) if transa == CUBLAS_OP_N else (k, m)
    b_rows, b_cols = (k, n) if transb == CUBLAS_OP_N else (n, k)
    assert lda >= max(1, a_rows), f"INVALID_VALUE: lda={lda} < max(1, {a_rows})"
    assert ldb >= max(1, b_rows), f"INVALID_VALUE: ldb={ldb} < max(1, {b_rows})"
    assert ldc >= max(1, m), f"INVALID_VALUE: ldc={ldc} < max(1, {m})"
    if m == 0 or n == 0:
        return
    a = as_float64(column_major(memory.flat(A, TYPE_CODES[Atype]), a_rows, a_cols, lda, "A"))
    b = as_float64(column_major(memory.flat(B, TYPE_CODES[Btype]), b_rows, b_cols, ldb, "B"))
    c = column_major(memory.flat(C, np.float32), m, n, ldc, "C")
    op_a = a if transa == CUBLAS_OP_N else a.T
    op_b = b if transb == CUBLAS_OP_N else b.T
    result = alpha * (op_a @ op_b)
    if beta != 0:
        result += beta * c.astype(np.float64)
    c[...] = result


def run_planned(a, b, out, trans_a, trans_b, alpha=1.0, beta=0.0):
    """Plan with the module's pure function, execute with the emulator; returns the args."""
    args = cuda_lowp._gemm_ex_args(cuda_lowp._matrix(a), cuda_lowp._matrix(b),
                                   cuda_lowp._matrix(out), trans_a, trans_b)
    assert args.work == "gemm"
    gemm_ex_emulated(DeviceMemory(a, b, out), args.transa, args.transb, args.m, args.n,
                     args.k, np.float32(alpha), args.A, args.Atype, args.lda, args.B,
                     args.Btype, args.ldb, np.float32(beta), args.C, args.Ctype, args.ldc,
                     args.compute_type, args.algo)
    return args


SHAPES = [(5, 3, 7), (1, 4, 6), (6, 1, 2), (3, 5, 1), (1, 1, 1), (7, 9, 11), (2, 13, 3)]


@pytest.mark.parametrize("layout_b", LAYOUTS)
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
def test_planned_gemm_ex_computes_op_a_times_op_b(trans_a, trans_b, layout_a, layout_b):
    rng = np.random.default_rng(7)
    for kind, out_layout, (m, n, k) in itertools.product(KINDS, ["C", "F", "rows"], SHAPES):
        a = operand(kind, (k, m) if trans_a else (m, k), layout_a, rng)
        b = operand(kind, (n, k) if trans_b else (k, n), layout_b, rng)
        op_a, op_b = as_float64(a.T if trans_a else a), as_float64(b.T if trans_b else b)
        for alpha, beta in ((1.0, 0.0), (-0.5, 2.0)):
            out = out_array((m, n), out_layout, rng)
            out0 = out.astype(np.float64)
            if beta == 0:
                out[...] = np.nan  # not read where beta is 0
            run_planned(a, b, out, trans_a, trans_b, alpha, beta)
            want = alpha * (op_a @ op_b) + (beta * out0 if beta else 0)
            where = f"{kind} out={out_layout} m,n,k={m},{n},{k} alpha={alpha} beta={beta}"
            np.testing.assert_allclose(out, want.astype(np.float32), rtol=1e-6, atol=1e-6,
                                       err_msg=where)


def test_the_training_products_plan_as_documented():
    """The three products of a Dense layer on C-contiguous buffers, spelled out: the
    row-major out is computed as its transpose with the operands swapped."""
    batch, fan_in, fan_out = 6, 5, 3
    x = np.zeros((batch, fan_in), np.uint16)
    w = np.zeros((fan_out, fan_in), np.uint16)
    delta = np.zeros((batch, fan_out), np.uint16)
    m = cuda_lowp._matrix

    z = np.zeros((batch, fan_out), np.float32)  # Z = X·Wᵀ: Zᵀ = W·Xᵀ
    args = cuda_lowp._gemm_ex_args(m(x), m(w), m(z), False, True)
    assert (args.transa, args.transb, args.m, args.n, args.k) == (CUBLAS_OP_T, CUBLAS_OP_N,
                                                                  fan_out, batch, fan_in)
    assert (args.A, args.lda, args.B, args.ldb, args.ldc) == (
        w.ctypes.data, fan_in, x.ctypes.data, fan_in, fan_out)

    dw = np.zeros((fan_out, fan_in), np.float32)  # ∂W = δᵀ·X: ∂Wᵀ = Xᵀ·δ
    args = cuda_lowp._gemm_ex_args(m(delta), m(x), m(dw), True, False)
    assert (args.transa, args.transb, args.m, args.n, args.k) == (CUBLAS_OP_N, CUBLAS_OP_T,
                                                                  fan_in, fan_out, batch)
    assert (args.A, args.lda, args.B, args.ldb, args.ldc) == (
        x.ctypes.data, fan_in, delta.ctypes.data, fan_out, fan_in)

    dx = np.zeros((batch, fan_in), np.float32)  # ∂X = δ·W: ∂Xᵀ = Wᵀ·δᵀ
    args = cuda_lowp._gemm_ex_args(m(delta), m(w), m(dx), False, False)
    assert (args.transa, args.transb, args.m, args.n, args.k) == (CUBLAS_OP_N, CUBLAS_OP_N,
                                                                  fan_in, batch, fan_out)
    assert (args.A, args.lda, args.B, args.ldb, args.ldc) == (
        w.ctypes.data, fan_in, delta.ctypes.data, fan_out, fan_in)
    assert (args.Atype, args.Ctype, args.compute_type, args.algo) == (14, 0, 68, -1)
    assert cuda_lowp._gemm_ex_args(m(delta.astype(np.float16)), m(w.astype(np.float16)),
                                   m(dx), False, False).Atype == 2


def test_a_transposed_view_is_a_flag_not_a_copy():
    """``gemm(a, b.T)`` and ``gemm(a, b, trans_b=True)`` plan the same call."""
    a = np.zeros((4, 6), np.float16)
    b = np.zeros((5, 6), np.float16)
    out = np.zeros((4, 5), np.float32)
    m = cuda_lowp._matrix
    assert (cuda_lowp._gemm_ex_args(m(a), m(b.T), m(out), False, False)
            == cuda_lowp._gemm_ex_args(m(a), m(b), m(out), False, True))
    assert (cuda_lowp._gemm_ex_args(m(a.T), m(b.T), m(out), True, False)
            == cuda_lowp._gemm_ex_args(m(a), m(b), m(out), False, True))


def test_empty_products_need_no_call():
    m = cuda_lowp._matrix
    a, b = np.zeros((3, 0), np.uint16), np.zeros((0, 4), np.uint16)
    assert cuda_lowp._gemm_ex_args(m(a), m(b), m(np.zeros((3, 4), np.float32)), False,
                                   False).work == "scale"
    a, b = np.zeros((0, 2), np.uint16), np.zeros((2, 4), np.uint16)
    assert cuda_lowp._gemm_ex_args(m(a), m(b), m(np.zeros((0, 4), np.float32)), False,
                                   False).work == "none"
    # any strides will do for what is never read
    a = np.zeros((3, 0), np.uint16)[::-1]
    assert cuda_lowp._gemm_ex_args(m(a), m(b[:0].T.T), m(np.zeros((3, 4), np.float32)),
                                   False, False).work == "scale"


def _bad_cases():
    u16, f16, f32 = np.uint16, np.float16, np.float32
    a, b, out = np.zeros((4, 6), u16), np.zeros((6, 5), u16), np.zeros((4, 5), f32)
    buf = np.zeros(64, f32)
    return [
        ((a, np.zeros((7, 5), u16), out), ValueError, r"inner dimensions differ \(6 ≠ 7\)"),
        ((a, b, np.zeros((5, 4), f32)), ValueError, r"out must be 4×5; got \(5, 4\)"),
        ((a, b.astype(f16), out), TypeError, r"same format; got bfloat16 \(uint16\) and "
                                              r"float16 \(float16\)"),
        ((a.astype(f32), b, out), TypeError, "uint16 .*float16; got float32: convert"),
        ((a, b.astype(np.int16), out), TypeError, "got int16"),
        ((a, b, out.astype(f16)), TypeError, "out must be a float32 array"),
        ((a[0], b, out), ValueError, r"a must be 2-D; got shape \(6,\)"),
        ((a, b, out[0]), ValueError, "out must be 2-D"),
        ((np.zeros((8, 12), u16)[::2, ::2], b, out), ValueError,
         r"a \(shape \(4, 6\), strides \(48, 4\)\) is not a cuBLAS matrix.*"
         r"cupy.ascontiguousarray\(a\)"),
        ((a, np.zeros((6, 5), u16)[::-1], out), ValueError, "b .* is not a cuBLAS matrix"),
        ((a, np.broadcast_to(np.zeros(5, u16), (6, 5)), out), ValueError,
         "b .* not a cuBLAS matrix"),
        ((a, b, np.zeros((8, 10), f32)[::2, ::2]), ValueError,
         "out .* not a cuBLAS matrix.*C-contiguous out"),
        ((buf[:12].view(u16).reshape(4, 6), b, buf[10:30].reshape(4, 5)), ValueError,
         "out overlaps a or b"),
        ((a, buf[:15].view(u16).reshape(6, 5), buf[14:34].reshape(4, 5)), ValueError,
         "out overlaps a or b"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_are_refused_before_any_work(case):
    arrays, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        cuda_lowp._gemm_ex_args(*map(cuda_lowp._matrix, arrays), False, False)


def test_adjacent_buffers_do_not_overlap():
    buf = np.zeros(64, np.float32)
    a = buf[:12].view(np.uint16).reshape(4, 6)  # bytes 0..48
    out = buf[12:32].reshape(4, 5)               # bytes 48..128
    args = cuda_lowp._gemm_ex_args(*map(cuda_lowp._matrix, (a, np.zeros((6, 5), np.uint16),
                                                            out)), False, False)
    assert args.work == "gemm"


def test_the_entry_points_want_cupy_arrays():
    a, out = np.zeros((2, 2), np.uint16), np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="a must be a CuPy array.*backprop.bf16.gemm_bf16"):
        cuda_lowp.gemm_lowp(a, a, out)
    with pytest.raises(TypeError, match="must be a CuPy array"):
        cuda_lowp.plan_gemm_lowp(a, a, out)
    with pytest.raises(TypeError, match="x must be a CuPy array.*kernels.lowp.to_lowp"):
        cuda_lowp.to_lowp(out, a)
    with pytest.raises(TypeError, match="h must be a CuPy array.*backprop.bf16.from_bf16"):
        cuda_lowp.from_bf16(a)
    with pytest.raises(TypeError, match="got list"):
        cuda_lowp.gemm_lowp([[1]], a, out)


def test_alpha_and_beta_must_be_real_numbers():
    assert cuda_lowp._scalar("alpha", np.float32(0.5)) == 0.5
    assert cuda_lowp._scalar("beta", 2) == 2.0
    for bad in (True, "1", 1j, None):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            cuda_lowp._scalar("alpha", bad)


def test_importing_the_module_imports_no_cupy():
    code = ("import sys, backprop.cuda_lowp; "
            "assert 'cupy' not in sys.modules, 'importing cuda_lowp imported cupy'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_support_says_why_without_a_gpu():
    from backprop.backend import cuda_status

    status = cuda_status()
    if status["available"]:
        pytest.skip("a CUDA device is available: test_support_on_the_gpu covers it")
    info = cuda_lowp.support()
    assert info["available"] is False
    assert info["bf16_fast"] is False and info["fp16_fast"] is False
    assert info["compute_capability"] is None and info["cublas_version"] is None
    for key in ("reason", "bf16_reason", "fp16_reason"):
        assert status["reason"] in info[key]
    assert set(info) == {"available", "device", "name", "compute_capability", "sm",
                         "cublas_version", "bf16_fast", "fp16_fast", "bf16_reason",
                         "fp16_reason", "reason"}
    with pytest.raises(ValueError, match="must be a CUDA device"):
        cuda_lowp.support("cpu")


def test_the_benchmark_says_why_without_a_gpu(tmp_path):
    from backprop.backend import cuda_status

    status = cuda_status()
    if status["available"]:
        pytest.skip("a CUDA device is available: ci/gpu.sh runs the benchmark")
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_lowp_gemm.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no usable CUDA device" in done.stderr and status["reason"] in done.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# The conversion kernels without a GPU: NVRTC, and their bodies on the host
def _nvrtc_unavailable() -> str | None:
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        return f"CuPy's NVRTC cannot be loaded ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("name", sorted(cuda_lowp.CONVERSION_KERNELS))
def test_conversion_kernel_compiles_with_nvrtc(name, contiguous, monkeypatch):
    """The source CuPy generates for the kernel the module launches (1-D contiguous and
    2-D strided arguments), compiled as ``compile_with_cache`` does, for sm_90 (no device:
    only CuPy's architecture query is replaced)."""
    reason = _nvrtc_unavailable()
    if reason:
        pytest.skip(reason)
    import cupy
    from cupy._core import _carray, _kernel, core
    from cupy.cuda import compiler

    arch = os.environ.get("BACKPROP_NVRTC_ARCH", "90")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setattr(cuda_lowp, "_KERNELS", {})
    kernel = cuda_lowp._conversion_kernel(name)
    ndim = 1 if contiguous else 2
    infos, in_dtypes, out_dtypes = [], [], []
    for index, p in enumerate(kernel.params):
        if p.name == "_ind":
            infos.append(_kernel._ArgInfo(2, _carray.Indexer, None, ndim, True, True))
            continue
        infos.append(_kernel._ArgInfo(1, cupy.ndarray, p.dtype, ndim, contiguous, True))
        (in_dtypes if index < kernel.nin else out_dtypes).append(p.dtype)
    _, _, type_map = kernel._decide_params_type(tuple(in_dtypes), tuple(out_dtypes))
    source = _kernel._get_elementwise_kernel_code(
        tuple(infos), type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble,
        **kernel.kwargs)
    assert cuda_lowp.CONVERSION_KERNELS[name].operation in source
    source = "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + source
    options = core.assemble_cupy_compiler_options(()) + ("-ftz=true",)
    cubin, _ = compiler.compile_using_nvrtc(source, options, arch=arch)
    assert kernel.name.encode() in cubin


# bit patterns that exercise every branch of the conversions
SPECIAL_BITS = np.array([
    0x00000000, 0x80000000, 0x3F800000, 0xBF800000,   # ±0, ±1
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,   # ties to even (down, up), near ties
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,   # largest float32; rounding into inf
    0x7F800000, 0xFF800000,                           # ±inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00001,   # quiet and signalling NaNs, payloads
    0xFFBFFFFF, 0x7FFFFFFF,
    0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,  # subnormals
    0x477FE000, 0x477FF000, 0x477FEFFF, 0x38800000, 0x33800000, 0x33000000,  # fp16 edges
    0x33000001, 0xC77FF000,
], dtype=np.uint32)


def special_float32(rng, n_random: int = 4096) -> np.ndarray:
    random = rng.integers(0, 2**32, n_random, dtype=np.uint32)
    return np.concatenate([SPECIAL_BITS, random]).view(np.float32)


def test_bf16_conversion_bodies_run_on_the_host(monkeypatch):
    """``to_bf16`` and ``from_bf16`` as CuPy would loop them, compiled for the CPU with
    tests/cuda_host.h (its two CUDA intrinsics given host definitions), bit for bit against
    the NumPy references."""
    import cuda_host

    reason = cuda_host.unavailable_reason()
    if reason:
        pytest.skip(f"the CUDA kernels cannot run on the host: {reason}")
    monkeypatch.setitem(cuda_host._CUPY_TYPES, "uint16", ("unsigned short", np.uint16))
    intrinsics = ("static inline unsigned int __float_as_uint(float x) "
                  "{ unsigned int u; __builtin_memcpy(&u, &x, 4); return u; }\n"
                  "static inline float __uint_as_float(unsigned int u) "
                  "{ float x; __builtin_memcpy(&x, &u, 4); return x; }\n")
    specs = {name: dataclasses.replace(spec, preamble=intrinsics + spec.preamble)
             for name, spec in cuda_lowp.CONVERSION_KERNELS.items() if name != "to_fp16"}
    lib = cuda_host.build(elementwise=list(specs.values()))

    def launch(name, x, out):
        fn = getattr(lib, f"elementwise__{specs[name].name}__float")
        args = [x, out]
        pointers = [ctypes.c_void_p(a.ctypes.data) for a in args]
        if fn(ctypes.c_longlong(x.size), cuda_host._pointers(pointers), cuda_host._sizes(args)):
            raise RuntimeError(lib.cuda_host_error().decode())
        return out

    x = special_float32(np.random.default_rng(3))
    got = launch("to_bf16", x, np.empty(x.shape, np.uint16))
    want = lowp.to_lowp(x, np.empty(x.shape, np.uint16))
    np.testing.assert_array_equal(got, want)
    every = np.arange(2**16, dtype=np.uint16)
    got = launch("from_bf16", every, np.empty(every.shape, np.float32))
    np.testing.assert_array_equal(got.view(np.uint32), np_from_bf16(every).view(np.uint32))


# ---------------------------------------------------------------------------------------
# On a GPU
def bound(k, alpha, op_a, op_b, beta, out0):
    """docs/bf16.md, "Precision": float32 summation of exact products, any order."""
    scale = abs(alpha) * (np.abs(op_a) @ np.abs(op_b))
    if beta:
        scale = scale + abs(beta) * np.abs(out0)
    return (k + 2) * 2.0**-24 * scale


def check_product(got, k, alpha, op_a, op_b, beta, out0, where):
    exact = alpha * (op_a @ op_b) + (beta * out0 if beta else 0)
    err = np.abs(got.astype(np.float64) - exact)
    limit = bound(k, alpha, op_a, op_b, beta, out0)
    worst = float(np.max(err / np.maximum(limit, np.finfo(np.float64).tiny))) if err.size else 0
    assert np.all(err <= limit), f"{where}: error up to {worst:.3g}× the bound"


GPU_SHAPES = [(37, 23, 129), (1, 7, 5), (64, 10, 256), (3, 1, 1), (130, 67, 33), (8, 8, 2048)]


@CUDA
@pytest.mark.parametrize("layout_b", ["C", "T"])
@pytest.mark.parametrize("layout_a", ["C", "T"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("kind", KINDS)
def test_gemm_lowp_on_the_gpu(device, kind, trans_a, trans_b, layout_a, layout_b):
    import cupy

    rng = np.random.default_rng(11)
    for m, n, k in GPU_SHAPES:
        a = operand(kind, (k, m) if trans_a else (m, k), layout_a, rng)
        b = operand(kind, (n, k) if trans_b else (k, n), layout_b, rng)
        op_a, op_b = as_float64(a.T if trans_a else a), as_float64(b.T if trans_b else b)
        # on the device with the same layout: a .T view stays a .T view
        a_gpu = cupy.asarray(a.T).T if layout_a == "T" else cupy.asarray(a)
        b_gpu = cupy.asarray(b.T).T if layout_b == "T" else cupy.asarray(b)
        for alpha, beta in ((1.0, 0.0), (-0.75, 1.5), (2.0, 1.0)):
            out0 = rng.standard_normal((m, n)).astype(np.float32)
            out = cupy.asarray(out0 if beta else np.full((m, n), np.nan, np.float32))
            returned = cuda_lowp.gemm_lowp(a_gpu, b_gpu, out, trans_a, trans_b, alpha, beta)
            assert returned is out
            check_product(out.get(), k, alpha, op_a, op_b, beta, out0.astype(np.float64),
                          f"{kind} m,n,k={m},{n},{k} alpha={alpha} beta={beta}")


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_gemm_lowp_blocks_and_column_major_out_on_the_gpu(device, kind):
    import cupy

    rng = np.random.default_rng(5)
    m, n, k = 19, 33, 70
    for trans_a, trans_b, out_layout in itertools.product((False, True), (False, True),
                                                          ("F", "rows")):
        full_a = lowp_array(kind, rng.standard_normal((80, 90)).astype(np.float32))
        full_b = lowp_array(kind, rng.standard_normal((80, 90)).astype(np.float32))
        a_np = full_a[3:3 + (k if trans_a else m), 5:5 + (m if trans_a else k)]
        b_np = full_b[1:1 + (n if trans_b else k), 2:2 + (k if trans_b else n)]
        a_gpu = cupy.asarray(full_a)[3:3 + a_np.shape[0], 5:5 + a_np.shape[1]]
        b_gpu = cupy.asarray(full_b)[1:1 + b_np.shape[0], 2:2 + b_np.shape[1]]
        if out_layout == "F":
            out = cupy.asfortranarray(cupy.zeros((m, n), cupy.float32))
        else:
            out = cupy.zeros((m + 4, n + 6), cupy.float32)[2:2 + m, 1:1 + n]
        cuda_lowp.gemm_lowp(a_gpu, b_gpu, out, trans_a, trans_b)
        op_a = as_float64(a_np.T if trans_a else a_np)
        op_b = as_float64(b_np.T if trans_b else b_np)
        check_product(out.get(), k, 1.0, op_a, op_b, 0.0, None,
                      f"{kind} trans={trans_a},{trans_b} out={out_layout}")


@CUDA
def test_plan_reruns_on_the_current_contents_and_stream(device):
    import cupy
    from cupy_backends.cuda.libs import cublas

    rng = np.random.default_rng(2)
    a_np = lowp_array("bfloat16", rng.standard_normal((48, 40)).astype(np.float32))
    b_np = lowp_array("bfloat16", rng.standard_normal((40, 24)).astype(np.float32))
    a, b = cupy.asarray(a_np), cupy.asarray(b_np)
    out = cupy.zeros((48, 24), cupy.float32)
    plan = cuda_lowp.plan_gemm_lowp(a, b, out, beta=1.0)
    assert plan.kind == "bfloat16" and plan.args.work == "gemm" and "GemmLowpPlan" in repr(plan)
    exact = as_float64(a_np) @ as_float64(b_np)
    plan()
    plan()  # beta = 1 accumulates
    check_product(out.get(), 80, 2.0, as_float64(a_np), as_float64(b_np), 0.0, None, "twice")
    a[...] = cupy.asarray(lowp_array("bfloat16", np.ones((48, 40), np.float32)))
    out.fill(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    handle = cupy.cuda.device.get_cublas_handle()
    with stream:
        assert plan() is out
        assert cublas.getStream(handle) == stream.ptr
    stream.synchronize()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)  # not left on a dead stream
    want = np.ones((48, 40)) @ as_float64(b_np)
    check_product(out.get(), 40, 1.0, np.ones((48, 40)), as_float64(b_np), 0.0, None,
                  "new contents on a stream")
    assert not np.allclose(want, exact)


@CUDA
def test_zero_inner_dimension_scales_out_on_the_gpu(device):
    import cupy

    a, b = cupy.zeros((3, 0), cupy.float16), cupy.zeros((0, 4), cupy.float16)
    out = cupy.full((3, 4), 3.0, cupy.float32)
    cuda_lowp.gemm_lowp(a, b, out, beta=0.5)
    assert (out.get() == 1.5).all()
    out.fill(np.nan)
    cuda_lowp.gemm_lowp(a, b, out)
    assert (out.get() == 0).all()
    empty = cupy.zeros((0, 4), cupy.float32)
    assert cuda_lowp.gemm_lowp(cupy.zeros((0, 2), cupy.float16), cupy.zeros((2, 4),
                                                                           cupy.float16),
                               empty) is empty


@CUDA
def test_gemm_lowp_refuses_on_the_gpu(device):
    import cupy

    buf = cupy.zeros(64, cupy.float32)
    a = buf[:12].view(cupy.uint16).reshape(4, 6)
    with pytest.raises(ValueError, match="out overlaps"):
        cuda_lowp.gemm_lowp(a, cupy.zeros((6, 5), cupy.uint16), buf[10:30].reshape(4, 5))
    with pytest.raises(ValueError, match="not a cuBLAS matrix"):
        cuda_lowp.gemm_lowp(cupy.zeros((8, 12), cupy.uint16)[::2, ::2],
                            cupy.zeros((6, 5), cupy.uint16), cupy.zeros((4, 5), cupy.float32))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        cuda_lowp.gemm_lowp(a, cupy.zeros((6, 5), cupy.uint16),
                            cupy.zeros((4, 5), cupy.float32), alpha="2")
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            other = cupy.zeros((6, 5), cupy.uint16)
        with pytest.raises(ValueError, match="one device.*b on cuda:1"):
            cuda_lowp.gemm_lowp(a, other, cupy.zeros((4, 5), cupy.float32))


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_to_lowp_on_the_gpu_matches_the_reference_bitwise(device, kind):
    import cupy

    rng = np.random.default_rng(9)
    x = special_float32(rng, 50_000)
    want = lowp.to_lowp(x, np.empty(x.shape, DTYPES[kind]))
    got = cuda_lowp.to_lowp(cupy.asarray(x), cupy.empty(x.shape, DTYPES[kind])).get()
    nan = np.isnan(x)
    if kind == "float16":
        # NaN → NaN; the payload is the converter's (CUDA's canonical NaN, NumPy's kept bits)
        assert np.isnan(got[nan]).all()
        got, want = got[~nan], want[~nan]
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # strided input and output, another shape
    x2 = rng.standard_normal((40, 66)).astype(np.float32)
    out = cupy.zeros((40, 99), DTYPES[kind])[:, ::3]
    cuda_lowp.to_lowp(cupy.asarray(x2)[:, ::2], out[:, :33])
    want2 = lowp.to_lowp(np.ascontiguousarray(x2[:, ::2]), np.empty((40, 33), DTYPES[kind]))
    np.testing.assert_array_equal(out[:, :33].get().view(np.uint16), want2.view(np.uint16))
    with pytest.raises(ValueError, match="overlaps"):
        x3 = cupy.zeros(8, cupy.float32)
        cuda_lowp.to_lowp(x3, x3.view(DTYPES[kind])[:8])
    with pytest.raises(TypeError, match="converts float32"):
        cuda_lowp.to_lowp(cupy.zeros(3, cupy.float64), cupy.zeros(3, DTYPES[kind]))
    with pytest.raises(ValueError, match="shape"):
        cuda_lowp.to_lowp(cupy.zeros(3, cupy.float32), cupy.zeros(4, DTYPES[kind]))


@CUDA
def test_from_bf16_on_the_gpu_is_exact(device):
    import cupy

    every = np.arange(2**16, dtype=np.uint16)
    got = cuda_lowp.from_bf16(cupy.asarray(every)).get()
    np.testing.assert_array_equal(got.view(np.uint32), np_from_bf16(every).view(np.uint32))
    out = cupy.empty((256, 256), cupy.float32)
    assert cuda_lowp.from_bf16(cupy.asarray(every).reshape(256, 256).T, out) is out
    np.testing.assert_array_equal(out.get(), np_from_bf16(every.reshape(256, 256).T))
    with pytest.raises(TypeError, match="uint16"):
        cuda_lowp.from_bf16(cupy.zeros(3, cupy.float16))


@CUDA
def test_support_on_the_gpu(device):
    import cupy

    info = cuda_lowp.support()
    sm = int(cupy.cuda.Device().compute_capability)
    assert info["available"] is True and info["sm"] == sm
    assert info["device"] == f"cuda:{cupy.cuda.runtime.getDevice()}"
    assert info["compute_capability"] == f"{sm // 10}.{sm % 10}"
    assert info["bf16_fast"] == (sm >= 80) and info["fp16_fast"] == (sm >= 70)
    assert info["cublas_version"] > 10000 and info["name"] in info["reason"]
    assert cuda_lowp.support(0)["device"] == "cuda:0"
    assert cuda_lowp.support("cuda:0")["sm"] == cuda_lowp.support(0)["sm"]
    with pytest.raises(ValueError, match="no device"):
        cuda_lowp.support(cupy.cuda.runtime.getDeviceCount())
