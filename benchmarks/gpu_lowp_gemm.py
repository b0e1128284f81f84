"""Low-precision GEMMs on the GPU against float32 ones at the shapes of the four benchmark
MLPs (docs/bf16.md, "The GPU side").

    python benchmarks/gpu_lowp_gemm.py --out FILE [--rounds 11] [--min-time 0.005]
        [--device 0] [--mlps tiny,digits,mnist,wide]

For every matrix product of a Dense layer's training step (forward ``X Wᵀ``, backward
``∂W = δᵀX`` and ``∂X = δW``; the first layer has no ``∂X``, as in
``benchmarks/bf16_gemm.py``, whose shapes these are) of tiny 64-32-10 b32, digits
64-128-128-10 b64, mnist 784-256-256-10 b128 and wide 1024-2048-2048-10 b256, it times per
call, on CUDA events:

- ``f32``: ``cupy.matmul`` of float32 operands into ``out=`` (transposes as views, as the
  float32 layers run; CuPy's default compute type, TF32 only where ``CUPY_TF32=1``);
- ``bf16`` and ``fp16``: :func:`backprop.cuda_lowp.plan_gemm_lowp` plans (checked once, as a
  training step's products on persistent buffers would be; operands already converted),
  ``cublasGemmEx`` with float32 accumulation and output.

Each sample is the event time of enough back-to-back calls to take ``--min-time`` divided by
their number (so a product shorter than its launch shows the launch rate); the variants of a
shape are interleaved round by round, the order rotating, and the table shows the median of
``--rounds`` samples. Then the per-MLP sum over the step's products, and the per-call
overhead at 1×1×1 in host time (calls back to back, then one synchronize): the plan, the
checked :func:`backprop.cuda_lowp.gemm_lowp`, and ``cupy.matmul`` (which handles 1×1 results
with an elementwise kernel, not cuBLAS). Writes Markdown to ``--out`` (and prints it).
Exits with status 2 and a message saying why where no usable CUDA device exists.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_gemm import MLPS, products  # noqa: E402  (same shapes as the CPU study)

from backprop import cuda_lowp  # noqa: E402

FORMATS = {"bf16": "uint16", "fp16": "float16"}


def event_sample(cupy, fn, calls: int) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls, by CUDA events."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls


def calibrate(cupy, fn, min_time: float) -> int:
    """Calls per sample: enough to take ``min_time`` (after a warm-up)."""
    for _ in range(3):
        fn()
    calls = 1
    while True:
        t = event_sample(cupy, fn, calls) * calls
        if t >= min_time or calls >= 1 << 16:
            return calls
        calls = min(1 << 16, max(calls * 2, int(calls * min_time / max(t, 1e-7) * 1.2)))


def interleaved(cupy, variants: dict, rounds: int, min_time: float) -> dict:
    """Median seconds per call of each variant, sampled round by round in rotating order."""
    calls = {name: calibrate(cupy, fn, min_time) for name, fn in variants.items()}
    samples = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(event_sample(cupy, variants[name], calls[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def host_per_call(cupy, fn, calls: int, rounds: int) -> float:
    """Median host seconds per call: ``calls`` calls back to back, then one synchronize."""
    for _ in range(10):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def product_variants(cupy, m, n, k, trans_a, trans_b, rng):
    """f32, bf16 and fp16 callables for out(M×N) = op(a)·op(b), fresh random operands."""
    a32 = cupy.asarray(rng.standard_normal((k, m) if trans_a else (m, k)), cupy.float32)
    b32 = cupy.asarray(rng.standard_normal((n, k) if trans_b else (k, n)), cupy.float32)
    out = cupy.empty((m, n), cupy.float32)
    op_a, op_b = (a32.T if trans_a else a32), (b32.T if trans_b else b32)
    variants = {"f32": lambda: cupy.matmul(op_a, op_b, out=out)}
    for name, dtype in FORMATS.items():
        a = cuda_lowp.to_lowp(a32, cupy.empty(a32.shape, dtype))
        b = cuda_lowp.to_lowp(b32, cupy.empty(b32.shape, dtype))
        variants[name] = cuda_lowp.plan_gemm_lowp(a, b, cupy.empty((m, n), cupy.float32),
                                                  trans_a, trans_b)
    return variants


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}" if seconds < 1e-3 else f"{seconds * 1e6:.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="write the Markdown table here")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--min-time", type=float, default=0.005,
                        help="seconds of back-to-back calls per sample")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--mlps", default=",".join(MLPS),
                        help=f"comma-separated subset of {', '.join(MLPS)}")
    args = parser.parse_args(argv)
    mlps = [name.strip() for name in args.mlps.split(",") if name.strip()]
    unknown = sorted(set(mlps) - set(MLPS))
    if unknown:
        parser.error(f"unknown MLP(s) {', '.join(unknown)}; choose from {', '.join(MLPS)}")

    from backprop.backend import cuda_status

    if not cuda_status()["available"]:
        print(f"gpu_lowp_gemm: no usable CUDA device: {cuda_status()['reason']}",
              file=sys.stderr)
        return 2
    info = cuda_lowp.support(args.device)
    if not info["available"]:
        print(f"gpu_lowp_gemm: no usable CUDA device: {info['reason']}", file=sys.stderr)
        return 2

    import cupy
    import numpy as np

    cupy.cuda.Device(args.device).use()
    rt = cupy.cuda.runtime
    rng = np.random.default_rng(0)
    version = info["cublas_version"]
    lines = [
        f"# Low-precision GEMMs on {info['name']}",
        "",
        f"- {info['device']}, sm_{info['sm']}; cuBLAS {version // 10000}.{version // 100 % 100}"
        f".{version % 100}; CUDA runtime {rt.runtimeGetVersion()}, driver "
        f"{rt.driverGetVersion()}; CuPy {cupy.__version__}; CUPY_TF32="
        f"{os.environ.get('CUPY_TF32', 'unset')}",
        f"- {info['reason']}; bf16 fast: {info['bf16_fast']}, fp16 fast: {info['fp16_fast']}",
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; median of "
        f"{args.rounds} samples, each ≥ {args.min_time * 1e3:g} ms of back-to-back calls "
        "(CUDA events), variants interleaved",
        "",
        "## Per product (µs per call)",
        "",
        "| MLP | product | M×N×K | f32 | bf16 | fp16 | f32/bf16 | f32/fp16 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    totals = {}
    for mlp in mlps:
        batch, sizes = MLPS[mlp]
        total = dict.fromkeys(("f32", *FORMATS), 0.0)
        for label, m, n, k, trans_a, trans_b in products(batch, sizes):
            times = interleaved(cupy, product_variants(cupy, m, n, k, trans_a, trans_b, rng),
                                args.rounds, args.min_time)
            for name, t in times.items():
                total[name] += t
            lines.append(
                f"| {mlp} | {label} | {m}×{n}×{k} | {us(times['f32'])} | {us(times['bf16'])} "
                f"| {us(times['fp16'])} | {times['f32'] / times['bf16']:.2f} "
                f"| {times['f32'] / times['fp16']:.2f} |")
        totals[mlp] = total
    lines += ["", "## Per training step (sum of the step's products, µs)", "",
              "| MLP | f32 | bf16 | fp16 | f32/bf16 | f32/fp16 |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mlp, t in totals.items():
        lines.append(f"| {mlp} | {us(t['f32'])} | {us(t['bf16'])} | {us(t['fp16'])} "
                     f"| {t['f32'] / t['bf16']:.2f} | {t['f32'] / t['fp16']:.2f} |")

    # per-call overhead: what a tiny product costs the host
    one32 = cupy.ones((1, 1), cupy.float32)
    one16 = cuda_lowp.to_lowp(one32, cupy.empty((1, 1), cupy.uint16))
    out = cupy.empty((1, 1), cupy.float32)
    plan = cuda_lowp.plan_gemm_lowp(one16, one16, out)
    calls = {
        "plan_gemm_lowp plan() (bf16)": plan,
        "gemm_lowp (bf16, checked each call)": lambda: cuda_lowp.gemm_lowp(one16, one16, out),
        "cupy.matmul (f32, out=)": lambda: cupy.matmul(one32, one32, out=out),
    }
    lines += ["", "## Per-call overhead, 1×1×1 (host µs per call: back-to-back calls, then one "
              "synchronize)", "", "| call | µs |", "| --- | ---: |"]
    for name, fn in calls.items():
        lines.append(f"| {name} | {host_per_call(cupy, fn, 2000, args.rounds) * 1e6:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
