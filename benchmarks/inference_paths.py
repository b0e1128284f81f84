"""backprop's inference paths side by side, in one process: for each MLP and batch size, the
path ``predict`` takes (the compiled plan of ``backprop.inference``: on one thread, or the
chunked parallel driver, or the parallel pass of a stack with large weights, or a large layer
split over the threads, or the packed driver of a large batch), the plan on the calling
thread alone (no chunks, pass or split), the plan with the pass's layers split one parallel
region each instead (where the pass runs), the chunked lanes form instead of the packed one
(where that runs), and the normal path
(``Sequential.forward`` under ``inference_mode``: BLAS products and the fused epilogues).
The variants alternate, ``--repeat`` rounds of ``--max-time`` seconds each; the best median
of the rounds counts. Ratios within one run only (shared, noisy machines).

This is the measurement behind the plan's size limits (``inference.DENSE_MAX_ROWS``,
``SMALL_WEIGHT_BYTES``, ``PACKED_MIN_ROWS``, ``PARALLEL_MIN_MACS``, ``PASS_MIN_BYTES``,
``SPLIT_MIN_MACS``): where the plan stops being faster than the normal path, predict hands
the batch over.

    python benchmarks/inference_paths.py --out-dir benchmarks/results/<machine>
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

MODELS = {"digits": [64, 128, 128, 10], "mnist": [784, 256, 256, 10]}
BATCHES = [1, 32, 64, 128, 256, 1024, 4096]


def mlp(sizes):
    import backprop as bp

    last = len(sizes) - 2
    return bp.Sequential([bp.Dense(a, b, activation=None if i == last else "relu", rng=i)
                          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]).eval()


def median_us(fn, max_time: float) -> float:
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < max_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def variants(model, x):
    """``{name: (callable, settings)}``: ``settings`` the ``backprop.inference`` thresholds
    that the variant turns off (set for the whole of its timed round, so that no call pays
    for setting them); a plan variant only where the plan takes the batch."""
    import backprop as bp
    from backprop import inference

    def normal():
        with bp.inference_mode():
            return model.forward(x)

    out = {"normal path": (normal, ())}
    plan = inference.plan_for(model)
    if plan is not None and plan.takes(len(x)):
        def run():
            return inference.run(model, x, eval_mode=True)

        out["predict's plan"] = (run, ())
        if len(x) <= inference.MAX_ROWS:  # beyond it the plan always runs in chunks
            out["plan, one thread"] = (run, ("PARALLEL_MIN_MACS", "SPLIT_MIN_MACS",
                                             "PASS_MIN_BYTES"))
        if (len(x) < inference.PARALLEL_MIN_VECTORS * plan.lanes_from
                and plan._pass_layout()[2] >= inference.PASS_MIN_BYTES):
            out["plan, layers split"] = (run, ("PASS_MIN_BYTES",))  # a region per layer
        if len(x) >= inference.PACKED_MIN_ROWS and plan.resident():
            out["lanes form"] = (run, ("PACKED_MIN_ROWS",))  # the chunks instead
    return out


def turned_off(names, fn, *args):
    """``fn(*args)`` with the thresholds ``names`` of ``backprop.inference`` out of reach."""
    from backprop import inference

    saved = [getattr(inference, name) for name in names]
    for name in names:
        setattr(inference, name, 1 << 62)
    try:
        return fn(*args)
    finally:
        for name, value in zip(names, saved):
            setattr(inference, name, value)


def measure(models, batches, max_time, repeat):
    from backprop import inference

    rows = []
    rng = np.random.default_rng(0)
    for name in models:
        sizes = MODELS[name]
        model = mlp(sizes)
        plan = inference.plan_for(model)
        for n in batches:
            x = rng.standard_normal((n, sizes[0])).astype(np.float32)
            cases = variants(model, x)
            expected = cases["normal path"][0]().copy()
            for label, (fn, off) in cases.items():
                got = turned_off(off, fn)
                scale = max(float(np.abs(expected).max()), 1.0)
                assert np.abs(got - expected).max() <= 1e-4 * scale, (name, n, label)
            medians = {label: [] for label in cases}
            for _ in range(repeat):
                for label, (fn, off) in cases.items():
                    medians[label].append(turned_off(off, median_us, fn, max_time))
            best = {label: min(v) for label, v in medians.items()}
            rows.append({"model": name, "sizes": sizes, "batch": n,
                         "weight_bytes": plan.weight_bytes, "us": best, "rounds": medians})
    return rows


def report(rows, args) -> str:
    import numba

    from backprop import inference

    load = os.getloadavg()
    lines = [
        "# Inference paths: the compiled plan against the normal path (one process)", "",
        "Command:", "", f"    python benchmarks/inference_paths.py {' '.join(args.argv)}", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"Numba {numba.__version__} ({numba.get_num_threads()} threads); load average "
        f"before the run {args.load[0]:.2f} {args.load[1]:.2f} {args.load[2]:.2f}, after "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.", "",
        "float32 relu MLPs, fresh weights; µs per call, best median of "
        f"{args.repeat} alternating rounds of {args.max_time} s. *predict's plan*: "
        "`inference.run` as predict calls it (one thread below "
        f"`PARALLEL_MIN_MACS` = {inference.PARALLEL_MIN_MACS:,} multiply-adds or "
        f"{inference.MAX_ROWS} rows, else the chunked driver on every thread; below two "
        "vectors of rows, the parallel pass where the weights of the layers it splits reach "
        f"`PASS_MIN_BYTES` = {inference.PASS_MIN_BYTES:,}); *plan, one thread*: the same "
        "plan kept on the calling thread; *layers split*: the pass's large layers split "
        f"one parallel region each (`SPLIT_MIN_MACS` = {inference.SPLIT_MIN_MACS:,}) "
        "instead; *lanes form*: from `PACKED_MIN_ROWS` = "
        f"{inference.PACKED_MIN_ROWS} rows, where predict runs the packed driver, the "
        "chunked driver instead; *normal path*: "
        "`Sequential.forward` under `inference_mode` (BLAS). A blank: predict does not take "
        f"the plan at that size (`DENSE_MAX_ROWS` = {inference.DENSE_MAX_ROWS}, unless the "
        f"weights fit in one core's L2 cache, {inference.l2_cache_bytes():,} bytes here, or "
        f"in `SMALL_WEIGHT_BYTES` = {inference.SMALL_WEIGHT_BYTES:,}).", "",
        "| model | weights | batch | predict's plan | plan, one thread | layers split | "
        "lanes form | normal path | normal / plan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        us = r["us"]
        plan = us.get("predict's plan")
        ratio = f"{us['normal path'] / plan:.2f}×" if plan else ""
        cells = [us.get(label) for label in ("predict's plan", "plan, one thread",
                                              "plan, layers split", "lanes form")]
        lines.append(
            f"| {r['model']} | {r['weight_bytes'] / 1024:,.0f} KiB | {r['batch']} | "
            + " | ".join(f"{v:,.1f}" if v else "" for v in cells)
            + f" | {us['normal path']:,.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def cli(argv, doc: str, models, batches, repeat: int, smoke_repeat: int, measure, report,
        stem: str) -> None:
    """The command line of this script and of the other in-process ``predict`` benchmarks
    (``parameter_layout.py``): ``--models``, ``--batches``, ``--max-time``, ``--repeat``,
    ``--smoke``, ``--out-dir``; ``measure(models, batches, max_time, repeat)`` gives the
    rows, ``report(rows, args)`` the Markdown, written with the rows' JSON as ``stem``.md
    and ``stem``.json."""
    import sys

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--models", default=",".join(models))
    parser.add_argument("--batches", default=",".join(map(str, batches)))
    parser.add_argument("--max-time", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--smoke", action="store_true", help="a few calls: checks the script")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.smoke:
        args.max_time, args.repeat = 0.001, smoke_repeat
    args.load = os.getloadavg()
    rows = measure(args.models.split(","), [int(b) for b in args.batches.split(",")],
                   args.max_time, args.repeat)
    text = report(rows, args)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{stem}.md").write_text(text)
        (args.out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(text)


def main(argv=None):
    cli(argv, __doc__, MODELS, BATCHES, 3, 1, measure, report, "inference_paths")


if __name__ == "__main__":
    main()
