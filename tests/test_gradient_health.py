"""GradientMonitor: the statistics against a hand-written backward pass, the warnings
(vanishing, exploding, non-finite; quiet on healthy networks), the logs, the steps it
monitors, the observers it leaves behind (none), the plot, and the example."""
from __future__ import annotations

import csv
import importlib.util
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks as C
from backprop.data import load_digits, standardize
from backprop.gradient_health import GradientHealthWarning, GradientMonitor
from backprop.layers import Dense
from backprop.model import Sequential
from backprop.optim import SGD
from backprop.training import NonFiniteLossError

ROOT = Path(__file__).resolve().parent.parent


def blobs(n=128, features=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), rng.integers(0, classes, n)


def stack(depth, act, width=32, features=16, classes=4, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    layers = [Dense(features, width, activation=act, rng=rng)]
    layers += [Dense(width, width, activation=act, rng=rng) for _ in range(depth - 2)]
    layers.append(Dense(width, classes, rng=rng))
    for layer in layers:
        layer.W.data *= scale
    return Sequential(layers)


def observed(model) -> list:
    return [m for m in model.modules() if "backward_observer" in vars(m)]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits()
    return standardize(X), y


# -- statistics against a direct computation ---------------------------------------------------
@pytest.mark.backends  # σ′ comes from the kernels: once per kernel backend (tests/conftest.py)
def test_statistics_match_a_hand_written_backward_pass():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    model = Sequential([Dense(4, 6, activation="relu", rng=rng, dtype="float64"),
                        Dense(6, 5, activation="sigmoid", rng=rng, dtype="float64"),
                        Dense(5, 3, rng=rng, dtype="float64")])
    l1, l2, l3 = model.layers
    l1.b.data[2] = -100.0   # unit 2 of layer 0: σ′ = 0 on every row (dead)
    l2.b.data[1] = 20.0     # units 1 and 3 of layer 1: σ′ ≈ 2e-9 on every row (saturated)
    l2.b.data[3] = -20.0
    W1, b1, W2, b2, W3, b3 = (p.data.copy() for p in model.parameters())
    # forward and backward by hand (cross-entropy of the mean over the batch)
    z1 = X @ W1.T + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ W2.T + b2
    a2 = 1 / (1 + np.exp(-z2))
    z3 = a2 @ W3.T + b3
    p = np.exp(z3 - z3.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d3 = (p - np.eye(3)[y]) / len(X)
    d2 = (d3 @ W3) * a2 * (1 - a2)
    d1 = (d2 @ W2) * (z1 > 0)
    grads = [d1.T @ X, d2.T @ a1, d3.T @ a2]
    deltas = [d1, d2, d3]

    lr = 0.1
    monitor = GradientMonitor(every=1, warn=False)
    model.fit(X, y, loss="cross_entropy", optimizer=SGD(model.parameters(), lr=lr), epochs=1,
              batch_size=len(X), shuffle=False, verbose=0, callbacks=[monitor])

    (record,) = monitor.records
    assert record["step"] == 0 and record["epoch"] == 0 and record["batch"] == 0
    assert monitor.layer_paths == ["0", "1", "2"]
    for path, delta, grad, W in zip("012", deltas, grads, (W1, W2, W3)):
        s = record["layers"][path]
        assert s["delta_rms"] == pytest.approx(np.sqrt(np.mean(delta ** 2)), rel=1e-10, abs=0)
        assert s["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-10, abs=0)
        # plain SGD: ΔW = -lr ∂W, so ‖ΔW‖/‖W‖ = lr ‖∂W‖/‖W‖
        assert s["update_ratio"] == pytest.approx(lr * np.linalg.norm(grad) / np.linalg.norm(W),
                                                  rel=1e-8, abs=0)
    dead = np.all(z1 <= 0, axis=0)
    assert dead[2]
    assert record["layers"]["0"]["dead_fraction"] == pytest.approx(dead.mean())
    slope = a2 * (1 - a2)
    saturated = (slope < 0.01).sum(axis=0) > 0.5 * len(X)
    assert saturated[1] and saturated[3]
    assert record["layers"]["1"]["saturated_fraction"] == pytest.approx(saturated.mean())
    # what does not apply is NaN
    assert math.isnan(record["layers"]["0"]["saturated_fraction"])
    assert math.isnan(record["layers"]["1"]["dead_fraction"])
    assert math.isnan(record["layers"]["2"]["dead_fraction"])
    assert record["depth_ratio"] == pytest.approx(np.sqrt(np.mean(d1 ** 2) / np.mean(d3 ** 2)),
                                                  rel=1e-10, abs=0)
    steps, series = monitor.series("grad_norm")
    assert steps.tolist() == [0] and series["1"][0] == record["layers"]["1"]["grad_norm"]


@pytest.mark.backends
def test_tanh_saturation_and_float32_vanishing_delta_is_not_rounded_to_zero():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 2, 16)
    model = Sequential([Dense(3, 4, activation="tanh", rng=rng), Dense(4, 2, rng=rng)])
    model.layers[0].b.data[:2] = 30.0  # two of four units: tanh′ = 0 in float32
    model.layers[1].W.data *= 1e-30    # δ of layer 0 ~ 1e-31: its float32 squares underflow
    W1 = model.layers[1].W.data.astype(np.float64)
    a0 = np.tanh(X.astype(np.float64) @ model.layers[0].W.data.T.astype(np.float64)
                 + model.layers[0].b.data)
    monitor = GradientMonitor(every=1, warn=False)
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=16, verbose=0,
              shuffle=False, callbacks=[monitor])
    s = monitor.records[0]["layers"]["0"]
    assert s["saturated_fraction"] == 0.5
    # with W1 ~ 1e-30 the logits are ~0: softmax = 1/2, δ of the output = (1/2 - onehot)/N
    d1 = (np.full((16, 2), 0.5) - np.eye(2)[y]) / 16
    d0 = (d1 @ W1) * (1 - a0 ** 2)
    assert s["delta_rms"] == pytest.approx(np.sqrt(np.mean(d0 ** 2)), rel=1e-3, abs=0)
    assert model.layers[0].W.dtype == np.float32


# -- warnings ---------------------------------------------------------------------------------
def test_deep_sigmoid_stack_warns_that_gradients_vanish():
    X, y = blobs()
    monitor = GradientMonitor(every=1)
    with pytest.warns(GradientHealthWarning, match="vanish") as caught:
        stack(10, "sigmoid").fit(X, y, loss="cross_entropy", epochs=2, batch_size=32,
                                 verbose=0, seed=0, callbacks=[monitor])
    vanish = [w for w in caught if "vanish" in str(w.message)]
    assert len(vanish) == 1                      # once per fit, though every step qualifies
    message = str(vanish[0].message)
    for advice in ("He initialisation", "ReLU", "BatchNorm1d", "Residual"):
        assert advice in message
    assert vanish[0].filename == __file__        # points at the fit call, not at backprop
    assert [k for k, _, _ in monitor.warnings] == ["vanish"]
    assert monitor.records[0]["depth_ratio"] < 1e-3


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_healthy_network_stays_quiet(digits, act):
    X, y = digits
    rng = np.random.default_rng(0)
    model = Sequential([Dense(64, 128, activation=act, rng=rng),
                        Dense(128, 128, activation=act, rng=rng), Dense(128, 10, rng=rng)])
    monitor = GradientMonitor(every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientHealthWarning)
        history = model.fit(X, y, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=4,
                            batch_size=64, verbose=0, seed=0, callbacks=[monitor])
    assert monitor.warnings == []
    assert len(monitor.records) == 4 * 29
    assert history.history["accuracy"][-1] > 0.95


def test_scaled_weights_warn_that_gradients_explode():
    X, y = blobs()
    monitor = GradientMonitor(every=1)
    with pytest.warns(GradientHealthWarning, match="explode") as caught:
        stack(8, "relu", scale=4.0).fit(X, y, loss="cross_entropy", epochs=1, batch_size=32,
                                        verbose=0, seed=0, callbacks=[monitor])
    message = str(caught[0].message)
    assert "lower the learning rate" in message and "clip_grad_norm" in message
    assert monitor.records[0]["depth_ratio"] > 1e3


class ScaleWeightsAt(C.Callback):
    """Multiplies every weight matrix by ``factor`` before step ``step``."""

    def __init__(self, step, factor):
        self.step, self.factor, self.seen = step, factor, 0

    def on_batch_begin(self, batch, logs=None):
        if self.seen == self.step:
            for p in self.model.parameters():
                if p.name.endswith("W"):
                    p.data *= self.factor
        self.seen += 1


def test_growing_gradients_warn_and_so_does_a_large_total_norm():
    X, y = blobs()
    monitor = GradientMonitor(every=1, explode_ratio=1e9)  # only the growth rule can fire
    with pytest.warns(GradientHealthWarning, match="grow"):
        stack(5, "relu").fit(X, y, loss="cross_entropy", optimizer="sgd", lr=1e-4, epochs=1,
                             batch_size=32, verbose=0, seed=0,
                             callbacks=[monitor, ScaleWeightsAt(2, 10.0)])
    assert [(k, s) for k, s, _ in monitor.warnings] == [("explode", 2)]

    monitor = GradientMonitor(every=1, explode_norm=1e-3)
    with pytest.warns(GradientHealthWarning, match="total norm"):
        stack(3, "relu").fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0,
                             seed=0, callbacks=[monitor])


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("every", [1, 1000])
def test_non_finite_warns_before_fit_raises_and_observers_are_removed(every):
    X, y = blobs()
    model = stack(3, "relu")
    monitor = GradientMonitor(every=every, dead_warn=1.0)  # (the huge step kills units too)
    with pytest.warns(GradientHealthWarning, match="non-finite|loss became") as caught:
        with pytest.raises(NonFiniteLossError):
            model.fit(X, y, loss="cross_entropy", optimizer="sgd", lr=1e30, epochs=3,
                      batch_size=32, verbose=0, seed=0, callbacks=[monitor])
    (message,) = [str(w.message) for w in caught if "non-finite" in str(w.message)
                  or "loss became" in str(w.message)]
    assert "lower the learning rate" in message and "clip_grad_norm" in message
    assert "nonfinite" in [k for k, _, _ in monitor.warnings]
    assert observed(model) == []
    if every == 1:  # the skipped update: no ratio
        assert math.isnan(monitor.records[-1]["layers"]["0"]["update_ratio"])


