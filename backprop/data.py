"""Data: toy generators, the UCI digits, CSV files, standardisation, splits, array
conversion and validation.

Everything here runs on the host with NumPy and returns NumPy arrays: features as the
default float dtype (``bp.get_dtype()``, float32 unless changed), class labels as int64,
regression targets as float ``(N, targets)``. ``fit`` moves the data to the model's device
once. Every generator takes a ``seed`` and is a pure function of its arguments.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from backprop.backend import get_array_module, get_dtype

__all__ = [
    "xor", "two_moons", "spirals", "regression", "load_digits", "load_csv", "CSVData",
    "Standardizer", "standardize", "train_val_test_split", "validate", "DataError",
    "csv_columns", "as_array", "feature_names", "check_feature_names", "all_finite",
    "PRODUCT_CHECK_MIN_VALUES",
]


class DataError(ValueError):
    """Input data that cannot be trained on; the message says what is wrong and how to fix it."""


def _float(dtype):
    return np.dtype(get_dtype() if dtype is None else dtype)


# ---------------------------------------------------------------------------------------
# Generators
def xor(dtype=None):
    """The four XOR points ``{0,1}²`` and their labels ``x₁ XOR x₂``: ``X (4, 2)``, ``y (4,)``."""
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=_float(dtype))
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    return X, y


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0, dtype=None):
    """Two interleaving half circles in 2-D, ``n`` points in total (labels 0 and 1).

    Moon 0 is ``(cos t, sin t)``, moon 1 is ``(1 - cos t, 0.5 - sin t)`` for ``t ∈ [0, π]``,
    plus Gaussian noise of standard deviation ``noise``.
    """
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t0 = np.linspace(0.0, math.pi, n0)
    t1 = np.linspace(0.0, math.pi, n - n0)
    X = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], axis=1),
                        np.stack([1.0 - np.cos(t1), 0.5 - np.sin(t1)], axis=1)])
    X += rng.normal(0.0, noise, size=X.shape)
    y = np.concatenate([np.zeros(n0, np.int64), np.ones(n - n0, np.int64)])
    order = rng.permutation(n)
    return X[order].astype(_float(dtype)), y[order]


def spirals(n: int = 300, classes: int = 3, noise: float = 0.2, seed: int = 0, dtype=None):
    """``classes`` interleaved spiral arms in 2-D, ``n`` points in total (CS231n's data set).

    Arm ``k`` has radius ``r ∈ [0, 1]`` and angle ``θ = 4r + 2πk/classes + noise·N(0, 1)``,
    so the classes are not linearly separable.
    """
    if classes < 2:
        raise ValueError(f"spirals needs classes >= 2, got {classes}")
    rng = np.random.default_rng(seed)
    counts = [n // classes + (1 if k < n % classes else 0) for k in range(classes)]
    parts, labels = [], []
    for k, m in enumerate(counts):
        r = np.linspace(0.0, 1.0, m)
        theta = 4.0 * r + 2.0 * math.pi * k / classes + rng.normal(0.0, noise, m)
        parts.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        labels.append(np.full(m, k, np.int64))
    X, y = np.concatenate(parts), np.concatenate(labels)
    order = rng.permutation(n)
    return X[order].astype(_float(dtype)), y[order]


def regression(n: int = 200, features: int = 4, noise: float = 0.1, seed: int = 0,
               targets: int = 1, dtype=None):
    """A smooth nonlinear regression problem: ``X ~ N(0, 1)^(n×features)`` and

    ``y = X w + 0.5 sin(2 x₁) + noise·N(0, 1)`` with fixed random ``w`` (features × targets).
    Returns ``X (n, features)`` and ``y (n, targets)``.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features))
    w = rng.normal(size=(features, targets)) / math.sqrt(features)
    y = X @ w + 0.5 * np.sin(2.0 * X[:, :1]) + noise * rng.normal(size=(n, targets))
    return X.astype(_float(dtype)), y.astype(_float(dtype))


