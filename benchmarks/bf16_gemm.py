"""bf16 GEMMs against float32 ones at the shapes of the four benchmark MLPs (docs/bf16.md).

    python benchmarks/bf16_gemm.py [--threads 1,2] [--rounds 9] [--min-time 0.02]
        [--onednn-lib PATH ...] [--no-torch] [--out FILE]

For every matrix product of a Dense layer's training step (forward ``X Wᵀ``, backward
``δᵀX`` and ``δW``; the first layer has no ``δW``) of tiny 64-32-10 b32, digits
64-128-128-10 b64, mnist 784-256-256-10 b128 and wide 1024-2048-2048-10 b256, and for
256×2048×2048, it times per call, at each thread count:

- ``f32``: NumPy's float32 ``matmul`` into ``out=`` (OpenBLAS here; threads capped with
  threadpoolctl);
- ``mkl``: MKL's ``cblas_gemm_bf16bf16f32`` through a :func:`backprop.bf16.plan_gemm_bf16`
  plan (checked once, as a training step's products on its persistent buffers would be;
  operands already bf16; the thread count set with MKL's thread-local setting), and
  ``mkl+cvt``: the same after converting both float32 operands with
  :func:`backprop.bf16.to_bf16` (what a step pays where no epilogue writes the bf16 copy);
- ``onednn[-VERSION]``: a oneDNN matmul primitive through its C API (ctypes; primitives
  cached per shape; transposes as strides), for each ``--onednn-lib`` given (a libdnnl.so
  path: the ``onednn-cpu-gomp`` wheel's honours the thread count through GNU OpenMP; a SYCL
  build, like the ``onednn`` wheel's, needs ``OCL_ICD_FILENAMES`` pointing at the wheel's
  ``libintelocl.so`` and ``LD_LIBRARY_PATH`` at its libraries, and runs on all cores);
- ``torch``: ``torch.matmul`` of bfloat16 tensors (oneDNN inside PyTorch; output bf16, so
  not a drop-in: a reference for the speed only), where torch imports.

Then the per-call overhead (a 1×1×1 product: the raw ctypes call, the checked wrapper,
NumPy, oneDNN, torch), the conversions at 256×2048 (NumPy, Numba serial and parallel,
ml_dtypes), and a per-MLP total of the step's products. Noise control for a shared machine:
the variants of one shape are interleaved round by round (the order rotates), each sample
is the mean of enough calls to take ``--min-time``, and the table shows the median of
``--rounds`` samples; the load average before and after is printed. Prints Markdown.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time

import numpy as np

from backprop import bf16
from backprop.bf16 import from_bf16, gemm_bf16, plan_gemm_bf16, to_bf16

MLPS = {  # name: (batch, layer sizes), as benchmarks/workloads.py
    "tiny": (32, (64, 32, 10)),
    "digits": (64, (64, 128, 128, 10)),
    "mnist": (128, (784, 256, 256, 10)),
    "wide": (256, (1024, 2048, 2048, 10)),
}


def products(batch, sizes):
    """(label, M, N, K, trans_a, trans_b) of one training step's products, layer by layer."""
    out = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = f"{fan_in}→{fan_out}"
        out.append((f"{layer} fwd XWᵀ", batch, fan_out, fan_in, False, True))
        out.append((f"{layer} ∂W=δᵀX", fan_out, fan_in, batch, True, False))
        if i:
            out.append((f"{layer} ∂X=δW", batch, fan_in, fan_out, False, False))
    return out