# -- logs, steps, observers ---------------------------------------------------------------------
def test_history_csv_and_progress_line(tmp_path, capsys):
    X, y = blobs(n=96)
    model = Sequential([Dense(16, 8, activation="relu", rng=0), Dense(8, 8, activation="sigmoid",
                        rng=1), Dense(8, 4, rng=2)])
    monitor = GradientMonitor(every=4)
    path = tmp_path / "log.csv"
    history = model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=32, verbose=2, seed=0,
                        callbacks=[C.CSVLogger(path), monitor,
                                   # the keys are declared before the callbacks check theirs
                                   C.EarlyStopping("grad/depth_ratio", patience=9)])
    keys = ["grad/0/delta_rms", "grad/0/grad_norm", "grad/0/update_ratio", "grad/0/dead_fraction",
            "grad/1/delta_rms", "grad/1/grad_norm", "grad/1/update_ratio",
            "grad/1/saturated_fraction", "grad/2/delta_rms", "grad/2/grad_norm",
            "grad/2/update_ratio", "grad/depth_ratio"]
    assert [k for k in history.history if k.startswith("grad/")] == keys
    # 3 steps per epoch, every=4: steps 0 (epoch 0) and 4 (epoch 1, batch 1)
    assert [(r["epoch"], r["batch"]) for r in monitor.records] == [(0, 0), (1, 1)]
    for i, record in enumerate(monitor.records):
        assert history.history["grad/1/delta_rms"][i] == record["layers"]["1"]["delta_rms"]
        assert history.history["grad/depth_ratio"][i] == record["depth_ratio"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(keys) <= set(rows[0])
    assert float(rows[1]["grad/0/grad_norm"]) == pytest.approx(
        history.history["grad/0/grad_norm"][1])
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "grad/" not in out


def test_epoch_logs_are_means_over_the_epochs_monitored_steps():
    X, y = blobs(n=64)
    monitor = GradientMonitor(every=5)
    history = stack(3, "relu").fit(X, y, loss="cross_entropy", epochs=3, batch_size=32,
                                   verbose=0, seed=0, callbacks=[monitor])
    # 2 steps per epoch: steps 0 and 4 are monitored, in epochs 0 and 2
    column = history.history["grad/0/delta_rms"]
    assert math.isfinite(column[0]) and math.isnan(column[1]) and math.isfinite(column[2])

    monitor = GradientMonitor(every=2)
    history = stack(3, "relu").fit(X, y, loss="cross_entropy", epochs=2, batch_size=8,
                                   verbose=0, seed=0, callbacks=[monitor])
    for epoch in range(2):   # 8 steps per epoch, 4 of them monitored
        records = [r for r in monitor.records if r["epoch"] == epoch]
        assert len(records) == 4
        for key, stat in (("grad/1/grad_norm", "grad_norm"), ("grad/2/delta_rms", "delta_rms")):
            expected = np.mean([r["layers"][key.split("/")[1]][stat] for r in records])
            assert history.history[key][epoch] == pytest.approx(expected)


class Spy(C.Callback):
    """Records whether the layers carry an observer at each batch hook."""

    def __init__(self):
        self.begin, self.end = [], []

    def on_batch_begin(self, batch, logs=None):
        self.begin.append(bool(observed(self.model)))

    def on_batch_end(self, batch, logs=None):
        self.end.append(bool(observed(self.model)))


def test_every_n_monitors_exactly_those_steps():
    X, y = blobs(n=100)
    model = stack(3, "relu")
    monitor, spy = GradientMonitor(every=7), Spy()
    model.fit(X, y, loss="cross_entropy", epochs=3, batch_size=10, verbose=0, seed=0,
              callbacks=[spy, monitor])   # the monitor runs first all the same (adds_logs)
    assert [r["step"] for r in monitor.records] == [0, 7, 14, 21, 28]
    assert [(r["epoch"], r["batch"]) for r in monitor.records] == \
        [(0, 0), (0, 7), (1, 4), (2, 1), (2, 8)]
    assert spy.begin == [s % 7 == 0 for s in range(30)]  # installed for those steps only
    assert spy.end == [False] * 30
    assert observed(model) == []


class FailAt(C.Callback):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.step:
            raise RuntimeError("boom")


def test_observers_after_an_exception_mid_step():
    X, y = blobs()
    model = stack(3, "relu")
    monitor = GradientMonitor(every=1)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, seed=0,
                  callbacks=[monitor, FailAt(2)])
    # fit does not call on_train_end for this error: the observers of step 2 are still set ...
    assert len(observed(model)) == 3 and len(monitor.records) == 2
    # ... inert: the next backward pass removes them and records nothing
    out = model.forward(np.asarray(X[:8], dtype=np.float32))
    model.backward(np.ones_like(out), need_input_grad=False)
    assert observed(model) == [] and len(monitor.records) == 2
    # and the monitor starts afresh in the next fit
    model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, seed=0,
              callbacks=[monitor])
    assert [r["step"] for r in monitor.records] == [0, 1, 2, 3] and observed(model) == []

    with pytest.raises(RuntimeError, match="boom"):
        model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, seed=0,
                  callbacks=[monitor, FailAt(1)])
    monitor.detach()
    assert observed(model) == []


