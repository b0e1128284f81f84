"""Activation layers ``A = σ(X)``, ``∂X = dA ⊙ σ'(X)``, also usable by name inside ``Dense``.

    name          class                        σ(z)                              σ'
    identity      Identity                     z                                 1
    relu          ReLU                         max(z, 0)                         [a > 0]
    leaky_relu    LeakyReLU(alpha=0.01)        z if z > 0 else αz                1 or α
    sigmoid       Sigmoid                      1 / (1 + e^-z)                    a (1 - a)
    tanh          Tanh                         tanh z                            1 - a²
    gelu          GELU()                       z Φ(z) (exact, erf)               Φ(z) + z φ(z)
    gelu_tanh     GELU(approximate="tanh")     ½z(1 + tanh(√(2/π)(z + 0.044715z³)))
    softplus      Softplus                     log(1 + e^z)                      sigmoid(z)
    softmax       Softmax (last axis)          e^zᵢ / Σⱼ e^zⱼ                    a ⊙ (dA - Σ dA a)

Elementwise activations run the fused epilogue kernels with no bias
(``K.bias_act_forward(x, None, out, kernel, alpha)``); ``Softmax`` runs the row-softmax kernels.
"""
from __future__ import annotations

from backprop import kernels as K
from backprop.layers import Layer

__all__ = ["Activation", "Identity", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "Softplus",
           "Softmax", "get", "NAMES"]


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


class Identity(Activation):
    name = kernel = "identity"


class ReLU(Activation):
    name = kernel = "relu"


class LeakyReLU(Activation):
    name = kernel = "leaky_relu"

    def __init__(self, alpha=0.01):
        super().__init__()
        self.alpha = float(alpha)

    def config(self) -> dict:
        return {"type": "LeakyReLU", "alpha": self.alpha}

    def __repr__(self) -> str:
        return f"LeakyReLU(alpha={self.alpha})"


class Sigmoid(Activation):
    name = kernel = "sigmoid"


class Tanh(Activation):
    name = kernel = "tanh"


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


class Softplus(Activation):
    name = kernel = "softplus"


class Softmax(Activation):
    """Softmax over the last axis: ``aᵢ = e^xᵢ / Σⱼ e^xⱼ``, ``∂X = a ⊙ (dA - Σⱼ dAⱼ aⱼ)``."""

    name = kernel = "softmax"

    def forward(self, x):
        out = self._buffer("out", x.shape, x)
        K.softmax_forward(_rows(x, True), _rows(out, True))
        self._ctx.out = out
        return out

    def backward(self, grad, need_input_grad=True):
        if not need_input_grad:
            return None
        g = _rows(grad, True)
        K.softmax_backward(g, _rows(self._ctx.out, True), g)
        return grad


NAMES = {"identity": Identity, "linear": Identity, "relu": ReLU, "leaky_relu": LeakyReLU,
         "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU, "gelu_tanh": lambda: GELU("tanh"),
         "softplus": Softplus, "softmax": Softmax}


def get(spec) -> Activation:
    """An activation from a name in ``NAMES``, None (identity), a config dict or an object."""
    if spec is None:
        return Identity()
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
