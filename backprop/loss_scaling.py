"""Dynamic loss scaling for float16 mixed precision (``torch.amp.GradScaler``'s algorithm).

float16 keeps 11 significant bits but only the range 6e-8 .. 65504: the backward pass's
``δ₁₆`` of a trained network is often below the smallest float16, and becomes zero. Scaling
the loss by ``S`` scales every gradient by ``S`` (backpropagation is linear in the loss
gradient), which lifts them into range; the float32 gradients are divided by ``S`` before
the update. ``S`` is chosen dynamically::

    each step:  δᴸ ← S·δᴸ ; backward ; g ← g / S (float32)
                if any g is inf/NaN:  skip the update,  S ← S·backoff,  good ← 0
                else:                 update,  good ← good + 1
                                      if good = growth_interval:  S ← S·growth,  good ← 0

so ``S`` sits just below the largest scale that does not overflow. bfloat16 has float32's
range and needs none of this (``bf16-mixed`` does not scale). ``fit(precision="fp16-mixed")``
uses a :class:`GradScaler` by itself; a hand-written loop uses it as in PyTorch::

    scaler = bp.GradScaler()
    with bp.autocast("float16"):
        out = model.forward(x)
        loss.forward(out, y)
        model.backward(scaler.scale(loss.backward()))
        scaler.step(optimizer)      # unscales, skips the step if a gradient is inf/NaN
        scaler.update()
        optimizer.zero_grad()

Not thread-safe: one scaler per training loop.
"""
from __future__ import annotations

import math

import numpy as np

from backprop import checks
from backprop.backend import get_array_module

__all__ = ["GradScaler"]


class GradScaler:
    """Dynamic loss scale (defaults as ``torch.amp.GradScaler``): starts at ``init_scale``,
    multiplied by ``backoff_factor`` after a step whose gradients overflowed (the step is
    skipped) and by ``growth_factor`` after ``growth_interval`` steps in a row without.
    ``enabled=False`` makes every method a pass-through (scale 1, no checks)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        self._scale = checks.positive("init_scale", init_scale)
        self.growth_factor = checks.positive("growth_factor", growth_factor)
        if self.growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1; got {growth_factor!r}")
        self.backoff_factor = checks.positive("backoff_factor", backoff_factor)
        if self.backoff_factor >= 1.0:
            raise ValueError(f"backoff_factor must be < 1; got {backoff_factor!r}")
        self.growth_interval = checks.integer("growth_interval", growth_interval, minimum=1)
        self.enabled = checks.flag("enabled", enabled)
        self._good_steps = 0
        self.skipped_steps = 0  # steps skipped because a gradient overflowed, in total
        self._found_inf = {}  # id(optimizer) -> bool, for the current iteration

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    def is_enabled(self) -> bool:
        return self.enabled

    def scale(self, delta):
        """Multiply the loss gradient ``delta`` (the array ``loss.backward()`` returned) by
        the scale, in place; returns it, to pass to ``model.backward``."""
        if self.enabled:
            delta *= delta.dtype.type(self._scale)
        return delta

    def unscale_(self, optimizer) -> bool:
        """Divide the gradients of ``optimizer``'s parameters by the scale, in place (once
        per iteration: a second call raises); returns True when any is inf or NaN."""
        key = id(optimizer)
        if key in self._found_inf:
            raise RuntimeError("unscale_() was already called for this optimizer since the "
                               "last update()")
        found = False
        if self.enabled:
            inv = 1.0 / self._scale
            for g in optimizer.flat_gradients():
                xp = get_array_module(g)
                g *= g.dtype.type(inv)
                if not bool(xp.isfinite(g).all()):
                    found = True
        self._found_inf[key] = found
        return found

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless the unscaled gradients hold an inf or NaN (then the
        step is skipped and None returned). Unscales first if :meth:`unscale_` was not
        called."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)]:
            self.skipped_steps += 1
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Adjust the scale after an iteration (see the module docstring), or set it to
        ``new_scale``."""
        if not self.enabled:
            return
        if new_scale is not None:
            self._scale = checks.positive("new_scale", new_scale)
        elif any(self._found_inf.values()):
            self._scale *= self.backoff_factor
            self._good_steps = 0
        elif self._found_inf:
            self._good_steps += 1
            if self._good_steps == self.growth_interval:
                grown = self._scale * self.growth_factor
                if math.isfinite(grown) and grown <= np.finfo(np.float32).max:
                    self._scale = grown
                self._good_steps = 0
        self._found_inf = {}

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "good_steps": self._good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self._scale = checks.positive("scale", state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._good_steps = int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return (f"GradScaler(scale={self.get_scale()}, growth_interval={self.growth_interval},"
                f" enabled={self.enabled})")
