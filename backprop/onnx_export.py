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

    identity   nothing              relu       Relu          leaky_relu  LeakyRelu(alpha) ¹
    sigmoid    Sigmoid              tanh       Tanh          softplus    Softplus ¹
    elu        Elu(alpha) ¹         silu       Mul(x, Sigmoid(x))
    gelu       Gelu (opset ≥ 20) or x·½(1 + Erf(x/√2)) ² ³
    gelu_tanh  Gelu(approximate="tanh") (opset ≥ 20) or x·Sigmoid(2√(2/π)(x + 0.044715x³)) ³
    softmax    Softmax(axis=-1)     log_softmax  LogSoftmax(axis=-1)

¹ float64: composed of primitive operators, because ONNX Runtime has no double kernel for
``Softplus``, ``Elu`` and (at most opsets) ``LeakyRelu``, whose ``alpha`` attribute is a
float32 anyway: ``Max(x, 0) + Log(1 + Exp(-|x|))``, ``Where(x > 0, x, α(Exp(Min(x, 0)) - 1))``
and ``Where(x > 0, x, αx)``, ``α`` a double constant: these agree with ``predict`` to ~1e-16.
² float64: ONNX Runtime has no double ``Erf`` either, so ``Erf`` runs in float32 between two
``Cast`` nodes: a float64 GELU (erf) model agrees with ``predict`` to ~1e-7 relative (float32
precision in Φ), every other layer to float64 precision.
³ opset < 20 has no ``Gelu``; float64 uses the composition at every opset (ONNX Runtime's
double ``Gelu`` computes in float32 precision).

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
import math
import os

import numpy as np

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

#: activation kernel name -> the ONNX operators it becomes (float32; see the module docstring
#: for float64 and for opsets before Gelu)
ACTIVATION_OPS = {
    "identity": "(none)",
    "relu": "Relu",
    "leaky_relu": "LeakyRelu(alpha)",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "softplus": "Softplus",
    "elu": "Elu(alpha)",
    "silu": "Mul(x, Sigmoid(x))",
    "gelu_erf": "Gelu / x·½(1 + Erf(x/√2))",
    "gelu_tanh": "Gelu(approximate='tanh') / x·Sigmoid(2k(x + cx³))",
    "softmax": "Softmax(axis=-1)",
    "log_softmax": "LogSoftmax(axis=-1)",
}


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


def _emit_activation(g: _Graph, act, x: str, path: str) -> str:
    """The nodes of activation ``act`` (an activation layer object) applied to ``x``."""
    kind, alpha, dt = act.kernel, float(act.alpha), g.dtype
    double = dt == np.float64
    if kind == "identity":
        return x
    if kind in ("relu", "sigmoid", "tanh"):
        return g.node({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}[kind], [x], path)
    if kind == "leaky_relu":
        if not double:  # (a float attribute: α in float32, and no double kernel in ORT)
            return g.node("LeakyRelu", [x], path, alpha=alpha)
        neg = g.node("Mul", [x, g.scalar(alpha)], path)
        return g.node("Where", [g.node("Greater", [x, g.scalar(0.0)], path), x, neg], path)
    if kind == "softmax":
        return g.node("Softmax", [x], path, axis=-1)
    if kind == "log_softmax":
        return g.node("LogSoftmax", [x], path, axis=-1)
    if kind == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x], path)], path)
    if kind == "softplus":
        if not double:
            return g.node("Softplus", [x], path)
        # max(x, 0) + log(1 + e^-|x|): exp never overflows
        e = g.node("Exp", [g.node("Neg", [g.node("Abs", [x], path)], path)], path)
        log = g.node("Log", [g.node("Add", [e, g.scalar(1.0)], path)], path)
        return g.node("Add", [g.node("Max", [x, g.scalar(0.0)], path), log], path)
    if kind == "elu":
        if not double:
            return g.node("Elu", [x], path, alpha=alpha)
        # where(x > 0, x, α(e^min(x, 0) - 1)): exp sees min(x, 0) only
        em1 = g.node("Sub", [g.node("Exp", [g.node("Min", [x, g.scalar(0.0)], path)], path),
                             g.scalar(1.0)], path)
        neg = g.node("Mul", [em1, g.scalar(alpha)], path)
        return g.node("Where", [g.node("Greater", [x, g.scalar(0.0)], path), x, neg], path)
    if kind == "gelu_tanh":
        if g.opset >= GELU_OPSET and not double:  # (ORT's double Gelu: float32 constants)
            return g.node("Gelu", [x], path, approximate="tanh")
        from backprop.kernels.activations import GELU_C, GELU_K

        # x σ(2k(x + c x³)) = ½x(1 + tanh(k(x + c x³))), as backprop computes it
        x3 = g.node("Mul", [g.node("Mul", [x, x], path), x], path)
        u = g.node("Add", [x, g.node("Mul", [x3, g.scalar(GELU_C)], path)], path)
        gate = g.node("Sigmoid", [g.node("Mul", [u, g.scalar(2.0 * GELU_K)], path)], path)
        return g.node("Mul", [x, gate], path)
    if kind == "gelu_erf":
        if g.opset >= GELU_OPSET and not double:
            return g.node("Gelu", [x], path)
        # x Φ(x) = x · ½(1 + erf(x/√2))
        u = g.node("Mul", [x, g.scalar(1.0 / math.sqrt(2.0))], path)
        if double:  # no double Erf in ONNX Runtime: erf in float32 (see the module docstring)
            f32 = g.onnx.TensorProto.FLOAT
            erf = g.node("Cast", [g.node("Erf", [g.node("Cast", [u], path, to=f32)], path)],
                         path, to=g.elem)
        else:
            erf = g.node("Erf", [u], path)
        half = g.node("Mul", [g.node("Add", [erf, g.scalar(1.0)], path), g.scalar(0.5)], path)
        return g.node("Mul", [x, half], path)
    raise KeyError(kind)


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
        if type(act) not in acts or act.kernel not in ACTIVATION_OPS:
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
        if layer.kernel not in ACTIVATION_OPS:
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
