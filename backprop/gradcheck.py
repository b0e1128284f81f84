"""Gradient checking by central finite differences in float64.

For every element ``θᵢ`` of every checked tensor, with ``h = eps``::

    Dₕ,ᵢ = (L(θ + h eᵢ) - L(θ - h eᵢ)) / (θᵢ⁺ - θᵢ⁻)       the numeric gradient, error O(h²)

where ``θᵢ± = fl(θᵢ ± h)`` are the values actually stored, so the step is exact even where
``|θᵢ| ≫ h``. The analytic gradient ``g`` of a tensor passes where, for every element
(``numpy.testing.assert_allclose`` style, with ``rtol = tol``)::

    |gᵢ - Dₕ,ᵢ|  ≤  atolᵢ + tol · S                    S = max(‖g‖∞, ‖Dₕ‖∞)
    atolᵢ = κ · ε · Fᵢ / h                             if that alone covers |gᵢ - Dₕ,ᵢ|
    atolᵢ = κ · (ε · Fᵢ / h + δᵢ + median_{j∈M} δⱼ)    otherwise (i ∈ M)
    δᵢ = |D₂ₕ,ᵢ - Dₕ,ᵢ|   (D₂ₕ: the same quotient with the step 2h)
    ε = 2.2e-16 (float64),  κ = NOISE_FACTOR = 10

``atolᵢ`` estimates the error of ``Dₕ,ᵢ`` itself, which no analytic gradient can beat:

- rounding: each value of ``L`` is computed with an error of about ``ε · Fᵢ``, where
  ``Fᵢ`` is the larger magnitude of the two values at ``θ ± h eᵢ`` (for a layer weighted by
  ``R``: ``Σ |out ⊙ R|``, so that cancellation in the sum counts; for a loss or a callable:
  ``|L|``); the difference quotient divides it by ``h``;
- truncation: ``Dₕ - ∂L = c h² + O(h⁴)``, so ``D₂ₕ - Dₕ = 3 c h² + O(h⁴)``: the two step
  sizes measure it. ``δᵢ`` also holds the rounding of both quotients as it happened; the
  median over ``M`` is added because rounding is alike across a tensor while one
  element's ``δᵢ`` can be small by chance (the median ignores a few elements near a kink).
  ``δᵢ`` is measured (two more evaluations of ``L``) only for the elements ``M`` that the
  rounding term does not clear: the others pass whatever ``δᵢ`` is. ``δ`` never involves
  ``g``, so a wrong gradient cannot widen its own tolerance.

On the layer, model and loss checks of the test suite, and on harder variants (BatchNorm on
batches of two, inputs offset by 1e3 or scaled by 1e4), ``|gᵢ - Dₕ,ᵢ|`` stayed below the
bracket itself (``κ = 1``); ``κ = 10`` is the margin. The ``tol · S`` term keeps the check
relative to the tensor's whole gradient: an element off by more than ``tol · S`` beyond the
noise fails, however small the element is. So a gradient that is zero or tiny next to the
values of ``L`` (a bias in front of a BatchNorm, BatchNorm's input gradient in a batch of
two) is judged against what finite differences resolve, not against zero, and an
exactly-zero gradient passes. ``GradcheckResult.noise`` reports the largest ``atolᵢ`` of
each tensor: to check a small gradient sharply, keep the values of ``L`` (so ``Fᵢ``)
moderate.

Limits: an element within ``2h`` of a kink (ReLU at 0) can get a wide ``atolᵢ`` (the two
steps disagree), since finite differences cannot check it there; and rounding inside ``L``
beyond ``ε · Fᵢ`` (a callable whose value is a small difference of much larger terms) is
seen only through ``δ``, so a tensor of a few elements can then fail falsely.

The error reported for a tensor is the part of the discrepancy that the noise does not
explain, relative to the tensor's largest gradient; the tensor passes where it is ``<= tol``::

    error = maxᵢ max(|gᵢ - Dₕ,ᵢ| - atolᵢ, 0) / S        (0 when S = 0; inf for NaN/inf)

What ``L`` is depends on what is checked:

- a Layer or model: ``L = Σ out ⊙ R`` with a fixed random ``R`` (or ``loss(out, target)``),
  checking ``∂L/∂input`` and every parameter. The model runs in its current mode; running
  statistics (BatchNorm) are restored afterwards, and Dropout layers are checked with a
  fixed mask (``fixed_mask = True``: every evaluation draws the same mask).
- a Loss: ``L = loss(pred, target)``, checking ``∂L/∂pred``.
- a callable ``fn(*inputs) -> (value, grads)``: checking ``grads`` against ``value``.

Every perturbed element is restored to its exact original value. Each element costs two
evaluations of ``L``, four where ``δᵢ`` is measured. Not thread-safe: it perturbs the
parameters in place and fixes Dropout's masks, so no other thread may use the checked layer
meanwhile.
"""
from __future__ import annotations

