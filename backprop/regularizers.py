"""Weight penalties added to the loss, with Keras' formulas (``keras.regularizers``)::

    L1(l1)        penalty = l1 · Σ|θ|          ∂/∂θ = l1 · sign(θ)   (0 at θ = 0)
    L2(l2)        penalty = l2 · Σθ²           ∂/∂θ = 2 · l2 · θ
    L1L2(l1, l2)  the sum of the two

Keras' L2 has no ½: ``L2(l2)`` adds ``2·l2·θ`` to the gradient, which is what PyTorch's
``weight_decay = 2·l2`` adds (``SGD(weight_decay=λ)`` ≡ ``L2(λ/2)`` with plain SGD).

Which parameters: by default (``weights_only=True``) only those with two or more dimensions,
i.e. weight matrices and kernels, as Keras' ``kernel_regularizer`` does; biases and
BatchNorm's scale and shift are vectors and are left alone. ``weights_only=False``
regularizes every parameter given.

Use: ``loss + reg.penalty(params)`` is the objective; after the backward pass
``reg.add_grad(params)`` adds ∂penalty/∂θ to the gradients (writing it when a gradient is
stale, so it works before or after the loss's backward pass).
"""
from __future__ import annotations

from backprop.backend import get_array_module, get_dtype, get_xp
from backprop.concurrency import PerThread, WithPerThread
from backprop.optim import _at_least_zero, _flag, _placement, parameter_list

__all__ = ["Regularizer", "L1", "L2", "L1L2", "from_config"]


class Regularizer(WithPerThread):
    """``l1 · Σ|θ| + l2 · Σθ²`` over the selected parameters (see the module docstring)."""

    def __init__(self, l1=0.0, l2=0.0, weights_only=True):
        self.l1 = _at_least_zero("l1", l1)
        self.l2 = _at_least_zero("l2", l2)
        self.weights_only = _flag("weights_only", weights_only)
        # placement -> flat buffer, grown on demand; per thread, so that one regularizer
        # may serve models trained in several threads at once
        self._ctx = PerThread(type(self).__name__)

    def selected(self, params) -> list:
        """The parameters of ``params`` that this regularizer acts on."""
        params = parameter_list(params)
        return [p for p in params if p.data.ndim >= 2] if self.weights_only else params

    def _scratch_like(self, a):
        key, cache = _placement(a), self._ctx.buffers
        buf = cache.get(key)
        if buf is None or buf.size < a.size:
            buf = cache[key] = get_array_module(a).empty(a.size, dtype=a.dtype)
        return buf[:a.size].reshape(a.shape)

    def penalty(self, params):
        """``l1 · Σ|θ| + l2 · Σθ²`` as a 0-d array on the parameters' device (no host sync)."""
        all_params = parameter_list(params)
        chosen = self.selected(all_params)
        if not all_params:
            return get_xp().zeros((), dtype=get_dtype())
        first = all_params[0].data
        total = get_array_module(first).zeros((), dtype=first.dtype)
        for p in chosen:
            w = p.data
            xp = get_array_module(w)
            if self.l2:
                flat = w.reshape(-1)
                total += self.l2 * xp.vdot(flat, flat)
            if self.l1:
                magnitude = self._scratch_like(w)
                xp.abs(w, out=magnitude)
                total += self.l1 * magnitude.sum()
        return total

    def add_grad(self, params) -> None:
        """Add ``l1 · sign(θ) + 2 · l2 · θ`` to the gradient of each selected parameter
        (in place, no allocation once warm)."""
        if not (self.l1 or self.l2):
            return
        for p in self.selected(params):
            w = p.data
            xp = get_array_module(w)
            grad, accumulate = p.grad_for_write()
            scratch = self._scratch_like(w)
            pending = accumulate  # True: add terms to grad; False: the first term overwrites
            if self.l2:
                out = scratch if pending else grad
                xp.multiply(w, 2.0 * self.l2, out=out)
                if pending:
                    grad += scratch
                pending = True
            if self.l1:
                out = scratch if pending else grad
                xp.sign(w, out=out)
                out *= self.l1
                if pending:
                    grad += scratch

    def config(self) -> dict:
        """JSON-able description; :func:`from_config` rebuilds the regularizer."""
        return {"type": type(self).__name__, "l1": self.l1, "l2": self.l2,
                "weights_only": self.weights_only}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(l1={self.l1}, l2={self.l2}, "
                f"weights_only={self.weights_only})")


class L1(Regularizer):
    """``l1 · Σ|θ|`` (Keras ``L1``, default l1 = 0.01)."""

    def __init__(self, l1=0.01, weights_only=True):
        super().__init__(l1=l1, l2=0.0, weights_only=weights_only)

    def config(self) -> dict:
        return {"type": "L1", "l1": self.l1, "weights_only": self.weights_only}


class L2(Regularizer):
    """``l2 · Σθ²`` (Keras ``L2``, default l2 = 0.01; gradient ``2 · l2 · θ``)."""

    def __init__(self, l2=0.01, weights_only=True):
        super().__init__(l1=0.0, l2=l2, weights_only=weights_only)

    def config(self) -> dict:
        return {"type": "L2", "l2": self.l2, "weights_only": self.weights_only}


class L1L2(Regularizer):
    """``l1 · Σ|θ| + l2 · Σθ²`` (Keras ``L1L2``, defaults 0)."""

    def __init__(self, l1=0.0, l2=0.0, weights_only=True):
        super().__init__(l1=l1, l2=l2, weights_only=weights_only)


_TYPES = {cls.__name__: cls for cls in (Regularizer, L1, L2, L1L2)}


def from_config(config: dict) -> Regularizer:
    """Rebuild a regularizer from :meth:`Regularizer.config`."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in _TYPES:
        raise ValueError(f"unknown regularizer type {kind!r}; expected one of {sorted(_TYPES)}")
    return _TYPES[kind](**config)
