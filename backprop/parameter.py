"""Parameters: a tensor, its gradient, and a stable name such as ``"0.W"``.

Gradients accumulate (``grad += ∂L/∂θ``) as in PyTorch. ``zero_grad`` does not touch memory:
it marks the gradient stale, and the next backward overwrites it instead of adding to it,
which saves a pass over every gradient per step. Reading ``.grad`` while it is stale gives
zeros, so users never see the difference.

Optimizers may re-home the parameters of a model into one flat buffer (:func:`flatten`) so
that one kernel launch updates them all; ``.data`` and ``.grad`` then become views of it,
on the CPU each starting on a ``backend.ALIGNMENT``-byte boundary
(:func:`flat_layout`).
Layers therefore read ``param.data`` on every call and never keep the array itself.
"""
from __future__ import annotations

import numpy as np

from backprop.backend import ALIGNMENT, aligned, empty_aligned, get_array_module


class Parameter:
    """A trainable tensor: ``data``, ``grad`` (same shape and dtype) and ``name``."""

    __slots__ = ("data", "_grad", "_stale", "name", "_trainer", "_lp", "_lp_for")

    def __init__(self, data, name: str = ""):
        self.data = data
        self._grad = None
        self._stale = True
        self.name = name
        self._trainer = None  # the thread whose fit() trains it (backprop.concurrency)
        # mixed precision (backprop.precision): the low-precision copy of ``data`` and
        # ``(data, generation)`` it was made from (None: stale); derived, never saved
        self._lp = None
        self._lp_for = None

    def __getstate__(self):
        return {"data": self.data, "_grad": self._grad, "_stale": self._stale,
                "name": self.name}  # a copy is not being trained

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        # a copy or an unpickled array starts wherever NumPy put it (backend.aligned)
        self.data = aligned(self.data)
        self._trainer = None
        self._lp = self._lp_for = None

    def mark_changed(self) -> None:
        """Say that ``data`` was written in place outside the optimizer (as
        ``load_state_dict`` does): its low-precision copy (mixed precision) is cast again
        at its next use."""
        self._lp_for = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def grad(self):
        """∂L/∂data accumulated since the last ``zero_grad`` (zeros if none)."""
        buf = self._buffer()
        if self._stale:
            buf.fill(0)
            self._stale = False
        return buf

    @grad.setter
    def grad(self, value):
        buf = self._buffer()
        buf[...] = value
        self._stale = False

    def _buffer(self):
        grad, data = self._grad, self.data
        if grad is None or type(grad) is not type(data) or grad.shape != data.shape or \
                grad.dtype != data.dtype:  # none yet, or data moved to another device/dtype
            self._grad = get_array_module(data).zeros_like(data)
            self._stale = False
        return self._grad

    def grad_for_write(self):
        """``(buffer, accumulate)`` for a backward pass: write into ``buffer`` when
        ``accumulate`` is False (the old content is stale), add to it when True."""
        buf = self._buffer()
        accumulate = not self._stale
        self._stale = False
        return buf, accumulate

    def zero_grad(self) -> None:
        """Forget the accumulated gradient (no memory pass; see the module docstring)."""
        self._stale = True

    def rebind(self, data, grad) -> None:
        """Make ``data``/``grad`` (views of flat buffers) the storage of this parameter,
        copying the current values into them."""
        data[...] = self.data
        if self._grad is not None and not self._stale:
            grad[...] = self._grad
            stale = False
        else:
            stale = True
        self.data, self._grad, self._stale = data, grad, stale

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


def flat_layout(params, itemsize: int, on_cpu: bool = True) -> tuple[list[int], int]:
    """Where each of ``params`` starts in a flat buffer of ``itemsize``-byte elements, and
    the buffer's length: parameter after parameter, on the CPU each start rounded up to a
    multiple of ``backend.ALIGNMENT`` bytes, so that every view is as aligned
    as the parameters a layer makes (a parameter of 45 floats would otherwise put the next
    one off a cache line, which the one-row products of the inference plans pay on every
    load). On a GPU the parameters lie back to back.

    The gaps (under ``ALIGNMENT`` bytes per parameter) hold zeros in data and gradient, and
    every optimizer's update keeps a zero weight with a zero gradient at zero."""
    step = max(1, ALIGNMENT // itemsize) if on_cpu else 1
    starts, offset = [], 0
    for p in params:
        starts.append(offset)
        offset += -(-p.size // step) * step
    return starts, offset


def flatten(params):
    """Move ``params`` (same device and dtype) into one flat data and one flat grad buffer.

    Each parameter's ``data``/``grad`` become reshaped views of the buffers, so an optimizer
    can update every parameter in one kernel launch, at the starts given by
    :func:`flat_layout`. Returns ``(flat_data, flat_grad)``.
    """
    params = list(params)
    if not params:
        raise ValueError("flatten() got no parameters")
    xp = get_array_module(params[0].data)
    dtype = params[0].data.dtype
    for p in params:
        if p.data.dtype != dtype or get_array_module(p.data) is not xp:
            raise TypeError(
                f"parameter {p.name!r} is {p.data.dtype} on {get_array_module(p.data).__name__}, "
                f"but {params[0].name!r} is {dtype} on "
                f"{xp.__name__}: all parameters of one optimizer must share dtype and device")
    starts, total = flat_layout(params, dtype.itemsize, on_cpu=xp is np)
    # aligned: the first parameter's gradient is a product's output (docs/bf16.md); zeroed:
    # the gaps between parameters stay zero
    flat_data = empty_aligned(xp, total, dtype, zero=True)
    flat_grad = empty_aligned(xp, total, dtype, zero=True)
    for p, start in zip(params, starts):
        n = p.size
        p.rebind(flat_data[start:start + n].reshape(p.shape),
                 flat_grad[start:start + n].reshape(p.shape))
    return flat_data, flat_grad