# ---------------------------------------------------------------------------------------
# Files
def load_digits(dtype=None):
    """The UCI optical digits, 8×8 version: ``X (1797, 64)`` pixel counts in 0..16 (row-major
    images) and ``y (1797,)`` labels 0..9. Shipped with backprop (CC BY 4.0; see
    ``backprop/datasets/LICENSE.digits`` for the citation)."""
    with resources.files("backprop.datasets").joinpath("digits.csv.gz").open("rb") as raw:
        with gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.float64)
    return table[:, :-1].astype(_float(dtype)), table[:, -1].astype(np.int64)


@dataclass
class CSVData:
    """A table read by :func:`load_csv`: features ``X``, targets ``y`` (None without a target
    column) and what is needed to map predictions back to the file's terms."""

    X: np.ndarray
    y: np.ndarray | None
    feature_names: list[str]
    target: str | None
    task: str | None  # "classification" | "regression" | None (no target)
    classes: list[str] | None = field(default=None)  # original label of class index k


_MISSING = {"", "na", "nan", "null", "none", "?"}


def _parse_number(text: str, path, row: int, column: str) -> float:
    if text.strip().lower() in _MISSING:
        raise DataError(f"{path}: row {row}, column {column!r}: missing value {text!r}; fill or "
                        "drop missing values before training")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: row {row}, column {column!r}: {text!r} is not a number; "
                        "features must be numeric (one-hot encode categorical columns "
                        "first)") from None
    if not math.isfinite(value):  # float() accepts "inf" and overflows "1e999" to inf
        raise DataError(f"{path}: row {row}, column {column!r}: {text!r} is not a finite number; "
                        "replace or drop infinite values before training")
    return value


def _read_text(path, encoding: str) -> str:
    """The whole file decoded, without a leading byte order mark; a decoding error becomes a
    DataError that names the byte, its offset and line, and a likely encoding."""
    with open(path, "rb") as f:
        raw = f.read()
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NULs are text
    if not wide and b"\x00" in raw[:4096] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: holds NUL bytes, so it is a binary file, not CSV text; give a "
                        "CSV file with a header row")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) is not "
            f"valid {_encoding_name(encoding)}; {_guess_encoding(raw)}: re-save the file as "
            "UTF-8, or give its encoding (load_csv(..., encoding=...), or --encoding on the "
            "command line)") from None
    return text[1:] if text.startswith("\ufeff") else text


def _encoding_name(encoding: str) -> str:
    name = codecs.lookup(encoding).name
    return "UTF-8" if name == "utf-8" else name


def _guess_encoding(raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "the file starts with a UTF-16 byte order mark, so it is UTF-16 text"
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return "the file is in another encoding"
    return ("the file is probably in Windows-1252 (cp1252) or Latin-1, e.g. saved by Excel "
            "(encoding='cp1252')")


def _read_rows(path, delimiter: str, encoding: str) -> list[list[str]]:
    text = _read_text(path, encoding)
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as CSV ({exc}); check the delimiter "
                        f"({delimiter!r}) and quoting") from None


def _header(path, rows: list[list[str]]) -> list[str]:
    if not rows:
        raise DataError(f"{path}: the file is empty; expected a header row and data rows")
    header = [h.strip() for h in rows[0]]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        name = repeated[0]
        raise DataError(f"{path}: column {name!r} appears {header.count(name)} times in the "
                        "header; give every column a distinct name")
    return header


def csv_columns(path, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    """The column names in the header row of a CSV file (stripped, as :func:`load_csv` uses
    them). Raises :class:`DataError` for an empty file, repeated names or undecodable text."""
    text = _read_text(path, encoding)
    try:
        first = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as CSV ({exc}); check the delimiter "
                        f"({delimiter!r}) and quoting") from None
    return _header(path, [first] if first else [])


