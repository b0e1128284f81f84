"""Losses: ``forward(pred, target)`` returns the loss as a 0-d array (no host sync) and
computes ``∂L/∂pred`` into a buffer the loss owns, which ``backward()`` returns.

With ``d = pred - target``, ``n`` = number of elements (rows for cross-entropy) and
``s = 1/n`` for ``reduction="mean"`` or ``1`` for ``"sum"``::

    MSELoss                   L = s Σ d²                                   ∂L/∂pred = 2 s d
    MSELoss(half=True)        L = s ½ Σ d²  (the textbooks' ½·MSE)          ∂L/∂pred = s d
    L1Loss                    L = s Σ |d|                                  ∂L/∂pred = s sign(d)
    BCEWithLogitsLoss (z, y)  L = s Σ max(z,0) - z y + log(1 + e^-|z|)     ∂L/∂z = s (σ(z) - y)
    BCELoss (p, y)            L = -s Σ y log p + (1-y) log(1-p)  (logs clamped at -100)
                                                       ∂L/∂p = s (p - y) / max(p(1-p), 1e-12)
    SoftmaxCrossEntropyLoss   L = s Σᵢ lseᵢ - Σₖ yᵢₖ zᵢₖ  with y smoothed: (1-ε) y + ε/C
                              ∂L/∂z = s (softmax(z) Σₖ yₖ - y)
    NLLLoss (log p, labels)   L = -s Σᵢ log pᵢ,yᵢ                          ∂L/∂log p = -s [k = yᵢ]
    CategoricalCrossEntropyLoss (p, y)  L = -s Σ y log clip(p/Σp, ε, 1-ε)  (Keras)
                              paired with a softmax output layer: from its logits z,
                              ∂L/∂z = s (softmax(z) Σₖ yₖ - y)  (δᴸ = A - Y)

Every formula only exponentiates non-positive numbers, so any finite input gives a finite
loss and gradient. Targets are checked (shape always; NaN, label type and range while
``validate_labels`` is True, which costs a host sync: ``fit`` and ``evaluate`` validate the
data set once and skip these checks, in their own thread only, while they run:
:func:`backprop.concurrency.targets_validated`).

Threads: ``∂L/∂pred`` and the work buffers are per thread (``self._ctx``), so one loss
object may compute losses in several threads at once; ``backward()`` returns the gradient of
the calling thread's last ``forward``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from backprop import kernels as K
from backprop.backend import get_array_module, to_numpy
from backprop.concurrency import _MODE, PerThread, WithPerThread

__all__ = ["Loss", "MSELoss", "L1Loss", "BCEWithLogitsLoss", "BCELoss",
           "SoftmaxCrossEntropyLoss", "CrossEntropyLoss", "NLLLoss", "CategoricalCrossEntropyLoss",
           "paired_output", "get", "from_config", "NAMES"]


class Loss(WithPerThread):
    """Base class: ``forward(pred, target) -> 0-d array``, ``backward() -> ∂L/∂pred``."""

    _registry: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Loss._registry[cls.__name__] = cls

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.reduction = reduction
        self.validate_labels = True
        self._ctx = PerThread(type(self).__name__)

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def backward(self):
        """``∂L/∂pred`` of this thread's last ``forward`` (a buffer owned by the loss)."""
        grad = vars(self._ctx).get("grad")
        if grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward() "
                               "(in this thread)")
        return grad

    @property
    def _check_targets(self) -> bool:
        """Whether this call checks NaN, label type and range (a host sync)."""
        return self.validate_labels and not _MODE.targets_valid

    def config(self) -> dict:
        return {"type": type(self).__name__, "reduction": self.reduction}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"

    def _scale(self, n: int) -> float:
        return 1.0 / n if self.reduction == "mean" else 1.0

    def _class_scores(self, pred, what: str):
        """``(xp, n, c)`` of float class scores ``pred`` (N, C), or a clear error."""
        if not hasattr(pred, "ndim") or pred.ndim != 2 or pred.dtype.kind != "f":
            raise ValueError(f"{type(self).__name__} needs float {what} of shape (N, C); got "
                             f"{getattr(pred, 'dtype', type(pred).__name__)} "
                             f"{tuple(getattr(pred, 'shape', ()))}")
        return (get_array_module(pred), *pred.shape)

    def _class_labels(self, labels, c: int):
        """Integer class labels (N,) in ``[0, c)`` as int64 (the range is checked while
        ``validate_labels`` holds), or a clear error."""
        name = type(self).__name__
        if labels.dtype.kind not in "iu":
            raise TypeError(f"{name}: class labels must be integers; got {labels.dtype} "
                            "(convert with y.astype('int64'))")
        if self._check_targets:
            lo, hi = _label_range(labels)
            if lo < 0 or hi >= c:
                raise ValueError(f"{name}: labels must be in [0, {c}) for {c} classes; got "
                                 f"labels in [{lo}, {hi}]")
        return labels if labels.dtype == np.int64 else labels.astype(np.int64)

    def _pred_and_target(self, pred, target):
        """Check ``pred`` and bring ``target`` to its device, shape check and dtype."""
        xp = get_array_module(pred)
        if not hasattr(pred, "dtype") or pred.dtype.kind != "f":
            raise TypeError(f"{type(self).__name__} needs floating-point predictions; got "
                            f"{getattr(pred, 'dtype', type(pred).__name__)}")
        target = to_numpy(target) if xp is np else xp.asarray(target)
        if target.shape != pred.shape:
            hint = ""
            if target.ndim == pred.ndim - 1 and pred.shape[-1] == 1:
                hint = ": reshape the target with y.reshape(-1, 1)"
            raise ValueError(f"{type(self).__name__}: prediction shape {tuple(pred.shape)} and "
                             f"target shape {tuple(target.shape)} differ{hint}")
        if target.dtype != pred.dtype:
            target = target.astype(pred.dtype)
        if self._check_targets and bool(xp.isnan(target).any()):
            raise ValueError(f"{type(self).__name__}: the target contains NaN")
        return xp, target


