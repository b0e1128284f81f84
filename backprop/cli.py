"""``python -m backprop <command>`` (also the ``backprop`` script).

    train     build an MLP, train it with a progress bar, report test metrics, and save
              model.npz, history.json, history.csv and curves.png to --out
    evaluate  loss and metrics of a saved model on a data set
    predict   a saved model's predictions, as CSV (to a file or stdout)
    info      versions, device, CuPy/Numba status, kernel backend, CPU-fallback reason
    bench     (backprop.bench) turn benchmark results into a report

Subcommands live in :data:`COMMANDS`: ``name -> (one-line help, "module:function")``, the
function taking the rest of the command line (``argv`` list) and returning an exit code.
Modules are imported only when their command runs, so ``--help`` stays fast. To add a
command, add one entry.

Data (``--data``): a built-in set (``digits``, ``xor``, ``two_moons``, ``spirals``,
``regression``) or a CSV file with a header (``--target COLUMN``). ``train`` splits it
into train/validation/test parts (``--split``, stratified for classification), fits the
standardisation on the train part, and stores that, the split and the class names in the
checkpoint, so ``evaluate`` and ``predict`` prepare data exactly as ``train`` did.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a model and save it, its history and learning curves",
              "backprop.cli:train_main"),
    "evaluate": ("loss and metrics of a saved model on a data set", "backprop.cli:evaluate_main"),
    "predict": ("predictions of a saved model, as CSV", "backprop.cli:predict_main"),
    "info": ("versions, device, kernel backend and the reason for any CPU fallback",
             "backprop.cli:info_main"),
    "bench": ("turn benchmark results into a markdown report and chart",
              "backprop.bench:main"),
}

BUILTIN = ("digits", "xor", "two_moons", "spirals", "regression")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        import backprop

        print(f"backprop {backprop.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"backprop: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][1].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except BrokenPipeError:  # e.g. `predict ... | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {n:<{width}}  {h}" for n, (h, _) in COMMANDS.items()]
    return ("usage: python -m backprop <command> [options]   (<command> --help for its options)"
            "\n\ncommands:\n" + "\n".join(lines))


class CLIError(Exception):
    """A problem with the command line or its inputs: printed without a traceback."""


def _run(fn, argv) -> int:
    from backprop.backend import DeviceUnavailableError
    from backprop.data import DataError
    from backprop.io import CheckpointError
    from backprop.kernels import KernelBackendError

    try:
        return fn(argv)
    except (CLIError, DataError, CheckpointError, DeviceUnavailableError, KernelBackendError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------
# Device and kernels
def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--kernels", default="auto", choices=("auto", "numba", "cupy", "reference"),
                   help="kernel backend (default auto: Numba on CPU, CuPy on GPU)")


def _setup_runtime(args) -> tuple[str, str]:
    """Select device and kernels (failing early, with the reason). Returns a description
    ("device cpu, kernels numba_cpu") and the reason for a CPU fallback ("" if none)."""
    import backprop as bp
    from backprop import kernels as K

    device = bp.set_device(args.device)
    K.set_backend(args.kernels)
    backend = K.backend_name(device.kind)  # raises now if the choice cannot run here
    return f"device {device}, kernels {backend}", bp.device_info()["fallback_reason"]


# ---------------------------------------------------------------------------------------
# Data
def _load(name: str, target: str | None, task: str, seed: int) -> dict:
    """A data set as ``{"X", "y", "task", "classes", "features", "target", "name"}``."""
    from backprop import data

    if name in BUILTIN:
        if name == "digits":
            X, y = data.load_digits()
        elif name == "xor":
            X, y = data.xor()
        elif name == "two_moons":
            X, y = data.two_moons(n=400, noise=0.15, seed=seed)
        elif name == "spirals":
            X, y = data.spirals(n=600, classes=3, noise=0.2, seed=seed)
        else:
            X, y = data.regression(n=1000, features=8, noise=0.1, seed=seed)
        kind = "regression" if name == "regression" else "classification"
        classes = None if kind == "regression" else [str(c) for c in range(int(y.max()) + 1)]
        features = [f"x{i}" for i in range(X.shape[1])]
        return {"X": X, "y": y, "task": kind, "classes": classes, "features": features,
                "target": "y", "name": name}
    if not os.path.exists(name):
        raise CLIError(f"--data {name!r} is neither a built-in data set ({', '.join(BUILTIN)}) "
                       "nor an existing CSV file")
    table = data.load_csv(name, target=target, task=task)
    return {"X": table.X, "y": table.y, "task": table.task, "classes": table.classes,
            "features": table.feature_names, "target": table.target,
            "name": os.path.abspath(name)}


def _split(ds: dict, fractions, seed: int):
    from backprop.data import train_val_test_split

    return train_val_test_split(ds["X"], ds["y"], fractions, seed=seed,
                                stratify=ds["task"] == "classification")


def _fractions(text: str):
    try:
        fr = [float(f) for f in text.split(",")]
    except ValueError:
        raise CLIError(f"--split {text!r}: expected three fractions such as 0.7,0.15,0.15") \
            from None
    if len(fr) != 3:
        raise CLIError(f"--split {text!r}: expected three fractions (train, validation, test)")
    return fr


def _select_features(ds: dict, features: list[str]) -> np.ndarray:
    """Columns of ``ds`` in the order the model was trained on."""
    if ds["features"] == features:
        return ds["X"]
    missing = [f for f in features if f not in ds["features"]]
    if missing:
        raise CLIError(f"the data lacks the feature columns {missing} that the model was "
                       "trained on")
    return ds["X"][:, [ds["features"].index(f) for f in features]]


# ---------------------------------------------------------------------------------------
# train
def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backprop train", description="Train an MLP and save it.")
    p.add_argument("--data", default="digits",
                   help=f"built-in data set ({', '.join(BUILTIN)}) or a CSV file (default digits)")
    p.add_argument("--target", help="target column of a CSV file")
    p.add_argument("--task", default="auto", choices=("auto", "classification", "regression"))
    p.add_argument("--hidden", default="128,64", help="hidden layer widths (default 128,64; "
                   "'' for none)")
    p.add_argument("--activation", default="relu", help="hidden activation (default relu)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer")
    p.add_argument("--optimizer", default="adam",
                   choices=("adam", "adamw", "sgd", "momentum", "rmsprop", "adagrad"))
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without a better val_loss (0: never)")
    p.add_argument("--split", default="0.7,0.15,0.15", help="train,validation,test fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and shuffling")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    _add_runtime_options(p)
    return p


def _build_model(n_in: int, hidden: list[int], n_out: int, activation: str, dropout: float,
                 seed: int, dtype: str):
    from backprop.layers import Dense, Dropout
    from backprop.model import Sequential

    rng = np.random.default_rng(seed)
    layers, width = [], n_in
    for h in hidden:
        layers.append(Dense(width, h, activation=activation, rng=rng, dtype=dtype))
        if dropout:
            layers.append(Dropout(dropout, seed=int(rng.integers(2**32))))
        width = h
    layers.append(Dense(width, n_out, rng=rng, dtype=dtype))
    return Sequential(layers)


def train_main(argv) -> int:
    return _run(_train, argv)


def _train(argv) -> int:
    from backprop import callbacks, training
    from backprop.backend import set_dtype
    from backprop.data import Standardizer

    args = _train_parser().parse_args(argv)
    t0 = time.perf_counter()
    runtime, fallback = _setup_runtime(args)
    set_dtype(args.dtype)
    try:
        hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    except ValueError:
        raise CLIError(f"--hidden {args.hidden!r}: expected widths such as 128,64") from None
    ds = _load(args.data, args.target, args.task, args.seed)
    if ds["y"] is None:
        raise CLIError("training needs a target: give --target COLUMN for a CSV file")
    fractions = _fractions(args.split)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = _split(ds, fractions, args.seed)
    scaler = Standardizer().fit(Xtr)
    Xtr, Xva, Xte = (scaler.transform(a) for a in (Xtr, Xva, Xte))
    classify = ds["task"] == "classification"
    yscale = None
    if classify:
        n_out, loss, metrics = len(ds["classes"]), "cross_entropy", ["accuracy"]
    else:
        yscale = Standardizer().fit(ytr)
        ytr, yva = yscale.transform(ytr), yscale.transform(yva)
        n_out, loss, metrics = ytr.shape[1], "mse", ["mae", "r2"]
    model = _build_model(Xtr.shape[1], hidden, n_out, args.activation, args.dropout, args.seed,
                         args.dtype)
    from backprop.training import make_optimizer

    extra_kw = {"weight_decay": args.weight_decay} if args.weight_decay else {}
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=args.lr, **extra_kw)
    cbs = [callbacks.TerminateOnNaN()]
    if args.patience:
        cbs.append(callbacks.EarlyStopping("val_loss", patience=args.patience))
    if args.verbose:
        print(runtime + (f" ({fallback})" if fallback else ""))
        print(f"{len(Xtr)} train / {len(Xva)} validation / {len(Xte)} test rows, "
              f"{Xtr.shape[1]} features, {ds['task']}\n{model.summary()}")
    history = training.fit(model, Xtr, ytr, loss=loss, optimizer=optimizer, epochs=args.epochs,
                           batch_size=args.batch_size, validation_data=(Xva, yva),
                           metrics=metrics, callbacks=cbs, seed=args.seed, verbose=args.verbose)
    results = _test_metrics(model, Xte, yte, classify, yscale)
    extra = {"task": ds["task"], "classes": ds["classes"], "features": ds["features"],
             "target": ds["target"], "mean": scaler.mean, "std": scaler.std,
             "data": {"name": ds["name"], "split": fractions, "seed": args.seed},
             "test": results, "command": ["train", *argv]}
    if yscale is not None:
        extra.update({"y_mean": yscale.mean, "y_std": yscale.std})
    os.makedirs(args.out, exist_ok=True)
    from backprop import io

    io.save(model, os.path.join(args.out, "model.npz"), optimizer=optimizer,
            epoch=len(history), extra=extra)
    history.to_json(os.path.join(args.out, "history.json"))
    history.to_csv(os.path.join(args.out, "history.csv"))
    plot = None if args.no_plot else _plot(history, os.path.join(args.out, "curves.png"))
    elapsed = time.perf_counter() - t0
    print("test " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    print(f"ran on {runtime}; {len(history)} epochs in {elapsed:.1f} s")
    print(f"saved {args.out}/model.npz, history.json, history.csv"
          + (f", {os.path.basename(plot)}" if plot else ""))
    return 0


def _test_metrics(model, X, y, classify: bool, yscale) -> dict:
    """Test metrics in the data's own units (regression outputs are un-standardised)."""
    from backprop import metrics, training
    from backprop.backend import to_numpy

    if classify:
        return training.evaluate(model, X, y, loss="cross_entropy", metrics=["accuracy"])
    pred = to_numpy(training.predict(model, X))
    if yscale is not None:
        pred = yscale.inverse_transform(pred)
    y = np.asarray(y).reshape(pred.shape)
    return {"mse": metrics.mean_squared_error(y, pred), "mae": metrics.mean_absolute_error(y, pred),
            "r2": metrics.r2_score(y, pred)}


