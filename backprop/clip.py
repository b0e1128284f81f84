"""Gradient norms and clipping, with PyTorch's semantics (``torch.nn.utils.clip_grad_*_``).

::

    total = ‖(‖g₁‖_p, ‖g₂‖_p, …)‖_p        (= ‖all gradients concatenated‖_p; p = inf: max |g|)
    clip_grad_norm:  g ← g · c  with  c = min(1, max_norm / (total + 1e-6))
    clip_grad_value: g ← clamp(g, −v, v)

A stale gradient (``zero_grad`` with no backward since) counts as zeros. When the gradients
of ``params`` tile one flat buffer (an optimizer re-homed them there: back to back, or with
gaps of zeros that keep each one aligned, :func:`backprop.parameter.flat_layout`), the norm
and the scaling are single passes over that buffer instead of one per parameter (zeros add
nothing to a norm and stay zero when scaled or clamped).

The norm is computed in the gradients' dtype and returned as a Python float (one host
synchronisation); PyTorch computes the coefficient in a float32 tensor, this module in a
Python float, which can differ in the last bit. A non-finite total scales the gradients by
NaN or 0 exactly as PyTorch does, unless ``error_if_nonfinite`` raises first: check the
returned norm to skip a step whose gradients blew up.
"""
from __future__ import annotations

import math

import numpy as np

from backprop.backend import ALIGNMENT, get_array_module
from backprop.optim import parameter_list

__all__ = ["grad_norm", "clip_grad_norm", "clip_grad_value"]


def _gradients(params) -> list:
    """The gradient arrays of ``params`` (stale ones zeroed), merged into their common flat
    buffer when they tile it with nothing but zeros between them."""
    grads = [p.grad for p in parameter_list(params)]
    if not grads:
        return grads
    base, dtype = grads[0].base, grads[0].dtype
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return grads
    # one run of consecutive gradients in one buffer (the optimizer's flat buffer, which
    # may itself be an aligned view of a larger allocation: backend.empty_aligned)
    start = end = _address(grads[0])
    origin, raw = _address(base), base.view(np.uint8)
    for g in grads:
        if g.base is not base or g.dtype != dtype or not g.flags.c_contiguous:
            return grads
        at = _address(g)
        if at != end and not (end < at < end + ALIGNMENT and
                              not bool(raw[end - origin:at - origin].any())):
            return grads
        end = at + g.nbytes
    first = start - origin
    return [raw[first:first + end - start].view(dtype)]


def _address(a) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def _norm_type(norm_type) -> float:
    value = float("inf") if norm_type in ("inf", "Inf") else float(norm_type)
    if not value > 0:
        raise ValueError(f"norm_type must be > 0 or 'inf', got {norm_type!r}")
    return value


def _total_norm(grads, p: float) -> float:
    if not grads:
        return 0.0
    xp = get_array_module(grads[0])
    if p == math.inf:
        parts = [xp.maximum(g.max(), -g.min()) for g in grads]  # max |g| without a temporary
    elif p == 2.0:
        parts = [xp.vdot(g.ravel(), g.ravel()) for g in grads]
    else:
        parts = [(xp.abs(g) ** p).sum() for g in grads]
    if any(get_array_module(part) is not xp for part in parts):  # parameters on several devices
        parts = [float(part) for part in parts]
    if p == math.inf:
        total = parts[0]
        for part in parts[1:]:
            total = xp.maximum(total, part)  # propagates NaN, unlike Python's max
        return float(total)
    total = float(sum(parts))
    return math.sqrt(total) if p == 2.0 else total ** (1.0 / p)


def grad_norm(params, norm_type=2.0) -> float:
    """The ``norm_type``-norm of all gradients of ``params`` taken together (a float)."""
    return _total_norm(_gradients(params), _norm_type(norm_type))


def clip_grad_norm(params, max_norm, norm_type=2.0, error_if_nonfinite=False) -> float:
    """Scale the gradients in place so that their total norm is at most ``max_norm``
    (factor ``max_norm / (total + 1e-6)`` when that is below 1). Returns the total norm
    before clipping. ``error_if_nonfinite``: raise instead when the norm is NaN or inf."""
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    p = _norm_type(norm_type)
    grads = _gradients(params)
    total = _total_norm(grads, p)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {p} of the gradients is non-finite ({total}), so it cannot"
            " be clipped; to scale the gradients by it anyway pass error_if_nonfinite=False")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0 or math.isnan(coef):
        for g in grads:
            g *= coef
    return total


def clip_grad_value(params, clip_value) -> None:
    """Clamp every gradient element of ``params`` to ``[-clip_value, clip_value]`` in place."""
    v = float(clip_value)
    if not v >= 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value!r}")
    for g in _gradients(params):
        get_array_module(g).clip(g, -v, v, out=g)
