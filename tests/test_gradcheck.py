"""gradcheck itself: it passes correct gradients, catches wrong ones, works on a layer a
user writes, leaves the model exactly as it found it, and reads well."""
from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.backend import get_array_module
from backprop.gradcheck import GradcheckError, gradcheck
from backprop.layers import BatchNorm1d, Dense, Dropout, Layer, from_config
from backprop.losses import MSELoss
from backprop.model import Sequential
from backprop.parameter import Parameter


class ScaleShift(Layer):
    """A user-written layer: ``A = X ⊙ s + c`` per feature; ``∂s = Σ dA ⊙ X``, ``∂c = Σ dA``."""

    def __init__(self, n, wrong=False):
        super().__init__()
        self.n, self.wrong = n, wrong
        self.s = Parameter(bp.asarray(np.linspace(0.5, 1.5, n)), "s")
        self.c = Parameter(bp.asarray(np.linspace(-1.0, 1.0, n)), "c")

    def forward(self, x):
        self._x = x
        return x * self.s.data + self.c.data

    def backward(self, grad, need_input_grad=True):
        self.s.grad += (grad * self._x).sum(axis=0) * (1.1 if self.wrong else 1.0)
        self.c.grad += grad.sum(axis=0)
        return grad * self.s.data if need_input_grad else None

    def config(self):
        return {"type": "ScaleShift", "n": self.n}


def test_user_layer_passes_and_serialises(device, xp, rng):
    layer = ScaleShift(3)
    result = gradcheck(layer, xp.asarray(rng.normal(size=(4, 3))))
    assert result.ok and result.worst < 1e-6, str(result)
    assert set(result.errors) == {"input", "s", "c"}
    model = Sequential([Dense(3, 3, activation="tanh", dtype="float64", rng=0), ScaleShift(3)])
    assert gradcheck(model, xp.asarray(rng.normal(size=(4, 3)))).worst < 1e-6
    assert isinstance(from_config(model.config())[1], ScaleShift)


def test_wrong_gradient_is_caught_and_reported(device, xp, rng):
    layer = ScaleShift(3, wrong=True)
    x = xp.asarray(rng.normal(size=(4, 3)))
    result = gradcheck(layer, x)
    assert not result.ok
    assert result.errors["s"] > 0.05 and result.errors["c"] < 1e-6 and result.errors["input"] < 1e-6
    text = str(result)
    assert "FAILED" in text and "s " in text and "<-- FAIL" in text
    with pytest.raises(GradcheckError, match="FAILED"):
        gradcheck(layer, x, raise_on_fail=True)


def test_model_is_left_exactly_as_it_was(device, xp, rng):
    model = Sequential([Dense(3, 5, activation="relu", dtype="float64", rng=1),
                        BatchNorm1d(5, dtype="float64"), Dropout(0.4, seed=2),
                        Dense(5, 2, dtype="float64", rng=3)])
    x = xp.asarray(rng.normal(size=(6, 3)))
    before = model.state_dict()
    result = gradcheck(model, x, loss=MSELoss(), target=xp.asarray(rng.normal(size=(6, 2))))
    assert result.worst < 1e-6, str(result)
    after = model.state_dict()
    for name in before:  # parameters restored bit for bit, running statistics too
        assert np.array_equal(before[name], after[name]), name
    dropout = model[2]
    assert dropout.fixed_mask is False and dropout.counter == 0  # one mask, counter untouched


def test_plain_callable(device, xp, rng):
    a, b = xp.asarray(rng.normal(size=(3, 2))), xp.asarray(rng.normal(size=(3, 2)))

    def dot(u, v):  # value Σ u ⊙ v², gradients (v², 2 u v)
        return float((u * v * v).sum()), (v * v, 2 * u * v)

    assert gradcheck(dot, (a, b)).worst < 1e-6
    bad = gradcheck(lambda u, v: (float((u * v * v).sum()), (v * v, u * v)), (a, b))
    assert bad.errors["input0"] < 1e-6 and bad.errors["input1"] > 0.1

    def square(u):
        return float((u ** 2).sum()), 2 * u

    result = gradcheck(square, a)
    assert list(result.errors) == ["input"] and result.ok
    assert get_array_module(a) is xp


def test_usage_errors(device, xp):
    with pytest.raises(TypeError, match="float64 parameters.*dtype='float64'"):
        gradcheck(Dense(2, 2, dtype="float32"), xp.ones((2, 2)))
    with pytest.raises(ValueError, match="target="):
        gradcheck(MSELoss(), xp.ones((2, 2)))
    with pytest.raises(TypeError, match="Layer, a Loss or a callable"):
        gradcheck(42, xp.ones((2, 2)))
