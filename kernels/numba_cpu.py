"""Numba CPU kernels: every op of the registry as one fused, parallel pass over memory.

Each public function has the signature and the semantics of the function of the same name in
:mod:`reference`, whose docstring states the math; tests/test_kernels.py holds them to it.
A public function is a thin wrapper: it checks dtypes, shapes and C-contiguity (a clear error
instead of a silent copy), computes host-side scalars (bias corrections, the effective
learning rate) and calls one ``@njit(parallel=True, cache=True)`` kernel.

How the kernels are built
- Compiled lazily, on first use, for the dtypes and the ``None`` pattern of the call (Numba
  specialises on ``None``: an optimizer without momentum has no buffer code at all), and
  cached on disk (``cache=True``), so the next process loads them instead of compiling.
- Activations: one kernel per activation name. The name is a compile-time string constant
  (a closure variable of :func:`_forward_kernel` / :func:`_backward_kernel`), and
  :func:`_activate` / :func:`_derivative` are overloaded on that literal, so each
  activation's inner loop holds only its own formula: branch-free and vectorisable, and a
  program that uses relu never compiles gelu.
- Precision: float32 inputs are widened to float64 in registers and rounded once when
  stored; every sum accumulates in float64. The hyperparameters stay Python floats.
- Sums over rows (bias gradient, BatchNorm statistics) never accumulate into one shared
  vector from parallel rows (that races). The rows are cut into a fixed number of chunks
  (:data:`_ROW_CHUNKS`, not the thread count); each chunk sums its rows in order into its
  own float64 row of a partial-sum array, and the partials are then added in chunk order,
  in parallel over columns. The result is therefore the same for any number of threads.
- In place: Numba marks the array arguments of a ``prange`` body ``noalias`` unless it sees
  an alias inside the body, and LLVM may then move a read of an input after a write to the
  output. Every kernel whose output may be one of its inputs therefore takes an
  ``in_place`` flag (from :func:`_in_place`) and names the alias inside the loop body
  (``dst = src if in_place else out``), which keeps reads before writes.
- ``fastmath``: never ``nnan``/``ninf``/``afn`` (NaN and inf propagate exactly as in the
  reference). The activation kernels use ``{"contract"}`` (FMA); the softmax kernels
  ``{"reassoc", "contract", "nsz", "arcp"}`` so that LLVM may vectorise their row sums.
  Everything else is strict IEEE.
- ``exp`` is :func:`_exp`, a vectorisable polynomial within ~1 ulp of libm (libm's is an
  opaque scalar call); ``tanh``, ``erf`` and ``log1p`` still call libm, so tanh, gelu_erf
  and softplus forward are compute-bound.
"""
from __future__ import annotations

import math
import os

# Numba's OpenMP workers would otherwise spin after every parallel loop and fight OpenBLAS's
# threads for the cores: on 2 cores each small kernel after a GEMM then costs ~20 ms.
# Must be set before the first parallel launch (this module is imported lazily, before it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import reference
from .reference import (ACTIVATIONS, GELU_C, GELU_K, GOLDEN32, INV_SQRT2, INV_SQRT_2PI,
                        NEEDS_Z)

_ROW_SUM_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_CONTRACT = {"contract"}  # a·b + c may become one FMA (one rounding instead of two)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ROW_CHUNKS = 32  # row chunks of the parallel column sums (fixed: results independent of threads)


# ---------------------------------------------------------------------------------------
# Validation (the wrappers are thin: these checks are all they add)
def _describe(a) -> str:
    if not isinstance(a, np.ndarray):
        return f"a {type(a).__name__}"
    layout = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"a {layout} {a.dtype} array of shape {a.shape}"


def _fail(op: str, name: str, expected: str, a) -> None:
    raise ValueError(
        f"{op}: {name} must be {expected}; got {_describe(a)}. The numba_cpu kernels read and "
        "write raw C-ordered memory: pass NumPy arrays of one float dtype, allocated with "
        "np.empty/np.zeros (or np.ascontiguousarray), with the shapes of the inputs")


def _array(op: str, name: str, a, dtype, shape, out: bool = False) -> None:
    """``a`` is a C-contiguous ``dtype`` ndarray of ``shape`` (writeable when ``out``)."""
    if (type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape
            or not a.flags.c_contiguous or (out and not a.flags.writeable)):
        expected = f"a C-contiguous {'writeable ' if out else ''}{dtype} array of shape {shape}"
        _fail(op, name, expected, a)


