"""Gradient checking by central finite differences in float64.

For every element ``θᵢ`` of every checked tensor::

    numeric_i = (L(θ + h eᵢ) - L(θ - h eᵢ)) / 2h           (h = eps, error O(h²))

and the error of a tensor is ``max_i |analytic_i - numeric_i| / max(‖analytic‖∞,
‖numeric‖∞, 1e-3)``: relative to the tensor's largest gradient, absolute below 1e-3.

What ``L`` is depends on what is checked:
- a Layer or model: ``L = Σ out ⊙ R`` with a fixed random ``R`` (or ``loss(out, target)``),
  checking ``∂L/∂input`` and every parameter. The model runs in its current mode; running
  statistics (BatchNorm) are restored afterwards, and Dropout layers are checked with a
  fixed mask (``fixed_mask = True``: every evaluation draws the same mask).
- a Loss: ``L = loss(pred, target)``, checking ``∂L/∂pred``.
- a callable ``fn(*inputs) -> (value, grads)``: checking ``grads`` against ``value``.
Every perturbed element is restored to its exact original value.
"""
from __future__ import annotations

import contextlib

import numpy as np

from backprop.backend import get_array_module, to_numpy
from backprop.layers import Dropout, Layer
from backprop.losses import Loss

__all__ = ["gradcheck", "GradcheckResult", "GradcheckError"]

SCALE_FLOOR = 1e-3


class GradcheckError(AssertionError):
    """Analytic and numeric gradients disagree (the message holds the table)."""


class GradcheckResult:
    """Per tensor: name, shape, largest gradient and relative error; ``ok``, ``worst``."""

    def __init__(self, rows, tol):
        self.rows, self.tol = rows, tol  # rows: (name, shape, max |grad|, error)

    @property
    def errors(self) -> dict:
        return {name: err for name, _, _, err in self.rows}

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        return self.worst <= self.tol  # False for NaN

    def __str__(self) -> str:
        head = (f"gradcheck {'OK' if self.ok else 'FAILED'}: worst relative error "
                f"{self.worst:.2e} (tolerance {self.tol:.0e})")
        width = max([len("tensor")] + [len(r[0]) for r in self.rows])
        lines = [head, f"  {'tensor':<{width}}  {'shape':<14}  {'max|grad|':>9}  {'error':>8}"]
        for name, shape, scale, err in self.rows:
            flag = "" if err <= self.tol else "  <-- FAIL"
            lines.append(f"  {name:<{width}}  {str(shape):<14}  {scale:9.2e}  {err:8.1e}{flag}")
        return "\n".join(lines)

    __repr__ = __str__


def gradcheck(fn, inputs, *, target=None, loss=None, eps: float = 1e-6, tol: float = 1e-6,
              seed: int = 0, raise_on_fail: bool = False) -> GradcheckResult:
    """Compare analytic gradients with central differences (see the module docstring).

    ``fn`` is a Layer/model (``inputs`` = the input batch; optional ``loss`` and ``target``),
    a Loss (``inputs`` = predictions, ``target`` required) or a callable returning
    ``(value, grads)`` (``inputs`` = one array or a tuple of arrays). Layers must hold
    float64 parameters. Raises :class:`GradcheckError` on failure if ``raise_on_fail``.
    """
    if isinstance(fn, Layer):
        with _deterministic(fn):
            value, tensors = _layer(fn, inputs, loss, target, np.random.default_rng(seed))
            rows = [_compare(name, arr, grad, value, eps) for name, arr, grad in tensors]
        return _result(rows, tol, raise_on_fail)
    if isinstance(fn, Loss):
        if target is None:
            raise ValueError("gradcheck of a Loss needs target=")
        pred = _float64(inputs, get_array_module(inputs))
        fn.forward(pred, target)
        tensors = [("pred", pred, fn.backward().copy())]
        value = lambda: float(fn.forward(pred, target))  # noqa: E731
    elif callable(fn):
        single = not isinstance(inputs, (tuple, list))
        arrays = [_float64(a, get_array_module(a)) for a in ([inputs] if single else inputs)]
        _, grads = fn(*arrays)
        grads = [grads] if single else list(grads)
        names = ["input"] if single else [f"input{i}" for i in range(len(arrays))]
        tensors = [(n, a, g.copy()) for n, a, g in zip(names, arrays, grads)]
        value = lambda: float(fn(*arrays)[0])  # noqa: E731
    else:
        raise TypeError(f"gradcheck checks a Layer, a Loss or a callable; got {type(fn).__name__}")
    rows = [_compare(name, arr, grad, value, eps) for name, arr, grad in tensors]
    return _result(rows, tol, raise_on_fail)


def _result(rows, tol, raise_on_fail):
    result = GradcheckResult(rows, tol)
    if raise_on_fail and not result.ok:
        raise GradcheckError(str(result))
    return result


def _float64(a, xp):
    return xp.array(to_numpy(a) if xp is np else a, dtype=np.float64)


def _layer(layer, x, loss, target, rng):
    params = layer.parameters()
    for p in params:
        if p.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 parameters; {p.name!r} is {p.dtype}: build "
                            "the model with dtype='float64' or call model.to(dtype='float64')")
    xp = get_array_module(params[0].data) if params else get_array_module(x)
    x = _float64(x, xp)
    out = layer.forward(x)
    if loss is None:
        weights = xp.asarray(rng.standard_normal(out.shape))
        grad = weights.copy()
        value = lambda: float((layer.forward(x) * weights).sum())  # noqa: E731
    else:
        loss.forward(out, target)
        grad = loss.backward()
        value = lambda: float(loss.forward(layer.forward(x), target))  # noqa: E731
    layer.zero_grad()
    dx = layer.backward(grad, need_input_grad=True)
    tensors = [("input", x, dx.copy())]
    tensors += [(p.name, p.data, p.grad.copy()) for p in params]
    return value, tensors


@contextlib.contextmanager
def _deterministic(layer):
    """Fix every Dropout mask during the check; restore buffers and flags afterwards."""
    buffers = {name: b.copy() for name, b in layer.named_buffers()}
    dropouts = [(m, m.fixed_mask) for m in layer.modules() if isinstance(m, Dropout)]
    for m, _ in dropouts:
        m.fixed_mask = True
    try:
        yield
    finally:
        for name, arr in layer.named_buffers():
            arr[...] = buffers[name]
        for m, fixed in dropouts:
            m.fixed_mask = fixed


def _compare(name, arr, analytic, value, eps):
    numeric = np.empty(arr.shape)
    for idx in np.ndindex(*arr.shape):
        orig = float(arr[idx])
        arr[idx] = orig + eps
        plus = value()
        arr[idx] = orig - eps
        minus = value()
        arr[idx] = orig
        numeric[idx] = (plus - minus) / (2.0 * eps)
    analytic = to_numpy(analytic).astype(np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"gradient of {name!r} has shape {analytic.shape}; expected "
                         f"{numeric.shape}, the shape of the tensor")
    scale = max(float(np.abs(analytic).max(initial=0.0)), float(np.abs(numeric).max(initial=0.0)))
    diff = float(np.abs(analytic - numeric).max(initial=0.0))
    err = diff / max(scale, SCALE_FLOOR) if np.isfinite(diff) else float("inf")
    return name, tuple(arr.shape), scale, err
