"""Callbacks: hook order, EarlyStopping, ModelCheckpoint, TerminateOnNaN, schedules, logging."""
from __future__ import annotations

import csv
import io as stdio
import json
import math
import os
import re
import warnings

import numpy as np
import pytest

from backprop import callbacks as C
from backprop import data, io, schedules, training
from backprop.layers import Dense
from backprop.model import Sequential
from backprop.optim import SGD

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


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
    # the interrupted epoch is recorded (as in Keras), with the loss that stopped it; this
    # needs fit to call on_epoch_end for it (the training.py side of issue 16 §3)
    assert len(hist) == epoch + 1 and hist.epoch[-1] == epoch
    assert not math.isfinite(hist.history["loss"][-1])
    assert all(len(v) == len(hist) for v in hist.history.values())
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



# ---------------------------------------------------------------------------------------
# Callbacks check what they need at the start of fit, before any step (issue 16 §3)
class StepCounter(C.Callback):
    def __init__(self):
        self.steps = 0

    def on_batch_end(self, batch, logs=None):
        self.steps += 1


def fit_fails_before_any_step(moons, callbacks, error, match, **kw):
    """Run fit with ``callbacks``: it must raise ``error`` before the first step, leaving
    the weights untouched."""
    X, y = moons
    model, counter = mlp(), StepCounter()
    before = model.state_dict()
    with pytest.raises(error, match=match):
        training.fit(model, X, y, loss="cross_entropy", epochs=2, verbose=0,
                     callbacks=[counter, *callbacks], **kw)
    assert counter.steps == 0
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_checkpoint_pattern_fields_are_checked_against_the_logged_keys(moons, tmp_path):
    ck = C.ModelCheckpoint(tmp_path / "ck-{val_loss:.3f}.npz")
    fit_fails_before_any_step(moons, [ck], ValueError,
                              r"\{val_loss\}.*not log.*validation_data.*epoch, loss, accuracy")
    fit_fails_before_any_step(moons, [C.ModelCheckpoint(tmp_path / "{val_acc}.npz")],
                              ValueError, r"\{val_acc\}")
    assert list(tmp_path.iterdir()) == []
    X, y = moons  # the same pattern works with validation data
    training.fit(mlp(), X, y, loss="cross_entropy", epochs=1, verbose=0, callbacks=[ck],
                 validation_split=0.25)
    assert re.fullmatch(r"ck-\d+\.\d{3}\.npz", os.path.basename(ck.last_saved))


@pytest.mark.parametrize("pattern, match", [
    ("ck-{loss:.3q}.npz", r"format spec '\.3q' of \{loss\}.*float"),
    ("ck-{epoch:.3s}.npz", r"format spec '\.3s' of \{epoch\}.*int"),
    ("ck-{loss:d}.npz", r"format spec 'd' of \{loss\}"),
    ("ck-{}.npz", r"field \{\}.*name a log key"),
    ("ck-{0}.npz", r"field \{0\}"),
    ("ck-{loss.real}.npz", r"field \{loss\.real\}"),
    ("ck-{loss.npz", r"not a valid str\.format pattern"),
    ("ck-{loss:{width}}.npz", "nested"),
])
def test_checkpoint_pattern_is_checked_when_built(pattern, match):
    with pytest.raises(ValueError, match=match):
        C.ModelCheckpoint(pattern)


def test_arguments_are_checked_when_built():
    for make, error, match in [
        (lambda: C.EarlyStopping(patience=-1), ValueError, "patience must be an integer >= 0"),
        (lambda: C.EarlyStopping(patience=1.5), TypeError, "patience"),
        (lambda: C.EarlyStopping(min_delta=-0.1), ValueError, "min_delta"),
        (lambda: C.EarlyStopping(min_delta=math.nan), ValueError, "min_delta"),
        (lambda: C.EarlyStopping(monitor=""), ValueError, "monitor"),
        (lambda: C.EarlyStopping(monitor=None), TypeError, "monitor"),
        (lambda: C.EarlyStopping(mode="up"), ValueError, "mode='up'"),
        (lambda: C.EarlyStopping(restore_best_weights="yes"), TypeError, "restore_best"),
        (lambda: C.ModelCheckpoint("m.npz", mode="lowest"), ValueError, "mode"),
        (lambda: C.ModelCheckpoint("m.npz", save_best_only=1), TypeError, "save_best_only"),
        (lambda: C.ModelCheckpoint(42), TypeError, "path"),
        (lambda: C.CSVLogger("log.csv", separator=";;"), ValueError, "one character"),
        (lambda: C.CSVLogger("log.csv", append="no"), TypeError, "append"),
        (lambda: C.LearningRateScheduler(lambda e, lr: lr, verbose=-1), ValueError, "verbose"),
    ]:
        with pytest.raises(error, match=match):
            make()
    assert C.EarlyStopping(verbose=True).verbose == 1


