"""Callbacks (Keras names and hooks) and the ``History`` that ``fit`` returns.

``fit`` calls, in this order::

    on_train_begin(logs)
      on_epoch_begin(epoch, logs)            epoch counts from 0 (printed from 1)
        on_batch_begin(batch, logs)          logs: {"batch", "size"}
        on_batch_end(batch, logs)            logs: {"batch", "size", "loss"} (host float)
      on_epoch_end(epoch, logs)              logs: loss, metrics, val_*, lr, time, samples_per_s
    on_train_end(logs)

Every callback sees ``self.model``, ``self.optimizer``, ``self.scheduler`` and ``self.params``
(``epochs``, ``initial_epoch``, ``steps``, ``samples``, ``batch_size``, ``verbose``,
``log_keys``: the keys every epoch's logs will have). Setting
``self.model.stop_training = True`` ends training after the current batch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time

import numpy as np

__all__ = [
    "Callback", "CallbackList", "History", "EarlyStopping", "ModelCheckpoint", "TerminateOnNaN",
    "LearningRateScheduler", "CSVLogger", "ProgressBar",
]


class Callback:
    """Base class: override the hooks you need; each does nothing by default."""

    model = None
    optimizer = None
    scheduler = None
    params: dict = {}

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
    """Calls a hook on every callback in order; ``fit`` talks only to this."""

    def __init__(self, callbacks, model, optimizer, scheduler, params: dict):
        self.callbacks = list(callbacks)
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
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

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


def _stop(model) -> None:
    model.stop_training = True


def _resolve_mode(mode: str, monitor: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode={mode!r}: expected 'auto', 'min' or 'max'")
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    return "max" if "acc" in name or name.startswith("r2") else "min"


def _check_monitor(cb_name: str, monitor: str, params: dict) -> None:
    keys = params.get("log_keys")
    if keys is not None and monitor not in keys:
        hint = " (pass validation_data or validation_split to fit)" \
            if monitor.startswith("val_") else ""
        raise ValueError(f"{cb_name} monitors {monitor!r}, which this fit does not log{hint}; "
                         f"logged keys: {sorted(keys)}")


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


# ---------------------------------------------------------------------------------------
class History(Callback):
    """Per-epoch logs: ``history.history`` is ``{key: [value per epoch]}`` and
    ``history.epoch`` the epoch indices. Export with :meth:`to_json` / :meth:`to_csv`."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

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
    (copied to the host when it improves; restored at the end of training)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True, verbose: int = 0):
        self.monitor, self.patience = monitor, int(patience)
        self.min_delta, self.restore_best_weights = min_delta, restore_best_weights
        self.mode, self.verbose = _resolve_mode(mode, monitor), verbose

    def on_train_begin(self, logs=None):
        _check_monitor("EarlyStopping", self.monitor, self.params)
        self._tracker = _Improvement(self.mode, self.min_delta)
        self.wait, self.best_epoch, self.stopped_epoch = 0, None, None
        self.best_weights = None

    @property
    def best(self) -> float:
        return self._tracker.best

    def on_epoch_end(self, epoch, logs=None):
        value = float(logs[self.monitor])
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
                print(f"EarlyStopping: {self.monitor} has not improved for {self.wait} epochs "
                      f"(best {self.best:.6g} at epoch {best_at}); stopping after epoch "
                      f"{epoch + 1}")

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
            if self.verbose:
                print(f"EarlyStopping: restored the weights of epoch {self.best_epoch + 1} "
                      f"({self.monitor} = {self.best:.6g})")


