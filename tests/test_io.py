"""Checkpoints: bitwise round trips, exact resume, atomic writes, one error for bad files,
exactly what was saved in ``extra``, and nothing written unless everything can be."""
from __future__ import annotations

import collections
import enum
import errno
import json
import os
import pathlib
import stat
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks as C
from backprop import data, io, optim, schedules, training
from backprop.io import CheckpointError
from backprop.layers import BatchNorm1d, Dense, Dropout
from backprop.model import Sequential
from backprop.optim import Adam

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


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
    with pytest.raises(CheckpointError, match="format version 99.*reads versions 1, 2"):
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


# ---------------------------------------------------------------------------------------
# A save either succeeds completely or changes nothing; a load returns what was saved.
def assert_identical(a, b, where="extra"):
    """``b`` equals ``a`` with the same types all the way down: list vs tuple, int vs float
    vs bool, NumPy scalar dtypes, array dtypes and shapes, dict key order, -0.0 and NaN."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)!r} came back as {list(b)!r}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} came back as {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {a.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
        if a.dtype.kind == "f":
            assert np.array_equal(np.signbit(a), np.signbit(b)), f"{where}: sign of zero"
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, f"{where}: {a!r} came back as {b!r}"
        if isinstance(a, float):
            assert str(a) == str(b), where  # -0.0 stays -0.0


def every_kind_of_extra():
    """One of everything ``extra`` may hold, including keys that look like the format's own
    entry names and markers, and keys that would collide if paths were joined with '/'."""
    return {
        "int": 3, "big": 2 ** 100, "neg": -7, "float": 0.1, "negzero": -0.0,
        "inf": float("inf"), "nan": float("nan"), "complex": 1.5 - 2j, "true": True,
        "false": False, "none": None, "text": "naïve – 日本語 🙂", "surrogate": "\ud800",
        "empty_str": "", "list": [1, "a", None], "tuple": (1, (2.0, [3])),
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "np_scalars": [np.float32(1.5), np.int8(-3), np.bool_(True), np.str_("é"),
                       np.complex64(1j), np.uint64(2 ** 64 - 1), np.float64(0.25)],
        "arrays": {
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "zero_d": np.array(2.5),
            "bool": np.array([True, False]), "unicode": np.array(["a", "ü", "日本"]),
            "complex": np.array([1 + 2j]), "big_endian": np.arange(3, dtype=">i4"),
            "empty": np.zeros((0, 3)), "nan": np.array([np.nan, -0.0]),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            "zero_d_str": np.array("ß"), "f16": np.array([1.5], dtype=np.float16)},
        "keys": {"": 1, ".": 2, "..": 3, "a/b": np.array([4]), "a": {"b": np.array([5])},
                 "x.npy": 6, "__meta__": 7, "model/0.W": np.array([8]), "nul\x00": 9,
                 "back\\slash": 10, "ключ": 11, "k" * 300: np.array([12]), "\ud800": 13,
                 "0": [14], "extra/0": np.array([15])},
        "markers": [{"__array__": "model/0.W"}, {"__tuple__": [1]}, {"__dict__": {}},
                    {"__complex__": [1, 2]}, {"__scalar__": "extra/0"},
                    {"__array__": 1, "other": 2}, {"__dict__": {"__tuple__": []}}],
    }


def test_extra_round_trips_exactly(tmp_path):
    extra = every_kind_of_extra()
    model = mlp()
    path = io.save(model, tmp_path / "m.npz", extra=extra)
    assert_identical(extra, io.load_checkpoint(path).extra)
    with np.load(path, allow_pickle=False) as z:  # every entry loads without pickle
        assert all(z[k].dtype != object for k in z.files)


def test_keys_that_collide_when_joined_with_a_slash_stay_apart(tmp_path):
    """``{"a/b": x, "a": {"b": y}}`` once stored both arrays under one entry ``extra/a/b``,
    and a dict that looked like an array reference came back as the model's weight."""
    extra = {"a/b": np.array([1.0]), "a": {"b": np.array([2.0])},
             "fake": {"__array__": "model/0.W"}}
    ckpt = io.load_checkpoint(io.save(mlp(), tmp_path / "m.npz", extra=extra))
    assert_identical(extra, ckpt.extra)


