"""Metrics: accuracy, top-k accuracy, MSE, MAE, R² and the confusion matrix.

Each metric is a small streaming class: ``update(y_true, y_pred)`` adds one batch to
accumulators that stay on the device of the arrays (no host sync), and ``result()`` syncs
once and returns a float. ``fit``/``evaluate`` use the classes; the functions of the same
names compute a metric for whole arrays in one call::

    accuracy(y_true, y_pred)          # y_pred: scores (N, C), or (N,)/(N, 1) for binary
    top_k_accuracy(y_true, y_pred, k) mean_squared_error, mean_absolute_error, r2_score
    confusion_matrix(y_true, y_pred, num_classes)

Predictions are what the model outputs: class scores (logits or probabilities; the argmax
is the predicted class), or a single column for binary problems, thresholded at
``threshold`` (0.5 for probabilities; ``get`` uses 0 when the loss takes logits).
"""
from __future__ import annotations

import re

import numpy as np

from backprop.backend import get_array_module, to_numpy

__all__ = [
    "Metric", "Accuracy", "TopKAccuracy", "MeanSquaredError", "MeanAbsoluteError", "R2Score",
    "ConfusionMatrix", "accuracy", "top_k_accuracy", "mean_squared_error",
    "mean_absolute_error", "r2_score", "confusion_matrix", "get",
]


