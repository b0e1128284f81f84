"""Property-based fuzzing of the public entry points (hypothesis).

The rule, for any arguments: the call succeeds, or it raises one of the documented
exception types (README, *Errors*) with a message; and when it raises, the model (its
parameters, buffers and counters), the optimizer and an existing checkpoint file are
exactly as they were. A raw ``KeyError``, ``AttributeError``, ``IndexError``... is a
failure, as is an error that changed something.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import backprop as bp  # noqa: E402
from backprop.backend import use_device  # noqa: E402
from backprop.layers import BatchNorm1d, Dense, Dropout  # noqa: E402
from backprop.model import Sequential  # noqa: E402

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

# what a caller may be given, besides success (README, "Errors"); NonFiniteLossError is a
# FloatingPointError and comes after some steps, so it is allowed to have changed weights
DOCUMENTED = (TypeError, ValueError, OSError)
SETTINGS = settings(max_examples=int(os.environ.get("BACKPROP_FUZZ_EXAMPLES", "120")),
                    deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

N_IN, N_OUT = 3, 2


def _model():
    with use_device("cpu"):
        return Sequential([Dense(N_IN, 6, activation="relu", rng=0), BatchNorm1d(6),
                           Dropout(0.1, seed=0), Dense(6, N_OUT, rng=1)])


def _state(model) -> dict:
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def _check_error(exc: BaseException) -> None:
    assert isinstance(exc, DOCUMENTED + (FloatingPointError,)), \
        f"undocumented exception {type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


# -- values -------------------------------------------------------------------------------
junk = st.sampled_from([None, "", "x", b"raw", object(), [], {}, (), math.nan, math.inf,
                        -1, 0, 1, 2.5, True, -3.0, 10**30, "auto", [None]])
small_ints = st.one_of(st.integers(-3, 4), st.sampled_from([1.0, 2.5, True, None, "2"]))


@st.composite
def arrays(draw, rows=None, cols=None, valid=False):
    """Mostly well-formed numeric data, sometimes not (wrong shape, dtype, NaN, lists);
    with ``valid``, finite float rows of ``N_IN`` features."""
    if valid:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        return rng.normal(size=(rows, N_IN)).astype(draw(st.sampled_from(["float32",
                                                                          "float64"])))
    n = draw(st.integers(0, 12)) if rows is None else rows
    # well-formed data half of the time, so that the calls get past the data checks
    kind = draw(st.sampled_from(["float32"] * 5 + ["float64"] * 3 + [
        "int64", "bool", "object", "str", "list", "scalar", "3d"]))
    shape = (n,) if cols == 0 else \
        (n, draw(st.sampled_from([cols or N_IN] * 4 + [1, 5])))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = rng.normal(size=shape)
    if draw(st.integers(0, 3)) == 0 and base.size:
        base.flat[draw(st.integers(0, base.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
    if kind in ("float32", "float64"):
        with np.errstate(over="ignore"):
            return base.astype(kind)
    if kind == "int64":
        return rng.integers(-1, 3, size=shape)
    if kind == "bool":
        return base > 0
    if kind == "object":
        return base.astype(object)
    if kind == "str":
        return base.astype(str)
    if kind == "list":
        return base.tolist()
    if kind == "scalar":
        return float(base.flat[0]) if base.size else 0.0
    return base.reshape(shape + (1,))


@st.composite
def labels(draw, n, valid=False):
    kind = "ok" if valid else \
        draw(st.sampled_from(["ok", "ok", "ok", "range", "float", "2d", "other"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "ok":
        return rng.integers(0, N_OUT, n)
    if kind == "range":
        return rng.integers(-2, N_OUT + 3, n)
    if kind == "float":
        return rng.normal(size=n)
    if kind == "2d":
        return rng.random((n, draw(st.sampled_from([N_OUT, 1, 4]))))
    return draw(st.one_of(junk, arrays(rows=draw(st.integers(0, 12)), cols=0)))


# -- fit ----------------------------------------------------------------------------------
VALID_FIT = {
    "loss": st.sampled_from(["cross_entropy", "cross_entropy", bp.SoftmaxCrossEntropyLoss()]),
    "optimizer": st.sampled_from(["adam", "sgd", "rmsprop", "adamw", "adagrad", "momentum"]),
    "lr": st.one_of(st.none(), st.floats(0, 0.5)),
    "epochs": st.integers(0, 3),
    "batch_size": st.integers(1, 16),
    "shuffle": st.booleans(),
    "drop_last": st.booleans(),
    "metrics": st.sampled_from(["auto", "accuracy", ["accuracy", "top_1_accuracy"], [], None]),
    "validation_split": st.sampled_from([0.0, 0.0, 0.25]),
    "seed": st.one_of(st.none(), st.integers(0, 5)),
    "initial_epoch": st.integers(0, 1),
}
INVALID_FIT = {
    "loss": st.sampled_from(["nll", "zzz", 3, None]),
    "optimizer": st.sampled_from(["nope", 1, None]),
    "lr": st.sampled_from([-0.1, math.nan, math.inf, "0.1"]),
    "epochs": st.sampled_from([-1, 1.0, 2.5, True, None, "2"]),
    "batch_size": st.sampled_from([0, -1, 1.0, True, None, "2"]),
    "shuffle": junk, "drop_last": junk,
    "metrics": st.sampled_from([["nope"], 7, "nope", [None]]),
    "validation_split": st.sampled_from([-0.1, 1.0, 1.5, math.nan, "0.2", True]),
    "seed": st.sampled_from([-1, 1.5, "1", True]),
    "initial_epoch": st.sampled_from([-1, 5, 0.5]),
    "verbose": st.sampled_from([3, -1, "1", None]),
    "callbacks": st.sampled_from([[print], "x", 3]),
    "validation_data": st.sampled_from([(), (1,), "xy", 3]),
}


@SETTINGS
@given(data=st.data())
def test_fit_succeeds_or_raises_a_documented_error_and_changes_nothing(
        data, kernels_for_both_devices):
    n = data.draw(st.integers(1, 12), label="rows")
    good = data.draw(st.integers(0, 2), label="how many arguments are bad") == 0
    valid_data = good or data.draw(st.booleans(), label="valid data")
    X = data.draw(arrays(rows=n, valid=valid_data), label="X")
    y = data.draw(labels(n, valid=valid_data), label="y")
    kwargs = data.draw(st.fixed_dictionaries({"verbose": st.just(0)}, optional=VALID_FIT),
                       label="valid kwargs")
    if not good:
        bad = data.draw(st.sampled_from(sorted(INVALID_FIT)), label="bad argument")
        kwargs[bad] = data.draw(INVALID_FIT[bad], label="bad value")
    kwargs.setdefault("loss", "cross_entropy")
    if kwargs.get("verbose") in (1, 2):
        kwargs["verbose"] = 0  # no progress bars in the fuzz output
    model = _model()
    before = _state(model)
    try:
        history = model.fit(X, y, **kwargs)
    except BaseException as exc:  # noqa: BLE001
        hypothesis.event(f"fit raised {type(exc).__name__}")
        _check_error(exc)
        if not isinstance(exc, FloatingPointError):
            _assert_same(before, _state(model))
        assert model.training
    else:  # success means the arguments were what they had to be, not silently converted
        hypothesis.event("fit trained")
        for name in ("epochs", "batch_size", "initial_epoch"):
            value = kwargs.get(name, 1)
            assert type(value) is int and value >= 0, (name, value)
        assert len(history) <= kwargs.get("epochs", 1) - kwargs.get("initial_epoch", 0)


# -- evaluate and predict -----------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_evaluate_and_predict_succeed_or_raise_a_documented_error(
        data, kernels_for_both_devices):
    valid = data.draw(st.booleans(), label="valid data")
    n = data.draw(st.integers(1, 12), label="rows")
    X = data.draw(arrays(rows=n, valid=valid) if valid else st.one_of(arrays(), junk),
                  label="X")
    n = len(X) if hasattr(X, "__len__") else 0
    y = data.draw(labels(n, valid=valid), label="y")
    batch_size = data.draw(st.one_of(st.integers(-2, 20), st.integers(1, 20), junk),
                           label="batch_size")
    loss = data.draw(st.sampled_from([None, "cross_entropy", "mse", "zzz"]), label="loss")
    metrics = data.draw(st.sampled_from(["auto", "accuracy", [], ["mae"], 7]), label="metrics")
    model = _model()
    before = _state(model)
    for call in (lambda: model.predict(X, batch_size=batch_size),
                 lambda: model.evaluate(X, y, loss=loss, metrics=metrics,
                                        batch_size=batch_size)):
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001
            hypothesis.event(f"raised {type(exc).__name__}")
            _check_error(exc)
        else:
            hypothesis.event("succeeded")
            assert type(batch_size) is int and batch_size >= 1, batch_size
            if isinstance(result, dict):
                assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
            else:
                assert result.shape == (len(X), N_OUT)
                assert np.isfinite(result).all()
        _assert_same(before, _state(model))  # inference never changes the model
        assert model.training


# -- save and load -------------------------------------------------------------------------
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
    st.complex_numbers(allow_nan=False, max_magnitude=1e9),
    st.sampled_from([np.float32(1.5), np.int16(-3), np.array(["a", "bé"]), np.zeros((2, 0)),
                     np.array(3.0), np.arange(4, dtype=np.uint8), np.array([1 + 2j])]),
    junk,  # includes things that cannot be saved (object(), bytes)
    st.sampled_from([np.array([None, 1], dtype=object), {1: "int key"}, {"s": {1, 2}},
                     np.datetime64("2026-01-01")]),
)
extras = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.sampled_from(["a", "a/b", "b", "__meta__", "__array__", "", "é/x"]),
                    inner, max_size=3)), max_leaves=8)


def _equal(a, b) -> bool:
    """Exact equality of saved and loaded values, types included (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and \
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, z) for x, z in zip(a, b))
    if isinstance(a, (float, np.floating)) and a != a:
        return b != b
    if isinstance(a, (complex, np.complexfloating)):
        return (a.real == b.real or a.real != a.real and b.real != b.real) and \
            (a.imag == b.imag or a.imag != a.imag and b.imag != b.imag)
    return a == b


