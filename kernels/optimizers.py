"""Every optimizer update of backprop (the in-place ``*_step`` ops), declared once.

A record (:class:`OptimizerDef`) holds the update of one element as a *formula builder*, as
the activations' records do (``kernels/activations.py``): a function that takes a target's
math (:class:`UpdateMath`: constants of the array's type, ``where``, ``sqrt``, ``maximum``)
and returns the formula ``update(p, g, *states, c) -> (p', *states')`` on one parameter, its
gradient and its optimizer states, ``c`` being the tuple of the record's ``scalars`` (of the
array's dtype) then its ``flags`` (booleans). The accelerated backends instantiate the same
builder:

- ``numba_cpu``: one parallel loop over the flat buffers per record, the formula compiled
  for the array's dtype (constants and scalars of that type; strict IEEE arithmetic);
- ``numba_cuda``: one thread per element, the formula a device function per variant and
  dtype;
- ``cupy``: one ``ElementwiseKernel`` per variant, its body printed as CUDA C++ from the
  formula by the symbolic math of ``kernels/activations.py`` (:func:`cuda_update`).

Variants. A state the call does not keep (the momentum buffer without momentum, the mean
gradient unless centered, the running maximum without amsgrad) is passed to the formula as
None and comes back None; the formula tests it with ``is None``, which each backend settles
when it builds the kernel (a Python ``if`` for the printed C++, a pruned branch in Numba), so
a variant's kernel holds only its own arithmetic. Everything else the update depends on is
an *argument* of the kernel (a flag selects with ``where``): a new learning rate or step
never recompiles a kernel.

The host side of an op is in the record too: :attr:`OptimizerDef.arguments` takes a
backend's launcher ``run`` and the op's arguments (``adam_step(p, g, m, v, vmax, lr, ...)``),
checks that the buffers its hyperparameters need are given, and calls
``run(p, g, states, scalars, flags)``: the states in the formula's order (None where not
kept), the scalars computed from the hyperparameters (bias corrections, the effective
learning rate, ``1 - β``) as Python floats, which each backend rounds to the array's dtype
once per call, and the flags as bools. A backend's op is ``arguments`` with its ``run`` bound (:func:`entry_point`).

Every op ends with the keyword ``data_lp=None``: a ``uint16`` (bfloat16 bits) or ``float16``
array shaped like a float32 ``p``, into which the backend writes the low-precision copy of
each updated weight, ``data_lp ← lowp(p_new)`` (``kernels/lowp.py``), in the same pass as the
update (mixed precision: the next matrix product reads the copy). The backend's ``run``
validates it (:func:`lowp.check_lowp`) before any work. ``arguments`` calls
``run(p, g, states, scalars, flags)`` when it is None and ``run(p, g, states, scalars, flags,
data_lp)`` otherwise, so a ``run`` without the sixth parameter still serves every call
without a copy.

The oracle is not built from these records. ``kernels/reference.py`` keeps its own,
hand-written statement of every update (whole-array ``xp`` operations in PyTorch's order),
and tests/test_kernels.py holds every backend to it (tests/test_optim.py holds the optimizers
to PyTorch's formulas): built from the same formula, the oracle would agree with any mistake
in it, as an activation's kernels would without its independent ``check``.

Rules for a formula (those of the activations, and): constants only from ``m.K`` (a
float64 literal would promote float32 arithmetic in Numba); ``if`` only on ``state is
None``, ``where`` for anything decided by a value or a flag (both branches are
evaluated).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .activations import _call, _const, _print_all, _Sym

__all__ = ["UpdateMath", "OptimizerDef", "RECORDS", "SLOTS", "SYMBOLIC", "slotted",
           "entry_point", "cuda_update", "flush_function"]


@dataclass(frozen=True)
class UpdateMath:
    """A target's primitives for the update formulas: ``K(v)`` is the constant ``v`` in the
    target's type, ``where(c, a, b)`` selects, ``maximum(a, b)`` propagates NaN (as
    ``np.maximum``), ``flush(x)`` is ``x`` with a denormal value replaced by 0 (``|x|``
    below the smallest normal number of the target's type; NaN and ±inf stay)."""

    K: Callable
    where: Callable
    sqrt: Callable
    maximum: Callable
    flush: Callable


def flush_function(scalar, compile: Callable) -> Callable:
    """:attr:`UpdateMath.flush` for the NumPy float type ``scalar``, compiled by ``compile``
    (a Numba CPU or CUDA device decorator): ``x``, or 0 where ``|x|`` is below the smallest
    normal ``scalar`` (NaN fails the comparison and stays)."""
    tiny, zero = scalar(np.finfo(scalar).tiny), scalar(0.0)

    @compile
    def flush(x):
        return zero if abs(x) < tiny else x
    return flush


@dataclass(frozen=True)
class OptimizerDef:
    """One optimizer update: ``update(m)`` builds the formula for a target's
    :class:`UpdateMath`, ``arguments`` is the op's host side (see the module docstring)."""

    name: str                          # the op is ``<name>_step``
    update: Callable[[UpdateMath], Callable]
    arguments: Callable                # (run, *op's arguments, data_lp=None): run(p, g, ...)
    states: tuple[str, ...]            # state buffers, in the formula's order
    scalars: tuple[str, ...]           # kernel scalars, in the array's dtype
    flags: tuple[str, ...] = ()        # kernel booleans
    optional: dict = field(default_factory=dict)  # state kept only in a variant -> its name

    @property
    def op(self) -> str:
        return f"{self.name}_step"

    @property
    def variants(self) -> list[tuple[bool, ...]]:
        """Every pattern of kept states (one bool per state)."""
        return list(itertools.product(*(
            (False, True) if s in self.optional else (True,) for s in self.states)))

    def variant_name(self, present) -> str:
        """``name`` and the names of the optional states kept: ``rmsprop_centered``."""
        return "_".join([self.name] + [self.optional[s] for s, kept in zip(self.states, present)
                                       if kept and s in self.optional])


# ---------------------------------------------------------------------------------------
# The formulas (PyTorch's; reference.py states them for whole arrays)
def _sgd(m):
    zero, where, flush = m.K(0.0), m.where, m.flush

    def sgd(p, g, buf, c):
        lr, momentum, dampened, weight_decay, nesterov, first_step = c
        d = where(weight_decay != zero, g + weight_decay * p, g)  # λ = 0 leaves g as it is
        if buf is None:
            return p - lr * d, None
        buf = flush(where(first_step, d, momentum * buf + dampened * d))
        return p - lr * where(nesterov, d + momentum * buf, buf), buf
    return sgd


def _rmsprop(m):
    zero, where, sqrt, flush = m.K(0.0), m.where, m.sqrt, m.flush

    def rmsprop(p, g, square_avg, grad_avg, buf, c):
        lr, alpha, one_minus_alpha, eps, weight_decay, momentum = c
        d = where(weight_decay != zero, g + weight_decay * p, g)
        square_avg = flush(alpha * square_avg + one_minus_alpha * d * d)
        variance = square_avg
        if grad_avg is not None:  # centered
            grad_avg = flush(grad_avg + one_minus_alpha * (d - grad_avg))
            variance = square_avg - grad_avg * grad_avg
        step = d / (sqrt(variance) + eps)  # eps outside the sqrt
        if buf is not None:
            buf = flush(momentum * buf + step)
            step = buf
        return p - lr * step, square_avg, grad_avg, buf
    return rmsprop


def _adam(m):
    zero, where, sqrt, maximum, flush = m.K(0.0), m.where, m.sqrt, m.maximum, m.flush

    def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, c):
        decay, l2, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bias2_sqrt, eps = c
        p = p * decay  # AdamW: decay = 1 - lr λ (else 1)
        d = where(l2 != zero, g + l2 * p, g)  # Adam: l2 = λ (else 0)
        exp_avg = flush(exp_avg + one_minus_beta1 * (d - exp_avg))
        exp_avg_sq = flush(beta2 * exp_avg_sq + one_minus_beta2 * d * d)
        second = exp_avg_sq
        if max_exp_avg_sq is not None:  # amsgrad
            max_exp_avg_sq = flush(maximum(max_exp_avg_sq, exp_avg_sq))
            second = max_exp_avg_sq
        # eps after the bias-corrected sqrt; step_size = lr / (1 - β1ᵗ). The correction
        # multiplies by 1 / sqrt(1 - β2ᵗ) where the reference divides by sqrt(1 - β2ᵗ): one
        # division per element fewer (the costliest operation of the CPU loop), at a
        # rounding's difference
        p = p - step_size * (exp_avg / (sqrt(second) * inv_bias2_sqrt + eps))
        return p, exp_avg, exp_avg_sq, max_exp_avg_sq
    return adam