@njit(cache=True, nogil=True)
def _min_max(labels):
    lo = hi = labels[0]
    for v in labels:
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


def _label_range(labels) -> tuple[int, int]:
    """``(min, max)`` of integer labels: on a NumPy vector one compiled pass (NumPy's ``min``
    and ``max`` cost two reductions' call overhead, several microseconds per training step
    of a small model); anything else (CuPy, empty, N-d) through the array's own methods."""
    if type(labels) is np.ndarray and labels.ndim == 1 and labels.size:
        lo, hi = _min_max(labels)
        return int(lo), int(hi)
    return int(labels.min()), int(labels.max())


class MSELoss(Loss):
    """Mean squared error ``s Σ (pred - target)²``; with ``half=True`` the textbooks'
    ``s ½ Σ (pred - target)²``, whose gradient is ``s (pred - target)`` (δᴸ = A - Y for a
    linear output)."""

    def __init__(self, reduction: str = "mean", half: bool = False):
        super().__init__(reduction)
        if not isinstance(half, (bool, np.bool_)):
            raise TypeError(f"half must be True or False; got {half!r}")
        self.half = bool(half)

    def config(self) -> dict:
        return {**super().config(), "half": self.half}

    def forward(self, pred, target):
        xp, target = self._pred_and_target(pred, target)
        s = self._scale(pred.size) * (0.5 if self.half else 1.0)
        g = self._ctx.grad = xp.subtract(pred, target, out=self._buffer("grad", pred.shape, pred))
        total = xp.vdot(g.ravel(), g.ravel())
        g *= 2.0 * s
        return xp.asarray(total * s)