@SETTINGS
@given(extra=st.dictionaries(st.sampled_from(["a", "a/b", "labels", "__meta__", "x"]),
                             extras, max_size=4) | junk,
       epoch=st.one_of(st.none(), st.integers(-1, 3), st.sampled_from([1.5, "2", True])),
       where=st.sampled_from(["file", "file", "missing_dir", "dir"]))
def test_save_succeeds_exactly_or_leaves_the_old_checkpoint(
        tmp_path_factory, kernels_for_both_devices, extra, epoch, where):
    root = tmp_path_factory.mktemp("ck")
    model = _model()
    path = root / "model.npz"
    bp.save(model, path, extra={"old": 1})
    old_bytes = path.read_bytes()
    target = {"file": path, "missing_dir": root / "nope" / "m.npz", "dir": root}[where]
    try:
        bp.save(model, target, epoch=epoch, extra=extra)
    except BaseException as exc:  # noqa: BLE001
        _check_error(exc)
        assert path.read_bytes() == old_bytes
        assert sorted(p.name for p in root.iterdir()) == ["model.npz"]  # no temporary left
    else:
        checkpoint = bp.load_checkpoint(target)
        assert _equal(dict(extra or {}), checkpoint.extra), (extra, checkpoint.extra)
        assert checkpoint.epoch == epoch
        _assert_same(_state(model), _state(checkpoint.model))