def test_device_arrays_in_extra_load_as_numpy(device, tmp_path):
    xp = device.xp
    path = io.save(mlp(), tmp_path / "m.npz", extra={"w": xp.arange(3.0), "s": xp.asarray(2)})
    extra = io.load_checkpoint(path).extra
    assert type(extra["w"]) is np.ndarray and type(extra["s"]) is np.ndarray
    np.testing.assert_array_equal(extra["w"], np.arange(3.0))
    assert extra["s"].shape == () and int(extra["s"]) == 2


class _Color(enum.IntEnum):
    RED = 1


def _cycle():
    items = [1]
    items.append(items)
    return {"loop": items}


def _deep(levels):
    value = 0
    for _ in range(levels):
        value = [value]
    return {"deep": value}


@pytest.mark.parametrize("extra, error, match", [
    ({"labels": np.array(["a", "b"], dtype=object)}, TypeError,
     r"object array .*extra\['labels'\].*astype\(str\)"),
    ({"a": {"b": [1, 2, b"raw"]}}, TypeError, r"bytes at extra\['a'\]\['b'\]\[2\]"),
    ({"s": {1, 2}}, TypeError, r"set at extra\['s'\].*list"),
    ({"f": print}, TypeError, r"extra\['f'\]"),
    ({"d": {1: "x"}}, TypeError, r"key 1 \(int\) of extra\['d'\].*str"),
    ({1: "x"}, TypeError, r"key 1 \(int\) of extra\b"),
    ({"m": np.ma.masked_array([1, 2], mask=[0, 1])}, TypeError, r"MaskedArray.*extra\['m'\]"),
    ({"S": np.array([b"a"])}, TypeError, r"dtype.*S1.*extra\['S'\]"),
    ({"rec": np.zeros(2, dtype=[("x", "f8")])}, TypeError, r"extra\['rec'\]"),
    ({"t": np.array(["2020-01-01"], dtype="datetime64[D]")}, TypeError, r"extra\['t'\]"),
    ({"v": np.bytes_(b"x")}, TypeError, r"extra\['v'\]"),
    ({"o": collections.OrderedDict(a=1)}, TypeError, r"OrderedDict at extra\['o'\].*dict\("),
    ({"e": _Color.RED}, TypeError, r"_Color at extra\['e'\].*int\("),
    ({"p": pathlib.Path("x")}, TypeError, r"extra\['p'\].*str\("),
    (_cycle(), ValueError, r"extra\['loop'\]\[1\] contains itself"),
    (_deep(200), ValueError, r"nested deeper than"),
    ({"huge": 10 ** 5000}, ValueError, r"extra\['huge'\].*digits.*str"),
], ids=["object-array", "bytes", "set", "function", "int-key", "top-int-key", "masked",
        "bytes-array", "structured", "datetime", "np-bytes", "ordered-dict", "int-enum", "path",
        "cycle", "too-deep", "huge-int"])
def test_invalid_extra_is_refused_before_anything_is_written(tmp_path, extra, error, match):
    path, state = good_checkpoint(tmp_path)
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        io.save(mlp(seed=5), path, epoch=9, extra=extra)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["good.npz"]
    assert io.load_checkpoint(path).epoch == 3


def test_extra_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match=r"extra must be a dict.*got list"):
        io.save(mlp(), tmp_path / "m.npz", extra=[("a", 1)])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("epoch, error", [(2.7, TypeError), (True, TypeError), ("3", TypeError),
                                          (-1, ValueError)])
def test_epoch_must_be_a_non_negative_integer(tmp_path, epoch, error):
    with pytest.raises(error, match="epoch"):
        io.save(mlp(), tmp_path / "m.npz", epoch=epoch)
    assert os.listdir(tmp_path) == []
    ckpt = io.load_checkpoint(io.save(mlp(), tmp_path / "m.npz", epoch=np.int64(3)))
    assert type(ckpt.epoch) is int and ckpt.epoch == 3


class MyAdam(Adam):
    """An optimizer class that load_checkpoint cannot find in backprop.optim."""