def _batch(op: str, name: str, a) -> np.dtype:
    """``a`` is a C-contiguous 2-D float32/float64 ndarray; returns its dtype."""
    if (type(a) is not np.ndarray or a.ndim != 2 or a.dtype not in _FLOATS
            or not a.flags.c_contiguous):
        _fail(op, name, "a C-contiguous 2-D float32 or float64 array (N, M)", a)
    return a.dtype


def _flat(op: str, p, named: dict) -> dict:
    """Optimizer buffers: ``p`` and every non-None buffer in ``named`` share shape, dtype and
    C-contiguity; returns the raveled (1-D view) version of each."""
    if type(p) is not np.ndarray or p.dtype not in _FLOATS or not p.flags.c_contiguous:
        _fail(op, "p", "a C-contiguous float32 or float64 array", p)
    flat = {}
    for name, a in named.items():
        if a is not None:
            _array(op, name, a, p.dtype, p.shape, out=name != "g")
            a = a.reshape(-1)
        flat[name] = a
    return flat


def _in_place(op: str, out_name: str, out, src_name: str, src) -> bool:
    """Whether ``out`` is ``src`` (same memory); partial overlap is refused."""
    if out is src or not np.may_share_memory(out, src):
        return out is src
    if out.ctypes.data == src.ctypes.data:  # a second view of the same C-ordered buffer
        return True
    raise ValueError(f"{op}: {out_name} overlaps {src_name} without being it; pass "
                     f"{src_name} itself (in place) or a separate buffer")


