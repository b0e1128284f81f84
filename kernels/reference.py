"""Reference implementations: plain ``xp`` (NumPy or CuPy) math, the oracle of every kernel.

Every fused kernel in ``numba_cpu``, ``numba_cuda`` and ``cupy_kernels`` has the signature of
the function of the same name here and must agree with it (tests/test_kernels.py). These
functions favour clarity over speed: they may allocate temporaries, but they honour the
``out=`` contract (results are written into the buffers given, which may alias inputs where
a docstring says so) so that they are drop-in replacements for the fused versions.

Conventions shared by all backends
- 2-D batches are C-contiguous ``(N, M)`` arrays, float32 or float64; vectors are ``(M,)``.
- Hyperparameters are Python scalars passed at call time (never baked into kernel source).
- ``accumulate=True`` adds into a gradient buffer instead of overwriting it.
- Activations are named by strings: ``ACTIVATIONS``; ``NEEDS_Z`` lists those whose
  derivative is computed from the pre-activation ``Z`` rather than from ``A``.
- Low-precision copies (mixed precision, ``kernels/lowp.py``): the ops whose float32 result
  a matrix product reads next take one more optional output, ``out_lp`` / ``delta_lp`` /
  ``data_lp``: a ``uint16`` (bfloat16 bits) or ``float16`` array of the result's shape, into
  which every backend writes ``lowp(result)`` of each element, from exactly the float32 value
  it stores, in the same pass (here: after it, by :func:`lowp.to_lowp`, the oracle of the
  conversion). bfloat16 bits are identical in every backend (NaN payloads included);
  float16 is IEEE round to nearest even (NaN stays NaN; its payload may differ). Checked
  before any work (:func:`check_lowp`): float32 data only, and a C-contiguous buffer of its
  own, overlapping no argument. None (the default) changes nothing.
"""
from __future__ import annotations

import math

import numpy as np

from . import lowp
from .activations import (ACTIVATIONS, GELU_C, GELU_K, INV_SQRT2, INV_SQRT_2PI,  # noqa: F401
                          NEEDS_Z, RECORDS, Math)


def _xp(a):
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _erf(xp, x):
    if xp is np:
        return np.frompyfunc(math.erf, 1, 1)(x).astype(x.dtype)
    from cupyx.scipy.special import erf

    return erf(x)


def sigmoid(xp, z):
    """Stable logistic ``1/(1+exp(-z))``: ``exp`` only ever sees ``-|z|`` (no overflow)."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _softplus(xp, z):
    return xp.log1p(xp.exp(-xp.abs(z))) + xp.maximum(z, 0)


def _ndtr(xp, z):
    return 0.5 * (1.0 + _erf(xp, z * INV_SQRT2))


_MATHS: dict = {}


def _math(xp) -> Math:
    """The array math of ``xp`` for the formula builders of ``kernels/activations.py``."""
    if xp not in _MATHS:
        _MATHS[xp] = Math(
            K=float, cast=float, where=xp.where, abs=xp.abs, exp=xp.exp, expm1=xp.expm1,
            tanh=xp.tanh, sigmoid=lambda z: sigmoid(xp, z),
            softplus=lambda z: _softplus(xp, z), ndtr=lambda z: _ndtr(xp, z),
            ndtr_pdf=lambda z: (_ndtr(xp, z), xp.exp(-0.5 * z * z) * INV_SQRT_2PI))
    return _MATHS[xp]


def check_shape(op: str, shape, **arrays) -> None:
    """Each of ``arrays`` (None aside) has ``shape``, or a ``ValueError`` naming it: the GPU
    backends' kernels index every operand by the shape of the first, so a smaller one would be
    read or written past its end (NumPy's broadcasting catches a mismatch here)."""
    for name, a in arrays.items():
        if a is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got "
                             f"{tuple(a.shape)}")


def check_lowp(op: str, name: str, out_lp, source, *others) -> None:
    """``out_lp`` may receive the low-precision copy of the float32 array ``source``
    (:func:`lowp.check_lowp`: type, float32 source, dtype, shape, C-contiguity, writeable,
    no overlap with ``source``) and overlaps none of ``others`` (the call's other arrays,
    None ignored): a copy written over an input would corrupt what the pass still reads."""
    lowp.check_lowp(op, name, out_lp, source)
    xp = _xp(out_lp)
    for other in others:
        if other is not None and xp.may_share_memory(out_lp, other):
            raise ValueError(f"{op}: {name} overlaps another argument of the call; pass a "
                             "separate buffer")


