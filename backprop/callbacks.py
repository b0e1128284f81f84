"""Callbacks (Keras names and hooks) and the ``History`` that ``fit`` returns.

``fit`` calls, in this order::

    on_train_begin(logs)                     each callback checks here, before any step,
                                             that what it needs will be there (see below)
      on_epoch_begin(epoch, logs)            epoch counts from 0 (printed from 1)
        on_batch_begin(batch, logs)          logs: {"batch", "size"}
        on_batch_end(batch, logs)            logs: {"batch", "size", "loss"} (host float)
      on_epoch_end(epoch, logs)              logs: loss, metrics, val_*, lr, time, samples_per_s
    on_train_end(logs)

Every callback sees ``self.model``, ``self.optimizer``, ``self.scheduler`` and ``self.params``
(``epochs``, ``initial_epoch``, ``steps``, ``samples``, ``batch_size``, ``verbose``,
``log_keys``: the keys every complete epoch's logs will have). Setting
``self.model.stop_training = True`` ends training after the current batch.

Checks. Arguments are checked when a callback is built (``TypeError``/``ValueError``); what
depends on the run is checked in ``on_train_begin``, before the first step: the log keys a
callback reads (a monitored key, the fields of a file name pattern) against
``params["log_keys"]``, and the directory it writes to (it must exist and be writable). So a
misconfigured callback fails at once, not after an epoch of training.

An epoch stopped mid-way (a callback set ``stop_training`` in ``on_batch_end``, e.g.
:class:`TerminateOnNaN`) still gets ``on_epoch_end``, as in Keras, so that :class:`History`
records the loss that stopped it. Its logs are the running logs of the steps so far: the
loss may be NaN or inf, and ``val_*`` and other keys may be missing. During that call
``self.epoch_complete`` is False (``CallbackList`` sets it: the model's ``stop_training`` was
already set when the epoch ended). History and CSVLogger record such an epoch (NaN / an
empty field for a missing key); ModelCheckpoint, EarlyStopping and LearningRateScheduler
skip it (it is not a finished epoch: a checkpoint of it would claim one, and resuming from
the last complete epoch replays it exactly).
"""
from __future__ import annotations

import csv
import json
import math
import os
import string
import sys
import time
import warnings

import numpy as np

from backprop import checks

__all__ = [
    "Callback", "CallbackList", "History", "EarlyStopping", "ModelCheckpoint", "TerminateOnNaN",
    "LearningRateScheduler", "CSVLogger", "ProgressBar", "GradientMonitor",
]


class Callback:
    """Base class: override the hooks you need; each does nothing by default.

    ``epoch_complete`` is False only inside ``on_epoch_end`` of an epoch that a callback
    stopped mid-way (see the module docstring)."""

    model = None
    optimizer = None
    scheduler = None
    params: dict = {}
    epoch_complete: bool = True
    #: In a data-parallel ``fit`` (:mod:`backprop.distributed`), run only on rank 0: set for
    #: callbacks that write files or print (checkpoints, logs, bars, plots). The others run
    #: on every rank, with the same globally reduced logs, so they decide alike.
    rank_zero_only: bool = False
    #: ``on_epoch_end`` adds keys to the epoch's logs: such callbacks run before
    #: :class:`History` and the others (declare the keys in ``on_train_begin`` by appending
    #: them to ``params["log_keys"]``, so that CSVLogger makes them columns).
    adds_logs: bool = False

    def set_context(self, model, optimizer, scheduler, params: dict) -> None:
        self.model, self.optimizer, self.scheduler, self.params = \
            model, optimizer, scheduler, params

    def on_train_begin(self, logs=None): ...

    def on_train_end(self, logs=None): ...

    def on_epoch_begin(self, epoch: int, logs=None): ...

    def on_epoch_end(self, epoch: int, logs=None): ...

    def on_batch_begin(self, batch: int, logs=None): ...

    def on_batch_end(self, batch: int, logs=None): ...


