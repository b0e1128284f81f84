"""Export a model to ONNX, for inference in ONNX Runtime and the other ONNX tools.

``export_onnx(model, "model.onnx")`` (or ``model.export_onnx("model.onnx")``) writes the
model's inference graph, what ``model.predict`` computes (eval mode: BatchNorm with its
running statistics, Dropout as the identity), built with the ``onnx`` package and
checked by ``onnx.checker.check_model(full_check=True)`` before anything is written. The
input is ``(N, in_features)`` with a dynamic batch dimension ``N``; weights and
arithmetic are in the model's dtype (float32 or float64; ``dtype=`` casts). Needs only
``onnx`` (``pip install 'backprop[onnx]'``); ``to_onnx`` returns the ``onnx.ModelProto``.

Every layer of backprop maps to standard ONNX operators (``MAPPING``):

    Dense                  Gemm(X, W, b, transB=1), then its activation
    BatchNorm1d, SyncBN    BatchNormalization (inference form, running statistics, eps)
    Dropout                nothing (the identity at inference)
    Residual               the block's nodes, then Add(X, block(X))
    Flatten                Flatten(axis=1)
    Sequential             its layers in order (nested inside a Residual too)

and every activation (the layers of ``backprop.activations``, or Dense's ``activation``):
``softmax`` and ``log_softmax`` (row operations) are ``Softmax(axis=-1)`` and
``LogSoftmax(axis=-1)``; an elementwise activation is built from its record in
``backprop.kernels.activations``, so a new record is exported with no change here:

- its ``forward`` formula, instantiated with this module's ONNX math: the builder's
  arithmetic and comparisons become ``Add``, ``Sub``, ``Mul``, ``Div``, ``Neg``, ``Less``,
  ``Greater``... nodes, its constants (and ``alpha``) constants of the graph's dtype, and the
  primitives ``where`` ``Where``, ``abs`` ``Abs``, ``exp`` ``Exp``, ``tanh`` ``Tanh``,
  ``sigmoid`` ``Sigmoid``; ``softplus`` ``Max(x, 0) + log1p(Exp(-|x|))`` (exp never
  overflows); ``expm1`` and ``log1p`` Kahan's compositions of ``Exp`` and ``Log``
  (``(e^x - 1)·x / log(e^x)``, ``log(1 + x)·x / ((1 + x) - 1)``), which keep the relative
  accuracy of a true ``expm1`` / ``log1p`` near 0 that ``Exp(x) - 1`` loses; ``ndtr``
  (Φ) ``½(1 + Erf(x/√2))`` ¹ (a repeated subexpression is one node);
- or, in float32 graphs, the record's native operator when it has one (``onnx_op``, with
  its attributes and ``alpha``; from opset ``onnx_opset``, e.g. ``Gelu`` from opset 20).
  float64 graphs always use the composition: ONNX Runtime has no double kernel for several
  of these operators (``Softplus``, ``Elu``, ``LeakyRelu`` at most opsets), their ``alpha``
  attribute is a float32, and its double ``Gelu`` computes in float32 precision; composed,
  a float64 activation agrees with ``predict`` to float64 precision (but see ¹).

``ACTIVATION_OPS`` lists what each activation becomes.

¹ ONNX Runtime has no double ``Erf``: in a float64 graph ``Erf`` runs in float32 between
two ``Cast`` nodes, so a float64 GELU (erf) model agrees with ``predict`` to ~1e-7 relative
(float32 precision in Φ), every other layer to float64 precision.

Opsets ``MIN_OPSET`` (13) to ``MAX_OPSET`` (25), capped by the installed ``onnx``; the
default ``DEFAULT_OPSET`` (17) loads in every ONNX Runtime since 1.12 and most other tools.
The IR version is the lowest that the opset allows (older runtimes load the file).

A layer (or activation) that has no ONNX form here raises :class:`ONNXExportError` naming
it (``"layer 2.block.0 (MyLayer())"``) before anything is written. The file is written
atomically (a temporary file in the destination's folder, then ``os.replace``): a failed
export leaves no partial file and an existing file as it was.

The command line's ``python -m backprop export model.npz model.onnx`` adds, for a model
written by ``train``, its input standardisation (and a regression model's output scaling)
to the graph: see :mod:`backprop.cli`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from backprop.kernels.activations import INV_SQRT2, INV_SQRT_2PI, Math
from backprop.kernels.activations import RECORDS as _RECORDS

__all__ = ["export_onnx", "to_onnx", "ONNXExportError", "MAPPING", "ACTIVATION_OPS",
           "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET", "supported_opsets"]

DEFAULT_OPSET = 17
MIN_OPSET = 13   # Softmax/LogSoftmax over one axis, Gemm with an optional C
MAX_OPSET = 25   # the newest opset the tests run through ONNX Runtime
GELU_OPSET = 20  # the first opset with a Gelu operator

INSTALL_HINT = "pip install 'backprop[onnx]' (or pip install onnx)"

#: layer class name -> the ONNX operators it becomes (for the documentation and summaries)
MAPPING = {
    "Dense": "Gemm(transB=1) + activation",
    "BatchNorm1d": "BatchNormalization (inference)",
    "SyncBatchNorm": "BatchNormalization (inference)",
    "Dropout": "(none: identity at inference)",
    "Residual": "block, then Add",
    "Flatten": "Flatten(axis=1)",
    "Sequential": "its layers in order",
}

#: the row activations (not records): kernel name -> ONNX operator (over the last axis)
_ROW_OPS = {"softmax": "Softmax", "log_softmax": "LogSoftmax"}


def _describe(record) -> str:
    """What ``record``'s activation becomes, for ``ACTIVATION_OPS``."""
    composed = f"composed: {record.formula}"
    if record.onnx_op is None:
        return composed
    args = [f"{k}={v!r}" for k, v in record.onnx_attrs]
    args += [record.onnx_alpha] if record.onnx_alpha else []
    native = f"{record.onnx_op}({', '.join(args)})" if args else record.onnx_op
    when = "float32" + (f", opset ≥ {record.onnx_opset}" if record.onnx_opset > MIN_OPSET
                        else "")
    return f"{native} ({when}), else {composed}"