def test_optimizer_and_scheduler_that_load_could_not_restore_are_refused(tmp_path):
    """The optimizer is rebuilt on all of the model's parameters and the schedule on that
    optimizer: a save that load would refuse, or restore differently, fails up front."""
    path, _ = good_checkpoint(tmp_path)
    before = path.read_bytes()
    model = mlp()
    opt = Adam(model.parameters())
    cases = [
        (dict(optimizer=Adam(model.parameters()[:2])), ValueError, "2 of the model's 4"),
        (dict(optimizer=Adam(Sequential([Dense(3, 2)]).parameters())), ValueError,
         "parameters"),
        (dict(optimizer=MyAdam(model.parameters())), TypeError, "MyAdam.*backprop.optim"),
        (dict(scheduler=schedules.StepLR(opt, step_size=1)), ValueError,
         "scheduler.*without its optimizer"),
        (dict(optimizer=opt, scheduler=schedules.StepLR(Adam(model.parameters()), 1)),
         ValueError, "scheduler drives another optimizer"),
        (dict(optimizer="adam"), TypeError, "backprop optimizer"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            io.save(model, path, epoch=8, **kwargs)
        assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["good.npz"]
    # an optimizer of another model of the same architecture fits the rebuilt one
    twin = mlp(seed=1)
    io.save(model, path, optimizer=Adam(twin.parameters()))
    assert io.load_checkpoint(path).optimizer is not None


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_permissions_np_save_would_give(tmp_path, monkeypatch, mask):
    """0666 & ~umask, read from /proc/self/status where it exists: setting and restoring
    the umask to read it would race with other threads creating files."""
    old = os.umask(mask)
    try:
        if "Umask:" in _proc_status():
            monkeypatch.setattr(os, "umask", _no_umask)
        io.save(mlp(), tmp_path / "m.npz")
        np.save(tmp_path / "ref.npy", np.zeros(1))
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert _mode(tmp_path / "m.npz") == 0o666 & ~mask == _mode(tmp_path / "ref.npy")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_umask_fallback_without_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    old = os.umask(0o027)
    try:
        io.save(mlp(), tmp_path / "m.npz")
        assert os.umask(0o027) == 0o027  # restored after reading it
    finally:
        os.umask(old)
    assert _mode(tmp_path / "m.npz") == 0o640


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_replacing_a_file_keeps_its_permissions(tmp_path):
    """As with np.save, which truncates and rewrites the existing file in place."""
    path, _ = good_checkpoint(tmp_path)
    for mode in (0o640, 0o444):
        os.chmod(path, mode)
        io.save(mlp(seed=mode), path, epoch=mode)
        assert _mode(path) == mode and io.load_checkpoint(path).epoch == mode


def _proc_status():
    try:
        with open("/proc/self/status") as f:
            return f.read()
    except OSError:
        return ""


def _no_umask(*args):
    raise AssertionError("os.umask changes the umask of every thread: read it instead")


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_missing_directory_is_an_error_and_creates_nothing(tmp_path):
    target = tmp_path / "runs" / "x" / "m.npz"
    with pytest.raises(FileNotFoundError, match=r"directory .*runs.x.* does not exist.*makedirs"):
        io.save(mlp(), target)
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        io.save(mlp(), tmp_path / "file" / "m.npz")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_directory_is_neither_saved_over_nor_loaded(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    with pytest.raises(IsADirectoryError, match=r"is a directory.*file name such as"):
        io.save(mlp(), tmp_path / "d")
    assert os.listdir(tmp_path / "d") == ["keep"] and os.listdir(tmp_path) == ["d"]
    with pytest.raises(IsADirectoryError, match=r"is a directory.*model\.npz"):
        io.load(tmp_path / "d")
    with pytest.raises(IsADirectoryError, match="is a directory"):  # np.save refuses it too
        io.save(mlp(), f"{tmp_path}{os.sep}new{os.sep}")
    assert os.listdir(tmp_path) == ["d"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_special_file_is_not_replaced(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        io.save(mlp(), tmp_path / "pipe")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert os.listdir(tmp_path) == ["pipe"]


@pytest.mark.parametrize("path_type", [str, pathlib.Path, os.fsencode])
def test_paths_are_used_exactly_as_given(tmp_path, path_type):
    """No suffix is added or required on save or on load (unlike np.savez); the returned
    path is a str. A load of a name without .npz whose .npz sibling exists says so."""
    returned = io.save(mlp(), path_type(str(tmp_path / "model")))
    assert returned == str(tmp_path / "model") and os.listdir(tmp_path) == ["model"]
    io.load(path_type(str(tmp_path / "model")))
    io.save(mlp(), tmp_path / "net.npz")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*net'.*net\.npz"):
        io.load(tmp_path / "net")


@pytest.mark.parametrize("bad", [3, None, object(), 1.5])
def test_a_path_that_is_not_a_file_name_is_a_type_error(tmp_path, bad):
    with pytest.raises(TypeError, match="path must be a file name"):
        io.save(mlp(), bad)
    with pytest.raises(TypeError, match="path must be a file name"):
        io.load(bad)


def test_long_file_names_work(tmp_path):
    """The temporary file's name must fit the file system's limit when the target's does."""
    name = "m" * 250 + ".npz"
    io.save(mlp(), tmp_path / name, epoch=1)
    assert os.listdir(tmp_path) == [name] and io.load_checkpoint(tmp_path / name).epoch == 1


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_saving_to_a_symlink_replaces_its_target(tmp_path):
    """As np.save would write through the link; the link itself stays a link."""
    (tmp_path / "runs").mkdir()
    path, _ = good_checkpoint(tmp_path / "runs")
    os.symlink(path, tmp_path / "latest.npz")
    io.save(mlp(), tmp_path / "latest.npz", epoch=7)
    assert os.path.islink(tmp_path / "latest.npz")
    assert io.load_checkpoint(path).epoch == 7
    assert sorted(os.listdir(tmp_path / "runs")) == ["good.npz"]


@pytest.mark.parametrize("stage", ["write-full-disk", "write-interrupt", "fsync", "replace"])
def test_a_failure_at_any_stage_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path, monkeypatch, stage):
    path, state = good_checkpoint(tmp_path)
    before = path.read_bytes()
    exc = KeyboardInterrupt() if stage == "write-interrupt" else \
        OSError(errno.ENOSPC, "No space left on device")
    target = {"fsync": (os, "fsync"), "replace": (os, "replace")}.get(
        stage, (np.lib.format, "write_array"))

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(*target, fail)
    with pytest.raises(type(exc)):
        io.save(mlp(seed=9), path, epoch=4, extra={"x": np.arange(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["good.npz"]
    assert_same_state(io.load(path).state_dict(), state)


@pytest.mark.skipif(os.name != "posix", reason="Windows cannot replace a file being read")
def test_concurrent_saves_to_one_path_leave_one_complete_checkpoint(tmp_path):
    """Each save has its own temporary file: the last rename wins, and every rename
    installs a complete file."""
    path = tmp_path / "m.npz"
    models = [mlp(seed=i) for i in range(6)]
    barrier = threading.Barrier(len(models))
    errors = []

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                io.save(models[i], path, epoch=i, extra={"who": i})
                ckpt = io.load_checkpoint(path)  # whatever is there is complete
                assert ckpt.extra["who"] == ckpt.epoch
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ckpt = io.load_checkpoint(path)
    assert_same_state(ckpt.model.state_dict(), models[ckpt.epoch].state_dict())
    assert os.listdir(tmp_path) == ["m.npz"]


@pytest.mark.one_backend
def test_concurrent_saves_from_two_processes(tmp_path):
    script = ("import sys, numpy as np\n"
              "from backprop import io\n"
              "from backprop.layers import Dense\n"
              "from backprop.model import Sequential\n"
              "who = int(sys.argv[2])\n"
              "model = Sequential([Dense(2, 3, rng=np.random.default_rng(who))])\n"
              "for _ in range(15):\n"
              "    io.save(model, sys.argv[1], epoch=who, extra={'who': who})\n")
    path = tmp_path / "m.npz"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(i)])
             for i in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    ckpt = io.load_checkpoint(path)
    assert ckpt.extra == {"who": ckpt.epoch} and ckpt.epoch in (0, 1)
    assert os.listdir(tmp_path) == ["m.npz"]


def rewrite_meta(path, target, change):
    """Copy the checkpoint at ``path`` to ``target`` with ``change(meta)`` applied."""
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    meta = json.loads(entries["__meta__"].tobytes())
    change(meta)
    entries["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(target, **entries)
    return target


@pytest.mark.parametrize("change", [
    lambda m: m["extra"].update(x={"__array__": "extra/missing"}),
    lambda m: m["extra"].update(x={"__complex__": "nope"}),
    lambda m: m["extra"].update(x={"__scalar__": m["arrays"][0]}),
    lambda m: m.update(epoch="three"),
    lambda m: m.update(epoch=True),
    lambda m: m.update(extra=[1]),
    lambda m: m.update(arrays="model/0.W"),
], ids=["missing-array", "bad-complex", "scalar-not-0d", "epoch-str", "epoch-bool",
        "extra-list", "arrays-str"])
def test_malformed_meta_is_a_checkpoint_error(tmp_path, change):
    path = io.save(mlp(), tmp_path / "m.npz", epoch=1, extra={"y": np.arange(2)})
    bad = rewrite_meta(path, tmp_path / "bad.npz", change)
    with pytest.raises(CheckpointError, match="bad.npz"):
        io.load_checkpoint(bad)


def test_version_1_checkpoints_still_load(tmp_path):
    """Version 1 named array entries after their path in the state and had no tuples."""
    model = mlp()
    opt = Adam(model.parameters())
    entries = {f"model/{k}": v for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for k, v in state["state"].items():
        entries[f"optimizer/state/{k}"] = v
    meta = {"format": io.FORMAT, "format_version": 1, "library_version": "0.1",
            "model": model.config(), "weights": list(model.state_dict()), "epoch": 2,
            "optimizer": dict(state, state={k: {"__array__": f"optimizer/state/{k}"}
                                            for k in state["state"]}),
            "scheduler": None,
            "extra": {"mean": {"__array__": "extra/mean"}, "classes": ["a", "b"]}}
    entries["extra/mean"] = np.array([0.5, 1.5])
    meta["arrays"] = sorted(entries)
    entries["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(tmp_path / "v1.npz", **entries)
    ckpt = io.load_checkpoint(tmp_path / "v1.npz")
    assert ckpt.epoch == 2 and ckpt.extra["classes"] == ["a", "b"]
    np.testing.assert_array_equal(ckpt.extra["mean"], [0.5, 1.5])
    assert_same_state(ckpt.model.state_dict(), model.state_dict())
    assert_same_state(ckpt.optimizer.state_dict()["state"], state["state"])


SCHEDULES = [
    lambda opt: schedules.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: schedules.ExponentialLR(opt, gamma=0.9),
    lambda opt: schedules.LinearWarmup(opt, 3, after=schedules.CosineAnnealingLR(opt, T_max=4)),
    lambda opt: schedules.ReduceLROnPlateau(opt, patience=0),
]
OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: optim.RMSprop(ps, momentum=0.5, centered=True),
    "adam": lambda ps: optim.Adam(ps, betas=(0.8, 0.9), amsgrad=True),
    "adamw": lambda ps: optim.AdamW(ps), "adagrad": lambda ps: optim.Adagrad(ps)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_and_schedule_round_trips(tmp_path, moons, name):
    """Their states pass the same checks as extra, and come back as they were."""
    X, y = moons
    for make_schedule in SCHEDULES:
        model = mlp()
        opt = OPTIMIZERS[name](model.parameters())
        sched = make_schedule(opt)
        training.fit(model, X, y, loss="cross_entropy", optimizer=opt, epochs=1,
                     batch_size=32, seed=0, verbose=0)
        sched.step(*([1.0] if isinstance(sched, schedules.ReduceLROnPlateau) else []))
        ckpt = io.load_checkpoint(io.save(model, tmp_path / "m.npz", optimizer=opt,
                                          scheduler=sched))
        saved, loaded = opt.state_dict(), ckpt.optimizer.state_dict()
        assert saved["hyper"] == loaded["hyper"] and saved["step"] == loaded["step"]
        assert_same_state(saved["state"], loaded["state"])
        assert type(ckpt.scheduler) is type(sched)
        assert ckpt.scheduler.state_dict() == sched.state_dict()
