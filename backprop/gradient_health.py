"""Gradient health: per-layer statistics of the backward pass during ``fit``, and warnings
with advice when the gradients vanish or explode.

Backpropagation carries the error signal ``δˡ = ∂L/∂Zˡ`` from the output down::

    δᴸ = ∂L/∂Zᴸ        δˡ = (δˡ⁺¹ Wˡ⁺¹) ⊙ σ′(Zˡ)        ∂L/∂Wˡ = δˡᵀ Aˡ⁻¹

so ``‖δ¹‖`` is ``‖δᴸ‖`` times a product of ``L - 1`` factors ``σ′ · ‖W‖``: below 1 each
(sigmoid: σ′ ≤ 1/4), δ vanishes geometrically with depth and the first layers stop
learning; above 1, it explodes. Nothing in the loss curve says which.

``GradientMonitor(every=N)`` is a callback. On every N-th training step (steps 0, N, 2N, ...
of the ``fit``, counted across epochs) it looks inside the backward pass of each
:class:`~backprop.layers.Dense` layer (``Z = X Wᵀ + b``, ``A = σ(Z)``; the layers without
a ``W`` — BatchNorm1d, activation layers, Dropout — show through the δ of the Dense layers
around them) and records:

====================== ======================================================================
``delta_rms``          ``sqrt(mean(δ²))`` over the batch and the units, ``δ = ∂L/∂Z``: the
                       error signal that reaches the layer (the "gradient flow"). ``L`` is
                       the mean loss of the batch, so δ carries a factor 1/N.
``grad_norm``          ``‖∂L/∂W‖_F``: the weight gradient the optimizer step used (after the
                       regularizers' gradients and clipping; without bias).
``update_ratio``       ``‖ΔW‖_F / ‖W‖_F``, ``ΔW = W_after - W_before`` of the step
                       (around 1e-3 is the usual rule of thumb; for plain SGD it is
                       ``lr ‖∂W‖ / ‖W‖``). NaN when the step was skipped (non-finite loss).
``dead_fraction``      ReLU-like σ (``backprop.init.RELU_LIKE``): the fraction of units with
                       ``σ′(z) = 0`` on every row of the batch (no gradient reaches their
                       weights). NaN for other activations.
``saturated_fraction`` saturating σ (``SATURATING``, the records' ``saturating`` flag: sigmoid
                       and tanh): the fraction of units with ``σ′(z) <
                       saturation_threshold`` (0.01) on more than ``saturation_rows`` (half)
                       of the rows. NaN for other activations.
====================== ======================================================================

``monitor.records`` holds one dict per monitored step (``step``, ``epoch``, ``batch``,
``loss``, ``depth_ratio`` (below), ``layers``: ``{path: {stat: value}}``),
``monitor.series(stat)`` the same as
arrays, and ``monitor.plot(path)`` draws ``delta_rms`` per layer over the steps on a log
axis (the gradient-flow plot). Layers are named by their path in the model (``"0"``,
``"2.block.0"``: the names of their parameters without ``.W``).

Epoch logs (``History``, ``CSVLogger``): for each layer path ``p``, the mean over the
epoch's monitored steps (NaN for an epoch without one) of ``grad/p/delta_rms``,
``grad/p/grad_norm``, ``grad/p/update_ratio``, plus ``grad/p/dead_fraction`` for ReLU-like
layers and ``grad/p/saturated_fraction`` for sigmoid/tanh layers; and ``grad/depth_ratio``,
``delta_rms`` of the first Dense layer over that of the last. The progress line leaves the
``grad/...`` keys out.

Warnings (:class:`GradientHealthWarning`, a ``UserWarning``; each kind at most once per
``fit``; a condition must hold on ``patience`` consecutive monitored steps), with ``r`` the
depth ratio ``delta_rms(first Dense) / delta_rms(last Dense)``:

- ``vanish``: ``r < vanish_ratio`` (1e-3: three orders of magnitude lost between the output
  and the input layer);
- ``explode``: ``r > explode_ratio`` (1e3), or the largest ``delta_rms`` of a step is more
  than ``explode_factor`` (1e3) times that of the first monitored step, or the total
  gradient norm ``sqrt(Σ_l ‖∂W_l‖²)`` (or ``fit``'s pre-clipping ``grad_norm``) exceeds
  ``explode_norm`` (1e6);
- ``nonfinite``: a NaN/inf in some layer's δ or ∂W (monitored steps), or a non-finite loss
  (checked on every step: ``fit`` calls ``on_batch_end`` before it raises
  :class:`~backprop.training.NonFiniteLossError`, so the advice comes first);
- ``dead``: a layer with ``dead_fraction > dead_warn`` (0.5);
- ``saturated``: a layer with ``saturated_fraction > saturated_warn`` (0.5).

Each message names the layer and the numbers, and the remedies that address the cause
(He initialisation, ReLU, batch norm, residual connections, a lower learning rate,
gradient clipping); it points at the user's ``fit`` call. The defaults leave healthy
networks alone: a ReLU/He or tanh/Xavier MLP on the digits stays within ``0.2 < r < 1``,
a 10-layer sigmoid stack starts at ``r ≈ 1e-6``. ``warn=False`` records without warning;
``monitor.warnings`` lists the ``(kind, step, message)`` issued in the last ``fit``.

Cost. Absent, nothing: the layers' ``backward_observer`` stays None (one attribute read per
backward). An unmonitored step costs two Python calls (a counter and a finiteness test of
the host loss). A monitored step installs an observer on each Dense layer (removed at
the step's end), which computes on the device: ``Σδ²`` (in float64 where float32 could
underflow or overflow), σ′ from the forward pass's saved tensors (``layer._ctx.saved``) for
the dead/saturation counts, a copy of W before the step, ``‖∂W‖`` and ``‖ΔW‖`` after it;
they reach the host in one transfer (one device synchronisation per monitored step).
``benchmarks/gradient_monitor_cost.py`` measures both on the digits MLP (results in
``benchmarks/results/*/gradient_monitor_cost.md``).

Threads. The observers are the layers' and see every thread's backward passes: they record
only those of the thread that runs the ``fit`` and hand the others to the observer they
replaced (if any). A monitor serves one ``fit`` at a time; each ``fit`` starts its records,
warnings and step count afresh. In a data-parallel ``fit`` it runs on rank 0 only
(``rank_zero_only``): δ statistics are those of rank 0's share of the batch; ``grad_norm``
(after the allreduce) and ``update_ratio`` are the global ones. The observers are removed at
the end of each monitored step and in ``on_train_end``; should ``fit`` be left by an
exception in the middle of a monitored step (one that ``fit`` does not report to its
callbacks), the observers left behind remove themselves at the layers' next backward pass
(they find the parameters no longer held by that ``fit``), and
:meth:`GradientMonitor.detach` removes them at once.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import threading
import warnings

import numpy as np

from backprop import checks
from backprop import kernels as K
from backprop.backend import get_array_module, to_numpy
from backprop.callbacks import Callback
from backprop.init import RELU_LIKE
from backprop.kernels.activations import RECORDS

__all__ = ["GradientHealthWarning", "GradientMonitor", "STATS"]

#: The per-layer statistics of a monitored step, in the order of ``records``.
STATS = ("delta_rms", "grad_norm", "update_ratio", "dead_fraction", "saturated_fraction")

#: Activations whose saturation is measured (bounded, squashing σ, σ′ → 0 at both ends):
#: the records marked ``saturating`` in ``backprop.kernels.activations``.
SATURATING = frozenset(name for name, r in RECORDS.items() if r.saturating)

_KINDS = ("vanish", "explode", "nonfinite", "dead", "saturated")
_UNSET = object()


class GradientHealthWarning(UserWarning):
    """The gradients of a ``fit`` look unhealthy (vanishing, exploding, non-finite, dead or
    saturated units); issued by :class:`GradientMonitor`."""


# -- advice --------------------------------------------------------------------------------
_ADVICE = {
    "vanish": (
        "the early layers barely learn. Use ReLU-like activations with He initialisation "
        "(Dense(..., activation='relu') uses He by default), add BatchNorm1d after the hidden "
        "Dense layers, or add residual connections (bp.Residual([...])) so that the gradient "
        "has a path around the layers; with sigmoid/tanh, keep the stack shallow"),
    "explode": (
        "lower the learning rate, clip the gradients (fit(..., clip_grad_norm=1.0); "
        "--clip-grad-norm on the command line), check the initialisation scale (He for ReLU, "
        "Xavier for tanh/sigmoid: the defaults), and consider BatchNorm1d or residual "
        "connections in a deep stack"),
    "nonfinite": (
        "lower the learning rate, clip the gradients (fit(..., clip_grad_norm=1.0)), check "
        "the inputs for NaN/inf and very large values (standardise them), and check a custom "
        "loss for log(0) or division by zero"),
    "dead": (
        "these ReLU units output 0 on every row, so their weights get no gradient. Lower the "
        "learning rate, use He initialisation (the default for ReLU), add BatchNorm1d before "
        "the activation, or use leaky_relu/elu, whose slope is never 0"),
    "saturated": (
        "σ′ is near 0 for most rows, so little gradient passes these units. Standardise the "
        "inputs, use Xavier initialisation (the default for sigmoid/tanh), add BatchNorm1d "
        "before the activation, or use ReLU with He initialisation"),
}


def _stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside backprop (the
    user's ``fit`` call)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the caller: warn's stacklevel=1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# -- argument checks -------------------------------------------------------------------------
def _ratio_below_one(name: str, value) -> float:
    value = checks.positive(f"GradientMonitor: {name}", value)
    if value >= 1.0:
        raise ValueError(f"GradientMonitor: {name} must be a number in (0, 1); got {value!r}")
    return value


def _ratio_above_one(name: str, value) -> float:
    value = checks.positive(f"GradientMonitor: {name}", value)
    if value <= 1.0:
        raise ValueError(f"GradientMonitor: {name} must be a finite number > 1; got {value!r}")
    return value


def _fraction(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"GradientMonitor: {name} must be a number in [0, 1]; got {value!r} "
                        f"({type(value).__name__})")
    if not 0.0 <= float(value) <= 1.0:  # (NaN fails too)
        raise ValueError(f"GradientMonitor: {name} must be a number in [0, 1]; got {value!r}")
    return float(value)


# -- layers ----------------------------------------------------------------------------------
def _dense_layers(model) -> list:
    """``(path, layer)`` for each Dense layer below ``model``, in forward order."""
    from backprop.layers import Dense

    found = []

    def walk(layer, path):
        if isinstance(layer, Dense):
            found.append((path or "dense", layer))
        for name, child in layer.children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return found


class _Layer:
    """One monitored Dense layer: its path, what is measured, and the step's buffers."""

    __slots__ = ("path", "layer", "act", "dead", "saturating", "keys", "observer",
                 "installed", "previous", "snapshot", "ones", "slope", "pending")

    def __init__(self, monitor, path, layer):
        self.path, self.layer = path, layer
        act = layer.activation.kernel
        elementwise = act in K.ACTIVATIONS
        self.act = act
        self.dead = elementwise and act in RELU_LIKE
        self.saturating = elementwise and act in SATURATING
        stats = ["delta_rms", "grad_norm", "update_ratio"]
        if self.dead:
            stats.append("dead_fraction")
        if self.saturating:
            stats.append("saturated_fraction")
        #: (log key, statistic) of the epoch logs
        self.keys = [(f"grad/{path}/{stat}", stat) for stat in stats]
        self.observer = _Observer(monitor, self)
        self.installed, self.previous = False, None
        self.snapshot = self.ones = self.slope = None
        self.pending = None

    def install(self) -> None:
        layer = self.layer
        self.previous = vars(layer).get("backward_observer", _UNSET)
        layer.backward_observer = self.observer
        self.installed = True

    def remove(self) -> None:
        """Put back the observer there was before. When another observer was set over ours
        since (it calls ours, which hands on to the previous one), ours stays, inert, until
        that one restores it: then its next call removes it."""
        layer = self.layer
        if vars(layer).get("backward_observer") is not self.observer:
            return
        if self.previous is _UNSET:
            del layer.backward_observer
        else:
            layer.backward_observer = self.previous
        self.installed, self.previous = False, None