class L1Loss(Loss):
    """Mean absolute error ``s Σ |pred - target|`` (gradient ``s sign(d)``, 0 where d = 0)."""

    def forward(self, pred, target):
        xp, target = self._pred_and_target(pred, target)
        s = self._scale(pred.size)
        d = xp.subtract(pred, target, out=self._buffer("diff", pred.shape, pred))
        g = self._ctx.grad = xp.sign(d, out=self._buffer("grad", pred.shape, pred))
        total = xp.vdot(d.ravel(), g.ravel())  # Σ d sign(d) = Σ |d|
        g *= s
        return xp.asarray(total * s)


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits ``z`` with targets ``y`` in [0, 1], in the stable form
    ``max(z, 0) - z y + log1p(exp(-|z|))``; ``σ(z) = exp(min(z, 0)) / (1 + exp(-|z|))``."""

    def forward(self, pred, target):
        xp, y = self._pred_and_target(pred, target)
        s = self._scale(pred.size)
        e, loss = self._buffer("e", pred.shape, pred), self._buffer("loss", pred.shape, pred)
        g = self._ctx.grad = self._buffer("grad", pred.shape, pred)
        xp.exp(xp.negative(xp.abs(pred, out=e), out=e), out=e)          # e = exp(-|z|)
        xp.log1p(e, out=loss)
        loss += xp.maximum(pred, 0, out=g)
        loss -= xp.multiply(pred, y, out=g)
        total = loss.sum()
        xp.exp(xp.minimum(pred, 0, out=g), out=g)
        e += 1.0
        g /= e                                                          # g = σ(z)
        g -= y
        g *= s
        return xp.asarray(total * s)


class BCELoss(Loss):
    """Binary cross-entropy on probabilities ``p`` in [0, 1], logs clamped at -100 (PyTorch)."""

    def forward(self, pred, target):
        xp, y = self._pred_and_target(pred, target)
        if self._check_targets:
            lo, hi = float(xp.minimum(pred.min(), y.min())), float(xp.maximum(pred.max(), y.max()))
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"BCELoss needs predictions and targets in [0, 1]; got values "
                                 f"in [{lo}, {hi}] (use BCEWithLogitsLoss on raw scores)")
        s = self._scale(pred.size)
        logp, log1mp = self._buffer("logp", pred.shape, pred), self._buffer("l1", pred.shape, pred)
        g = self._ctx.grad = self._buffer("grad", pred.shape, pred)
        with np.errstate(divide="ignore"):  # log(0) = -inf is clamped just below
            xp.maximum(xp.log(pred, out=logp), -100.0, out=logp)
            xp.maximum(xp.log1p(xp.negative(pred, out=log1mp), out=log1mp), -100.0, out=log1mp)
        logp -= log1mp
        logp *= y
        logp += log1mp                                  # y log p + (1 - y) log(1 - p)
        total = -logp.sum()
        xp.subtract(pred, y, out=g)
        xp.subtract(1.0, pred, out=log1mp)
        log1mp *= pred
        g /= xp.maximum(log1mp, 1e-12, out=log1mp)
        g *= s
        return xp.asarray(total * s)


class SoftmaxCrossEntropyLoss(Loss):
    """Cross-entropy of ``softmax(logits)`` (N, C), fused with the softmax.

    ``target`` is integer class labels (N,) in ``[0, C)`` (the fused ``K.softmax_xent``
    kernel) or probabilities / one-hot rows (N, C). ``label_smoothing`` ε mixes the target
    with the uniform distribution: ``(1-ε) y + ε/C``. PyTorch's ``CrossEntropyLoss``.
    """

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__(reduction)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def config(self) -> dict:
        return {**super().config(), "label_smoothing": self.label_smoothing}

    def forward(self, pred, target):
        xp, n, c = self._class_scores(pred, "logits")
        target = to_numpy(target) if xp is np else xp.asarray(target)
        if target.ndim == 2:
            return self._forward_probabilities(xp, pred, target)
        if target.shape != (n,):
            raise ValueError(f"SoftmaxCrossEntropyLoss: logits {tuple(pred.shape)} need integer "
                             f"labels of shape ({n},) or probabilities of shape {(n, c)}; got "
                             f"target shape {tuple(target.shape)}")
        labels = self._class_labels(target, c)
        s = self._scale(n)
        ctx = self._ctx
        grad = ctx.grad = self._buffer("grad", pred.shape, pred)
        rows = self._buffer("rows", (n,), pred)
        smoothing = self.label_smoothing
        run = ctx.runs.get("forward")
        # grad and rows are this thread's buffers; pred and labels are the caller's, so
        # their shapes are compared too (the same object may have been reshaped in place)
        if (run is None or run[2] is not pred or run[3] is not labels or run[4] is not grad
                or run[5] is not rows or run[6] != smoothing or run[7] != s
                or pred.shape != run[8] or labels.shape != run[9] or not K.current(run[0])):
            run = ctx.runs["forward"] = (
                *K.prepare("softmax_xent", pred, labels, smoothing, s, grad, rows),
                pred, labels, grad, rows, smoothing, s, pred.shape, labels.shape)
        run[1]()
        return xp.asarray(rows.sum() * s)

    def _forward_probabilities(self, xp, z, y):
        """The same loss for probability targets (plain xp; allocates)."""
        if y.shape != z.shape:
            hint = " (for class labels pass a 1-D array: y.ravel())" if y.shape[1] == 1 else ""
            raise ValueError(f"SoftmaxCrossEntropyLoss: probability targets must have the "
                             f"logits' shape {tuple(z.shape)}; got {tuple(y.shape)}{hint}")
        y = y.astype(z.dtype, copy=False)
        if self._check_targets and bool(xp.isnan(y).any()):
            raise ValueError("SoftmaxCrossEntropyLoss: the target contains NaN")
        eps, c = self.label_smoothing, z.shape[1]
        if eps:
            y = y * (1.0 - eps) + eps / c
        shifted = z - z.max(axis=1, keepdims=True)
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        s = self._scale(z.shape[0])
        g = self._ctx.grad = self._buffer("grad", z.shape, z)
        g[...] = (xp.exp(logp) * y.sum(axis=1, keepdims=True) - y) * s
        return xp.asarray(-(y * logp).sum() * s)


CrossEntropyLoss = SoftmaxCrossEntropyLoss


class NLLLoss(Loss):
    """Negative log-likelihood of class labels ``y`` (N,) under log-probabilities ``log p``
    (N, C), e.g. the output of a log-softmax: ``L = -s Σᵢ log p[i, yᵢ]``, PyTorch's
    ``NLLLoss`` (without its ``weight`` and ``ignore_index``). The gradient is ``-s`` at each
    row's label and 0 elsewhere."""

    def forward(self, pred, target):
        xp, n, c = self._class_scores(pred, "log-probabilities")
        labels = to_numpy(target) if xp is np else xp.asarray(target)
        if labels.shape != (n,):
            raise ValueError(f"NLLLoss: log-probabilities {tuple(pred.shape)} need integer "
                             f"labels of shape ({n},); got {tuple(labels.shape)}")
        labels = self._class_labels(labels, c)
        s = self._scale(n)
        rows = xp.arange(n)
        g = self._ctx.grad = self._buffer("grad", pred.shape, pred)
        g.fill(0)
        g[rows, labels] = -s
        return xp.asarray(-pred[rows, labels].sum(dtype=np.float64) * s)

