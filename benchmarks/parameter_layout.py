"""``predict`` on a model whose parameters an optimizer re-homed into its flat buffer, with the
buffer's two layouts side by side in one process: each parameter's start rounded up to a
cache line (``backprop.parameter.flat_layout``, what optimizers do on the CPU) and the
parameters back to back (what they did before, and still do on a GPU), beside the same model
without an optimizer (each parameter in an aligned array of its own, ``backend.aligned``).

A model whose parameter sizes are all multiples of 16 floats (the mnist and digits MLPs) has
the same addresses in both layouts; one with a layer of 45 units puts every later weight
52 bytes past a cache line when packed back to back, and every vector load of those weights
then reads two lines. The variants alternate, ``--repeat`` rounds of ``--max-time`` seconds;
the median of the rounds counts, with the per-round ratios' median and range.

    python benchmarks/parameter_layout.py --out-dir benchmarks/results/<machine>
"""
from __future__ import annotations

import os
import platform
import statistics

import numpy as np

MODELS = {"odd": [64, 45, 512, 512, 10], "mnist": [784, 256, 256, 10]}
BATCHES = [1, 32]
VARIANTS = ("aligned buffer", "back to back", "no optimizer")


def mlp(sizes, seed):
    import backprop as bp

    last = len(sizes) - 2
    return bp.Sequential([bp.Dense(a, b, activation=None if i == last else "relu",
                                   rng=seed + i)
                          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]).eval()


def models(sizes):
    """``{variant: (model, optimizer or None)}``, the same weights in each."""
    from backprop import optim, parameter

    def back_to_back(params, itemsize, on_cpu=True):
        return real(params, itemsize, on_cpu=False)

    real = parameter.flat_layout
    out = {}
    for name in VARIANTS:
        model = mlp(sizes, 0)
        opt = None
        if name != "no optimizer":
            # flatten() and the optimizer's group read the layout from their modules
            parameter.flat_layout = optim.flat_layout = \
                back_to_back if name == "back to back" else real
            try:
                opt = optim.Adam(model.parameters(), lr=1e-3)
            finally:
                parameter.flat_layout = optim.flat_layout = real
        out[name] = (model, opt)
    return out


def offsets(model) -> list[int]:
    """Each parameter's start modulo the alignment (bytes)."""
    from backprop import backend

    return [int(p.data.ctypes.data % backend.ALIGNMENT) for p in model.parameters()]


def measure(names, batches, max_time: float, repeat: int) -> list[dict]:
    from inference_paths import median_us

    rows = []
    rng = np.random.default_rng(0)
    for name in names:
        built = models(MODELS[name])
        for batch in batches:
            x = rng.standard_normal((batch, MODELS[name][0])).astype(np.float32)
            want = built["no optimizer"][0].predict(x)
            for variant, (model, _) in built.items():
                got = model.predict(x)
                if not np.array_equal(got, want):  # same weights, same kernels: same bits
                    raise AssertionError(f"{name} at {batch} rows: {variant} differs")
            rounds = {v: [] for v in VARIANTS}
            for r in range(repeat):
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                for variant in order:
                    model = built[variant][0]
                    rounds[variant].append(median_us(lambda m=model: m.predict(x), max_time))
            ratios = [b / a for a, b in zip(rounds["aligned buffer"], rounds["back to back"])]
            rows.append({"model": name, "sizes": MODELS[name], "batch": batch,
                         "offsets": {v: offsets(built[v][0]) for v in VARIANTS},
                         "us": {v: statistics.median(t) for v, t in rounds.items()},
                         "rounds": rounds,
                         "back_to_back_over_aligned": statistics.median(ratios),
                         "ratio_range": [min(ratios), max(ratios)]})
    return rows


def report(rows, args) -> str:
    lines = ["# Parameter layout in an optimizer's flat buffer: `predict` (µs per call)", "",
             "Command:", "", "    python benchmarks/parameter_layout.py "
             + " ".join(args.argv), "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
             f"{args.repeat} alternated rounds of {args.max_time} s, median of the rounds; "
             f"1-minute load average before: {args.load[0]:.2f}. Offsets: each parameter's "
             "start modulo 64 bytes.", "",
             "| model | batch | aligned buffer | back to back | no optimizer | back to back / "
             "aligned (range) | offsets back to back |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        us = r["us"]
        lo, hi = r["ratio_range"]
        lines.append(
            f"| {'-'.join(map(str, r['sizes']))} | {r['batch']} | {us['aligned buffer']:.2f} | "
            f"{us['back to back']:.2f} | {us['no optimizer']:.2f} | "
            f"{r['back_to_back_over_aligned']:.3f}× ({lo:.3f}–{hi:.3f}) | "
            f"{r['offsets']['back to back']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from inference_paths import cli

    cli(argv, __doc__, MODELS, BATCHES, 9, 3, measure, report, "parameter_layout")


if __name__ == "__main__":
    main()