def _record(act: str):
    if act not in RECORDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return RECORDS[act]


def _as_array(xp, value, like):
    """A formula's value as a fresh array shaped and typed like ``like`` (a constant
    derivative is a scalar; the identity returns its argument)."""
    out = xp.empty_like(like)
    out[...] = value
    return out


def activate(xp, z, act: str, alpha: float = 0.0):
    """``σ(z)`` for an activation name (allocates; the oracle of the forward epilogue): the
    formula of its record in ``kernels/activations.py``, on arrays."""
    return _as_array(xp, _record(act).forward(_math(xp))(z, alpha), z)


def derivative(xp, a, z, act: str, alpha: float = 0.0):
    """``σ'`` from ``a = σ(z)``, or from ``z`` for activations in ``NEEDS_Z``."""
    record = _record(act)
    s = z if record.needs_z else a
    return _as_array(xp, record.derivative(_math(xp))(s, alpha), s)


# ---------------------------------------------------------------------------------------
# 1-2. Dense epilogues
def bias_act_forward(z, b, out, act: str, alpha: float = 0.0, out_lp=None):
    """Forward epilogue of ``Dense``: ``A = σ(Z + b)``.

    ``z`` (N, M) holds ``X Wᵀ``; ``b`` (M,) or None. Writes ``out ← σ(z + b)``. When the
    activation is in ``NEEDS_Z`` and ``b`` is given, also writes ``z ← z + b`` (backward
    needs the pre-activation); otherwise ``z`` is only read, and ``out`` may be ``z`` itself.
    ``out_lp`` (float32 data only): None, or a ``uint16`` (bfloat16 bits) or ``float16``
    array of ``z``'s shape that also receives ``lowp(out)`` (``kernels/lowp.py``), the next
    layer's low-precision input. Returns ``out``.
    """
    if out_lp is not None:
        check_lowp("bias_act_forward", "out_lp", out_lp, out, z, b)
    xp = _xp(z)
    pre = z if b is None else z + b
    a = activate(xp, pre, act, alpha)
    if act in NEEDS_Z and b is not None:
        z[...] = pre
    out[...] = a
    if out_lp is not None:
        lowp.to_lowp(out, out_lp)
    return out


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False,
                      delta_lp=None):
    """Backward epilogue of ``Dense``: ``δ = ∂L/∂A ⊙ σ'(Z)`` and ``∂L/∂b = Σ_rows δ``.

    ``σ'`` is computed from ``a`` for activations outside ``NEEDS_Z`` and from ``z`` (the
    pre-activation, bias included) for those in it; the unused one may be None.
    ``delta_out`` may be ``da`` (in place). ``db_out`` (M,) receives the column sums of δ
    (added to it when ``accumulate``); None skips the bias gradient. ``delta_lp`` (float32
    data only): None, or a ``uint16`` (bfloat16 bits) or ``float16`` array of ``da``'s shape
    that also receives ``lowp(δ)`` (``kernels/lowp.py``), the operand of the products
    ``∂W = δᵀX`` and ``∂X = δW``. Returns ``delta_out``.
    """
    if delta_lp is not None:
        check_lowp("bias_act_backward", "delta_lp", delta_lp, delta_out, da, a, z, db_out)
    xp = _xp(da)
    d = derivative(xp, a, z, act, alpha)
    delta = da * d
    delta_out[...] = delta
    if delta_lp is not None:
        lowp.to_lowp(delta_out, delta_lp)
    if db_out is not None:
        s = delta.sum(axis=0, dtype=np.float64).astype(db_out.dtype)
        if accumulate:
            db_out += s
        else:
            db_out[...] = s
    return delta_out


# ---------------------------------------------------------------------------------------
# Softmax (the layer) and softmax cross-entropy (the loss)
def softmax_forward(x, out):
    """Row softmax ``y_ij = exp(x_ij - m_i) / Σ_k exp(x_ik - m_i)`` with ``m_i = max_k x_ik``.
    ``out`` may be ``x``. Returns ``out``."""
    xp = _xp(x)
    e = xp.exp(x - x.max(axis=1, keepdims=True))
    out[...] = e / e.sum(axis=1, keepdims=True)
    return out