def _activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------
# exp that LLVM can vectorise (libm's exp is an opaque scalar call): within 1.01 ulp of
# np.exp in float64 over its whole range, inf/NaN/underflow included (measured on 4M points)
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k·_LN2_HI is exact (Cody-Waite)
_LN2_LO = 1.90821492927058770002e-10


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float64 whose IEEE bit pattern is the int64 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(inline="always")
def _exp(x):
    """``exp(x) = 2ᵏ·exp(r)``, ``r = x - k ln2`` in ``[-ln2/2, ln2/2]``, ``exp(r)`` by its
    Taylor polynomial to degree 13 (truncation < 1e-17), ``2ᵏ`` as two exponent-field powers
    so that results near overflow and in the subnormal range are scaled exactly."""
    clamped = min(max(x, -746.0), 710.0)  # beyond these exp is 0 or inf already
    k = math.floor(clamped * _LOG2E + 0.5)
    r = (clamped - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0  # Horner, written out: a loop over a tuple would not vectorise
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    n = np.int64(k)
    half = n >> 1
    y = p * _float_from_bits((half + 1023) << 52) * _float_from_bits((n - half + 1023) << 52)
    return y if x == x else x  # NaN in, NaN out


# ---------------------------------------------------------------------------------------
# Activations, specialised at compile time on the literal name
def _activate(act, v, alpha):
    """``σ(v)`` in float64. Compiled code uses the overload below, specialised on the literal
    name; this Python body is what runs under ``NUMBA_DISABLE_JIT=1``."""
    return float(reference.activate(np, np.array([v]), act, alpha)[0])


def _derivative(act, s, alpha):
    """``σ'`` from ``s = a`` (σ(z)) or ``s = z`` for activations in NEEDS_Z."""
    a, z = (None, np.array([s])) if act in NEEDS_Z else (np.array([s]), np.array([s]))
    return float(reference.derivative(np, a, z, act, alpha)[0])


def _literal_name(act):
    return act.literal_value if isinstance(act, types.StringLiteral) else None


@overload(_activate)
def _activate_impl(act, v, alpha):
    name = _literal_name(act)
    if name == "identity":
        return lambda act, v, alpha: v
    if name == "relu":  # v < 0 is False for NaN: NaN passes through, as np.maximum does
        return lambda act, v, alpha: 0.0 if v < 0.0 else v
    if name == "leaky_relu":
        return lambda act, v, alpha: v if v > 0.0 else v * alpha
    if name == "sigmoid":
        return lambda act, v, alpha: _sigmoid(v)
    if name == "tanh":
        return lambda act, v, alpha: math.tanh(v)
    if name == "gelu_tanh":
        return lambda act, v, alpha: v * _sigmoid(2.0 * GELU_K * (v + GELU_C * v * v * v))
    if name == "gelu_erf":
        return lambda act, v, alpha: 0.5 * v * (1.0 + math.erf(v * INV_SQRT2))
    if name == "softplus":
        return lambda act, v, alpha: math.log1p(_exp(-abs(v))) + (0.0 if v < 0.0 else v)
    return None


@overload(_derivative)
def _derivative_impl(act, s, alpha):
    name = _literal_name(act)
    if name == "identity":
        return lambda act, s, alpha: 1.0
    if name == "relu":
        return lambda act, s, alpha: 1.0 if s > 0.0 else 0.0
    if name == "leaky_relu":
        return lambda act, s, alpha: 1.0 if s > 0.0 else alpha
    if name == "sigmoid":
        return lambda act, s, alpha: s * (1.0 - s)
    if name == "tanh":
        return lambda act, s, alpha: 1.0 - s * s
    if name == "gelu_tanh":
        return lambda act, s, alpha: _gelu_tanh_derivative(s)
    if name == "gelu_erf":
        return lambda act, s, alpha: (0.5 * (1.0 + math.erf(s * INV_SQRT2))
                                      + s * _exp(-0.5 * s * s) * INV_SQRT_2PI)
    if name == "softplus":
        return lambda act, s, alpha: _sigmoid(s)
    return None


@njit(inline="always")
def _sigmoid(v):
    """Stable logistic: ``exp`` only sees ``-|v|``."""
    e = _exp(-abs(v))
    t = 1.0 / (1.0 + e)
    return t if v >= 0.0 else e * t


@njit(inline="always")
def _gelu_tanh_derivative(z):
    """With ``u = k(z + c z³)``, ``½(1 + tanh u) = σ(2u)`` and ``1 - tanh²u = 4σ(2u)σ(-2u)``:
    the derivative of the reference, without its ``1 + tanh`` cancellation."""
    u2 = 2.0 * GELU_K * (z + GELU_C * z * z * z)
    e = _exp(-abs(u2))
    t = 1.0 / (1.0 + e)
    s = t if u2 >= 0.0 else e * t
    return s + 2.0 * z * GELU_K * (1.0 + 3.0 * GELU_C * z * z) * (e * t * t)


@njit(inline="always")
def _chunk_rows(chunk, chunks, n):
    """Rows ``[start, stop)`` of chunk ``chunk`` out of ``chunks`` over ``n`` rows."""
    return chunk * n // chunks, (chunk + 1) * n // chunks


# ---------------------------------------------------------------------------------------
# 1-2. Dense epilogues
def _forward_kernel(act: str):
    write_z = act in NEEDS_Z

    @njit(parallel=True, cache=True, fastmath=_CONTRACT)
    def kernel(z, b, out_arg, alpha, in_place):
        n, m = z.shape
        for i in prange(n):
            out = z if in_place else out_arg
            for j in range(m):
                v = float(z[i, j])
                if b is not None:
                    v += b[j]
                    if write_z:
                        z[i, j] = v
                out[i, j] = _activate(act, v, alpha)

    return kernel


def _backward_kernel(act: str):
    @njit(parallel=True, cache=True, fastmath=_CONTRACT)
    def kernel(da, s, alpha, delta_arg, db, accumulate, in_place):
        n, m = da.shape
        if db is None:
            for i in prange(n):
                delta = da if in_place else delta_arg
                for j in range(m):
                    delta[i, j] = da[i, j] * _derivative(act, float(s[i, j]), alpha)
            return
        chunks = min(n, _ROW_CHUNKS)
        partial = np.zeros((chunks, m))
        for chunk in prange(chunks):
            delta = da if in_place else delta_arg
            start, stop = _chunk_rows(chunk, chunks, n)
            for i in range(start, stop):
                for j in range(m):
                    d = da[i, j] * _derivative(act, float(s[i, j]), alpha)
                    delta[i, j] = d
                    partial[chunk, j] += d
        for j in prange(m):
            total = 0.0
            for chunk in range(chunks):
                total += partial[chunk, j]
            db[j] = db[j] + total if accumulate else total

    return kernel


_FORWARD: dict = {}
_BACKWARD: dict = {}


def bias_act_forward(z, b, out, act: str, alpha: float = 0.0):
    """``out ← σ(z + b)`` (and ``z ← z + b`` for NEEDS_Z activations with a bias); see
    :func:`reference.bias_act_forward`. One pass over rows in parallel."""
    op = "bias_act_forward"
    dtype = _batch(op, "z", z)
    if b is not None:
        _array(op, "b", b, dtype, z.shape[1:])
    _array(op, "out", out, dtype, z.shape, out=True)
    kernel = _FORWARD.get(act)
    if kernel is None:
        _activation(act)
        kernel = _FORWARD[act] = _forward_kernel(act)
    kernel(z, b, out, float(alpha), _in_place(op, "out", out, "z", z))
    return out


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False):
    """``δ = dA ⊙ σ'`` and ``db (+)= Σ_rows δ``; see :func:`reference.bias_act_backward`.
    ``db`` is summed in float64 per column, threads owning blocks of columns."""
    op = "bias_act_backward"
    dtype = _batch(op, "da", da)
    kernel = _BACKWARD.get(act)
    if kernel is None:
        _activation(act)
        kernel = _BACKWARD[act] = _backward_kernel(act)
    source, name = (z, "z") if act in NEEDS_Z else (a, "a")
    _array(op, name, source, dtype, da.shape)
    _array(op, "delta_out", delta_out, dtype, da.shape, out=True)
    if db_out is not None:
        _array(op, "db_out", db_out, dtype, da.shape[1:], out=True)
    kernel(da, source, float(alpha), delta_out, db_out, bool(accumulate),
           _in_place(op, "delta_out", delta_out, "da", da))
    return delta_out