class CategoricalCrossEntropyLoss(Loss):
    """Cross-entropy of class probabilities ``P`` (N, C), e.g. the output of a softmax
    layer, Keras' ``CategoricalCrossentropy`` (``from_logits=False``) semantics:

        Q = P / Σ_row P,   L = -s Σᵢ Σₖ yᵢₖ log clip(Qᵢₖ, ε, 1-ε)     (ε = 1e-7)
        ∂L/∂P = s (G - Σ_row G ⊙ Q) / Σ_row P,  G = -Y / Q where ε ≤ Q ≤ 1-ε, else 0

    ``target`` is integer labels (N,) (one-hot, as Keras' sparse variant) or probability rows
    (N, C); ``label_smoothing`` ε' mixes it with the uniform distribution.

    **Paired with a softmax output** (``Dense(..., activation="softmax")`` or a final
    ``Softmax`` layer), ``fit`` and ``evaluate`` compute the loss from that layer's logits Z
    instead (:meth:`forward_logits`, as Keras does for a softmax output):
    ``L = -s Σ Y ⊙ log softmax(Z)`` and the combined gradient
    ``δᴸ = ∂L/∂Z = s (A Σ_row Y - Y)`` (``s (A - Y)`` for one-hot rows), with no clipping and
    no division by a probability, so a saturated softmax keeps a finite loss and an exact
    gradient. In a hand-written loop the same reads::

        out = model.forward(x)
        L = loss.forward_logits(model.layers[-1].logits(), y)
        model.backward(loss.backward(), from_logits=True)
    """

    pairs_with = "softmax"
    epsilon = 1e-7

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__(reduction)
        self._paired = SoftmaxCrossEntropyLoss(label_smoothing, reduction)
        self.label_smoothing = self._paired.label_smoothing

    def config(self) -> dict:
        return {**super().config(), "label_smoothing": self.label_smoothing}

    def forward(self, pred, target):
        xp, n, c = self._class_scores(pred, "probabilities")
        y = self._targets(xp, pred, target, n, c)
        s = self._scale(n)
        total = pred.sum(axis=1, keepdims=True)
        q = pred / total
        clipped = xp.clip(q, self.epsilon, 1.0 - self.epsilon)
        g = xp.where((q >= self.epsilon) & (q <= 1.0 - self.epsilon), -y / clipped, 0.0)
        grad = self._ctx.grad = self._buffer("grad", pred.shape, pred)
        grad[...] = (g - (g * q).sum(axis=1, keepdims=True)) / total * s
        return xp.asarray(-(y * xp.log(clipped)).sum(dtype=np.float64) * s)

    def forward_logits(self, logits, target):
        """The loss from the logits of a softmax output and ``∂L/∂logits`` for
        ``backward()`` (see the class docstring); the fused kernel of
        :class:`SoftmaxCrossEntropyLoss`."""
        paired = self._paired
        paired.validate_labels = self.validate_labels
        value = paired.forward(logits, target)
        self._ctx.grad = paired.backward()
        return value

    def _targets(self, xp, pred, target, n, c):
        """``Y`` (N, C) in ``pred``'s dtype, smoothed: from labels (N,) or probability rows."""
        target = to_numpy(target) if xp is np else xp.asarray(target)
        if target.shape == (n,):
            labels = self._class_labels(target, c)
            y = xp.zeros(pred.shape, dtype=pred.dtype)
            y[xp.arange(n), labels] = 1.0
        elif target.shape == (n, c):
            y = target.astype(pred.dtype, copy=False)
            if self._check_targets and bool(xp.isnan(y).any()):
                raise ValueError("CategoricalCrossEntropyLoss: the target contains NaN")
        else:
            raise ValueError(f"CategoricalCrossEntropyLoss: probabilities {tuple(pred.shape)} "
                             f"need integer labels of shape ({n},) or probability rows of "
                             f"shape {(n, c)}; got target shape {tuple(target.shape)}")
        eps = self.label_smoothing
        return y * (1.0 - eps) + eps / c if eps else y