# ---------------------------------------------------------------------------------------
# oneDNN through its C API (v3): engine, stream, one matmul primitive per shape
class OneDNN:
    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)

        class Version(ctypes.Structure):
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int),
                        ("patch", ctypes.c_int), ("hash", ctypes.c_char_p),
                        ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]

        lib.dnnl_version.restype = ctypes.POINTER(Version)
        v = lib.dnnl_version().contents
        runtime = {1: "seq", 2: "omp", 4: "tbb", 8: "threadpool", 512: "sycl"}
        self.runtime = runtime.get(v.cpu_runtime, str(v.cpu_runtime))
        self.name = f"onednn-{v.major}.{v.minor}-{self.runtime}"
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        start = time.perf_counter()
        self._check(lib.dnnl_engine_create(ctypes.byref(self.engine), 1, ctypes.c_size_t(0)),
                    "engine (a SYCL build needs OCL_ICD_FILENAMES, see the docstring)")
        self._check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine,
                                           ctypes.c_uint(1)), "stream")
        self.engine_ms = (time.perf_counter() - start) * 1e3
        self.cache: dict = {}
        self.create_ms: list[float] = []
        self.impl: set = set()
        self.omp = None
        if self.runtime == "omp":
            self.omp = ctypes.CDLL("libgomp.so.1").omp_set_num_threads

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"oneDNN {what}: status {status}")

    def _md(self, shape, strides, dtype):
        dims = ctypes.c_int64 * 12
        md = ctypes.c_void_p()
        self._check(self.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), 2, dims(*shape), dtype, dims(*strides)), "memory desc")
        return md

    def primitive(self, m, n, k, ta, tb):
        key = (m, n, k, ta, tb)
        if key not in self.cache:
            start = time.perf_counter()
            lib, bf, f32 = self.lib, 2, 3
            a_md = self._md((m, k), (1, m) if ta else (k, 1), bf)
            b_md = self._md((k, n), (1, k) if tb else (n, 1), bf)
            c_md = self._md((m, n), (n, 1), f32)
            attr = ctypes.c_void_p()
            self._check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attr")
            pd = ctypes.c_void_p()
            self._check(lib.dnnl_matmul_primitive_desc_create(
                ctypes.byref(pd), self.engine, a_md, b_md, None, c_md, attr), "matmul desc")
            impl = ctypes.c_char_p()
            lib.dnnl_primitive_desc_query(pd, 8, 0, ctypes.byref(impl))  # impl_info_str
            self.impl.add(impl.value.decode())
            prim = ctypes.c_void_p()
            self._check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive")
            mems = []
            for md in (a_md, b_md, c_md):
                mem = ctypes.c_void_p()
                self._check(lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, None),
                            "memory")
                mems.append(mem)

            class Arg(ctypes.Structure):
                _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]

            args = (Arg * 3)(Arg(1, mems[0]), Arg(33, mems[1]), Arg(17, mems[2]))
            self.cache[key] = (prim, mems, args)
            self.create_ms.append((time.perf_counter() - start) * 1e3)
        return self.cache[key]

    def call(self, prim, a, b, c):
        handle = self.lib.dnnl_memory_set_data_handle
        primitive, mems, args = prim
        handle(mems[0], ctypes.c_void_p(a.ctypes.data))
        handle(mems[1], ctypes.c_void_p(b.ctypes.data))
        handle(mems[2], ctypes.c_void_p(c.ctypes.data))
        self._check(self.lib.dnnl_primitive_execute(primitive, self.stream, 3, args), "exec")
        self._check(self.lib.dnnl_stream_wait(self.stream), "wait")

    def set_threads(self, n):
        if self.omp is not None:
            self.omp(n)


# ---------------------------------------------------------------------------------------
def sample(fn, min_time):
    """Mean seconds per call of ``fn`` over enough calls to take ``min_time``."""
    calls, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or calls >= 1 << 16:
            return elapsed / calls
        calls = max(calls * 2, int(calls * min_time / max(elapsed, 1e-9) * 1.2))


def interleaved(variants: dict, rounds: int, min_time: float, best: dict | None = None) -> dict:
    """Median seconds per call of each variant, sampled round-robin in rotating order (the
    fastest sample of each goes into ``best`` where given)."""
    for fn in variants.values():  # warm up (compile, pack, create primitives)
        fn()
        fn()
    names = list(variants)
    samples: dict = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(sample(variants[name], min_time))
    if best is not None:
        best.update({n: min(v) for n, v in samples.items()})
    return {n: statistics.median(v) for n, v in samples.items()}