class CallbackList:
    """Calls a hook on every callback in order; ``fit`` talks only to this. Before
    ``on_epoch_end`` it sets each callback's ``epoch_complete``: False when the model's
    ``stop_training`` is already set, i.e. a callback stopped the epoch before its end."""

    def __init__(self, callbacks, model, optimizer, scheduler, params: dict):
        self.callbacks = list(callbacks)
        self.model = model
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be backprop.callbacks.Callback instances, got "
                                f"{type(cb).__name__}")
            cb.set_context(model, optimizer, scheduler, params)
        self._batch_hooks = [cb for cb in self.callbacks if _overrides_batch_hooks(cb)]

    def on_train_begin(self, logs=None):
        for cb in self.callbacks:
            cb.on_train_begin(logs)

    def on_train_end(self, logs=None):
        for cb in self.callbacks:
            cb.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # read before any on_epoch_end runs: EarlyStopping sets the flag after a full epoch
        complete = not getattr(self.model, "stop_training", False)
        try:
            for cb in self.callbacks:
                cb.epoch_complete = complete
                cb.on_epoch_end(epoch, logs)
        finally:
            for cb in self.callbacks:
                cb.epoch_complete = True

    def on_batch_begin(self, batch, logs=None):
        for cb in self._batch_hooks:
            cb.on_batch_begin(batch, logs)

    def on_batch_end(self, batch, logs=None):
        for cb in self._batch_hooks:
            cb.on_batch_end(batch, logs)


def _overrides_batch_hooks(cb: Callback) -> bool:
    cls = type(cb)
    return cls.on_batch_begin is not Callback.on_batch_begin or \
        cls.on_batch_end is not Callback.on_batch_end


def _say(message: str) -> None:
    """Print a callback's message, once per job: on rank 0 of a data-parallel run."""
    from backprop import distributed

    if distributed.rank() == 0:
        print(message)


def _stop(model) -> None:
    model.stop_training = True


# -- argument checks (at construction) ------------------------------------------------------
def _key(owner: str, name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be the name of a log key such as 'val_loss', "
                        f"got {value!r}")
    if not value:
        raise ValueError(f"{owner}: {name} must be the name of a log key such as 'val_loss', "
                         "got ''")
    return value


def _flag(owner: str, name: str, value) -> bool:
    return checks.flag(f"{owner}: {name}", value)


def _count(owner: str, name: str, value) -> int:
    """An integer >= 0 (bools and floats refused: ``int()`` would truncate them silently)."""
    return checks.integer(f"{owner}: {name}", value, minimum=0)


def _verbosity(owner: str, value) -> int:
    """``verbose``: True/False or an integer >= 0."""
    return int(value) if isinstance(value, (bool, np.bool_)) else _count(owner, "verbose", value)


def _at_least_zero(owner: str, name: str, value) -> float:
    return checks.non_negative(f"{owner}: {name}", value)


def _path(owner: str, path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{owner}: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}") from None
    if not isinstance(path, str) or not path:
        raise TypeError(f"{owner}: path must be a non-empty str or os.PathLike, got {path!r}")
    return path