def softmax_backward(dy, y, out):
    """Softmax Jacobian-vector product ``dx = y ⊙ (dy - Σ_k dy_k y_k)`` per row.
    ``out`` may be ``dy``. Returns ``out``."""
    out[...] = y * (dy - (dy * y).sum(axis=1, keepdims=True))
    return out


def softmax_xent(logits, labels, smoothing: float, scale: float, grad_out, loss_out):
    """Softmax cross-entropy from logits with integer labels, loss and gradient in one pass.

    With ``m = max_k z_k``, ``lse = m + log Σ_k exp(z_k - m)`` and the smoothed target
    ``y = (1-ε)·onehot(label) + ε/C``: ``loss_i = lse - Σ_k y_k z_k`` is written to
    ``loss_out`` (N,), and ``grad_out = scale · (softmax(z) - y)`` (N, C), e.g. ``scale=1/N``
    for a mean. ``labels`` are int64 in ``[0, C)`` (validated by the caller). ``grad_out`` may
    be ``logits``. Returns ``loss_out``.
    """
    xp = _xp(logits)
    n, c = logits.shape
    rows = xp.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp = shifted - xp.log(s)
    loss = -(1.0 - smoothing) * logp[rows, labels]
    if smoothing:
        loss = loss - (smoothing / c) * logp.sum(axis=1)
    target = xp.full_like(logits, smoothing / c)
    target[rows, labels] += 1.0 - smoothing
    grad = (e / s - target) * scale
    grad_out[...] = grad
    loss_out[...] = loss
    return loss_out


# ---------------------------------------------------------------------------------------
# 4. Optimizer updates (PyTorch formulas, one parameter tensor or a flat buffer of many).
# The accelerated backends build theirs from the records of kernels/optimizers.py; these are
# written apart, on whole arrays, as the oracle the records are tested against. Each takes
# ``data_lp=None`` last, the low-precision copy of the updated weights, which the next
# forward pass's products read.
def _check_data_lp(op, data_lp, p, *states):
    if data_lp is not None:
        check_lowp(op, "data_lp", data_lp, p, *states)


def flush_denormals(a) -> None:
    """Set the denormal values of the float array ``a`` to 0, in place (``|a|`` below the
    smallest normal number of its dtype; NaN and ±inf stay). The optimizers' states pass
    through it after each update: a state that decays geometrically (a unit that never
    fires, its gradient 0) would otherwise settle on a denormal value, where 0.9 times it
    rounds back to it, and every later update's arithmetic on it would take the processor's
    slow path (Adam 1.3–2× slower on the digits MLP: ``benchmarks/denormal_states.py``).
    XLA flushes every denormal; PyTorch keeps them: the weights come out the same either way
    (an update from a denormal state is far below a weight's ulp), the states differ only
    in that range."""
    xp = _xp(a)
    xp.copyto(a, 0, where=xp.abs(a) < xp.finfo(a.dtype).tiny)


def sgd_step(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step,
             data_lp=None):
    """SGD (PyTorch semantics), in place on ``p`` and ``buf``::

        d = g + λ p
        buf = d                             (first step)
        buf = μ buf + (1 - τ) d             (later steps)
        buf = flush(buf)                    (denormals to 0: flush_denormals)
        d = d + μ buf   if nesterov  else  d = buf        (when μ ≠ 0)
        p = p - lr d

    ``buf`` is None when ``momentum == 0``. ``data_lp``: None, or a ``uint16`` (bfloat16 bits)
    or ``float16`` array of a float32 ``p``'s shape that receives ``lowp(p)`` of the updated
    weights (``kernels/lowp.py``).
    """
    _check_data_lp("sgd_step", data_lp, p, g, buf)
    d = g + weight_decay * p if weight_decay else g.copy()
    if momentum:
        if first_step:
            buf[...] = d
        else:
            buf *= momentum
            buf += (1.0 - dampening) * d
        flush_denormals(buf)
        if nesterov:
            d = d + momentum * buf
        else:
            d = buf
    p -= lr * d
    if data_lp is not None:
        lowp.to_lowp(p, data_lp)


