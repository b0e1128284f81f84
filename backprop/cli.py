"""``python -m backprop [--debug] <command>`` (also the ``backprop`` script).

::

    train     build an MLP, train it with a progress bar, report test metrics, and save
              model.npz, history.json, history.csv and curves.png (with --monitor also
              gradient_flow.png) to --out
    evaluate  loss and metrics of a saved model on a data set
    predict   a saved model's predictions, as CSV (to a file or stdout)
    explain   backprop on one small batch: the equations with the numbers, each gradient
              checked against central differences, after the computational graph
    export    a saved model as an ONNX file (needs pip install 'backprop[onnx]')
    info      versions, device, CuPy/Numba status, kernel backend, CPU-fallback reason

Subcommands live in :data:`COMMANDS`: ``name -> (one-line help, "module:function")``, the
function taking the rest of the command line (``argv`` list) and returning an exit code.
Modules are imported only when their command runs, so ``--help`` stays fast. To add a
command, add one entry.

Data (``--data``): a built-in set (``digits``, ``xor``, ``two_moons``, ``spirals``,
``regression``) or a CSV file with a header (``--target COLUMN``). ``train`` splits it
into train/validation/test parts (``--split``, stratified for classification; a validation
or test fraction of 0 leaves that part out), fits the standardisation on the train part,
and stores that, the split, the class names, the feature and target column names in the
checkpoint, so ``evaluate`` and ``predict`` prepare data exactly as ``train`` did. They
drop the target column of a labelled CSV file where the model does not need it, and
require the other columns to be the model's features (in any order).

Errors. Every argument is checked when the command line is parsed; ``train`` then checks
the device, the data, the split (every part used is non-empty, every class is in the train
part) and the output folder (created, and written to) before the first epoch, so that a
problem never costs a training run. Exit codes::

    0    success
    1    ``info`` found an unusable configuration (each problem on stderr), or an
         unexpected internal error (a bug: one line, with the exception, on stderr)
    2    a usage or input error: one line ``error: ...`` on stderr saying what to do
         (argparse's own usage errors also exit 2)
    130  interrupted (Ctrl-C); ``train`` then saves nothing and removes the folders it made

``--debug`` (before the command, ``python -m backprop --debug train ...``, or among its
options) or ``BACKPROP_DEBUG=1`` prints the full traceback instead of the one-line message.

Environment. ``BACKPROP_DEVICE``, ``BACKPROP_KERNELS`` and ``BACKPROP_DTYPE`` apply unless
``--device``, ``--kernels`` or ``--dtype`` is given: a flag overrides its variable. A device
that is requested but unavailable is an error (exit 2) before any data is loaded; only
``auto`` falls back to the CPU, and says why.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import json
import math
import os
import sys
import time
import traceback

import numpy as np

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train a model and save it, its history and learning curves",
              "backprop.cli:train_main"),
    "evaluate": ("loss and metrics of a saved model on a data set", "backprop.cli:evaluate_main"),
    "predict": ("predictions of a saved model, as CSV", "backprop.cli:predict_main"),
    "export": ("write a saved model as ONNX (for ONNX Runtime and other tools)",
               "backprop.cli:export_main"),
    "explain": ("backprop on one small batch, the equations with the numbers, each gradient "
                "checked; and the computational graph", "backprop.cli:explain_main"),
    "info": ("versions, device, kernel backend and the reason for any CPU fallback",
             "backprop.cli:info_main"),
}

BUILTIN = ("digits", "xor", "two_moons", "spirals", "regression")
# the output layer's activation that each loss takes (the others: linear)
OUTPUT = {"nll": "log_softmax", "categorical_crossentropy": "softmax"}

# train's choices: the losses (-> the task they serve), schedules and batch-norm placements
LOSSES = {"cross_entropy": "classification", "nll": "classification",
          "categorical_crossentropy": "classification", "mse": "regression",
          "half_mse": "regression", "l1": "regression"}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}
SCHEDULES = ("none", "step", "exponential", "cosine", "plateau")
BATCH_NORM = ("none", "before", "after")
INIT_ALIASES = {"he": "he_uniform", "xavier": "xavier_uniform"}

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# set by main() for the command it runs (global --debug); "quiet": a rank other than 0 of an
# MPI job, whose errors rank 0 reports; "error": the exception of the last failed command
_options = {"debug": False, "quiet": False, "error": None}


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (see the module docstring); never raises
    for a user error, an interrupt or a bug in a command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK
    if argv[0] == "--version":
        import backprop

        print(f"backprop {backprop.__version__}")
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        if name.startswith("-"):
            problem = (f"unknown option {name!r} before the command; only --debug, --version "
                       "and --help go there, a command's options follow it (python -m "
                       "backprop <command> --help)")
        else:
            problem = (f"unknown command {name!r}; expected one of {', '.join(COMMANDS)} "
                       "(python -m backprop --help)")
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    module, func = COMMANDS[name][1].split(":")
    previous, _options["debug"] = _options["debug"], debug
    try:
        return _run(lambda args: getattr(importlib.import_module(module), func)(args), rest)
    finally:
        _options["debug"] = previous


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {n:<{width}}  {h}" for n, (h, _) in COMMANDS.items()]
    return ("usage: python -m backprop [--debug] <command> [options]   (<command> --help for "
            "its options)\n\ncommands:\n" + "\n".join(lines)
            + "\n\n--debug (or BACKPROP_DEBUG=1) shows the traceback of an error. Exit codes: "
            "0 ok, 1 internal error (or info: unusable configuration), 2 usage or input "
            "error, 130 interrupted.")


class CLIError(Exception):
    """A problem with the command line or its inputs: printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that report a problem with the user's input or machine, not a bug."""
    try:
        from backprop.backend import DeviceUnavailableError
        from backprop.data import DataError
        from backprop.distributed import DistributedError
        from backprop.io import CheckpointError
        from backprop.kernels import KernelBackendError
    except Exception:  # a broken installation: whatever failed is then reported as a bug
        return (CLIError, OSError)
    return (CLIError, DataError, CheckpointError, DeviceUnavailableError, KernelBackendError,
            DistributedError, OSError)


