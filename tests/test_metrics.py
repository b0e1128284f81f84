"""backprop.metrics against values computed by hand, on each device."""
from __future__ import annotations

import numpy as np
import pytest

from backprop import metrics as M

SCORES = np.array([[0.1, 0.7, 0.2],    # predicts 1
                   [0.5, 0.3, 0.2],    # predicts 0
                   [0.2, 0.3, 0.5],    # predicts 2
                   [0.4, 0.35, 0.25]], np.float32)  # predicts 0
LABELS = np.array([1, 1, 2, 2])


def test_accuracy_from_scores_labels_and_binary(xp):
    assert M.accuracy(xp.asarray(LABELS), xp.asarray(SCORES)) == 0.5
    assert M.accuracy(xp.asarray(LABELS), xp.asarray(np.array([1, 0, 2, 2]))) == 0.75
    one_hot = np.eye(3)[LABELS]
    assert M.accuracy(xp.asarray(one_hot), xp.asarray(SCORES)) == 0.5
    probs = xp.asarray(np.array([[0.9], [0.4], [0.6], [0.1]], np.float32))
    assert M.accuracy(xp.asarray(np.array([1, 0, 0, 0])), probs) == 0.75
    logits = xp.asarray(np.array([[2.0], [-1.0], [0.3], [-0.2]], np.float32))
    assert M.accuracy(xp.asarray(np.array([1, 0, 0, 0])), logits, threshold=0.0) == 0.75


def test_top_k_accuracy(xp):
    y, s = xp.asarray(LABELS), xp.asarray(SCORES)
    # the true class ranks 1st, 2nd, 1st, 3rd in its row
    assert M.top_k_accuracy(y, s, k=1) == 0.5
    assert M.top_k_accuracy(y, s, k=2) == 0.75
    assert M.top_k_accuracy(y, s, k=3) == 1.0


def test_regression_metrics(xp):
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    p = np.array([[1.5], [2.0], [2.0], [5.0]])
    # errors 0.5, 0, -1, 1 -> MSE (0.25+0+1+1)/4, MAE 2.5/4; R2 = 1 - 2.25/5
    assert M.mean_squared_error(xp.asarray(y), xp.asarray(p)) == pytest.approx(0.5625)
    assert M.mean_absolute_error(xp.asarray(y), xp.asarray(p)) == pytest.approx(0.625)
    assert M.r2_score(xp.asarray(y), xp.asarray(p)) == pytest.approx(1 - 2.25 / 5)


def test_r2_averages_columns_and_handles_constant_targets():
    y = np.array([[1.0, 7.0], [3.0, 7.0]])
    assert M.r2_score(y, np.array([[1.0, 7.0], [3.0, 7.0]])) == 1.0
    # column 0: 1 - (1+1)/2 = 0; column 1 is constant and missed: 0
    assert M.r2_score(y, np.array([[2.0, 6.0], [2.0, 6.0]])) == 0.0


def test_confusion_matrix(xp):
    cm = M.confusion_matrix(xp.asarray(LABELS), xp.asarray(SCORES))
    expected = np.array([[0, 0, 0],
                         [1, 1, 0],
                         [1, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    assert M.confusion_matrix(np.array([0, 1, 1]), np.array([1, 1, 0])).tolist() == \
        [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match="num_classes=3"):
        M.confusion_matrix(np.array([0, 2]), np.array([0, 1]), num_classes=2)


@pytest.mark.parametrize("name", ["accuracy", "top_2_accuracy", "mse", "mae", "r2"])
def test_streaming_equals_one_shot(name, rng):
    scores = rng.normal(size=(50, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    targets = rng.normal(size=(50, 4)).astype(np.float32)
    y = labels if "acc" in name else targets
    whole, parts = M.get(name), M.get(name)
    whole.update(y, scores)
    for lo in range(0, 50, 16):
        parts.update(y[lo:lo + 16], scores[lo:lo + 16])
    assert parts.result() == pytest.approx(whole.result(), rel=1e-12)
    parts.reset()
    assert np.isnan(parts.result())


def test_names():
    assert isinstance(M.get("acc"), M.Accuracy)
    assert M.get("top5").k == 5 and M.get("top_3_accuracy").name == "top_3_accuracy"
    assert isinstance(M.get("mean_squared_error"), M.MeanSquaredError)
    metric = M.MeanAbsoluteError()
    assert M.get(metric) is metric
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        M.get("f1")