def rmsprop_step(p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay, momentum,
                 centered, data_lp=None):
    """RMSprop (PyTorch semantics), in place::

        d = g + λ p
        s = α s + (1 - α) d²
        ḡ = ḡ + (1 - α)(d - ḡ)                   (centered only; v = s - ḡ²)
        (s, ḡ and buf below are flushed after their update: flush_denormals)
        avg = sqrt(v) + eps                      (eps outside the sqrt)
        buf = μ buf + d / avg ;  p = p - lr buf  (momentum)   or   p = p - lr d / avg

    ``buf`` is None when ``momentum == 0``; ``grad_avg`` is None unless ``centered``.
    ``data_lp``: None, or a ``uint16`` (bfloat16 bits) or ``float16`` array of a float32 ``p``'s
    shape that receives ``lowp(p)`` of the updated weights (``kernels/lowp.py``).
    """
    _check_data_lp("rmsprop_step", data_lp, p, g, square_avg, buf, grad_avg)
    xp = _xp(p)
    d = g + weight_decay * p if weight_decay else g
    square_avg *= alpha
    square_avg += (1.0 - alpha) * d * d
    flush_denormals(square_avg)
    if centered:
        grad_avg += (1.0 - alpha) * (d - grad_avg)
        flush_denormals(grad_avg)
        avg = xp.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = xp.sqrt(square_avg) + eps
    if momentum:
        buf *= momentum
        buf += d / avg
        flush_denormals(buf)
        p -= lr * buf
    else:
        p -= lr * (d / avg)
    if data_lp is not None:
        lowp.to_lowp(p, data_lp)


def adam_step(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, step,
              data_lp=None):
    """Adam / AdamW (PyTorch semantics), in place, ``step`` counted from 1::

        p = p (1 - lr λ)                 (decoupled, AdamW)   or   d = g + λ p  (Adam, L2)
        m = m + (1 - β1)(d - m)
        v = β2 v + (1 - β2) d²
        v̂ = max(v̂, v)                   (amsgrad, when ``vmax`` is given)
        (m, v and v̂ are flushed after their update: flush_denormals)
        p = p - (lr / (1 - β1ᵗ)) · m / (sqrt(v or v̂) / sqrt(1 - β2ᵗ) + eps)

    ``data_lp``: None, or a ``uint16`` (bfloat16 bits) or ``float16`` array of a float32 ``p``'s
    shape that receives ``lowp(p)`` of the updated weights (``kernels/lowp.py``).
    """
    _check_data_lp("adam_step", data_lp, p, g, m, v, vmax)
    xp = _xp(p)
    d = g
    if weight_decay:
        if decoupled:
            p *= 1.0 - lr * weight_decay
        else:
            d = g + weight_decay * p
    m += (1.0 - beta1) * (d - m)
    flush_denormals(m)
    v *= beta2
    v += (1.0 - beta2) * d * d
    flush_denormals(v)
    if vmax is not None:
        xp.maximum(vmax, v, out=vmax)
        flush_denormals(vmax)
        second = vmax
    else:
        second = v
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    denom = xp.sqrt(second) / bias2_sqrt + eps
    p -= (lr / bias1) * (m / denom)
    if data_lp is not None:
        lowp.to_lowp(p, data_lp)


def adagrad_step(p, g, state_sum, lr, lr_decay, eps, weight_decay, step, data_lp=None):
    """Adagrad (PyTorch semantics), in place, ``step`` counted from 1::

        d = g + λ p ;  s = s + d² ;  p = p - lr / (1 + (t - 1) η) · d / (sqrt(s) + eps)

    ``data_lp``: None, or a ``uint16`` (bfloat16 bits) or ``float16`` array of a float32 ``p``'s
    shape that receives ``lowp(p)`` of the updated weights (``kernels/lowp.py``).
    """
    _check_data_lp("adagrad_step", data_lp, p, g, state_sum)
    xp = _xp(p)
    d = g + weight_decay * p if weight_decay else g
    state_sum += d * d
    clr = lr / (1.0 + (step - 1) * lr_decay)
    p -= clr * (d / (xp.sqrt(state_sum) + eps))
    if data_lp is not None:
        lowp.to_lowp(p, data_lp)


# ---------------------------------------------------------------------------------------
# 5. Dropout with counter-based random numbers (identical masks on every backend)
MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B1


def mix32(h):
    """The 'lowbias32' integer hash on uint32 (NumPy/CuPy arrays or Python ints)."""
    if isinstance(h, int):
        h &= MASK32
        h ^= h >> 16
        h = (h * 0x7FEB352D) & MASK32
        h ^= h >> 15
        h = (h * 0x846CA68B) & MASK32
        h ^= h >> 16
        return h
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


