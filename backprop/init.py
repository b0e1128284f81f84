"""Weight initialisers and the default random generator.

An initialiser is ``init(shape, rng) -> float64 NumPy array``. Weights are drawn on the host
in float64 and only then cast and moved, so one seed gives the same weights on CPU and GPU.
For a weight of shape ``(out, in)``: ``fan_in = in``, ``fan_out = out`` (a vector ``(n,)``
has ``fan_in = fan_out = n``).

    xavier_uniform   U(-a, a),  a = sqrt(6 / (fan_in + fan_out))      (Glorot & Bengio 2010)
    xavier_normal    N(0, s²),  s = sqrt(2 / (fan_in + fan_out))
    he_uniform       U(-a, a),  a = sqrt(6 / fan_in)                  (He et al. 2015)
    he_normal        N(0, s²),  s = sqrt(2 / fan_in)
    zeros            0
    normal(std)      N(0, std²)
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from backprop.kernels.activations import RELU_LIKE as RELU_LIKE_ACTIVATIONS

__all__ = ["xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "zeros", "normal",
           "default_for", "get", "manual_seed", "as_generator", "INITIALIZERS"]

_default = {"rng": np.random.default_rng()}


def manual_seed(seed: int) -> None:
    """Reseed the default generator (weights and dropout seeds drawn without ``rng=``)."""
    _default["rng"] = np.random.default_rng(seed)


def as_generator(rng=None) -> np.random.Generator:
    """None -> the default generator, an int -> a new seeded generator, a Generator -> itself."""
    if rng is None:
        return _default["rng"]
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator; "
                    f"got {type(rng).__name__}")


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight shape ``(out, in)`` or a vector ``(n,)``."""
    shape = tuple(shape)
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) != 2:
        raise ValueError(f"initialisers take a (out, in) or (n,) shape; got {shape}")
    return shape[1], shape[0]


def xavier_uniform(shape, rng) -> np.ndarray:
    fan_in, fan_out = fans(shape)
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)


def xavier_normal(shape, rng) -> np.ndarray:
    fan_in, fan_out = fans(shape)
    return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), size=shape)


def he_uniform(shape, rng) -> np.ndarray:
    a = math.sqrt(6.0 / fans(shape)[0])
    return rng.uniform(-a, a, size=shape)


def he_normal(shape, rng) -> np.ndarray:
    return rng.normal(0.0, math.sqrt(2.0 / fans(shape)[0]), size=shape)


def zeros(shape, rng=None) -> np.ndarray:
    return np.zeros(shape, dtype=np.float64)


def normal(std: float = 0.01):
    """An initialiser drawing from ``N(0, std²)``."""
    def normal_init(shape, rng) -> np.ndarray:
        return rng.normal(0.0, std, size=shape)

    normal_init.__name__ = f"normal(std={std})"
    return normal_init


INITIALIZERS = {"xavier_uniform": xavier_uniform, "xavier_normal": xavier_normal,
                "he_uniform": he_uniform, "he_normal": he_normal, "zeros": zeros,
                "normal": normal()}
RELU_LIKE = RELU_LIKE_ACTIVATIONS  # He by default (the records' relu_like flag)


def get(spec):
    """An initialiser from a name in ``INITIALIZERS`` or a callable ``init(shape, rng)``."""
    if callable(spec):
        return spec
    if spec in INITIALIZERS:
        return INITIALIZERS[spec]
    raise ValueError(f"unknown initialiser {spec!r}; expected one of {sorted(INITIALIZERS)} "
                     "or a callable init(shape, rng)")


def default_for(activation) -> str:
    """He initialisation for ReLU-like activations, Xavier otherwise (the name of the init).

    ``activation`` is a kernel activation name (``"relu"``, ``"gelu_erf"``...), an activation
    object with a ``kernel`` attribute, or None.
    """
    name = getattr(activation, "kernel", activation)
    return "he_uniform" if name in RELU_LIKE else "xavier_uniform"
