"""Learning-rate schedules with PyTorch's semantics (``torch.optim.lr_scheduler``).

A schedule drives ``optimizer.lr``. As in PyTorch, creating one sets the lr of epoch 0 and
each ``step()`` advances one epoch (or one batch: the unit is the caller's) and writes the
new lr. ``ReduceLROnPlateau.step(metric)`` instead lowers the lr when the metric stalls.

Closed forms are used (PyTorch's ``_get_closed_form_lr``), with lr₀ the base lr and t the
number of ``step()`` calls so far::

    StepLR             lr_t = lr₀ · γ^⌊t / step_size⌋
    ExponentialLR      lr_t = lr₀ · γ^t
    CosineAnnealingLR  lr_t = η_min + (lr₀ − η_min) · (1 + cos(π t / T_max)) / 2
    LinearWarmup       lr_t = lr₀ · (f₀ + (1 − f₀) · t / W)  for t < W;  then ``after``'s
                       lr at t − W (or lr₀ without ``after``): PyTorch's
                       ``SequentialLR([LinearLR(f₀, 1, W), after], milestones=[W])``
    ReduceLROnPlateau  lr ← max(lr · factor, min_lr) after more than ``patience`` epochs
                       without improvement, then ``cooldown`` epochs of rest

PyTorch's default recursive ("chainable") updates give the same values up to float
rounding; the difference is that a closed form overwrites a manual change of
``optimizer.lr`` at the next step, where the chainable form would carry it on.

lr₀ is the optimizer's lr when its first schedule was created (``optimizer.initial_lr``,
PyTorch's ``initial_lr``), so that a schedule created after another one (e.g. the ``after``
of a warmup) starts from the same base. Only ``optimizer.lr`` is touched: the learning
rate stays a Python float, and float32 parameters stay float32.
"""
from __future__ import annotations

import math
import numbers

from backprop.optim import Optimizer, _at_least_zero, _real

__all__ = ["LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearWarmup",
           "ReduceLROnPlateau"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_optimizer(optimizer) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a backprop optimizer (e.g. bp.optim.SGD), got "
                        f"{type(optimizer).__name__}")
    return optimizer


class _Schedule:
    """What every schedule shares: its optimizer, epoch counter, last lr and checkpoints.

    Subclasses define ``config()`` (their JSON-able hyperparameters, which ``_configure``
    accepts back) and list their counters in ``_counters``."""

    _counters: tuple[str, ...] = ("last_epoch",)

    def __init__(self, optimizer):
        self.optimizer = _check_optimizer(optimizer)
        self.last_epoch = 0
        self._last_lr = optimizer.lr

    def get_last_lr(self) -> list[float]:
        """The lr set by the last step, as a one-element list (PyTorch's form, one entry per
        parameter group; here there is one)."""
        return [self._last_lr]

    def config(self) -> dict:
        raise NotImplementedError

    def _configure(self, **config) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"type", "config", <counters>, "last_lr"}``, JSON-able."""
        state = {"type": type(self).__name__, "config": self.config(), "last_lr": self._last_lr}
        state.update({k: getattr(self, k) for k in self._counters})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict` (hyperparameters and counters)."""
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            found = state.get("type") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"this state is for a {found} schedule, not "
                             f"{type(self).__name__}: create a {found} to load it")
        missing = sorted({"config", "last_lr", *self._counters} - set(state))
        if missing:
            raise ValueError(f"{type(self).__name__} state lacks {missing}")
        self._configure(**state["config"])
        for key in self._counters:
            setattr(self, key, state[key])
        self._last_lr = float(state["last_lr"])


class LRScheduler(_Schedule):
    """A schedule given by a closed form ``lr_at(t)``; ``step()`` sets ``lr_at(t + 1)``."""

    _counters = ("last_epoch", "base_lr")

    def __init__(self, optimizer):
        super().__init__(optimizer)
        if optimizer.initial_lr is None:
            optimizer.initial_lr = optimizer.lr
        self.base_lr = optimizer.initial_lr
        self._apply()

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set the optimizer's lr."""
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        self._last_lr = self.lr_at(self.last_epoch)
        self.optimizer.lr = self._last_lr

    def load_state_dict(self, state: dict) -> None:
        """Restore counters and hyperparameters, and set the optimizer's lr accordingly."""
        super().load_state_dict(state)
        self._apply()