import contextlib

import numpy as np

from backprop.backend import get_array_module, to_numpy
from backprop.layers import Dropout, Layer
from backprop.losses import Loss

__all__ = ["gradcheck", "GradcheckResult", "GradcheckError"]

EPS_MACHINE = float(np.finfo(np.float64).eps)
NOISE_FACTOR = 10.0  # κ: the margin of atolᵢ over the estimated finite-difference error


class GradcheckError(AssertionError):
    """Analytic and numeric gradients disagree (the message holds the table)."""


class GradcheckResult:
    """Per tensor: name, shape, largest gradient and error (see the module docstring);
    ``ok``, ``worst``. ``noise[name]`` is the tensor's largest ``atolᵢ``: differences below
    it are within what finite differences resolve."""

    def __init__(self, rows, tol, noise=None):
        self.rows, self.tol = rows, tol  # rows: (name, shape, max |grad|, error)
        self.noise = dict(noise or {})

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
        head = (f"gradcheck {'OK' if self.ok else 'FAILED'}: worst error {self.worst:.2e} "
                f"(tolerance {self.tol:.0e})")
        width = max([len("tensor")] + [len(r[0]) for r in self.rows])
        lines = [head, f"  {'tensor':<{width}}  {'shape':<14}  {'max|grad|':>9}  "
                       f"{'fd noise':>8}  {'error':>8}"]
        for name, shape, scale, err in self.rows:
            flag = "" if err <= self.tol else "  <-- FAIL"
            noise = self.noise.get(name, float("nan"))
            lines.append(f"  {name:<{width}}  {str(shape):<14}  {scale:9.2e}  {noise:8.1e}  "
                         f"{err:8.1e}{flag}")
        lines.append("  error: |analytic - numeric| beyond the fd noise, relative to max|grad|")
        return "\n".join(lines)

    __repr__ = __str__


