"""Every elementwise activation of backprop, declared once.

A record (:class:`ActivationDef`) holds σ and σ′ as *formula builders*: functions that take a
target's math (:class:`Math`: constants of the right type, ``where``, ``exp``, ``sigmoid``,
...) and return the scalar formula ``f(x, alpha)``. Each backend instantiates the same builder
with its own math, so the formula is written once:

- ``reference``: array functions of NumPy or CuPy (the oracle);
- ``numba_cpu``: :mod:`vecmath`'s vectorisable functions, constants of the array's float type
  (a float64 constant would promote float32 arithmetic);
- ``numba_cuda``: ``math`` functions in device code, constants of the array's dtype;
- ``cupy``: symbolic math that prints the formula as CUDA C++ (:func:`cuda_source`), common
  subexpressions as ``const`` temporaries.

Rules for a builder: bind what it uses from ``m`` to local names *outside* the formula, and
write the formula with ``where(cond, a, b)`` instead of ``if`` (it runs on arrays, and both
branches are evaluated, so a branch must not overflow where it is not chosen). σ′ receives
``s = σ(z)`` when it can be computed from the output, or ``s = z`` when ``needs_z``.

Everything else about an activation is in its record too: whether it is ReLU-like (He
initialisation) or saturating (the gradient monitor's saturation statistic), its native ONNX
operator if it has one, its layer class name and default ``alpha``, the names it answers to in
``Dense(activation=...)``, its formula for the documentation, and an independent NumPy
definition (as PyTorch defines it) that the tests compare the layers with. Adding an
activation means adding a record here: the backends, the layers, ``init``'s defaults, the
kernel oracle tests, gradcheck and the benchmarks pick it up.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["ActivationDef", "Math", "RECORDS", "ACTIVATIONS", "NEEDS_Z", "RELU_LIKE",
           "GELU_K", "GELU_C", "INV_SQRT2", "INV_SQRT_2PI", "SYMBOLIC", "cuda_source",
           "operation_counts"]

GELU_K = math.sqrt(2.0 / math.pi)  # sqrt(2/pi) of the tanh approximation
GELU_C = 0.044715
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Math:
    """A target's primitives for the formula builders. ``K(v)`` is the constant ``v`` in the
    target's type; ``cast(alpha)`` turns the ``alpha`` argument into it; ``where(c, a, b)``
    selects elementwise; ``ndtr_pdf(x)`` is ``(Φ(x), φ(x))``."""

    K: Callable
    cast: Callable
    where: Callable
    abs: Callable
    exp: Callable
    expm1: Callable
    tanh: Callable
    sigmoid: Callable
    softplus: Callable
    ndtr: Callable
    ndtr_pdf: Callable


@dataclass(frozen=True)
class ActivationDef:
    """One activation: ``forward(m)`` and ``derivative(m)`` build ``σ(z, α)`` and
    ``σ′(s, α)`` for a target's :class:`Math` (see the module docstring)."""

    name: str
    forward: Callable[[Math], Callable]
    derivative: Callable[[Math], Callable]
    formula: str                       # σ(z), as the documentation shows it
    slope: str                         # σ′, as the documentation shows it
    check: Callable                    # σ(z) in NumPy (float64), as PyTorch defines it
    needs_z: bool = False              # σ′ from z (else from a = σ(z))
    relu_like: bool = False            # He initialisation by default
    layer: str | None = None           # the activation layer's class name
    alpha: float | None = None         # the layer's default alpha (None: it takes none)
    aliases: tuple = field(default=())  # more names for Dense(activation=...)
    saturating: bool = False           # bounded, σ′ → 0 at both ends (gradient_health)
    # ONNX export (backprop.onnx_export): σ is composed from the formula; a native operator,
    # when given, replaces it in float32 graphs from opset ``onnx_opset`` on, with the
    # attributes ``onnx_attrs`` ((name, value) pairs) and ``alpha`` as ``onnx_alpha``
    onnx_op: str | None = None
    onnx_attrs: tuple = field(default=())
    onnx_alpha: str | None = None      # the attribute that receives alpha
    onnx_opset: int = 1                # the first opset with onnx_op


# ---------------------------------------------------------------------------------------
# The formulas
def _identity(m):
    return lambda z, alpha: z


def _identity_d(m):
    one = m.K(1.0)
    return lambda s, alpha: one


def _relu(m):
    zero, where = m.K(0.0), m.where

    def relu(z, alpha):  # z < 0 is False for NaN: NaN passes through, as in np.maximum
        return where(z < zero, zero, z)
    return relu


def _relu_d(m):
    zero, one, where = m.K(0.0), m.K(1.0), m.where
    return lambda s, alpha: where(s > zero, one, zero)