class _Observer:
    """The ``backward_observer`` a monitored step puts on a layer: hands every call to the
    observer it replaced (if any), and measures δ when its monitor is armed and the call
    comes from the fit's thread; removes itself when called outside a monitored step or
    after its ``fit`` ended."""

    __slots__ = ("monitor", "entry")

    def __init__(self, monitor, entry):
        self.monitor, self.entry = monitor, entry

    def __call__(self, layer, delta):
        monitor, entry = self.monitor, self.entry
        previous = entry.previous
        if previous is not None and previous is not _UNSET:
            previous(layer, delta)
        # left behind by a fit that was left mid-step: the fit no longer holds the parameters
        if not monitor._armed or entry.layer.W._trainer is not monitor._owner:
            entry.remove()
            return
        if threading.get_ident() == monitor._thread:
            with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are measured
                monitor._measure(entry, delta)


def _sumsq(xp, a):
    """``Σ a²``: a float on the host for NumPy arrays, a 0-d float64 device array otherwise
    (read with the step's other statistics in one transfer). The sum is float64 wherever
    float32 could be wrong: on the host a float32 dot product is redone in float64 when it
    falls outside [1e-30, 1e30] (the squares of a vanishing δ underflow, those of an
    exploding one overflow); on a GPU the cast costs less than the decision."""
    flat = a.reshape(-1)
    if xp is np:
        total = float(np.dot(flat, flat))
        if flat.dtype == np.float64 or 1e-30 < total < 1e30:
            return total
        flat = flat.astype(np.float64)
        return float(np.dot(flat, flat))
    if flat.dtype != np.float64:
        flat = flat.astype(np.float64)
    return xp.dot(flat, flat)


