"""Training steps with the Dense layers' products on NumPy's BLAS against MKL, in one process.

    python benchmarks/gemm_backends.py [--models mnist,wide,b1024,b4096,digits]
        [--rounds 10] [--seconds 0.5] [--out-dir DIR] [--smoke]

The hand-written Adam loop of ``frameworks.py`` (same weights and data); every round runs
the step for about ``--seconds`` under ``backprop.gemm.set_backend("numpy")`` and as long
under ``"mkl"``, in an order reversed every other round, so that both see the host's speed
of the moment (the 2-core VM's GEMM speed moves in steps of seconds). Reports each
backend's median step and the median (and range) of the per-round ratios numpy / mkl
(>1×: MKL faster). Needs the ``mkl`` wheel (``pip install backprop[mkl]``); without it the
script says so and exits 0. Writes ``gemm_backends.json`` and ``.md`` to ``--out-dir``.
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
    command = "python benchmarks/gemm_backends.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:])
    text = report(rows, command.strip())
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gemm_backends.json").write_text(json.dumps(
            {"mkl_version": mkl.get("version"), "rows": rows}, indent=2))
        (args.out_dir / "gemm_backends.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