def _leaky_relu(m):
    zero, cast, where = m.K(0.0), m.cast, m.where
    return lambda z, alpha: where(z > zero, z, z * cast(alpha))


def _leaky_relu_d(m):
    zero, one, cast, where = m.K(0.0), m.K(1.0), m.cast, m.where
    return lambda s, alpha: where(s > zero, one, cast(alpha))


def _sigmoid(m):
    sigmoid = m.sigmoid
    return lambda z, alpha: sigmoid(z)


def _sigmoid_d(m):
    one = m.K(1.0)
    return lambda s, alpha: s * (one - s)


def _tanh(m):
    tanh = m.tanh
    return lambda z, alpha: tanh(z)


def _tanh_d(m):
    one = m.K(1.0)
    return lambda s, alpha: one - s * s


def _gelu_tanh(m):  # ½ z (1 + tanh u) = z σ(2u), u = k (z + c z³)
    k2, c, sigmoid = m.K(2.0 * GELU_K), m.K(GELU_C), m.sigmoid
    return lambda z, alpha: z * sigmoid(k2 * (z + c * z * z * z))


def _gelu_tanh_d(m):
    # with u2 = 2k(z + c z³): ½(1 + tanh u) = σ(u2) and ½(1 - tanh² u) = 2σ(u2)σ(-u2): the
    # derivative without the cancellation of 1 + tanh u for very negative z
    zero, one, k2 = m.K(0.0), m.K(1.0), m.K(2.0 * GELU_K)
    c, c3 = m.K(GELU_C), m.K(3.0 * GELU_C)
    exp, abs_, where = m.exp, m.abs, m.where

    def gelu_tanh_d(s, alpha):
        u2 = k2 * (s + c * s * s * s)
        e = exp(-abs_(u2))
        t = one / (one + e)
        return where(u2 >= zero, t, e * t) + s * k2 * (one + c3 * s * s) * (e * t * t)
    return gelu_tanh_d


def _gelu_erf(m):
    ndtr = m.ndtr
    return lambda z, alpha: z * ndtr(z)


def _gelu_erf_d(m):  # Φ(z) + z φ(z)
    ndtr_pdf = m.ndtr_pdf

    def gelu_erf_d(s, alpha):
        cdf, pdf = ndtr_pdf(s)
        return cdf + s * pdf
    return gelu_erf_d


def _softplus(m):
    softplus = m.softplus
    return lambda z, alpha: softplus(z)


def _softplus_d(m):
    sigmoid = m.sigmoid
    return lambda s, alpha: sigmoid(s)


def _silu(m):
    sigmoid = m.sigmoid
    return lambda z, alpha: z * sigmoid(z)


def _silu_d(m):  # σ(z) (1 + z (1 - σ(z)))
    one, sigmoid = m.K(1.0), m.sigmoid

    def silu_d(s, alpha):
        g = sigmoid(s)
        return g * (one + s * (one - g))
    return silu_d


def _elu(m):  # expm1 sees min(z, 0) only: the branch not taken never overflows
    zero, cast, expm1, where = m.K(0.0), m.cast, m.expm1, m.where
    return lambda z, alpha: where(z > zero, z, cast(alpha) * expm1(where(z > zero, zero, z)))


def _elu_d(m):
    zero, one, cast, exp, where = m.K(0.0), m.K(1.0), m.cast, m.exp, m.where
    return lambda s, alpha: where(s > zero, one, cast(alpha) * exp(where(s > zero, zero, s)))


def _np():
    import numpy as np

    return np


def _check_gelu_erf(z, alpha):
    from math import erf

    np = _np()
    return 0.5 * z * (1.0 + np.vectorize(erf)(z / math.sqrt(2.0)))