def test_monitors_are_checked_at_the_start_of_fit(moons):
    fit_fails_before_any_step(moons, [C.EarlyStopping("val_loss")], ValueError,
                              "EarlyStopping monitors 'val_loss'.*validation_data")
    fit_fails_before_any_step(moons, [C.ModelCheckpoint("m.npz", save_best_only=True)],
                              ValueError, "ModelCheckpoint monitors 'val_loss'")
    fit_fails_before_any_step(moons, [C.EarlyStopping("accuracy")], ValueError,
                              "'accuracy'.*logged keys", metrics=[])
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    plateau = C.LearningRateScheduler(schedules.ReduceLROnPlateau(opt, mode="max"),
                                      monitor="val_accuracy")
    fit_fails_before_any_step(moons, [plateau], ValueError,
                              "ReduceLROnPlateau.*monitors 'val_accuracy'.*validation_data")
    X, y = moons
    with pytest.warns(UserWarning, match="mode='min'.*'val_accuracy'.*pass mode='max'"):
        training.fit(model, X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0,
                     validation_split=0.25, callbacks=[C.LearningRateScheduler(
                         schedules.ReduceLROnPlateau(opt), monitor="val_accuracy")])
    with warnings.catch_warnings(record=True) as caught:  # the default monitor falls back
        warnings.simplefilter("always")                     # to loss, as documented
        training.fit(model, X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0,
                     callbacks=[C.LearningRateScheduler(schedules.ReduceLROnPlateau(opt))])
    assert not [w for w in caught if "LearningRateScheduler" in str(w.message)]