def load_csv(path, target: str | int | None = None, features=None, task: str = "auto",
             delimiter: str = ",", dtype=None, encoding: str = "utf-8") -> CSVData:
    """Read a CSV file with a header row.

    ``target``: the name (or index) of the target column, or None for a file of features
    only (prediction). ``features``: column names to use, in this order (default: every
    other column). ``task``: ``"classification"``, ``"regression"`` or ``"auto"``
    (classification when the target is non-numeric or integer-valued with at most 50
    distinct values). Classification targets are mapped to class indices ``0..K-1``;
    ``classes`` keeps the original labels (numeric labels that already are ``0..K-1`` keep
    their meaning). ``encoding``: of the file's text (a UTF-8 byte order mark is skipped).

    Raises :class:`DataError`, naming the file and, where there is one, the row and column,
    for: undecodable text, an empty file, no data rows, rows of the wrong length, repeated
    column names, unknown columns, no feature column, missing, non-numeric or non-finite
    feature values (also values that overflow ``dtype``), and unusable targets.
    """
    if task not in ("auto", "classification", "regression"):
        raise ValueError(f"task={task!r}: expected 'auto', 'classification' or 'regression'")
    rows = _read_rows(path, delimiter, encoding)
    header, body = _header(path, rows), [r for r in rows[1:] if r]
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: row {i} has {len(r)} fields but the header has "
                            f"{len(header)}; check the delimiter ({delimiter!r}) and quoting")
    if isinstance(target, int):
        target = header[target]
    if target is not None and target not in header:
        raise DataError(f"{path}: no column {target!r}; columns are {header}")
    if features is None:
        features = [h for h in header if h != target]
    if not features:
        raise DataError(f"{path}: no feature columns besides the target {target!r}; a model "
                        "needs at least one input column")
    missing = [c for c in features if c not in header]
    if missing:
        raise DataError(f"{path}: feature columns {missing} not found; columns are {header}")
    cols = [header.index(c) for c in features]
    X64 = np.array([[_parse_number(r[j], path, i, header[j]) for j in cols]
                    for i, r in enumerate(body, start=2)], dtype=np.float64)
    with np.errstate(over="ignore"):  # reported below, with the cell
        X = X64.astype(_float(dtype))
    if not np.isfinite(X).all():  # finite in float64, too large for float32
        i, j = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{path}: row {i + 2}, column {features[j]!r}: {X64[i, j]!r} is too "
                        f"large for {X.dtype}; rescale the column or use float64")
    if target is None:
        return CSVData(X, None, list(features), None, None)
    raw = [r[header.index(target)].strip() for r in body]
    if "" in raw:
        raise DataError(f"{path}: row {raw.index('') + 2}: the target column {target!r} is "
                        "empty; fill or drop rows without a target")
    y, task, classes = _encode_target(raw, task, target, dtype, path)
    return CSVData(X, y, list(features), target, task, classes)


def _encode_target(raw: list[str], task: str, name: str, dtype, path):
    try:
        values = np.array([float(v) for v in raw])
    except ValueError:
        values, numeric = None, False
    else:  # all numbers: NaN or inf is a bad value, not a class label
        numeric = True
        if not np.isfinite(values).all():
            row = int(np.argmin(np.isfinite(values)))
            raise DataError(f"{path}: row {row + 2}: the target column {name!r} holds "
                            f"{raw[row]!r}, which is not a finite number; fill or drop rows "
                            "without a usable target")
    if task == "auto":
        integral = numeric and bool(np.all(values == np.round(values)))
        task = "classification" if not numeric or (integral and len(set(raw)) <= 50) \
            else "regression"
    if task == "regression":
        if not numeric:
            row, bad = next((i, v) for i, v in enumerate(raw, start=2) if not _is_number(v))
            raise DataError(f"{path}: row {row}: the target column {name!r} holds {bad!r}, "
                            "which is not a finite number: regression needs numeric, finite "
                            "targets (or use classification)")
        return values.astype(_float(dtype)).reshape(-1, 1), task, None
    if numeric and np.all(values == np.round(values)):
        ints = values.astype(np.int64)
        if ints.min() >= 0 and set(np.unique(ints)) == set(range(ints.max() + 1)):
            return ints, task, [str(k) for k in range(ints.max() + 1)]
        labels = sorted(set(ints.tolist()))
        lookup = {v: k for k, v in enumerate(labels)}
        return np.array([lookup[v] for v in ints.tolist()], np.int64), task, \
            [str(v) for v in labels]
    labels = sorted(set(raw))
    lookup = {v: k for k, v in enumerate(labels)}
    return np.array([lookup[v] for v in raw], np.int64), task, labels


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# Preprocessing
class Standardizer:
    """Per-feature ``(x - μ) / σ`` with ``μ``, ``σ`` fitted on the training data only.

    Constant features (``σ = 0``) get ``σ = 1``, so they become 0 instead of NaN.
    """

    def __init__(self, mean=None, std=None):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    def fit(self, X) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        return self

    def transform(self, X):
        if self.mean is None:
            raise RuntimeError("Standardizer.transform before fit: call fit(X_train) first")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise DataError(f"expected features of shape (N, {self.mean.shape[0]}) as fitted, "
                            f"got {X.shape}")
        dtype = X.dtype if X.dtype.kind == "f" else _float(None)
        return ((X - self.mean) / self.std).astype(dtype)

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, X):
        X = np.asarray(X)
        return (X * self.std + self.mean).astype(X.dtype)