def _adagrad(m):
    zero, where, sqrt = m.K(0.0), m.where, m.sqrt

    def adagrad(p, g, state_sum, c):
        clr, eps, weight_decay = c
        d = where(weight_decay != zero, g + weight_decay * p, g)
        state_sum = state_sum + d * d
        return p - clr * (d / (sqrt(state_sum) + eps)), state_sum
    return adagrad


# ---------------------------------------------------------------------------------------
# The host side of each op: its signature, its checks, the scalars its kernel takes
# (each ends with ``run(...) if data_lp is None else run(..., data_lp)``, written out: a
# shared helper would put a Python call between the op and its kernel)
def _sgd_arguments(run, p, g, buf, lr, momentum, dampening, nesterov, weight_decay,
                   first_step, data_lp=None):
    if momentum and buf is None:
        raise ValueError(f"sgd_step: momentum={momentum} needs a momentum buffer, got buf=None")
    states = (buf if momentum else None,)
    scalars = (float(lr), float(momentum), 1.0 - dampening, float(weight_decay))
    flags = (bool(nesterov), bool(first_step))
    if data_lp is None:
        return run(p, g, states, scalars, flags)
    return run(p, g, states, scalars, flags, data_lp)


def _rmsprop_arguments(run, p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay,
                       momentum, centered, data_lp=None):
    if momentum and buf is None:
        raise ValueError(f"rmsprop_step: momentum={momentum} needs a momentum buffer, "
                         "got buf=None")
    if centered and grad_avg is None:
        raise ValueError("rmsprop_step: centered=True needs a grad_avg buffer, got "
                         "grad_avg=None")
    states = (square_avg, grad_avg if centered else None, buf if momentum else None)
    scalars = (float(lr), float(alpha), 1.0 - alpha, float(eps), float(weight_decay),
               float(momentum))
    if data_lp is None:
        return run(p, g, states, scalars, ())
    return run(p, g, states, scalars, (), data_lp)