RECORDS = {r.name: r for r in (
    ActivationDef("identity", _identity, _identity_d, "z", "1",
                  lambda z, alpha: z, layer="Identity", aliases=("linear",)),
    ActivationDef("relu", _relu, _relu_d, "max(z, 0)", "[a > 0]",
                  lambda z, alpha: _np().maximum(z, 0.0), relu_like=True, layer="ReLU",
                  onnx_op="Relu"),
    ActivationDef("leaky_relu", _leaky_relu, _leaky_relu_d, "z if z > 0 else αz", "1 or α",
                  lambda z, alpha: _np().where(z > 0, z, alpha * z), relu_like=True,
                  layer="LeakyReLU", alpha=0.01, onnx_op="LeakyRelu", onnx_alpha="alpha"),
    ActivationDef("sigmoid", _sigmoid, _sigmoid_d, "1 / (1 + e^-z)", "a (1 - a)",
                  lambda z, alpha: 1.0 / (1.0 + _np().exp(-z)), layer="Sigmoid",
                  saturating=True, onnx_op="Sigmoid"),
    ActivationDef("tanh", _tanh, _tanh_d, "tanh z", "1 - a²",
                  lambda z, alpha: _np().tanh(z), layer="Tanh", saturating=True,
                  onnx_op="Tanh"),
    ActivationDef("gelu_tanh", _gelu_tanh, _gelu_tanh_d,
                  "½z(1 + tanh(√(2/π)(z + 0.044715z³)))", "(from z)",
                  lambda z, alpha: 0.5 * z * (1.0 + _np().tanh(GELU_K * (z + GELU_C * z ** 3))),
                  needs_z=True, relu_like=True, onnx_op="Gelu",
                  onnx_attrs=(("approximate", "tanh"),), onnx_opset=20),
    ActivationDef("gelu_erf", _gelu_erf, _gelu_erf_d, "z Φ(z) (exact, erf)", "Φ(z) + z φ(z)",
                  _check_gelu_erf, needs_z=True, relu_like=True, onnx_op="Gelu", onnx_opset=20),
    ActivationDef("softplus", _softplus, _softplus_d, "log(1 + e^z)", "sigmoid(z)",
                  lambda z, alpha: _np().log1p(_np().exp(z)), needs_z=True, relu_like=True,
                  layer="Softplus", onnx_op="Softplus"),
    ActivationDef("silu", _silu, _silu_d, "z sigmoid(z)", "σ(z)(1 + z(1 - σ(z)))",
                  lambda z, alpha: z / (1.0 + _np().exp(-z)), needs_z=True, relu_like=True,
                  layer="SiLU", aliases=("swish",)),
    ActivationDef("elu", _elu, _elu_d, "z if z > 0 else α(e^z - 1)", "1 or α e^z",
                  lambda z, alpha: _np().where(z > 0, z, alpha * _np().expm1(_np().minimum(z, 0))),
                  needs_z=True, relu_like=True, layer="ELU", alpha=1.0, onnx_op="Elu",
                  onnx_alpha="alpha"),
)}

ACTIVATIONS = tuple(RECORDS)
NEEDS_Z = frozenset(name for name, r in RECORDS.items() if r.needs_z)
RELU_LIKE = frozenset(name for name, r in RECORDS.items() if r.relu_like)


# ---------------------------------------------------------------------------------------
# CUDA C++ from the same formulas
class _Sym:
    """A node of an expression tree; printing it gives C++ (see :func:`cuda_source`)."""

    __slots__ = ("op", "args", "boolean")

    def __init__(self, op, args=(), boolean=False):
        self.op, self.args, self.boolean = op, tuple(args), boolean

    def _bin(self, op, other, boolean=False, swap=False):
        other = other if isinstance(other, _Sym) else _const(other)
        a, b = (other, self) if swap else (self, other)
        return _Sym(op, (a, b), boolean)

    def __add__(self, o): return self._bin("+", o)              # noqa: E704
    def __radd__(self, o): return self._bin("+", o, swap=True)  # noqa: E704
    def __sub__(self, o): return self._bin("-", o)              # noqa: E704
    def __rsub__(self, o): return self._bin("-", o, swap=True)  # noqa: E704
    def __mul__(self, o): return self._bin("*", o)              # noqa: E704
    def __rmul__(self, o): return self._bin("*", o, swap=True)  # noqa: E704
    def __truediv__(self, o): return self._bin("/", o)          # noqa: E704
    def __rtruediv__(self, o): return self._bin("/", o, swap=True)  # noqa: E704
    def __neg__(self): return _Sym("neg", (self,))              # noqa: E704
    def __lt__(self, o): return self._bin("<", o, True)         # noqa: E704
    def __le__(self, o): return self._bin("<=", o, True)        # noqa: E704
    def __gt__(self, o): return self._bin(">", o, True)         # noqa: E704
    def __ge__(self, o): return self._bin(">=", o, True)        # noqa: E704
    def __ne__(self, o): return self._bin("!=", o, True)        # noqa: E704
    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("a formula took the truth value of a symbolic value (if, and, or, "
                        "not): select with where(cond, a, b)")


def _const(value) -> _Sym:
    return _Sym("leaf", (f"T({float(value)!r})",))


def _call(fn: str):
    return lambda *args: _Sym("call", (fn, *args))


SYMBOLIC = Math(
    K=_const, cast=lambda v: v, where=lambda c, a, b: _Sym("?", (c, a, b)),
    abs=_call("fabs"), exp=_call("exp"), expm1=_call("expm1"), tanh=_call("tanh"),
    sigmoid=_call("bp_sigmoid"), softplus=_call("bp_softplus"), ndtr=_call("bp_ndtr"),
    ndtr_pdf=lambda x: (_call("bp_ndtr")(x), _call("bp_npdf")(x)))