def _debug_requested(argv) -> bool:
    if _options["debug"]:
        return True
    if os.environ.get("BACKPROP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    argv = list(argv)
    return "--debug" in (argv[:argv.index("--")] if "--" in argv else argv)


def _run(fn, argv) -> int:
    """``fn(argv)``'s exit code, with every failure turned into one line on stderr (or the
    traceback under --debug / BACKPROP_DEBUG=1): 2 for a user error, 130 for Ctrl-C, 1 for
    anything else, which is a bug."""
    debug = _debug_requested(argv)
    _options["error"] = None
    try:
        return int(fn(argv) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `predict ... | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        user = isinstance(exc, _user_errors())
        _options["error"] = exc
        if _options["quiet"] and not debug:  # another rank of the job reports it
            return EXIT_USAGE if user else EXIT_FAILURE
        if debug:
            traceback.print_exc()
        elif user:
            print(f"error: {_describe(exc)}", file=sys.stderr)
        elif isinstance(exc, MemoryError):
            print(f"error: out of memory ({type(exc).__name__}: {_one_line(exc)}); use a "
                  "smaller --batch-size or model", file=sys.stderr)
        else:
            print(f"error: internal error {type(exc).__name__}: {_one_line(exc)} (a bug in "
                  "backprop: run with --debug or BACKPROP_DEBUG=1 for the traceback, and "
                  "please report it)", file=sys.stderr)
        return EXIT_USAGE if user else EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
    return _one_line(exc)


# ---------------------------------------------------------------------------------------
# Argument types: argparse turns ArgumentTypeError into "prog: error: argument --x: msg"
def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def _number(minimum: float, *, strict: bool = False, below: float | None = None):
    """A finite float ``>= minimum`` (``> minimum`` if strict, ``< below`` if given)."""
    allowed = (f"a finite number {'>' if strict else '>='} {minimum:g}"
               + (f" and < {below:g}" if below is not None else ""))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (math.isfinite(value) and (value > minimum if strict else value >= minimum)
              and (below is None or value < below))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def _probability(text: str) -> float:
    try:
        return _number(0.0, below=1.0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}") \
            from None


def _hidden(text: str) -> list[int]:
    try:
        widths = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        widths = [0]
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected layer widths >= 1 such as 128,64 ('' for "
                                         f"no hidden layer), got {text!r}")
    return widths


def _fractions(text: str) -> list[float]:
    """``train,validation,test``: three finite fractions >= 0 summing to 1, train > 0."""
    try:
        fr = [float(f) for f in text.split(",")]
    except ValueError:
        fr = []
    if len(fr) != 3 or not all(math.isfinite(f) for f in fr):
        raise argparse.ArgumentTypeError(f"expected three fractions train,validation,test such "
                                         f"as 0.7,0.15,0.15, got {text!r}")
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected fractions >= 0 that sum to 1 such as "
                                         f"0.7,0.15,0.15, got {text!r}")
    if fr[0] == 0:
        raise argparse.ArgumentTypeError(f"the train fraction must be > 0 (validation and test "
                                         f"may be 0, which leaves that part out), got {text!r}")
    return fr


def _device(text: str) -> str:
    from backprop.backend import parse_device

    try:
        parse_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected auto, cpu, cuda, "
                                         "gpu or cuda:N") from None
    return text.strip().lower()


def _activation(text: str) -> str:
    from backprop.activations import NAMES

    if text.strip().lower() not in NAMES:
        raise argparse.ArgumentTypeError(f"unknown activation {text!r}; expected one of "
                                         f"{', '.join(sorted(NAMES))}")
    return text.strip().lower()


def _init_names() -> list[str]:
    from backprop.init import INITIALIZERS

    return [*INIT_ALIASES, *sorted(INITIALIZERS)]


def _init(text: str) -> str:
    """An initialiser name of ``backprop.init.INITIALIZERS`` (or he / xavier), as that name."""
    from backprop.init import INITIALIZERS

    name = text.strip().lower()
    name = INIT_ALIASES.get(name, name)
    if name not in INITIALIZERS:
        raise argparse.ArgumentTypeError(f"unknown initialiser {text!r}; expected one of "
                                         f"{', '.join(_init_names())}")
    return name


def _encoding(text: str) -> str:
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown text encoding {text!r}; e.g. utf-8, cp1252, "
                                         "latin-1, utf-16") from None
    return text


# ---------------------------------------------------------------------------------------
# Device, kernels and dtype: a flag overrides its environment variable
def _add_common_options(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    if runtime:
        from backprop.kernels import CHOICES

        p.add_argument("--device", type=_device, default=None,
                       help="auto | cpu | cuda | cuda:N (default: BACKPROP_DEVICE, else auto)")
        p.add_argument("--kernels", default=None, choices=CHOICES,
                       help="kernel backend (default: BACKPROP_KERNELS, else auto: Numba on "
                            "CPU, CuPy on GPU)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also BACKPROP_DEBUG=1)")


def _device_problem(value: str, exc: Exception, source: str) -> str:
    """What is wrong with a device request from ``source`` (a flag or BACKPROP_DEVICE) and
    what to do about it."""
    if source == "--device":
        return f"--device {value}: {_one_line(exc)}; use --device cpu or --device auto"
    if isinstance(exc, ValueError):
        return (f"BACKPROP_DEVICE={value!r} is not a device; expected auto, cpu, cuda, gpu or "
                "cuda:N: fix or unset BACKPROP_DEVICE")
    return (f"BACKPROP_DEVICE={value!r}: {_one_line(exc)}; set BACKPROP_DEVICE=cpu or auto, "
            "or unset it")


def _setup_runtime(args) -> tuple[str, str]:
    """Select dtype, kernels and device, from the flags where given, else from BACKPROP_*,
    failing now (before any data is loaded) with what to do. Returns a description
    ("device cpu, kernels numba_cpu") and the reason for a CPU fallback ("" if none)."""
    import backprop as bp
    from backprop import backend
    from backprop import kernels as K

    has_dtype = hasattr(args, "dtype")
    if getattr(args, "dtype", None):
        backend.set_dtype(args.dtype)
    else:
        try:
            backend.get_dtype()
        except ValueError as exc:
            raise CLIError(f"{exc}: fix or unset BACKPROP_DTYPE"
                           + (", or give --dtype" if has_dtype else "")) from None
    if args.kernels is not None:
        K.set_backend(args.kernels)
    else:
        try:
            K.get_choice()
        except K.KernelBackendError as exc:
            raise CLIError(f"{exc}: fix or unset BACKPROP_KERNELS, or give --kernels") from None
    try:
        if args.device is not None:
            device = bp.set_device(args.device)
        else:  # the current device: BACKPROP_DEVICE unless set in this process
            device = bp.get_device()
    except (ValueError, backend.DeviceUnavailableError) as exc:
        if args.device is not None:
            raise CLIError(_device_problem(args.device, exc, "--device")) from None
        value = os.environ.get("BACKPROP_DEVICE", "auto")
        raise CLIError(_device_problem(value, exc, "BACKPROP_DEVICE")
                       + ", or give --device cpu") from None
    try:
        kernels = K.backend_name(device.kind)  # raises now if the choice cannot run here
    except K.KernelBackendError as exc:
        raise CLIError(f"{exc} (on the command line: --device, --kernels)") from None
    return f"device {device}, kernels {kernels}", \
        bp.device_info(mixed_precision=False)["fallback_reason"]


# ---------------------------------------------------------------------------------------
# Data
def _load(name: str, *, target: str | None, task: str, seed: int, encoding: str = "utf-8",
          features: list[str] | None = None, need_target: bool = False,
          origin: str = "--data") -> dict:
    """A data set as ``{"X", "y", "task", "classes", "features", "target", "name"}``.

    With ``features`` (a model's), the columns other than ``target`` must be exactly these
    (any order; X comes in this order), and ``target`` is loaded only where present (it
    must be with ``need_target``). ``origin`` says where ``name`` came from, for errors."""
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
        names = [f"x{i}" for i in range(X.shape[1])]
        if features is not None:
            _check_columns(names, features, name)
            X = X[:, [names.index(f) for f in features]]
            names = list(features)
        return {"X": X, "y": y, "task": kind, "classes": classes, "features": names,
                "target": "y", "name": name}
    if not os.path.exists(name):
        if origin == "--data":
            raise CLIError(f"--data {name!r} is neither a built-in data set "
                           f"({', '.join(BUILTIN)}) nor an existing CSV file")
        raise CLIError(f"the model's training data {name!r} ({origin}) no longer exists; give "
                       "the data with --data")
    if os.path.isdir(name):
        raise CLIError(f"--data {name!r} is a directory; give a CSV file with a header row "
                       f"or a built-in data set ({', '.join(BUILTIN)})")
    if features is not None:
        columns = data.csv_columns(name, encoding=encoding)
        if need_target and target not in columns:
            raise CLIError(f"{name} has no target column {target!r} (columns: "
                           f"{', '.join(columns)}); give labelled data, or use predict")
        _check_columns([c for c in columns if c != target], features, name)
        target = target if need_target else None  # unread: it may be blank where unlabelled
    table = data.load_csv(name, target=target, features=features, task=task,
                          encoding=encoding)
    return {"X": table.X, "y": table.y, "task": table.task, "classes": table.classes,
            "features": table.feature_names, "target": table.target,
            "name": os.path.abspath(name)}


def _check_columns(available: list[str], features: list[str], source: str) -> None:
    """The columns ``available`` to a model trained on ``features`` must be those."""
    missing = [f for f in features if f not in available]
    if missing:
        raise CLIError(f"{source} lacks the feature columns {_preview(missing)} that the model "
                       f"was trained on (it expects {', '.join(features)}); give data with "
                       "these columns")
    extra = [c for c in available if c not in features]
    if extra:
        raise CLIError(f"{source} has {len(available)} feature columns but the model was "
                       f"trained on {len(features)}: unexpected {_preview(extra)}; drop them "
                       f"(the model expects {', '.join(features)})")


def _preview(names: list[str], n: int = 5) -> str:
    return repr(names) if len(names) <= n else repr(names[:n])[:-1] + ", ...]"


def _split(ds: dict, fractions, seed: int):
    """``[(X, y)] * 3`` for train, validation, test; a part of fraction 0 is empty. With all
    three fractions positive this is exactly ``train_val_test_split`` (checkpoints written
    by earlier versions re-split the same way)."""
    from backprop.data import train_val_test_split

    X, y = ds["X"], ds["y"]
    used = [i for i, f in enumerate(fractions) if f > 0]
    if len(used) == 1:
        pieces = [(X, y)]  # fit shuffles; nothing else needs an order
    else:
        pieces = train_val_test_split(X, y, [fractions[i] for i in used], seed=seed,
                                      stratify=ds["task"] == "classification")
    parts = [(X[:0], y[:0])] * len(fractions)
    for i, piece in zip(used, pieces):
        parts[i] = piece
    return parts


PARTS = ("train", "validation", "test")


def _check_parts(ds: dict, parts, fractions) -> None:
    """Every part with a positive fraction has rows; every class has rows in train."""
    sizes = "/".join(str(len(X)) for X, _ in parts)
    text = ",".join(f"{f:g}" for f in fractions)
    for name, fraction, (X, _) in zip(PARTS, fractions, parts):
        if fraction > 0 and len(X) == 0:
            fix = ("a larger train fraction" if name == "train" else
                   f"a larger {name} fraction, or 0 to leave the {name} part out (e.g. "
                   "--split 1,0,0 trains on every row)")
            raise CLIError(f"the {name} part of the split is empty: --split {text} divides the "
                           f"{len(ds['X'])} rows of {ds['name']} into {sizes} train/validation/"
                           f"test rows; give more rows or {fix}")
    if ds["task"] == "classification":
        counts = np.bincount(np.asarray(parts[0][1]), minlength=len(ds["classes"]))
        absent = [c for c, n in zip(ds["classes"], counts) if n == 0]
        if absent:
            raise CLIError(f"the classes {_preview(absent)} have no rows in the train part "
                           f"(--split {text}); give a larger train fraction, or add rows of "
                           "these classes")


def _check_target(ds: dict) -> None:
    if ds["y"] is None:
        raise CLIError(f"training needs a target: give --target COLUMN for {ds['name']} "
                       f"(columns: {', '.join(ds['features'])})")
    if ds["task"] == "classification" and len(ds["classes"]) < 2:
        raise CLIError(f"{ds['name']}: the target column {ds['target']!r} holds one class "
                       f"only, {ds['classes'][0]!r}; classification needs at least two (for "
                       "numbers, --task regression)")


def _prepare_out(out: str) -> list[str]:
    """Create the folder ``out`` and check it is writable with a real file, before any
    training. Returns the folders created (deepest first), for removal on failure."""
    import tempfile

    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} is an existing file, not a folder; give a folder for "
                       "model.npz, history.json, history.csv and curves.png")
    path, created = os.path.abspath(out), []
    probe = path
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot create the folder ({exc.strerror}); give a "
                       "writable folder") from None
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".backprop-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        _remove_empty(created)
        raise CLIError(f"--out {out}: cannot write to the folder ({exc.strerror}); give a "
                       "writable folder") from None
    return created


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # deepest first; a folder with anything in it stays
        try:
            os.rmdir(folder)
        except OSError:
            return


# ---------------------------------------------------------------------------------------
# train
def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backprop train", description="Train an MLP and save it.")
    p.add_argument("--data", default="digits",
                   help=f"built-in data set ({', '.join(BUILTIN)}) or a CSV file (default digits)")
    p.add_argument("--target", help="target column of a CSV file")
    p.add_argument("--encoding", type=_encoding, default="utf-8",
                   help="text encoding of a CSV file (default utf-8)")
    p.add_argument("--task", default="auto", choices=("auto", "classification", "regression"))
    p.add_argument("--hidden", type=_hidden, default="128,64",
                   help="hidden layer widths (default 128,64; '' for none)")
    p.add_argument("--activation", type=_activation, default="relu",
                   help="hidden activation (default relu)")
    p.add_argument("--dropout", type=_probability, default=0.0,
                   help="dropout probability after each hidden layer (after its activation "
                        "and batch norm), in [0, 1) (default 0)")
    p.add_argument("--input-dropout", type=_probability, default=0.0, metavar="P",
                   help="dropout probability on the input features, before the first layer, "
                        "in [0, 1) (default 0)")
    p.add_argument("--batch-norm", default="none", choices=BATCH_NORM,
                   help="BatchNorm1d in each hidden layer: 'before' normalises the linear "
                        "part and applies the activation after it (Dense without bias → "
                        "BatchNorm1d → activation), 'after' normalises the activation's "
                        "output (Dense → BatchNorm1d); default none. Needs batches of at "
                        "least 2 rows")
    p.add_argument("--init", type=_init, default=None, metavar="NAME",
                   help=f"weight initialiser of every Dense layer: {', '.join(_init_names())} "
                        "(he = he_uniform, xavier = xavier_uniform; default: the library's "
                        "per layer, he_uniform before ReLU-like activations, else "
                        "xavier_uniform)")
    p.add_argument("--loss", default=None, choices=tuple(LOSSES),
                   help="classification: cross_entropy (default; softmax of the outputs), "
                        "nll (the output layer computes log-softmax) or "
                        "categorical_crossentropy (a softmax output layer and Keras' "
                        "cross-entropy on its probabilities); regression: mse "
                        "(default), half_mse (½·MSE) or l1. With a CSV file and --task auto, "
                        "the loss decides the task")
    p.add_argument("--optimizer", default="adam",
                   choices=("adam", "adamw", "sgd", "momentum", "rmsprop", "adagrad"))
    p.add_argument("--lr", type=_number(0.0, strict=True), default=1e-3,
                   help="learning rate, > 0 (default 1e-3)")
    p.add_argument("--weight-decay", type=_number(0.0), default=None,
                   help="weight decay, >= 0 (default: the optimizer's, 0 except adamw's 0.01)")
    p.add_argument("--schedule", default="none", choices=SCHEDULES,
                   help="learning-rate schedule, stepped after each epoch (the lr of each "
                        "epoch is the 'lr' column of history.csv): step (lr × --gamma every "
                        "--step-size epochs), exponential (lr × --gamma each epoch), cosine "
                        "(cosine annealing to --min-lr over the epochs after the warmup), "
                        "plateau (lr × --gamma after more than --lr-patience epochs without "
                        "a better val_loss, or loss without a validation part); default none")
    p.add_argument("--step-size", type=_integer(1), default=None, metavar="N",
                   help="--schedule step: epochs between two decays (default 10)")
    p.add_argument("--gamma", type=_number(0.0, strict=True, below=1.0), default=None,
                   metavar="G",
                   help="--schedule step, exponential or plateau: the factor that multiplies "
                        "the lr, in (0, 1) (default 0.1; exponential 0.95)")
    p.add_argument("--min-lr", type=_number(0.0), default=None, metavar="LR",
                   help="--schedule cosine: the final lr; plateau: the lowest lr (default 0; "
                        "below --lr)")
    p.add_argument("--lr-patience", type=_integer(0), default=None, metavar="N",
                   help="--schedule plateau: epochs without improvement tolerated before the "
                        "lr is lowered (default 10)")
    p.add_argument("--warmup-epochs", type=_integer(0), default=0, metavar="N",
                   help="raise the lr linearly from lr/3 to --lr over this many epochs, then "
                        "follow --schedule (not plateau) from its start (default 0: no warmup)")
    p.add_argument("--epochs", type=_integer(1), default=30)
    p.add_argument("--batch-size", type=_integer(1), default=64)
    p.add_argument("--l1", type=_number(0.0), default=0.0,
                   help="L1 penalty λ₁ Σ|W| on the weights (default 0)")
    p.add_argument("--l2", type=_number(0.0), default=0.0,
                   help="L2 penalty λ₂ Σ W² on the weights (default 0; unlike --weight-decay, "
                        "part of the loss)")
    p.add_argument("--graph", action="store_true",
                   help="print the computational graph (forward and backward) before training")
    p.add_argument("--monitor", type=_integer(1), nargs="?", const=10, default=None,
                   metavar="EVERY",
                   help="watch the gradients every EVERY steps (default 10): per-layer δ, "
                        "‖∂W‖, update ratio, dead and saturated units in history.csv, a "
                        "warning when they vanish or explode, and gradient_flow.png")
    p.add_argument("--clip-grad-norm", type=_number(0.0, strict=True), default=None,
                   metavar="MAX_NORM", help="scale the gradients of each step to a total L2 "
                   "norm of at most MAX_NORM (before the optimizer step)")
    p.add_argument("--clip-grad-value", type=_number(0.0, strict=True), default=None,
                   metavar="V", help="clamp every gradient element to [-V, V] (before the "
                   "optimizer step; before --clip-grad-norm when both are given)")
    p.add_argument("--patience", type=_integer(0), default=0,
                   help="stop after this many epochs without a better val_loss (0: never)")
    p.add_argument("--split", type=_fractions, default="0.7,0.15,0.15",
                   help="train,validation,test fractions summing to 1 (default 0.7,0.15,0.15; "
                        "validation or test 0 leaves that part out)")
    p.add_argument("--seed", type=_integer(0), default=0,
                   help="seed of the split, weights and shuffling")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="float type (default: BACKPROP_DTYPE, else float32)")
    p.add_argument("--precision", default=None, choices=("float32", "bf16-mixed", "fp16-mixed"),
                   help="bf16-mixed or fp16-mixed: float32 weights, bfloat16/float16 matrix "
                        "products where they pay (falls back to float32 with a warning where "
                        "the hardware lacks them); default: BACKPROP_PRECISION, else float32")
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    _add_common_options(p)
    return p


def _build_model(n_in: int, hidden: list[int], n_out: int, activation: str, dropout: float,
                 seed: int, dtype: str, *, input_dropout: float = 0.0, batch_norm: str = "none",
                 init: str | None = None, output: str | None = None):
    """An MLP: [Dropout(input_dropout)], then per hidden width ``Dense(act)`` (batch_norm
    "none"), ``Dense(act) → BatchNorm1d`` ("after") or ``Dense(no bias) → BatchNorm1d →
    activation layer`` ("before"), each followed by ``Dropout(dropout)``; then
    ``Dense(n_out, activation=output)``. ``init`` None: the library's default per layer."""
    from backprop import activations
    from backprop.init import default_for
    from backprop.layers import BatchNorm1d, Dense, Dropout
    from backprop.model import Sequential

    rng = np.random.default_rng(seed)
    layers, width = [], n_in
    if input_dropout:
        layers.append(Dropout(input_dropout, seed=int(rng.integers(2**32))))
    act = activations.get(activation)
    for h in hidden:
        if batch_norm == "before":  # the activation's default init, for a Dense without one
            layers.append(Dense(width, h, init=init or default_for(act), bias=False, rng=rng,
                                dtype=dtype))
            layers.append(BatchNorm1d(h, dtype=dtype))
            if act.kernel != "identity":
                layers.append(activations.get(activation))
        else:
            layers.append(Dense(width, h, activation=activation, init=init, rng=rng,
                                dtype=dtype))
            if batch_norm == "after":
                layers.append(BatchNorm1d(h, dtype=dtype))
        if dropout:
            layers.append(Dropout(dropout, seed=int(rng.integers(2**32))))
        width = h
    layers.append(Dense(width, n_out, activation=output, init=init, rng=rng, dtype=dtype))
    return Sequential(layers)


def _make_schedule(args, optimizer):
    """The ``backprop.schedules`` scheduler of --schedule and --warmup-epochs (or None)."""
    from backprop import schedules

    name, warmup = args.schedule, args.warmup_epochs
    gamma = args.gamma if args.gamma is not None else (0.95 if name == "exponential" else 0.1)
    min_lr = args.min_lr or 0.0
    if name == "plateau":
        return schedules.ReduceLROnPlateau(
            optimizer, factor=gamma, min_lr=min_lr,
            patience=10 if args.lr_patience is None else args.lr_patience)
    after = None
    if name == "step":
        after = schedules.StepLR(optimizer, step_size=args.step_size or 10, gamma=gamma)
    elif name == "exponential":
        after = schedules.ExponentialLR(optimizer, gamma=gamma)
    elif name == "cosine":
        after = schedules.CosineAnnealingLR(optimizer, T_max=args.epochs - warmup,
                                            eta_min=min_lr)
    if warmup:
        return schedules.LinearWarmup(optimizer, warmup, after=after)
    return after


def _describe_schedule(scheduler) -> str:
    """One phrase for a scheduler from :func:`_make_schedule`."""
    from backprop import schedules

    if scheduler is None:
        return "constant lr"
    if isinstance(scheduler, schedules.LinearWarmup):
        text = (f"linear warmup from lr×{scheduler.start_factor:.3g} over "
                f"{_count(scheduler.warmup_steps, 'epoch')}")
        return text + (f", then {_describe_schedule(scheduler.after)}"
                       if scheduler.after is not None else "")
    if isinstance(scheduler, schedules.StepLR):
        return f"step: lr × {scheduler.gamma:g} every {_count(scheduler.step_size, 'epoch')}"
    if isinstance(scheduler, schedules.ExponentialLR):
        return f"exponential: lr × {scheduler.gamma:g} each epoch"
    if isinstance(scheduler, schedules.CosineAnnealingLR):
        return f"cosine annealing to {scheduler.eta_min:g} over {_count(scheduler.T_max, 'epoch')}"
    return (f"plateau: lr × {scheduler.factor:g} (down to {scheduler.min_lr:g}) after more "
            f"than {_count(scheduler.patience, 'epoch')} without improvement")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def train_main(argv) -> int:
    from backprop import distributed

    if not distributed.launched_by_mpi():
        return _run(_train, argv)
    return _train_on_ranks(argv)


def _train_on_ranks(argv) -> int:
    """``train`` as one rank of an MPI job (``mpiexec -n N python -m backprop train``): every
    rank loads and splits the data alike and trains its share of each batch; rank 0 alone
    prints and writes ``--out``. An error before training is agreed on by every rank
    (:func:`backprop.distributed.agree`), so the job fails with one message, from rank 0;
    an error during training ends the job through MPI_Abort with the failing rank's
    message."""
    from backprop import distributed

    rank = distributed.launcher_rank()
    saved = dict(_options)
    _options["quiet"] = rank != 0
    out = contextlib.redirect_stdout(open(os.devnull, "w")) if rank != 0 \
        else contextlib.nullcontext()
    try:
        with out:
            try:
                group = distributed.init()
            except ImportError as exc:
                if rank == 0:
                    print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            group.traceback_on_abort = _debug_requested(argv)
            before = group.agreements
            code = _run(_train, argv)
            if code != EXIT_OK and group.agreements == before:
                # this rank failed before training began: the others may be waiting for it
                # in fit's start-up agreement (or have failed alike); tell them
                try:
                    distributed.agree(group, _options["error"] or RuntimeError(
                        f"exit status {code}"))
                except distributed.DistributedError:
                    pass
            return code
    finally:
        _options.update(saved, error=None)


def _train(argv) -> int:
    from backprop.data import DataError

    parser = _train_parser()
    with _stderr_of_rank_zero():  # a usage error is printed once, by rank 0
        args = parser.parse_args(argv)
    if args.patience and args.split[1] == 0:
        parser.error("argument --patience: early stopping watches val_loss, but --split leaves "
                     "out the validation part; give it a validation fraction > 0")
    if args.data in BUILTIN and (args.target is not None or args.task != "auto"):
        parser.error(f"argument --{'target' if args.target is not None else 'task'}: applies "
                     f"to CSV files only; the built-in data set {args.data} has its own target "
                     "and task")
    task = _check_model_options(parser, args)
    t0 = time.perf_counter()
    runtime, fallback = _setup_runtime(args)  # before any data: a bad device fails fast
    try:
        ds = _load(args.data, target=args.target, task=task, seed=args.seed,
                   encoding=args.encoding)
    except DataError as exc:
        if args.loss is None or args.task != "auto":
            raise
        raise CLIError(f"{_one_line(exc)} (--loss {args.loss} makes this a {task} task: give "
                       f"a {'regression' if task == 'classification' else 'classification'} "
                       "loss, or leave --loss out)") from None
    _check_target(ds)
    parts = _split(ds, args.split, args.seed)
    _check_parts(ds, parts, args.split)
    if args.batch_norm != "none":
        _check_batch_norm_rows(len(parts[0][0]), args.batch_size)
    created = _prepare_out(args.out)
    try:
        return _train_and_save(args, argv, ds, parts, runtime, fallback, t0)
    except BaseException:  # failed or interrupted: leave no empty folders behind
        _remove_empty(created)
        raise


def _check_model_options(parser, args) -> str:
    """Check the model, loss and schedule options against each other and the data's task
    (known before loading, except a CSV file's under --task auto, which then follows an
    explicit --loss); a conflict is a usage error. Returns the task to load the data with."""
    if args.data in BUILTIN:
        task = "regression" if args.data == "regression" else "classification"
    else:
        task = args.task
    if args.loss is not None:
        wants = LOSSES[args.loss]
        if task not in ("auto", wants):
            where = (f"the built-in data set {args.data} is" if args.data in BUILTIN else
                     f"--task {task} makes {args.data}")
            fit = ", ".join(n for n, t in LOSSES.items() if t == task)
            parser.error(f"argument --loss: {args.loss} is a {wants} loss, but {where} a "
                         f"{task} task; use one of {fit}")
        task = wants
    if args.batch_norm != "none":
        if not args.hidden:
            parser.error(f"argument --batch-norm: {args.batch_norm} normalises hidden layers, "
                         "but --hidden '' gives none; give hidden widths or --batch-norm none")
        if args.batch_size < 2:
            parser.error("argument --batch-norm: BatchNorm1d needs at least 2 rows per batch "
                         "in training; give --batch-size 2 or more")
    uses = {"--step-size": (args.step_size, ("step",)),
            "--gamma": (args.gamma, ("step", "exponential", "plateau")),
            "--min-lr": (args.min_lr, ("cosine", "plateau")),
            "--lr-patience": (args.lr_patience, ("plateau",))}
    for flag, (value, schedules) in uses.items():
        if value is not None and args.schedule not in schedules:
            which = (", ".join(schedules[:-1]) + " or " if len(schedules) > 1 else "") \
                + schedules[-1]
            parser.error(f"argument {flag}: applies to --schedule {which} only, not --schedule "
                         f"{args.schedule}")
    if args.precision in ("bf16-mixed", "fp16-mixed") and args.dtype == "float64":
        parser.error(f"argument --precision: {args.precision} keeps float32 master weights; "
                     "it cannot be combined with --dtype float64")
    if args.min_lr is not None and args.min_lr >= args.lr:
        parser.error(f"argument --min-lr: {args.min_lr:g} is not below --lr {args.lr:g}; give "
                     "a smaller --min-lr (the lr the schedule decays towards)")
    if args.warmup_epochs:
        if args.schedule == "plateau":
            parser.error("argument --warmup-epochs: cannot be combined with --schedule "
                         "plateau (which reacts to the loss rather than following the epochs); "
                         "use step, exponential, cosine or none after a warmup")
        if args.warmup_epochs >= args.epochs:
            parser.error(f"argument --warmup-epochs: {args.warmup_epochs} warmup epochs leave "
                         f"none of the {args.epochs} --epochs for training at the full lr; "
                         "give fewer warmup epochs or more epochs")
    return task


def _check_batch_norm_rows(n: int, batch_size: int) -> None:
    """BatchNorm1d needs 2 rows in every training batch (on every MPI process), the last
    one included: checked before training, with a batch size that works."""
    from backprop import distributed

    world = distributed.world_size()

    def smallest(b: int) -> int:  # each process's share of the smallest batch
        b = min(b, n)
        return (b if n % b == 0 else n % b) // world

    if smallest(batch_size) >= 2:
        return
    where = f" on each of {world} MPI processes" if world > 1 else ""
    size = min(batch_size, n)
    last = size if n % size == 0 else n % size
    good = next((b for d in range(1, n + 1) for b in (batch_size - d, batch_size + d)
                 if 2 * world <= b <= n and smallest(b) >= 2), None)
    fix = f"use --batch-size {good}, for example" if good else \
        f"give at least {2 * world} train rows"
    raise CLIError(f"--batch-norm needs at least 2 rows in every training batch{where}, but "
                   f"{n} train rows in batches of {size} leave a last batch of {last} row(s); "
                   f"{fix}")


@contextlib.contextmanager
def _stderr_of_rank_zero():
    """Discard stderr in the body on ranks other than 0 of an MPI job."""
    if not _options["quiet"]:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _train_and_save(args, argv, ds, parts, runtime, fallback, t0) -> int:
    from backprop import callbacks, io, training
    from backprop.backend import get_dtype
    from backprop.data import Standardizer, validate

    (Xtr, ytr), (Xva, yva), (Xte, yte) = parts
    scaler = Standardizer().fit(Xtr)
    Xtr, Xva, Xte = (scaler.transform(a) for a in (Xtr, Xva, Xte))
    for name, (X, y) in zip(PARTS, ((Xtr, ytr), (Xva, yva), (Xte, yte))):
        if len(X):  # finite and well-formed, also after standardisation
            validate(X, y, name=f"the {name} part of {ds['name']}")
    classify = ds["task"] == "classification"
    loss = args.loss or DEFAULT_LOSS[ds["task"]]
    yscale = None
    if classify:
        n_out, metrics = len(ds["classes"]), ["accuracy"]
    else:
        yscale = Standardizer().fit(ytr)
        ytr, yva = yscale.transform(ytr), yscale.transform(yva)
        n_out, metrics = ytr.shape[1], ["mae", "r2"]
    dtype = str(get_dtype())
    model = _build_model(Xtr.shape[1], args.hidden, n_out, args.activation, args.dropout,
                         args.seed, dtype, input_dropout=args.input_dropout,
                         batch_norm=args.batch_norm, init=args.init,
                         output=OUTPUT.get(loss))
    if args.l1 or args.l2:
        from backprop.regularizers import L1L2

        model.add_regularizer(L1L2(l1=args.l1, l2=args.l2))
    if args.graph and not _options["quiet"]:
        print(model.graph(loss=loss))
    extra_kw = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    optimizer = training.make_optimizer(args.optimizer, model.parameters(), lr=args.lr,
                                        **extra_kw)
    scheduler = _make_schedule(args, optimizer)
    cbs = [callbacks.TerminateOnNaN()]
    monitor = None
    if args.monitor:
        from backprop.gradient_health import GradientMonitor

        monitor = GradientMonitor(every=args.monitor)
        cbs.append(monitor)
    if args.patience:
        cbs.append(callbacks.EarlyStopping("val_loss", patience=args.patience))
    options = _run_options(args, loss, model, scheduler, validated=len(Xva) > 0)
    if args.verbose:
        print(runtime + (f" ({fallback})" if fallback else ""))
        print(f"{len(Xtr)} train / {len(Xva)} validation / {len(Xte)} test rows, "
              f"{Xtr.shape[1]} features, {ds['task']}")
        print("\n".join(_describe_options(options, scheduler)))
        print(model.summary())
    validation = (Xva, yva) if len(Xva) else None
    with _warnings_printed():
        history = training.fit(model, Xtr, ytr, loss=loss, optimizer=optimizer,
                               epochs=args.epochs, batch_size=args.batch_size,
                               validation_data=validation, metrics=metrics, callbacks=cbs,
                               seed=args.seed, verbose=args.verbose,
                               clip_grad_norm=args.clip_grad_norm,
                               clip_grad_value=args.clip_grad_value, scheduler=scheduler,
                               precision=args.precision)
    if _options["quiet"]:  # a rank other than 0: rank 0 evaluates, writes and reports
        return 0
    results = _test_metrics(model, Xte, yte, classify, yscale, loss=loss) if len(Xte) else {}
    extra = {"task": ds["task"], "classes": ds["classes"], "features": ds["features"],
             "target": ds["target"], "mean": scaler.mean, "std": scaler.std,
             "data": {"name": ds["name"], "split": args.split, "seed": args.seed,
                      "encoding": args.encoding},
             "test": results, "command": ["train", *argv], "options": options,
             "precision": history.params.get("precision")}
    if yscale is not None:
        extra.update({"y_mean": yscale.mean, "y_std": yscale.std})
    io.save(model, os.path.join(args.out, "model.npz"), optimizer=optimizer,
            epoch=len(history), scheduler=scheduler, extra=extra)
    history.to_json(os.path.join(args.out, "history.json"))
    history.to_csv(os.path.join(args.out, "history.csv"))
    plot = None if args.no_plot else _plot(history, os.path.join(args.out, "curves.png"))
    flow = None
    if monitor is not None and not args.no_plot and monitor.records:
        flow = _plot_flow(monitor, os.path.join(args.out, "gradient_flow.png"))
    elapsed = time.perf_counter() - t0
    if results:
        print("test " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    else:
        print(f"no test part (--split {','.join(f'{f:g}' for f in args.split)}): no test "
              "metrics")
    from backprop import distributed

    ranks = distributed.world_size()
    where = f"{runtime}, {ranks} MPI processes" if ranks > 1 else runtime
    if history.params.get("precision") in ("bf16-mixed", "fp16-mixed"):
        where += f", {history.params['precision']}"
    print(f"ran on {where}; {len(history)} epochs in {elapsed:.1f} s")
    print(f"saved {args.out}/model.npz, history.json, history.csv"
          + (f", {os.path.basename(plot)}" if plot else "")
          + (f", {os.path.basename(flow)}" if flow else ""))
    return 0


@contextlib.contextmanager
def _warnings_printed():
    """Library warnings raised inside (GradientHealthWarning...) as one ``warning:`` line
    each on stderr, instead of Python's ``file:line: Category: message`` form."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    before = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


def _plot_flow(monitor, path: str) -> str | None:
    """The monitor's gradient-flow plot (per-layer δ RMS over the steps), if matplotlib is
    there."""
    try:
        monitor.plot(path)
    except ImportError:
        print("matplotlib is not installed: skipped gradient_flow.png "
              "(pip install 'backprop[plot]')")
        return None
    return path


def _run_options(args, loss: str, model, scheduler, validated: bool) -> dict:
    """The model, loss and schedule options of a run, resolved (defaults filled in) and
    JSON-able: printed before training and saved in the checkpoint as ``extra["options"]``."""
    from backprop.layers import Dense

    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    inits = {"hidden": sorted({layer.init or _default_init(layer) for layer in dense[:-1]}),
             "output": dense[-1].init or _default_init(dense[-1])}
    schedule = None if scheduler is None else scheduler.state_dict()
    return {"loss": loss, "output": OUTPUT.get(loss, "linear"),
            "hidden": list(args.hidden), "activation": args.activation,
            "batch_norm": args.batch_norm, "dropout": args.dropout,
            "input_dropout": args.input_dropout, "init": args.init or "auto",
            "initializers": inits, "optimizer": args.optimizer, "lr": args.lr,
            "schedule": args.schedule, "warmup_epochs": args.warmup_epochs,
            "schedule_config": None if schedule is None else _schedule_config(schedule),
            "plateau_monitor": ("val_loss" if validated else "loss")
            if args.schedule == "plateau" else None}


def _default_init(layer) -> str:
    from backprop.init import default_for

    return default_for(layer.activation)


def _schedule_config(state: dict) -> dict:
    """``{"type", **config}`` of a scheduler state, with its warmup's follower nested."""
    config = {"type": state["type"], **state["config"]}
    if state.get("after") is not None:
        config["after"] = _schedule_config(state["after"])
    return config


def _describe_options(options: dict, scheduler) -> list[str]:
    """The lines of the run summary that state the model, loss and schedule options."""
    placement = {"none": "no batch norm",
                 "before": "batch norm before each hidden activation",
                 "after": "batch norm after each hidden activation"}[options["batch_norm"]]
    inits = options["initializers"]
    hidden = "/".join(inits["hidden"])
    init = (f"init {options['init']}" if options["init"] != "auto" else
            f"init {hidden} (hidden), {inits['output']} (output)" if hidden else
            f"init {inits['output']}")
    output = {"log_softmax": " (log-softmax output)", "softmax": " (softmax output; the loss "
              "takes its logits, δ = A - Y)"}.get(options["output"], "")
    dropout = [f"dropout {options['dropout']:g} after each hidden layer"] \
        if options["dropout"] else []
    if options["input_dropout"]:
        dropout.append(f"input dropout {options['input_dropout']:g}")
    schedule = _describe_schedule(scheduler)
    if options["plateau_monitor"]:
        schedule += f" of {options['plateau_monitor']}"
    return [f"model: loss {options['loss']}{output}, {init}, {placement}, "
            + (", ".join(dropout) if dropout else "no dropout"),
            f"training: {options['optimizer']}, lr {options['lr']:g}, {schedule}"]


def _test_metrics(model, X, y, classify: bool, yscale, batch_size: int = 256,
                  loss: str = "cross_entropy") -> dict:
    """Test metrics in the data's own units (regression outputs are un-standardised); a
    classifier's loss is its training loss (cross_entropy on logits, nll on log-softmax
    outputs)."""
    from backprop import metrics, training
    from backprop.backend import to_numpy

    if classify:
        return training.evaluate(model, X, y, loss=loss, metrics=["accuracy"],
                                 batch_size=batch_size)
    pred = to_numpy(training.predict(model, X, batch_size=batch_size))
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
                  and not k.startswith("val_") and "/" not in k), None)  # not grad/...
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
    p.add_argument("--encoding", type=_encoding, default=None,
                   help="text encoding of a CSV file (default: as in train for its data, "
                        "else utf-8)")
    p.add_argument("--split", choices=("test", "all"), help="rows to use: the test part of "
                   "the training split (default when --data is the training data) or all rows")
    p.add_argument("--batch-size", type=_integer(1), default=256)
    _add_common_options(p)
    return p


def _check_model_path(path: str) -> None:
    if os.path.isdir(path):
        inside = os.path.join(path, "model.npz")
        hint = inside if os.path.isfile(inside) else "e.g. runs/latest/model.npz"
        raise CLIError(f"{path} is a directory, not a model; give the model.npz file that "
                       f"train wrote ({hint})")


def _checkpoint_data(args, need_target: bool):
    """Load the checkpoint and the rows to run it on, prepared as train prepared them."""
    from backprop import io

    runtime, _ = _setup_runtime(args)
    _check_model_path(args.model)
    if not os.path.exists(args.model):
        raise CLIError(f"no checkpoint at {args.model!r}; give the model.npz that train wrote "
                       "(train --out FOLDER writes FOLDER/model.npz)")
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
    fractions = spec["split"]
    if split == "test" and fractions[2] == 0:
        raise CLIError(f"the model was trained without a test part (--split "
                       f"{','.join(f'{f:g}' for f in fractions)}); use --split all")
    encoding = args.encoding or (spec.get("encoding", "utf-8") if same else "utf-8")
    ds = _load(name, target=extra["target"], task=extra["task"], seed=spec["seed"],
               encoding=encoding, features=extra["features"],
               need_target=need_target or split == "test",
               origin="--data" if args.data else f"recorded in {args.model}")
    if split == "test":
        ds = dict(ds)
        ds["X"], ds["y"] = _split(ds, fractions, spec["seed"])[2]
    X = ds["X"]
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
    loss = extra.get("options", {}).get("loss", "cross_entropy")  # older runs: cross_entropy
    results = _test_metrics(ckpt.model, X, y, classify, yscale, batch_size=args.batch_size,
                            loss=loss)
    if args.json:
        print(json.dumps({"split": split, "rows": len(X), **results}))
    else:
        print(f"{len(X)} rows ({split}) on {runtime}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


def explain_main(argv) -> int:
    return _run(_explain, argv)


def _explain(argv) -> int:
    from backprop.explain import MAX_BATCH, explain

    p = argparse.ArgumentParser(
        prog="backprop explain",
        description="Backpropagation on one small batch: the equations with the numbers, "
                    "layer by layer, each gradient checked against central differences "
                    "(exit status 1 if one disagrees), after the computational graph. Of a "
                    "saved model (its data's test rows by default), or of a fresh one built "
                    "from --hidden, --activation and --loss on --data.")
    p.add_argument("model", nargs="?", help="a model.npz written by train (default: a fresh "
                   "model)")
    p.add_argument("--data", help="data set or CSV file (default: the model's, else digits)")
    p.add_argument("--target", help="target column of a CSV file (a fresh model)")
    p.add_argument("--encoding", type=_encoding, default=None,
                   help="text encoding of a CSV file (default utf-8)")
    p.add_argument("--split", choices=("test", "all"), help="a saved model: rows of its test "
                   "part (default on its training data) or of all rows")
    p.add_argument("--rows", type=_integer(1), default=4,
                   help=f"rows of the batch, the first of the data (default 4, at most "
                        f"{MAX_BATCH})")
    p.add_argument("--hidden", type=_hidden, default=None,
                   help="a fresh model: hidden layer widths (default 8)")
    p.add_argument("--activation", type=_activation, default=None,
                   help="a fresh model: hidden activation (default tanh)")
    p.add_argument("--loss", default=None, choices=tuple(LOSSES),
                   help="a fresh model: its loss (default cross_entropy for classification, "
                        "mse for regression; a saved model uses its own)")
    p.add_argument("--seed", type=_integer(0), default=0, help="a fresh model's weights")
    p.add_argument("--max-cols", type=_integer(1), default=6,
                   help="columns of each matrix shown (default 6)")
    p.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT to FILE")
    p.add_argument("--no-graph", action="store_true", help="leave the graph out")
    _add_common_options(p)
    args = p.parse_args(argv)
    if args.rows > MAX_BATCH:
        p.error(f"argument --rows: at most {MAX_BATCH} rows (explain prints every step of "
                "every row's gradient)")
    if args.dot:
        _check_out_file(args.dot)
    if args.model is not None:
        fresh = [f"--{k}" for k in ("hidden", "activation", "loss", "target")
                 if getattr(args, k) is not None]
        if fresh:
            verb = "describes" if len(fresh) == 1 else "describe"
            p.error(f"{', '.join(fresh)} {verb} a fresh model; a saved model has its own")
        args.batch_size = MAX_BATCH
        ckpt, ds, X, _, _ = _checkpoint_data(args, need_target=True)
        model, extra = ckpt.model, ckpt.extra
        loss = extra.get("options", {}).get("loss", DEFAULT_LOSS[extra["task"]])
        y = ds["y"]
        if extra["task"] == "classification":
            if extra["classes"] != ds["classes"]:
                y = _remap_labels(y, ds["classes"], extra["classes"])
        else:
            y = (y - extra["y_mean"]) / extra["y_std"]
    else:
        model, X, y, loss = _fresh_model_batch(args)
    rows = min(args.rows, len(X))
    if not args.no_graph:
        print(model.graph(loss=loss))
        print()
    text = explain(model, X[:rows], y[:rows], loss, max_cols=args.max_cols)
    print(text)
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as f:
            f.write(model.graph(loss=loss, format="dot"))
        print(f"wrote the graph to {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)",
              file=sys.stderr)
    if not text.ok:
        print("error: a gradient disagrees with central differences (✗ or ? above)",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _fresh_model_batch(args):
    """``(model, X, y, loss)`` for ``explain`` without a checkpoint: a new MLP on the data,
    standardised as ``train`` standardises it."""
    from backprop.backend import get_dtype
    from backprop.data import Standardizer

    _setup_runtime(args)
    name = args.data or "digits"
    task = LOSSES[args.loss] if args.loss else "auto"
    if name in BUILTIN and args.target is not None:
        raise CLIError(f"--target applies to CSV files only; {name} has its own target")
    ds = _load(name, target=args.target, task=task, seed=args.seed,
               encoding=args.encoding or "utf-8")
    loss = args.loss or DEFAULT_LOSS[ds["task"]]
    if LOSSES[loss] != ds["task"]:
        raise CLIError(f"--loss {loss} is a {LOSSES[loss]} loss, but {name} is a "
                       f"{ds['task']} data set")
    X = Standardizer().fit(ds["X"]).transform(ds["X"])
    y = ds["y"]
    if ds["task"] == "classification":
        n_out = len(ds["classes"])
    else:
        y = Standardizer().fit(y).transform(y)
        n_out = y.shape[1]
    hidden = [8] if args.hidden is None else args.hidden
    model = _build_model(X.shape[1], hidden, n_out, args.activation or "tanh", 0.0, args.seed,
                         str(get_dtype()), output=OUTPUT.get(loss))
    return model, X, y, loss


def _remap_labels(y, classes_now, classes_trained):
    lookup = {c: i for i, c in enumerate(classes_trained)}
    unknown = sorted(set(classes_now) - set(lookup))
    if unknown:
        raise CLIError(f"the data has classes {_preview(unknown)} that the model was not "
                       f"trained on (it knows {_preview(classes_trained)}); drop those rows")
    return np.array([lookup[classes_now[k]] for k in y], dtype=np.int64)


def predict_main(argv) -> int:
    return _run(_predict, argv)


def _check_out_file(path: str) -> None:
    """``predict --out``: a file that can be written, checked before any work."""
    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a directory; give a file name such as "
                       f"{os.path.join(path, 'predictions.csv')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"--out {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"--out {path}: the folder {folder} is not writable; give another path")


def _predict(argv) -> int:
    import csv

    from backprop import training
    from backprop.backend import to_numpy

    p = _checkpoint_parser("backprop predict", "Predictions of a saved model, as CSV.")
    p.add_argument("--out", help="CSV file to write (default: stdout)")
    p.add_argument("--proba", action="store_true", help="add class probabilities")
    args = p.parse_args(argv)
    if args.out:
        _check_out_file(args.out)
    ckpt, ds, X, split, _ = _checkpoint_data(args, need_target=False)
    extra = ckpt.extra
    if args.proba and extra["task"] != "classification":
        raise CLIError(f"--proba needs a classification model; {args.model} is a "
                       f"{extra['task']} model: leave --proba out")
    out = to_numpy(training.predict(ckpt.model, X, batch_size=args.batch_size)).astype(np.float64)
    if extra["task"] == "classification":
        classes = extra["classes"]
        header = ["prediction"] + ([f"p_{c}" for c in classes] if args.proba else [])
        # softmax of the outputs: of logits (cross_entropy), or of log-probabilities (nll's
        # log-softmax output), where it is exp(out) itself (a row's log-softmax is the row
        # shifted by a constant, which softmax ignores)
        # shifted by a constant, which softmax ignores); a softmax output is already one
        if extra.get("options", {}).get("output") == "softmax":
            proba = out / out.sum(axis=1, keepdims=True)
        else:
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
# export
def export_main(argv) -> int:
    return _run(_export, argv)


def _opset(text: str) -> int:
    from backprop.onnx_export import MAX_OPSET, MIN_OPSET

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset from {MIN_OPSET} to "
                                         f"{MAX_OPSET}, got {text!r}")
    return value


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected one sample's shape as whole numbers >= 1 "
                                         f"such as 3,4, got {text!r}")
    return dims


def _check_export_file(path: str, model: str) -> None:
    """``export``'s output: a file name in a writable folder, not the checkpoint itself."""
    if os.path.isdir(path):
        raise CLIError(f"{path} is a directory; give the ONNX file to write, such as "
                       f"{os.path.join(path, 'model.onnx')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"{path}: the folder {folder} is not writable; give another path")
    if os.path.exists(path) and os.path.samefile(path, model):
        raise CLIError(f"{path} is the checkpoint itself, which export would overwrite; give "
                       "another file name, such as model.onnx")


def _network_output(model) -> str:
    """The activation kernel that the model's last layer applies ("identity" if none)."""
    from backprop.activations import Activation
    from backprop.layers import Dense, Dropout
    from backprop.model import Sequential

    layers = list(model.layers) if isinstance(model, Sequential) else [model]
    while layers:
        last = layers.pop()
        if isinstance(last, Sequential):
            layers.extend(last.layers)
        elif isinstance(last, Dense):
            return last.activation.kernel
        elif isinstance(last, Activation):
            return last.kernel
        elif not isinstance(last, Dropout):
            return "other"
    return "identity"


OUTPUT_MEANING = {"identity": "logits", "log_softmax": "log-probabilities",
                  "softmax": "probabilities"}


def _export(argv) -> int:
    from backprop import io, onnx_export

    p = argparse.ArgumentParser(
        prog="backprop export",
        description="Write a saved model as an ONNX file, the inference graph of predict, "
                    "checked by onnx.checker (needs pip install 'backprop[onnx]'). For a model "
                    "written by train the graph takes the raw feature columns (the "
                    "standardisation of train is its first step) and gives what predict "
                    "computes before formatting: a classifier's network outputs (logits, "
                    "or log-probabilities / probabilities for an nll / "
                    "categorical_crossentropy model; --proba: probabilities), a regression "
                    "model's predictions in the target's units. The class names, feature "
                    "columns and output kind are in the file's metadata_props.")
    p.add_argument("model", help="a model.npz written by train (or backprop.io.save)")
    p.add_argument("output", help="the ONNX file to write, e.g. model.onnx (replaced "
                   "atomically if it exists)")
    p.add_argument("--opset", type=_opset, default=onnx_export.DEFAULT_OPSET,
                   help=f"ONNX opset, {onnx_export.MIN_OPSET} to {onnx_export.MAX_OPSET} "
                        f"(default {onnx_export.DEFAULT_OPSET})")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="precision of the graph (default: the model's)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--raw", action="store_true",
                      help="the network alone: standardised inputs, the outputs as the "
                           "network computes them (what model.export_onnx writes)")
    what.add_argument("--proba", action="store_true",
                      help="a classifier's output: class probabilities (a softmax of the "
                           "logits)")
    p.add_argument("--input-shape", type=_input_shape, default=None,
                   help="one sample's shape, e.g. 3,4, for a model that does not declare its "
                        "input features (one that starts with Flatten)")
    p.add_argument("--input-name", default="input", help="the graph's input (default input)")
    p.add_argument("--output-name", default="output",
                   help="the graph's output (default output)")
    _add_common_options(p, runtime=False)
    args = p.parse_args(argv)
    if not args.input_name or not args.output_name or args.input_name == args.output_name:
        p.error("--input-name and --output-name must be two different non-empty names")
    _check_model_path(args.model)
    if not os.path.exists(args.model):
        raise CLIError(f"no checkpoint at {args.model!r}; give the model.npz that train wrote "
                       "(train --out FOLDER writes FOLDER/model.npz)")
    _check_export_file(args.output, args.model)
    try:
        opsets = onnx_export.supported_opsets()
    except ImportError as exc:
        raise CLIError(_one_line(exc)) from None
    if args.opset not in opsets:
        import onnx

        raise CLIError(f"--opset {args.opset} is newer than the installed onnx "
                       f"{onnx.__version__} knows (up to {opsets[-1]}): upgrade onnx (pip "
                       f"install -U onnx) or give --opset {opsets[-1]} or lower")
    ckpt = io.load_checkpoint(args.model, device="cpu")  # export needs no GPU and no kernels
    model, extra = ckpt.model, ckpt.extra
    from_train = all(k in extra for k in ("features", "mean", "std", "task"))
    classify = extra.get("task") == "classification" if from_train else None
    produced = _network_output(model)
    if args.proba and classify is False:
        raise CLIError(f"--proba needs a classification model; {args.model} is a regression "
                       "model: leave --proba out")
    if args.proba and produced not in OUTPUT_MEANING:
        raise CLIError(f"--proba needs a model whose outputs are logits, log-probabilities or "
                       f"probabilities; the last layer of {args.model} applies {produced}: "
                       "leave --proba out")
    if args.input_shape is None and model.in_features is None:
        raise CLIError(f"the model in {args.model} does not declare its input features (it "
                       "starts with a layer such as Flatten that takes any shape): give one "
                       "sample's shape with --input-shape, e.g. --input-shape 3,4")
    kwargs, meta = {}, {"backprop.checkpoint": os.path.basename(args.model)}
    if args.input_shape is not None:
        kwargs["input_shape"] = args.input_shape
    if from_train and not args.raw:
        kwargs["input_standardization"] = (extra["mean"], extra["std"])
        inputs = (f"{len(extra['features'])} raw feature columns "
                  f"{_preview(list(extra['features']))}, standardised in the graph")
    else:
        inputs = "standardised features, as in training" if from_train else "the model's inputs"
    if from_train and not classify:
        kind = "standardised predictions" if args.raw else "predictions"
        if not args.raw:
            kwargs["output_standardization"] = (extra["y_mean"], extra["y_std"])
        output = f"{kind} of {extra.get('target')!r}" + ("" if args.raw else " in its units")
    elif args.proba:
        kwargs["append_softmax"] = produced != "softmax"
        kind = output = "probabilities"
    else:
        kind = OUTPUT_MEANING.get(produced, "outputs") if from_train else "outputs"
        output = f"the network's {kind}"
    if from_train:
        meta.update({"backprop.task": extra["task"],
                     "backprop.features": json.dumps(list(extra["features"])),
                     "backprop.target": json.dumps(extra.get("target")),
                     "backprop.input": "standardised features" if args.raw else "raw features",
                     "backprop.output": kind})
        if classify:
            meta["backprop.classes"] = json.dumps(list(extra["classes"]))
            output += f" of the classes {_preview(list(extra['classes']))}"
    try:
        onnx_export.export_onnx(model, args.output, args.opset, dtype=args.dtype,
                                input_name=args.input_name, output_name=args.output_name,
                                metadata=meta, **kwargs)
    except onnx_export.ONNXExportError as exc:
        raise CLIError(_one_line(exc)) from None
    params = model.parameters()
    dtype = args.dtype or (str(params[0].dtype) if params else "the default dtype")
    shape = args.input_shape or (model.in_features,)
    print(f"wrote {args.output} (ONNX opset {args.opset}, {dtype}): input "
          f"{args.input_name!r} of shape (N, {', '.join(map(str, shape))}): {inputs}; output "
          f"{args.output_name!r}: {output}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# info
def info_main(argv) -> int:
    return _run(_info, argv)


def _info(argv) -> int:
    """Print what runs where. Exit 0, or 1 when the configuration is unusable (a bad or
    unavailable BACKPROP_DEVICE / BACKPROP_DTYPE / BACKPROP_KERNELS): each problem is then
    also an ``error:`` line on stderr, and everything else is still reported."""
    p = argparse.ArgumentParser(prog="backprop info",
                                description="What runs where, and why. Exit code 1 when "
                                            "the configuration (BACKPROP_*) is unusable.")
    p.add_argument("--json", action="store_true", help="print as JSON")
    _add_common_options(p, runtime=False)
    args = p.parse_args(argv)
    info = _runtime_report()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key:<{width}}")
                for k, v in value.items():
                    print(f"  {k:<{width - 2}}  {v}")
            elif isinstance(value, list) and key == "problems":
                print(f"{key:<{width}}  {len(value) or '-'}")
                for problem in value:
                    print(f"  {problem}")
            else:
                shown = value if value not in ("", [], None) else \
                    "? (see problems)" if value is None and info["problems"] else "-"
                print(f"{key:<{width}}  {shown}")
    for problem in info["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_FAILURE if info["problems"] else EXIT_OK


def _runtime_report() -> dict:
    """The keys of ``backprop.device_info()`` plus ``python``, ``kernel_backends`` and
    ``problems``, each piece probed on its own so that one bad setting hides nothing else
    (an unusable piece is None and its problem is listed)."""
    import backprop as bp
    from backprop import backend
    from backprop import kernels as K

    problems: list[str] = []
    try:
        status = backend.cuda_status()
    except Exception as exc:  # cuda_status catches everything itself; a broken install
        status = {"available": False, "cupy_version": None, "names": [],
                  "reason": f"the CUDA probe failed: {type(exc).__name__}: {_one_line(exc)}"}
    requested = os.environ.get("BACKPROP_DEVICE", "auto")
    device = fallback = None
    try:
        device = bp.get_device()
    except Exception as exc:
        problems.append(_device_problem(requested, exc, "BACKPROP_DEVICE"))
    else:
        auto = isinstance(backend.parse_device(requested), str)
        fallback = (f"auto chose the CPU: {status['reason']}"
                    if auto and device.kind == "cpu" else "")
    dtype = None
    try:
        dtype = str(backend.get_dtype())
    except ValueError as exc:
        problems.append(f"{exc}: fix or unset BACKPROP_DTYPE")
    choice = kernels = None
    try:
        choice = K.get_choice()
    except K.KernelBackendError as exc:
        problems.append(f"{exc}: fix or unset BACKPROP_KERNELS")
    if device is not None and choice is not None:
        try:
            kernels = K.backend_name(device.kind)
        except K.KernelBackendError as exc:
            problems.append(_one_line(exc))
    backends = {}
    for name in K.BACKENDS:
        try:
            backends[name] = K.unavailable_reason(name) or "available"
        except Exception as exc:
            backends[name] = f"unknown ({type(exc).__name__}: {_one_line(exc)})"
    return {
        "backprop": bp.__version__, "python": sys.version.split()[0],
        "device": None if device is None else str(device), "dtype": dtype,
        "requested": requested, "fallback_reason": fallback, "kernels": kernels,
        "kernels_requested": choice, "cupy": status["cupy_version"] or "not installed",
        "cuda_available": status["available"], "cuda_reason": status["reason"],
        "cuda_devices": status["names"], "numba": backend._version_of("numba"),
        "numba_cuda": backend._version_of("numba_cuda"), "numpy": np.__version__,
        "kernel_backends": backends, "gemm": _gemm_report(problems),
        "threads": _threads_report(problems),
        "mixed_precision": _mixed_precision_report(problems), "problems": problems,
    }


def _gemm_report(problems) -> str | None:
    """What runs the Dense layers' matrix products (backprop.gemm, BACKPROP_GEMM)."""
    from backprop import gemm

    try:
        name = gemm.backend()
    except (ValueError, RuntimeError) as exc:
        problems.append(f"{_one_line(exc)}: fix or unset BACKPROP_GEMM")
        return None
    if name == "mkl":
        return (f"mkl (float32/float64 products of at least {gemm.MIN_MACS} "
                "multiply-adds; smaller ones on NumPy's BLAS)")
    if name == "numba":
        return (f"numba (compiled tiles for float32/float64 products of {gemm.MIN_MACS} to "
                f"{gemm.NUMBA_FORWARD_MAX_MACS} multiply-adds forward, "
                f"{gemm.NUMBA_BACKWARD_MIN_MACS} to {gemm.NUMBA_MAX_MACS} backward, layers "
                f"of at least {gemm.NUMBA_MIN_OUTPUTS} outputs; the rest on NumPy's BLAS)")
    return "numpy (NumPy's BLAS)"


def _threads_report(problems) -> str | None:
    """How a training loop's thread count is chosen (backprop.thread_governor)."""
    from backprop import thread_governor

    try:
        mode = thread_governor.mode()
    except ValueError as exc:
        problems.append(f"{_one_line(exc)}: fix or unset BACKPROP_THREADS")
        return None
    if mode == "adaptive":
        return ("adaptive (each training thread times its steps and runs on fewer threads "
                "while that is faster, e.g. beside other busy programs)")
    return "fixed (every parallel region on all of Numba's threads)"


def _mixed_precision_report(problems) -> dict:
    """What bf16-mixed and fp16-mixed do on this CPU and GPU (backprop.precision)."""
    try:
        from backprop import precision

        return {f"{name} on {where}": text for name, row in precision.describe().items()
                for where, text in row.items()}
    except Exception as exc:  # a broken MKL or CuPy must not hide the rest of the report
        problems.append(f"the mixed-precision probe failed: {type(exc).__name__}: "
                        f"{_one_line(exc)}")
        return {}
