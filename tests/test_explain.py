"""bp.explain: the textbook equations of backpropagation on one batch, with the numbers the
layers compute, each gradient checked against central differences; the model untouched."""
from __future__ import annotations

import re

import numpy as np
import pytest

import backprop as bp
from backprop.data import DataError
from backprop.explain import MAX_BATCH, Explanation, explain
from backprop.layers import Layer
from backprop.parameter import Parameter


def _two_layers(dtype="float64"):
    return bp.Sequential([bp.Dense(3, 4, activation="tanh", rng=1, dtype=dtype),
                          bp.Dense(4, 2, rng=2, dtype=dtype)])


def _batch(n=4, features=3, outputs=2):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)), rng.standard_normal((n, outputs))


def _printed(text: str, title: str) -> np.ndarray:
    """The matrix printed under the line ``title   (shape)``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(
        re.escape(title) + r"   \([0-9, ]+\)", line))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("    ") or "⋮" in line:
            break
        rows.append([float(v) for v in line.split() if v != "…"])
    return np.array(rows)


class Scale(Layer):
    """``A = X ⊙ s`` per feature, with a backward that can be wrong on purpose."""

    def __init__(self, n, wrong_input=False, wrong_param=False):
        super().__init__()
        self.n, self.wrong_input, self.wrong_param = n, wrong_input, wrong_param
        self.s = Parameter(bp.asarray(np.linspace(0.5, 1.5, n)), "s")

    def forward(self, x):
        self._ctx.saved = x
        return x * self.s.data

    def backward(self, grad, need_input_grad=True):
        x = self._ctx.saved
        buf, accumulate = self.s.grad_for_write()
        ds = (grad * x).sum(axis=0) * (1.5 if self.wrong_param else 1.0)
        if accumulate:
            buf += ds
        else:
            buf[...] = ds
        if not need_input_grad:
            return None
        return grad * self.s.data * (0.5 if self.wrong_input else 1.0)


def test_the_equations_and_shapes_are_shown_and_every_check_passes():
    X, y = _batch()
    text = explain(_two_layers(), X, y, "mse")
    assert isinstance(text, str) and isinstance(text, Explanation)
    for line in ["Z0 = X W0ᵀ + b0", "A0 = σ(Z0)   σ = tanh", "Z1 = A0 W1ᵀ + b1",
                 "L = MSELoss(A1, Y) = s Σ (A1 − Y)²,  s = 1/8",
                 "dA1 = ∂L/∂A1 = 2 s (A1 − Y)",
                 "δ1 = ∂L/∂Z1 = dA1", "(δᴸ: the output layer)",
                 "δ0 = ∂L/∂Z0 = dA0 ⊙ σ′(Z0) = (δ1 W1) ⊙ σ′(Z0)", "σ′ = 1 - a²",
                 "∂W1 = δ1ᵀ A0", "∂W0 = δ0ᵀ X", "∂b0 = Σ_rows δ0", "dA0 = δ1 W1",
                 "X (4, 3) · W0ᵀ (3, 4) + b0 (4,) → (4, 4)", "W0   (4, 3)", "∂W0   (4, 3)",
                 "δ0   (4, 4)", "## Gradient checks"]:
        assert line in text, line
    assert "✗" not in text and text.ok
    names = [c["name"] for c in text.checks]
    assert names == ["dA1", "δ1", "∂W1", "∂b1", "dA0", "δ0", "∂W0", "∂b0"]
    assert text.count("check ✓") == 8
    assert text._repr_markdown_() == str(text)  # a notebook renders it as Markdown


def test_the_printed_numbers_are_those_of_model_backward():
    X, y = _batch()
    model = _two_layers()
    text = explain(model, X, y, "mse", max_rows=10, max_cols=10, precision=8)
    loss = bp.losses.MSELoss()
    loss.forward(model.forward(X), y)
    model.zero_grad()
    model.backward(loss.backward().copy())
    np.testing.assert_allclose(_printed(text, "∂W0"), model[0].W.grad, rtol=1e-6)
    np.testing.assert_allclose(_printed(text, "∂W1"), model[1].W.grad, rtol=1e-6)
    np.testing.assert_allclose(_printed(text, "∂b0")[0], model[0].b.grad, rtol=1e-6)
    np.testing.assert_allclose(_printed(text, "W0"), model[0].W.data, rtol=1e-6)
    np.testing.assert_allclose(_printed(text, "Z0"), X @ model[0].W.data.T, rtol=1e-6)
    assert f"L = {float(loss.forward(model.forward(X), y)):.8g}" in text


def test_a_layer_with_a_wrong_input_gradient_gets_a_cross_where_its_gradient_is_used():
    X, y = _batch()
    model = bp.Sequential([bp.Dense(3, 4, activation="tanh", rng=1, dtype="float64"),
                           Scale(4, wrong_input=True), bp.Dense(4, 2, rng=2, dtype="float64")])
    text = explain(model, X, y, "mse")
    ok = {c["name"]: c["ok"] for c in text.checks}
    assert ok["dA0"] is False and ok["δ0"] is False and ok["∂W0"] is False
    assert ok["∂s1"] is True and ok["dA1"] is True and ok["∂W2"] is True
    assert "check ✗ dA0" in text and "✗ 4 of" in text and not text.ok
    assert "A1 = Scale(A0)" in text and "dA0 = backward of Scale(dA1)" in text


def test_a_wrong_parameter_gradient_gets_a_cross():
    X, y = _batch()
    model = bp.Sequential([bp.Dense(3, 4, activation="relu", rng=1, dtype="float64"),
                           Scale(4, wrong_param=True), bp.Dense(4, 2, rng=2, dtype="float64")])
    text = explain(model, X, y, "mse")
    bad = [c["name"] for c in text.checks if not c["ok"]]
    assert bad == ["∂s1"]
    assert "check ✗ ∂s1" in text


def test_the_model_is_not_modified():
    X, y = _batch(n=6, features=4, outputs=3)
    model = bp.Sequential([bp.Dense(4, 8, activation="relu", rng=1), bp.Dropout(0.3, seed=5),
                           bp.BatchNorm1d(8), bp.Dense(8, 3, rng=2)])
    labels = np.array([0, 1, 2, 0, 1, 2])
    loss = bp.losses.SoftmaxCrossEntropyLoss()
    loss.forward(model.forward(X.astype("float32")), labels)
    model.backward(loss.backward().copy())  # leave gradients in place
    seen = []
    model[0].backward_observer = lambda layer, delta: seen.append(layer)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    grads = {p.name: p.grad.copy() for p in model.parameters()}
    model.eval()
    text = explain(model, X, labels, loss, training=True)
    assert text.ok and "training mode" in text
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.dtype == np.float32 for p in model.parameters())
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:  # parameters, running statistics and Dropout's counter
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    for p in model.parameters():
        np.testing.assert_array_equal(p.grad, grads[p.name], err_msg=p.name)
    assert seen == [] and model[0].backward_observer is not None
    assert model[1].fixed_mask is False


def test_eval_mode_and_a_residual_block():
    X, _ = _batch(n=5, features=4)
    labels = np.array([1, 0, 2, 2, 1])
    model = bp.Sequential([bp.Dense(4, 6, activation="gelu", rng=1, dtype="float64"),
                           bp.Dropout(0.5, seed=1),
                           bp.Residual([bp.Dense(6, 6, activation="sigmoid", rng=2,
                                                 dtype="float64"),
                                        bp.Dense(6, 6, rng=3, dtype="float64")]),
                           bp.BatchNorm1d(6, dtype="float64"), bp.Dense(6, 3, rng=4,
                                                                        dtype="float64"),
                           bp.LogSoftmax()])
    model.eval()
    text = explain(model, X, labels, "nll")
    assert text.ok, [c for c in text.checks if not c["ok"]]
    assert "eval mode" in text and "A1 = A0   (eval mode" in text
    assert "A2 = A1 + F(A1)" in text and "dA1 = dA2 + dA1|F" in text
    assert "[2.0] Dense(6, 6, activation='sigmoid')" in text
    assert {"δ2.0", "∂W2.1", "∂γ3", "dA1", "dA4"} <= {c["name"] for c in text.checks}
    assert "(only the part through the block" in text


def test_large_tensors_are_checked_on_a_seeded_subset():
    X, y = _batch(n=5, features=4, outputs=1)
    model = bp.Sequential([bp.Dense(4, 40, activation="sigmoid", rng=1),
                           bp.Dense(40, 1, rng=2)])
    text = explain(model, X, y, "mse", max_checks=10)
    assert "10/160 entries" in text and "4/4 entries" not in text and text.ok
    assert text == explain(model, X, y, "mse", max_checks=10)  # the same entries each time
    quiet = explain(model, X, y, "mse", check=False)
    assert "check" not in quiet and quiet.checks == [] and "∂W0" in quiet


def test_bad_input_is_refused_with_a_clear_message():
    X, y = _batch()
    with pytest.raises(TypeError, match="Sequential"):
        explain(bp.Dense(3, 2), X, y, "mse")
    with pytest.raises(DataError, match="layer expects 3"):
        explain(_two_layers(), X[:, :2], y, "mse")
    with pytest.raises(DataError, match="4 rows but y has 3"):
        explain(_two_layers(), X, y[:3], "mse")
    with pytest.raises(DataError, match="labels must be in"):
        explain(bp.Sequential([bp.Dense(3, 2)]), X, np.array([0, 1, 2, 1]), "cross_entropy")
    big = np.zeros((MAX_BATCH + 1, 3))
    with pytest.raises(ValueError, match="one small batch"):
        explain(_two_layers(), big, np.zeros((MAX_BATCH + 1, 2)), "mse")
    with pytest.raises(ValueError, match="max_rows"):
        explain(_two_layers(), X, y, "mse", max_rows=0)
    with pytest.raises(ValueError, match="unknown loss"):
        explain(_two_layers(), X, y, "nope")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        explain(bp.Sequential([bp.Dense(3, 2), bp.BatchNorm1d(2)]), X[:1], y[:1], "mse")