def _plot(history, path: str) -> str | None:
    """Loss and accuracy (or the first other metric) curves, train and validation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped the plot (pip install 'backprop[plot]')")
        return None
    h = history.history
    epochs = [e + 1 for e in history.epoch]
    other = next((k for k in h if k not in ("loss", "lr", "time", "samples_per_s")
                  and not k.startswith("val_")), None)
    panels = ["loss"] + ([other] if other else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, h[key], label="train")
        if f"val_{key}" in h:
            ax.plot(epochs, h[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# evaluate / predict
def _checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("model", help="a model.npz written by train (or backprop.io.save)")
    p.add_argument("--data", help="data set or CSV file (default: the one the model was "
                   "trained on)")
    p.add_argument("--split", choices=("test", "all"), help="rows to use: the test part of "
                   "the training split (default when --data is the training data) or all rows")
    p.add_argument("--batch-size", type=int, default=256)
    _add_runtime_options(p)
    return p


def _checkpoint_data(args, need_target: bool):
    """Load the checkpoint and the rows to run it on, prepared as train prepared them."""
    from backprop import io

    runtime, _ = _setup_runtime(args)
    ckpt = io.load_checkpoint(args.model)
    extra = ckpt.extra
    if "features" not in extra:
        raise CLIError(f"{args.model} holds no data description (it was not written by "
                       "'backprop train'); use backprop.training.evaluate/predict from Python")
    spec = extra["data"]
    name = args.data or spec["name"]
    builtin_or_csv = name if name in BUILTIN else os.path.abspath(name)
    same = builtin_or_csv == spec["name"]
    split = args.split or ("test" if same else "all")
    if split == "test" and not same:
        raise CLIError("--split test needs the data the model was trained on; use --split all")
    ds = _load(name, extra["target"] if (need_target or same) else None,
               extra["task"], spec["seed"])
    if split == "test":
        ds = dict(ds)
        ds["X"], ds["y"] = _split(ds, spec["split"], spec["seed"])[2]
    if need_target and ds["y"] is None:
        raise CLIError(f"the data has no target column {extra['target']!r}")
    X = _select_features(ds, extra["features"])
    X = ((X - extra["mean"]) / extra["std"]).astype(X.dtype)
    return ckpt, ds, X, split, runtime


def evaluate_main(argv) -> int:
    return _run(_evaluate, argv)


def _evaluate(argv) -> int:
    p = _checkpoint_parser("backprop evaluate", "Loss and metrics of a saved model.")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    ckpt, ds, X, split, runtime = _checkpoint_data(args, need_target=True)
    extra = ckpt.extra
    classify = extra["task"] == "classification"
    y = ds["y"]
    if classify and extra["classes"] != ds["classes"]:
        y = _remap_labels(y, ds["classes"], extra["classes"])
    yscale = None
    if not classify:
        from backprop.data import Standardizer

        yscale = Standardizer(extra["y_mean"], extra["y_std"])
    results = _test_metrics(ckpt.model, X, y, classify, yscale)
    if args.json:
        print(json.dumps({"split": split, "rows": len(X), **results}))
    else:
        print(f"{len(X)} rows ({split}) on {runtime}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


def _remap_labels(y, classes_now, classes_trained):
    lookup = {c: i for i, c in enumerate(classes_trained)}
    unknown = sorted(set(classes_now) - set(lookup))
    if unknown:
        raise CLIError(f"the data has classes {unknown} that the model was not trained on")
    return np.array([lookup[classes_now[k]] for k in y], dtype=np.int64)


def predict_main(argv) -> int:
    return _run(_predict, argv)


def _predict(argv) -> int:
    import csv

    from backprop import training
    from backprop.backend import to_numpy

    p = _checkpoint_parser("backprop predict", "Predictions of a saved model, as CSV.")
    p.add_argument("--out", help="CSV file to write (default: stdout)")
    p.add_argument("--proba", action="store_true", help="add class probabilities")
    args = p.parse_args(argv)
    ckpt, ds, X, split, _ = _checkpoint_data(args, need_target=False)
    extra = ckpt.extra
    out = to_numpy(training.predict(ckpt.model, X, batch_size=args.batch_size)).astype(np.float64)
    if extra["task"] == "classification":
        classes = extra["classes"]
        header = ["prediction"] + ([f"p_{c}" for c in classes] if args.proba else [])
        z = out - out.max(axis=1, keepdims=True)
        proba = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        rows = [[classes[k]] + ([f"{v:.6g}" for v in pr] if args.proba else [])
                for k, pr in zip(out.argmax(axis=1), proba)]
    else:
        pred = out * extra["y_std"] + extra["y_mean"]
        header = ["prediction"] if pred.shape[1] == 1 else \
            [f"prediction_{i}" for i in range(pred.shape[1])]
        rows = [[f"{v:.6g}" for v in r] for r in pred]
    f = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    finally:
        if args.out:
            f.close()
    if args.out:
        print(f"wrote {len(rows)} predictions ({split} rows) to {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# info
def info_main(argv) -> int:
    p = argparse.ArgumentParser(prog="backprop info",
                                description="What runs where, and why.")
    p.add_argument("--json", action="store_true", help="print as JSON")
    args = p.parse_args(argv)
    import backprop as bp
    from backprop import kernels as K

    info = {"backprop": bp.__version__, "python": sys.version.split()[0], **bp.device_info()}
    info["kernel_backends"] = {name: K.unavailable_reason(name) or "available"
                               for name in K.BACKENDS}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}")
            for k, v in value.items():
                print(f"  {k:<{width - 2}}  {v}")
        else:
            print(f"{key:<{width}}  {value if value not in ('', [], None) else '-'}")
    return 0