# ---------------------------------------------------------------------------------------
# Softmax (the layer) and softmax cross-entropy (the loss): rows in parallel
@njit(parallel=True, cache=True, fastmath=_ROW_SUM_FASTMATH)
def _softmax_forward(x, out_arg, in_place):
    n, m = x.shape
    for i in prange(n):
        out = x if in_place else out_arg
        top = -np.inf
        for j in range(m):
            if x[i, j] > top:
                top = x[i, j]
        total = 0.0
        for j in range(m):
            e = _exp(x[i, j] - top)
            out[i, j] = e
            total += e
        inv = 1.0 / total
        for j in range(m):
            out[i, j] = out[i, j] * inv


def softmax_forward(x, out):
    """Row softmax; see :func:`reference.softmax_forward`. ``out`` may be ``x``."""
    op = "softmax_forward"
    dtype = _batch(op, "x", x)
    _array(op, "out", out, dtype, x.shape, out=True)
    _softmax_forward(x, out, _in_place(op, "out", out, "x", x))
    return out


@njit(parallel=True, cache=True, fastmath=_ROW_SUM_FASTMATH)
def _softmax_backward(dy, y, out_arg, in_place):
    n, m = dy.shape
    for i in prange(n):
        out = dy if in_place else out_arg
        dot = 0.0
        for j in range(m):
            dot += float(dy[i, j]) * y[i, j]
        for j in range(m):
            out[i, j] = y[i, j] * (dy[i, j] - dot)


def softmax_backward(dy, y, out):
    """``dx = y ⊙ (dy - Σ dy·y)`` per row; see :func:`reference.softmax_backward`."""
    op = "softmax_backward"
    dtype = _batch(op, "dy", dy)
    _array(op, "y", y, dtype, dy.shape)
    _array(op, "out", out, dtype, dy.shape, out=True)
    _softmax_backward(dy, y, out, _in_place(op, "out", out, "dy", dy))
    return out


@njit(parallel=True, cache=True, fastmath=_ROW_SUM_FASTMATH)
def _softmax_xent(logits, labels, smoothing, scale, grad_arg, loss, in_place):
    n, c = logits.shape
    off = smoothing / c  # the smoothed target of every class; the label's gets 1 - ε more
    for i in prange(n):
        grad = logits if in_place else grad_arg
        label = np.int64(labels[i])
        if label < 0 or label >= c:  # the caller validates labels; never read out of bounds
            loss[i] = np.nan
            for k in range(c):
                grad[i, k] = np.nan
            continue
        top = -np.inf
        for k in range(c):
            if logits[i, k] > top:
                top = logits[i, k]
        picked = logits[i, label] - top
        total = 0.0
        shifted_sum = 0.0
        for k in range(c):
            shifted = logits[i, k] - top
            e = _exp(shifted)
            grad[i, k] = e  # grad may be logits: each logit is read before it is replaced
            total += e
            shifted_sum += shifted
        value = math.log(total) - (1.0 - smoothing) * picked
        if smoothing != 0.0:  # guarded: 0 · (-inf) would turn a masked logit into NaN
            value -= off * shifted_sum
        loss[i] = value
        inv = 1.0 / total
        for k in range(c):
            target = off + (1.0 - smoothing) if k == label else off
            grad[i, k] = scale * (grad[i, k] * inv - target)


