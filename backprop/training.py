"""``fit``, ``evaluate`` and ``predict``: the training loop around explicit backprop.

One step of ``fit`` is exactly::

    optimizer.zero_grad()
    out = model.forward(xb)                  # the model's buffer
    L = loss.forward(out, yb)                # a 0-d device array (no host sync)
    model.backward(loss.backward(), need_input_grad=False)
    r.add_grad(params) for each regularizer; L += Σ r.penalty(params)
    if L is finite: optimizer.step()

On the CPU the loop runs with no more BLAS threads than the model's matrix products pay for
(:mod:`backprop.blas`: one thread for a small MLP, whose products are slower split in two).

Data: ``X``/``y`` (NumPy or CuPy arrays, or anything :func:`backprop.data.as_array`
converts: PyTorch/JAX tensors through DLPack, pandas DataFrames and Series, objects with
``__array__``, nested lists) are converted and validated once, before any step (NaN/inf, label
range, lengths, feature count), then moved to the model's device and dtype once. Each
epoch draws a permutation on the host from ``(seed, epoch)`` only, gathers the data into a
permuted device copy once, and takes batches as contiguous slices of it. So a run is a
pure function of its seed, and resuming at epoch ``k`` (``initial_epoch=k`` with the saved
model and optimizer) reproduces the uninterrupted run exactly.

Loss and metrics accumulate on the device and are read on the host once per epoch (and
when the progress bar refreshes). A non-finite loss is caught before the optimizer step,
so it never damages the weights: on the CPU the step's loss is read directly (a few
hundred nanoseconds); on the GPU it is copied to pinned host memory asynchronously right
after the loss kernel, ``backward`` is queued behind the copy, and the host waits only for
the copy before deciding on ``optimizer.step()`` — the GPU keeps working on ``backward``
meanwhile, so the check costs a few microseconds of latency per step, not a pipeline
drain. The model's buffers that the step's forward pass updated (BatchNorm's running
statistics) are restored as well. ``TerminateOnNaN`` then stops training; without it ``fit``
raises :class:`NonFiniteLossError`.

Arguments are checked before any work: a bad value raises ``TypeError``/``ValueError`` (or
:class:`backprop.data.DataError` for the data) and leaves the model and optimizer as they
were. Threads (:mod:`backprop.concurrency`): ``predict`` and ``evaluate`` may run on one
model from many threads at once; ``fit`` claims the model's parameters and its optimizer for
its run, and raises :class:`~backprop.concurrency.ConcurrentTrainingError` when another
``fit`` holds any of them.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np

from backprop import blas, checks
from backprop.clip import clip_grad_norm, clip_grad_value
from backprop.loss_scaling import GradScaler
from backprop.losses import paired_output
from backprop.precision import PrecisionRequest, autocast
from backprop.precision import resolve as resolve_precision
from backprop import data as bpdata
from backprop import metrics as bpmetrics
from backprop.backend import get_array_module, get_device, use_device
from backprop.callbacks import (
    Callback, CallbackList, History, LearningRateScheduler, ProgressBar,
)
from backprop.concurrency import (ConcurrentTrainingError, exclusive_training, inference_mode,
                                  targets_validated)
from backprop.distributed import abort_on_error, agree, current_group, share

__all__ = ["fit", "evaluate", "predict", "NonFiniteLossError", "make_loss", "make_optimizer",
           "epoch_permutation"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the offending update was not applied."""


# ---------------------------------------------------------------------------------------
# Names -> objects
_OPTIMIZER_NAMES = {"sgd": "SGD", "momentum": "SGD", "rmsprop": "RMSprop", "adam": "Adam",
                    "adamw": "AdamW", "adagrad": "Adagrad"}


def make_loss(loss):
    """A loss object from a name (``backprop.losses.NAMES``: ``mse``, ``mae``/``l1``,
    ``cross_entropy``/``softmax_cross_entropy``, ``bce_with_logits``, ``bce``) or an
    instance (returned as is)."""
    from backprop import losses

    if isinstance(loss, str):
        return losses.get(loss.strip())
    if not (hasattr(loss, "forward") and hasattr(loss, "backward")):
        raise TypeError(f"loss must be a name in {sorted(losses.NAMES)} or a loss object with "
                        f"forward/backward, got {type(loss).__name__}")
    return loss


def make_optimizer(optimizer, params, lr=None, **kwargs):
    """An optimizer from a name (``sgd``, ``momentum`` = SGD(momentum=0.9), ``rmsprop``,
    ``adam``, ``adamw``, ``adagrad``) on ``params``, or an instance (returned as is, its
    ``lr`` set to ``lr`` when given)."""
    _check_optimizer(optimizer, lr)
    if not isinstance(optimizer, str):
        if lr is not None:
            optimizer.lr = lr
        return optimizer
    from backprop import optim

    key = optimizer.strip().lower()
    if key == "momentum":
        kwargs.setdefault("momentum", 0.9)
    if lr is not None:
        kwargs["lr"] = lr
    elif key in ("sgd", "momentum"):
        kwargs["lr"] = 0.01
    return getattr(optim, _OPTIMIZER_NAMES[key])(params, **kwargs)


def _check_optimizer(optimizer, lr) -> None:
    """Raise unless ``optimizer`` is a known name or an optimizer object and ``lr`` is None
    or a finite number >= 0 (checked without building or changing anything)."""
    if isinstance(optimizer, str):
        if optimizer.strip().lower() not in _OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of "
                             f"{sorted(_OPTIMIZER_NAMES)} or an optimizer object")
    elif not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
        raise TypeError(f"optimizer must be a name or an optimizer object, got "
                        f"{type(optimizer).__name__}")
    if lr is not None:
        from backprop.optim import _at_least_zero

        _at_least_zero("lr", lr)


def _target_kind(loss) -> str:
    """What ``y`` must be for this loss: ``labels``, ``binary`` or ``values``."""
    name = type(loss).__name__
    if "CrossEntropy" in name or "NLL" in name:
        return "labels"
    if name.startswith("BCE"):
        return "binary"
    return "values"


