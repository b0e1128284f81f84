"""fit / evaluate / predict: learning, determinism, data handling and errors, per device."""
from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop import data, training
from backprop.callbacks import Callback
from backprop.data import DataError
from backprop.layers import BatchNorm1d, Dense
from backprop.losses import SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop.regularizers import L2

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


def mlp(n_in=2, hidden=16, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Dense(n_in, hidden, activation="tanh", rng=rng),
                       Dense(hidden, n_out, rng=rng)])


def weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def moons():
    X, y = data.two_moons(n=160, noise=0.1, seed=0)
    return data.standardize(X), y


def test_fit_evaluate_predict_learn_two_moons(device, moons):
    X, y = moons
    model = mlp()
    assert bp.to_numpy(model[0].W.data).dtype == np.float32
    loss = SoftmaxCrossEntropyLoss()
    hist = training.fit(model, X, y, loss=loss, optimizer="adam", lr=0.03, epochs=25,
                        batch_size=12, validation_split=0.25, seed=0, verbose=0)
    h = hist.history
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "time",
                      "samples_per_s"}
    assert len(hist) == 25 and hist.epoch == list(range(25))
    assert h["loss"][-1] < 0.2 * h["loss"][0] and h["val_accuracy"][-1] >= 0.95
    assert all(v == 0.03 for v in h["lr"]) and all(s > 0 for s in h["samples_per_s"])
    assert loss.validate_labels  # fit turns the per-batch check off only while it runs
    result = training.evaluate(model, X, y, loss="cross_entropy")
    assert set(result) == {"loss", "accuracy"} and result["accuracy"] >= 0.95
    out = training.predict(model, X, batch_size=50)
    assert bp.get_array_module(out) is device.xp and out.shape == (160, 2)
    acc = float((bp.to_numpy(out).argmax(axis=1) == y).mean())
    assert acc == pytest.approx(result["accuracy"])


def test_predict_returns_a_fresh_array(moons):
    X, _ = moons
    model = mlp()
    first = training.predict(model, X[:40])
    kept = bp.to_numpy(first).copy()
    training.predict(model, X[40:80])
    model.forward(bp.asarray(X[:40] * 3, dtype=first.dtype))  # overwrites the layer buffers
    np.testing.assert_array_equal(bp.to_numpy(first), kept)
    model.eval()  # predict is eval mode; model(x) then runs the same path (a compiled plan)
    np.testing.assert_array_equal(kept, bp.to_numpy(model(X[:40])))


