"""Any array in: fit / evaluate / predict / model(x) on NumPy arrays, nested lists, tuples,
``__array__`` objects, buffers, PyTorch and JAX tensors (DLPack) and pandas DataFrames and
Series, with results equal to the NumPy path bit for bit; DataFrame feature names recorded,
saved and checked; a clear DataError for anything else; bp.to_dlpack / bp.from_dlpack."""
from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop import data, training
from backprop.backend import cuda_status
from backprop.data import DataError


def mlp(seed=0, n_in=3, n_out=2):
    rng = np.random.default_rng(seed)
    return bp.Sequential([bp.Dense(n_in, 8, activation="tanh", rng=rng),
                          bp.Dense(8, n_out, rng=rng)])


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(48, 3)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    return X, y


class ArrayLike:
    """Only ``__array__``: what a minimal third-party container offers."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


class Exporter:
    """Only the DLPack protocol, around an array: a foreign library's tensor."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _torch():
    return pytest.importorskip("torch")


def _jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


def _pd():
    return pytest.importorskip("pandas")


# name -> (X, y) -> (X in that type, y in that type)
CONVERTERS = {
    "numpy": lambda X, y: (X, y),
    "lists": lambda X, y: (X.tolist(), y.tolist()),
    "tuples": lambda X, y: (tuple(map(tuple, X.tolist())), tuple(y.tolist())),
    "__array__": lambda X, y: (ArrayLike(X), ArrayLike(y)),
    "memoryview": lambda X, y: (memoryview(X), memoryview(y)),
    "torch_float32": lambda X, y: (_torch().from_numpy(X), _torch().from_numpy(y)),
    "torch_float64_requires_grad": lambda X, y: (
        _torch().tensor(X, dtype=_torch().float64, requires_grad=True), _torch().tensor(y)),
    "jax": lambda X, y: (_jnp().asarray(X), _jnp().asarray(y)),  # int64 labels become int32
    "pandas": lambda X, y: (_pd().DataFrame(X, columns=["a", "b", "c"]),
                            _pd().Series(y, name="label")),
}


def _run(X, y, Xv, yv):
    """fit with validation data, then evaluate, predict and model(x): everything to compare."""
    model = mlp()
    hist = training.fit(model, X, y, loss="cross_entropy", lr=0.05, epochs=2, batch_size=16,
                        validation_data=(Xv, yv), seed=3, verbose=0)
    return (model, hist.history, training.evaluate(model, X, y, loss="cross_entropy"),
            training.predict(model, X, batch_size=20))


@pytest.mark.parametrize("kind", list(CONVERTERS))
def test_every_input_type_trains_and_predicts_as_numpy_bit_for_bit(kind, blobs):
    X, y = blobs
    ref_model, ref_hist, ref_eval, ref_out = _run(X[:32], y[:32], X[32:], y[32:])
    convert = CONVERTERS[kind]
    Xa, ya = convert(X[:32], y[:32])
    Xv, yv = convert(X[32:], y[32:])
    model, hist, result, out = _run(Xa, ya, Xv, yv)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert hist[key] == ref_hist[key], key
    assert result == ref_eval
    assert type(out) is np.ndarray and out.dtype == np.float32  # outputs: backprop's arrays
    np.testing.assert_array_equal(out, ref_out)
    for name, value in ref_model.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value)
    if kind != "torch_float64_requires_grad":  # model(x) keeps the dtype check (float64)
        called = model(Xa)
        assert type(called) is np.ndarray
        np.testing.assert_array_equal(called, ref_model(X[:32]))
    assert model.feature_names_in_ == (["a", "b", "c"] if kind == "pandas" else None)


def test_a_float32_cpu_tensor_is_shared_not_copied(blobs):
    torch = _torch()
    X, y = blobs
    t = torch.from_numpy(X.copy())
    a = data.as_array(t)
    assert type(a) is np.ndarray and np.shares_memory(a, t.numpy())
    Xd, yd = training._prepare(mlp(), t, torch.from_numpy(y), "labels", "training data")
    assert np.shares_memory(Xd, t.numpy())  # right down to the array the model reads
    grad = torch.tensor(X, requires_grad=True)
    shared = bp.from_dlpack(grad)  # detached, still shared; the tensor itself is unchanged
    assert np.shares_memory(shared, grad.detach().numpy()) and grad.requires_grad
    assert grad.grad is None
    # a dtype the model does not use is converted: a copy, the values as in the NumPy path
    t64 = torch.from_numpy(X.astype(np.float64))
    Xd64, _ = training._prepare(mlp(), t64, None, "any", "prediction data")
    assert Xd64.dtype == np.float32 and not np.shares_memory(Xd64, t64.numpy())
    np.testing.assert_array_equal(Xd64, X)


