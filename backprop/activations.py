"""Activation layers ``A = σ(X)``, ``∂X = dA ⊙ σ'(X)``, also usable by name inside ``Dense``.

Every elementwise activation is one record in ``kernels/activations.py`` (its formulas, for
every kernel backend); its layer class here is made from that record: a subclass of
:class:`Activation` named by the record, taking ``alpha`` when the record has one. Made by
hand: :class:`GELU` (one class, two records: ``approximate="none" | "tanh"``) and
:class:`Softmax` (a row operation, not elementwise). The table (``NAMES`` holds them all):

{table}

Elementwise activations run the fused epilogue kernels with no bias
(``K.bias_act_forward(x, None, out, kernel, alpha)``); ``Softmax`` runs the row-softmax kernels.
"""
from __future__ import annotations

from backprop import kernels as K
from backprop.backend import get_array_module
from backprop.kernels.activations import RECORDS
from backprop.layers import Layer


def _rows(a, last_axis=False):
    """A 2-D view: ``(N, -1)``, or ``(-1, C)`` when normalising over the last axis."""
    if a.ndim == 2:
        return a
    return a.reshape(-1, a.shape[-1]) if last_axis else a.reshape(a.shape[0], -1)


class Activation(Layer):
    """An elementwise activation: ``kernel`` is its name in ``K.ACTIVATIONS``."""

    name = kernel = "identity"
    alpha = 0.0
    preserves_shape = True

    def forward(self, x):
        out = self._buffer("out", x.shape, x)
        K.bias_act_forward(_rows(x), None, _rows(out), self.kernel, self.alpha)
        self._ctx.saved = x, out
        return out

    def backward(self, grad, need_input_grad=True):
        if not need_input_grad:
            return None
        g, (x, out) = _rows(grad), self._ctx.saved
        K.bias_act_backward(g, _rows(out), _rows(x), self.kernel, self.alpha, g)
        return grad

    def config(self) -> dict:
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GELU(Activation):
    """GELU ``z Φ(z)``; ``approximate="none"`` (exact, erf; PyTorch's default) or ``"tanh"``."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh'; got {approximate!r}")
        self.approximate = approximate
        self.kernel = "gelu_erf" if approximate == "none" else "gelu_tanh"
        self.name = "gelu" if approximate == "none" else "gelu_tanh"

    def config(self) -> dict:
        return {"type": "GELU", "approximate": self.approximate}

    def __repr__(self) -> str:
        return "GELU()" if self.approximate == "none" else "GELU(approximate='tanh')"


class Softmax(Activation):
    """Softmax over the last axis: ``aᵢ = e^xᵢ / Σⱼ e^xⱼ``, ``∂X = a ⊙ (dA - Σⱼ dAⱼ aⱼ)``."""

    name = kernel = "softmax"

    def forward(self, x):
        out = self._buffer("out", x.shape, x)
        K.softmax_forward(_rows(x, True), _rows(out, True))
        self._ctx.saved = x, out
        return out

    def logits(self):
        """The input of this thread's last forward pass (see :meth:`Dense.logits`)."""
        return self._ctx.saved[0]

    def backward(self, grad, need_input_grad=True, from_logits=False):
        """``from_logits=True``: ``grad`` is already ``∂L/∂X`` (a paired loss's)."""
        if not need_input_grad or from_logits:
            return grad if need_input_grad else None
        g = _rows(grad, True)
        K.softmax_backward(g, _rows(self._ctx.saved[1], True), g)
        return grad


class LogSoftmax(Activation):
    """Log-softmax over the last axis, ``aᵢ = xᵢ - max x - log Σⱼ e^(xⱼ - max x)`` (the input
    of :class:`~backprop.losses.NLLLoss`), ``∂X = dA - softmax(x) Σⱼ dAⱼ``. Plain array
    operations (no fused kernel)."""

    name = kernel = "log_softmax"

    def forward(self, x):
        xp = get_array_module(x)
        rows = _rows(x, True)
        out = self._buffer("out", x.shape, x)
        o = _rows(out, True)
        xp.subtract(rows, rows.max(axis=1, keepdims=True), out=o)
        o -= xp.log(xp.exp(o).sum(axis=1, keepdims=True))
        self._ctx.out = out
        return out

    def backward(self, grad, need_input_grad=True):
        if not need_input_grad:
            return None
        xp = get_array_module(grad)
        g, out = _rows(grad, True), _rows(self._ctx.out, True)
        g -= xp.exp(out) * g.sum(axis=1, keepdims=True)
        return grad


def _layer_class(record) -> type:
    """The activation layer of a record of ``kernels/activations.py``."""
    attrs = {"name": record.name, "kernel": record.name, "__module__": __name__,
             "__doc__": f"``σ(z) = {record.formula}``, ``σ′ = {record.slope}`` "
                        f"(``kernels/activations.py``, record {record.name!r})."}
    if record.alpha is not None:
        default = record.alpha

        def __init__(self, alpha=default):
            Activation.__init__(self)
            self.alpha = float(alpha)

        def config(self) -> dict:
            return {"type": type(self).__name__, "alpha": self.alpha}

        def __repr__(self) -> str:
            return f"{type(self).__name__}(alpha={self.alpha})"

        attrs.update(__init__=__init__, config=config, __repr__=__repr__)
    return type(record.layer, (Activation,), attrs)


_MADE = {r.layer: _layer_class(r) for r in RECORDS.values() if r.layer}
globals().update(_MADE)

NAMES = {"gelu": GELU, "gelu_tanh": lambda: GELU("tanh"), "softmax": Softmax,
         "log_softmax": LogSoftmax}
for _record in RECORDS.values():
    if _record.layer:
        for _name in (_record.name, *_record.aliases):
            NAMES[_name] = _MADE[_record.layer]

__all__ = ["Activation", *_MADE, "GELU", "Softmax", "LogSoftmax", "get", "NAMES"]


def _table() -> str:
    rows = [("name", "class", "σ(z)", "σ′")]
    for r in RECORDS.values():
        cls = (f"{r.layer}(alpha={r.alpha})" if r.alpha is not None else r.layer) if r.layer \
            else ('GELU()' if r.name == "gelu_erf" else 'GELU(approximate="tanh")')
        rows.append((r.name, cls, r.formula, r.slope))
    rows.append(("softmax", "Softmax (last axis)", "e^zᵢ / Σⱼ e^zⱼ", "a ⊙ (dA - Σ dA a)"))
    rows.append(("log_softmax", "LogSoftmax (last axis)", "zᵢ - log Σⱼ e^zⱼ",
                 "dA - softmax Σ dA"))
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
    return "\n".join("    " + "".join(c.ljust(w) for c, w in zip(row[:3], widths)) + row[3]
                     for row in rows)


__doc__ = __doc__.format(table=_table())


def get(spec) -> Activation:
    """An activation from a name in ``NAMES``, None (identity), a config dict or an object."""
    if spec is None:
        return NAMES["identity"]()
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str) and spec.lower() in NAMES:
        return NAMES[spec.lower()]()
    if isinstance(spec, dict):
        activation = Layer.from_config(spec)
        if isinstance(activation, Activation):
            return activation
    raise ValueError(f"unknown activation {spec!r}; expected one of {sorted(NAMES)}, None, "
                     "or an activation object such as LeakyReLU(0.2)")