class ModelCheckpoint(Callback):
    """Save model, optimizer, scheduler and epoch to ``path`` at the end of each epoch
    (``save_best_only=False``: the last epoch) or only when ``monitor`` improves
    (``save_best_only=True``: the best epoch). ``path`` may hold ``str.format`` fields
    of the epoch (counted from 1) and the logs: ``"ckpt-{epoch:03d}-{val_loss:.3f}.npz"``.
    The saved ``epoch`` is the number of completed epochs, so ``fit(initial_epoch=ckpt.epoch)``
    resumes where it stopped. Writes are atomic (see :func:`backprop.io.save`)."""

    def __init__(self, path, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", save_optimizer: bool = True, verbose: int = 0):
        self.path, self.monitor, self.save_best_only = str(path), monitor, save_best_only
        self.mode, self.save_optimizer, self.verbose = _resolve_mode(mode, monitor), \
            save_optimizer, verbose
        self.last_saved: str | None = None

    def on_train_begin(self, logs=None):
        if self.save_best_only:
            _check_monitor("ModelCheckpoint", self.monitor, self.params)
        self._tracker = _Improvement(self.mode, 0.0)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = float(logs[self.monitor])
            if not self._tracker.improved(value):
                return
            self._tracker.best = value
        from backprop import io

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
    this callback ``fit`` raises :class:`backprop.training.NonFiniteLossError` instead."""

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
            print(f"TerminateOnNaN: the loss became {loss} at epoch {self._epoch + 1}, step "
                  f"{batch + 1}; that update was skipped, so the weights are those before it. "
                  "Lower the learning rate, clip gradients or check the inputs.")


class LearningRateScheduler(Callback):
    """Change the learning rate every epoch, from either

    - a function ``schedule(epoch, lr) -> new_lr`` (Keras), applied at the start of each
      epoch (``epoch`` counts from 0), or
    - a :mod:`backprop.schedules` scheduler, stepped at the end of each epoch
      (``ReduceLROnPlateau`` is stepped with ``logs[monitor]``, falling back to ``loss``
      when there is no validation data).
    """

    def __init__(self, schedule, monitor: str = "val_loss", verbose: int = 0):
        if not callable(schedule) and not hasattr(schedule, "step"):
            raise TypeError("LearningRateScheduler needs a function (epoch, lr) -> lr or a "
                            f"backprop.schedules scheduler, got {type(schedule).__name__}")
        self.schedule, self.monitor, self.verbose = schedule, monitor, verbose

    @property
    def is_scheduler(self) -> bool:
        return hasattr(self.schedule, "step") and hasattr(self.schedule, "state_dict")

    def on_epoch_begin(self, epoch, logs=None):
        if self.is_scheduler:
            return
        lr = float(self.schedule(epoch, float(self.optimizer.lr)))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"the schedule returned lr={lr} for epoch {epoch}; expected a "
                             "finite number >= 0")
        self.optimizer.lr = lr
        if self.verbose:
            print(f"LearningRateScheduler: epoch {epoch + 1}, lr = {lr:.6g}")

    def on_epoch_end(self, epoch, logs=None):
        if not self.is_scheduler:
            return
        from backprop import schedules

        if isinstance(self.schedule, schedules.ReduceLROnPlateau):
            logs = logs or {}
            key = self.monitor if self.monitor in logs else "loss"
            self.schedule.step(float(logs[key]))
        else:
            self.schedule.step()


class CSVLogger(Callback):
    """Append one row per epoch (``epoch`` counted from 1, then the logs) to ``path``,
    flushed each epoch. ``append=True`` continues an existing file (for resumed runs)."""

    def __init__(self, path, separator: str = ",", append: bool = False):
        self.path, self.separator, self.append = str(path), separator, append
        self._file = None

    def on_train_begin(self, logs=None):
        existing = self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._file = open(self.path, "a" if self.append else "w", newline="")
        self._writer = csv.writer(self._file, delimiter=self.separator)
        self._keys = None
        if existing:
            with open(self.path, newline="") as f:
                self._keys = next(csv.reader(f, delimiter=self.separator))[1:]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._keys is None:
            self._keys = list(logs)
            self._writer.writerow(["epoch", *self._keys])
        self._writer.writerow([epoch + 1, *(logs.get(k, "") for k in self._keys)])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------
def _format_logs(logs: dict, keys=None) -> str:
    parts = []
    for key in keys or logs:
        if key in ("time", "samples_per_s") or key not in logs:
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
    """

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