def _metric_list(metrics, loss, kind):
    """Fresh metric objects for one call: names are built, Metric objects copied (so that
    two concurrent calls never share an accumulator). A string is one metric name."""
    if isinstance(metrics, str) and metrics == "auto":
        metrics = ["accuracy"] if kind in ("labels", "binary") else []
    elif isinstance(metrics, (str, bpmetrics.Metric)):
        metrics = [metrics]
    elif metrics is None:
        metrics = []
    elif not isinstance(metrics, (list, tuple)):
        raise TypeError(f"metrics must be 'auto', a metric name, a Metric, or a list of "
                        f"those; got {type(metrics).__name__}")
    threshold = 0.0 if "Logits" in type(loss).__name__ else 0.5
    out = [copy.deepcopy(m) if isinstance(m, bpmetrics.Metric) else
           bpmetrics.get(m, threshold=threshold) for m in metrics]
    names = [m.name for m in out]
    if len(set(names)) != len(names) or "loss" in names:
        raise ValueError(f"metric names must be unique and not 'loss', got {names}")
    return out


# ---------------------------------------------------------------------------------------
# The model's device, dtype and shape
def _placement(model):
    params = model.parameters()
    if not params:
        return get_device(), None
    data = params[0].data
    xp = get_array_module(data)
    device = "cpu" if xp is np else f"cuda:{data.device.id}"
    return device, data.dtype


def _n_outputs(model):
    n_in = getattr(model, "in_features", None)
    if n_in is None or not hasattr(model, "output_shape"):
        return None
    shape = model.output_shape((None, n_in))
    return None if shape is None or len(shape) != 2 else shape[1]


def _prepare(model, X, y, kind, name, expected_names=None):
    """Convert to arrays (:func:`backprop.data.as_array`), check a DataFrame's column names
    against ``expected_names`` (default: the model's ``feature_names_in_``), validate on the
    host once, then move to the model's device and dtype once."""
    X, names = bpdata._convert(X, name, "X")
    if expected_names is None:
        expected_names = getattr(model, "feature_names_in_", None)
    bpdata.check_feature_names(expected_names, names, name)
    X, y = bpdata.validate(X, y, n_features=getattr(model, "in_features", None), target=kind,
                           n_outputs=_n_outputs(model), name=name)
    return _place(model, X, y, kind)


def _source_names(source):
    """The feature names of a data source that has them (a CSVSource's columns), or None."""
    from backprop.sources import CSVSource

    if isinstance(source, CSVSource):
        return list(source.features)
    return None


def _place(model, X, y, kind):
    """Validated ``(X, y)`` as C-contiguous arrays on the model's device, X in its dtype,
    class labels as int64."""
    from backprop.backend import asarray

    device, dtype = _placement(model)
    X = asarray(X, dtype=dtype, device=device)
    if y is not None:
        as_labels = kind == "labels" and y.ndim == 1
        y = asarray(y, dtype=np.int64 if as_labels else dtype, device=device)
        xp = get_array_module(y)
        y = xp.ascontiguousarray(y)
    return get_array_module(X).ascontiguousarray(X), y