def softmax_xent(logits, labels, smoothing: float, scale: float, grad_out, loss_out):
    """Softmax cross-entropy, loss and gradient in one pass per row; see
    :func:`reference.softmax_xent`. A label outside ``[0, C)`` (which the caller must
    reject first) yields a NaN row instead of an out-of-bounds read."""
    op = "softmax_xent"
    dtype = _batch(op, "logits", logits)
    n = logits.shape[0]
    if (type(labels) is not np.ndarray or labels.dtype.kind not in "iu"
            or labels.shape != (n,) or not labels.flags.c_contiguous):
        _fail(op, "labels", f"a C-contiguous integer array of shape {(n,)}", labels)
    _array(op, "grad_out", grad_out, dtype, logits.shape, out=True)
    _array(op, "loss_out", loss_out, dtype, (n,), out=True)
    _softmax_xent(logits, labels, float(smoothing), float(scale), grad_out, loss_out,
                  _in_place(op, "grad_out", grad_out, "logits", logits))
    return loss_out


# ---------------------------------------------------------------------------------------
# 4. Optimizer updates: one in-place pass over flat buffers
@njit(parallel=True, cache=True)
def _sgd(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step):
    for i in prange(p.size):
        d = float(g[i])
        if weight_decay != 0.0:
            d += weight_decay * p[i]
        if buf is not None:
            v = d if first_step else momentum * buf[i] + (1.0 - dampening) * d
            buf[i] = v
            d = d + momentum * v if nesterov else v
        p[i] = p[i] - lr * d


def sgd_step(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step):
    """SGD with momentum / dampening / Nesterov / L2, PyTorch formulas; see
    :func:`reference.sgd_step`. ``buf`` is used only when ``momentum != 0``."""
    op = "sgd_step"
    if momentum and buf is None:
        raise ValueError(f"{op}: momentum={momentum} needs a momentum buffer, got buf=None")
    f = _flat(op, p, {"p": p, "g": g, "buf": buf if momentum else None})
    _sgd(f["p"], f["g"], f["buf"], float(lr), float(momentum), float(dampening),
         bool(nesterov), float(weight_decay), bool(first_step))


@njit(parallel=True, cache=True)
def _rmsprop(p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay, momentum):
    for i in prange(p.size):
        d = float(g[i])
        if weight_decay != 0.0:
            d += weight_decay * p[i]
        s = alpha * square_avg[i] + (1.0 - alpha) * d * d
        square_avg[i] = s
        if grad_avg is not None:
            mean = grad_avg[i] + (1.0 - alpha) * (d - grad_avg[i])
            grad_avg[i] = mean
            s -= mean * mean
        step = d / (math.sqrt(s) + eps)
        if buf is not None:
            step += momentum * buf[i]
            buf[i] = step
        p[i] = p[i] - lr * step


def rmsprop_step(p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay, momentum,
                 centered):
    """RMSprop (eps outside the sqrt; centered; momentum), PyTorch formulas; see
    :func:`reference.rmsprop_step`."""
    op = "rmsprop_step"
    if momentum and buf is None:
        raise ValueError(f"{op}: momentum={momentum} needs a momentum buffer, got buf=None")
    if centered and grad_avg is None:
        raise ValueError(f"{op}: centered=True needs a grad_avg buffer, got grad_avg=None")
    f = _flat(op, p, {"p": p, "g": g, "square_avg": square_avg,
                      "buf": buf if momentum else None,
                      "grad_avg": grad_avg if centered else None})
    _rmsprop(f["p"], f["g"], f["square_avg"], f["buf"], f["grad_avg"], float(lr), float(alpha),
             float(eps), float(weight_decay), float(momentum))