def _to_host(xp, values) -> list[float]:
    """``values`` (floats, ints and 0-d device arrays) as floats, in one transfer."""
    if xp is np:
        return [float(v) for v in values]
    return [float(v) for v in to_numpy(xp.stack([xp.asarray(v, dtype=np.float64)
                                                  for v in values]))]


# ---------------------------------------------------------------------------------------------
class GradientMonitor(Callback):
    """Per-layer gradient statistics every ``every`` steps, recorded in ``records``, the
    epoch logs and the gradient-flow plot, with :class:`GradientHealthWarning` when the
    gradients vanish or explode (the module docstring has the statistics, the log keys, the
    warnings and the cost).

    Arguments (checked here: ``TypeError``/``ValueError``):

    - ``every``: monitor steps 0, every, 2·every, ... of each fit (a positive int);
    - ``vanish_ratio`` (1e-3, in (0, 1)): warn ``vanish`` when ``delta_rms`` of the first
      Dense layer is below ``vanish_ratio`` × that of the last;
    - ``explode_ratio`` (1e3, > 1): warn ``explode`` when it is above ``explode_ratio`` ×;
    - ``explode_factor`` (1e3, > 1): warn ``explode`` when a step's largest ``delta_rms`` is
      above ``explode_factor`` × the first monitored step's;
    - ``explode_norm`` (1e6, > 0, or None): warn ``explode`` when the total gradient norm is
      above it;
    - ``dead_warn``, ``saturated_warn`` (0.5, in [0, 1]): warn when a layer's dead or
      saturated fraction is above it;
    - ``saturation_threshold`` (0.01, > 0): a row of a unit is saturated when ``σ′`` is
      below it; ``saturation_rows`` (0.5, in [0, 1)): a unit is saturated when more than
      this fraction of the rows are;
    - ``patience`` (1): monitored steps in a row a condition must hold before it warns;
    - ``warn`` (True): False records without warning.
    """

    rank_zero_only = True  # δ of rank 0's rows; plots and warnings once per job
    adds_logs = True

    def __init__(self, every: int = 100, *, vanish_ratio: float = 1e-3,
                 explode_ratio: float = 1e3, explode_factor: float = 1e3,
                 explode_norm: float | None = 1e6, dead_warn: float = 0.5,
                 saturated_warn: float = 0.5, saturation_threshold: float = 0.01,
                 saturation_rows: float = 0.5, patience: int = 1, warn: bool = True):
        self.every = checks.integer("GradientMonitor: every", every, minimum=1)
        self.vanish_ratio = _ratio_below_one("vanish_ratio", vanish_ratio)
        self.explode_ratio = _ratio_above_one("explode_ratio", explode_ratio)
        self.explode_factor = _ratio_above_one("explode_factor", explode_factor)
        self.explode_norm = None if explode_norm is None else \
            checks.positive("GradientMonitor: explode_norm", explode_norm)
        self.dead_warn = _fraction("dead_warn", dead_warn)
        self.saturated_warn = _fraction("saturated_warn", saturated_warn)
        self.saturation_threshold = checks.positive("GradientMonitor: saturation_threshold",
                                                    saturation_threshold)
        self.saturation_rows = _fraction("saturation_rows", saturation_rows)
        if self.saturation_rows >= 1.0:
            raise ValueError("GradientMonitor: saturation_rows must be below 1 (a unit is "
                             "saturated on more than this fraction of the rows); got "
                             f"{saturation_rows!r}")
        self.patience = checks.integer("GradientMonitor: patience", patience, minimum=1)
        self.warn = checks.flag("GradientMonitor: warn", warn)
        self.records: list[dict] = []
        self.warnings: list[tuple[str, int, str]] = []
        self._layers: list[_Layer] = []
        self._armed = False
        self._thread = self._owner = None
        self._step = 0
        self._epoch = 0

    # -- public helpers ------------------------------------------------------------------------
    @property
    def layer_paths(self) -> list[str]:
        """The paths of the monitored layers, first to last (known once ``fit`` started)."""
        return [e.path for e in self._layers]

    def series(self, stat: str = "delta_rms"):
        """``(steps, {path: values})``: ``stat`` of each layer at each monitored step, as
        float64 arrays (NaN where it does not apply)."""
        if stat not in STATS:
            raise ValueError(f"GradientMonitor.series: unknown statistic {stat!r}; expected one "
                             f"of {list(STATS)}")
        steps = np.array([r["step"] for r in self.records], dtype=np.int64)
        values = {p: np.array([r["layers"][p][stat] for r in self.records], dtype=np.float64)
                  for p in self.layer_paths}
        return steps, values

    def plot(self, path=None, *, ax=None, stat: str = "delta_rms", title: str | None = None,
             legend: bool = True):
        """The gradient-flow plot: ``stat`` (``delta_rms`` by default) of each layer over the
        monitored steps, log y axis, layers coloured from the first (dark) to the last
        (light). Draws on ``ax`` when given (a matplotlib Axes), else on a new figure;
        writes it to ``path`` (PNG, or any format matplotlib infers from the suffix) when
        given; ``legend=False`` leaves the legend out (for panels side by side). Returns the
        Axes. Needs matplotlib (imported here, not before)."""
        try:
            import matplotlib
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("GradientMonitor.plot needs matplotlib: pip install matplotlib "
                              "(the statistics are in monitor.records without it)") from None
        if not self.records:
            raise ValueError("GradientMonitor.plot: no monitored step recorded yet; plot after "
                             "fit(..., callbacks=[monitor]) has run at least one step")
        steps, values = self.series(stat)
        fig = None
        if ax is None:
            fig = Figure(figsize=(7, 4.5), dpi=110)
            ax = fig.add_subplot()
        colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(values), 1)))
        for colour, (name, v) in zip(colours, values.items()):
            v = np.where(v > 0, v, np.nan)  # a log axis cannot show 0
            ax.plot(steps, v, color=colour, lw=1.4, label=name,
                    marker="o" if len(steps) < 20 else None, ms=3)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel({"delta_rms": "RMS of δ = ∂L/∂Z"}.get(stat, stat))
        ax.grid(True, which="major", alpha=0.3)
        if legend:
            ax.legend(title="layer", fontsize="x-small", title_fontsize="small",
                      ncol=2 if len(values) > 6 else 1, loc="best")
        ax.set_title(title if title is not None else f"gradient flow ({stat} per layer)")
        target = fig if fig is not None else ax.figure
        if path is not None:
            target.tight_layout()
            target.savefig(os.fspath(path))
        return ax

    def detach(self) -> None:
        """Remove the observers this monitor put on the layers (``fit`` does it; for the
        case where ``fit`` was left by an exception in the middle of a monitored step)."""
        self._armed = False
        for entry in self._layers:
            if entry.installed:
                entry.remove()

    # -- the callback ---------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.detach()  # a previous fit left by an exception mid-step
        self._layers = [_Layer(self, p, layer) for p, layer in _dense_layers(self.model)]
        if not self._layers:
            raise ValueError("GradientMonitor: the model has no Dense layer to monitor")
        self.records, self.warnings = [], []
        self._warned: set[str] = set()
        self._streak = dict.fromkeys(_KINDS, 0)
        self._reference = None  # largest delta_rms of the first monitored step
        self._step, self._epoch, self._thread = 0, 0, threading.get_ident()
        # the claim of fit on the parameters (backprop.concurrency): gone once fit returns
        self._owner = self._layers[0].layer.W._trainer
        self._sums: dict[str, list] = {}
        keys = self.params.get("log_keys")
        if keys is not None:
            for key in self._log_keys():
                if key not in keys:
                    keys.append(key)

    def _log_keys(self) -> list[str]:
        keys = [k for e in self._layers for k, _ in e.keys]
        if len(self._layers) > 1:
            keys.append("grad/depth_ratio")
        return keys

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._sums = {}  # log key -> [sum, count] over the epoch's monitored steps

    def on_batch_begin(self, batch, logs=None):
        if self._step % self.every:
            return
        self._arm()

    def on_batch_end(self, batch, logs=None):
        step = self._step
        self._step = step + 1
        loss = (logs or {}).get("loss")
        if self._armed:
            self._disarm()
            self._record(step, batch, loss, logs or {})
        elif loss is not None and not math.isfinite(loss):
            self._warn("nonfinite", step,
                       f"the loss became {loss} at epoch {self._epoch + 1}, step {batch + 1} "
                       "(a step the monitor did not look inside; every=1 shows which layer "
                       "went first)")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        sums = self._sums
        for key in self._log_keys():
            total, count = sums.get(key, (0.0, 0))
            logs[key] = total / count if count else math.nan

    def on_train_end(self, logs=None):
        self.detach()

    # -- a monitored step -----------------------------------------------------------------------
    def _arm(self) -> None:
        if self._armed:  # a step that never ended (a loop other than fit's): start again
            self._disarm()
        xp = get_array_module(self._layers[0].layer.W.data)
        for entry in self._layers:
            W, snap = entry.layer.W.data, entry.snapshot
            if snap is None or type(snap) is not type(W) or snap.shape != W.shape or \
                    snap.dtype != W.dtype:
                snap = entry.snapshot = xp.empty_like(W)
            xp.copyto(snap, W)
            entry.pending = None
            entry.install()
        self._armed = True

    def _disarm(self) -> None:
        self._armed = False
        for entry in self._layers:
            if entry.installed:
                entry.remove()

    def _measure(self, entry, delta) -> None:
        """In the observer: device statistics of δ (its buffer is overwritten later in the
        backward pass, so nothing is kept that aliases it)."""
        xp = get_array_module(delta)
        d2 = delta if delta.ndim == 2 else delta.reshape(delta.shape[0], -1)
        dead = sat = None
        if entry.dead or entry.saturating:
            z, a = entry.layer._ctx.saved[1:3]
            n, m = d2.shape
            if entry.ones is None or type(entry.ones) is not type(d2) or \
                    entry.ones.shape[0] < n or entry.ones.shape[1] != m or \
                    entry.ones.dtype != d2.dtype:
                entry.ones = xp.ones((n, m), dtype=d2.dtype)
                entry.slope = xp.empty((n, m), dtype=d2.dtype)
            ones, slope = entry.ones[:n], entry.slope[:n]
            K.bias_act_backward(ones, a, z, entry.act, entry.layer.activation.alpha, slope,
                                None, False)  # σ′ elementwise (δ of an all-ones dA)
            if entry.dead:
                dead = m - xp.count_nonzero(slope.any(axis=0))
            if entry.saturating:
                low = (slope < self.saturation_threshold).sum(axis=0)
                sat = xp.count_nonzero(low > self.saturation_rows * n)
        entry.pending = (_sumsq(xp, d2), d2.size, dead, sat, d2.shape[1])

    def _record(self, step, batch, loss, logs) -> None:
        skipped = loss is not None and not math.isfinite(loss)
        values, xp = [], get_array_module(self._layers[0].layer.W.data)
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are measured
            for entry in self._layers:
                W, snap = entry.layer.W, entry.snapshot
                values += [_sumsq(xp, W.grad), _sumsq(xp, snap)]
                values.append(_sumsq(xp, xp.subtract(W.data, snap, out=snap)))  # ‖ΔW‖²
                if entry.pending is not None:
                    sumsq, _, dead, sat, _ = entry.pending
                    values += [sumsq, 0 if dead is None else dead, 0 if sat is None else sat]
                else:
                    values += [0.0, 0, 0]
            host = _to_host(xp, values)
        layers, nonfinite = {}, []
        for i, entry in enumerate(self._layers):
            g2, w2, dw2, d2, dead, sat = host[6 * i:6 * i + 6]
            stats = dict.fromkeys(STATS, math.nan)
            stats["grad_norm"] = math.sqrt(g2)  # (inf and NaN stay so)
            if not skipped:
                stats["update_ratio"] = math.sqrt(dw2 / w2) if w2 > 0 else math.nan
            measured = entry.pending is not None
            if measured:
                size, units = entry.pending[1], entry.pending[4]
                stats["delta_rms"] = math.sqrt(d2 / size)
                if entry.dead:
                    stats["dead_fraction"] = dead / units
                if entry.saturating:
                    stats["saturated_fraction"] = sat / units
            if not math.isfinite(g2) or measured and not math.isfinite(d2):
                nonfinite.append(entry.path)
            entry.pending = None
            layers[entry.path] = stats
        first, last = layers[self._layers[0].path], layers[self._layers[-1].path]
        depth = first["delta_rms"] / last["delta_rms"] \
            if len(layers) > 1 and last["delta_rms"] > 0 else math.nan
        record = {"step": step, "epoch": self._epoch, "batch": batch,
                  "loss": math.nan if loss is None else float(loss), "depth_ratio": depth,
                  "layers": layers}
        self.records.append(record)
        sums = self._sums
        for entry in self._layers:
            stats = layers[entry.path]
            for key, stat in entry.keys:
                value = stats[stat]
                if not math.isnan(value):
                    acc = sums.setdefault(key, [0.0, 0])
                    acc[0] += value
                    acc[1] += 1
        if not math.isnan(depth):
            acc = sums.setdefault("grad/depth_ratio", [0.0, 0])
            acc[0] += depth
            acc[1] += 1
        self._check(record, loss, nonfinite, logs.get("grad_norm"))

    # -- the checks -------------------------------------------------------------------------------
    def _check(self, record, loss, nonfinite, clip_norm) -> None:
        step, layers = record["step"], record["layers"]
        where = f"epoch {record['epoch'] + 1}, step {record['batch'] + 1}"
        found: dict[str, str] = {}
        loss_bad = loss is not None and not math.isfinite(loss)
        if nonfinite or loss_bad:
            parts = [f"the loss became {loss}"] if loss_bad else []
            if nonfinite:
                parts.append(f"δ or ∂W holds NaN/inf in layer{'s' * (len(nonfinite) > 1)} "
                             f"{', '.join(nonfinite)}")
            found["nonfinite"] = f"{' and '.join(parts)} at {where}"

        depth = record["depth_ratio"]
        names = list(layers)
        if len(names) > 1 and math.isfinite(depth):
            first, last = names[0], names[-1]
            rms_f, rms_l = layers[first]["delta_rms"], layers[last]["delta_rms"]
            if depth < self.vanish_ratio:
                found["vanish"] = (
                    f"the gradients vanish: at {where} the RMS of δ = ∂L/∂Z is {rms_f:.2g} in "
                    f"the first Dense layer ({first}) against {rms_l:.2g} in the last "
                    f"({last}), a ratio of {depth:.2g} (vanish_ratio={self.vanish_ratio:g}; "
                    f"per layer: {_profile(layers)})")
            elif depth > self.explode_ratio:
                found["explode"] = (
                    f"the gradients explode towards the input: at {where} the RMS of δ is "
                    f"{rms_f:.2g} in the first Dense layer ({first}) against {rms_l:.2g} in the "
                    f"last ({last}), a ratio of {depth:.2g} (explode_ratio="
                    f"{self.explode_ratio:g}; per layer: {_profile(layers)})")
        peak = max((s["delta_rms"] for s in layers.values() if math.isfinite(s["delta_rms"])),
                   default=math.nan)
        if math.isfinite(peak) and peak > 0:
            if self._reference is None:
                self._reference = (peak, step)
            elif peak > self.explode_factor * self._reference[0] and "explode" not in found:
                found["explode"] = (
                    f"the gradients grow: at {where} the largest RMS of δ is {peak:.2g}, "
                    f"{peak / self._reference[0]:.2g} times that of step "
                    f"{self._reference[1]} (explode_factor={self.explode_factor:g}; per "
                    f"layer: {_profile(layers)})")
        if self.explode_norm is not None and "explode" not in found:
            total = math.hypot(*(s["grad_norm"] for s in layers.values()))
            if clip_norm is not None and math.isfinite(clip_norm):
                total = max(total, float(clip_norm))
            if math.isfinite(total) and total > self.explode_norm:
                found["explode"] = (f"the gradients explode: at {where} their total norm is "
                                    f"{total:.3g} (explode_norm={self.explode_norm:g})")
        for kind, stat, limit in (("dead", "dead_fraction", self.dead_warn),
                                  ("saturated", "saturated_fraction", self.saturated_warn)):
            worst = max(((s[stat], p) for p, s in layers.items() if math.isfinite(s[stat])),
                        default=None)
            if worst is not None and worst[0] > limit:
                adjective = "dead (σ′ = 0 on every row)" if kind == "dead" else \
                    f"saturated (σ′ < {self.saturation_threshold:g} on most rows)"
                found[kind] = (f"{worst[0]:.0%} of the units of layer {worst[1]} are "
                               f"{adjective} at {where} ({kind}_warn={limit:g})")
        for kind in _KINDS:
            if kind in found:
                self._streak[kind] += 1
                if self._streak[kind] >= (1 if kind == "nonfinite" else self.patience):
                    self._warn(kind, step, found[kind])
            else:
                self._streak[kind] = 0

    def _warn(self, kind, step, what) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        message = f"GradientMonitor: {what}. Advice: {_ADVICE[kind]}."
        self.warnings.append((kind, step, message))
        if self.warn:
            warnings.warn(message, GradientHealthWarning, stacklevel=_stacklevel())

    def __repr__(self) -> str:
        return f"GradientMonitor(every={self.every})"


def _profile(layers: dict) -> str:
    """``"0: 3.1e-01, 1: 8.0e-02, ..."``: δ RMS per layer, for the messages (long stacks
    elided in the middle)."""
    items = [f"{p}: {s['delta_rms']:.1e}" for p, s in layers.items()]
    if len(items) > 8:
        items = [*items[:3], "…", *items[-3:]]
    return ", ".join(items)