def test_same_seed_same_trajectory_other_seed_other_one(device, moons):
    X, y = moons

    def run(seed):
        model = mlp(seed=1)
        hist = training.fit(model, X, y, loss="cross_entropy", optimizer="adam", lr=0.01,
                            epochs=3, batch_size=16, seed=seed, verbose=0)
        return weights(model), hist.history["loss"]

    (w1, l1), (w2, l2), (w3, _) = run(7), run(7), run(8)
    assert l1 == l2
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])
    assert any(not np.array_equal(w1[k], w3[k]) for k in w1)


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = training.epoch_permutation(3, 5, 100)
    np.testing.assert_array_equal(a, training.epoch_permutation(3, 5, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, training.epoch_permutation(3, 6, 100))
    assert not np.array_equal(a, training.epoch_permutation(4, 5, 100))


def test_batches_follow_the_epoch_permutation(moons):
    """The rows seen in each step are the slices of the permuted data set."""
    X, y = moons
    model = mlp()
    seen = []
    forward = model.forward
    model.forward = lambda xb: (seen.append(bp.to_numpy(xb).copy()), forward(xb))[1]
    training.fit(model, X[:40], y[:40], loss="cross_entropy", epochs=2, batch_size=16, seed=5,
                 verbose=0)
    assert [len(b) for b in seen] == [16, 16, 8] * 2
    for epoch in range(2):
        perm = training.epoch_permutation(5, epoch, 40)
        np.testing.assert_array_equal(np.concatenate(seen[3 * epoch:3 * epoch + 3]), X[:40][perm])


def test_no_shuffle_and_drop_last(moons):
    X, y = moons
    model = mlp()
    seen = []
    forward = model.forward
    model.forward = lambda xb: (seen.append(bp.to_numpy(xb).copy()), forward(xb))[1]
    hist = training.fit(model, X[:40], y[:40], loss="cross_entropy", epochs=1, batch_size=16,
                        shuffle=False, drop_last=True, verbose=0)
    assert [len(b) for b in seen] == [16, 16]
    np.testing.assert_array_equal(np.concatenate(seen), X[:32])
    assert hist.params["samples"] == 32 and hist.params["steps"] == 2


def test_regression_with_names_and_regularizer():
    X, y = data.regression(n=128, features=3, noise=0.05, seed=2)
    model = Sequential([Dense(3, 16, activation="relu", rng=0), Dense(16, 1, rng=1)])
    hist = training.fit(model, X, y[:, 0], loss="mse", optimizer="sgd", lr=0.05, epochs=15,
                        batch_size=16, metrics=["mae", "r2"], seed=0, verbose=0)
    assert "accuracy" not in hist.history
    assert hist.history["r2"][-1] > 0.8 > hist.history["r2"][0]
    plain = training.evaluate(model, X, y, loss="mse", metrics=[])
    model.add_regularizer(L2(0.5))
    w_before = weights(model)
    hist = training.fit(model, X, y, loss="mse", optimizer="sgd", lr=0.0, epochs=1,
                        batch_size=128, metrics=[], verbose=0)
    w2 = sum(float((w ** 2).sum()) for k, w in w_before.items() if k.endswith("W"))
    assert hist.history["loss"][0] == pytest.approx(plain["loss"] + 0.5 * w2, rel=1e-5)


def test_unknown_names_are_rejected(moons):
    X, y = moons
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        training.fit(mlp(), X, y, loss="hinge", verbose=0)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        training.fit(mlp(), X, y, loss="cross_entropy", optimizer="lbfgs", verbose=0)


@pytest.mark.parametrize("mutate, match", [
    (lambda X, y: (np.where(np.arange(len(X))[:, None] == 7, np.nan, X), y),
     "NaN or inf .first at row 7"),
    (lambda X, y: (X, np.where(np.arange(len(y)) == 3, 2, y)), r"labels in \[0, 2\]"),
    (lambda X, y: (X, y[:-1]), "160 rows but y has 159"),
    (lambda X, y: (np.hstack([X, X]), y), "expects 2"),
])
def test_bad_data_fails_before_any_step(moons, mutate, match):
    X, y = moons
    model = mlp()
    before = weights(model)
    with pytest.raises(DataError, match=match):
        training.fit(model, *mutate(X, y), loss="cross_entropy", epochs=1, verbose=0)
    for k, v in weights(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_bad_validation_data_is_named(moons):
    X, y = moons
    with pytest.raises(DataError, match="validation data"):
        training.fit(mlp(), X, y, loss="cross_entropy", validation_data=(X[:5], y[:4]),
                     verbose=0)


class _WeightsAfterEachStep(Callback):
    def __init__(self):
        self.snapshots = []

    def on_batch_end(self, batch, logs=None):
        if np.isfinite(logs["loss"]):
            self.snapshots.append(weights(self.model))


def test_non_finite_loss_raises_without_damaging_weights():
    X, y = data.regression(n=64, features=3, seed=0)
    model = Sequential([Dense(3, 8, activation="relu", rng=0), Dense(8, 1, rng=1)])
    recorder = _WeightsAfterEachStep()
    with pytest.raises(training.NonFiniteLossError, match=r"epoch \d+, step \d+"):
        training.fit(model, X, y, loss="mse", optimizer="sgd", lr=1e12, epochs=5, batch_size=8,
                     metrics=[], callbacks=[recorder], verbose=0)
    assert recorder.snapshots, "the first steps should have had a finite loss"
    for k, w in weights(model).items():  # the weights of the last good step, untouched
        np.testing.assert_array_equal(w, recorder.snapshots[-1][k])


def test_non_finite_loss_leaves_batchnorm_running_statistics_as_before_the_step():
    """The forward pass of the rejected step updated BatchNorm's running statistics (NaN
    ones, from the step's NaN batch statistics); they are restored with the weights."""
    X, y = data.regression(n=64, features=3, seed=0)
    model = Sequential([Dense(3, 8, activation="relu", rng=0), BatchNorm1d(8),
                        Dense(8, 1, rng=1)])
    recorder = _WeightsAfterEachStep()
    with pytest.raises(training.NonFiniteLossError):
        training.fit(model, X, y, loss="mse", optimizer="sgd", lr=1e12, epochs=5, batch_size=8,
                     metrics=[], callbacks=[recorder], verbose=0)
    assert recorder.snapshots
    state = weights(model)
    assert np.isfinite(state["1.running_var"]).all()
    for k, w in state.items():
        np.testing.assert_array_equal(w, recorder.snapshots[-1][k], err_msg=k)


def _bn_model():
    return Sequential([Dense(2, 8, activation="relu", rng=0), BatchNorm1d(8), Dense(8, 2, rng=1)])


@pytest.mark.parametrize("call, error, match", [
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", epochs=1.5), TypeError, "epochs"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", batch_size=32.0), TypeError,
     "batch_size"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", batch_size=True), TypeError,
     "batch_size"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", batch_size=0), ValueError,
     "batch_size must be an integer >= 1"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", epochs=-1), ValueError, "epochs"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", epochs=2, initial_epoch=3),
     ValueError, "initial_epoch"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", verbose=3), ValueError, "verbose"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", shuffle="yes"), TypeError, "shuffle"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", seed=1.5), TypeError, "seed"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", validation_split=1.0), ValueError,
     "validation_split"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", validation_data=(X,)), ValueError,
     "pair"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", callbacks=[print]), TypeError,
     r"callbacks\[0\]"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", optimizer=o, lr=-1.0), ValueError,
     "lr"),
    (lambda m, X, y, o: m.fit(X, y, loss="cross_entropy", optimizer="adamm"), ValueError,
     "unknown optimizer"),
    (lambda m, X, y, o: m.fit(X, None, loss="cross_entropy"), DataError, "y is None"),
    (lambda m, X, y, o: m.fit(X[:33], y[:33], loss="cross_entropy", batch_size=32),
     ValueError, "drop_last=True"),
    (lambda m, X, y, o: m.fit(X[:1], y[:1], loss="cross_entropy"), ValueError,
     "training data has 1 row"),
    (lambda m, X, y, o: m.evaluate(X, y, batch_size=-1), ValueError, "batch_size"),
    (lambda m, X, y, o: m.evaluate(X, y, batch_size=0), ValueError, "batch_size"),
    (lambda m, X, y, o: m.evaluate(X, None), DataError, "y is None"),
    (lambda m, X, y, o: m.predict(X, batch_size=-1), ValueError, "batch_size"),
    (lambda m, X, y, o: m.predict(X, batch_size=2.5), TypeError, "batch_size"),
    (lambda m, X, y, o: m.to(dtype="int32"), ValueError, "float32 or float64"),
    (lambda m, X, y, o: m.to(dtype="float16"), ValueError, "float32 or float64"),
    (lambda m, X, y, o: m.to(dtype="complex"), ValueError, "float32 or float64"),
    (lambda m, X, y, o: m.to(device="tpu"), ValueError, "unknown device"),
])
def test_bad_arguments_raise_before_any_work_and_change_nothing(moons, call, error, match):
    X, y = moons
    model = _bn_model()
    optimizer = bp.Adam(model.parameters(), lr=0.01)
    before = weights(model)
    with pytest.raises(error, match=match):
        call(model, X, y, optimizer)
    after = weights(model)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert optimizer.lr == 0.01 and optimizer.step_count == 0
    assert model.training