class Metric:
    """Base class: ``reset()``, ``update(y_true, y_pred)``, ``result() -> float``.

    Subclasses keep ``_slots`` running sums in one device array (``_add``) and read them
    back with a single transfer (``_totals``)."""

    name = "metric"
    _slots = 2

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._acc = None  # device-side float64 accumulators, created on first update

    def _add(self, *values) -> None:
        if self._acc is None:
            xp = get_array_module(values[0])
            self._acc = xp.zeros(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            self._acc[i] += v

    def _totals(self):
        return [0.0] * self._slots if self._acc is None else self._acc.tolist()

    def result(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement result()")

    # -- combining the accumulators of several processes (backprop.distributed) ---------
    def state(self) -> dict:
        """The accumulators as host values (``{"acc": ndarray or None, ...}``): what
        :meth:`merge` adds up across the ranks of a data-parallel ``fit``. A subclass that
        keeps other running values overrides both."""
        return {"acc": None if self._acc is None else to_numpy(self._acc).copy()}

    def merge(self, states) -> None:
        """Set the accumulators to the sum of ``states`` (from :meth:`state` on every rank;
        this rank's own included), so that ``result()`` covers all of their rows."""
        accs = [s["acc"] for s in states if s["acc"] is not None]
        self._acc = None if not accs else _on_device_of(self._acc, sum(accs[1:], accs[0]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _on_device_of(like, host):
    """``host`` (NumPy) on the device of ``like`` (NumPy when ``like`` is None)."""
    if like is None:
        return host
    xp = get_array_module(like)
    return host if xp is np else xp.asarray(host)


def _predicted_class(y_pred, threshold: float):
    """Class indices from scores (N, C), one score column (N,)/(N, 1), or integer labels (N,)."""
    if y_pred.ndim == 2 and y_pred.shape[1] > 1:
        return y_pred.argmax(axis=1)
    if y_pred.ndim == 1 and y_pred.dtype.kind in "iu":
        return y_pred
    return (y_pred.reshape(len(y_pred)) > threshold).astype(np.int64)


class Accuracy(Metric):
    """Fraction of rows whose predicted class equals the label:
    ``mean_i [argmax_k ŷ_ik = y_i]`` (or ``[ŷ_i > threshold] = y_i`` for one output column).
    Labels may be class indices ``(N,)`` or one-hot/binary columns like the prediction."""

    name = "accuracy"

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)
        super().__init__()

    def update(self, y_true, y_pred) -> None:
        pred = _predicted_class(y_pred, self.threshold)
        true = y_true
        if true.ndim == 2:
            true = true.argmax(axis=1) if true.shape[1] > 1 else true.reshape(len(true))
        self._add((pred == true).sum(), len(pred))

    def result(self) -> float:
        correct, n = self._totals()
        return correct / n if n else float("nan")


class TopKAccuracy(Metric):
    """Fraction of rows whose label is among the ``k`` highest scores of the row."""


    def __init__(self, k: int = 5):
        if k < 1:
            raise ValueError(f"top-k accuracy needs k >= 1, got {k}")
        self.k = int(k)
        self.name = f"top_{self.k}_accuracy"
        super().__init__()

    def update(self, y_true, y_pred) -> None:
        if y_pred.ndim != 2:
            raise ValueError(f"top-k accuracy needs scores of shape (N, C), got {y_pred.shape}")
        xp = get_array_module(y_pred)
        true = y_true.reshape(len(y_true)).astype(np.int64)
        true_score = xp.take_along_axis(y_pred, true[:, None], axis=1)
        # the label is in the top k iff fewer than k classes score strictly higher
        higher = (y_pred > true_score).sum(axis=1)
        self._add((higher < self.k).sum(), len(true))

    def result(self) -> float:
        hit, n = self._totals()
        return hit / n if n else float("nan")


class MeanSquaredError(Metric):
    """``mean (ŷ - y)²`` over every element."""

    name = "mse"

    def update(self, y_true, y_pred) -> None:
        diff = y_pred - y_true.reshape(y_pred.shape)
        self._add((diff * diff).sum(dtype=np.float64), diff.size)

    def result(self) -> float:
        total, n = self._totals()
        return total / n if n else float("nan")


class MeanAbsoluteError(Metric):
    """``mean |ŷ - y|`` over every element."""

    name = "mae"

    def update(self, y_true, y_pred) -> None:
        diff = y_pred - y_true.reshape(y_pred.shape)
        self._add(abs(diff).sum(dtype=np.float64), diff.size)

    def result(self) -> float:
        total, n = self._totals()
        return total / n if n else float("nan")


class R2Score(Metric):
    """Coefficient of determination ``1 - Σ(y - ŷ)² / Σ(y - ȳ)²``, per output column and
    averaged over columns (scikit-learn's ``uniform_average``). Streams via
    ``Σ(y - ȳ)² = Σy² - (Σy)²/n`` with float64 accumulators."""

    name = "r2"

    def reset(self) -> None:
        self._acc = None
        self._n = 0

    def update(self, y_true, y_pred) -> None:
        xp = get_array_module(y_pred)
        pred = y_pred.reshape(len(y_pred), -1)
        true = y_true.reshape(pred.shape).astype(np.float64)
        if self._acc is None:
            self._acc = xp.zeros((3, pred.shape[1]), dtype=np.float64)
        resid = true - pred
        self._acc[0] += (resid * resid).sum(axis=0)
        self._acc[1] += true.sum(axis=0)
        self._acc[2] += (true * true).sum(axis=0)
        self._n += len(pred)

    def state(self) -> dict:
        return {**super().state(), "n": self._n}

    def merge(self, states) -> None:
        super().merge(states)
        self._n = sum(s["n"] for s in states)

    def result(self) -> float:
        if self._acc is None:
            return float("nan")
        ss_res, s1, s2 = (np.asarray(row) for row in self._acc.tolist())
        ss_tot = s2 - s1 * s1 / self._n
        # a constant target is predicted perfectly (score 1) or not at all (score 0)
        scores = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0),
                          np.where(ss_res == 0, 1.0, 0.0))
        return float(scores.mean())


class ConfusionMatrix(Metric):
    """Counts ``M[i, j]`` of rows with label ``i`` predicted as class ``j``; ``result()``
    returns the ``(C, C)`` int64 NumPy matrix (so it is not logged per epoch). ``update``
    checks the range of labels and predictions on the host (one sync per batch)."""

    name = "confusion_matrix"

    def __init__(self, num_classes: int, threshold: float = 0.5):
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        super().__init__()

    def update(self, y_true, y_pred) -> None:
        xp = get_array_module(y_pred)
        pred = _predicted_class(y_pred, self.threshold)
        true = y_true.reshape(len(y_true)).astype(np.int64)
        c = self.num_classes
        lo, hi = min(int(true.min()), int(pred.min())), max(int(true.max()), int(pred.max()))
        if lo < 0 or hi >= c:
            raise ValueError(f"labels or predictions in [{lo}, {hi}] fall outside [0, {c}) "
                             f"for a {c}-class confusion matrix; pass num_classes={hi + 1}")
        counts = xp.bincount(true * c + pred, minlength=c * c)
        if self._acc is None:
            self._acc = xp.zeros(c * c, dtype=np.int64)
        self._acc += counts

    def result(self) -> np.ndarray:
        c = self.num_classes
        if self._acc is None:
            return np.zeros((c, c), dtype=np.int64)
        return np.asarray(self._acc.tolist(), dtype=np.int64).reshape(c, c)


# ---------------------------------------------------------------------------------------
# Names
_TOP_K = re.compile(r"top_?(\d+)(_accuracy|_acc)?")
_BY_NAME = {
    "accuracy": Accuracy, "acc": Accuracy,
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError, "mean_absolute_error": MeanAbsoluteError,
    "r2": R2Score, "r2_score": R2Score,
}


def get(metric, threshold: float = 0.5) -> Metric:
    """A fresh :class:`Metric` from a name (``accuracy``/``acc``, ``top_5_accuracy``/``top5``,
    ``mse``, ``mae``, ``r2``) or a Metric instance (returned as is). ``threshold`` is the
    decision threshold of single-column (binary) predictions for accuracy."""
    if isinstance(metric, Metric):
        return metric
    key = str(metric).strip().lower()
    m = _TOP_K.fullmatch(key)
    if m:
        return TopKAccuracy(int(m.group(1)))
    if key not in _BY_NAME:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_BY_NAME)}, "
                         "'top_<k>_accuracy', or a backprop.metrics.Metric instance")
    cls = _BY_NAME[key]
    return cls(threshold) if cls is Accuracy else cls()