#: ``SYMBOLIC``: the math whose formulas are expression trees (``_Sym``), printed as C++ by
#: :func:`cuda_source`; :func:`operation_counts` counts their operations.

#: The C++ helpers that the printed formulas call (``kernels/cuda/activation_helpers.cuh``).
def _helpers() -> str:
    from importlib import resources

    text = resources.files(__package__).joinpath("cuda", "activation_helpers.cuh").read_text(
        encoding="utf-8")
    return text.replace("INV_SQRT_2PI", repr(INV_SQRT_2PI)).replace("INV_SQRT2", repr(INV_SQRT2))


def _print(root: _Sym) -> tuple[list[str], str]:
    """``(temporaries, expression)``: nodes used more than once become ``const`` locals."""
    lines, (expr,) = _print_all([root])
    return lines, expr


def _print_all(roots, temps=()) -> tuple[list[str], list[str]]:
    """``(temporaries, expressions)`` of several trees printed together: the nodes used more
    than once (in any of them) and the nodes in ``temps`` become ``const`` locals, in the
    order of their first use, so every temporary precedes the expressions."""
    uses: dict[int, int] = {}

    def count(node):
        if not isinstance(node, _Sym) or node.op == "leaf":
            return
        uses[id(node)] = uses.get(id(node), 0) + 1
        if uses[id(node)] == 1:
            for a in node.args:
                count(a)

    for root in roots:
        count(root)
    for node in temps:
        if id(node) in uses:
            uses[id(node)] = 2
    names: dict[int, str] = {}
    lines: list[str] = []

    def text(node) -> str:
        if not isinstance(node, _Sym):
            return str(node)
        if node.op == "leaf":
            return node.args[0]
        if id(node) in names:
            return names[id(node)]
        if node.op == "call":
            out = f"{node.args[0]}({', '.join(text(a) for a in node.args[1:])})"
        elif node.op == "neg":
            out = f"(-{text(node.args[0])})"
        elif node.op == "?":
            c, a, b = (text(x) for x in node.args)
            out = f"({c} ? {a} : {b})"
        else:
            out = f"({text(node.args[0])} {node.op} {text(node.args[1])})"
        if uses.get(id(node), 0) > 1:
            name = f"t{len(names)}"
            lines.append(f"const {'bool' if node.boolean else 'T'} {name} = {out};")
            names[id(node)] = name
            return name
        return out

    exprs = [text(root) for root in roots]
    return lines, exprs


def _nodes(root) -> list:
    """The distinct nodes of an expression tree (a shared subexpression counts once)."""
    seen, out, stack = set(), [], [root]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
        elif isinstance(node, _Sym) and node.op != "leaf" and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
            stack.extend(a for a in node.args if isinstance(a, _Sym))
    return out


def operation_counts(act: str, weights: dict) -> tuple[int, int]:
    """Nominal operations of ``σ`` and of ``σ′`` (the benchmarks' FLOP counts): 1 per
    arithmetic operation, comparison or select, ``weights[name]`` per call of a math
    function (``exp``, ``bp_sigmoid``...; 1 when not given)."""
    record = RECORDS[act]
    counts = []
    for build, arg in ((record.forward, "z"), (record.derivative, "s")):
        tree = build(SYMBOLIC)(_Sym("leaf", (arg,)), _Sym("leaf", ("alpha",)))
        counts.append(sum(weights.get(n.args[0], 1) if n.op == "call" else 1
                          for n in _nodes(tree)))
    return counts[0], counts[1]


@functools.lru_cache(maxsize=None)
def cuda_source(act: str) -> str:
    """CUDA C++ of ``bp_activate<T>(z, alpha)`` and ``bp_derivative<T>(s, alpha)`` for
    ``act``, printed from its record's formulas (with ``kernels/cuda/activation_helpers.cuh``)."""
    record = RECORDS[act]
    parts = [_helpers()]
    for fn, arg, build in (("bp_activate", "z", record.forward),
                           ("bp_derivative", "s", record.derivative)):
        result = build(SYMBOLIC)(_Sym("leaf", (arg,)), _Sym("leaf", ("alpha",)))
        lines, expr = _print(result if isinstance(result, _Sym) else _const(result))
        body = "".join(f"    {line}\n" for line in lines)
        parts.append(f"template <typename T> __device__ __forceinline__ T {fn}("
                     f"const T {arg}, const T alpha) {{\n{body}    return {expr};\n}}\n")
    return "".join(parts)