def test_an_existing_observer_is_chained_and_restored():
    X, y = blobs()
    model = stack(3, "relu")
    calls = []

    def mine(layer, delta):
        calls.append(float(np.abs(delta).sum()))

    model.layers[1].backward_observer = mine
    monitor = GradientMonitor(every=2)
    model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, seed=0,
              callbacks=[monitor])
    assert len(calls) == 4 and len(monitor.records) == 2   # every step's, monitored or not
    assert vars(model.layers[1])["backward_observer"] is mine
    assert observed(model) == [model.layers[1]]


def test_other_threads_backward_passes_are_not_recorded():
    X, _ = blobs(n=8)
    X = X.astype(np.float32)
    model = stack(3, "relu")
    monitor = GradientMonitor(every=1)
    monitor.set_context(model, None, None, {})
    monitor.on_train_begin()
    monitor.on_batch_begin(0)

    def backward():
        out = model.forward(X)
        model.backward(np.ones_like(out), need_input_grad=False)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert all(e.pending is None for e in monitor._layers)
    backward()
    assert all(e.pending is not None for e in monitor._layers)
    monitor.on_train_end()
    assert observed(model) == []


# -- arguments, plot, example ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error", [
    ({"every": 0}, ValueError), ({"every": 1.5}, TypeError), ({"every": True}, TypeError),
    ({"vanish_ratio": 2.0}, ValueError), ({"explode_ratio": 0.5}, ValueError),
    ({"explode_factor": float("inf")}, ValueError), ({"explode_norm": -1.0}, ValueError),
    ({"dead_warn": 1.5}, ValueError), ({"saturated_warn": "half"}, TypeError),
    ({"saturation_rows": 1.0}, ValueError), ({"patience": 0}, ValueError),
    ({"warn": 1}, TypeError),
])
def test_bad_arguments_are_refused_at_construction(kwargs, error):
    with pytest.raises(error, match="GradientMonitor"):
        GradientMonitor(**kwargs)


