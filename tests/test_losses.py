"""Losses: values against direct formulas, gradients by finite differences, stability for
extreme inputs, dtype discipline and the errors for bad targets."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import backprop as bp
from backprop import losses
from backprop.gradcheck import gradcheck
from backprop.losses import (BCELoss, BCEWithLogitsLoss, CategoricalCrossEntropyLoss, L1Loss,
                             MSELoss, NLLLoss, SoftmaxCrossEntropyLoss)

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _cases(rng):
    """(loss, prediction, target, value by a direct formula) for each loss and reduction."""
    p = rng.normal(size=(6, 4))
    t = rng.normal(size=(6, 4))
    y01 = rng.uniform(size=(6, 4))
    prob = rng.uniform(0.05, 0.95, size=(6, 4))
    labels = np.array([0, 3, 1, 2, 3, 0])
    dist = rng.dirichlet(np.ones(4), size=6)
    smooth = 0.9 * np.eye(4)[labels] + 0.1 / 4
    sig = 1 / (1 + np.exp(-p))
    cases = []
    for reduction, r in (("mean", np.mean), ("sum", np.sum)):
        rows = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v.sum())
        cases += [
            (MSELoss(reduction), p, t, r((p - t) ** 2)),
            (L1Loss(reduction), p, t, r(np.abs(p - t))),
            (BCEWithLogitsLoss(reduction), p, y01,
             r(-(y01 * np.log(sig) + (1 - y01) * np.log(1 - sig)))),
            (BCELoss(reduction), prob, y01,
             r(-(y01 * np.log(prob) + (1 - y01) * np.log(1 - prob)))),
            (SoftmaxCrossEntropyLoss(reduction=reduction), p, labels,
             rows(-_log_softmax(p)[np.arange(6), labels])),
            (SoftmaxCrossEntropyLoss(0.1, reduction), p, labels,
             rows(-(smooth * _log_softmax(p)).sum(1))),
            (SoftmaxCrossEntropyLoss(reduction=reduction), p, dist,
             rows(-(dist * _log_softmax(p)).sum(1))),
            (SoftmaxCrossEntropyLoss(0.1, reduction), p, np.eye(4)[labels],
             rows(-(smooth * _log_softmax(p)).sum(1))),
            (MSELoss(reduction, half=True), p, t, r(0.5 * (p - t) ** 2)),
            (NLLLoss(reduction), _log_softmax(p), labels,
             rows(-_log_softmax(p)[np.arange(6), labels])),
            # Keras CategoricalCrossentropy: rows renormalised, then -Σ y log p
            (CategoricalCrossEntropyLoss(reduction=reduction), prob, labels,
             rows(-np.log(prob / prob.sum(1, keepdims=True))[np.arange(6), labels])),
            (CategoricalCrossEntropyLoss(0.1, reduction), prob, dist,
             rows(-((0.9 * dist + 0.1 / 4) * np.log(prob / prob.sum(1, keepdims=True))).sum(1))),
        ]
    return cases


CASE_IDS = [f"{name}-{red}" for red in ("mean", "sum") for name in
            ("mse", "l1", "bce_logits", "bce", "xent", "xent_smooth", "xent_probs", "xent_onehot",
             "half_mse", "nll", "cce", "cce_smooth_probs")]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_value_matches_formula_and_gradient_matches_finite_differences(device, xp, case):
    loss, pred, target, expected = _cases(np.random.default_rng(5))[case]
    value = loss.forward(xp.asarray(pred), xp.asarray(target))
    assert value.ndim == 0 and isinstance(value, xp.ndarray)
    np.testing.assert_allclose(float(value), expected, rtol=1e-12)
    result = gradcheck(loss, xp.asarray(pred), target=xp.asarray(target))
    assert result.worst < 1e-6, str(result)


def test_probability_targets_agree_with_integer_labels(device, xp, rng):
    z = xp.asarray(rng.normal(size=(5, 3)))
    labels = np.array([2, 0, 1, 1, 0])
    a, b = SoftmaxCrossEntropyLoss(0.2), SoftmaxCrossEntropyLoss(0.2)
    np.testing.assert_allclose(float(a.forward(z, xp.asarray(labels))),
                               float(b.forward(z, xp.asarray(np.eye(3)[labels]))), rtol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(a.backward()), bp.to_numpy(b.backward()), atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_give_finite_loss_and_gradient(device, xp, dtype):
    z = xp.asarray([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    labels = xp.asarray([1, 2, 0])
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        xent = SoftmaxCrossEntropyLoss(0.1)
        v = xent.forward(z, labels)
        g = xent.backward()
        bce = BCEWithLogitsLoss()
        vb = bce.forward(z, xp.asarray([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=dtype))
        gb = bce.backward()
    for value, grad in ((v, g), (vb, gb)):
        assert np.isfinite(float(value)) and bool(xp.isfinite(grad).all())
        assert value.dtype == dtype and grad.dtype == dtype
    # row 0 predicts class 0 by 2e4 but the label is 1: loss ≈ 2e4 (less smoothing's share)
    assert 1e3 < float(v) < 2e4
    # two confident mistakes of 1e4 each and one logit of 0 (log 2), over 9 elements
    np.testing.assert_allclose(float(vb), (2e4 + np.log(2)) / 9, rtol=1e-6)


def test_bce_clamps_logs_like_pytorch(device, xp):
    loss = BCELoss(reduction="sum")
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise"):
        warnings.simplefilter("error")
        value = float(loss.forward(xp.asarray([[0.0, 1.0, 1.0]]), xp.asarray([[1.0, 1.0, 0.0]])))
        grad = bp.to_numpy(loss.backward())
    assert value == 200.0  # -log(0) clamped at 100, twice
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("loss", [MSELoss(), L1Loss(), BCEWithLogitsLoss(), BCELoss(),
                                  SoftmaxCrossEntropyLoss()], ids=repr)
def test_float32_stays_float32(device, xp, rng, loss):
    pred = xp.asarray(rng.uniform(0.1, 0.9, size=(4, 3)), dtype=np.float32)
    target = xp.asarray([0, 2, 1, 1]) if isinstance(loss, SoftmaxCrossEntropyLoss) else \
        xp.asarray(rng.uniform(size=(4, 3)), dtype=np.float32)
    value = loss.forward(pred, target)
    assert value.dtype == np.float32 and loss.backward().dtype == np.float32


def test_gradient_buffer_is_reused(device, xp, rng):
    loss = SoftmaxCrossEntropyLoss()
    z = xp.asarray(rng.normal(size=(4, 3)))
    loss.forward(z, xp.asarray([0, 1, 2, 0]))
    first = loss.backward()
    loss.forward(z, xp.asarray([1, 1, 2, 0]))
    assert loss.backward() is first


# ---------------------------------------------------------------------------------------
# Errors
def test_shape_mismatch_names_both_shapes_and_the_fix(device, xp):
    with pytest.raises(ValueError, match=r"\(4, 1\) and target shape \(4,\).*reshape\(-1, 1\)"):
        MSELoss().forward(xp.zeros((4, 1)), xp.zeros(4))
    with pytest.raises(ValueError, match=r"labels of shape \(4,\)"):
        SoftmaxCrossEntropyLoss().forward(xp.zeros((4, 3)), xp.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match=r"y.ravel\(\)"):
        SoftmaxCrossEntropyLoss().forward(xp.zeros((4, 3)), xp.zeros((4, 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        SoftmaxCrossEntropyLoss().forward(xp.zeros(4), xp.zeros(4, dtype=np.int64))


@pytest.mark.parametrize("labels, match", [([0, 3, 1], r"\[0, 3\).*\[0, 3\]"),
                                           ([0, -1, 1], r"\[0, 3\).*\[-1, 1\]")])
def test_labels_out_of_range(device, xp, labels, match):
    loss = SoftmaxCrossEntropyLoss()
    with pytest.raises(ValueError, match=match):
        loss.forward(xp.zeros((3, 3)), xp.asarray(labels))


def test_non_integer_labels_and_nan_targets(device, xp):
    with pytest.raises(TypeError, match="integers.*astype"):
        SoftmaxCrossEntropyLoss().forward(xp.zeros((3, 3)), xp.asarray([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        MSELoss().forward(xp.zeros((2, 2)), xp.asarray([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxCrossEntropyLoss().forward(xp.zeros((1, 2)), xp.asarray([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BCELoss().forward(xp.asarray([[1.5]]), xp.asarray([[1.0]]))
    with pytest.raises(TypeError, match="floating-point predictions"):
        MSELoss().forward(xp.zeros((2, 2), dtype=np.int64), xp.zeros((2, 2)))


def test_validation_can_be_switched_off_for_prevalidated_data(device, xp):
    loss = MSELoss()
    loss.validate_labels = False  # fit() checks the whole data set once instead
    assert np.isnan(float(loss.forward(xp.zeros((1, 2)), xp.asarray([[np.nan, 1.0]]))))


def test_constructor_and_call_order_errors():
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        MSELoss(reduction="none")
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxCrossEntropyLoss(label_smoothing=1.0)
    with pytest.raises(RuntimeError, match="before forward"):
        L1Loss().backward()


# ---------------------------------------------------------------------------------------
# Config and names
@pytest.mark.parametrize("loss", [MSELoss("sum"), L1Loss(), BCEWithLogitsLoss(), BCELoss("sum"),
                                  SoftmaxCrossEntropyLoss(0.1, "sum")], ids=repr)
def test_config_round_trip(loss):
    rebuilt = losses.from_config(json.loads(json.dumps(loss.config())))
    assert type(rebuilt) is type(loss) and rebuilt.config() == loss.config()


def test_get_by_name():
    assert isinstance(losses.get("cross_entropy"), SoftmaxCrossEntropyLoss)
    assert isinstance(losses.get("MSE"), MSELoss)
    assert losses.CrossEntropyLoss is SoftmaxCrossEntropyLoss
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.get("hinge")
    with pytest.raises(ValueError, match="unknown loss config"):
        losses.from_config({"type": "HingeLoss"})


def test_nll_of_log_softmax_equals_the_fused_cross_entropy(device, xp, rng):
    """log-softmax then NLLLoss is the cross-entropy (PyTorch: CrossEntropyLoss =
    LogSoftmax + NLLLoss); the gradient w.r.t. log p is -s at the labels."""
    z = rng.normal(size=(7, 5))
    labels = np.array([0, 4, 2, 2, 1, 3, 0])
    nll, xent = NLLLoss(), SoftmaxCrossEntropyLoss()
    a = float(nll.forward(xp.asarray(_log_softmax(z)), xp.asarray(labels)))
    b = float(xent.forward(xp.asarray(z), xp.asarray(labels)))
    np.testing.assert_allclose(a, b, rtol=1e-12)
    expected = np.zeros((7, 5))
    expected[np.arange(7), labels] = -1 / 7
    np.testing.assert_array_equal(bp.to_numpy(nll.backward()), expected)


def test_half_mse_gradient_is_a_minus_y(device, xp, rng):
    a, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    loss = MSELoss(reduction="sum", half=True)
    loss.forward(xp.asarray(a), xp.asarray(y))
    np.testing.assert_allclose(bp.to_numpy(loss.backward()), a - y, rtol=1e-15)
    assert bp.losses.from_config(loss.config()).half is True
    assert bp.losses.get("half_mse").half and isinstance(bp.losses.get("nll"), NLLLoss)


@pytest.mark.parametrize("labels, error", [(np.array([0, 5]), ValueError),
                                           (np.array([0.0, 1.0]), TypeError),
                                           (np.array([[0], [1]]), ValueError)])
def test_nll_refuses_bad_labels(labels, error):
    with pytest.raises(error, match="NLLLoss"):
        NLLLoss().forward(np.zeros((2, 5)), labels)


def test_categorical_crossentropy_clips_like_keras(device, xp):
    """Keras clips the normalised probabilities to [1e-7, 1 - 1e-7]: a zero probability at
    the label costs -log 1e-7, and the clipped entries pass no gradient."""
    p = xp.asarray(np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    loss = CategoricalCrossEntropyLoss(reduction="sum")
    value = float(loss.forward(p, xp.asarray(np.array([0, 0]))))
    np.testing.assert_allclose(value, -np.log(1e-7) - np.log(1 - 1e-7), rtol=1e-12)
    g = bp.to_numpy(loss.backward())
    assert np.isfinite(g).all() and np.all(g[1] == 0.0)  # all three of row 1 clipped


def test_categorical_crossentropy_paired_with_softmax_gives_a_minus_y(device, xp, rng):
    """Through a softmax output layer, fit takes the loss from the logits (as Keras does):
    the gradient at the logits is δᴸ = (A - Y)/N, the loss that of the generic path, and a
    saturated softmax keeps a finite loss and exact gradient where the generic one loses
    it."""
    model = bp.Sequential([bp.Dense(3, 4, activation="softmax", rng=0, dtype="float64")])
    x = xp.asarray(rng.normal(size=(5, 3)))
    labels = np.array([0, 3, 1, 2, 3])
    loss = CategoricalCrossEntropyLoss()
    assert losses.paired_output(model, loss) is model.layers[0]
    assert losses.paired_output(model, MSELoss()) is None
    out = model.forward(x)
    generic = float(loss.forward(out, xp.asarray(labels)))
    paired = float(loss.forward_logits(model.layers[0].logits(), xp.asarray(labels)))
    np.testing.assert_allclose(paired, generic, rtol=1e-10)
    delta = bp.to_numpy(loss.backward())
    np.testing.assert_allclose(delta, (bp.to_numpy(out) - np.eye(4)[labels]) / 5, atol=1e-15)
    # the gradient reaching W is the same along both paths
    model.zero_grad()
    model.backward(loss.backward(), from_logits=True)
    dw_paired = bp.to_numpy(model.layers[0].W.grad).copy()
    model.zero_grad()
    loss.forward(model.forward(x), xp.asarray(labels))
    model.backward(loss.backward())
    np.testing.assert_allclose(bp.to_numpy(model.layers[0].W.grad), dw_paired, atol=1e-12)
    # saturated: the label's probability underflows to 0
    model.layers[0].W.data[...] = 0
    model.layers[0].b.data[...] = xp.asarray(np.array([800.0, 0.0, 0.0, 0.0]))
    out = model.forward(x)
    generic = float(loss.forward(out, xp.asarray(labels)))
    assert generic < 20  # clipped at -log 1e-7: the generic path cannot see how wrong it is
    assert not bp.to_numpy(loss.backward()).any()  # ... and has no gradient to learn from
    value = float(loss.forward_logits(model.layers[0].logits(), xp.asarray(labels)))
    # -log softmax = 800 on the four rows not labelled 0, 0 on the other: mean 640
    np.testing.assert_allclose(value, 640.0, rtol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(loss.backward()),
                               (bp.to_numpy(out) - np.eye(4)[labels]) / 5, atol=1e-15)


def test_fit_with_softmax_output_and_categorical_crossentropy_equals_logits_training(
        device, xp, rng):
    """fit(Dense(softmax), categorical_crossentropy) takes the same steps as
    fit(Dense(linear), cross_entropy): the combined gradient is the fused one."""
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    runs = []
    for act, loss in (("softmax", "categorical_crossentropy"), (None, "cross_entropy")):
        model = bp.Sequential([bp.Dense(5, 8, activation="tanh", rng=1, dtype="float64"),
                               bp.Dense(8, 3, activation=act, rng=2, dtype="float64")])
        hist = model.fit(X, y, loss=loss, optimizer="sgd", lr=0.5, epochs=3, batch_size=8,
                         seed=0, verbose=0, validation_data=(X, y))
        runs.append((hist, bp.to_numpy(model.layers[1].W.data)))
    (h1, w1), (h2, w2) = runs
    np.testing.assert_allclose(w1, w2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-10)
    np.testing.assert_allclose(h1.history["val_loss"], h2.history["val_loss"], rtol=1e-10)