#: activation kernel name -> the ONNX operators it becomes (from the records; see the
#: module docstring)
ACTIVATION_OPS = {**{name: _describe(r) for name, r in _RECORDS.items()},
                  **{name: f"{op}(axis=-1)" for name, op in _ROW_OPS.items()}}


class ONNXExportError(ValueError):
    """The model, or an argument, cannot be exported as asked (nothing was written)."""


def _onnx():
    """The ``onnx`` module, or an ImportError that says how to install it."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package, which is not installed "
                          f"({exc}): {INSTALL_HINT}") from exc
    return onnx


def supported_opsets() -> range:
    """The opsets this exporter writes with the installed ``onnx`` (ImportError without it)."""
    onnx = _onnx()
    return range(MIN_OPSET, min(MAX_OPSET, onnx.defs.onnx_opset_version()) + 1)


def _check_opset(opset) -> int:
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ONNXExportError(f"opset must be a whole number from {MIN_OPSET} to {MAX_OPSET}; "
                              f"got {opset!r}")
    opset = int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ONNXExportError(f"opset {opset} is not supported: give an opset from "
                              f"{MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    onnx = _onnx()
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ONNXExportError(f"opset {opset} is newer than the installed onnx "
                              f"{onnx.__version__} knows (up to {newest}): upgrade onnx "
                              f"(pip install -U onnx) or give an opset <= {newest}")
    return opset


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ONNXExportError(f"{what} must be a non-empty string; got {value!r}")
    return value


def _dtype(model, dtype) -> np.dtype:
    if dtype is None:
        params = model.parameters()
        if params:
            return np.dtype(params[0].data.dtype)
        from backprop.backend import get_dtype

        return np.dtype(get_dtype())
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise ONNXExportError(f"dtype must be float32 or float64 (None: the model's); got "
                              f"{dtype!r}")
    return dt


def _shape(input_shape):
    if input_shape is None:
        return None
    try:
        dims = tuple(int(d) for d in input_shape)
        ok = all(int(d) == d and d >= 1 for d in input_shape) and len(dims) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ONNXExportError(f"input_shape is the shape of one sample (without the batch "
                              f"axis), a tuple of positive whole numbers such as (3, 4); got "
                              f"{input_shape!r}")
    return (None, *dims)


def _pair(value, what: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)``: two vectors of ``n`` finite values, no std 0."""
    try:
        mean, std = (np.asarray(_host(v), dtype=np.float64).reshape(-1) for v in value)
        ok = mean.shape == std.shape == (n,) and np.isfinite(mean).all() \
            and np.isfinite(std).all() and (std != 0).all()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ONNXExportError(f"{what} is (mean, std): two vectors of {n} finite values, no "
                              f"std 0; got {value!r}")
    return mean, std


