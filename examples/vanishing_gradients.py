"""Vanishing gradients, seen by the gradient monitor: a 10-layer sigmoid stack against the
three classic remedies, on the digits.

Four networks of ten Dense layers (width 64) are trained alike (Adam, lr 1e-3, batches of
64), each with a :class:`backprop.callbacks.GradientMonitor`:

- ``sigmoid``: sigmoid everywhere, Xavier initialisation. δ = ∂L/∂Z shrinks by σ′ ≤ 1/4
  at every layer: the first layer's δ is about a millionth of the last's, the monitor warns
  ``vanish``, and the network barely learns;
- ``relu_he``: ReLU with He initialisation (the default for ReLU);
- ``batchnorm``: the sigmoid stack with BatchNorm1d before each hidden sigmoid;
- ``residual``: the sigmoid stack with each hidden layer wrapped in ``Residual`` (x + f(x)),
  so that δ has a path around every sigmoid.

The four gradient-flow plots (δ RMS per layer over the steps, log scale) go side by side
into one PNG, with each network's test accuracy in its title; the accuracies and the
monitors' warnings are printed.

Run, from the repository root (the default --out is relative):

    python examples/vanishing_gradients.py [--epochs 30] [--out docs/vanishing_gradients.png]
"""
from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

import backprop as bp
from backprop.callbacks import GradientMonitor
from backprop.data import load_digits, standardize, train_val_test_split
from backprop.gradient_health import GradientHealthWarning
from backprop.layers import BatchNorm1d, Dense, Residual
from backprop.model import Sequential
from backprop.optim import Adam

DEPTH, WIDTH = 10, 64

TITLES = {"sigmoid": "sigmoid ×10 (Xavier)", "relu_he": "ReLU ×10 (He)",
          "batchnorm": "sigmoid + batch norm", "residual": "sigmoid + residual connections"}


def build(kind: str, seed: int = 0) -> Sequential:
    """Ten Dense layers 64 → 64 … → 10 of one of the four kinds (see the module docstring)."""
    rng = np.random.default_rng(seed)
    act = "relu" if kind == "relu_he" else "sigmoid"
    layers = [Dense(64, WIDTH, activation=act, rng=rng)]
    for _ in range(DEPTH - 2):
        if kind in ("sigmoid", "relu_he"):
            layers.append(Dense(WIDTH, WIDTH, activation=act, rng=rng))
        elif kind == "batchnorm":  # the batch norm's β replaces the Dense bias
            layers += [Dense(WIDTH, WIDTH, bias=False, rng=rng), BatchNorm1d(WIDTH),
                       bp.Sigmoid()]
        elif kind == "residual":
            layers.append(Residual([Dense(WIDTH, WIDTH, activation="sigmoid", rng=rng)]))
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {list(TITLES)}")
    layers.append(Dense(WIDTH, 10, rng=rng))  # logits
    return Sequential(layers)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="monitor every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("docs", "vanishing_gradients.png"),
                        help="the PNG to write (default: docs/vanishing_gradients.png)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.every < 1:
        parser.error("--epochs and --every must be positive")

    X, y = load_digits()
    (Xtr, ytr), (Xte, yte) = train_val_test_split(X, y, (0.8, 0.2), seed=args.seed,
                                                  stratify=True)
    Xtr, Xte = standardize(Xtr, Xte)

    results, monitors = {}, {}
    for kind in TITLES:
        model = build(kind, args.seed)
        monitor = GradientMonitor(every=args.every)
        with warnings.catch_warnings():  # the monitor's warnings are reported below
            warnings.simplefilter("ignore", GradientHealthWarning)
            # drop_last: δ of a mean loss scales with 1/rows, and a short last batch would
            # show as a spike at the end of every epoch
            model.fit(Xtr, ytr, loss="cross_entropy", optimizer=Adam(model.parameters(), lr=1e-3),
                      epochs=args.epochs, batch_size=64, drop_last=True, seed=args.seed,
                      verbose=0, callbacks=[monitor])
        accuracy = bp.evaluate(model, Xte, yte)["accuracy"]
        first = monitor.records[0]["depth_ratio"]
        results[kind] = {"accuracy": accuracy, "depth_ratio_at_start": first,
                         "warnings": [w for w, _, _ in monitor.warnings]}
        monitors[kind] = monitor
        print(f"{TITLES[kind]:<32} test accuracy {accuracy:.3f}   δ RMS first/last layer at "
              f"step 0: {first:.1e}   warnings: {', '.join(results[kind]['warnings']) or '-'}")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.6), dpi=100)
    axes = fig.subplots(1, len(monitors), sharey=True)
    for i, (ax, (kind, monitor)) in enumerate(zip(axes, monitors.items())):
        monitor.plot(ax=ax, legend=i == 0,
                     title=f"{TITLES[kind]}\ntest accuracy {results[kind]['accuracy']:.3f}")
        if i:
            ax.set_ylabel("")
    fig.suptitle(f"Gradient flow in {DEPTH}-layer networks on the digits: RMS of δ = ∂L/∂Z per "
                 "layer (dark: first, light: last), Adam lr 1e-3")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