@SETTINGS
@given(content=st.binary(max_size=64), cut=st.integers(0, 4000))
def test_load_of_damaged_files_raises_a_checkpoint_error(
        tmp_path_factory, kernels_for_both_devices, content, cut):
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.npz"
    bp.save(_model(), good, extra={"k": [1, 2.5, "s"]})
    data = good.read_bytes()
    bad = root / "bad.npz"
    bad.write_bytes(data[:cut] + content + data[cut + len(content):] if cut < len(data)
                    else content)
    try:
        bp.load(bad)
    except bp.CheckpointError as exc:
        assert str(bad) in str(exc) or "checkpoint" in str(exc).lower()
    except BaseException as exc:  # noqa: BLE001
        pytest.fail(f"a damaged file gave {type(exc).__name__}: {exc}")


# -- the command line ----------------------------------------------------------------------
FLAG_VALUES = {
    "--data": ["xor", "two_moons", "digits", "nope", "", "/", "missing.csv"],
    "--hidden": ["8", "0", "4,4", "-1", "x", ""],
    "--activation": ["relu", "tanh", "gelu", "nope", ""],
    "--dropout": ["0", "0.5", "1.5", "-0.1", "nan", "x"],
    "--optimizer": ["adam", "sgd", "nope"],
    "--lr": ["0.01", "-1", "0", "inf", "x"],
    "--weight-decay": ["0", "-0.1", "0.01"],
    "--epochs": ["0", "1", "-1", "2.5", "x"],
    "--batch-size": ["0", "1", "16", "-3", "x"],
    "--patience": ["0", "2", "-1"],
    "--split": ["0.7,0.15,0.15", "1,0,0", "0.5,0.5", "a,b,c", "0,0.5,0.5", "0.6,0.6,-0.2"],
    "--seed": ["0", "-1", "x"],
    "--dtype": ["float32", "float64", "float16"],
    "--device": ["cpu", "auto", "tpu", "cuda:99"],
    "--kernels": ["auto", "reference", "numba", "fast"],
    "--task": ["auto", "classification", "regression", "x"],
    "--target": ["y", "nope"],
    "--verbose": ["0", "5"],
}
SWITCHES = ["--no-plot", "--debug", "--json", "--proba", "--help"]


