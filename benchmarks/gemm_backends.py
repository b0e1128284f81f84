"""Training steps with the Dense layers' products on NumPy's BLAS against MKL, in one process.

    python benchmarks/gemm_backends.py [--models mnist,wide,b1024,b4096,digits]
        [--rounds 10] [--seconds 0.5] [--products tiny,digits,mnist] [--out-dir DIR]
        [--smoke]

The hand-written Adam loop of ``frameworks.py`` (same weights and data); every round runs
the step for about ``--seconds`` under ``backprop.gemm.set_backend("numpy")`` and as long
under ``"mkl"``, in an order reversed every other round, so that both see the host's speed
of the moment (the 2-core VM's GEMM speed moves in steps of seconds). Reports each
backend's median step and the median (and range) of the per-round ratios numpy / mkl
(>1×: MKL faster). Needs the ``mkl`` wheel (``pip install backprop[mkl]``); without it the
script says so and exits 0. Writes ``gemm_backends.json`` and ``.md`` to ``--out-dir``.

``--products``: each product of the named MLPs' steps alone (``X Wᵀ``, ``δᵀX``, ``δW`` per
Dense layer): NumPy's ``matmul`` under the OpenBLAS thread cap the model's passes run under
(``backprop.blas``) against ``backprop.gemm.product`` on MKL, the two alternated, median
of the repeats' per-call times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_MODELS = ("mnist", "wide", "b1024", "b4096", "digits")


def measure(name: str, rounds: int, seconds: float) -> dict:
    import frameworks
    import workloads
    from backprop import gemm

    mlp = workloads.MLPS.get(name) or workloads.LARGE_BATCH_MLPS[name]
    step = frameworks.backprop_training(frameworks.Spec.of(mlp), "loop")["step"]
    gemm.set_backend("numpy")
    start = time.perf_counter()
    for _ in range(3):
        step()
    steps = max(2, int(seconds / ((time.perf_counter() - start) / 3)))
    times: dict = {"numpy": [], "mkl": []}
    for r in range(rounds):
        for backend in (("numpy", "mkl") if r % 2 == 0 else ("mkl", "numpy")):
            gemm.set_backend(backend)
            for _ in range(2):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[backend].append((time.perf_counter() - start) / steps * 1e3)
    ratios = [a / b for a, b in zip(times["numpy"], times["mkl"])]
    return {"model": name, "sizes": list(mlp.sizes), "batch": mlp.batch, "steps": steps,
            "ms": {k: statistics.median(v) for k, v in times.items()},
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "rounds_mkl_faster": sum(x > 1 for x in ratios)}


def measure_products(name: str, repeats: int = 7, seconds: float = 0.02) -> list:
    """Per Dense layer of MLP ``name`` at its batch, the three products of a training step,
    each timed on OpenBLAS (capped as in a pass) and on MKL, alternated."""
    import numpy as np

    import workloads
    from backprop import blas, gemm

    mlp = workloads.MLPS.get(name) or workloads.LARGE_BATCH_MLPS[name]
    n = mlp.batch
    pairs = list(zip(mlp.sizes[:-1], mlp.sizes[1:]))
    cap = max(1, n * max(i * o for i, o in pairs) // blas.MACS_PER_THREAD)
    rng = np.random.default_rng(0)
    rows = []
    for i, o in pairs:
        x = rng.standard_normal((n, i)).astype(np.float32)
        w = rng.standard_normal((o, i)).astype(np.float32)
        d = rng.standard_normal((n, o)).astype(np.float32)
        z, dw, dx = np.empty((n, o), np.float32), np.empty((o, i), np.float32), \
            np.empty((n, i), np.float32)
        forms = [("X·Wᵀ", lambda: np.matmul(x, w.T, out=z),
                  lambda: gemm.product(x, w, z, False, True)),
                 ("δᵀ·X", lambda: np.matmul(d.T, x, out=dw),
                  lambda: gemm.product(d, x, dw, True, False)),
                 ("δ·W", lambda: np.matmul(d, w, out=dx),
                  lambda: gemm.product(d, w, dx, False, False))]
        for form, on_numpy, on_mkl in forms:
            times: dict = {"numpy": [], "mkl": []}
            threshold, gemm.MKL_MIN_MACS = gemm.MKL_MIN_MACS, 1  # every size, for the table
            with blas.threads_for(cap * blas.MACS_PER_THREAD):
                gemm.set_backend("mkl")
                assert on_mkl(), "MKL declined a product of the layers' own shapes"
                start = time.perf_counter()
                on_numpy()
                calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-7)))
                for r in range(repeats):
                    for backend, fn in (("numpy", on_numpy), ("mkl", on_mkl))[::1 - 2 * (r % 2)]:
                        fn()
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[backend].append((time.perf_counter() - start) / calls * 1e6)
            gemm.MKL_MIN_MACS = threshold
            us = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"model": name, "shape": f"{n}×{i}×{o}", "form": form,
                         "us": us, "ratio": us["numpy"] / us["mkl"],
                         "layers_use": "mkl" if n * i * o >= threshold else "numpy"})
    return rows


def products_report(rows: list) -> str:
    lines = ["", "## Single products", "",
             "NumPy's `matmul` on OpenBLAS (capped as in a pass) against `gemm.product` on "
             "MKL, alternated; median µs per call. Ratio >1×: MKL faster. *Layers*: the "
             "library a Dense layer runs the product on (`gemm.MKL_MIN_MACS`).", "",
             "| model | N×in×out | product | OpenBLAS (µs) | MKL (µs) | ratio | layers |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['form']} | {r['us']['numpy']:.4g} | "
                     f"{r['us']['mkl']:.4g} | {r['ratio']:.2f}× | {r['layers_use']} |")
    return "\n".join(lines) + "\n"


def report(rows: list, command: str) -> str:
    lines = ["# Dense products: NumPy's BLAS against MKL (`backprop.gemm`)", "",
             f"Command: `{command}`", "",
             "Hand-written Adam loop; per round both backends for the same time, alternated "
             "in one process. Ratio = numpy / mkl step time (>1×: MKL faster), median over "
             "rounds (range; rounds MKL won).", "",
             "| model | batch | numpy (ms) | mkl (ms) | numpy / mkl |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']['numpy']:.4g} | "
                     f"{r['ms']['mkl']:.4g} | {r['ratio']:.2f}× ({r['ratio_min']:.2f}–"
                     f"{r['ratio_max']:.2f}; {r['rounds_mkl_faster']}/{r['rounds']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--products", default="",
                   help="MLPs whose single products to time as well (comma-separated)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 short rounds")
    args = p.parse_args(argv)
    from backprop import bf16

    mkl = bf16._mkl()
    if mkl.get("lib") is None:
        print(f"gemm_backends: MKL cannot be used here ({mkl['error']}); nothing to compare")
        return 0
    models = ("tiny", "b1024") if args.smoke else tuple(args.models.split(","))
    rounds, seconds = (2, 0.02) if args.smoke else (args.rounds, args.seconds)
    rows = []
    for name in models:
        row = measure(name, rounds, seconds)
        row["rounds"] = rounds
        rows.append(row)
        print(f"gemm_backends: {name}: numpy/mkl {row['ratio']:.2f}x", flush=True)
    products = []
    for name in (("tiny",) if args.smoke else tuple(filter(None, args.products.split(",")))):
        products += measure_products(name, *((2, 0.002) if args.smoke else ()))
    command = "python benchmarks/gemm_backends.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:])
    text = report(rows, command.strip()) + (products_report(products) if products else "")
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gemm_backends.json").write_text(json.dumps(
            {"mkl_version": mkl.get("version"), "rows": rows, "products": products},
            indent=2))
        (args.out_dir / "gemm_backends.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