def _resolve_mode(mode: str, monitor: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode={mode!r}: expected 'auto', 'min' or 'max'")
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    return "max" if "acc" in name or name.startswith("r2") else "min"


def _pattern_fields(owner: str, pattern: str) -> list[str]:
    """The names of the ``str.format`` fields of ``pattern``; each field's format spec is
    tried on a dummy value (an int for ``epoch``, a float for a log key) so that a bad spec
    fails here rather than when the first file is written."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise ValueError(f"{owner}: {pattern!r} is not a valid str.format pattern ({e}); "
                         "write a literal brace as '{{' or '}}'") from None
    names = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(f"{owner}: {pattern!r} has the field {{{field}}}; name a log key "
                             "instead, e.g. {epoch:03d} or {val_loss:.4f}")
        if "{" in spec:
            raise ValueError(f"{owner}: {pattern!r}: nested fields in a format spec "
                             f"({{{field}:{spec}}}) are not supported")
        dummy = 1 if field == "epoch" else 1.0
        try:
            ("{0" + (f"!{conversion}" if conversion else "") + f":{spec}}}").format(dummy)
        except (ValueError, TypeError) as e:
            kind = "the epoch number (an int)" if field == "epoch" else "a log value (a float)"
            raise ValueError(f"{owner}: {pattern!r}: the format spec {spec!r} of {{{field}}} "
                             f"cannot format {kind}: {e}") from None
        names.append(field)
    return names


# -- run checks (at on_train_begin) ---------------------------------------------------------
def _log_keys(params: dict):
    keys = params.get("log_keys")
    return None if keys is None else list(keys)


def _check_monitor(cb_name: str, monitor: str, params: dict) -> None:
    keys = _log_keys(params)
    if keys is not None and monitor not in keys:
        hint = " (pass validation_data or validation_split to fit)" \
            if monitor.startswith("val_") else ""
        raise ValueError(f"{cb_name} monitors {monitor!r}, which this fit does not log{hint}; "
                         f"logged keys: {sorted(keys)}")


def _check_fields(owner: str, pattern: str, fields, params: dict) -> None:
    keys = _log_keys(params)
    if keys is None:
        return
    for field in fields:
        if field != "epoch" and field not in keys:
            hint = "pass validation_data or validation_split to fit, or " \
                if field.startswith("val_") else ""
            raise ValueError(f"{owner}: {pattern!r} uses {{{field}}}, which this fit does not "
                             f"log; {hint}use one of: epoch, {', '.join(keys)}")


def _check_writable(owner: str, path: str) -> None:
    """Raise unless ``path`` names a file that can be created or replaced: its directory
    exists and is writable, and it is not a directory itself."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        example = os.path.join(path, "log.csv" if owner == "CSVLogger" else "model.npz")
        raise IsADirectoryError(f"{owner}: {path!r} is a directory; give a file name such as "
                                f"{example!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{owner}: cannot write {path!r}: the directory {directory!r} "
                                "does not exist; create it first (os.makedirs(directory, "
                                "exist_ok=True))")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{owner}: cannot write {path!r}: the directory {directory!r} is "
                              "not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{owner}: cannot write {path!r}: the file is not writable")


class _Improvement:
    """Tracks the best value of a monitored quantity (``min`` or ``max`` mode)."""

    def __init__(self, mode: str, min_delta: float):
        self.mode, self.min_delta = mode, abs(float(min_delta))
        self.best = math.inf if mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


def _monitored(owner: str, monitor: str, logs: dict) -> float:
    if monitor not in logs:  # only without params["log_keys"] (a loop other than fit's)
        raise ValueError(f"{owner} monitors {monitor!r}, which is not in this epoch's logs; "
                         f"logged keys: {sorted(logs)}")
    return float(logs[monitor])