def _adam_arguments(run, p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled,
                    step, data_lp=None):
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else float(weight_decay)
    scalars = (decay, l2, 1.0 - beta1, float(beta2), 1.0 - beta2, lr / (1.0 - beta1 ** step),
               1.0 / math.sqrt(1.0 - beta2 ** step), float(eps))
    if data_lp is None:
        return run(p, g, (m, v, vmax), scalars, ())
    return run(p, g, (m, v, vmax), scalars, (), data_lp)


def _adagrad_arguments(run, p, g, state_sum, lr, lr_decay, eps, weight_decay, step,
                       data_lp=None):
    scalars = (lr / (1.0 + (step - 1) * lr_decay), float(eps), float(weight_decay))
    if data_lp is None:
        return run(p, g, (state_sum,), scalars, ())
    return run(p, g, (state_sum,), scalars, (), data_lp)


RECORDS = {r.name: r for r in (
    OptimizerDef("sgd", _sgd, _sgd_arguments, ("buf",),
                 ("lr", "momentum", "dampened", "weight_decay"), ("nesterov", "first_step"),
                 optional={"buf": "momentum"}),
    OptimizerDef("rmsprop", _rmsprop, _rmsprop_arguments, ("square_avg", "grad_avg", "buf"),
                 ("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"),
                 optional={"grad_avg": "centered", "buf": "momentum"}),
    OptimizerDef("adam", _adam, _adam_arguments, ("m", "v", "vmax"),
                 ("decay", "l2", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size",
                  "inv_bias2_sqrt", "eps"), optional={"vmax": "amsgrad"}),
    OptimizerDef("adagrad", _adagrad, _adagrad_arguments, ("state_sum",),
                 ("clr", "eps", "weight_decay")),
)}