def test_a_metric_name_string_is_one_metric_and_metric_objects_are_not_shared(moons):
    X, y = moons
    model = mlp()
    hist = model.fit(X, y, loss="cross_entropy", metrics="accuracy", epochs=1, verbose=0)
    assert set(hist.history) >= {"loss", "accuracy"}
    assert "a" not in hist.history
    metric = bp.metrics.Accuracy()
    result = model.evaluate(X, y, metrics=metric)
    assert set(result) == {"accuracy"}
    assert metric._acc is None  # the caller's object was copied, not filled


def test_batchnorm_trains_when_drop_last_removes_the_one_row_batch(moons):
    X, y = moons
    model = _bn_model()
    model.fit(X[:33], y[:33], loss="cross_entropy", batch_size=32, drop_last=True, verbose=0)


def test_terminate_on_nan_in_the_first_epoch_records_the_partial_epoch():
    X, y = data.regression(n=64, features=3, seed=0)
    model = Sequential([Dense(3, 8, activation="relu", rng=0), Dense(8, 1, rng=1)])
    hist = training.fit(model, X, y, loss="mse", optimizer="sgd", lr=1e12, epochs=5,
                        batch_size=8, metrics=[], callbacks=[bp.callbacks.TerminateOnNaN()],
                        verbose=0)
    assert len(hist.history["loss"]) >= 1
    assert not np.isfinite(hist.history["loss"][-1])