def gradcheck(fn, inputs, *, target=None, loss=None, eps: float = 1e-6, tol: float = 1e-6,
              seed: int = 0, raise_on_fail: bool = False) -> GradcheckResult:
    """Compare analytic gradients with central differences (the criterion and the reported
    error are defined in the module docstring).

    ``fn`` is a Layer/model (``inputs`` = the input batch; optional ``loss`` and ``target``),
    a Loss (``inputs`` = predictions, ``target`` required) or a callable returning
    ``(value, grads)`` (``inputs`` = one array or a tuple of arrays). Layers must hold
    float64 parameters. ``eps`` is the step ``h``; ``tol`` the relative tolerance against
    each tensor's largest gradient (the absolute one comes from the finite-difference
    noise). Raises :class:`GradcheckError` on failure if ``raise_on_fail``.
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

        def value():
            v = float(fn.forward(pred, target))
            return v, abs(v)
    elif callable(fn):
        single = not isinstance(inputs, (tuple, list))
        arrays = [_float64(a, get_array_module(a)) for a in ([inputs] if single else inputs)]
        _, grads = fn(*arrays)
        grads = [grads] if single else list(grads)
        names = ["input"] if single else [f"input{i}" for i in range(len(arrays))]
        tensors = [(n, a, g.copy()) for n, a, g in zip(names, arrays, grads)]

        def value():
            v = float(fn(*arrays)[0])
            return v, abs(v)
    else:
        raise TypeError(f"gradcheck checks a Layer, a Loss or a callable; got {type(fn).__name__}")
    rows = [_compare(name, arr, grad, value, eps) for name, arr, grad in tensors]
    return _result(rows, tol, raise_on_fail)


def _result(rows, tol, raise_on_fail):
    result = GradcheckResult([r[:4] for r in rows], tol, {r[0]: r[4] for r in rows})
    if raise_on_fail and not result.ok:
        raise GradcheckError(str(result))
    return result


def _float64(a, xp):
    return xp.array(to_numpy(a) if xp is np else a, dtype=np.float64)


def _layer(layer, x, loss, target, rng):
    """``(value, tensors)``: ``value()`` returns ``(L, F)`` (F: the magnitude that sets the
    rounding error of L) and ``tensors`` holds ``(name, array, analytic gradient)``."""
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

        def value():
            terms = layer.forward(x) * weights
            return float(terms.sum()), float(xp.abs(terms).sum())
    else:
        loss.forward(out, target)
        grad = loss.backward()

        def value():
            v = float(loss.forward(layer.forward(x), target))
            return v, abs(v)
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
    """``(name, shape, S, error, max atolᵢ)`` of one tensor (see the module docstring)."""
    analytic = to_numpy(analytic).astype(np.float64)
    if analytic.shape != tuple(arr.shape):
        raise ValueError(f"gradient of {name!r} has shape {analytic.shape}; expected "
                         f"{tuple(arr.shape)}, the shape of the tensor")
    fine, mag = np.empty(arr.shape), np.empty(arr.shape)
    for idx in np.ndindex(*arr.shape):
        fine[idx], mag[idx] = _quotient(arr, idx, eps, value)
    with np.errstate(invalid="ignore", over="ignore"):
        rounding = NOISE_FACTOR * EPS_MACHINE * mag / eps
        diff = np.abs(analytic - fine)
        # δ only where the rounding term alone does not clear the element: elsewhere the
        # element passes whatever δ is, so the step 2h would cost two evaluations for nothing
        measured = ~(diff <= rounding)
        delta = np.zeros(arr.shape)
        for idx in zip(*np.nonzero(measured)):
            delta[idx] = abs(_quotient(arr, idx, 2.0 * eps, value)[0] - fine[idx])
        floor = float(np.median(delta[measured])) if measured.any() else 0.0
        atol = rounding + NOISE_FACTOR * np.where(measured, delta + floor, 0.0)
        scale = max(float(np.abs(analytic).max(initial=0.0)),
                    float(np.abs(fine).max(initial=0.0)))
        excess = float(np.maximum(diff - atol, 0.0).max(initial=0.0))
    if not (np.isfinite(diff).all() and np.isfinite(atol).all()):
        err = float("inf")
    else:
        err = excess / scale if excess > 0.0 else 0.0
    return name, tuple(arr.shape), scale, err, float(atol.max(initial=0.0))


def _quotient(arr, idx, step, value):
    """``(D, F)``: the central difference of ``L`` in element ``idx`` of ``arr`` with the
    given step, and the larger magnitude of the two values; the element is restored."""
    orig = float(arr[idx])
    up, down = orig + step, orig - step
    arr[idx] = up
    f_up, m_up = value()
    arr[idx] = down
    f_down, m_down = value()
    arr[idx] = orig
    # divide by the stored step: fl(θ + h) - fl(θ - h) is exact, 2h is not when |θ| ≫ h
    return (f_up - f_down) / (up - down), max(m_up, m_down)
