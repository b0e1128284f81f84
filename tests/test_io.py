"""Checkpoints: bitwise round trips, exact resume, atomic writes, one error for bad files."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks as C
from backprop import data, io, schedules, training
from backprop.io import CheckpointError
from backprop.layers import BatchNorm1d, Dense, Dropout
from backprop.model import Sequential
from backprop.optim import Adam


def mlp(seed=0, extras=False):
    rng = np.random.default_rng(seed)
    layers = [Dense(2, 8, activation="relu", rng=rng)]
    if extras:
        layers += [BatchNorm1d(8), Dropout(0.2, seed=3)]
    return Sequential(layers + [Dense(8, 2, rng=rng)])


@pytest.fixture(scope="module")
def moons():
    X, y = data.two_moons(n=64, noise=0.1, seed=0)
    return data.standardize(X), y


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def test_round_trip_is_bitwise(device, moons, tmp_path):
    X, y = moons
    model = mlp(extras=True)
    opt = Adam(model.parameters(), lr=0.01)
    sched = schedules.StepLR(opt, step_size=1, gamma=0.5)
    training.fit(model, X, y, loss="cross_entropy", optimizer=opt, scheduler=sched, epochs=2,
                 batch_size=16, seed=0, verbose=0)
    extra = {"classes": ["a", "b"], "mean": np.array([0.5, 2.0]), "note": None}
    path = io.save(model, tmp_path / "m.npz", optimizer=opt, epoch=2, scheduler=sched,
                   extra=extra)
    ckpt = io.load_checkpoint(path)
    assert ckpt.epoch == 2 and ckpt.meta["library_version"] == bp.__version__
    assert_same_state(ckpt.model.state_dict(), model.state_dict())
    assert ckpt.model.config() == model.config()
    saved, loaded = opt.state_dict(), ckpt.optimizer.state_dict()
    assert loaded["step"] == saved["step"] and loaded["hyper"] == saved["hyper"]
    assert_same_state(loaded["state"], saved["state"])
    assert ckpt.scheduler.state_dict() == sched.state_dict() and ckpt.optimizer.lr == opt.lr
    assert ckpt.extra["classes"] == ["a", "b"] and ckpt.extra["note"] is None
    np.testing.assert_array_equal(ckpt.extra["mean"], extra["mean"])
    model.eval()
    ckpt.model.eval()
    np.testing.assert_array_equal(bp.to_numpy(model(X)), bp.to_numpy(ckpt.model(X)))
    assert isinstance(bp.load(path) if hasattr(bp, "load") else io.load(path), Sequential)


def test_loads_on_another_device(device, moons, tmp_path):
    """Arrays are stored as NumPy: a checkpoint written on one device loads on every other."""
    from conftest import DEVICES, skip_unless_device

    model = mlp()
    io.save(model, tmp_path / "m.npz")
    for target in DEVICES:
        if target == device.kind:
            continue
        skip_unless_device(target)
        loaded = io.load(tmp_path / "m.npz", device=target)
        assert bp.get_array_module(loaded[0].W.data) is bp.Device(target).xp
        assert_same_state(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("extras", [False, True], ids=["dense", "batchnorm-dropout"])
def test_resume_reproduces_the_uninterrupted_run(device, moons, tmp_path, extras):
    """Dropout's mask counter and BatchNorm's running statistics are in the checkpoint, so
    the resumed run draws the same masks and sees the same state as the uninterrupted one."""
    X, y = moons

    def setup():
        model = mlp(seed=4, extras=extras)
        opt = Adam(model.parameters(), lr=0.02)
        return model, opt, schedules.StepLR(opt, step_size=1, gamma=0.7)

    model, opt, sched = setup()
    full = training.fit(model, X, y, loss="cross_entropy", optimizer=opt, scheduler=sched,
                        epochs=4, batch_size=10, seed=11, verbose=0)

    first, opt1, sched1 = setup()
    training.fit(first, X, y, loss="cross_entropy", optimizer=opt1, scheduler=sched1, epochs=2,
                 batch_size=10, seed=11, verbose=0,
                 callbacks=[C.ModelCheckpoint(tmp_path / "ckpt.npz")])
    ckpt = io.load_checkpoint(tmp_path / "ckpt.npz")
    assert ckpt.epoch == 2
    rest = training.fit(ckpt.model, X, y, loss="cross_entropy", optimizer=ckpt.optimizer,
                        scheduler=ckpt.scheduler, epochs=4, initial_epoch=ckpt.epoch,
                        batch_size=10, seed=11, verbose=0)
    assert rest.epoch == [2, 3]
    assert rest.history["loss"] == full.history["loss"][2:]
    assert rest.history["lr"] == full.history["lr"][2:]
    assert_same_state(ckpt.model.state_dict(), model.state_dict())
    assert_same_state(ckpt.optimizer.state_dict()["state"], opt.state_dict()["state"])


def good_checkpoint(tmp_path):
    path = tmp_path / "good.npz"
    model = mlp()
    io.save(model, path, optimizer=Adam(model.parameters()), epoch=3)
    return path, model.state_dict()


def write_variant(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make", ["empty", "truncated", "corrupted", "text"])
def test_unreadable_files_raise_checkpoint_error(tmp_path, make):
    path, state = good_checkpoint(tmp_path)
    raw = path.read_bytes()
    if make == "empty":
        content = b""
    elif make == "truncated":
        content = raw[:len(raw) // 2]
    elif make == "corrupted":  # flip bytes inside the largest weight array: CRC mismatch
        with zipfile.ZipFile(path) as z:
            info = max((i for i in z.infolist() if i.filename.startswith("model/")),
                       key=lambda i: i.file_size)
        mid = info.header_offset + 30 + len(info.filename) + len(info.extra) + \
            info.file_size // 2
        content = raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 8]) + raw[mid + 8:]
    else:
        content = b"weights,0.1,0.2\n"
    bad = write_variant(tmp_path, f"{make}.npz", content)
    with pytest.raises(CheckpointError, match=f"{make}.npz") as err:
        io.load_checkpoint(bad)
    assert make != "corrupted" or "CRC" in str(err.value)
    assert path.read_bytes() == raw  # the good checkpoint is untouched and still loads
    assert_same_state(io.load(path).state_dict(), state)


def test_wrong_version_and_foreign_archives(tmp_path, monkeypatch):
    path, _ = good_checkpoint(tmp_path)
    monkeypatch.setattr(io, "FORMAT_VERSION", 99)
    io.save(mlp(), tmp_path / "future.npz")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1"):
        io.load(tmp_path / "future.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a backprop checkpoint"):
        io.load(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "missing.npz")
    io.load(path)


def test_missing_entries_and_pickled_arrays_are_rejected(tmp_path):
    path, _ = good_checkpoint(tmp_path)
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    meta = json.loads(entries["__meta__"].tobytes())
    dropped = dict(entries)
    del dropped[meta["arrays"][0]]
    np.savez(tmp_path / "incomplete.npz", **dropped)
    with pytest.raises(CheckpointError, match="missing"):
        io.load(tmp_path / "incomplete.npz")
    name = "model/0.W"
    pickled = dict(entries, **{name: np.array([{"evil": 1}], dtype=object)})
    np.savez(tmp_path / "pickled.npz", **pickled)  # loading it would need allow_pickle=True
    with pytest.raises(CheckpointError, match="pickle"):
        io.load(tmp_path / "pickled.npz")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path, state = good_checkpoint(tmp_path)
    before = path.read_bytes()
    real, calls = np.lib.format.write_array, []

    def fail_midway(fp, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", fail_midway)
    with pytest.raises(OSError, match="No space"):
        io.save(mlp(seed=9), path, epoch=4)
    monkeypatch.undo()
    assert len(calls) == 3  # two arrays were written before the failure
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]  # no temporary file left behind
    ckpt = io.load_checkpoint(path)
    assert ckpt.epoch == 3
    assert_same_state(ckpt.model.state_dict(), state)


def test_save_writes_exactly_the_named_file(tmp_path):
    io.save(mlp(), tmp_path / "model")  # np.savez would have appended .npz
    assert os.listdir(tmp_path) == ["model"]
    io.load(tmp_path / "model")
    with pytest.raises(TypeError, match="cannot store object"):
        io.save(mlp(), tmp_path / "x.npz", extra={"bad": object()})


def test_layer_counters_round_trip_and_tolerate_old_checkpoints():
    model = mlp(extras=True)
    model[2].counter = 7
    state = model.state_dict()
    assert state["2.counter"].dtype == np.int64 and int(state["2.counter"]) == 7
    fresh = mlp(extras=True)
    fresh.load_state_dict(state)
    assert fresh[2].counter == 7
    del state["2.counter"]  # a checkpoint written before counters were saved
    fresh[2].counter = 3
    fresh.load_state_dict(state)
    assert fresh[2].counter == 3
    state["2.counter"] = np.array(1.5)
    with pytest.raises(ValueError, match="2.counter.*integer"):
        fresh.load_state_dict(state)
