"""Callbacks: hook order, EarlyStopping, ModelCheckpoint, TerminateOnNaN, schedules, logging."""
from __future__ import annotations

import csv
import io as stdio
import json
import math
import re

import numpy as np
import pytest

from backprop import callbacks as C
from backprop import data, io, schedules, training
from backprop.layers import Dense
from backprop.model import Sequential
from backprop.optim import SGD


def mlp(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Dense(2, 8, activation="tanh", rng=rng), Dense(8, 2, rng=rng)])


@pytest.fixture(scope="module")
def moons():
    X, y = data.two_moons(n=48, noise=0.1, seed=0)
    return data.standardize(X), y


class Recorder(C.Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_train_end(self, logs=None):
        self.calls.append("train_end")

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(f"epoch_begin {epoch}")

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch} {sorted(logs)}")

    def on_batch_begin(self, batch, logs=None):
        self.calls.append(f"batch_begin {batch} {logs['size']}")

    def on_batch_end(self, batch, logs=None):
        assert math.isfinite(logs["loss"])
        self.calls.append(f"batch_end {batch}")


class Script(C.Callback):
    """Overwrites ``logs[key]`` with scripted values (runs before the callback under test)."""

    def __init__(self, key, values):
        self.key, self.values = key, values

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


class Snapshots(C.Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.state_dict())


def test_hooks_fire_in_order(moons):
    X, y = moons
    rec = Recorder()
    training.fit(mlp(), X[:20], y[:20], loss="cross_entropy", epochs=2, batch_size=8,
                 validation_data=(X[20:], y[20:]), callbacks=[rec], verbose=0)
    keys = sorted(["loss", "accuracy", "val_loss", "val_accuracy", "lr", "time",
                   "samples_per_s"])
    epoch = ["batch_begin 0 8", "batch_end 0", "batch_begin 1 8", "batch_end 1",
             "batch_begin 2 4", "batch_end 2"]
    assert rec.calls == ["train_begin",
                         "epoch_begin 0", *epoch, f"epoch_end 0 {keys}",
                         "epoch_begin 1", *epoch, f"epoch_end 1 {keys}",
                         "train_end"]
    assert rec.params["epochs"] == 2 and rec.params["steps"] == 3 and rec.model is not None


def test_early_stopping_restores_best_weights(moons):
    X, y = moons
    model, snaps = mlp(), Snapshots()
    stopper = C.EarlyStopping("val_loss", patience=2)
    hist = training.fit(model, X, y, loss="cross_entropy", lr=0.05, epochs=10, batch_size=16,
                        validation_split=0.25, verbose=0,
                        callbacks=[Script("val_loss", [3, 1, 2, 1.5, 4, 5, 6, 7, 8, 9]), snaps,
                                   stopper])
    assert len(hist) == 5 and stopper.stopped_epoch == 4 and stopper.best_epoch == 1
    final = model.state_dict()
    for k, v in snaps.weights[1].items():
        np.testing.assert_array_equal(final[k], v)
    assert any(not np.array_equal(final[k], snaps.weights[4][k]) for k in final)


def test_early_stopping_min_delta_mode_and_unknown_monitor(moons):
    X, y = moons
    stopper = C.EarlyStopping("val_accuracy", patience=0, min_delta=0.1)
    assert stopper.mode == "max"
    hist = training.fit(mlp(), X, y, loss="cross_entropy", epochs=5, validation_split=0.25,
                        verbose=0, callbacks=[Script("val_accuracy", [0.5, 0.55, 0.9, 1, 1]),
                                              stopper])
    assert len(hist) == 2 and stopper.best_epoch == 0  # +0.05 is not more than min_delta
    with pytest.raises(ValueError, match="monitors 'val_loss'.*validation_data"):
        training.fit(mlp(), X, y, loss="cross_entropy", verbose=0,
                     callbacks=[C.EarlyStopping()])


def test_model_checkpoint_best_and_last(moons, tmp_path):
    X, y = moons
    best = C.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
    last = C.ModelCheckpoint(str(tmp_path / "e{epoch:02d}.npz"))
    snaps = Snapshots()
    training.fit(mlp(), X, y, loss="cross_entropy", epochs=4, validation_split=0.25, verbose=0,
                 callbacks=[Script("val_loss", [2, 1, 3, 4]), snaps, best, last])
    ckpt = io.load_checkpoint(tmp_path / "best.npz")
    assert ckpt.epoch == 2 and ckpt.optimizer is not None
    for k, v in snaps.weights[1].items():
        np.testing.assert_array_equal(ckpt.model.state_dict()[k], v)
    assert sorted(p.name for p in tmp_path.glob("e*.npz")) == [f"e0{i}.npz" for i in (1, 2, 3, 4)]
    assert io.load_checkpoint(last.last_saved).epoch == 4


