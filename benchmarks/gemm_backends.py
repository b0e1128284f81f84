"""Training steps with the Dense layers' products on NumPy's BLAS against MKL and against
backprop's compiled tiles, in one process.

    python benchmarks/gemm_backends.py [--models mnist,wide,b1024,b4096,digits]
        [--backends mkl,numba] [--rounds 10] [--seconds 0.5]
        [--products tiny,digits,mnist] [--out-dir DIR] [--smoke]

The hand-written Adam loop of ``frameworks.py`` (same weights and data); every round runs
the step for about ``--seconds`` under ``backprop.gemm.set_backend("numpy")`` and as long
under each of ``--backends`` (those that can run here: ``mkl`` needs the ``mkl`` wheel,
``pip install backprop[mkl]``; ``numba``, the tiles of ``backprop.kernels.matmul``, needs
the JIT), in an order rotated every round, so that all see the host's speed of the moment
(the 2-core VM's GEMM speed moves in steps of seconds). Reports each backend's median step
and the median (and range) of the per-round ratios numpy / backend (>1×: the backend
faster). Where none of the backends can run, the script says so and exits 0. Writes
``gemm_backends.json`` and ``.md`` to ``--out-dir``.

``--products``: each product of the named MLPs' steps alone (``X Wᵀ``, ``δᵀX``, ``δW`` per
Dense layer): NumPy's ``matmul`` under the OpenBLAS thread cap the model's passes run under
(``backprop.blas``) against ``backprop.gemm.product`` on each backend, alternated, median
of the repeats' per-call times (the backends' size windows lifted, so every shape runs).
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


def available(wanted) -> tuple[list, dict]:
    """``(backends, reasons)``: those of ``wanted`` that can run here, and why the others
    cannot."""
    from backprop import gemm

    ready, reasons = [], {}
    for name in wanted:
        try:
            if gemm.set_backend(name) == name:
                ready.append(name)
        except (RuntimeError, ValueError) as exc:
            reasons[name] = str(exc)
    gemm.set_backend("numpy")
    return ready, reasons


def measure(name: str, backends: list, rounds: int, seconds: float) -> dict:
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
    order = ["numpy", *backends]
    times: dict = {b: [] for b in order}
    for r in range(rounds):
        for backend in order[r % len(order):] + order[:r % len(order)]:
            gemm.set_backend(backend)
            for _ in range(2):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[backend].append((time.perf_counter() - start) / steps * 1e3)
    gemm.set_backend("numpy")
    row = {"model": name, "sizes": list(mlp.sizes), "batch": mlp.batch, "steps": steps,
           "ms": {k: statistics.median(v) for k, v in times.items()}, "ratios": {}}
    for backend in backends:
        ratios = [a / b for a, b in zip(times["numpy"], times[backend])]
        row["ratios"][backend] = {"median": statistics.median(ratios), "min": min(ratios),
                                  "max": max(ratios),
                                  "rounds_faster": sum(x > 1 for x in ratios)}
    return row


def measure_products(name: str, backends: list, repeats: int = 7,
                     seconds: float = 0.02) -> list:
    """Per Dense layer of MLP ``name`` at its batch, the three products of a training step,
    each timed on OpenBLAS (capped as in a pass) and on each backend, alternated."""
    import numpy as np

    import workloads
    from backprop import blas, gemm

    mlp = workloads.MLPS.get(name) or workloads.LARGE_BATCH_MLPS[name]
    n = mlp.batch
    pairs = list(zip(mlp.sizes[:-1], mlp.sizes[1:]))
    cap = max(1, n * max(i * o for i, o in pairs) // blas.MACS_PER_THREAD)
    rng = np.random.default_rng(0)
    lifted = {"MIN_MACS": 1, "NUMBA_MAX_MACS": 1 << 62, "NUMBA_FORWARD_MAX_MACS": 1 << 62,
              "NUMBA_BACKWARD_MIN_MACS": 1, "NUMBA_MIN_OUTPUTS": 1}
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
        windows = {k: getattr(gemm, k) for k in lifted}
        for form, on_numpy, on_backend in forms:
            times: dict = {b: [] for b in ("numpy", *backends)}
            for k, v in lifted.items():  # every size, for the table
                setattr(gemm, k, v)
            try:
                with blas.threads_for(cap * blas.MACS_PER_THREAD):
                    for backend in backends:
                        gemm.set_backend(backend)
                        assert on_backend(), f"{backend} declined a product of the layers' shapes"
                    start = time.perf_counter()
                    on_numpy()
                    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-7)))
                    order = ["numpy", *backends]
                    for r in range(repeats):
                        for backend in order[r % len(order):] + order[:r % len(order)]:
                            fn = on_numpy if backend == "numpy" else on_backend
                            gemm.set_backend(backend)
                            fn()
                            start = time.perf_counter()
                            for _ in range(calls):
                                fn()
                            times[backend].append((time.perf_counter() - start) / calls * 1e6)
            finally:
                for k, v in windows.items():
                    setattr(gemm, k, v)
                gemm.set_backend("numpy")
            us = {k: statistics.median(v) for k, v in times.items()}
            macs = n * i * o
            rows.append({"model": name, "shape": f"{n}×{i}×{o}", "form": form, "us": us,
                         "ratios": {b: us["numpy"] / us[b] for b in backends},
                         "layers_use": {b: layers_use(b, form, macs, o) for b in backends}})
    return rows


def layers_use(backend: str, form: str, macs: int, outputs: int) -> str:
    """Where a Dense layer runs this product with ``backend`` selected (its windows)."""
    from backprop import gemm

    if macs < gemm.MIN_MACS:
        return "numpy"
    if backend == "numba":
        low, top = (gemm.MIN_MACS, gemm.NUMBA_FORWARD_MAX_MACS) if form == "X·Wᵀ" else \
            (gemm.NUMBA_BACKWARD_MIN_MACS, gemm.NUMBA_MAX_MACS)
        if not low <= macs < top or outputs < gemm.NUMBA_MIN_OUTPUTS:  # (float32)
            return "numpy"
    return backend


def _table(intro: list, columns: str, per_backend: str, align: str, backend_align: str,
           backends: list, lines_of) -> str:
    """A Markdown report: ``intro`` lines, a header of ``columns`` and ``per_backend``
    (``{b}`` the backend) for each backend, and one line per row from ``lines_of``."""
    header = f"| {columns} | " + " | ".join(per_backend.format(b=b) for b in backends) + " |"
    return "\n".join([*intro, header, align + backend_align * len(backends), *lines_of()]) \
        + "\n"


def products_report(rows: list, backends: list) -> str:
    intro = ["", "## Single products", "",
             "NumPy's `matmul` on OpenBLAS (capped as in a pass) against `gemm.product` on "
             "each backend, alternated; median µs per call. Ratio = OpenBLAS / backend (>1×: "
             "the backend faster). *Layers*: where a Dense layer runs the product with that "
             "backend selected (`gemm.MIN_MACS` and the tiles' windows).", ""]
    return _table(intro, "model | N×in×out | product | OpenBLAS (µs)",
                  "{b} (µs) | ratio | layers", "|---|---|---|---:|", "---:|---:|---|",
                  backends, lambda: (
                      f"| {r['model']} | {r['shape']} | {r['form']} | {r['us']['numpy']:.4g} | "
                      + " | ".join(f"{r['us'][b]:.4g} | {r['ratios'][b]:.2f}× | "
                                   f"{r['layers_use'][b]}" for b in backends) + " |"
                      for r in rows))


def _step_cells(r: dict, b: str) -> str:
    q = r["ratios"][b]
    return (f"{r['ms'][b]:.4g} | {q['median']:.2f}× ({q['min']:.2f}–{q['max']:.2f}; "
            f"{q['rounds_faster']}/{r['rounds']})")


def report(rows: list, backends: list, command: str) -> str:
    intro = ["# Dense products: NumPy's BLAS against " + " and ".join(backends)
             + " (`backprop.gemm`)", "", f"Command: `{command}`", "",
             "Hand-written Adam loop; per round every backend for the same time, in an order "
             "rotated every round, in one process. Ratio = numpy / backend step time (>1×: "
             "the backend faster), median over rounds (range; rounds it won).", ""]
    return _table(intro, "model | batch | numpy (ms)", "{b} (ms) | numpy / {b}",
                  "|---|---:|---:|", "---:|---|", backends, lambda: (
                      f"| {r['model']} | {r['batch']} | {r['ms']['numpy']:.4g} | "
                      + " | ".join(_step_cells(r, b) for b in backends) + " |" for r in rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--backends", default="mkl,numba",
                   help="backends to compare with NumPy's BLAS (those that can run here)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--products", default="",
                   help="MLPs whose single products to time as well (comma-separated)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 short rounds")
    args = p.parse_args(argv)
    from backprop import bf16

    backends, reasons = available([b for b in args.backends.split(",") if b])
    for name, why in reasons.items():
        print(f"gemm_backends: {name} cannot be used here ({why})")
    if not backends:
        print("gemm_backends: no backend to compare with NumPy's BLAS")
        return 0
    models = ("tiny", "b1024") if args.smoke else tuple(args.models.split(","))
    rounds, seconds = (2, 0.02) if args.smoke else (args.rounds, args.seconds)
    rows = []
    for name in models:
        row = measure(name, backends, rounds, seconds)
        row["rounds"] = rounds
        rows.append(row)
        print(f"gemm_backends: {name}: " + ", ".join(
            f"numpy/{b} {q['median']:.2f}x" for b, q in row["ratios"].items()), flush=True)
    products = []
    for name in (("tiny",) if args.smoke else tuple(filter(None, args.products.split(",")))):
        products += measure_products(name, backends, *((2, 0.002) if args.smoke else ()))
    command = "python benchmarks/gemm_backends.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:])
    text = report(rows, backends, command.strip()) + (products_report(products, backends)
                                                       if products else "")
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gemm_backends.json").write_text(json.dumps(
            {"backends": backends, "mkl_version": bf16._mkl().get("version"), "rows": rows,
             "products": products},
            indent=2))
        (args.out_dir / "gemm_backends.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