def standardize(train, *others):
    """Standardise ``train`` with its own mean and std and apply the same to ``others``:
    ``Xtr, Xva, Xte = standardize(Xtr, Xva, Xte)`` (use :class:`Standardizer` to keep μ, σ)."""
    scaler = Standardizer().fit(train)
    out = tuple(scaler.transform(a) for a in (train, *others))
    return out if others else out[0]


def train_val_test_split(X, y, fractions=(0.8, 0.1, 0.1), seed: int = 0, stratify: bool = False):
    """Split ``(X, y)`` into ``len(fractions)`` shuffled parts: ``[(X₁, y₁), (X₂, y₂), …]``.

    ``fractions`` (two or three positive numbers summing to 1) give each part's share of
    the rows, rounded so that every row lands in exactly one part. ``stratify=True`` splits
    each class separately, so every part keeps the class proportions of ``y``.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) < 2 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions={fractions}: expected two or three positive numbers "
                         "summing to 1, e.g. (0.7, 0.15, 0.15)")
    X, y = np.asarray(X), np.asarray(y)
    if len(X) != len(y):
        raise DataError(f"X has {len(X)} rows but y has {len(y)}; they must match")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for idx in groups:
        idx = rng.permutation(idx)
        bounds = np.round(np.cumsum([0.0] + fractions) * len(idx)).astype(int)
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    out = []
    for chunks in parts:
        idx = rng.permutation(np.concatenate(chunks))
        out.append((X[idx], y[idx]))
    return out


# ---------------------------------------------------------------------------------------
# Any array in: what fit, evaluate, predict and model(x) accept
_ACCEPTED = ("give a NumPy or CuPy array, a tensor with __dlpack__ (PyTorch, JAX, CuPy...), "
             "an object with __array__, a pandas DataFrame or Series, or nested lists of "
             "numbers")


def _type_name(obj) -> str:
    """``a dict``, ``an object``, ``a torch.Tensor``: the type of ``obj`` with its article."""
    module = type(obj).__module__
    name = type(obj).__qualname__ if module == "builtins" else \
        f"{module}.{type(obj).__qualname__}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_pandas(obj) -> bool:
    return type(obj).__module__.startswith("pandas") and hasattr(obj, "to_numpy")


def as_array(obj, *, name: str = "data", what: str = "X"):
    """``obj`` as a NumPy or CuPy array, without a copy where its type allows.

    Tried in this order: a NumPy or CuPy array is returned as is; a pandas ``DataFrame``
    or ``Series`` (numeric columns only; nullable columns with missing values become NaN,
    which validation then reports); an object with ``__dlpack__`` (PyTorch, JAX, CuPy...:
    :func:`backprop.backend.from_dlpack`, memory shared, memory on the host gives a NumPy
    array and memory on a CUDA device a CuPy array; a PyTorch tensor that requires grad is
    detached); an object with ``__cuda_array_interface__`` (CuPy view); an object with
    ``__array__`` (``np.asarray``); nested lists or tuples of numbers and Python numbers
    (``np.asarray``: ints give int64, floats float64); a buffer such as a ``memoryview``
    (shared). dtype and shape are left as they are: :func:`validate` and ``fit`` check and
    convert them.

    Raises :class:`DataError` (its message starts with ``name``, ``what`` names the
    argument) for anything else (a str, dict, set, bytes, None...), naming the type and
    what is accepted; for a DataFrame column that is not numeric, naming it; for ragged
    nested lists, naming the first row of another length; and for a tensor that cannot be
    imported (on PyTorch's ``meta`` device, a CUDA tensor without a usable GPU, a dtype
    NumPy lacks such as bfloat16)."""
    return _convert(obj, name, what)[0]


def feature_names(obj) -> list[str] | None:
    """The column names of a pandas DataFrame when every one is a str (as scikit-learn's
    ``feature_names_in_``), else None (arrays, tensors, a DataFrame with integer or mixed
    column names)."""
    if not (_is_pandas(obj) and hasattr(obj, "columns") and getattr(obj, "ndim", 0) == 2):
        return None
    names = list(obj.columns)
    return names if names and all(isinstance(n, str) for n in names) else None


def check_feature_names(expected, given, name: str = "data") -> None:
    """Raise :class:`DataError` unless the feature names ``given`` (a DataFrame's columns)
    are ``expected`` (the model's ``feature_names_in_``) in the same order; nothing is
    checked when either is None (an array has no names; a model fitted on arrays knows
    none). The message lists the missing and unexpected names, or says that the order
    differs."""
    if expected is None or given is None or list(expected) == list(given):
        return
    expected, given = list(expected), list(given)
    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    if missing or unexpected:
        parts = [f"missing {_preview(missing)}" if missing else "",
                 f"unexpected {_preview(unexpected)}" if unexpected else ""]
        problem = ", ".join(p for p in parts if p)
    elif len(given) == len(expected):
        problem = "the same names in another order"
    else:
        problem = "repeated names"
    raise DataError(f"{name}: the DataFrame's columns do not match the feature names the "
                    f"model was fitted with ({problem}); the model expects "
                    f"{_preview(expected)}, in this order: select them with "
                    "df[model.feature_names_in_]")


def _preview(names: list, n: int = 8) -> str:
    return repr(names) if len(names) <= n else repr(names[:n])[:-1] + f", ... ({len(names)})]"


def _convert(obj, name: str, what: str):
    """``(array, feature names or None)``: see :func:`as_array` and :func:`feature_names`."""
    if isinstance(obj, np.ndarray):
        return (obj if type(obj) is np.ndarray else np.asarray(obj)), None
    if type(obj).__module__.startswith("cupy") and hasattr(obj, "__cuda_array_interface__"):
        return obj, None
    if _is_pandas(obj):
        return _from_pandas(obj, name, what), feature_names(obj)
    if obj is None or isinstance(obj, (str, bytes, bytearray, dict, set, frozenset)):
        raise DataError(f"{name}: {what} is {'None' if obj is None else _type_name(obj)}"
                        f", not an array; {_ACCEPTED}")
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        from backprop.backend import _import_dlpack

        try:
            return _import_dlpack(obj, f"{name}: {what}"), None
        except DataError:
            if not hasattr(obj, "__array__"):
                raise
            try:  # a last try, a copy: some exporters handle fewer cases than __array__
                return np.asarray(obj), None
            except Exception:
                pass
            raise
    if hasattr(obj, "__cuda_array_interface__"):
        from backprop.backend import _cupy

        try:
            return _cupy().asarray(obj), None
        except Exception as exc:
            raise DataError(f"{name}: {what} is {_type_name(obj)} in CUDA memory that "
                            f"cannot be read here ({exc})") from None
    if hasattr(obj, "__array__"):
        try:
            return np.asarray(obj), None
        except Exception as exc:
            raise DataError(f"{name}: {what} is {_type_name(obj)} whose __array__ failed "
                            f"({type(exc).__name__}: {exc})") from None
    if isinstance(obj, (list, tuple, numbers.Number)):
        return _from_sequence(obj, name, what), None
    try:
        view = memoryview(obj)
    except TypeError:
        raise DataError(f"{name}: {what} is {_type_name(obj)}, which backprop cannot read "
                        f"as an array; {_ACCEPTED}") from None
    try:
        return np.asarray(view), None
    except Exception as exc:
        raise DataError(f"{name}: {what} is {_type_name(obj)} buffer that NumPy cannot "
                        f"read ({exc})") from None


def _from_pandas(obj, name, what):
    columns = obj.dtypes.items() if hasattr(obj, "columns") else [(obj.name, obj.dtype)]
    for column, dtype in columns:
        if getattr(dtype, "kind", "O") not in "fiub":
            label = "" if column is None else f"column {column!r} "
            raise DataError(f"{name}: {what} {label}has dtype {dtype}, not numbers; encode "
                            "categorical or text columns as numbers first (one-hot with "
                            "pandas.get_dummies, or class indices with .cat.codes)")
    array = obj.to_numpy()
    if array.dtype == object:  # nullable columns with missing values, or bool mixed with numbers
        array = obj.to_numpy(dtype=np.float64, na_value=np.nan)
    return array


def _from_sequence(obj, name, what):
    try:
        array = np.asarray(obj)
    except ValueError as exc:
        raise DataError(f"{name}: {what} is ragged nested lists ({_ragged(obj)}); every row "
                        f"must have the same length ({exc})") from None
    if array.dtype.kind not in "fiub":
        raise DataError(f"{name}: {what} holds {array.dtype} values, not numbers; nested lists "
                        "must hold numbers only")
    return array


def _ragged(obj) -> str:
    """Where nested lists first differ in length, e.g. ``row 3 has 2 values, row 0 has 3``."""
    def length(v):
        return len(v) if isinstance(v, (list, tuple)) else None

    first = length(obj[0]) if len(obj) else None
    for i, row in enumerate(obj):
        if length(row) != first:
            def say(n):
                return "a single value" if n is None else f"{n} value{'s' * (n != 1)}"
            return f"row {i} has {say(length(row))}, row 0 has {say(first)}"
    return "rows of different shapes"


# ---------------------------------------------------------------------------------------
# Validation (fit calls this once, before any step)
def validate(X, y=None, *, n_features: int | None = None, target: str = "any",
             n_outputs: int | None = None, name: str = "training data"):
    """Check ``X`` (and ``y``) once, before training, and return them in canonical form.

    ``X`` and ``y`` may be anything :func:`as_array` converts (tensors, DataFrames, lists...);
    they are returned as NumPy or CuPy arrays.

    ``X`` must be a 2-D float array without NaN/inf, with ``n_features`` columns when given.
    ``target`` says what ``y`` must be:

    - ``"labels"``: integer class indices ``(N,)`` in ``[0, n_outputs)`` (float arrays holding
      whole numbers are accepted and converted to int64), or class probabilities
      ``(N, n_outputs)`` in ``[0, 1]`` (one-hot rows, soft labels);
    - ``"binary"``: values in ``[0, 1]`` shaped like the output ``(N, n_outputs)``;
    - ``"values"``: finite floats shaped like the output ``(N, n_outputs)``;
    - ``"any"``: finite numbers of any shape with ``N`` rows.

    A 1-D ``y`` is reshaped to ``(N, 1)`` for ``binary``/``values`` with one output. The checks
    run with the array module of the inputs (one host sync per check for CuPy arrays);
    the returned arrays stay where they were. Raises :class:`DataError`.
    """
    X = as_array(X, name=name, what="X")
    xp = get_array_module(X)
    if X.ndim != 2:
        raise DataError(f"{name}: X must be 2-D (samples, features), got shape {X.shape}; "
                        "reshape with X.reshape(len(X), -1)")
    if X.dtype.kind not in "fiub":
        raise DataError(f"{name}: X has dtype {X.dtype}; expected numbers")
    if len(X) == 0:
        raise DataError(f"{name}: X has no rows")
    if n_features is not None and X.shape[1] != n_features:
        raise DataError(f"{name}: X has {X.shape[1]} features per sample but the model's first "
                        f"layer expects {n_features}; select the right columns or rebuild "
                        "the model")
    if X.dtype.kind == "f" and not all_finite(X):
        bad = _first_bad_row(X)
        raise DataError(f"{name}: X contains NaN or inf (first at row {bad}); clean or impute "
                        "the data before training")
    if y is None:
        return X, None
    y = as_array(y, name=name, what="y")
    if y.ndim == 0:
        raise DataError(f"{name}: y is a single value; give one target per row of X")
    if len(y) != len(X):
        raise DataError(f"{name}: X has {len(X)} rows but y has {len(y)}; they must match")
    if y.dtype.kind not in "fiub":
        raise DataError(f"{name}: y has dtype {y.dtype}; expected numbers (map string labels "
                        "to class indices, e.g. with backprop.data.load_csv)")
    if y.dtype.kind == "f" and not bool(xp.isfinite(y).all()):
        raise DataError(f"{name}: y contains NaN or inf (first at row {_first_bad_row(y)})")
    if target == "labels":
        y = _check_labels(xp, y, n_outputs, name)
    elif target in ("binary", "values"):
        y = _check_values(xp, y, n_outputs, target, name)
    elif target != "any":
        raise ValueError(f"target={target!r}: expected 'labels', 'binary', 'values' or 'any'")
    return X, y


PRODUCT_CHECK_MIN_VALUES = 1 << 16
"""NumPy float32/float64 matrices of at least this many values are checked for NaN/inf by
:func:`all_finite`'s row sums on BLAS rather than by ``isfinite`` (benchmarks/README.md,
"Checking inputs")."""


def all_finite(X) -> bool:
    """Whether every value of the float array ``X`` is finite (no NaN, no ±inf).

    A C- or Fortran-ordered 2-D NumPy float32/float64 array of at least
    :data:`PRODUCT_CHECK_MIN_VALUES` values is checked through its row sums ``X @ 1``, one
    multithreaded BLAS pass that writes ``n`` values where ``isfinite(X).all()`` writes a
    boolean per value: IEEE arithmetic keeps NaN and ±inf non-finite through every product
    with 1 and every sum, so finite row sums prove every value finite. A non-finite sum
    (a NaN or inf, or finite values whose sum overflows) is settled by ``isfinite``, so the
    answer is exact either way. Other arrays (CuPy, other dtypes, views with gaps): ``isfinite``.
    Thread-safe (it writes only fresh arrays)."""
    if (type(X) is np.ndarray and X.ndim == 2 and X.size >= PRODUCT_CHECK_MIN_VALUES
            and X.dtype in (np.float32, np.float64)
            and (X.flags.c_contiguous or X.flags.f_contiguous)):
        if np.isfinite(X @ np.ones(X.shape[1], X.dtype)).all():
            return True
    return bool(get_array_module(X).isfinite(X).all())


def _first_bad_row(a) -> int:
    xp = get_array_module(a)
    finite = xp.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return int(xp.argmin(finite))


def _check_labels(xp, y, n_classes, name):
    if y.ndim == 2 and y.dtype.kind == "f" and (n_classes is None or y.shape[1] == n_classes):
        if not bool(((y >= 0) & (y <= 1)).all()):
            raise DataError(f"{name}: class-probability targets must lie in [0, 1]")
        return y
    if y.ndim != 1:
        raise DataError(f"{name}: class targets must be integer labels (N,) or probabilities "
                        f"(N, {n_classes if n_classes is not None else 'C'}), got shape "
                        f"{y.shape} {y.dtype}")
    if y.dtype.kind == "f":
        if not bool((y == xp.round(y)).all()):
            raise DataError(f"{name}: class labels must be whole numbers, got fractional values "
                            "(use a regression loss such as 'mse' for continuous targets)")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (n_classes is not None and hi >= n_classes):
        expected = f"[0, {n_classes})" if n_classes is not None else "[0, ∞)"
        raise DataError(f"{name}: class labels must be in {expected} for a model with "
                        f"{n_classes} outputs, got labels in [{lo}, {hi}]; give the output "
                        "layer one unit per class or remap the labels to 0..C-1")
    return y.astype(np.int64, copy=False)


def _check_values(xp, y, n_outputs, target, name):
    if y.ndim == 1 and n_outputs in (None, 1):
        y = y.reshape(-1, 1)
    if n_outputs is not None and (y.ndim != 2 or y.shape[1] != n_outputs):
        raise DataError(f"{name}: targets must have shape (N, {n_outputs}) like the model's "
                        f"output, got {y.shape}")
    if target == "binary" and not bool(((y >= 0) & (y <= 1)).all()):
        raise DataError(f"{name}: binary targets must lie in [0, 1], got values in "
                        f"[{float(y.min())}, {float(y.max())}]")
    return y