def test_paths_are_checked_at_the_start_of_fit(moons, tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such"
    fit_fails_before_any_step(moons, [C.CSVLogger(missing / "log.csv")], FileNotFoundError,
                              "directory .* does not exist; create it first")
    fit_fails_before_any_step(moons, [C.ModelCheckpoint(missing / "e{epoch}.npz")],
                              FileNotFoundError, "does not exist")
    fit_fails_before_any_step(moons, [C.CSVLogger(tmp_path)], IsADirectoryError,
                              "is a directory")
    real_access = os.access  # root may write anywhere: make tmp_path read-only by decree
    monkeypatch.setattr(C.os, "access", lambda path, mode: (
        False if str(path).startswith(str(tmp_path)) else real_access(path, mode)))
    fit_fails_before_any_step(moons, [C.ModelCheckpoint(tmp_path / "m.npz")], PermissionError,
                              "not writable")


def test_a_failed_start_leaves_an_existing_log_as_it_was(moons, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n1,0.5\n")
    fit_fails_before_any_step(moons, [C.CSVLogger(path), C.EarlyStopping("val_loss")],
                              ValueError, "EarlyStopping")
    assert path.read_text() == "epoch,loss\n1,0.5\n"


def test_appending_under_a_different_header_warns(moons, tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss,lr\n1,0.5,0.1\n")
    X, y = moons
    with pytest.warns(UserWarning, match="columns.*existing header"):
        training.fit(mlp(), X, y, loss="cross_entropy", epochs=1, verbose=0,
                     callbacks=[C.CSVLogger(path, append=True)])
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["epoch", "loss", "lr"] and len(rows) == 3 and len(rows[2]) == 3


# ---------------------------------------------------------------------------------------
# An epoch stopped mid-way gets on_epoch_end with its running logs (loss may be NaN, val_*
# may be missing). These drive the hooks as fit does, so they do not depend on the loop.
LOG_KEYS = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "samples_per_s"]


def full_logs(loss, val_loss, lr=0.1):
    return {"loss": loss, "accuracy": 0.5, "val_loss": val_loss, "val_accuracy": 0.5,
            "lr": lr, "time": 0.01, "samples_per_s": 4800.0}


def drive(callbacks, epochs, model=None, opt=None):
    """Run the hooks of ``fit`` over ``epochs``: a list of (step losses, epoch logs); a
    TerminateOnNaN stops an epoch at its first non-finite step loss, as in fit."""
    model = model or mlp()
    opt = opt or SGD(model.parameters(), lr=0.1)
    hist = C.History()
    params = {"epochs": len(epochs), "initial_epoch": 0, "steps": 3, "samples": 48,
              "batch_size": 16, "verbose": 0, "seed": 0, "log_keys": LOG_KEYS}
    scheduler = next((cb.schedule for cb in callbacks if isinstance(cb, C.LearningRateScheduler)
                      and cb.is_scheduler), None)
    cbs = C.CallbackList([hist, C.TerminateOnNaN(), *callbacks], model, opt, scheduler,
                         params)
    model.stop_training = False
    cbs.on_train_begin()
    for epoch, (losses, logs) in enumerate(epochs):
        cbs.on_epoch_begin(epoch)
        for step, loss in enumerate(losses):
            cbs.on_batch_begin(step, {"batch": step, "size": 16})
            cbs.on_batch_end(step, {"batch": step, "size": 16, "loss": loss})
            if model.stop_training:
                break
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end(hist.last())
    return hist, model, opt


# the running logs of the stopped epoch: as the brief describes them (train keys only), and
# as a loop that also validates the stopped epoch would pass them (every key, loss NaN)
PARTIAL = {"train keys only": {"loss": math.nan, "accuracy": 0.5},
           "every key": full_logs(math.nan, 0.2)}


@pytest.mark.parametrize("partial", list(PARTIAL))
def test_an_epoch_stopped_mid_way_is_recorded_by_history_and_csv(tmp_path, capsys, partial):
    path = tmp_path / "log.csv"
    bar = C.ProgressBar(verbose=2, file=stdio.StringIO())
    hist, _, _ = drive([C.CSVLogger(path), bar],
                       [([0.5, 0.4, 0.3], full_logs(0.4, 0.3)),
                        ([0.3, math.nan], PARTIAL[partial])])
    capsys.readouterr()
    assert hist.epoch == [0, 1] and all(len(v) == 2 for v in hist.history.values())
    assert hist.history["loss"][0] == 0.4 and math.isnan(hist.history["loss"][1])
    assert hist.last()["loss"] != hist.last()["loss"]  # NaN
    if partial == "train keys only":
        assert math.isnan(hist.history["val_loss"][1])
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["epoch", *LOG_KEYS] and len(rows) == 3
    assert rows[2][:2] == ["2", "nan"]
    if partial == "train keys only":
        assert rows[2][3:] == ["", "", "", "", ""]  # val_*, lr, time, samples_per_s: empty
    assert bar.file.getvalue().count("Epoch ") == 2 and "loss nan" in bar.file.getvalue()


@pytest.mark.parametrize("partial", list(PARTIAL))
def test_an_epoch_stopped_mid_way_is_not_saved_counted_or_stepped(tmp_path, capsys, partial):
    best = C.ModelCheckpoint(tmp_path / "best.npz", monitor="loss", save_best_only=True)
    every = C.ModelCheckpoint(tmp_path / "e{epoch}-{val_loss:.2f}.npz")
    stopper = C.EarlyStopping("val_loss", patience=0)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    step_lr = C.LearningRateScheduler(schedules.StepLR(opt, step_size=1, gamma=0.5))
    hist, _, _ = drive([step_lr, best, every, stopper],
                       [([0.5, 0.4, 0.3], full_logs(0.4, 0.3)),
                        ([0.3, math.nan], PARTIAL[partial])], model, opt)
    capsys.readouterr()
    assert len(hist) == 2
    assert io.load_checkpoint(tmp_path / "best.npz").epoch == 1  # NaN is never "best"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "e1-0.30.npz"]
    assert stopper.wait == 0 and stopper.stopped_epoch is None and stopper.best_epoch == 0
    assert step_lr.schedule.last_epoch == 1  # stepped after the complete epoch only


def test_a_nan_monitored_value_is_never_best(tmp_path):
    best = C.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
    stopper = C.EarlyStopping("val_loss", patience=5)
    drive([best, stopper], [([0.5, 0.4, 0.3], full_logs(0.4, math.nan)),
                            ([0.3, 0.3, 0.3], full_logs(0.3, 0.7)),
                            ([0.3, 0.3, 0.3], full_logs(0.3, math.inf))])
    assert io.load_checkpoint(tmp_path / "best.npz").epoch == 2
    assert stopper.best_epoch == 1 and stopper.wait == 1


def test_terminate_on_nan_in_the_first_epoch_with_logging_callbacks(tmp_path, capsys):
    X, y = data.regression(n=64, features=3, seed=0)
    model = Sequential([Dense(3, 8, activation="relu", rng=0), Dense(8, 1, rng=1)])
    path, ck = tmp_path / "log.csv", C.ModelCheckpoint(tmp_path / "m.npz")
    hist = training.fit(model, X, y, loss="mse", optimizer="sgd", lr=1e12, epochs=5,
                        batch_size=8, metrics=[], verbose=0,
                        callbacks=[C.TerminateOnNaN(), C.CSVLogger(path), ck])
    capsys.readouterr()
    # needs fit to call on_epoch_end for the stopped epoch (the training.py side)
    assert len(hist) == 1 and not math.isfinite(hist.history["loss"][0])
    rows = list(csv.reader(path.read_text().splitlines()))
    assert len(rows) == 2 and rows[1][0] == "1" and not math.isfinite(float(rows[1][1]))
    assert ck.last_saved is None and not (tmp_path / "m.npz").exists()