# ---------------------------------------------------------------------------------------
class History(Callback):
    """Per-epoch logs: ``history.history`` is ``{key: [value per epoch]}`` and
    ``history.epoch`` the epoch indices. Export with :meth:`to_json` / :meth:`to_csv`.

    Requires nothing. Every list has one value per recorded epoch: a key an epoch's logs
    lack (``val_*`` of an epoch stopped mid-way) gets NaN, so ``history.history[k][i]`` is
    always epoch ``history.epoch[i]``. An epoch stopped mid-way is recorded (with its loss,
    NaN or inf when that is what stopped it)."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seen = len(self.epoch)
        for key in [*logs, *(_log_keys(self.params) or [])]:
            if key not in self.history:
                self.history[key] = [math.nan] * seen
        for key, column in self.history.items():
            column.append(logs.get(key, math.nan))
        self.epoch.append(epoch)

    def __len__(self) -> int:
        return len(self.epoch)

    def last(self) -> dict:
        """The logs of the last epoch (empty if none ran)."""
        return {k: v[-1] for k, v in self.history.items() if v}

    def as_dict(self) -> dict:
        return {"epoch": list(self.epoch), **{k: list(v) for k, v in self.history.items()}}

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1, allow_nan=True)

    def to_csv(self, path) -> None:
        table = self.as_dict()
        keys = list(table)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            for i in range(len(self.epoch)):
                writer.writerow([table[k][i] if i < len(table[k]) else "" for k in keys])

    @classmethod
    def from_json(cls, path) -> History:
        with open(path) as f:
            table = json.load(f)
        hist = cls()
        hist.epoch = list(table.pop("epoch", []))
        hist.history = {k: list(v) for k, v in table.items()}
        return hist

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs. ``mode``: ``min``, ``max`` or ``auto`` (max for accuracy/R², else min).
    With ``restore_best_weights`` the model ends with the weights of its best epoch
    (copied to the host when it improves; restored at the end of training).

    Requires ``monitor`` in the epoch logs (``val_*`` keys need validation data): checked at
    the start of ``fit``. ``patience`` must be an integer >= 0 and ``min_delta`` a number
    >= 0 (checked here). A NaN value counts as no improvement; an epoch stopped mid-way is
    skipped (its value is not an epoch's)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True, verbose: int = 0):
        name = "EarlyStopping"
        self.monitor = _key(name, "monitor", monitor)
        self.patience = _count(name, "patience", patience)
        self.min_delta = _at_least_zero(name, "min_delta", min_delta)
        self.restore_best_weights = _flag(name, "restore_best_weights", restore_best_weights)
        self.mode, self.verbose = _resolve_mode(mode, monitor), _verbosity(name, verbose)

    def on_train_begin(self, logs=None):
        _check_monitor("EarlyStopping", self.monitor, self.params)
        self._tracker = _Improvement(self.mode, self.min_delta)
        self.wait, self.best_epoch, self.stopped_epoch = 0, None, None
        self.best_weights = None

    @property
    def best(self) -> float:
        return self._tracker.best

    def on_epoch_end(self, epoch, logs=None):
        if not self.epoch_complete:
            return
        value = _monitored("EarlyStopping", self.monitor, logs or {})
        if self._tracker.improved(value):
            self._tracker.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = {k: np.array(v, copy=True)
                                     for k, v in self.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            _stop(self.model)
            if self.verbose:
                best_at = "-" if self.best_epoch is None else self.best_epoch + 1
                _say(f"EarlyStopping: {self.monitor} has not improved for {self.wait} epochs "
                      f"(best {self.best:.6g} at epoch {best_at}); stopping after epoch "
                      f"{epoch + 1}")

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
            if self.verbose:
                _say(f"EarlyStopping: restored the weights of epoch {self.best_epoch + 1} "
                      f"({self.monitor} = {self.best:.6g})")


class ModelCheckpoint(Callback):
    """Save model, optimizer, scheduler and epoch to ``path`` at the end of each epoch
    (``save_best_only=False``: the last epoch) or only when ``monitor`` improves
    (``save_best_only=True``: the best epoch). ``path`` may hold ``str.format`` fields
    of the epoch (counted from 1) and the logs: ``"ckpt-{epoch:03d}-{val_loss:.3f}.npz"``.
    The saved ``epoch`` is the number of completed epochs, so ``fit(initial_epoch=ckpt.epoch)``
    resumes where it stopped. Writes are atomic (see :func:`backprop.io.save`).

    Requires: every field of ``path`` is ``epoch`` or a key of the epoch logs, and its
    format spec formats a number (checked here: ``{loss:.3q}`` fails); with
    ``save_best_only``, ``monitor`` in the logs; the directory of ``path`` exists and is
    writable (the run-dependent parts checked at the start of ``fit``; a directory that
    itself holds fields is not checked). A NaN or inf value is never "best", and an epoch
    stopped mid-way is not saved (it was not completed; resuming from the last complete
    epoch replays it exactly)."""

    rank_zero_only = True

    def __init__(self, path, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", save_optimizer: bool = True, verbose: int = 0):
        name = "ModelCheckpoint"
        self.path = _path(name, path)
        self.fields = _pattern_fields(name, self.path)
        self.monitor = _key(name, "monitor", monitor)
        self.save_best_only = _flag(name, "save_best_only", save_best_only)
        self.mode = _resolve_mode(mode, monitor)
        self.save_optimizer = _flag(name, "save_optimizer", save_optimizer)
        self.verbose = _verbosity(name, verbose)
        self.last_saved: str | None = None

    def on_train_begin(self, logs=None):
        name = "ModelCheckpoint"
        if self.save_best_only:
            _check_monitor(name, self.monitor, self.params)
        _check_fields(name, self.path, self.fields, self.params)
        directory = os.path.dirname(self.path)
        if "{" not in directory:  # (a directory made of fields is known only per epoch)
            dummy = {f: 1 if f == "epoch" else 0.0 for f in self.fields}
            _check_writable(name, self.path.format(**dummy))
        self._tracker = _Improvement(self.mode, 0.0)

    def on_epoch_end(self, epoch, logs=None):
        if not self.epoch_complete:
            if self.verbose:
                print(f"ModelCheckpoint: epoch {epoch + 1} was stopped mid-way; not saved")
            return
        logs = logs or {}
        if self.save_best_only:
            value = _monitored("ModelCheckpoint", self.monitor, logs)
            if not self._tracker.improved(value):
                return
            self._tracker.best = value
        from backprop import io

        missing = [f for f in self.fields if f != "epoch" and f not in logs]
        if missing:  # only without params["log_keys"] (a loop other than fit's)
            raise ValueError(f"ModelCheckpoint: {self.path!r} uses {missing[0]!r}, which is "
                             f"not in this epoch's logs; logged keys: {sorted(logs)}")
        path = self.path.format(epoch=epoch + 1, **logs)
        io.save(self.model, path, optimizer=self.optimizer if self.save_optimizer else None,
                epoch=epoch + 1,
                scheduler=self.scheduler if self.save_optimizer else None)
        self.last_saved = path
        if self.verbose:
            print(f"ModelCheckpoint: saved epoch {epoch + 1} to {path}")


class TerminateOnNaN(Callback):
    """Stop training at the first non-finite loss. ``fit`` never applies the update of a
    step whose loss is NaN or inf, so the weights stay those of the step before; without
    this callback ``fit`` raises :class:`backprop.training.NonFiniteLossError` instead.

    Requires nothing (it reads each step's ``loss``). The stopped epoch is still recorded
    by :class:`History`, with the non-finite loss."""

    def on_train_begin(self, logs=None):
        self.stopped_at: tuple[int, int] | None = None  # (epoch, step), counted from 0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stopped_at = (self._epoch, batch)
            _stop(self.model)
            _say(f"TerminateOnNaN: the loss became {loss} at epoch {self._epoch + 1}, step "
                  f"{batch + 1}; that update was skipped, so the weights are those before it. "
                  "Lower the learning rate, clip gradients or check the inputs.")


class LearningRateScheduler(Callback):
    """Change the learning rate every epoch, from either

    - a function ``schedule(epoch, lr) -> new_lr`` (Keras), applied at the start of each
      epoch (``epoch`` counts from 0), or
    - a :mod:`backprop.schedules` scheduler, stepped at the end of each complete epoch
      (not after an epoch stopped mid-way, so that a resumed run steps it once per epoch).
      ``ReduceLROnPlateau`` is stepped with ``logs[monitor]``; with ``monitor=None`` (the
      default) that is ``val_loss``, or ``loss`` when the fit has no validation data.

    Requires, for ``ReduceLROnPlateau`` with an explicit ``monitor``, that key in the epoch
    logs (checked at the start of ``fit``); it warns there when the monitored key improves
    upwards (accuracy, R²) but the scheduler's ``mode`` is ``"min"``, or the reverse. A
    function's lr is checked each epoch (finite, >= 0) before that epoch's first step.
    """

    def __init__(self, schedule, monitor: str | None = None, verbose: int = 0):
        if not callable(schedule) and not hasattr(schedule, "step"):
            raise TypeError("LearningRateScheduler needs a function (epoch, lr) -> lr or a "
                            f"backprop.schedules scheduler, got {type(schedule).__name__}")
        self._fallback = monitor is None
        self.monitor = "val_loss" if monitor is None else \
            _key("LearningRateScheduler", "monitor", monitor)
        self.schedule, self.verbose = schedule, _verbosity("LearningRateScheduler", verbose)
        self._resolved = None

    @property
    def is_scheduler(self) -> bool:
        return hasattr(self.schedule, "step") and hasattr(self.schedule, "state_dict")

    def _plateau(self) -> bool:
        from backprop import schedules

        return self.is_scheduler and isinstance(self.schedule, schedules.ReduceLROnPlateau)

    def on_train_begin(self, logs=None):
        self._resolved = None
        keys = _log_keys(self.params)
        if not self._plateau() or keys is None:
            return
        if self._fallback and self.monitor not in keys:
            self._resolved = "loss"
        else:
            _check_monitor("LearningRateScheduler(ReduceLROnPlateau)", self.monitor, self.params)
            self._resolved = self.monitor
        mode = getattr(self.schedule, "mode", None)
        improves = _resolve_mode("auto", self._resolved)
        if mode in ("min", "max") and mode != improves:
            warnings.warn(f"LearningRateScheduler: ReduceLROnPlateau(mode={mode!r}) is stepped "
                          f"with {self._resolved!r}, which improves when it "
                          f"{'rises' if improves == 'max' else 'falls'}; pass "
                          f"mode={improves!r} to ReduceLROnPlateau", stacklevel=2)

    def on_epoch_begin(self, epoch, logs=None):
        if self.is_scheduler:
            return
        lr = float(self.schedule(epoch, float(self.optimizer.lr)))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"the schedule returned lr={lr} for epoch {epoch}; expected a "
                             "finite number >= 0")
        self.optimizer.lr = lr
        if self.verbose:
            _say(f"LearningRateScheduler: epoch {epoch + 1}, lr = {lr:.6g}")

    def on_epoch_end(self, epoch, logs=None):
        if not self.is_scheduler or not self.epoch_complete:
            return
        if self._plateau():
            logs = logs or {}
            key = self._resolved or (self.monitor if self.monitor in logs or not self._fallback
                                else "loss")
            self.schedule.step(_monitored("LearningRateScheduler", key, logs))
        else:
            self.schedule.step()


class CSVLogger(Callback):
    """Append one row per epoch (``epoch`` counted from 1, then the logs) to ``path``,
    flushed each epoch. ``append=True`` continues an existing file (for resumed runs).

    Requires a writable directory for ``path`` (checked at the start of ``fit``, before the
    file is opened: the file is opened, and without ``append`` truncated, when the first
    row is written). ``separator`` must be one character. The columns are
    ``params["log_keys"]`` (then any other key of the first epoch's logs); a key an epoch's
    logs lack (``val_*`` of an epoch stopped mid-way) is written as an empty field. With
    ``append``, the existing header is kept, and a warning names the columns that differ."""

    rank_zero_only = True

    def __init__(self, path, separator: str = ",", append: bool = False):
        self.path = _path("CSVLogger", path)
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator must be one character, got {separator!r}")
        self.separator, self.append = separator, _flag("CSVLogger", "append", append)
        self._file = None

    def on_train_begin(self, logs=None):
        _check_writable("CSVLogger", self.path)
        self._file, self._keys = None, None
        if self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                self._keys = next(csv.reader(f, delimiter=self.separator))[1:]
            keys = _log_keys(self.params)
            if keys is not None and set(keys) != set(self._keys):
                warnings.warn(f"CSVLogger: {self.path!r} has the columns {self._keys}, this fit "
                              f"logs {keys}: appending under the existing header (missing "
                              "keys are left empty, extra ones dropped)", stacklevel=2)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._file is None:
            self._file = open(self.path, "a" if self.append else "w", newline="")
            self._writer = csv.writer(self._file, delimiter=self.separator)
            if self._keys is None:
                keys = _log_keys(self.params) or []
                self._keys = [*keys, *(k for k in logs if k not in keys)]
                self._writer.writerow(["epoch", *self._keys])
        self._writer.writerow([epoch + 1, *(logs.get(k, "") for k in self._keys)])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------
def _format_logs(logs: dict, keys=None) -> str:
    """``"loss 0.3 - accuracy 0.9"``: the keys of the progress line. Keys with a ``/``
    (a callback's detailed statistics, e.g. ``GradientMonitor``'s ``grad/0/delta_rms``) are
    left to History and CSVLogger: there may be dozens of them."""
    parts = []
    for key in keys or logs:
        if key in ("time", "samples_per_s") or key not in logs or "/" in key:
            continue
        value = logs[key]
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " - ".join(parts)


def _format_seconds(seconds: float) -> str:
    """``"1.25 s"``, or ``"3.4 ms"`` below a second (a small model's epoch is milliseconds)."""
    return f"{seconds:.2f} s" if seconds >= 1.0 else f"{seconds * 1e3:.3g} ms"


class ProgressBar(Callback):
    """A tqdm bar per epoch (samples, samples/s, running loss and metrics) when stdout is a
    terminal; otherwise one line per epoch. ``fit`` adds it for ``verbose=1`` (bar on a
    terminal, lines elsewhere) and ``verbose=2`` (always one line per epoch).

    ``peek`` (given by ``fit``) returns the running train logs; it syncs the device, so the
    bar calls it at most every ``refresh_s`` seconds.

    Requires nothing: it shows whatever keys an epoch's logs hold (an epoch stopped mid-way
    shows its running logs, NaN loss included).
    """

    rank_zero_only = True

    def __init__(self, verbose: int = 1, peek=None, refresh_s: float = 0.25, file=None):
        self.verbose, self.peek, self.refresh_s = verbose, peek, refresh_s
        self.file = file
        self._bar = None

    def _out(self):
        return self.file or sys.stdout

    def _use_bar(self) -> bool:
        out = self._out()
        return self.verbose == 1 and hasattr(out, "isatty") and out.isatty()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start = epoch, time.perf_counter()
        self._last = self._start
        if self._use_bar():
            from tqdm.auto import tqdm

            total = self.params.get("samples") or 0
            self._bar = tqdm(total=total, unit="sample", unit_scale=total >= 10_000,
                             desc=f"Epoch {epoch + 1}/{self.params.get('epochs')}",
                             file=self._out(), leave=True, dynamic_ncols=True)

    def on_batch_end(self, batch, logs=None):
        if self._bar is None:
            return
        self._bar.update(logs["size"])
        now = time.perf_counter()
        if self.peek is not None and now - self._last >= self.refresh_s:
            self._last = now
            self._bar.set_postfix_str(_format_logs(self.peek()), refresh=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._bar is not None:
            self._bar.set_postfix_str(_format_logs(logs), refresh=False)
            self._bar.close()
            self._bar = None
            return
        if self.verbose:
            print(f"Epoch {epoch + 1}/{self.params.get('epochs')}: "
                  f"{_format_seconds(logs.get('time', 0.0))}, "
                  f"{logs.get('samples_per_s', 0.0):,.0f} samples/s - {_format_logs(logs)}",
                  file=self._out(), flush=True)

    def on_train_end(self, logs=None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# at the bottom: gradient_health imports Callback from this module
from backprop.gradient_health import GradientMonitor  # noqa: E402