def test_exports_and_model_without_dense():
    assert C.GradientMonitor is GradientMonitor
    assert issubclass(GradientHealthWarning, UserWarning)
    monitor = GradientMonitor()
    with pytest.raises(ValueError, match="no Dense layer"):
        Sequential([bp.BatchNorm1d(2)]).fit(np.zeros((4, 2)), np.zeros((4, 2)), loss="mse",
                                            verbose=0, callbacks=[monitor])
    with pytest.raises(ValueError, match="unknown statistic"):
        monitor.series("norm")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    monitor = GradientMonitor(every=1)
    with pytest.raises(ValueError, match="no monitored step"):
        monitor.plot(tmp_path / "none.png")
    X, y = blobs()
    stack(4, "relu").fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0,
                         seed=0, callbacks=[monitor])
    path = tmp_path / "flow.png"
    ax = monitor.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 4
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert monitor.plot(ax=axes[1], stat="update_ratio", title="t") is axes[1]
    assert axes[1].get_title() == "t"


def test_vanishing_gradients_example_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "vanishing_gradients", ROOT / "examples" / "vanishing_gradients.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "vg.png"
    results = example.main(["--epochs", "1", "--every", "5", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert set(results) == {"sigmoid", "relu_he", "batchnorm", "residual"}
    assert "vanish" in results["sigmoid"]["warnings"]
    assert "test accuracy" in capsys.readouterr().out
