"""Regularizers: penalty values (Keras' formulas), gradients against finite differences of
the penalty, the stale/accumulate gradient contract, which parameters are selected."""
from __future__ import annotations

import numpy as np
import pytest

from backprop import optim, regularizers
from backprop.backend import to_numpy
from backprop.parameter import Parameter

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

KINDS = [
    (regularizers.L1, {"l1": 0.03}, 0.03, 0.0),
    (regularizers.L2, {"l2": 0.05}, 0.0, 0.05),
    (regularizers.L1L2, {"l1": 0.02, "l2": 0.07}, 0.02, 0.07),
]
IDS = ["L1", "L2", "L1L2"]


def make_params(xp, dtype=np.float64):
    rng = np.random.default_rng(3)
    shapes = {"0.W": (4, 3), "0.b": (3,), "1.gamma": (3,), "2.W": (2, 2, 3)}
    return [Parameter(xp.asarray(rng.normal(size=s).astype(dtype)), n) for n, s in shapes.items()]


@pytest.mark.parametrize("cls,kw,l1,l2", KINDS, ids=IDS)
@pytest.mark.parametrize("weights_only", [True, False])
def test_penalty_value(xp, cls, kw, l1, l2, weights_only):
    params = make_params(xp, np.float32)
    reg = cls(**kw, weights_only=weights_only)
    chosen = [to_numpy(p.data).astype(np.float64) for p in params
              if p.data.ndim >= 2 or not weights_only]
    assert len(chosen) == (2 if weights_only else 4)
    want = sum(l1 * np.abs(w).sum() + l2 * (w ** 2).sum() for w in chosen)
    got = reg.penalty(params)
    assert type(got) is type(xp.zeros(())) and got.shape == () and got.dtype == np.float32
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("cls,kw,l1,l2", KINDS, ids=IDS)
def test_gradient_matches_finite_differences(xp, cls, kw, l1, l2):
    params = make_params(xp)
    reg = cls(**kw, weights_only=False)
    for p in params:
        p.zero_grad()
    reg.add_grad(params)
    h = 1e-6
    for p in params:
        data = p.data.reshape(-1)
        numeric = np.empty(p.size)
        for i in range(p.size):
            keep = float(data[i])
            data[i] = keep + h
            up = float(reg.penalty(params))
            data[i] = keep - h
            down = float(reg.penalty(params))
            data[i] = keep
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(to_numpy(p.grad).ravel(), numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=p.name)
        analytic = l1 * np.sign(to_numpy(p.data)) + 2 * l2 * to_numpy(p.data)
        np.testing.assert_allclose(to_numpy(p.grad), analytic, rtol=1e-12)


@pytest.mark.parametrize("cls,kw,l1,l2", KINDS, ids=IDS)
def test_add_grad_writes_stale_and_adds_to_live_gradients(xp, cls, kw, l1, l2):
    params = make_params(xp, np.float32)
    w = params[0]
    w.grad = xp.full(w.shape, 5.0)
    w.zero_grad()  # stale: the 5s are still in memory and must not leak in
    reg = cls(**kw)
    reg.add_grad(params)
    term = l1 * np.sign(to_numpy(w.data)) + 2 * l2 * to_numpy(w.data)
    np.testing.assert_allclose(to_numpy(w.grad), term, rtol=1e-6)
    reg.add_grad(params)  # now live: accumulates
    np.testing.assert_allclose(to_numpy(w.grad), 2 * term, rtol=1e-6)
    assert w.grad.dtype == np.float32
    assert not np.any(to_numpy(params[1].grad)), "biases are not regularized by default"


def test_sign_of_zero_is_zero():
    p = Parameter(np.array([[0.0, 1.0], [-2.0, 0.0]]), "W")
    regularizers.L1(0.5).add_grad([p])
    np.testing.assert_array_equal(p.grad, [[0.0, 0.5], [-0.5, 0.0]])


def test_l2_equals_pytorch_weight_decay_of_twice_l2(xp):
    """Documented equivalence: L2(λ/2) with plain SGD is SGD(weight_decay=λ)."""
    a, b = make_params(xp), make_params(xp)
    opt_a = optim.SGD(a, lr=0.1, weight_decay=0.2)
    opt_b = optim.SGD(b, lr=0.1)
    reg = regularizers.L2(0.1, weights_only=False)
    for _ in range(3):
        for params, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            for p in params:
                p.grad = p.data * 0.5  # a loss gradient that depends on the weights
        reg.add_grad(b)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(to_numpy(pa.data), to_numpy(pb.data), rtol=1e-12)


def test_no_penalty_and_empty_selection():
    params = [Parameter(np.ones(3, np.float32), "b")]
    assert float(regularizers.L2(0.1).penalty(params)) == 0.0
    assert regularizers.L2(0.1).penalty(params).dtype == np.float32
    params[0].grad = np.full(3, 2.0)
    regularizers.L1L2().add_grad(params)
    np.testing.assert_array_equal(params[0].grad, 2.0)


@pytest.mark.parametrize("reg", [regularizers.L1(0.2), regularizers.L2(0.3, weights_only=False),
                                 regularizers.L1L2(0.1, 0.4)])
def test_config_round_trip(reg):
    again = regularizers.from_config(reg.config())
    assert type(again) is type(reg) and again.config() == reg.config()
    assert (again.l1, again.l2, again.weights_only) == (reg.l1, reg.l2, reg.weights_only)


@pytest.mark.parametrize("build_it,error,message", [
    (lambda: regularizers.L2(-0.1), ValueError, "Invalid l2"),
    (lambda: regularizers.L1(float("nan")), ValueError, "Invalid l1"),
    (lambda: regularizers.L1L2(0.1, "x"), TypeError, "l2 must be a real number"),
    (lambda: regularizers.L2(0.1, weights_only=1), TypeError, "weights_only"),
    (lambda: regularizers.from_config({"type": "L3"}), ValueError, "unknown regularizer"),
    (lambda: regularizers.L2().penalty(np.ones(3)), TypeError, "Parameter"),
])
def test_arguments_are_validated(build_it, error, message):
    with pytest.raises(error, match=message):
        build_it()