def paired_output(model, loss):
    """The output layer of ``model`` whose logits ``loss`` takes instead of its output, or
    None: the last layer of a Sequential when its activation is the one the loss
    ``pairs_with`` (softmax for :class:`CategoricalCrossEntropyLoss`). ``fit`` and
    ``evaluate`` then call ``loss.forward_logits(layer.logits(), y)`` and
    ``model.backward(loss.backward(), from_logits=True)``."""
    pairs = getattr(loss, "pairs_with", None)
    layers = getattr(model, "layers", None)
    if pairs is None or not layers:
        return None
    last = layers[-1]
    kernel = getattr(getattr(last, "activation", last), "kernel", None)
    return last if kernel == pairs and hasattr(last, "logits") else None


NAMES = {"mse": MSELoss, "l1": L1Loss, "mae": L1Loss, "bce_with_logits": BCEWithLogitsLoss,
         "bce": BCELoss, "cross_entropy": SoftmaxCrossEntropyLoss,
         "softmax_cross_entropy": SoftmaxCrossEntropyLoss, "nll": NLLLoss,
         "half_mse": lambda: MSELoss(half=True),
         "categorical_crossentropy": CategoricalCrossEntropyLoss}


def get(spec) -> Loss:
    """A loss from a name in ``NAMES``, a config dict or a Loss object."""
    if isinstance(spec, Loss):
        return spec
    if isinstance(spec, str) and spec.lower() in NAMES:
        return NAMES[spec.lower()]()
    if isinstance(spec, dict):
        return from_config(spec)
    raise ValueError(f"unknown loss {spec!r}; expected one of {sorted(NAMES)} or a Loss object")


def from_config(cfg: dict) -> Loss:
    """Rebuild a loss from its ``config()``."""
    cls = Loss._registry.get(cfg.get("type")) if isinstance(cfg, dict) else None
    if cls is None:
        raise ValueError(f"unknown loss config {cfg!r}; known types: {sorted(Loss._registry)}")
    return cls(**{k: v for k, v in cfg.items() if k != "type"})