def test_shared_views_of_numpy_buffers_dlpack_exporters_and_jax(blobs):
    X, y = blobs
    assert data.as_array(X) is X
    assert np.shares_memory(data.as_array(memoryview(X)), X)
    assert np.shares_memory(data.as_array(Exporter(X)), X)  # the protocol alone is enough
    np.testing.assert_array_equal(mlp().predict(Exporter(X)), mlp().predict(X))
    jnp = _jnp()
    j = jnp.asarray(X)
    a = data.as_array(j)
    np.testing.assert_array_equal(a, X)
    assert not a.flags.writeable  # JAX's memory is immutable: shared read-only


def test_torch_label_and_target_tensors(blobs):
    torch = _torch()
    X, y = blobs
    t = torch.from_numpy(X)
    assert data.as_array(torch.from_numpy(y)).dtype == np.int64  # integer labels stay integer
    # bool targets are 0/1
    ref, model = mlp(n_out=1), mlp(n_out=1)
    fit = dict(loss="bce_with_logits", epochs=1, batch_size=16, seed=0, verbose=0)
    training.fit(ref, X, (y == 1).astype(np.float32), **fit)
    training.fit(model, t, torch.from_numpy(y == 1), **fit)
    np.testing.assert_array_equal(model.predict(t), ref.predict(X))
    # evaluate decides "labels" from an int64 tensor's dtype, as from a NumPy array's
    two = mlp()
    assert training.evaluate(two, t, torch.from_numpy(y)) == training.evaluate(two, X, y)


def test_validation_split_on_foreign_arrays(blobs):
    X, y = blobs
    kw = dict(loss="cross_entropy", epochs=2, batch_size=16, validation_split=0.25, seed=1,
              verbose=0)
    ref = training.fit(mlp(), X, y, **kw).history
    # converted before the split: an __array__ object has neither len() nor slices
    assert training.fit(mlp(), ArrayLike(X), ArrayLike(y), **kw).history["val_loss"] == \
        ref["val_loss"]
    pd, torch = _pd(), _torch()
    assert training.fit(mlp(), pd.DataFrame(X, columns=list("abc")), pd.Series(y),
                        **kw).history["val_loss"] == ref["val_loss"]
    assert training.fit(mlp(), torch.from_numpy(X), torch.from_numpy(y),
                        **kw).history["val_loss"] == ref["val_loss"]