@st.composite
def command_lines(draw, model, out):
    command = draw(st.sampled_from(["train", "train", "evaluate", "predict", "info", "nope"]))
    argv = [command]
    if command in ("evaluate", "predict"):
        argv.append(draw(st.sampled_from([model, model, out, "missing.npz"])))
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(st.sampled_from(SWITCHES)))
        else:
            flag = draw(st.sampled_from(sorted(FLAG_VALUES)))
            argv += [flag, draw(st.sampled_from(FLAG_VALUES[flag]))]
    if command == "train":
        argv += ["--out", out, "--verbose", "0", "--no-plot"]
        if "--epochs" not in argv:
            argv += ["--epochs", "1"]
        if "--data" not in argv:
            argv += ["--data", "xor"]
    return argv


@contextlib.contextmanager
def _cpu_cli_runtime():
    """In-process CLI runs see a CPU environment and fresh device, kernel and dtype choices
    (the CLI sets them process-wide), and the process's own are restored afterwards."""
    from backprop import backend
    from backprop import kernels as K

    names = ("BACKPROP_DEVICE", "BACKPROP_KERNELS", "BACKPROP_DTYPE", "BACKPROP_DEBUG")
    saved_env = {k: os.environ.get(k) for k in names}
    saved = dict(backend._default), dict(K._state)
    os.environ.update({"BACKPROP_DEVICE": "cpu", "BACKPROP_KERNELS": "auto"})
    for name in ("BACKPROP_DTYPE", "BACKPROP_DEBUG"):
        os.environ.pop(name, None)
    backend._default.update(device=None, fallback_reason="", dtype=None)
    K._state.update(choice=None, tables={})
    try:
        yield
    finally:
        backend._default.update(saved[0])
        K._state.update(saved[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from backprop import cli

    out = tmp_path_factory.mktemp("cli-model")
    with _cpu_cli_runtime():
        assert cli.main(["train", "--data", "two_moons", "--epochs", "1", "--out", str(out),
                         "--no-plot", "--verbose", "0"]) == 0
    return str(out / "model.npz")


@SETTINGS
@given(data=st.data())
def test_the_command_line_exits_with_a_code_and_never_a_traceback(data, cli_model,
                                                                  tmp_path_factory, capsys):
    from backprop import cli

    out = str(tmp_path_factory.mktemp("cli"))
    argv = data.draw(command_lines(cli_model, out), label="argv")
    capsys.readouterr()
    with _cpu_cli_runtime():
        code = cli.main(argv)
    stdout, stderr = capsys.readouterr()
    hypothesis.event(f"exit {code}")
    assert code in (0, 2) or (code == 1 and argv[0] == "info"), (code, stderr)
    if "--debug" not in argv:
        assert "Traceback" not in stderr, stderr
    if code == 2 and "--help" not in argv and "--debug" not in argv:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert lines and "error" in lines[-1], stderr
