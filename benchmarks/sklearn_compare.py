"""``backprop.sklearn.MLPClassifier`` against ``sklearn.neural_network.MLPClassifier`` on the
digits: test accuracy and fit time, same architecture, solver, batches and epochs.

    python benchmarks/sklearn_compare.py [--epochs 30] [--seeds 5] [--repeats 2]
        [--hidden 128 64] [--batch-size 64] [--out FILE.md] [--smoke]

Data: the 1,797 UCI digits shipped with backprop (``backprop.data.load_digits``, the same
table as ``sklearn.datasets.load_digits``), pixels divided by 16, one fixed stratified split
(``train_test_split(test_size=0.25, random_state=0)``: 1,347 training rows, 450 test rows).

Both estimators get the same parameters: ``hidden_layer_sizes`` (default 128, 64), ReLU,
``solver="adam"``, ``learning_rate_init=1e-3``, ``alpha=1e-4``, ``batch_size=64``,
``shuffle=True``, and ``max_iter`` = ``--epochs`` with ``tol=0`` and
``n_iter_no_change=inf``, so that both run every epoch (checked). With the same
``random_state`` they start from the same initial weights (backprop.sklearn draws
scikit-learn's); the epoch shuffles differ.

Configurations: backprop.sklearn with ``dtype=None`` (float64 for this float64 data, as
scikit-learn computes) and with ``dtype="float32"``; scikit-learn under
``threadpoolctl.threadpool_limits(1)`` (one BLAS thread, what backprop's ``fit`` uses for a
model this small: ``backprop/blas.py``) and with its default BLAS threads (what a user gets
out of the box). Each repeat runs every seed, and for each seed the configurations in a
rotated order (none always first); a warm-up fit of each configuration comes first, not
timed (Numba compiles backprop's kernels on first use). On a shared, noisy machine the
medians are what to read. Printed (and written to ``--out``): a Markdown table of the test
accuracy (mean ± std over the seeds) and the fit time (median and minimum over seeds ×
repeats). This file is a script, not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from datetime import date

import numpy as np

CONFIGS = ("backprop float64", "backprop float32", "sklearn 1 thread", "sklearn default threads")
LABELS = {
    "backprop float64": "backprop.sklearn.MLPClassifier (dtype=None: float64)",
    "backprop float32": "backprop.sklearn.MLPClassifier (dtype='float32')",
    "sklearn 1 thread": "sklearn.neural_network.MLPClassifier (threadpool_limits(1))",
    "sklearn default threads": "sklearn.neural_network.MLPClassifier (default BLAS threads)",
}


def make_estimator(config: str, params: dict):
    if config.startswith("backprop"):
        from backprop.sklearn import MLPClassifier

        return MLPClassifier(**params, dtype="float32" if config.endswith("float32") else None)
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(**params)


def run(config: str, params: dict, data) -> tuple[float, float, int]:
    """``(fit seconds, test accuracy, epochs run)`` of one fit."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    X_train, X_test, y_train, y_test = data
    est = make_estimator(config, params)
    limit = threadpool_limits(1) if config == "sklearn 1 thread" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the plan
            start = time.perf_counter()
            est.fit(X_train, y_train)
            seconds = time.perf_counter() - start
    finally:
        if limit is not None:
            limit.restore_original_limits()
    return seconds, float(est.score(X_test, y_test)), int(est.n_iter_)


def machine() -> str:
    from threadpoolctl import threadpool_info

    import sklearn

    import backprop as bp

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    pools = ", ".join(f"{p['internal_api']} {p.get('version') or ''} ({p['num_threads']} threads)"
                      for p in threadpool_info())
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, NumPy "
            f"{np.__version__}, scikit-learn {sklearn.__version__}, backprop {bp.__version__}; "
            f"thread pools: {pools}")


