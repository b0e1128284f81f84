"""The cost of :class:`backprop.callbacks.GradientMonitor`: ``fit`` on the digits MLP without
a monitor and with ``GradientMonitor(every=N)``, side by side in one process.

    python benchmarks/gradient_monitor_cost.py [--every 100 1] [--epochs 5] [--repeats 7]

The model is the benchmarks' digits MLP (64-128-128-10, ReLU, float32), trained with Adam
on the 1,797 digits in batches of 64 (29 steps per epoch). Each repeat builds the model
afresh from the same seed and times one ``fit`` of ``--epochs`` epochs per configuration,
the configurations in a rotated order from one repeat to the next (so that none always runs
first); a warm-up round (not timed) comes first. Printed: a Markdown table of the median
time per epoch and per step, the median over the repeats of the ratio to the same repeat's
``fit`` without a monitor, and the extra time per monitored step (median difference to no
monitor, divided by the monitored steps).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np

import backprop as bp
from backprop.callbacks import GradientMonitor
from backprop.data import load_digits, standardize
from backprop.gradient_health import GradientHealthWarning
from backprop.layers import Dense
from backprop.model import Sequential


def digits_model(seed: int = 0) -> Sequential:
    rng = np.random.default_rng(seed)
    return Sequential([Dense(64, 128, activation="relu", rng=rng),
                       Dense(128, 128, activation="relu", rng=rng),
                       Dense(128, 10, rng=rng)])


def time_fit(X, y, every, epochs: int, batch_size: int) -> float:
    """Seconds of one ``fit`` (``every`` None: without a monitor)."""
    model = digits_model()
    callbacks = [] if every is None else [GradientMonitor(every=every)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientHealthWarning)  # a healthy model: none
        start = time.perf_counter()
        model.fit(X, y, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=epochs,
                  batch_size=batch_size, seed=0, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, nargs="+", default=[100, 1],
                        help="the monitor's every= values to time (default: 100 1)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed fit")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or any(e < 1 for e in args.every):
        parser.error("--epochs, --repeats and --every must be positive")

    X, y = load_digits()
    X = standardize(X).astype(np.float32)
    steps = -(-len(X) // args.batch_size)
    configs = [None, *args.every]
    times = {c: [] for c in configs}
    for c in configs:  # warm-up: kernels compiled, buffers allocated
        time_fit(X, y, c, 1, args.batch_size)
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            times[c].append(time_fit(X, y, c, args.epochs, args.batch_size))

    base = statistics.median(times[None]) / args.epochs
    print(f"digits MLP 64-128-128-10 (ReLU, float32), Adam, batch {args.batch_size}, "
          f"{len(X)} rows = {steps} steps per epoch; {args.epochs} epochs per fit, median of "
          f"{args.repeats} interleaved repeats; {_cpu()}, {bp.device_info()['kernels']} "
          "kernels\n")
    print("| configuration | monitored steps / epoch | ms / epoch | µs / step "
          "| vs. no monitor (paired) | µs per monitored step |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in configs:
        per_epoch = statistics.median(times[c]) / args.epochs
        # each repeat's time over the same repeat's time without a monitor: drift cancels
        paired = statistics.median(t / t0 for t, t0 in zip(times[c], times[None]))
        label = "no monitor" if c is None else f"GradientMonitor(every={c})"
        monitored = 0 if c is None else len(range(0, steps * args.epochs, c)) / args.epochs
        extra = "-" if c is None else \
            f"{(per_epoch - base) / monitored * 1e6:.0f}"
        print(f"| {label} | {monitored:.2g} | {per_epoch * 1e3:.2f} | "
              f"{per_epoch / steps * 1e6:.0f} | {paired:.3f}× | {extra} |")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"

if __name__ == "__main__":
    main()