def _host(a):
    from backprop.backend import to_numpy

    return to_numpy(a)


# ---------------------------------------------------------------------------------------
# The graph
class _Graph:
    """Nodes and initialisers under construction, every name unique."""

    def __init__(self, onnx, dtype: np.dtype, opset: int, reserved):
        self.onnx, self.helper = onnx, onnx.helper
        self.dtype, self.opset = dtype, opset
        self.elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.DOUBLE
        self.nodes, self.initializers = [], []
        self.taken = set(reserved)
        self.producer = {}  # tensor name -> the node that writes it
        self._constants = {}

    def unique(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.taken:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name

    def tensor(self, hint: str, array, dtype=None) -> str:
        name = self.unique(hint)
        arr = np.ascontiguousarray(np.asarray(_host(array), dtype=dtype or self.dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def scalar(self, value: float) -> str:
        """A 0-d constant of the graph's dtype, shared by every node that uses the value."""
        key = float(value)
        if key not in self._constants:
            self._constants[key] = self.tensor(f"const_{key:g}", np.array(key))
        return self._constants[key]

    def prune_constants(self):
        """Drop the shared constants that no node reads (a formula builder may make a
        constant that its formula does not use)."""
        used = {name for node in self.nodes for name in node.input}
        unused = set(self._constants.values()) - used
        self.initializers = [t for t in self.initializers if t.name not in unused]
        self._constants = {k: v for k, v in self._constants.items() if v not in unused}

    def node(self, op: str, inputs, hint: str, **attrs) -> str:
        out = self.unique(f"{hint}/{op}")
        node = self.helper.make_node(op, list(inputs), [out], name=out, **attrs)
        self.nodes.append(node)
        self.producer[out] = node
        return out


def _unsupported(layer, path: str, why: str = "") -> ONNXExportError:
    kinds = ", ".join(MAPPING)
    acts = ", ".join(ACTIVATION_OPS)
    return ONNXExportError(
        f"layer {path} ({layer!r}, class {type(layer).__module__}.{type(layer).__qualname__}) "
        f"cannot be exported to ONNX{': ' + why if why else ''}; the exporter knows the "
        f"layers {kinds} and the activations {acts} (exactly these classes: a subclass may "
        "compute something else); nothing was written")


def _activation_classes() -> set:
    from backprop import activations

    return {cls for cls in vars(activations).values()
            if isinstance(cls, type) and issubclass(cls, activations.Activation)
            and cls.__module__ == activations.__name__ and cls is not activations.Activation}


def _exportable(kind: str) -> bool:
    return kind in _RECORDS or kind in _ROW_OPS


class _Value:
    """A tensor of the graph under construction, as the records' formula builders see it:
    arithmetic and comparisons add nodes (``a + b`` is ``Add``, ``a < b`` is ``Less``...), a
    number on either side is a constant of the graph's dtype."""

    __slots__ = ("em", "name")

    def __init__(self, em, name: str):
        self.em, self.name = em, name

    def _bin(self, op, other, swap=False):
        other = self.em.value(other)
        return self.em.op(op, *((other, self) if swap else (self, other)))

    def __add__(self, o): return self._bin("Add", o)                # noqa: E704
    def __radd__(self, o): return self._bin("Add", o, swap=True)    # noqa: E704
    def __sub__(self, o): return self._bin("Sub", o)                # noqa: E704
    def __rsub__(self, o): return self._bin("Sub", o, swap=True)    # noqa: E704
    def __mul__(self, o): return self._bin("Mul", o)                # noqa: E704
    def __rmul__(self, o): return self._bin("Mul", o, swap=True)    # noqa: E704
    def __truediv__(self, o): return self._bin("Div", o)            # noqa: E704
    def __rtruediv__(self, o): return self._bin("Div", o, swap=True)  # noqa: E704
    def __neg__(self): return self.em.op("Neg", self)               # noqa: E704
    def __lt__(self, o): return self._bin("Less", o)                # noqa: E704
    def __le__(self, o): return self._bin("LessOrEqual", o)         # noqa: E704
    def __gt__(self, o): return self._bin("Greater", o)             # noqa: E704
    def __ge__(self, o): return self._bin("GreaterOrEqual", o)      # noqa: E704
    def __ne__(self, o): return self.em.op("Not", self._bin("Equal", o))  # noqa: E704
    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("a formula took the truth value of a symbolic value (if, and, or, "
                        "not): select with where(cond, a, b)")


class _Emitter:
    """The nodes of one activation's formula: ``math`` is the records' :class:`Math` for this
    graph; a node with the same operator, inputs and attributes as an earlier one is reused
    (a subexpression that a formula writes twice is computed once)."""

    def __init__(self, g: _Graph, path: str):
        self.g, self.path, self._made = g, path, {}
        self.math = _onnx_math(self)

    def value(self, v) -> _Value:
        return v if isinstance(v, _Value) else _Value(self, self.g.scalar(float(v)))

    def op(self, op: str, *args, **attrs) -> _Value:
        inputs = [self.value(a).name for a in args]
        key = (op, tuple(inputs), tuple(sorted(attrs.items())))
        if key not in self._made:
            self._made[key] = _Value(self, self.g.node(op, inputs, self.path, **attrs))
        return self._made[key]


def _onnx_math(em: _Emitter) -> Math:
    """The records' primitives as ONNX operators (see the module docstring)."""
    g = em.g
    one = em.value(1.0)

    def where(c, a, b):
        return em.op("Where", c, a, b)

    def exp(x):
        return em.op("Exp", x)

    def log(x):
        return em.op("Log", x)

    def expm1(x):  # Kahan: (u - 1)·x / log u corrects the rounding of u = e^x
        u = exp(x)
        um1 = u - one
        return where(em.op("Equal", u, one), x,
                     where(em.op("Equal", um1, -1.0), -1.0,
                           where(em.op("Equal", um1, u), u, um1 * x / log(u))))

    def log1p(x):  # Kahan: log(u)·x / (u - 1) corrects the rounding of u = 1 + x
        u = x + one
        return where(em.op("Equal", u, one), x, log(u) * x / (u - one))

    def softplus(x):  # max(x, 0) + log(1 + e^-|x|): exp never overflows
        return em.op("Max", x, 0.0) + log1p(exp(-em.op("Abs", x)))

    def ndtr(x):  # ½(1 + erf(x/√2)); no double Erf in ONNX Runtime: float32 between Casts
        u = x * INV_SQRT2
        if g.dtype == np.float64:
            f32 = g.onnx.TensorProto.FLOAT
            erf = em.op("Cast", em.op("Erf", em.op("Cast", u, to=f32)), to=g.elem)
        else:
            erf = em.op("Erf", u)
        return (erf + one) * 0.5

    return Math(
        K=em.value, cast=em.value, where=where, abs=lambda x: em.op("Abs", x), exp=exp,
        expm1=expm1, tanh=lambda x: em.op("Tanh", x), sigmoid=lambda x: em.op("Sigmoid", x),
        softplus=softplus, ndtr=ndtr,
        ndtr_pdf=lambda x: (ndtr(x), exp(-(x * x) * 0.5) * INV_SQRT_2PI))


def _native_op(record, g: _Graph):
    """The record's native ONNX operator if this graph may use it (float32, the opset)."""
    if record.onnx_op is None or g.dtype != np.float32 or g.opset < record.onnx_opset:
        return None
    return record.onnx_op


def _emit_activation(g: _Graph, act, x: str, path: str) -> str:
    """The nodes of activation ``act`` (an activation layer object) applied to ``x``: a row
    operation's operator, or the record's native operator, or its formula composed."""
    kind = act.kernel
    if kind in _ROW_OPS:
        return g.node(_ROW_OPS[kind], [x], path, axis=-1)
    record, alpha = _RECORDS[kind], float(act.alpha)
    op = _native_op(record, g)
    if op is not None:
        attrs = dict(record.onnx_attrs)
        if record.onnx_alpha:
            attrs[record.onnx_alpha] = alpha
        return g.node(op, [x], path, **attrs)
    em = _Emitter(g, path)
    out = em.value(record.forward(em.math)(_Value(em, x), alpha))
    if out.name in g._constants.values():  # a constant formula: one value per element
        return g.node("Expand", [out.name, g.node("Shape", [x], path)], path)
    return out.name


def _check_features(layer, path: str, shape, n: int, who: str):
    if len(shape) != 2 or shape[1] != n:
        got = "(N, " + ", ".join(map(str, shape[1:])) + ")"
        raise ONNXExportError(f"layer {path} ({layer!r}) takes {who} of shape (N, {n}), but "
                              f"its input here has shape {got}: check input_shape (or add a "
                              "Flatten)")


def _emit(g: _Graph, layer, x: str, shape, path: str, acts: set):
    """``(output tensor, output shape)`` of ``layer`` on ``x`` of ``shape`` (``(None, ...)``,
    None the batch axis); ``path`` names the layer as its parameters are named."""
    from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual, SyncBatchNorm
    from backprop.model import Sequential

    kind = type(layer)
    prefix = f"{path}." if path else ""
    where = path or "model"
    if kind is Sequential:
        for i, sub in enumerate(layer.layers):
            x, shape = _emit(g, sub, x, shape, f"{prefix}{i}", acts)
        return x, shape
    if kind is Dense:
        act = layer.activation
        if type(act) not in acts or not _exportable(act.kernel):
            raise _unsupported(layer, where, f"its activation {act!r} has no ONNX form")
        _check_features(layer, where, shape, layer.in_features, "inputs")
        inputs = [x, g.tensor(f"{prefix}W", layer.W.data)]
        if layer.b is not None:
            inputs.append(g.tensor(f"{prefix}b", layer.b.data))
        z = g.node("Gemm", inputs, where, transB=1)
        return _emit_activation(g, act, z, where), (None, layer.out_features)
    if kind in (BatchNorm1d, SyncBatchNorm):
        n = layer.num_features
        _check_features(layer, where, shape, n, "features")
        gamma = layer.gamma.data if layer.affine else np.ones(n)
        beta = layer.beta.data if layer.affine else np.zeros(n)
        # epsilon is a float32 attribute: a float64 graph adds what float32 rounds off of
        # eps to the variance, so that var + eps is backprop's to the last bits
        eps32 = float(np.float32(layer.eps))
        var = _host(layer.running_var).astype(np.float64)
        if g.dtype == np.float64:
            var = var + (float(layer.eps) - eps32)
        inputs = [x, g.tensor(f"{prefix}gamma", gamma), g.tensor(f"{prefix}beta", beta),
                  g.tensor(f"{prefix}running_mean", layer.running_mean),
                  g.tensor(f"{prefix}running_var", var)]
        return g.node("BatchNormalization", inputs, where, epsilon=eps32), shape
    if kind is Dropout:
        return x, shape
    if kind is Residual:
        h, out = _emit(g, layer.block, x, shape, f"{prefix}block", acts)
        if tuple(out) != tuple(shape):
            raise ONNXExportError(f"layer {where} ({layer!r}): its block maps shape "
                                  f"{_fmt(shape)} to {_fmt(out)}; x + block(x) needs the "
                                  "same shape")
        return g.node("Add", [x, h], where), shape
    if kind is Flatten:
        return g.node("Flatten", [x], where, axis=1), layer.output_shape(shape)
    if kind in acts:
        if not _exportable(layer.kernel):
            raise _unsupported(layer, where)
        return _emit_activation(g, layer, x, where), shape
    raise _unsupported(layer, where)


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _dims(shape):
    return ["N", *shape[1:]]


def to_onnx(model, opset: int = DEFAULT_OPSET, *, input_name: str = "input",
            output_name: str = "output", dtype=None, input_shape=None,
            input_standardization=None, output_standardization=None,
            append_softmax: bool = False, metadata: dict | None = None):
    """The ``onnx.ModelProto`` of ``model``'s inference graph, checked by
    ``onnx.checker.check_model(full_check=True)``. See :func:`export_onnx` for the arguments;
    this one writes nothing."""
    from backprop.layers import Layer

    if not isinstance(model, Layer):
        raise ONNXExportError(f"to_onnx exports a backprop model (a Sequential or a layer); "
                              f"got {type(model).__name__}")
    opset = _check_opset(opset)
    onnx = _onnx()
    helper = onnx.helper
    input_name = _check_name(input_name, "input_name")
    output_name = _check_name(output_name, "output_name")
    if input_name == output_name:
        raise ONNXExportError(f"input_name and output_name must differ; both are "
                              f"{input_name!r}")
    dt = _dtype(model, dtype)
    shape = _shape(input_shape)
    if shape is None:
        if model.in_features is None:
            raise ONNXExportError(f"{type(model).__name__} does not declare its input "
                                  "features (it starts with a layer such as Flatten that takes "
                                  "any shape): give input_shape, one sample's shape without "
                                  "the batch axis, e.g. input_shape=(3, 4)")
        shape = (None, int(model.in_features))
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ONNXExportError("metadata must be a dict of str -> str (stored in the model's "
                              f"metadata_props); got {metadata!r}")
    g = _Graph(onnx, dt, opset, (input_name, output_name))
    x = input_name
    if input_standardization is not None:  # (x - mean) / std, per feature
        if len(shape) != 2:
            raise ONNXExportError("input_standardization needs (N, features) inputs; the "
                                  f"input has shape {_fmt(shape)}")
        mean, std = _pair(input_standardization, "input_standardization", shape[1])
        x = g.node("Sub", [x, g.tensor("input_mean", mean)], "standardize")
        x = g.node("Div", [x, g.tensor("input_std", std)], "standardize")
    out, out_shape = _emit(g, model, x, shape, "", _activation_classes())
    if output_standardization is not None:  # y * std + mean, per output
        if len(out_shape) != 2:
            raise ONNXExportError("output_standardization needs (N, outputs) outputs; the "
                                  f"output has shape {_fmt(out_shape)}")
        mean, std = _pair(output_standardization, "output_standardization", out_shape[1])
        out = g.node("Mul", [out, g.tensor("output_std", std)], "unstandardize")
        out = g.node("Add", [out, g.tensor("output_mean", mean)], "unstandardize")
    if append_softmax:
        out = g.node("Softmax", [out], "probabilities", axis=-1)
    if out in g.producer:  # the last node writes the graph output itself
        node = g.producer.pop(out)
        node.output[0] = output_name
    else:  # no node at all (Dropout, Identity): the output is the input
        g.nodes.append(helper.make_node("Identity", [out], [output_name], name="output"))
    g.prune_constants()
    graph = helper.make_graph(
        g.nodes, "backprop", [helper.make_tensor_value_info(input_name, g.elem, _dims(shape))],
        [helper.make_tensor_value_info(output_name, g.elem, _dims(out_shape))],
        initializer=g.initializers, doc_string=repr(model)[:2000])
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="backprop",
                              producer_version=_version(),
                              ir_version=helper.find_min_ir_version_for(opsets))
    props = {"backprop.model": json.dumps(model.config())}
    props.update(metadata or {})
    helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise RuntimeError(f"the exported graph fails onnx.checker ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:500]}): a bug in backprop's ONNX "
                           "exporter, please report it with the model's summary()") from exc
    return proto


def _version() -> str:
    import backprop

    return backprop.__version__


# ---------------------------------------------------------------------------------------
# Writing
def _destination(path) -> tuple[str, int]:
    """The file to replace (symlinks followed) and the permission bits to give it: the
    checks of :func:`backprop.io.save`, worded for an export."""
    from backprop import io

    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path must be a file name (str or os.PathLike) such as "
                        f"'model.onnx'; got {path!r}")
    return io._destination(os.fsdecode(os.fspath(path)), verb="export", example="model.onnx",
                           not_regular=ONNXExportError)


def export_onnx(model, path, opset: int = DEFAULT_OPSET, *, input_name: str = "input",
                output_name: str = "output", dtype=None, input_shape=None,
                input_standardization=None, output_standardization=None,
                append_softmax: bool = False, metadata: dict | None = None) -> str:
    """Write ``model``'s inference graph (what ``model.predict`` computes) to ``path`` as
    ONNX; returns ``path`` as a str.

    - ``opset``: the ONNX opset, ``MIN_OPSET`` (13) to ``MAX_OPSET`` (25), default 17.
    - ``input_name``, ``output_name``: the graph's input and output tensors; the input is
      ``(N, in_features)`` with a dynamic batch dimension ``N``.
    - ``dtype``: float32 or float64 (None: the model's); weights are cast to it.
    - ``input_shape``: one sample's shape without the batch axis, e.g. ``(3, 4)`` for a model
      that starts with Flatten (default: ``(in_features,)``; required when the model does
      not declare its input features).
    - ``input_standardization=(mean, std)``: the graph starts with ``(x - mean) / std``, so it
      takes raw features; ``output_standardization=(mean, std)``: it ends with
      ``y * std + mean``; ``append_softmax``: it ends with a Softmax over the last axis
      (probabilities from logits). None / False (default): exactly the model.
    - ``metadata``: str -> str entries for the model's ``metadata_props`` (backprop adds
      ``backprop.model``, the model's config as JSON).

    Errors (nothing written): :class:`ONNXExportError` (a ValueError) for a layer without an
    ONNX form or a bad argument; ImportError when ``onnx`` is not installed;
    ``FileNotFoundError`` / ``IsADirectoryError`` for an unusable path. The file is replaced
    atomically."""
    target, mode = _destination(path)
    proto = to_onnx(model, opset, input_name=input_name, output_name=output_name,
                    dtype=dtype, input_shape=input_shape,
                    input_standardization=input_standardization,
                    output_standardization=output_standardization,
                    append_softmax=append_softmax, metadata=metadata)
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise ONNXExportError(f"the model is too large for one ONNX file ({exc})") from exc
    from backprop import io

    io._atomic_write(target, mode, lambda f: f.write(data))
    return os.fsdecode(os.fspath(path))