def _check_source(source, model, kind, group) -> int | None:
    """Check a data source before training, chunk by chunk; returns its number of rows
    (None when unknown). On several ranks a random-access source is checked in stripes,
    each rank reading every ``world``-th chunk (the agreement of ``fit`` then reports a
    bad row found by any rank). An ``IterableSource`` is not read here (it may be readable
    once only): each batch is checked as it arrives."""
    from backprop import sources

    if isinstance(source, sources.IterableSource):
        return None
    rank, world = (0, 1) if group is None else (group.rank, group.size)
    # chunks of about 8 MB of features, so that the check's memory stays small
    chunk_rows = max(256, 2**23 // (8 * max(source.n_features, 1)))
    n = sources.validate_source(source, n_features=getattr(model, "in_features", None),
                                target=kind, n_outputs=_n_outputs(model), rank=rank,
                                world=world, chunk_rows=chunk_rows)
    return source.n_rows if source.n_rows is not None else n


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffling order of ``epoch``: a function of ``(seed, epoch)`` only, so a run
    resumed at any epoch sees the same batches as the uninterrupted run."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class _FiniteGuard:
    """Reads each step's loss on the host before the optimizer step (see the module
    docstring): directly on the CPU, through an async copy to pinned memory on the GPU."""

    def __init__(self, xp):
        self._xp, self._gpu = xp, xp is not np
        self._L = self._host = None

    def watch(self, L) -> None:
        """Start reading ``L`` (call right after the loss, before backward is queued)."""
        self._L = L
        if self._gpu:
            if self._host is None or self._host.dtype != L.dtype:
                import cupyx

                self._host = cupyx.empty_pinned(L.shape, dtype=L.dtype)
                self._event = self._xp.cuda.Event(block=False, disable_timing=True)
            stream = self._xp.cuda.get_current_stream()
            L.get(stream=stream, out=self._host, blocking=False)
            self._event.record(stream)

    def value(self) -> float:
        if self._gpu:
            self._event.synchronize()
            return float(self._host)
        return float(self._L)


# ---------------------------------------------------------------------------------------
def fit(model, X, y=None, *, loss, optimizer="adam", lr=None, epochs: int = 1, batch_size: int = 32,
        shuffle: bool = True, validation_data=None, validation_split: float = 0.0,
        metrics="auto", callbacks=None, seed: int | None = None, verbose: int = 1,
        initial_epoch: int = 0, scheduler=None, drop_last: bool = False,
        clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
        precision: str | None = None) -> History:
    """Train ``model`` on ``(X, y)`` for epochs ``initial_epoch .. epochs-1``.

    ``X`` is an array (``y`` its targets) or a data source that does not need to fit in
    memory, with its own targets (``y`` None). An array is anything
    :func:`backprop.data.as_array` converts: a NumPy or CuPy array, a tensor with
    ``__dlpack__`` (PyTorch, JAX; shared, not copied, when its dtype and device are the
    model's), a pandas DataFrame or Series, an object with ``__array__``, nested lists.
    A DataFrame with str column names records them in ``model.feature_names_in_`` (when
    the model has none yet; saved in checkpoints), and later DataFrames given to ``fit``,
    ``evaluate``, ``predict`` and ``model(x)`` must have these columns in this order
    (plain arrays are not checked). A data source is a
    :class:`backprop.sources.DataSource` (``NpySource``, ``ShardedNpySource``,
    ``CSVSource``, ``IterableSource``), or the path of an ``.npy`` file or of a directory
    of ``.npy`` shards. A source is checked chunk by chunk before the first step (an
    ``IterableSource``, which may be readable once only, batch by batch as it is read), and
    read batch by batch by a background thread one batch ahead of training; a random-access
    source is shuffled exactly as arrays in memory are, so both train alike.

    - ``loss``: a loss object or name (``"mse"``, ``"cross_entropy"``, ``"bce_with_logits"``...).
    - ``optimizer``: an optimizer object or name (``"adam"``, ``"sgd"``...) built with ``lr``.
    - ``validation_data=(Xv, yv)`` or ``validation_split`` (the last fraction of the rows,
      taken before shuffling) adds ``val_loss`` and ``val_<metric>`` to the logs.
    - ``metrics``: names or :class:`backprop.metrics.Metric` objects; ``"auto"`` is
      ``["accuracy"]`` for classification losses and none for regression.
    - ``seed``: the shuffling seed (drawn at random when None, and recorded in
      ``history.params["seed"]``); the permutation of epoch ``e`` depends on ``(seed, e)``.
    - ``scheduler``: a :mod:`backprop.schedules` scheduler stepped after every epoch
      (it, and any ``LearningRateScheduler`` callback, runs before the other callbacks).
    - ``verbose``: 0 silent, 1 a progress bar on a terminal (one line per epoch elsewhere),
      2 one line per epoch.
    - ``drop_last``: skip the last incomplete batch of each epoch.
    - ``clip_grad_value``, ``clip_grad_norm``: after backward (and the regularizers'
      gradients; on several ranks, after the gradient sum), before the optimizer step, clamp
      every gradient element to ``[-v, v]``, then scale the gradients so that their total
      L2 norm is at most ``clip_grad_norm`` (:mod:`backprop.clip`, PyTorch's
      ``clip_grad_value_``/``clip_grad_norm_``). With ``clip_grad_norm`` each step's norm
      before clipping is in the batch logs as ``grad_norm``.
    - ``precision``: ``"float32"`` (the model's own dtype throughout), ``"bf16-mixed"`` or
      ``"fp16-mixed"`` (float32 master weights, low-precision matrix products where they
      pay: :mod:`backprop.precision`), or a :class:`~backprop.precision.PrecisionRequest`
      (its thresholds, emulation); None reads ``$BACKPROP_PRECISION`` (default
      float32). A mixed precision that cannot run fast here warns once and trains in
      float32; ``history.params["precision"]`` says what ran. ``fp16-mixed`` scales the loss
      dynamically (:class:`backprop.loss_scaling.GradScaler`: a step whose gradients
      overflow is skipped, and ``loss_scale`` is in the batch and epoch logs).

    Returns a :class:`~backprop.callbacks.History`. Raises :class:`backprop.data.DataError`
    for unusable data before any step, and :class:`NonFiniteLossError` when the loss turns
    NaN/inf (the update is skipped) unless a ``TerminateOnNaN`` callback stops the run.
    """
    setup = _DistributedSetup(current_group())
    with setup:
        loss = make_loss(loss)
        kind = _target_kind(loss)
        _check_optimizer(optimizer, lr)
        epochs = checks.integer("epochs", epochs, minimum=0)
        initial_epoch = checks.integer("initial_epoch", initial_epoch, minimum=0)
        batch_size = checks.integer("batch_size", batch_size, minimum=1)
        if initial_epoch > epochs:
            raise ValueError(f"initial_epoch={initial_epoch} is after the last epoch (epochs="
                             f"{epochs}): training runs epochs initial_epoch .. epochs-1")
        shuffle, drop_last = checks.flag("shuffle", shuffle), checks.flag("drop_last", drop_last)
        if checks.integer("verbose", verbose, minimum=0) > 2:
            raise ValueError(f"verbose must be 0, 1 or 2; got {verbose!r}")
        if seed is not None:
            seed = checks.integer("seed", seed, minimum=0)
        clip = (None if clip_grad_value is None else
                checks.positive("clip_grad_value", clip_grad_value),
                None if clip_grad_norm is None else
                checks.positive("clip_grad_norm", clip_grad_norm))
        callbacks = _callback_list(callbacks)
        validation_split = checks.fraction("validation_split", validation_split)
        if validation_data is not None and validation_split:
            raise ValueError("give validation_data or validation_split, not both")
        if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                            or len(validation_data) != 2):
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        from backprop import sources

        source = sources.as_source(X)
        if source is not None:
            if y is not None:
                raise ValueError("fit(source, y): a data source carries its own targets; pass "
                                 "y=None (or arrays X and y)")
            if validation_split:
                raise ValueError("validation_split takes the last rows of arrays in memory; "
                                 "with a data source, pass validation_data=(X_val, y_val)")
            names = _source_names(source)
        else:
            if y is None and kind != "any":
                raise bpdata.DataError(f"training data: y is None, but {type(loss).__name__} "
                                       "needs targets: pass fit(X, y, ...) with one target per "
                                       "row of X")
            # any array type in (tensors, DataFrames, lists), converted once, here: the
            # split below slices arrays
            X, names = bpdata._convert(X, "training data", "X")
            if y is not None:
                y = bpdata.as_array(y, name="training data", what="y")
        fitted_names = getattr(model, "feature_names_in_", None)
        bpdata.check_feature_names(fitted_names, names, "training data")
        expected_names = fitted_names if fitted_names is not None else names
        if validation_split:
            n_all = len(X)
            n_val = int(round(n_all * validation_split))
            if n_val < 1 or n_val >= n_all:
                raise ValueError(f"validation_split={validation_split} leaves {n_val} of {n_all} "
                                 "rows for validation; choose a split that leaves both parts "
                                 "non-empty")
            validation_data = (X[n_all - n_val:], y[n_all - n_val:])
            X, y = X[:n_all - n_val], y[:n_all - n_val]
        if seed is None:
            seed = int(np.random.default_rng().integers(2**63))
        request = _precision_request(model, precision)

        device, _ = _placement(model)
        # on the CPU, no more BLAS threads than the model's matrix products pay for (blas.py)
        rows_per_rank = -(-batch_size // setup.world)
        largest = blas.largest_product(model, rows_per_rank) if request is None else \
            blas.SINGLE_THREADED_MACS + 1  # mixed precision: see Sequential._blas_cap
        threads = blas.threads_for(largest) if device == "cpu" else contextlib.nullcontext()
        with use_device(device), targets_validated():
            if source is None:
                Xd, yd = _prepare(model, X, y, kind, "training data")
                n = len(Xd)
            else:
                Xd, yd = None, None
                n = _check_source(source, model, kind, setup.group)
            if n is not None:
                _check_batch_rows(model, n, batch_size, drop_last, setup.world)
            val = None
            if validation_data is not None:
                val = _prepare(model, *validation_data, kind, "validation data",
                               expected_names)
            metric_objs = _metric_list(metrics, loss, kind)
            val_metrics = [copy.deepcopy(m) for m in metric_objs]
            params = model.parameters()
            claim = None if isinstance(optimizer, str) else optimizer
            with exclusive_training(params, claim), inference_mode(False), threads, \
                    setup.holding_group():
                optimizer = make_optimizer(optimizer, params, lr=lr)
                trainer = _Trainer(model, loss, optimizer, metric_objs, val_metrics, Xd, yd,
                                   val, batch_size, shuffle, drop_last, seed, setup.group,
                                   source=source, kind=kind, clip=clip, precision=request)
                if fitted_names is None and names is not None:  # every check passed
                    model.feature_names_in_ = list(names)
                with setup.training(), autocast(request, enabled=request is not None):
                    return trainer.run(epochs, initial_epoch, callbacks, scheduler, verbose)


def _precision_request(model, precision):
    """The :class:`~backprop.precision.PrecisionRequest` ``fit`` trains under, or None for
    the model's own dtype (also where a mixed precision falls back to float32 here)."""
    name = resolve_precision(precision)  # also checks a PrecisionRequest's name
    if name == "float32":
        return None
    params = model.parameters()
    if not params:
        return None
    dtype = params[0].data.dtype
    if dtype != np.float32:
        raise ValueError(f"precision={name!r} needs a float32 model (float32 master weights, "
                         f"low-precision products); this model's parameters are {dtype}: "
                         "build it with dtype='float32' (or BACKPROP_DTYPE=float32), or train "
                         "with precision='float32'")
    request = precision if isinstance(precision, PrecisionRequest) else PrecisionRequest(name)
    return request if request.policy(params[0].data) is not None else None


class _DistributedSetup:
    """How a ``fit`` on a process group of several ranks starts and fails
    (:mod:`backprop.distributed`): an error before training is reported to every rank, so
    all of them raise (the failing rank its own error, the others a ``DistributedError``
    naming it) and none waits in a collective; once every rank has agreed to start, an error
    on one rank ends the whole job (MPI abort), except ``NonFiniteLossError``, which every
    rank raises at the same step (it is decided from the globally reduced loss). On one
    process all of this does nothing."""

    def __init__(self, group):
        self.group = group if group is not None and group.size > 1 else None
        self.world = 1 if self.group is None else self.group.size
        self._reported = False

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.group is not None and exc is not None and not self._reported:
            self._reported = True
            agree(self.group, exc)
        return False

    @contextlib.contextmanager
    def holding_group(self):
        """Hold the group: its collectives are made by one fit at a time."""
        if self.group is None:
            yield
            return
        if not self.group.lock.acquire(blocking=False):
            raise ConcurrentTrainingError(
                "another fit() in this process is training on the process group; a group's "
                "collectives must run in the same order on every rank, so one data-parallel "
                "fit runs at a time per process")
        try:
            yield
        finally:
            self.group.lock.release()

    @contextlib.contextmanager
    def training(self):
        """Agree to start (raises when another rank failed), then train under abort."""
        if self.group is None:
            yield
            return
        self._reported = True  # from here on, a failure is not reported by agreement
        agree(self.group, None)
        with abort_on_error(self.group, consistent=(NonFiniteLossError,)):
            yield


def _callback_list(callbacks) -> list:
    """``callbacks`` (None, a Callback, or a list of them) as a new list."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of Callback objects; got "
                        f"{type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}] is a {type(cb).__name__}, not a "
                            "backprop.callbacks.Callback (subclass Callback to write one)")
    return list(callbacks)


def _check_batch_rows(model, n: int, batch_size: int, drop_last: bool, world: int = 1) -> None:
    """Raise before the first step when a layer that needs several rows per batch in
    training (``Layer.min_batch_rows``, e.g. BatchNorm1d's variance) would get fewer: the
    failure would otherwise come mid-epoch, after some updates were applied. With ``world``
    ranks, what counts is the smallest rank's share of the smallest batch."""
    need, who = 1, None
    for layer in model.modules():
        rows = getattr(layer, "min_batch_rows", 1)
        if rows > need:
            need, who = rows, layer
    if who is None:
        return
    size = min(batch_size, n)
    smallest = size if drop_last or n % size == 0 else n % size
    per_rank = smallest // world
    if per_rank >= need:
        return
    if world > 1:
        raise ValueError(f"{who!r} needs at least {need} rows per batch on every rank in "
                         f"training, but {n} rows in global batches of {size} on {world} ranks "
                         f"give a batch of {smallest} row(s), of which some rank gets "
                         f"{per_rank}: use batches of at least {need * world} rows (and "
                         "drop_last=True if the last one is smaller)")
    if smallest == n:
        raise ValueError(f"{who!r} needs at least {need} rows per batch in training, but the "
                         f"training data has {n} row(s): use more data")
    raise ValueError(f"{who!r} needs at least {need} rows per batch in training, but {n} rows "
                     f"in batches of {size} leave a last batch of {smallest} row(s) in every "
                     "epoch: pass drop_last=True, or choose a batch_size that does not leave "
                     f"{smallest} row(s) over")


def _share_of(data, group):
    """This rank's contiguous share of the rows of ``(X, y)``."""
    lo, hi = share(len(data[0]), group.rank, group.size)
    return data[0][lo:hi], data[1][lo:hi]


class _Trainer:
    """The state of one ``fit`` call (the loop itself is :meth:`run`). On a process group of
    several ranks, ``dp`` (:class:`backprop.data_parallel.DataParallel`) makes the
    collectives, and each step runs :meth:`_dp_step` on this rank's share of the batch."""

    def __init__(self, model, loss, optimizer, metrics, val_metrics, X, y, val, batch_size,
                 shuffle, drop_last, seed, group=None, source=None, kind="any",
                 clip=(None, None), precision=None):
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.metrics, self.val_metrics = metrics, val_metrics
        self.X, self.y, self.source, self.kind = X, y, source, kind
        self.n = len(X) if source is None else source.n_rows  # None: a stream of unknown size
        self.batch_size = B = batch_size if self.n is None else min(batch_size, self.n)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.clip_value, self.clip_norm = clip
        self.precision = precision  # a PrecisionRequest, or None (the model's dtype)
        self.scaler = GradScaler() if precision is not None and \
            precision.name == "fp16-mixed" else None
        if self.n is None:
            self.steps = self.samples = None
        else:
            self.steps = self.n // B if drop_last else math.ceil(self.n / B)
            self.samples = self.steps * B if drop_last else self.n
        device, _ = _placement(model)
        self.xp = np if device == "cpu" else get_array_module(optimizer.params[0].data)
        self.params = model.parameters()
        self.regularizers = list(getattr(model, "regularizers", []))
        # a loss that takes the logits of the softmax output (CategoricalCrossEntropyLoss)
        self.paired = paired_output(model, loss)
        self.from_logits = {} if self.paired is None else {"from_logits": True}
        # state that a training forward pass updates (BatchNorm's running statistics): kept
        # from before each step, so that a step with a non-finite loss leaves no trace in it
        self.buffers = [(a, a.copy()) for _, a in model.named_buffers()] \
            if hasattr(model, "named_buffers") else []
        from backprop.layers import Dropout

        self.dropouts = [m for m in model.modules() if isinstance(m, Dropout)]
        self.dp = None
        if group is not None:
            from backprop.data_parallel import DataParallel

            self.dp = DataParallel(group, model, optimizer)
        # each rank validates its share of the validation rows
        self.val = val if val is None or group is None else _share_of(val, group)
        self.guard = _FiniteGuard(self.xp)
        self._stream = None  # the prefetch thread's CUDA stream (a source on a GPU)
        if source is None:  # arrays in memory: plan the steps, allocate the epoch's copy
            self._plan_rows()

    def _plan_rows(self) -> None:
        """``plan``: per step ``(global start, share start, share end, global rows)``; and
        the buffers that each epoch's rows of this rank are gathered into."""
        B, n, X, y = self.batch_size, self.n, self.X, self.y
        if self.dp is not None:
            self.plan = self.dp.plan(n, B, self.steps)
        else:
            self.plan = [(s * B, 0, min(B, n - s * B), min(B, n - s * B))
                         for s in range(self.steps)]
        if self.shuffle or self.dp is not None:
            n_local = sum(b - a for _, a, b, _ in self.plan)
            self.Xp = self.xp.empty((n_local, *X.shape[1:]), dtype=X.dtype)
            self.yp = self.xp.empty((n_local, *y.shape[1:]), dtype=y.dtype)

    # -- one epoch ---------------------------------------------------------------------
    def _epoch_data(self, epoch):
        """The rows this rank trains on in this epoch, in order, and per step
        ``(lo, hi, rows)``: the step trains on ``[lo:hi]`` of them, its share of a global
        batch of ``rows`` rows (all of it on one process)."""
        if not self.shuffle and self.dp is None:
            return self.X, self.y, [(lo, lo + b, rows) for lo, _, b, rows in self.plan]
        order = epoch_permutation(self.seed, epoch, self.n) if self.shuffle \
            else np.arange(self.n)
        if self.dp is not None:
            order = self.dp.local_index(order, self.plan)
        else:  # drop_last leaves the last rows out
            order = order[:len(self.Xp)]
        order = self.xp.asarray(order)
        self.xp.take(self.X, order, axis=0, out=self.Xp)
        self.xp.take(self.y, order, axis=0, out=self.yp)
        steps, lo = [], 0
        for _, a, b, rows in self.plan:
            steps.append((lo, lo + b - a, rows))
            lo += b - a
        return self.Xp, self.yp, steps

    def _epoch_items(self, epoch):
        """The epoch's steps: ``(X rows, y rows, rows of the global batch)`` each."""
        if self.source is None:
            Xe, ye, steps = self._epoch_data(epoch)
            return ((Xe[lo:hi], ye[lo:hi], rows) for lo, hi, rows in steps)
        from backprop.sources import Prefetcher

        rank, world = (0, 1) if self.dp is None else (self.dp.rank, self.dp.size)
        batches = self.source.epoch_batches(self.batch_size, shuffle=self.shuffle,
                                            seed=self.seed, epoch=epoch, rank=rank,
                                            world=world, drop_last=self.drop_last)
        return Prefetcher(batches, depth=2, transfer=self._to_device,
                          name=f"backprop-fit-prefetch-epoch-{epoch}")

    def _to_device(self, item):
        """One batch read from the source, checked and moved to the model's device and
        dtype, in the prefetch thread. On a GPU the rows are cast on the host, copied into a
        reused pinned buffer and sent on a CUDA stream of the thread's own, which is
        synchronised before the batch is handed over: the copy overlaps the current step."""
        X, y, rows = item
        if len(X):
            X, y = bpdata.validate(X, y, n_features=getattr(self.model, "in_features", None),
                                   target=self.kind, n_outputs=_n_outputs(self.model),
                                   name="training data (a batch read from the source)")
        elif self.kind == "values" and y is not None and y.ndim == 1:
            y = y.reshape(0, 1)
        if self.xp is np:
            return (*_place(self.model, X, y, self.kind), rows)
        _, dtype = _placement(self.model)
        host = [np.ascontiguousarray(X, dtype=dtype), None if y is None else
                np.ascontiguousarray(y, dtype=np.int64 if self.kind == "labels" and y.ndim == 1
                                     else dtype)]
        if self._stream is None:
            self._stream, self._pinned = self.xp.cuda.Stream(non_blocking=True), {}
        with self.optimizer.params[0].data.device, self._stream:
            out = [None if a is None else self._upload(a) for a in host]
        self._stream.synchronize()  # (also: the pinned buffers may be refilled now)
        return (*out, rows)

    def _upload(self, a):
        """``a`` (host) on the device, through the pinned buffer of its shape and dtype."""
        import cupyx

        key = (a.shape, a.dtype.str)
        pinned = self._pinned.get(key)
        if pinned is None:
            pinned = self._pinned[key] = cupyx.empty_pinned(a.shape, dtype=a.dtype)
        np.copyto(pinned, a)
        out = self.xp.empty(a.shape, dtype=a.dtype)
        out.set(pinned, stream=self._stream)
        return out

    def running_logs(self) -> dict:
        """Train loss and metrics so far in this epoch (syncs the device); the loss is the
        non-finite value of the step that stopped the epoch, if one did. On several ranks
        the loss is global and the metrics this rank's, until :meth:`epoch_logs`."""
        logs = {"loss": float(self._loss_sum) / max(self._seen, 1) if self._bad_loss is None
                else self._bad_loss}
        for m in self.metrics:
            logs[m.name] = m.result()
        return logs

    def epoch_logs(self) -> dict:
        """:meth:`running_logs` at the end of an epoch, over every rank's rows."""
        if self.dp is not None:
            self.dp.merge_metrics(self.metrics)
        return self.running_logs()

    def _step(self, xb, yb, rows):
        """Forward, loss and backward of one batch. Returns the loss as a host float (read
        before the update) and ``rows`` × the loss, as a device array, to accumulate."""
        model, loss = self.model, self.loss
        self.optimizer.zero_grad()
        out = model.forward(xb)
        for m in self.metrics:
            m.update(yb, out)
        L = _loss_forward(loss, self.paired, out, yb)
        for r in self.regularizers:
            L = L + r.penalty(self.params)
        self.guard.watch(L)
        delta = loss.backward()
        if self.scaler is not None:
            self.scaler.scale(delta)
        model.backward(delta, need_input_grad=False, **self.from_logits)
        if self.scaler is not None:  # before the regularizers add their (unscaled) part
            self.scaler.unscale_(self.optimizer)
        for r in self.regularizers:
            r.add_grad(self.params)
        return self.guard.value(), L * rows

    def _dp_step(self, xb, yb, rows):
        """:meth:`_step` on this rank's share of a global batch of ``rows`` rows; the
        gradients come out as those of the whole batch (:mod:`backprop.data_parallel`)."""
        model, loss, dp = self.model, self.loss, self.dp
        self.optimizer.zero_grad()
        n = len(xb)
        if n:
            out = model.forward(xb)
            for m in self.metrics:
                m.update(yb, out)
            pending = dp.start_loss(float(_loss_forward(loss, self.paired, out, yb)) * n)
            delta = loss.backward()
            if n != rows:  # ∂(n/rows · L_r): this rank's part of the batch's mean loss
                delta *= n / rows
            if self.scaler is not None:
                self.scaler.scale(delta)
            dp.backward_and_reduce(delta, self.paired is not None)
        else:  # no rows here: as if the forward pass ran, so that ranks stay in step
            for layer in self.dropouts:
                if not layer.fixed_mask:
                    layer.counter += 1
            pending = dp.start_loss(0.0)
            dp.backward_and_reduce(None)
        value = dp.finish_loss(pending, rows)
        if self.scaler is not None:  # the summed gradients: every rank finds the same
            self.scaler.unscale_(self.optimizer)
        for r in self.regularizers:  # once, after the sum: they depend on θ alone
            value += float(r.penalty(self.params))
            r.add_grad(self.params)
        return value, value * rows

    def _clip(self, batch_logs) -> None:
        """Gradient clipping between backward and the step (see :func:`fit`)."""
        if self.clip_value is not None:
            clip_grad_value(self.params, self.clip_value)
        if self.clip_norm is not None:
            batch_logs["grad_norm"] = clip_grad_norm(self.params, self.clip_norm)

    def _train_epoch(self, epoch, cbs) -> bool:
        """One pass over the data; returns False when a callback stopped it mid-epoch."""
        xp = self.xp
        items = self._epoch_items(epoch)
        self._loss_sum = xp.zeros((), dtype=np.float64) if self.dp is None else 0.0
        self._seen, self._bad_loss = 0, None
        for m in self.metrics:
            m.reset()
        one_step = self._step if self.dp is None else self._dp_step
        try:
            return self._train_steps(epoch, cbs, items, one_step)
        finally:
            if hasattr(items, "close"):  # the prefetch thread, also when stopped early
                items.close()

    def _train_steps(self, epoch, cbs, items, one_step) -> bool:
        model, optimizer, xp = self.model, self.optimizer, self.xp
        for step, (xb, yb, rows) in enumerate(items):
            batch_logs = {"batch": step, "size": rows}
            cbs.on_batch_begin(step, batch_logs)
            for live, before in self.buffers:
                xp.copyto(before, live)
            value, weighted = one_step(xb, yb, rows)
            batch_logs["loss"] = value
            if not math.isfinite(value):
                self._bad_loss = value
                for live, before in self.buffers:
                    xp.copyto(live, before)
                cbs.on_batch_end(step, batch_logs)
                if getattr(model, "stop_training", False):
                    return False
                raise NonFiniteLossError(
                    f"the loss became {value} at epoch {epoch + 1}, step {step + 1}; the update "
                    "was not applied, so the weights are those before this step. Lower the "
                    "learning rate, clip the gradients (fit(..., clip_grad_norm=1.0); "
                    "--clip-grad-norm on the command line), or check the inputs (add "
                    "callbacks.TerminateOnNaN() to stop cleanly instead of raising)")
            self._clip(batch_logs)
            if self.scaler is None:
                optimizer.step()
            else:  # skipped when a gradient overflowed float16 (the scale then shrinks)
                self.scaler.step(optimizer)
                self.scaler.update()
                batch_logs["loss_scale"] = self.scaler.get_scale()
            self._loss_sum += weighted
            self._seen += rows
            cbs.on_batch_end(step, batch_logs)
            if getattr(model, "stop_training", False):
                return False
        return True

    def _validate(self):
        return _evaluate_arrays(self.model, *self.val, self.loss, self.val_metrics,
                                self.batch_size, self.dp)

    def _dropout_streams(self, stream: int):
        """Set ``Dropout.stream`` of every Dropout layer; returns the previous values, to
        restore."""
        before = [(layer, layer.stream) for layer in self.dropouts]
        for layer in self.dropouts:
            layer.stream = stream
        return before

    # -- the loop ----------------------------------------------------------------------
    def run(self, epochs, initial_epoch, callbacks, scheduler, verbose) -> History:
        model, optimizer, dp = self.model, self.optimizer, self.dp
        if dp is not None:
            self.seed = dp.start(self.seed)
        history = History()
        user = list(callbacks or [])
        if dp is not None and dp.rank != 0:  # files, bars and plots: rank 0's job
            user = [cb for cb in user if not cb.rank_zero_only]
            verbose_here = 0
        else:
            verbose_here = verbose
        if scheduler is not None:
            user.insert(0, LearningRateScheduler(scheduler))
        if scheduler is None:
            scheduler = next((cb.schedule for cb in user if isinstance(cb, LearningRateScheduler)
                              and cb.is_scheduler), None)
        # learning-rate changes come first, so that checkpoints saved at the end of an epoch
        # hold the scheduler state the next epoch starts from
        user.sort(key=lambda cb: not isinstance(cb, LearningRateScheduler))
        chain = [*(cb for cb in user if cb.adds_logs), history,
                 *(cb for cb in user if not cb.adds_logs)]
        if verbose_here:
            chain.append(ProgressBar(verbose, peek=self.running_logs))
        keys = ["loss", *(m.name for m in self.metrics)]
        if self.val is not None:
            keys += ["val_loss", *(f"val_{m.name}" for m in self.val_metrics)]
        keys += ["lr", "time", "samples_per_s"]
        if self.scaler is not None:
            keys.append("loss_scale")
        precision = "float32" if self.precision is None else self.precision.name
        if precision == "float32" and self.params:
            precision = str(self.params[0].data.dtype)
        params = {"epochs": epochs, "initial_epoch": initial_epoch, "steps": self.steps,
                  "samples": self.samples, "batch_size": self.batch_size, "verbose": verbose,
                  "seed": self.seed, "log_keys": keys, "precision": precision}
        cbs = CallbackList(chain, model, optimizer, scheduler, params)
        if dp is None:
            cbs.on_train_begin()  # callbacks check what they need here, before any change
        else:  # rank 0's checks (a checkpoint's folder) fail every rank alike, not abort
            failure = None
            try:
                cbs.on_train_begin()
            except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
                failure = exc
            agree(dp.group, failure)
            if failure is not None:
                raise failure
        was_training = getattr(model, "training", True)
        model.stop_training = False
        model.train()
        streams = self._dropout_streams(dp.rank) if dp is not None else []
        try:
            for epoch in range(initial_epoch, epochs):
                cbs.on_epoch_begin(epoch)
                if self.precision is not None:  # callbacks may have loaded weights
                    self.precision.refresh()
                lr = float(optimizer.lr)
                start = time.perf_counter()
                finished = self._train_epoch(epoch, cbs)
                # an epoch stopped by a callback is recorded too (as Keras does), so that
                # History holds the loss, even a NaN one, that made TerminateOnNaN stop
                logs = self.epoch_logs()
                train_time = time.perf_counter() - start
                if dp is not None:
                    dp.sync_buffers()
                if self.val is not None:
                    with inference_mode():
                        logs.update({f"val_{k}": v for k, v in self._validate().items()})
                logs["lr"] = lr
                logs["time"] = time.perf_counter() - start
                logs["samples_per_s"] = self._seen / train_time if train_time > 0 else math.inf
                if self.scaler is not None:
                    logs["loss_scale"] = self.scaler.get_scale()
                cbs.on_epoch_end(epoch, logs)
                if dp is not None:  # every rank stops when rank 0 does
                    model.stop_training = dp.decide(model.stop_training)
                if model.stop_training or not finished:
                    break
        except NonFiniteLossError:
            cbs.on_train_end(history.last())  # close files and bars; the error follows
            raise
        finally:
            model.train(was_training)
            for layer, stream in streams:
                layer.stream = stream
        cbs.on_train_end(history.last())
        return history


# ---------------------------------------------------------------------------------------
def _loss_forward(loss, paired, out, yb):
    """The loss of a batch: from the logits of ``paired``, the output layer the loss pairs
    with (:func:`backprop.losses.paired_output`), else from the model's output."""
    return loss.forward(out, yb) if paired is None else loss.forward_logits(paired.logits(), yb)


def _evaluate_arrays(model, X, y, loss, metrics, batch_size, dp=None) -> dict:
    """Loss and metrics over device-resident ``(X, y)`` in eval mode; one sync at the end.
    With ``dp``, ``(X, y)`` is this rank's share and the results cover every rank's."""
    xp = get_array_module(X)
    total = xp.zeros((), dtype=np.float64)
    for m in metrics:
        m.reset()
    n = len(X)
    for lo in range(0, n, batch_size):
        xb, yb = X[lo:lo + batch_size], y[lo:lo + batch_size]
        out = model.forward(xb)
        for m in metrics:
            m.update(yb, out)
        if loss is not None:
            total += _loss_forward(loss, paired_output(model, loss), out, yb) * len(xb)
    total = float(total)
    if dp is not None:
        total, n = dp.sum_host(total, n)
        dp.merge_metrics(metrics)
    logs = {"loss": total / n} if loss is not None else {}
    for m in metrics:
        logs[m.name] = m.result()
    return logs


def evaluate(model, X, y, loss=None, metrics="auto", batch_size: int = 256) -> dict:
    """Loss (when ``loss`` is given) and metrics of ``model`` on ``(X, y)`` in eval mode,
    e.g. ``{"loss": 0.08, "accuracy": 0.975}``. ``metrics="auto"``: accuracy for
    classification losses (or when no loss is given and ``y`` holds integer labels).
    ``X`` and ``y`` may be any array type :func:`fit` takes. Thread-safe: runs in :func:`~backprop.concurrency.inference_mode`, on this thread's
    buffers, without touching the model's ``training`` flags."""
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    if y is None:
        raise bpdata.DataError("evaluation data: y is None; evaluate needs the targets "
                               "(use predict(X) for outputs alone)")
    y = bpdata.as_array(y, name="evaluation data", what="y")
    if loss is not None:
        loss = make_loss(loss)
        kind = _target_kind(loss)
    else:
        kind = "labels" if y.dtype.kind in "iu" else "values"
    device, _ = _placement(model)
    with use_device(device), targets_validated(), inference_mode():
        X, y = _prepare(model, X, y, kind, "evaluation data")
        metric_objs = _metric_list(metrics, loss, kind)
        return _evaluate_arrays(model, X, y, loss, metric_objs, batch_size)


PREDICT_MEMORY = 32 * 2**20
"""Bytes that the intermediate outputs of one forward pass of :func:`predict` may take when
``batch_size`` is None: the rows per pass are this over the bytes per row (at least 256)."""

_plans = None  # backprop.inference, imported on first use (it imports Numba)


def _inference():
    global _plans
    if _plans is None:
        from backprop import inference

        _plans = inference
    return _plans


def _rows_per_pass(model, X) -> int:
    """Rows per forward pass within ``PREDICT_MEMORY``: each row holds, per layer, its
    output and at most one more array of that width (Dense keeps ``Z`` and ``A``)."""
    widths = sum(getattr(m, "out_features", None) or getattr(m, "num_features", None) or 0
                 for m in (model.modules() if hasattr(model, "modules") else ()))
    per_row = X.dtype.itemsize * (X.shape[1] + 2 * widths) if X.ndim == 2 else 0
    return max(256, PREDICT_MEMORY // max(per_row, 1))


def predict(model, X, batch_size: int | None = None):
    """The model's outputs for ``X`` in eval mode, as a fresh array on the model's device
    (NumPy for a CPU model, CuPy for a GPU model), whatever type ``X`` is (see :func:`fit`;
    :func:`backprop.backend.to_dlpack` or ``torch.from_dlpack(out)`` hand it back to
    PyTorch without a copy). ``X`` is checked as by ``fit`` (shape, NaN/inf:
    :class:`~backprop.data.DataError` before any work).

    ``batch_size``: rows per forward pass; None (the default) takes all of ``X`` in one pass
    when the pass's intermediate outputs fit in ``PREDICT_MEMORY`` bytes, else as many
    rows per pass as fit. On the CPU a pass runs through the model's compiled inference plan
    when one covers its layers and the pass's rows (``backprop.inference.MAX_ROWS``; a
    small stack of Dense layers at any size) (:mod:`backprop.inference`; the same outputs up
    to rounding). A C-contiguous NumPy ``X`` of the model's dtype and feature count that a
    plan takes goes straight to it:
    no conversion, no copy, and the finiteness check rides on the first layer's kernel.

    Thread-safe, as :func:`evaluate`."""
    if batch_size is not None:
        batch_size = checks.integer("batch_size", batch_size, minimum=1)
    if type(X) is np.ndarray and X.ndim == 2 and (batch_size is None or
                                                  batch_size >= X.shape[0]):
        out = (_plans or _inference()).run(model, X, True, True)  # check, eval_mode
        if out is not None:
            return out
    device, _ = _placement(model)
    with use_device(device), inference_mode():
        X, _ = _prepare(model, X, None, "any", "prediction data")
        return _predict_arrays(model, X, batch_size)


def _predict_arrays(model, X, batch_size):
    """:func:`predict` on ``X`` validated and placed, inside inference_mode."""
    n = len(X)
    rows = batch_size or _rows_per_pass(model, X)
    plans = (_plans or _inference()) if type(X) is np.ndarray else None
    result = None
    for lo in range(0, n, rows):
        xb = X[lo:lo + rows]
        out = None if plans is None else plans.run(model, xb)
        fresh = out is not None
        if not fresh:
            out = model.forward(xb)
        if rows >= n:
            return out if fresh else out.copy()
        if result is None:
            result = get_array_module(X).empty((n, *out.shape[1:]), dtype=out.dtype)
        result[lo:lo + len(out)] = out
    return result