# ---------------------------------------------------------------------------------------
# One-call functions
def _once(metric: Metric, y_true, y_pred):
    xp = get_array_module(y_pred)
    metric.update(xp.asarray(y_true), xp.asarray(y_pred))
    return metric.result()


def accuracy(y_true, y_pred, threshold: float = 0.5) -> float:
    """Fraction of correct predictions (see :class:`Accuracy`)."""
    return _once(Accuracy(threshold), y_true, y_pred)


def top_k_accuracy(y_true, y_pred, k: int = 5) -> float:
    """Fraction of rows whose label is among the ``k`` top scores."""
    return _once(TopKAccuracy(k), y_true, y_pred)


def mean_squared_error(y_true, y_pred) -> float:
    """``mean (ŷ - y)²``."""
    return _once(MeanSquaredError(), y_true, y_pred)


def mean_absolute_error(y_true, y_pred) -> float:
    """``mean |ŷ - y|``."""
    return _once(MeanAbsoluteError(), y_true, y_pred)


def r2_score(y_true, y_pred) -> float:
    """``1 - Σ(y - ŷ)² / Σ(y - ȳ)²`` averaged over output columns."""
    return _once(R2Score(), y_true, y_pred)


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """``(C, C)`` counts of label ``i`` predicted as ``j``; ``y_pred`` may be scores or labels.
    ``num_classes`` defaults to ``max(labels, predictions) + 1``."""
    xp = get_array_module(y_pred)
    y_true, y_pred = xp.asarray(y_true), xp.asarray(y_pred)
    if num_classes is None:
        if y_pred.ndim == 2 and y_pred.shape[1] > 1:
            num_classes = y_pred.shape[1]
        else:
            num_classes = int(max(int(y_true.max()), int(_predicted_class(y_pred, 0.5).max()))) + 1
    return _once(ConfusionMatrix(num_classes), y_true, y_pred)