def test_terminate_on_nan_stops_with_intact_weights(capsys):
    X, y = data.regression(n=64, features=3, seed=0)
    model = Sequential([Dense(3, 8, activation="relu", rng=0), Dense(8, 1, rng=1)])
    good = []

    class LastGood(C.Callback):
        def on_batch_end(self, batch, logs=None):
            if math.isfinite(logs["loss"]):
                good.append(self.model.state_dict())

    nan = C.TerminateOnNaN()
    hist = training.fit(model, X, y, loss="mse", optimizer="sgd", lr=1e12, epochs=5,
                        batch_size=8, metrics=[], callbacks=[LastGood(), nan], verbose=0)
    epoch, step = nan.stopped_at
    assert len(hist) == epoch  # the interrupted epoch is not logged
    out = capsys.readouterr().out
    assert f"at epoch {epoch + 1}, step {step + 1}" in out and "skipped" in out
    for k, v in model.state_dict().items():
        assert np.isfinite(v).all()
        np.testing.assert_array_equal(v, good[-1][k])


def test_learning_rate_scheduler_function_and_objects(moons):
    X, y = moons
    hist = training.fit(mlp(), X, y, loss="cross_entropy", epochs=3, lr=0.1, verbose=0,
                        callbacks=[C.LearningRateScheduler(lambda e, lr: 0.1 / (e + 1))])
    assert hist.history["lr"] == pytest.approx([0.1, 0.05, 0.1 / 3])

    model = mlp()
    opt = SGD(model.parameters(), lr=0.2)
    hist = training.fit(model, X, y, loss="cross_entropy", optimizer=opt, epochs=4, verbose=0,
                        scheduler=schedules.StepLR(opt, step_size=2, gamma=0.5))
    assert hist.history["lr"] == pytest.approx([0.2, 0.2, 0.1, 0.1])

    model = mlp()
    opt = SGD(model.parameters(), lr=0.2)
    # a relative threshold of 10 means no val_loss ever counts as an improvement
    plateau = schedules.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10)
    seen = []
    plateau_step = plateau.step
    plateau.step = lambda metric: (seen.append(metric), plateau_step(metric))
    hist = training.fit(model, X, y, loss="cross_entropy", optimizer=opt, epochs=4, verbose=0,
                        validation_split=0.25, callbacks=[C.LearningRateScheduler(plateau)])
    assert hist.history["lr"] == pytest.approx([0.2, 0.1, 0.05, 0.025])
    assert seen == hist.history["val_loss"]


def test_csv_logger_and_history_exports(moons, tmp_path):
    X, y = moons
    path = tmp_path / "log.csv"
    hist = training.fit(mlp(), X, y, loss="cross_entropy", epochs=2, verbose=0,
                        callbacks=[C.CSVLogger(path)])
    training.fit(mlp(), X, y, loss="cross_entropy", epochs=3, initial_epoch=2, verbose=0,
                 callbacks=[C.CSVLogger(path, append=True)])
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["epoch", "loss", "accuracy", "lr", "time", "samples_per_s"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert float(rows[1][1]) == pytest.approx(hist.history["loss"][0])

    hist.to_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["loss"] == hist.history["loss"]
    assert C.History.from_json(tmp_path / "h.json").history == hist.history
    hist.to_csv(tmp_path / "h.csv")
    table = list(csv.DictReader((tmp_path / "h.csv").read_text().splitlines()))
    assert [float(r["accuracy"]) for r in table] == pytest.approx(hist.history["accuracy"])


def test_progress_output(moons, capsys):
    X, y = moons
    training.fit(mlp(), X, y, loss="cross_entropy", epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    training.fit(mlp(), X, y, loss="cross_entropy", epochs=2, verbose=1)  # stdout is no tty
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("Epoch 2/2:") and "samples/s" in lines[1]
    assert "loss" in lines[1] and "accuracy" in lines[1]
    assert re.match(r"Epoch 2/2: [\d.]+ m?s, [\d,]+ samples/s - ", lines[1]), lines[1]


def test_epoch_times_are_shown_in_a_readable_unit():
    assert [C._format_seconds(t) for t in (0.0034, 0.25, 1.0, 12.345)] == [
        "3.4 ms", "250 ms", "1.00 s", "12.35 s"]


class FakeTTY(stdio.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal():
    out = FakeTTY()
    bar = C.ProgressBar(verbose=1, peek=lambda: {"loss": 0.5, "accuracy": 0.75}, refresh_s=0.0,
                        file=out)
    bar.set_context(None, None, None, {"epochs": 3, "samples": 20})
    bar.on_epoch_begin(0)
    for step in range(2):
        bar.on_batch_end(step, {"size": 10, "loss": 0.5})
    bar.on_epoch_end(0, {"loss": 0.4, "accuracy": 0.8, "time": 0.1, "samples_per_s": 200.0})
    text = out.getvalue()
    assert "Epoch 1/3" in text and "20/20" in text and "sample/s" in text
    assert "accuracy 0.75" in text and "accuracy 0.8" in text