# ---------------------------------------------------------------------------------------
# Gradient clipping in fit: between backward and the step, as a hand-written loop does it
@pytest.mark.parametrize("clip", [{"clip_grad_norm": 0.05}, {"clip_grad_value": 0.01},
                                  {"clip_grad_value": 0.01, "clip_grad_norm": 0.02}],
                         ids=["norm", "value", "value_then_norm"])
def test_fit_clips_gradients_between_backward_and_the_step(clip):
    X, y = bp.data.two_moons(64, seed=0, dtype="float64")

    def model():
        bp.manual_seed(3)
        return bp.Sequential([bp.Dense(2, 16, activation="tanh", dtype="float64"),
                              bp.Dense(16, 2, dtype="float64")])

    fitted = model()
    logged = []

    class Norms(bp.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            logged.append(logs.get("grad_norm"))

    fitted.fit(X, y, loss="cross_entropy", optimizer="sgd", lr=0.5, epochs=2, batch_size=16,
               shuffle=False, verbose=0, callbacks=[Norms()], **clip)
    by_hand = model()
    loss, opt = bp.SoftmaxCrossEntropyLoss(), bp.SGD(by_hand.parameters(), lr=0.5)
    norms = []
    for _ in range(2):
        for lo in range(0, 64, 16):
            opt.zero_grad()
            loss.forward(by_hand.forward(X[lo:lo + 16]), y[lo:lo + 16])
            by_hand.backward(loss.backward(), need_input_grad=False)
            if "clip_grad_value" in clip:
                bp.clip_grad_value(by_hand.parameters(), clip["clip_grad_value"])
            if "clip_grad_norm" in clip:
                norms.append(bp.clip_grad_norm(by_hand.parameters(), clip["clip_grad_norm"]))
            opt.step()
    for a, b in zip(fitted.parameters(), by_hand.parameters()):
        np.testing.assert_allclose(bp.to_numpy(a.data), bp.to_numpy(b.data), rtol=0, atol=1e-12)
    if "clip_grad_norm" in clip:
        np.testing.assert_allclose(logged, norms, rtol=1e-12)
        assert max(norms) > clip["clip_grad_norm"]  # the clipping acted
    else:
        assert logged == [None] * 8


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError),
                                        (float("nan"), ValueError), (float("inf"), ValueError),
                                        (True, TypeError), ("1", TypeError)])
def test_fit_refuses_bad_clipping_values_before_any_step(bad, error):
    X, y = bp.data.two_moons(32, seed=0)
    m = bp.Sequential([bp.Dense(2, 2)])
    before = [bp.to_numpy(p.data).copy() for p in m.parameters()]
    for key in ("clip_grad_norm", "clip_grad_value"):
        with pytest.raises(error, match=key):
            m.fit(X, y, loss="cross_entropy", verbose=0, **{key: bad})
    for a, p in zip(before, m.parameters()):
        np.testing.assert_array_equal(a, bp.to_numpy(p.data))
