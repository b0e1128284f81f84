"""End to end: small networks trained with backprop.optim.Adam by explicit loops
(forward, loss, backward, step) reach ~100% training accuracy on XOR and two spirals."""
from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop.init import manual_seed
from backprop.layers import Dense
from backprop.losses import BCEWithLogitsLoss, SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop.optim import Adam

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


def train(model, loss, x, y, steps, lr):
    opt = Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        value = loss.forward(model.forward(x), y)
        model.backward(loss.backward(), need_input_grad=False)
        opt.step()
    return float(value)


def two_spirals(n_per_class, rng):
    """Two interleaved spirals (1.5 turns, radius 3) with a little noise; labels 0 and 1."""
    t = np.sqrt(rng.uniform(size=n_per_class)) * 3 * np.pi
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / np.pi
    x = np.concatenate([arm, -arm]) + rng.normal(scale=0.05, size=(2 * n_per_class, 2))
    y = np.concatenate([np.zeros(n_per_class, np.int64), np.ones(n_per_class, np.int64)])
    return x, y


@pytest.mark.slow
def test_xor(device, xp):
    x = xp.asarray([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = xp.asarray([[0], [1], [1], [0]], dtype=np.float32)
    model = Sequential([Dense(2, 8, activation="tanh", rng=0), Dense(8, 1, rng=1)])
    final = train(model, BCEWithLogitsLoss(), x, y, steps=300, lr=0.05)
    predicted = bp.to_numpy(model(x)) > 0
    assert final < 0.05
    assert (predicted == bp.to_numpy(y).astype(bool)).all()


@pytest.mark.slow
def test_two_spirals(device, xp):
    manual_seed(0)
    x_host, y_host = two_spirals(100, np.random.default_rng(0))
    x, y = xp.asarray(x_host, dtype=np.float32), xp.asarray(y_host)
    model = Sequential([Dense(2, 32, activation="tanh"), Dense(32, 32, activation="tanh"),
                        Dense(32, 2)])
    final = train(model, SoftmaxCrossEntropyLoss(), x, y, steps=200, lr=0.03)
    accuracy = (bp.to_numpy(model(x)).argmax(axis=1) == y_host).mean()
    assert accuracy >= 0.99, (accuracy, final)
