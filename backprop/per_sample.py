"""Per-sample gradient norms: ``‖∇_θ ℓᵢ‖₂`` for every row ``i`` of a data set, exactly,
at the cost of one forward and one backward pass per batch.

``ℓᵢ`` is the loss of row ``i`` alone: the value the loss object gives for the one-row
batch ``(xᵢ, yᵢ)``. For a batch of ``N`` rows the loss is ``L = s Σᵢ ℓᵢ`` with ``s = 1/N``
(``reduction="mean"``: a mean over the elements is a mean over the rows of each row's mean)
or ``s = 1`` (``"sum"``). In eval mode every layer acts on each row by itself, and every
built-in loss's ``ℓᵢ`` depends on row ``i`` only, so row ``i`` of the ``δ`` that backward
hands a layer is ``s δᵢ``, with ``δᵢ`` that of ``ℓᵢ`` alone. The per-row gradients are then
read off one backward pass of the whole batch::

    Dense        ∂Wᵢ = δᵢ xᵢᵀ,  ∂bᵢ = δᵢ       so   ‖∂Wᵢ‖² + ‖∂bᵢ‖² = ‖δᵢ‖² (‖xᵢ‖² + 1)
                 (δᵢ = ∂ℓᵢ/∂zᵢ, the layer's pre-activation; without a bias the ``+ 1`` goes)
    BatchNorm1d  ∂γᵢ = dAᵢ ⊙ x̂ᵢ,  ∂βᵢ = dAᵢ     (eval: x̂ᵢ = (xᵢ - running_mean)·invstd)

and ``‖∇_θ ℓᵢ‖² = Σ_layers (those sums)``, the rank-one structure of ``∂Wᵢ`` giving its
Frobenius norm without ever forming it. Each layer's ``δ`` (``dA`` for BatchNorm) comes from
its :attr:`~backprop.layers.Layer.backward_observer`, which is set for the call.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from backprop import checks
from backprop import data as bpdata
from backprop.backend import get_array_module, to_numpy, use_device
from backprop.concurrency import exclusive_training, inference_mode, targets_validated
from backprop.layers import BatchNorm1d, Dense, Layer, SyncBatchNorm
from backprop.parameter import Parameter

__all__ = ["per_sample_grad_norms"]

_WHO = "per_sample_grad_norms"


def per_sample_grad_norms(model, X, y, loss, batch_size: int = 256):
    """The L2 norm of each sample's own loss gradient over all parameters of ``model``.

    Returns a NumPy ``float64`` array of shape ``(N,)`` (on every device: one copy to the
    host at the end) whose entry ``i`` is::

        ‖∇_θ ℓᵢ‖₂ = sqrt(Σ_p ‖∂ℓᵢ/∂p‖²)     over every parameter p of the model

    where ``ℓᵢ = loss(model(X[i:i+1]), y[i:i+1])`` (eval mode), row ``i``'s loss alone: its own
    gradient, not divided by ``N`` (for ``reduction="sum"`` the same; with ``"mean"`` a row
    of ``C`` outputs of an elementwise loss such as MSE has ``ℓᵢ`` = the mean over its C
    elements, as a one-row ``fit`` step would see). Rows are processed ``batch_size`` at a
    time; the result does not depend on ``batch_size``, up to rounding.

    The math (see the module docstring): a Dense layer's per-row weight gradient is the
    outer product ``δᵢ xᵢᵀ``, so its squared norm is ``‖δᵢ‖² ‖xᵢ‖²``; BatchNorm1d's are
    ``dAᵢ ⊙ x̂ᵢ`` and ``dAᵢ``. ``δ`` is taken from the layer's backward pass (times ``N``
    for a mean reduction, which divided it by the batch's rows).

    - ``model``: a :class:`~backprop.model.Sequential` (or any Layer) whose parameters all
      belong to ``Dense``, ``BatchNorm1d``/``SyncBatchNorm`` layers, at any depth (inside
      ``Residual`` blocks too). A layer of another type that holds parameters is refused,
      naming it, before any work. Parameter-free layers are assumed to act on each row on
      its own in eval mode (all built-in ones do).
    - ``X``, ``y``: the data and targets, validated as :func:`backprop.training.evaluate`
      validates them (:class:`~backprop.data.DataError` for bad shapes, labels out of
      range, NaN...), then moved to the model's device and dtype.
    - ``loss``: a loss name (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``,
      ``"nll"``...) or a :class:`~backprop.losses.Loss` with ``reduction`` ``"mean"`` or
      ``"sum"``.
    - ``batch_size``: rows per forward/backward pass (bounds the memory).

    **Eval mode.** A per-sample gradient is defined only when samples do not interact, so
    the passes always run in :func:`~backprop.concurrency.inference_mode`: BatchNorm uses
    its running statistics and Dropout is the identity, whatever ``model.training`` is.
    The model's ``training`` flags, running statistics, Dropout counters, weights and
    parameter ``.grad`` (values and staleness) are the same afterwards as before.

    **Cost.** One forward and one backward pass per batch (as a training step without the
    update), plus O(N·width) per parameterised layer for the row norms, in float64; memory
    of one batch, and the parameters' gradients once more (their saved copy).

    **Threads.** The passes use this thread's buffers (:mod:`backprop.concurrency`), and
    the observers they set react to this thread's backward passes only. Since backward
    writes ``Parameter.grad``, the call claims the model's parameters as ``fit`` does
    (:func:`~backprop.concurrency.exclusive_training`): it raises
    :class:`~backprop.concurrency.ConcurrentTrainingError` while a ``fit`` in another
    thread trains the model, and a ``fit`` started meanwhile raises. Called from a callback
    of a ``fit`` in this thread (between steps), it runs, and leaves that ``fit``
    exactly as it was. Several threads may not run it on one model at once (the second
    raises ``ConcurrentTrainingError``).

    Raises ``TypeError``/``ValueError`` for bad arguments and unsupported layers, and
    :class:`~backprop.data.DataError` for bad data, before any pass. A row whose loss or
    gradient is not finite gets ``nan`` or ``inf`` (no error). In a float32 model the
    gradients are float32 (relative error about 1e-6); the row sums are taken in float64.
    """
    from backprop.training import _placement, _prepare, _target_kind, make_loss

    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    if not isinstance(model, Layer):
        raise TypeError(f"{_WHO}: model must be a backprop Layer or Sequential; got "
                        f"{type(model).__name__}")
    layers = _parameterised_layers(model)
    if y is None:
        raise bpdata.DataError(f"{_WHO}: y is None; the per-sample gradients need the targets")
    loss = make_loss(loss)
    reduction = getattr(loss, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{_WHO}: the loss must have reduction 'mean' or 'sum' (to undo its "
                         f"scaling per row); {loss!r} has reduction {reduction!r}")
    kind = _target_kind(loss)
    device, _ = _placement(model)
    params = model.parameters()
    with use_device(device), targets_validated(), inference_mode():
        X, y = _prepare(model, X, y, kind, "per-sample gradient data")
        with _claim(params), _saved_grads(params), _Observers(layers) as observers:
            xp = get_array_module(X)
            n = len(X)
            sq = xp.zeros(n, dtype=np.float64)
            for lo in range(0, n, batch_size):
                xb, yb = X[lo:lo + batch_size], y[lo:lo + batch_size]
                rows = len(xb)
                observers.start(sq[lo:lo + rows])
                out = model.forward(xb)
                loss.forward(out, yb)
                model.backward(loss.backward(), need_input_grad=False)
                observers.finish()
                # δ of a mean reduction is δ_row / rows: the squared norms are rows² too small
                if reduction == "mean":
                    sq[lo:lo + rows] *= float(rows) ** 2
            return to_numpy(xp.sqrt(sq))


# ---------------------------------------------------------------------------------------
def _own_parameters(layer):
    return [p for k, p in vars(layer).items() if isinstance(p, Parameter) and k[0] != "_"]


def _dense_norms(layer, delta, out) -> None:
    """``out += ‖δᵢ‖² (‖xᵢ‖² + [bias])`` for each row i of the batch."""
    x = layer._ctx.saved[0]
    d = delta.astype(np.float64, copy=False)
    xx = x.astype(np.float64, copy=False)
    inputs = (xx * xx).sum(axis=1)
    if layer.b is not None:
        inputs += 1.0
    out += (d * d).sum(axis=1) * inputs


def _batchnorm_norms(layer, grad, out) -> None:
    """``out += ‖dAᵢ ⊙ x̂ᵢ‖² + ‖dAᵢ‖²`` for each row i (eval mode: x̂ from the running
    statistics the forward pass used)."""
    x, mean, invstd = layer._ctx.saved
    g = grad.astype(np.float64, copy=False)
    xhat = (x.astype(np.float64) - mean.astype(np.float64, copy=False)) \
        * invstd.astype(np.float64, copy=False)
    xhat *= g
    out += (xhat * xhat).sum(axis=1) + (g * g).sum(axis=1)


def _norms_of(layer):
    """The per-row function of ``layer``, None for a layer without parameters, or a
    ``TypeError`` for one that holds parameters this module does not know."""
    if not _own_parameters(layer):
        return None
    cls = type(layer)
    if isinstance(layer, Dense) and cls.forward is Dense.forward \
            and cls.backward is Dense.backward:
        return _dense_norms
    if isinstance(layer, BatchNorm1d) and cls.forward in (BatchNorm1d.forward,
                                                          SyncBatchNorm.forward) \
            and cls.backward in (BatchNorm1d.backward, SyncBatchNorm.backward):
        return _batchnorm_norms
    return False


def _parameterised_layers(model):
    """``[(layer, per-row function)]`` for every layer of ``model`` that holds parameters;
    raises before any work when one of them is of a type this module cannot handle."""
    found, unknown = [], []
    for layer in model.modules():
        fn = _norms_of(layer)
        if fn is False:
            names = ", ".join(repr(p.name) for p in _own_parameters(layer))
            unknown.append(f"{layer!r} (parameters {names})")
        elif fn is not None:
            found.append((layer, fn))
    if unknown:
        raise TypeError(
            f"{_WHO}: cannot compute per-sample gradients of {'; '.join(unknown)}: only Dense "
            "and BatchNorm1d/SyncBatchNorm layers (with their own forward and backward) are "
            "supported, since the per-row gradient of each parameter must be known in closed "
            "form")
    if not found:
        raise ValueError(f"{_WHO}: {model!r} has no parameters, so there is no gradient")
    return found


@contextlib.contextmanager
def _claim(params):
    """Claim ``params`` as ``fit`` does, unless this very thread's ``fit`` holds them (a
    callback between steps may look at per-sample gradients)."""
    me = threading.current_thread()
    if all(getattr(p, "_trainer", None) is me for p in params):
        yield
        return
    with exclusive_training(params, who=_WHO):
        yield


@contextlib.contextmanager
def _saved_grads(params):
    """Restore each parameter's ``.grad`` (its values, its staleness, its absence) at the
    end; meanwhile every backward pass writes instead of adding (``zero_grad``)."""
    saved = []
    for p in params:
        grad, stale = p._grad, p._stale
        values = None if grad is None or stale else grad.copy()
        saved.append((p, grad, stale, values))
        p.zero_grad()
    try:
        yield
    finally:
        for p, grad, stale, values in saved:
            if values is not None:
                grad[...] = values  # the same buffer: optimizers may hold views of it
            p._grad, p._stale = grad, stale


class _Observers:
    """Sets a backward observer on each parameterised layer for the block, restoring what
    was there afterwards. An observer acts on this thread's backward passes only, and hands
    other threads' passes to the observer it replaced (if any)."""

    def __init__(self, layers):
        self.layers = layers
        self.thread = threading.get_ident()
        self.out = None
        self.seen = {}
        self.installed = []

    def start(self, out) -> None:
        self.out = out
        self.seen = dict.fromkeys((id(layer) for layer, _ in self.layers), 0)

    def finish(self) -> None:
        missed = [layer for layer, _ in self.layers if self.seen[id(layer)] != 1]
        if missed:
            raise RuntimeError(
                f"{_WHO}: the backward pass reached {missed[0]!r} "
                f"{self.seen[id(missed[0])]} times instead of once; a layer of the model "
                "does not pass the gradient back to the layers before it")

    def _observer(self, fn, previous):
        def observe(layer, delta):
            if self.active and threading.get_ident() == self.thread:
                self.seen[id(layer)] += 1
                fn(layer, delta, self.out)
            elif previous is not None:
                previous(layer, delta)
        return observe

    def __enter__(self):
        self.active = True
        for layer, fn in self.layers:
            previous = vars(layer).get("backward_observer", _UNSET)
            observer = self._observer(fn, None if previous is _UNSET else previous)
            self.installed.append((layer, observer, previous))
            layer.backward_observer = observer
        return self

    def __exit__(self, *exc):
        self.active = False  # an observer still chained by someone else just delegates
        for layer, observer, previous in self.installed:
            if vars(layer).get("backward_observer") is observer:
                if previous is _UNSET:
                    del layer.backward_observer
                else:
                    layer.backward_observer = previous
        return False


_UNSET = object()
