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

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


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


# ---------------------------------------------------------------------------------------
# The criterion is scale-aware: gradients that are zero or tiny next to the values of L are
# judged against the finite-difference noise (no false failures), while wrong gradients,
# small ones included, still fail (negative controls).
def dense_bn_dense(bn=None):
    """In training mode the bias of the first Dense has a gradient of exactly zero (the
    BatchNorm subtracts the batch mean), so its finite differences are pure rounding."""
    bn = bn or BatchNorm1d(3, dtype="float64")
    bn.beta.data[...] = 20.0  # larger values of L: more rounding in the differences
    return Sequential([Dense(2, 3, dtype="float64", rng=0), bn,
                       Dense(3, 2, dtype="float64", rng=1)])


def bn_pair(xp, seed):
    """BatchNorm1d on a batch of two rows: the input gradient is tiny (x̂ = ±1 up to the ε
    in the variance), next to values of L of tens."""
    bn = BatchNorm1d(6, dtype="float64")
    bn.gamma.data[...] = 3.0
    bn.beta.data[...] = 10.0
    return bn, xp.asarray(np.random.default_rng(seed).normal(size=(2, 6)))


def test_exactly_zero_gradient_in_front_of_batchnorm_passes(device, xp):
    model = dense_bn_dense()
    x = xp.asarray(np.random.default_rng(0).normal(size=(8, 2)))
    result = gradcheck(model, x)
    assert result.ok, str(result)
    bias = dict((r[0], r) for r in result.rows)["0.b"]
    assert bias[2] < 1e-7  # its numeric gradient is rounding noise, its analytic one ~0
    assert 0.0 < result.noise["0.b"] < 1e-6


def test_batchnorm_input_gradient_in_a_batch_of_two_passes(device, xp):
    for seed in (2, 3):
        bn, x = bn_pair(xp, seed)
        weights = np.random.default_rng(seed + 10).standard_normal((2, 6))
        out = bn.forward(x)
        bn.zero_grad()
        dx = bp.to_numpy(bn.backward(xp.array(weights)))  # backward may overwrite its grad
        # the layer is right: it matches the closed form of the batch-norm input gradient
        xn = bp.to_numpy(x)
        invstd = 1.0 / np.sqrt(xn.var(axis=0) + bn.eps)
        xhat = (xn - xn.mean(axis=0)) * invstd
        ref = 3.0 * invstd * (weights - weights.mean(0) - xhat * (weights * xhat).mean(0))
        np.testing.assert_allclose(dx, ref, rtol=1e-6, atol=1e-13)
        assert out.shape == (2, 6)
        result = gradcheck(bn, x, seed=seed + 10)
        assert result.ok, (seed, str(result))


def test_batchnorm_on_large_inputs_passes(device, xp):
    # |x| ~ 1e4: the output does not depend on the scale of x, so the input gradient is ~1e-4
    # while L is ~10; the rounding of L puts errors of ~1e-5 of the gradient into its finite
    # differences (dividing by the stored step fl(x + h) - fl(x - h), not by 2h, removes the
    # smaller error of representing x ± h)
    bn = BatchNorm1d(6, dtype="float64")
    x = xp.asarray(1e4 * np.random.default_rng(0).normal(size=(8, 6)))
    result = gradcheck(bn, x, seed=10)
    assert result.ok and result.rows[0][2] < 1e-3, str(result)


def test_exactly_zero_gradient_of_a_callable_passes(device, xp):
    u = xp.asarray(10 * np.random.default_rng(0).normal(size=(20, 5)))
    w = xp.asarray(np.random.default_rng(1).normal(size=5))

    def centred(v):  # Σ_j w_j Σ_i (v_ij - mean_i v_ij) = 0 for every v; computed, it is noise
        return float(((v - v.mean(axis=0)) * w).sum()), xp.zeros_like(v)

    assert gradcheck(centred, u).ok
    assert gradcheck(lambda v: (float((v * 0.0).sum()), xp.zeros_like(v)), u).worst == 0.0


class OffBatchNorm(BatchNorm1d):
    """BatchNorm1d whose input gradient is wrong: its largest element scaled by ``factor``,
    or (``drop_mean``) without the ``- mean(dA)`` term."""

    def __init__(self, n, factor=1.0, drop_mean=False):
        super().__init__(n, dtype="float64")
        self.factor, self.drop_mean = factor, drop_mean

    def forward(self, x):
        self._x_in = x
        return super().forward(x)

    def backward(self, grad, need_input_grad=True):
        xp = get_array_module(grad)
        dropped = self.gamma.data * grad.mean(axis=0) / xp.sqrt(self._x_in.var(axis=0) + self.eps)
        dx = super().backward(grad, need_input_grad).copy()  # (it may overwrite grad)
        if self.drop_mean:
            dx += dropped
        flat = dx.reshape(-1)
        flat[int(xp.abs(flat).argmax())] *= self.factor
        return dx


@pytest.mark.parametrize("factor", [1.01, -1.0])
def test_one_wrong_element_of_a_tiny_gradient_fails(device, xp, factor):
    bn, x = bn_pair(xp, 2)  # the input gradient is below 1e-3 here
    bad = OffBatchNorm(6, factor)
    bad.gamma.data[...], bad.beta.data[...] = bn.gamma.data, bn.beta.data
    good = gradcheck(bn, x, seed=12)
    scale = good.rows[0][2]
    assert good.ok and scale < 1e-3, str(good)
    assert good.noise["input"] < 0.002 * scale  # the check resolves a 1 % error
    result = gradcheck(bad, x, seed=12)
    assert not result.ok and result.errors["input"] > 0.005, str(result)
    assert result.errors["gamma"] <= 1e-6 and result.errors["beta"] <= 1e-6


def test_a_bug_in_an_exactly_zero_gradient_fails(device, xp):
    model = dense_bn_dense(OffBatchNorm(3, drop_mean=True))
    result = gradcheck(model, xp.asarray(np.random.default_rng(0).normal(size=(8, 2))))
    assert not result.ok and result.errors["0.b"] > 0.5, str(result)


class OffDense(Dense):
    """Dense whose ``∂W[0, 0]`` is 1 % too large."""

    def backward(self, grad, need_input_grad=True):
        dx = super().backward(grad, need_input_grad)
        self.W.grad[0, 0] *= 1.01
        return dx


def test_wrong_gradient_small_relative_to_the_rest_fails(device, xp):
    x = np.random.default_rng(0).normal(size=(6, 4))
    x[:, 0] *= 0.01  # ∂W[:, 0] = Σ dA x[:, 0] is ~1 % of the largest element of ∂W
    x = xp.asarray(x)
    layer = OffDense(4, 3, activation="tanh", dtype="float64", rng=0)
    result = gradcheck(layer, x)
    dW = bp.to_numpy(layer.W.grad)
    assert abs(dW[0, 0]) < 0.05 * np.abs(dW).max()
    assert not result.ok and result.errors["W"] > 1e-5, str(result)
    assert result.errors["input"] <= 1e-6 and result.errors["b"] <= 1e-6