class StepLR(LRScheduler):
    """``lr_t = lr₀ · gamma^⌊t / step_size⌋`` (``torch.optim.lr_scheduler.StepLR``)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self._configure(step_size=step_size, gamma=gamma)
        super().__init__(optimizer)

    def _configure(self, step_size, gamma) -> None:
        self.step_size = _positive_int("step_size", step_size)
        self.gamma = _at_least_zero("gamma", gamma)

    def config(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    """``lr_t = lr₀ · gamma^t`` (``torch.optim.lr_scheduler.ExponentialLR``)."""

    def __init__(self, optimizer, gamma):
        self._configure(gamma=gamma)
        super().__init__(optimizer)

    def _configure(self, gamma) -> None:
        self.gamma = _at_least_zero("gamma", gamma)

    def config(self) -> dict:
        return {"gamma": self.gamma}

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(LRScheduler):
    """``lr_t = eta_min + (lr₀ − eta_min)(1 + cos(π t / T_max)) / 2``
    (``torch.optim.lr_scheduler.CosineAnnealingLR``; past T_max the cosine goes on, so the
    lr climbs back over the next T_max steps, as in PyTorch)."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self._configure(T_max=T_max, eta_min=eta_min)
        super().__init__(optimizer)

    def _configure(self, T_max, eta_min) -> None:
        self.T_max = _positive_int("T_max", T_max)
        self.eta_min = _at_least_zero("eta_min", eta_min)

    def config(self) -> dict:
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def lr_at(self, epoch: int) -> float:
        cosine = (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0
        return self.eta_min + (self.base_lr - self.eta_min) * cosine


class LinearWarmup(LRScheduler):
    """Linear warmup from ``start_factor · lr₀`` to lr₀ over ``warmup_steps`` steps, then
    ``after`` (another closed-form schedule on the same optimizer, restarted at its epoch 0)
    or a constant lr₀. Equals PyTorch's ``LinearLR(start_factor, 1.0, warmup_steps)``, and
    with ``after`` ``SequentialLR([that, after], milestones=[warmup_steps])``. Unlike
    ``LinearLR``, ``start_factor = 0`` is allowed (warmup from zero)."""

    def __init__(self, optimizer, warmup_steps, start_factor=1.0 / 3, after=None):
        self._configure(warmup_steps=warmup_steps, start_factor=start_factor)
        if after is not None:
            if not isinstance(after, LRScheduler):
                raise TypeError(f"after must be a closed-form schedule (StepLR, ExponentialLR, "
                                f"CosineAnnealingLR, ...), got {type(after).__name__}; "
                                "ReduceLROnPlateau can follow a warmup by stepping it "
                                "yourself once the warmup is over")
            if after.optimizer is not optimizer:
                raise ValueError("after must drive the same optimizer as the warmup")
        self.after = after
        super().__init__(optimizer)

    def _configure(self, warmup_steps, start_factor) -> None:
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps)
        factor = _real("start_factor", start_factor)
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor!r}")
        self.start_factor = factor

    def config(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "start_factor": self.start_factor}

    def lr_at(self, epoch: int) -> float:
        if epoch >= self.warmup_steps and self.after is not None:
            return self.after.lr_at(epoch - self.warmup_steps)
        ramp = min(epoch, self.warmup_steps) / self.warmup_steps
        return self.base_lr * (self.start_factor + (1.0 - self.start_factor) * ramp)

    def _apply(self) -> None:
        if self.after is not None:  # keep the follower's counters in step for its state
            self.after.last_epoch = max(0, self.last_epoch - self.warmup_steps)
            self.after._last_lr = self.after.lr_at(self.after.last_epoch)
        super()._apply()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved_after = state.get("after") if isinstance(state, dict) else None
        if (saved_after is None) != (self.after is None):
            raise ValueError("the saved warmup and this one differ in having an 'after' "
                             "schedule: build the warmup as it was saved")
        if self.after is not None:
            self.after.load_state_dict(saved_after)
        super().load_state_dict(state)


class ReduceLROnPlateau(_Schedule):
    """Lower the lr when a metric stops improving (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    ``step(metric)`` once per epoch: a metric better than ``best`` by more than ``threshold``
    (``rel``: ``best · (1 ∓ threshold)``, ``abs``: ``best ∓ threshold``; ``mode`` "min" or
    "max") resets the count of bad epochs; after more than ``patience`` bad epochs the lr
    becomes ``max(lr · factor, min_lr)`` (skipped when that changes it by less than 1e-8),
    and the next ``cooldown`` epochs count no bad epochs. A NaN metric counts as bad.
    """

    _counters = ("last_epoch", "best", "num_bad_epochs", "cooldown_counter")
    eps = 1e-8  # smallest lr change that is applied (PyTorch's default)

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0):
        super().__init__(optimizer)
        self._configure(mode=mode, factor=factor, patience=patience, threshold=threshold,
                        threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _configure(self, mode, factor, patience, threshold, threshold_mode, cooldown,
                   min_lr) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        factor = _real("factor", factor)
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"factor must be in [0, 1) (the lr is multiplied by it), "
                             f"got {factor!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.mode, self.threshold_mode, self.factor = mode, threshold_mode, factor
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.threshold = _at_least_zero("threshold", threshold)
        self.min_lr = _at_least_zero("min_lr", min_lr)

    def config(self) -> dict:
        return {"mode": self.mode, "factor": self.factor, "patience": self.patience,
                "threshold": self.threshold, "threshold_mode": self.threshold_mode,
                "cooldown": self.cooldown, "min_lr": self.min_lr}

    def is_better(self, metric: float, best: float) -> bool:
        """Whether ``metric`` improves on ``best`` by more than the threshold."""
        if self.threshold_mode == "rel":
            if self.mode == "min":
                return metric < best * (1.0 - self.threshold)
            return metric > best * (1.0 + self.threshold)
        if self.mode == "min":
            return metric < best - self.threshold
        return metric > best + self.threshold

    def step(self, metric) -> None:
        """Record one epoch's ``metric`` (a number or 0-d array) and lower the lr if due."""
        current = float(metric)
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.optimizer.lr = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self.optimizer.lr