@njit(parallel=True, cache=True)
def _adam(p, g, m, v, vmax, step_size, beta1, beta2, eps, l2, decay, bias2_sqrt):
    for i in prange(p.size):
        w = float(p[i])
        d = float(g[i])
        if l2 != 0.0:
            d += l2 * w
        w *= decay
        mi = m[i] + (1.0 - beta1) * (d - m[i])
        vi = beta2 * v[i] + (1.0 - beta2) * d * d
        m[i] = mi
        v[i] = vi
        if vmax is not None:
            top = vmax[i]
            if vi > top or vi != vi:  # np.maximum: NaN wins
                top = vi
            vmax[i] = top
            vi = top
        p[i] = w - step_size * (mi / (math.sqrt(vi) / bias2_sqrt + eps))


def adam_step(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """Adam / AdamW / AMSGrad (``vmax`` given), PyTorch formulas; see
    :func:`reference.adam_step`. The bias corrections are computed here, on the host."""
    op = "adam_step"
    f = _flat(op, p, {"p": p, "g": g, "m": m, "v": v, "vmax": vmax})
    lr, weight_decay = float(lr), float(weight_decay)
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    step_size = lr / (1.0 - beta1 ** step)
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    _adam(f["p"], f["g"], f["m"], f["v"], f["vmax"], step_size, float(beta1), float(beta2),
          float(eps), l2, decay, bias2_sqrt)


@njit(parallel=True, cache=True)
def _adagrad(p, g, state_sum, clr, eps, weight_decay):
    for i in prange(p.size):
        d = float(g[i])
        if weight_decay != 0.0:
            d += weight_decay * p[i]
        s = state_sum[i] + d * d
        state_sum[i] = s
        p[i] = p[i] - clr * (d / (math.sqrt(s) + eps))


def adagrad_step(p, g, state_sum, lr, lr_decay, eps, weight_decay, step):
    """Adagrad with lr decay, PyTorch formulas; see :func:`reference.adagrad_step`."""
    op = "adagrad_step"
    f = _flat(op, p, {"p": p, "g": g, "state_sum": state_sum})
    clr = float(lr) / (1.0 + (step - 1) * float(lr_decay))
    _adagrad(f["p"], f["g"], f["state_sum"], clr, float(eps), float(weight_decay))


# ---------------------------------------------------------------------------------------
# 5. Dropout: the counter hash of reference.dropout, computed in 64-bit lanes masked to 32
@njit(parallel=True, cache=True)
def _dropout(x, key, threshold, scale, out_arg, in_place):
    mask = np.uint64(0xFFFFFFFF)
    for i in prange(x.size):
        out = x if in_place else out_arg
        h = ((np.uint64(i) * np.uint64(GOLDEN32)) & mask) ^ key
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x7FEB352D)) & mask
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(0x846CA68B)) & mask
        h ^= h >> np.uint64(16)
        out[i] = x[i] * scale if (h >> np.uint64(8)) >= threshold else 0.0


def dropout(x, key: int, threshold: int, scale: float, out):
    """Inverted dropout with the counter-hash mask of :func:`reference.dropout` (the same
    mask bit for bit); ``out`` may be ``x``."""
    op = "dropout"
    if type(x) is not np.ndarray or x.dtype not in _FLOATS or not x.flags.c_contiguous:
        _fail(op, "x", "a C-contiguous float32 or float64 array", x)
    _array(op, "out", out, x.dtype, x.shape, out=True)
    # x · scale rounded in x's dtype, as the reference multiplies by x.dtype.type(scale)
    _dropout(x.reshape(-1), np.uint64(key & 0xFFFFFFFF), np.uint64(threshold),
             x.dtype.type(scale), out.reshape(-1), _in_place(op, "out", out, "x", x))
    return out


# ---------------------------------------------------------------------------------------
# 6. BatchNorm (training mode): per-feature sums from row-chunk partials, then one pass
@njit(parallel=True, cache=True)
def _batchnorm_forward(x, gamma, beta, eps, out, xhat, mean_out, var_out, invstd_out):
    n, m = x.shape
    chunks = min(n, _ROW_CHUNKS)
    # shifted sums Σ(x - x₀), Σ(x - x₀)² in float64: no cancellation when |mean| ≫ std
    partial = np.zeros((chunks, 2, m))
    for chunk in prange(chunks):
        start, stop = _chunk_rows(chunk, chunks, n)
        for i in range(start, stop):
            for j in range(m):
                t = float(x[i, j]) - x[0, j]
                partial[chunk, 0, j] += t
                partial[chunk, 1, j] += t * t
    stats = np.empty((2, m))  # mean and 1/std, kept in float64 for the normalising pass
    for j in prange(m):
        s1 = 0.0
        s2 = 0.0
        for chunk in range(chunks):
            s1 += partial[chunk, 0, j]
            s2 += partial[chunk, 1, j]
        shift = s1 / n
        var = max(s2 / n - shift * shift, 0.0)
        stats[0, j] = x[0, j] + shift
        stats[1, j] = 1.0 / math.sqrt(var + eps)
        mean_out[j] = stats[0, j]
        var_out[j] = var
        invstd_out[j] = stats[1, j]
    for i in prange(n):
        for j in range(m):
            h = (x[i, j] - stats[0, j]) * stats[1, j]
            xhat[i, j] = h
            out[i, j] = gamma[j] * h + beta[j]