# ---------------------------------------------------------------------------------------
# pandas feature names
def test_feature_names_are_recorded_saved_loaded_and_checked(blobs, tmp_path):
    pd = _pd()
    X, y = blobs
    df = pd.DataFrame(X, columns=["age", "height", "weight"])
    model = mlp()
    assert model.feature_names_in_ is None
    model.fit(df, pd.Series(y), loss="cross_entropy", epochs=1, seed=0, verbose=0)
    assert model.feature_names_in_ == ["age", "height", "weight"]
    path = tmp_path / "m.npz"
    model.save(path)
    for loaded in (bp.load(path), bp.load_checkpoint(path).model):
        assert loaded.feature_names_in_ == ["age", "height", "weight"]
        np.testing.assert_array_equal(loaded.predict(df), model.predict(df))
    loaded = bp.load(path)
    swapped = df[["height", "age", "weight"]]
    renamed = df.rename(columns={"age": "years"})
    calls = (lambda d: loaded.predict(d), lambda d: loaded(d),
             lambda d: loaded.evaluate(d, y), lambda d: loaded.fit(d, y, loss="cross_entropy",
                                                                   epochs=1, verbose=0))
    before = loaded.state_dict()
    for call in calls:
        with pytest.raises(DataError, match="another order.*df\\[model.feature_names_in_\\]"):
            call(swapped)
        with pytest.raises(DataError, match=r"missing \['age'\], unexpected \['years'\]"):
            call(renamed)
        with pytest.raises(DataError, match=r"unexpected \['extra'\]"):
            call(df.assign(extra=1.0))
    assert all(np.array_equal(before[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(DataError, match="validation data: .*another order"):
        mlp().fit(df, y, loss="cross_entropy", epochs=1, verbose=0,
                  validation_data=(swapped, y))
    # arrays carry no names: not checked; the selection the message suggests works
    np.testing.assert_array_equal(loaded.predict(X), loaded.predict(swapped[
        loaded.feature_names_in_]))


def test_models_and_frames_without_names(blobs, tmp_path):
    pd = _pd()
    X, y = blobs
    model = mlp()
    model.fit(pd.DataFrame(X), y, loss="cross_entropy", epochs=1, verbose=0)  # int columns
    assert model.feature_names_in_ is None  # as scikit-learn: str column names only
    model.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    assert model.feature_names_in_ is None
    # a model fitted on arrays accepts any DataFrame of the right width
    named = pd.DataFrame(X, columns=list("xyz"))
    np.testing.assert_array_equal(model.predict(named), model.predict(X))
    model.save(tmp_path / "m.npz")
    ckpt = bp.load_checkpoint(tmp_path / "m.npz")
    assert ckpt.model.feature_names_in_ is None and "feature_names_in" not in ckpt.meta
    model.feature_names_in_ = "xyz"
    with pytest.raises(TypeError, match="feature_names_in_ must be None or a list of str"):
        model.save(tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_dataframe_columns_that_are_not_numbers_are_named(blobs):
    pd = _pd()
    X, y = blobs
    model = mlp()
    before = model.state_dict()
    df = pd.DataFrame({"a": X[:, 0], "colour": ["red"] * len(X), "c": X[:, 2]})
    with pytest.raises(DataError, match="training data: X column 'colour' has dtype .*get_dummies"):
        model.fit(df, y, loss="cross_entropy", epochs=1, verbose=0)
    with pytest.raises(DataError, match="column 'a' has dtype category"):
        model.predict(df.assign(a=df["a"].astype("category")).drop(columns="colour"))
    with pytest.raises(DataError, match="y column 'label' has dtype"):
        model.fit(X, pd.Series(["cat"] * len(X), name="label"), loss="cross_entropy",
                  verbose=0)
    assert model.feature_names_in_ is None  # no partial work
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    holes = pd.DataFrame({"a": pd.array([1, None, 3] * 16, dtype="Int64"),
                          "b": X[:, 1], "c": X[:, 2]})
    with pytest.raises(DataError, match="NaN or inf \\(first at row 1\\)"):
        model.predict(holes)
    mixed = pd.DataFrame({"a": [True, False] * 24, "b": X[:, 1], "c": X[:, 2]})  # bool + float
    np.testing.assert_array_equal(model.predict(mixed),
                                  model.predict(mixed.to_numpy(dtype=np.float32)))


def test_a_csv_source_records_its_columns(tmp_path, blobs):
    from backprop.sources import CSVSource

    X, y = blobs
    path = tmp_path / "t.csv"
    rows = ["p,q,r,label"] + [f"{a},{b},{c},{t}" for (a, b, c), t in zip(X.tolist(), y)]
    path.write_text("\n".join(rows) + "\n")
    model = mlp()
    model.fit(CSVSource(path, target="label"), loss="cross_entropy", epochs=1, verbose=0)
    assert model.feature_names_in_ == ["p", "q", "r"]


# ---------------------------------------------------------------------------------------
# What is refused, before any work
class _FakeDLPack:
    def __init__(self, device):
        self.device_type = device

    def __dlpack__(self, **kwargs):
        raise AssertionError("not reached")

    def __dlpack_device__(self):
        return self.device_type, 0


@pytest.mark.parametrize("bad, message", [
    ({"a": [1.0]}, "[Xx] is a dict, not an array; give a NumPy"),
    ({1.0, 2.0}, "[Xx] is a set, not an array"),
    (b"\x00\x01", "[Xx] is a bytes, not an array"),
    (None, "[Xx] is None, not an array"),
    (object(), "[Xx] is an object, which backprop cannot read as an array; give"),
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], r"ragged nested lists \(row 1 has 2 values, row 0 has 3"),
    ([[1.0, "a", 3.0]], "holds <U32 values, not numbers"),
    (_FakeDLPack(8), "lives on a Metal device, which backprop cannot read"),
])
def test_unsupported_inputs_raise_a_data_error_naming_the_type(bad, message, blobs):
    _, y = blobs
    model = mlp()
    before = model.state_dict()
    with pytest.raises(DataError, match=message):
        model.predict(bad)
    with pytest.raises(DataError, match=message):
        model(bad)
    with pytest.raises(DataError, match=message):
        model.evaluate(bad, y)
    if bad is not None:  # fit(None) is fit(source=None)... a DataError too, tested elsewhere
        with pytest.raises(DataError, match=message):
            model.fit(bad, y, loss="cross_entropy", verbose=0)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_targets_and_bad_tensors(blobs):
    torch = _torch()
    X, y = blobs
    model = mlp()
    with pytest.raises(DataError, match="training data: y is a dict"):
        model.fit(X, {"y": y}, loss="cross_entropy", verbose=0)
    with pytest.raises(DataError, match="evaluation data: y is a str"):
        model.evaluate(X, "labels")
    with pytest.raises(DataError, match="y is a single value"):
        model.evaluate(X, 3)
    meta = torch.ones(4, 3, device="meta")
    with pytest.raises(DataError, match="torch.Tensor of dtype torch.float32 on meta has no "
                                        "memory that DLPack can describe"):
        model.fit(meta, torch.zeros(4, dtype=torch.int64), loss="cross_entropy", verbose=0)
    with pytest.raises(DataError, match="bfloat16 .*cannot be imported.*tensor.float"):
        model.predict(torch.ones(4, 3, dtype=torch.bfloat16))
    with pytest.raises(DataError, match="validation data: X is a str"):
        model.fit(X, y, loss="cross_entropy", verbose=0, validation_data=("x", y))
    assert model.feature_names_in_ is None


@pytest.mark.skipif(cuda_status()["available"], reason="tests the message without a GPU")
def test_a_cuda_tensor_without_a_usable_gpu_is_refused_with_the_reason():
    with pytest.raises(DataError, match="lives on a CUDA device .0. but CUDA is unusable here "
                                        r"\(.*\); move it to the CPU first"):
        data.as_array(_FakeDLPack(2), name="prediction data")


def test_a_foreign_tensor_goes_to_the_models_device(device, blobs):
    torch = _torch()
    X, y = blobs
    model = mlp().to(str(device))
    model.fit(torch.from_numpy(X), torch.from_numpy(y), loss="cross_entropy", epochs=1,
              verbose=0)
    out = model.predict(torch.from_numpy(X))
    assert isinstance(out, device.xp.ndarray)
    assert isinstance(model(torch.from_numpy(X)), device.xp.ndarray)


def test_a_cuda_tensor_is_shared_on_the_gpu(blobs):
    from conftest import skip_unless_device

    skip_unless_device("cuda")
    import cupy

    X, y = blobs
    Xg, yg = cupy.asarray(X), cupy.asarray(y)
    a = data.as_array(Exporter(Xg))  # memory on a CUDA device: a CuPy array, shared
    assert isinstance(a, cupy.ndarray) and a.data.ptr == Xg.data.ptr
    assert data.as_array(Xg) is Xg
    model = mlp().to("cuda")
    Xd, _ = training._prepare(model, Exporter(Xg), None, "any", "prediction data")
    assert Xd.data.ptr == Xg.data.ptr
    model.fit(Exporter(Xg), Exporter(yg), loss="cross_entropy", epochs=1, verbose=0, seed=0)
    out = model.predict(Exporter(Xg))
    assert isinstance(out, cupy.ndarray)
    back = cupy.from_dlpack(bp.to_dlpack(out))
    assert back.data.ptr == out.data.ptr
    assert bp.from_dlpack(Exporter(out)).data.ptr == out.data.ptr
    host = bp.from_dlpack(Exporter(out), device="cpu")
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, out.get())


# ---------------------------------------------------------------------------------------
# bp.to_dlpack / bp.from_dlpack
def test_to_dlpack_and_from_dlpack_share_memory(blobs):
    torch = _torch()
    X, _ = blobs
    out = mlp().predict(X)
    t = torch.from_dlpack(bp.to_dlpack(out))
    t[0, 0] = 42.0  # one memory
    assert out[0, 0] == 42.0
    assert torch.from_dlpack(out).data_ptr() == t.data_ptr()  # the protocol, without a capsule
    back = bp.from_dlpack(t)
    assert type(back) is np.ndarray and np.shares_memory(back, out)
    assert bp.from_dlpack(t, device="cpu") is not None
    np.testing.assert_array_equal(bp.from_dlpack(X), X)
    readonly = X.copy()
    readonly.flags.writeable = False
    with pytest.raises(BufferError, match=r"to_dlpack: .*a\.copy\(\)"):
        bp.to_dlpack(readonly)
    with pytest.raises(TypeError, match="to_dlpack takes a NumPy or CuPy array"):
        bp.to_dlpack(X.tolist())
    with pytest.raises(DataError, match="from_dlpack needs an object with __dlpack__"):
        bp.from_dlpack([1.0, 2.0])


def test_jax_reads_backprop_arrays(blobs):
    jnp = _jnp()
    X, _ = blobs
    out = mlp().predict(X)
    np.testing.assert_array_equal(np.asarray(jnp.from_dlpack(out)), out)