def fmt(seconds):
    ms = seconds * 1e3
    return f"{ms:.4f}" if ms < 0.01 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="seconds per sample (default 0.02)")
    parser.add_argument("--onednn-lib", action="append", default=[],
                        help="path of a libdnnl.so to time as well (repeatable)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--mlps", default=",".join(MLPS),
                        help="comma-separated MLPs (default: all four)")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    lines: list[str] = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    from threadpoolctl import threadpool_info, threadpool_limits

    support = bf16.bf16_support()
    if support["library"] != "mkl":
        sys.exit(f"MKL's bf16 GEMM is not available: {support['reason']}")
    libraries = [OneDNN(path) for path in args.onednn_lib]
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None

    emit(f"# bf16 GEMM vs float32 ({platform.node() or 'host'}, {time.strftime('%Y-%m-%d')})")
    emit()
    emit(f"- command: `python {' '.join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))}`")
    emit(f"- load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    emit(f"- CPU: {cpu}, {os.cpu_count()} logical CPUs; AMX-BF16 {support['cpu_amx_bf16']}, "
         f"AVX512-BF16 {support['cpu_avx512_bf16']}")
    blas = [f"{i['internal_api']} {i.get('version')} ({i.get('threading_layer')})"
            for i in threadpool_info() if i["user_api"] == "blas"]
    emit(f"- float32: NumPy {np.__version__}, BLAS: {', '.join(blas)}")
    emit(f"- bf16: MKL {support['library_version']} ({support['library_path']}), threading "
         f"layer {support['threading_layer']}")
    for lib in libraries:
        emit(f"- {lib.name}: {lib.lib._name} (engine + stream: {lib.engine_ms:.1f} ms)")
    if torch is not None:
        emit(f"- torch {torch.__version__} (bf16 matmul, bf16 output: speed reference only)")
    emit(f"- median of {args.rounds} interleaved samples of ≥ {args.min_time * 1e3:.0f} ms "
         "each; ms per call")
    emit()

    rng = np.random.default_rng(0)
    mkl = bf16._mkl()
    raw_gemm = mkl["gemm"]
    totals: dict = {}
    best_totals: dict = {}

    shapes = [(name, *p) for name in args.mlps.split(",") for p in products(*MLPS[name])]
    shapes.append(("large", "256×2048×2048 NN", 256, 2048, 2048, False, False))
    columns = ["f32", "mkl", "mkl+cvt"] + [lib.name for lib in libraries] + (
        ["torch"] if torch is not None else [])
    for threads in thread_counts:
        emit(f"## {threads} thread{'s' if threads > 1 else ''}")
        emit()
        emit("| MLP | product | M×N×K | " + " | ".join(columns)
             + " | f32/mkl | f32/(mkl+cvt) |")
        emit("|---|---|---|" + "---:|" * (len(columns) + 2))
        if torch is not None:
            torch.set_num_threads(threads)
        for lib in libraries:
            lib.set_threads(threads)
        for mlp, label, m, n, k, ta, tb in shapes:
            a32 = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
            b32 = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
            a16, b16 = to_bf16(a32), to_bf16(b32)
            a_cvt, b_cvt = np.empty_like(a16), np.empty_like(b16)
            out = np.empty((m, n), np.float32)
            opa, opb = (a32.T if ta else a32), (b32.T if tb else b32)
            plan = plan_gemm_bf16(a16, b16, out, ta, tb, threads=threads)
            plan_cvt = plan_gemm_bf16(a_cvt, b_cvt, out, ta, tb, threads=threads)

            def convert_and_multiply(plan_cvt=plan_cvt, a32=a32, b32=b32, a_cvt=a_cvt,
                                     b_cvt=b_cvt):
                to_bf16(a32, a_cvt)
                to_bf16(b32, b_cvt)
                plan_cvt()

            variants = {
                "f32": lambda: np.matmul(opa, opb, out=out),
                "mkl": plan,
                "mkl+cvt": convert_and_multiply,
            }
            for lib in libraries:
                prim = lib.primitive(m, n, k, ta, tb)
                variants[lib.name] = (lambda lib=lib, prim=prim:
                                      lib.call(prim, a16, b16, out))
            if torch is not None:
                ta16 = torch.from_numpy(a16.view(np.int16)).view(torch.bfloat16)
                tb16 = torch.from_numpy(b16.view(np.int16)).view(torch.bfloat16)
                ta16, tb16 = (ta16.T if ta else ta16), (tb16.T if tb else tb16)
                variants["torch"] = lambda: torch.matmul(ta16, tb16)
            fastest: dict = {}
            with threadpool_limits(limits=threads, user_api="blas"):
                result = interleaved(variants, args.rounds, args.min_time, fastest)
            for name, seconds in result.items():
                for table, value in ((totals, seconds), (best_totals, fastest[name])):
                    table.setdefault((threads, mlp), {}).setdefault(name, 0.0)
                    table[(threads, mlp)][name] += value
            cells = [fmt(result[c]) for c in columns]
            emit(f"| {mlp} | {label} | {m}×{n}×{k} | " + " | ".join(cells)
                 + f" | {result['f32'] / result['mkl']:.2f} | "
                 f"{result['f32'] / result['mkl+cvt']:.2f} |")
        emit()

    for title, table in (("medians", totals), ("fastest samples (least disturbed by the "
                                               "machine's other load)", best_totals)):
        emit(f"## Per training step: the sum of the products above, {title}")
        emit()
        emit("| threads | MLP | " + " | ".join(columns) + " | f32/mkl | f32/(mkl+cvt) |")
        emit("|---|---|" + "---:|" * (len(columns) + 2))
        for (threads, mlp), t in table.items():
            if mlp == "large":
                continue
            emit(f"| {threads} | {mlp} | " + " | ".join(fmt(t[c]) for c in columns)
                 + f" | {t['f32'] / t['mkl']:.2f} | {t['f32'] / t['mkl+cvt']:.2f} |")
        emit()

    # per-call overhead: a 1×1×1 product is nothing but the call
    emit("## Per-call overhead (1×1×1 product, 1 thread), µs")
    emit()
    a1, b1, c1 = np.ones((1, 1), np.uint16), np.ones((1, 1), np.uint16), np.ones((1, 1),
                                                                                 np.float32)
    f1 = np.ones((1, 1), np.float32)
    mkl["set_threads"](1)
    bf16._LOCAL.threads = 1
    pointers = a1.ctypes.data, b1.ctypes.data, c1.ctypes.data
    variants = {
        "MKL raw ctypes call (pointers known)": lambda: raw_gemm(
            101, 111, 111, 1, 1, 1, 1.0, pointers[0], 1, pointers[1], 1, 0.0, pointers[2], 1),
        "gemm_bf16 (checks + MKL)": lambda: gemm_bf16(a1, b1, c1, threads=1),
        "plan_gemm_bf16 plan call (MKL)": plan_gemm_bf16(a1, b1, c1, threads=1),
        "gemm_bf16 emulation": lambda: gemm_bf16(a1, b1, c1, backend="emulate"),
        "NumPy float32 matmul(out=)": lambda: np.matmul(f1, f1, out=c1),
        "to_bf16 (1 element)": lambda: to_bf16(f1, a1),
        "from_bf16 (1 element)": lambda: from_bf16(a1, c1),
    }
    for lib in libraries:
        lib.set_threads(1)
        prim = lib.primitive(1, 1, 1, False, False)
        variants[f"{lib.name} execute + wait"] = (lambda lib=lib, prim=prim:
                                                  lib.call(prim, a1, b1, c1))
    if torch is not None:
        torch.set_num_threads(1)
        t1 = torch.ones((1, 1), dtype=torch.bfloat16)
        variants["torch.matmul bf16"] = lambda: torch.matmul(t1, t1)
    result = interleaved(variants, args.rounds, args.min_time)
    emit("| call | µs |")
    emit("|---|---:|")
    for name, seconds in result.items():
        emit(f"| {name} | {seconds * 1e6:.2f} |")
    for lib in libraries:
        emit(f"| {lib.name} primitive creation (median over shapes, once per shape) | "
             f"{statistics.median(lib.create_ms) * 1e3:.0f} |")
        emit(f"| {lib.name} implementations | {', '.join(sorted(lib.impl))} |")
    emit()

    emit("## Conversions at 256×2048 (524,288 elements), ms")
    emit()
    import numba

    @numba.njit(parallel=True, cache=False, nogil=True)
    def to_bf16_parallel(u, o):
        for i in numba.prange(u.size):
            v = u[i]
            if (v & 0x7FFFFFFF) > 0x7F800000:
                o[i] = (v >> 16) | 0x40
            else:
                o[i] = (v + 0x7FFF + ((v >> 16) & 1)) >> 16

    x = rng.standard_normal((256, 2048), dtype=np.float32)
    h, back = np.empty(x.shape, np.uint16), np.empty(x.shape, np.float32)
    kernel = bf16._kernel()
    flat_x, flat_h = x.reshape(-1).view(np.uint32), h.reshape(-1)
    variants = {
        "to_bf16: NumPy vectorised (any strides)": lambda: bf16._to_bf16_numpy(x, h),
        "to_bf16: Numba serial (the default)": lambda: kernel(flat_x, flat_h),
        "to_bf16: Numba parallel (all threads)": lambda: to_bf16_parallel(flat_x, flat_h),
        "from_bf16: NumPy shift (the default)": lambda: from_bf16(h, back),
        "float32 copy (memory floor)": lambda: np.copyto(back, x),
    }
    try:
        import ml_dtypes

        variants["to_bf16: ml_dtypes astype"] = lambda: x.astype(ml_dtypes.bfloat16)
        variants["from_bf16: ml_dtypes astype"] = lambda: h.view(ml_dtypes.bfloat16).astype(
            np.float32)
    except ImportError:
        pass
    result = interleaved(variants, args.rounds, args.min_time)
    emit("| conversion | ms |")
    emit("|---|---:|")
    for name, seconds in result.items():
        emit(f"| {name} | {seconds * 1e3:.3f} |")
    emit()
    emit(f"- load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