SLOTS = max(len(r.states) for r in RECORDS.values())
"""State buffers of the Numba kernels' fixed signature (:func:`slotted`)."""


def slotted(update, count: int):
    """A compiled formula with ``count`` states in the Numba kernels' fixed form
    ``(p, g, s0, .., s{SLOTS-1}, c) -> (p', s0', ..)``: the slots it does not use are
    ignored and come back None (one kernel loop serves every record)."""
    assert SLOTS == 3, "one form per state count below"
    if count == 1:
        return lambda p, g, s0, s1, s2, c: update(p, g, s0, c) + (None, None)
    if count == 2:
        return lambda p, g, s0, s1, s2, c: update(p, g, s0, s1, c) + (None,)
    return lambda p, g, s0, s1, s2, c: update(p, g, s0, s1, s2, c)


def entry_point(record: OptimizerDef, run: Callable, doc: str) -> Callable:
    """A backend's op function for ``record``: :attr:`OptimizerDef.arguments` with the
    backend's ``run(p, g, states, scalars, flags[, data_lp])`` bound (a C-level partial: no
    Python call in between), the op's name and its signature."""
    op = functools.partial(record.arguments, run)
    op.__name__ = op.__qualname__ = record.op
    op.__doc__ = doc
    op.__module__ = run.__module__
    return op


# ---------------------------------------------------------------------------------------
# CUDA C++ from the same formulas (the CuPy backend's ElementwiseKernel bodies)
def _leaf(name: str) -> _Sym:
    return _Sym("leaf", (name,))


def _maximum(a, b):  # b wins where it is larger or NaN (np.maximum's NaN propagation)
    return _Sym("?", (_Sym("||", (b > a, b != b), True), b, a))


def _flush(x):  # T's smallest normal number, for float and double alike
    tiny = _leaf("T(sizeof(T) == 4 ? 1.1754943508222875e-38 : 2.2250738585072014e-308)")
    return _Sym("?", (_call("fabs")(x) < tiny, _const(0.0), x))


SYMBOLIC = UpdateMath(K=_const, where=lambda c, a, b: _Sym("?", (c, a, b)),
                      sqrt=_call("sqrt"), maximum=_maximum, flush=_flush)


def cuda_update(record: OptimizerDef, present) -> str:
    """The body of the ElementwiseKernel of ``record``'s variant ``present`` (a bool per
    state): its ``p`` and kept states are the out parameters (``T&``), ``g``, the scalars
    and the flags the in parameters, named as in the record. Every new value is computed into a ``const``
    temporary before the first assignment, so no expression reads a state that was already
    overwritten."""
    states = [_leaf(s) if kept else None for s, kept in zip(record.states, present)]
    c = tuple(_leaf(s) for s in record.scalars + record.flags)
    results = record.update(SYMBOLIC)(_leaf("p"), _leaf("g"), *states, c)
    outputs = [(name, value if isinstance(value, _Sym) else _const(value))
               for name, value in zip(("p",) + record.states, results) if value is not None]
    roots = [value for _, value in outputs]
    lines, exprs = _print_all(roots, temps=roots)
    return "\n".join(lines + [f"{name} = {expr};" for (name, _), expr in zip(outputs, exprs)])