def dropout_key(seed: int, counter: int) -> int:
    """The 32-bit key of one dropout call: ``mix32(seed ^ mix32(counter + φ))`` (host side)."""
    return mix32((seed & MASK32) ^ mix32(counter + GOLDEN32))


def dropout_threshold(p: float) -> int:
    """Integer threshold: element ``i`` is kept iff ``hash(i) >> 8 >= ceil(p · 2²⁴)``."""
    return int(math.ceil(p * (1 << 24)))


def dropout(x, key: int, threshold: int, scale: float, out):
    """Inverted dropout: ``out_i = x_i · scale`` if kept else 0, with ``scale = 1/(1-p)``.

    Element ``i`` (flat C-order index) is kept iff ``mix32((i · φ) ^ key) >> 8 >= threshold``:
    the mask is a pure function of ``(key, i)``, so backward is the same call on ``∂L/∂out``
    and every backend draws the same mask. ``out`` may be ``x``. Returns ``out``.
    """
    xp = _xp(x)
    i = xp.arange(x.size, dtype=np.uint32).reshape(x.shape)
    h = mix32((i * GOLDEN32) ^ np.uint32(key))
    keep = (h >> 8) >= threshold
    out[...] = xp.where(keep, x * x.dtype.type(scale), 0)
    return out


# ---------------------------------------------------------------------------------------
# 6. BatchNorm (training mode), per feature
def batchnorm_normalized(x, mean, invstd):
    """``x̂ = (x - μ) r``, in the dtype of ``x``: what the forward pass scales and shifts, and
    what the backward pass recomputes (the same operations on the same rounded ``μ`` and
    ``r``, so both see the same x̂)."""
    return (x - mean) * invstd


def batchnorm_forward(x, gamma, beta, eps, out, mean_out, var_out, invstd_out):
    """Batch normalisation over the rows of ``x`` (N, M), per feature ``j``::

        μ_j = mean_i x_ij ;  σ²_j = mean_i (x_ij - μ_j)² (biased) ;  r_j = 1/sqrt(σ²_j + eps)
        x̂_ij = (x_ij - μ_j) r_j ;  out_ij = γ_j x̂_ij + β_j

    Writes ``out`` (N, M) and ``mean_out``, ``var_out``, ``invstd_out`` (M,), ``μ`` and ``r``
    rounded to the dtype of ``x``, from which x̂ is computed. x̂ itself is not stored: the
    backward pass recomputes it from ``x``, ``μ`` and ``r`` (as PyTorch's native batch norm
    does), which spares writing and reading an (N, M) array. Returns ``out``.
    """
    xp = _xp(x)
    mean = x.mean(axis=0)
    centered = x - mean
    var = (centered * centered).mean(axis=0)
    mean_out[...] = mean
    var_out[...] = var
    invstd_out[...] = 1.0 / xp.sqrt(var + eps)
    out[...] = gamma * batchnorm_normalized(x, mean_out, invstd_out) + beta
    return out


def batchnorm_backward(dy, x, gamma, mean, invstd, dx_out, dgamma_out, dbeta_out,
                       accumulate=False):
    """Backward of training-mode BatchNorm, per feature ``j`` with ``N`` rows, from the
    forward pass's input ``x`` and statistics ``μ``, ``r``::

        x̂_ij = (x_ij - μ_j) r_j   (recomputed, as the forward pass computed it)
        ∂β_j = Σ_i dy_ij ;  ∂γ_j = Σ_i dy_ij x̂_ij
        dx_ij = γ_j r_j / N · (N dy_ij - ∂β_j - x̂_ij ∂γ_j)

    ``dgamma_out``/``dbeta_out`` are overwritten, or added to when ``accumulate``.
    ``dx_out`` may be ``dy``. Returns ``dx_out``.
    """
    n = dy.shape[0]
    xhat = batchnorm_normalized(x, mean, invstd)
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    dx_out[...] = (gamma * invstd / n) * (n * dy - dbeta - xhat * dgamma)
    if accumulate:
        dgamma_out += dgamma
        dbeta_out += dbeta
    else:
        dgamma_out[...] = dgamma
        dbeta_out[...] = dbeta
    return dx_out