def load_data(seed: int = 0):
    from sklearn.model_selection import train_test_split

    from backprop.data import load_digits

    X, y = load_digits(dtype="float64")
    return train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs (max_iter) per fit")
    parser.add_argument("--seeds", type=int, default=5, help="random_state 0 .. seeds-1")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all seeds")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--out", help="also write the Markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="2 epochs, 1 seed, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.repeats = 2, 1, 1
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    data = load_data()
    common = dict(hidden_layer_sizes=tuple(args.hidden), activation="relu", solver="adam",
                  alpha=1e-4, batch_size=args.batch_size, learning_rate_init=1e-3,
                  max_iter=args.epochs, shuffle=True, tol=0.0, n_iter_no_change=np.inf,
                  early_stopping=False)
    load_before = os.getloadavg()
    for config in configs:  # warm-up (Numba compiles on first use), not timed
        run(config, {**common, "max_iter": 1, "random_state": 0}, data)
    times = {c: [] for c in configs}
    accuracy = {c: {} for c in configs}
    turn = 0
    for _ in range(args.repeats):
        for seed in range(args.seeds):
            order = configs[turn % len(configs):] + configs[:turn % len(configs)]
            turn += 1
            for config in order:
                seconds, acc, epochs = run(config, {**common, "random_state": seed}, data)
                if epochs != args.epochs:
                    raise RuntimeError(f"{config} ran {epochs} epochs, not {args.epochs}")
                times[config].append(seconds)
                accuracy[config][seed] = acc  # deterministic per seed: the last run's
                print(f"  {config:24s} seed {seed}: {seconds:7.3f} s, test accuracy {acc:.4f}",
                      file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    baseline = statistics.median(times["sklearn 1 thread"]) if "sklearn 1 thread" in times \
        else None
    n_train, n_test = len(data[0]), len(data[1])
    command = "python benchmarks/sklearn_compare.py " + shlex.join(argv if argv is not None
                                                                    else sys.argv[1:])
    lines = [
        f"# backprop.sklearn vs scikit-learn MLPClassifier on digits, {date.today()}",
        "",
        f"    {command.strip()}",
        "",
        f"Machine: {machine()}. Load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (1 min).",
        "",
        f"digits, {n_train} training / {n_test} test rows (pixels / 16), MLP 64-"
        f"{'-'.join(map(str, args.hidden))}-10, ReLU, Adam (lr 1e-3), alpha 1e-4, batch "
        f"{args.batch_size}, {args.epochs} epochs (tol=0, n_iter_no_change=inf: every epoch "
        f"runs), shuffle=True; random_state 0..{args.seeds - 1}, {args.repeats} repeat(s): "
        f"{args.seeds * args.repeats} timed fits per row.",
        "",
        "| estimator | test accuracy (mean ± std) | fit time, median (s) | min (s) | "
        "ms / epoch | time vs scikit-learn, 1 thread |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        accs = list(accuracy[config].values())
        med = statistics.median(times[config])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = f"{med / baseline:.2f}×" if baseline else "-"
        lines.append(f"| {LABELS[config]} | {statistics.fmean(accs):.4f} ± {std:.4f} | "
                     f"{med:.3f} | {min(times[config]):.3f} | "
                     f"{1e3 * med / args.epochs:.1f} | {ratio} |")
    lines += ["", f"Test accuracy per seed (random_state 0..{args.seeds - 1}; each fit is "
              "deterministic given its seed, and the two libraries shuffle differently, so "
              "their columns are different draws):", ""]
    for config in configs:
        per_seed = " ".join(f"{accuracy[config][s]:.4f}" for s in sorted(accuracy[config]))
        lines.append(f"- {config}: {per_seed}")
    lines += ["", "The same random_state gives both libraries the same initial weights; "
              "backprop's fit sets its own BLAS thread count (one thread for a model this "
              "small, backprop/blas.py), scikit-learn runs NumPy's matrix products on "
              "OpenBLAS's default threads unless limited: for matrices this small those "
              "threads cost more than they save, the more so on a busy machine."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