def batchnorm_forward(x, gamma, beta, eps, out, xhat_out, mean_out, var_out, invstd_out):
    """Training-mode batch normalisation per feature; see :func:`reference.batchnorm_forward`.
    Reads ``x`` twice (statistics, then normalisation)."""
    op = "batchnorm_forward"
    dtype = _batch(op, "x", x)
    vec = x.shape[1:]
    _array(op, "gamma", gamma, dtype, vec)
    _array(op, "beta", beta, dtype, vec)
    for name, a in (("out", out), ("xhat_out", xhat_out)):
        _array(op, name, a, dtype, x.shape, out=True)
    for name, a in (("mean_out", mean_out), ("var_out", var_out), ("invstd_out", invstd_out)):
        _array(op, name, a, dtype, vec, out=True)
    if x.shape[0] == 0:
        raise ValueError(f"{op}: x has no rows; batch statistics need at least one")
    _batchnorm_forward(x, gamma, beta, float(eps), out, xhat_out, mean_out, var_out, invstd_out)
    return out


@njit(parallel=True, cache=True)
def _batchnorm_backward(dy, xhat, gamma, invstd, dx_arg, dgamma, dbeta, accumulate, in_place):
    n, m = dy.shape
    chunks = min(n, _ROW_CHUNKS)
    partial = np.zeros((chunks, 2, m))
    for chunk in prange(chunks):
        start, stop = _chunk_rows(chunk, chunks, n)
        for i in range(start, stop):
            for j in range(m):
                g = float(dy[i, j])
                partial[chunk, 0, j] += g
                partial[chunk, 1, j] += g * xhat[i, j]
    coef = np.empty((3, m))  # dx = c₀ dy - c₁ - c₂ x̂ with c = γ r / N · (N, ∂β, ∂γ)
    for j in prange(m):
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for chunk in range(chunks):
            sum_dy += partial[chunk, 0, j]
            sum_dy_xhat += partial[chunk, 1, j]
        dbeta[j] = dbeta[j] + sum_dy if accumulate else sum_dy
        dgamma[j] = dgamma[j] + sum_dy_xhat if accumulate else sum_dy_xhat
        c = gamma[j] * float(invstd[j]) / n
        coef[0, j] = c * n
        coef[1, j] = c * sum_dy
        coef[2, j] = c * sum_dy_xhat
    for i in prange(n):
        dx = dy if in_place else dx_arg
        for j in range(m):
            dx[i, j] = coef[0, j] * dy[i, j] - coef[1, j] - coef[2, j] * xhat[i, j]


def batchnorm_backward(dy, xhat, gamma, invstd, dx_out, dgamma_out, dbeta_out, accumulate=False):
    """Backward of training-mode BatchNorm; see :func:`reference.batchnorm_backward`.
    ``dx_out`` may be ``dy``. Reads ``dy`` and ``xhat`` twice (sums, then ``dx``)."""
    op = "batchnorm_backward"
    dtype = _batch(op, "dy", dy)
    vec = dy.shape[1:]
    _array(op, "xhat", xhat, dtype, dy.shape)
    _array(op, "gamma", gamma, dtype, vec)
    _array(op, "invstd", invstd, dtype, vec)
    _array(op, "dx_out", dx_out, dtype, dy.shape, out=True)
    _array(op, "dgamma_out", dgamma_out, dtype, vec, out=True)
    _array(op, "dbeta_out", dbeta_out, dtype, vec, out=True)
    _batchnorm_backward(dy, xhat, gamma, invstd, dx_out, dgamma_out, dbeta_out, bool(accumulate),
                        _in_place(op, "dx_out", dx_out, "dy", dy))
    return dx_out
