"""Compiled inference plans (backprop/inference.py): ``predict`` and ``model(x)`` on a small
CPU batch give ``model.forward``'s outputs up to rounding, for every activation, dtype,
batch size and supported layer; the plan follows the model's weights, structure and dtype;
bad input still raises DataError; threads get their own results; anything the plans do not
cover takes the normal path."""
from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest

import backprop as bp
from backprop import activations, inference, kernels, training
from backprop.data import DataError
from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Layer, Residual
from backprop.model import Sequential

R = inference.MAX_ROWS
DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def numba_on_cpu():
    """Plans run on NumPy arrays with the Numba kernels: CPU arrays and ``auto`` kernels,
    whatever device and kernel backend the job selected."""
    previous = kernels.get_choice()
    kernels.set_backend("auto")
    with bp.use_device("cpu"):
        yield
    kernels.set_backend(previous)


def assert_close(got, expected, dtype):
    """The plan's tolerance (see backprop/inference.py): the dot products are summed in
    another order than BLAS's, so float32 results differ by a few ulps of ``Σ|x w|``."""
    rtol, atol = (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)
    scale = max(float(np.max(np.abs(expected))), 1.0)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale)


def forward(model, x):
    with bp.inference_mode():
        return model.forward(x).copy()


def data(n, features, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=(n, features)).astype(dtype)


def mlp(activation, dtype, width=24, out=5, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Dense(7, width, activation=activation, rng=rng, dtype=dtype),
                       Dense(width, width, activation=activation, rng=rng, dtype=dtype),
                       Dense(width, out, rng=rng, dtype=dtype)]).eval()


def uses_plan(model, x):
    """predict(x) and model(x), with Sequential.forward disabled: they must not need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the normal path ran")

    model.forward = refuse
    try:
        return model.predict(x), model(x)
    finally:
        del model.forward


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(activations.NAMES))
def test_every_activation_matches_forward(name, dtype):
    """Every activation name (each record of kernels/activations.py, its aliases, GELU,
    softmax and log-softmax): hidden layers and the output layer, through predict and
    model(x), in the dot form (fewer rows than a vector) and the lanes form, equal forward
    up to rounding."""
    model = mlp(name, dtype)
    model.layers[-1].activation = activations.get(name)
    if getattr(model.layers[0].activation, "alpha", None):
        for layer in model.layers:
            layer.activation.alpha = 0.3  # a non-default alpha is the one used
    assert inference.plan_for(model) is not None
    for n in (5, 21):
        x = data(n, 7, dtype) * 2
        predicted, called = uses_plan(model, x)
        assert predicted.dtype == dtype and called.dtype == dtype
        np.testing.assert_array_equal(predicted, called)
        assert_close(predicted, forward(model, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_every_batch_size_up_to_max_rows_and_beyond(dtype):
    model = mlp("relu", dtype, width=33, out=6)  # widths that leave remainders in each block
    X = data(2 * R + 3, 7, dtype, seed=1)
    for n in [*range(1, R + 1), R + 1, 2 * R + 3]:
        x = np.ascontiguousarray(X[:n])
        expected = forward(model, x)
        got = model.predict(x)
        assert got.shape == (n, 6)
        assert_close(got, expected, dtype)
        assert_close(model(x), expected, dtype)


# ---------------------------------------------------------------------------------------
# Stacks of Dense layers: larger batches in chunks of rows, on every thread
def count_launches(monkeypatch):
    """The chunk sizes of the parallel driver's launches, one entry per launch."""
    chunks = []
    launch = inference._parallel_launch

    def counted(driver, x, out, chunk, *rest):
        chunks.append(chunk)
        return launch(driver, x, out, chunk, *rest)

    monkeypatch.setattr(inference, "_parallel_launch", counted)
    return chunks


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_a_small_dense_stack_takes_any_batch_in_chunks(dtype, monkeypatch):
    """Below PACKED_MIN_ROWS (then in the packed form, tested below)."""
    chunks = count_launches(monkeypatch)
    model = mlp("relu", dtype, width=33, out=6)
    assert inference.plan_for(model).weight_bytes <= inference.SMALL_WEIGHT_BYTES
    assert inference.PACKED_MIN_ROWS > 150
    for n in (R + 1, 100, 150):
        x = data(n, 7, dtype, seed=n)
        predicted, called = uses_plan(model, x)
        np.testing.assert_array_equal(predicted, called)
        assert_close(predicted, forward(model, x), dtype)
    assert len(chunks) == 6 and max(chunks) <= inference.CHUNK_MAX_ROWS
    lanes = 16 if dtype == np.float32 else 8
    assert all(c % lanes == 0 for c in chunks)


def test_the_chunks_share_the_rows_out_evenly():
    """Each thread runs a run of consecutive chunks: the chunk size is the one that leaves
    the busiest thread the fewest rows (160 rows on two threads: two chunks of 80, not
    64 + 64 + 32), then the largest up to CHUNK_ROWS, at least two vectors of lanes where
    the threads' shares have them, never above CHUNK_MAX_ROWS."""
    chunking = inference._chunking
    assert chunking(160, 2, 16, 64, 128) == (80, 2)
    assert chunking(240, 2, 16, 64, 128) == (64, 4)  # a tie with 128: the smaller chunks
    assert chunking(100, 2, 16, 64, 128) == (64, 2)
    assert chunking(17, 2, 16, 64, 128) == (16, 2)
    assert chunking(33, 2, 16, 64, 128) == (32, 2)
    assert chunking(500, 1, 16, 64, 128) == (64, 8)
    for threads in (1, 2, 3, 4):
        for lanes in (8, 16):
            for n in range(lanes + 1, 400, 7):
                chunk, chunks = chunking(n, threads, lanes, 64, 128)
                assert chunk % lanes == 0 and chunk <= 128 and chunks == -(-n // chunk)
                runs = [chunks // threads + (t < chunks % threads) for t in range(threads)]
                busiest = max(min(n, sum(runs[:t + 1]) * chunk) - min(n, sum(runs[:t]) * chunk)
                              for t in range(threads))
                even = -(-(-(-n // lanes)) // threads) * lanes  # whole vectors per thread
                assert busiest < even + chunk  # at most part of one chunk beyond even


def test_a_large_dense_stack_takes_the_plan_up_to_dense_max_rows(monkeypatch):
    model = Sequential([Dense(600, 120, rng=0), Dense(120, 10, rng=1)]).eval()
    plan = inference.plan_for(model)
    assert plan.weight_bytes > inference.SMALL_WEIGHT_BYTES
    monkeypatch.setattr(inference, "l2_cache_bytes", lambda: plan.weight_bytes - 1)
    D = inference.DENSE_MAX_ROWS
    assert plan.takes(D) and not plan.takes(D + 1)
    x = data(D + 1, 600, np.float32)
    assert inference.run(model, x) is None  # the normal path
    assert_close(inference.run(model, x[:D]), forward(model, x[:D]), np.float32)
    other = Sequential([BatchNorm1d(7), Dense(7, 2, rng=0)]).eval()  # not a Dense stack
    plan = inference.plan_for(other)
    assert plan.takes(R) and not plan.takes(R + 1)


def count_calls(monkeypatch, method: str):
    """The row counts of the routes bound by ``Plan.<method>(n, threads)``, one entry per
    route (a live model binds one per call; a frozen one once per batch size and thread
    count, but for its first packing)."""
    calls = []
    real = getattr(inference.Plan, method)

    def counted(plan, n, threads):
        calls.append(n)
        return real(plan, n, threads)

    monkeypatch.setattr(inference.Plan, method, counted)
    return calls


def count_packed(monkeypatch):
    """The row counts of the packed driver's calls."""
    return count_calls(monkeypatch, "_packed")


def test_a_dense_stack_whose_weights_fit_in_l2_takes_any_batch(monkeypatch):
    """Weights that fit in one core's L2 cache: the plan takes any batch (the same outputs
    as the normal path, to rounding), in the packed form from PACKED_MIN_ROWS rows; where
    the L2 size is unknown (0) it keeps to DENSE_MAX_ROWS."""
    calls = count_packed(monkeypatch)
    model = Sequential([Dense(600, 120, rng=0), Dense(120, 10, rng=1)]).eval()
    plan = inference.plan_for(model)
    assert plan.weight_bytes > inference.SMALL_WEIGHT_BYTES
    monkeypatch.setattr(inference, "l2_cache_bytes", lambda: plan.weight_bytes)
    P = inference.PACKED_MIN_ROWS
    assert P > inference.DENSE_MAX_ROWS
    assert plan.takes(P - 1) and plan.takes(P) and plan.takes(50 * P)
    x = data(P + 5, 600, np.float32)
    assert_close(inference.run(model, x[:P - 1]), forward(model, x[:P - 1]), np.float32)
    assert calls == []
    assert_close(inference.run(model, x), forward(model, x), np.float32)
    assert calls == ([P + 5] if inference.atomics.AVAILABLE else [])
    monkeypatch.setattr(inference, "l2_cache_bytes", lambda: 0)
    assert not plan.takes(inference.DENSE_MAX_ROWS + 1)
    assert inference.run(model, x) is None  # the normal path


def test_the_l2_size_is_read_from_sysfs(tmp_path):
    """The level-2 data or unified cache of CPU 0, in K or M; 0 for a tree without one or
    with a size it cannot read."""
    for name, level, kind, size in (("index0", "1", "Data", "48K"),
                                    ("index1", "1", "Instruction", "32K"),
                                    ("index2", "2", "Unified", "2048K"),
                                    ("index3", "3", "Unified", "480M")):
        (tmp_path / name).mkdir()
        for field, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / name / field).write_text(value + "\n")
    assert inference._read_l2_cache_bytes(tmp_path) == 2 << 20
    (tmp_path / "index2" / "size").write_text("1M\n")
    assert inference._read_l2_cache_bytes(tmp_path) == 1 << 20
    (tmp_path / "index2" / "size").write_text("lots\n")
    assert inference._read_l2_cache_bytes(tmp_path) == 0
    assert inference._read_l2_cache_bytes(tmp_path / "missing") == 0


def test_the_threads_split_a_batch_only_above_the_work_threshold(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS=1)")
    chunks = count_launches(monkeypatch)
    no_row_chunks(monkeypatch)  # (the lanes form's chunks: tested below)
    model = mlp("relu", np.float32, width=33, out=6)
    x = data(R, 7, np.float32)
    expected = forward(model, x)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        assert_close(model.predict(x), expected, np.float32)  # below: one thread
        assert chunks == []
        monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)
        assert_close(model.predict(x), expected, np.float32)
        assert chunks == [R // 2]  # one chunk per thread
        numba.set_num_threads(1)
        assert_close(model.predict(x), expected, np.float32)
        assert chunks == [R // 2]  # one thread: the calling thread's program
        numba.set_num_threads(2)
        for dtype, lanes in ((np.float32, 16), (np.float64, 8)):
            model = mlp("relu", dtype, width=33, out=6)
            for n in (lanes, lanes + 1, inference.PARALLEL_MIN_VECTORS * lanes):
                chunks.clear()
                x = data(n, 7, dtype, seed=n)
                assert_close(model.predict(x), forward(model, x), dtype)
                # one vector of lanes per thread at the smallest split (the second one
                # partial), never less
                assert chunks == ([] if n == lanes else [lanes])
    finally:
        numba.set_num_threads(previous)


def test_non_finite_input_in_any_chunk_raises_data_error():
    model = mlp("relu", np.float32, width=33, out=6)
    x = data(1000, 7, np.float32)
    x[777, 3] = np.nan
    with pytest.raises(DataError, match="NaN or inf.*row 777"):
        model.predict(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_input_raises_on_every_path(dtype, monkeypatch):
    """The first Dense kernel's flags are the plans' only NaN/inf check (the transposing
    pass does not count): a bad value anywhere must still fail, in the row program (few
    rows), the lanes program (one and more vectors of rows, padding lanes after the last
    row) and the parallel driver (any chunk), also where the feature's weights are all
    zero (inf · 0 is NaN, NaN · 0 is NaN)."""
    model = mlp("relu", dtype, width=33, out=6)
    monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)  # the driver from two vectors on
    for n in (1, 5, 16, 20, 32, 64, 200):
        assert_bad_values_raise(model, n, dtype, lambda n: ((0, 0), (n - 1, 6), (n // 2, 3)))


def assert_bad_values_raise(model, n, dtype, places):
    """NaN, inf and -inf at each ``(row, col)`` of ``places(n)`` in an ``n``-row batch make
    ``predict`` raise DataError naming the row, for ``model`` and for a copy whose weights
    of the last feature are all zero (inf · 0 is NaN, NaN · 0 is NaN); the same batch with
    a zero there predicts finite values."""
    zeroed = copy.deepcopy(model)
    zeroed.layers[0].W.data[:, -1] = 0.0
    features = model.in_features
    for bad in (np.nan, np.inf, -np.inf):
        for row, col in places(n):
            for net in (model, zeroed):
                x = data(n, features, dtype, seed=row)
                x[row, col] = bad
                with pytest.raises(DataError, match=f"NaN or inf.*row {row}"):
                    net.predict(x)
                x[row, col] = 0.0
                assert np.isfinite(net.predict(x)).all()


def test_stacks_of_one_depth_and_other_activations_get_their_own_drivers(tmp_path,
                                                                         monkeypatch):
    """Drivers of stacks of one depth differ only in the kernels they call: each must be
    its own file and disk-cache entry (one driver loaded in place of the other computed
    the wrong activations)."""
    monkeypatch.setattr(inference, "_driver_dir", lambda: tmp_path)
    monkeypatch.setattr(inference, "_DRIVERS", {})
    x = data(300, 7, np.float32)
    for name in ("relu", "tanh", "sigmoid"):
        model = mlp(name, np.float32, width=33, out=6)
        assert_close(model.predict(x), forward(model, x), np.float32)
    assert len(list(tmp_path.glob("plan_driver_*.py"))) == 3
    inference._DRIVERS.clear()  # as a new process: the machine code from the disk cache
    for name in ("sigmoid", "tanh", "relu"):
        model = mlp(name, np.float32, width=33, out=6)
        assert_close(model.predict(x), forward(model, x), np.float32)


def test_the_driver_runs_without_a_cache_directory(monkeypatch):
    monkeypatch.setattr(inference, "_driver_dir", lambda: None)
    monkeypatch.setattr(inference, "_DRIVERS", {})
    model = mlp("relu", np.float32, width=33, out=6)
    x = data(200, 7, np.float32)
    assert_close(model.predict(x), forward(model, x), np.float32)


def test_a_second_process_loads_the_driver_from_the_disk_cache(tmp_path):
    """The driver's source is a file under the cache directory, so that Numba's disk cache
    keeps its machine code; loading it in a new process must work (it re-imports the
    function's module)."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, backprop as bp\n"
            "m = bp.Sequential([bp.Dense(7, 9, activation='tanh', rng=0), bp.Dense(9, 2, rng=1)])\n"
            "x = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float32)\n"
            "print(float(abs(m.predict(x) - m.eval().forward(x)).max()))\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)  # the index beside the driver's file, where it is looked for
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert float(out.stdout) < 1e-5
    sources = list((tmp_path / "backprop" / "inference").glob("plan_driver_*.py"))
    assert len(sources) == 1
    assert list((tmp_path / "backprop" / "inference" / "__pycache__").glob("*.nbi"))


def test_batch_size_passes_go_through_the_plan():
    model = mlp("tanh", np.float32)
    X = data(100, 7, np.float32)
    got = model.predict(X, batch_size=30)
    assert_close(got, forward(model, X), np.float32)
    for lo in range(0, 100, 30):  # each pass of 30 rows is what the plan gives alone
        np.testing.assert_array_equal(got[lo:lo + 30], model.predict(X[lo:lo + 30]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_batchnorm_dropout_residual_flatten_and_nesting(dtype):
    rng = np.random.default_rng(2)
    bn = BatchNorm1d(16, dtype=dtype)
    plain = BatchNorm1d(16, affine=False, dtype=dtype)
    model = Sequential([
        Dense(6, 16, rng=rng, dtype=dtype), Flatten(), bn, activations.ReLU(), Dropout(0.3),
        Residual([Dense(16, 16, activation="gelu", rng=rng, dtype=dtype), plain,
                  Dense(16, 16, rng=rng, dtype=dtype)]),
        Sequential([Dense(16, 8, rng=rng, dtype=dtype), activations.Tanh()]),
        Dense(8, 3, rng=rng, dtype=dtype), activations.Softmax()])
    for layer in (bn, plain):  # running statistics away from 0 and 1
        layer.running_mean[...] = rng.normal(size=16)
        layer.running_var[...] = rng.uniform(0.5, 2.0, size=16)
    bn.gamma.data[...] = rng.normal(size=16)
    bn.beta.data[...] = rng.normal(size=16)
    model.eval()
    x = data(R, 6, dtype, seed=3)
    assert inference.plan_for(model) is not None
    predicted, called = uses_plan(model, x)
    assert_close(predicted, forward(model, x), dtype)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(predicted, called)


def test_residual_with_an_identity_block_doubles_its_input():
    model = Sequential([Dense(4, 4, rng=0), Residual(Dropout(0.5))]).eval()
    x = data(3, 4, np.float32)
    predicted, _ = uses_plan(model, x)
    dense = x @ model[0].W.data.T + model[0].b.data
    assert_close(predicted, 2 * dense, np.float32)


@pytest.mark.parametrize("row", ["softmax", "log_softmax"])
def test_row_outputs_fused_or_as_layers(row):
    rng = np.random.default_rng(4)
    fused = Sequential([Dense(5, 9, activation="silu", rng=rng), Dense(9, 4, activation=row,
                                                                        rng=rng)])
    apart = Sequential([Dense(5, 9, rng=rng), activations.ELU(0.7), activations.get(row)])
    after_bn = Sequential([Dense(5, 9, rng=rng), BatchNorm1d(9), activations.SiLU(),
                           activations.get(row)])
    x = data(13, 5, np.float32, seed=5) * 3
    for model in (fused, apart, after_bn):
        model.eval()
        predicted, _ = uses_plan(model, x)
        assert_close(predicted, forward(model, x), np.float32)


def test_no_bias_and_leaky_alpha_read_live():
    model = Sequential([Dense(5, 8, activation="leaky_relu", bias=False, rng=0),
                        Dense(8, 2, bias=False, rng=1)]).eval()
    x = data(4, 5, np.float32)
    before = model.predict(x)
    model[0].activation.alpha = 0.5
    after = model.predict(x)
    assert not np.array_equal(before, after)
    assert_close(after, forward(model, x), np.float32)


# ---------------------------------------------------------------------------------------
# The plan follows the model
def test_predict_after_fit_uses_the_new_weights():
    X = data(200, 7, np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = mlp("relu", np.float32, out=2)
    x = X[:10]
    before = model.predict(x)
    model.fit(X, y, loss="cross_entropy", epochs=2, batch_size=32, verbose=0, seed=0)
    after = model.predict(x)
    assert not np.allclose(before, after)
    assert_close(after, forward(model, x), np.float32)
    model.train()
    model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=32, verbose=0, seed=1)
    model.eval()
    assert_close(model(x), forward(model, x), np.float32)


def test_in_place_updates_state_dicts_and_new_arrays_are_seen():
    model = mlp("sigmoid", np.float32)
    x = data(5, 7, np.float32)
    model.predict(x)
    model[0].W.data *= 2  # in place, as an optimizer
    assert_close(model.predict(x), forward(model, x), np.float32)
    state = mlp("sigmoid", np.float32, seed=9).state_dict()
    model.load_state_dict(state)
    assert_close(model.predict(x), forward(model, x), np.float32)
    model[1].b.data = model[1].b.data + 1  # a new array
    assert_close(model.predict(x), forward(model, x), np.float32)


def test_dtype_change_rebuilds_the_plan():
    model = mlp("gelu_tanh", np.float32)
    x = data(6, 7, np.float64)
    model.predict(x.astype(np.float32))
    model.to(dtype="float64")
    got = model.predict(x)
    assert got.dtype == np.float64
    assert_close(got, forward(model, x), np.float64)
    predicted, called = uses_plan(model, x)
    np.testing.assert_array_equal(predicted, called)


def test_structure_changes_rebuild_the_plan():
    model = mlp("relu", np.float32)
    x = data(6, 7, np.float32)
    model.predict(x)
    model[1].activation = activations.get("tanh")
    assert_close(model.predict(x), forward(model, x), np.float32)
    model.layers[2] = Dense(24, 3, rng=5)
    got = model.predict(x)
    assert got.shape == (6, 3)
    assert_close(got, forward(model, x), np.float32)


def test_training_mode_model_call_takes_the_normal_path():
    model = Sequential([Dense(4, 8, rng=0), Dropout(0.5, seed=1), Dense(8, 2, rng=1)])
    x = data(8, 4, np.float32)
    dropped = model(x)  # training mode: dropout applies (and forward saves for backward)
    model.backward(np.ones_like(dropped))
    model.eval()
    model[1].train()  # a Dropout left in training mode: model(x) must apply it
    counter = model[1].counter
    model(x)
    assert model[1].counter == counter + 1
    with bp.inference_mode():  # ... but predict and inference_mode do not
        assert_close(model(x), forward(model, x), np.float32)
    assert_close(model.predict(x), forward(model, x), np.float32)


def test_pickle_and_copies_drop_the_plan():
    model = mlp("elu", np.float32)
    x = data(3, 7, np.float32)
    expected = model.predict(x)
    assert "_inference_plan" in vars(model)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert "_inference_plan" not in vars(other)
        np.testing.assert_array_equal(other.predict(x), expected)


# ---------------------------------------------------------------------------------------
# Bad input, other inputs, other layers
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_data_error(bad):
    for model in (mlp("relu", np.float32),
                  Sequential([BatchNorm1d(7), Dense(7, 2, rng=0)]).eval()):
        x = data(5, 7, np.float32)
        x[3, 2] = bad
        with pytest.raises(DataError, match="NaN or inf.*row 3"):
            model.predict(x)
        assert model(x).shape == (5, 2 if len(model) == 2 else 5)  # model(x) never checked


def test_non_finite_weights_or_overflow_are_not_a_data_error():
    model = mlp("relu", np.float32)
    x = data(4, 7, np.float32)
    model[2].W.data[0, 0] = np.nan
    assert np.isnan(model.predict(x)[:, 0]).all()
    model = mlp("identity", np.float32)
    big = np.full((2, 7), 3e38, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # the products overflow
        np.testing.assert_array_equal(np.isfinite(model.predict(big)),
                                      np.isfinite(forward(model, big)))


def test_other_inputs_convert_then_take_the_plan():
    model = mlp("softplus", np.float32)
    x = data(10, 7, np.float32)
    expected = model.predict(x)
    np.testing.assert_array_equal(model.predict(x.tolist()), expected)
    np.testing.assert_array_equal(model.predict(x.astype(np.float64)), expected)
    np.testing.assert_array_equal(model.predict(np.asfortranarray(x)), expected)
    np.testing.assert_array_equal(model(np.asfortranarray(x)), expected)
    np.testing.assert_array_equal(model(x.tolist()), expected)
    with pytest.raises(TypeError, match="float32"):
        model(x.astype(np.float64))  # model(x) keeps its dtype check
    with pytest.raises(DataError, match="features"):
        model.predict(x[:, :6])
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        model(x[:, :6])


def test_unplannable_models_take_the_normal_path():
    class Scale(Layer):
        preserves_shape = True

        def forward(self, x):
            return x * 2

    model = Sequential([Dense(3, 4, rng=0), Scale()]).eval()
    x = data(5, 3, np.float32)
    assert inference.plan_for(model) is None
    np.testing.assert_array_equal(model.predict(x), forward(model, x))
    kernels.set_backend("reference")
    plain = mlp("relu", np.float32)
    assert inference.run(plain, x[:, :1].repeat(7, axis=1)) is None


def test_default_batch_is_one_pass(monkeypatch):
    monkeypatch.setattr(inference, "l2_cache_bytes", lambda: 0)
    model = mlp("relu", np.float32, width=300)  # weights too large for a plan at 4096 rows
    X = data(4096, 7, np.float32)
    calls = []
    original = model.forward

    def counted(x):
        calls.append(len(x))
        return original(x)

    model.forward = counted
    out = model.predict(X)
    assert calls == [4096]
    np.testing.assert_array_equal(out, original(X))
    assert training._rows_per_pass(model, X) >= 4096


@pytest.mark.parametrize("split", ["whole", "split", "pass", "packed", "frozen"],
                         ids=["whole", "split-layers", "parallel-pass", "packed", "frozen"])
def test_two_threads_predict_at_once(split, monkeypatch):
    if split == "packed":  # the 300-row batch in the packed form: per-thread panels
        monkeypatch.setattr(inference, "PACKED_MIN_ROWS", 100)
    if split == "frozen":  # every batch from 16 rows in the packed form, one block per
        monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)  # thread up to 480 rows
    if split == "split":  # every layer that can be split is: per-thread blocks, drivers
        monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 0)  # built at once
    elif split == "pass":  # every small batch a parallel pass: per-thread counters
        monkeypatch.setattr(inference, "PASS_MIN_BYTES", 0)
        monkeypatch.setattr(inference, "PASS_LAYER_MIN_BYTES", 0)
    model = pass_mlp() if split == "pass" else mlp("gelu", np.float32, width=64)
    if split == "frozen":
        model = bp.freeze(model)
    features = model.in_features
    inputs = [data(1 + 7 * i, features, np.float32, seed=i) for i in range(6)]
    inputs += [data(300, features, np.float32, seed=6)]  # in chunks, on every thread
    expected = [model.predict(x) for x in inputs]
    barrier, bad, errors = threading.Barrier(2), [], []

    def worker(offset):
        try:
            barrier.wait()
            for k in range(300):
                i = (k + offset) % len(inputs)
                got = model.predict(inputs[i]) if k % 2 else model(inputs[i])
                if not np.array_equal(got, expected[i]):
                    bad.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bad == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiles_of_every_shape_give_the_same_bits(dtype):
    """``_tiles`` against NumPy for every row count from 1 to 40 (tiles of 16, 8 and 4 rows
    and single rows) and 1–3 vectors of lanes (pairs and a single vector); and each lane's
    result is bit for bit the one the lane gets in another tiling (the same sum over k)."""
    lanes = 16 if dtype == np.float32 else 8
    rng = np.random.default_rng(11)
    k = 37
    for m in range(1, 41):
        W = rng.standard_normal((m, k)).astype(dtype)
        xT = rng.standard_normal((k, 3 * lanes)).astype(dtype)
        whole = np.empty((m, 3 * lanes), dtype)
        inference._tiles(xT, W, whole)
        np.testing.assert_allclose(whole, W.astype(np.float64) @ xT, rtol=1e-5, atol=1e-4)
        for first in range(3):  # each vector of lanes alone: a single vector, other tiles
            part = np.empty((m, lanes), dtype)
            inference._tiles(np.ascontiguousarray(xT[:, first * lanes:(first + 1) * lanes]),
                             W, part)
            assert np.array_equal(part, whole[:, first * lanes:(first + 1) * lanes]), (m, first)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_transposing_copy_moves_every_value_and_zeroes_the_padding(dtype):
    """``_to_lanes`` (blocks of lanes × lanes transposed in registers, the rest one by one)
    against NumPy's transpose for every row count from 1 to 40 and feature counts around
    the block size, NaN and ±inf moved like any value; the padding lanes are zero."""
    lanes = 16 if dtype == np.float32 else 8
    rng = np.random.default_rng(12)
    for n in range(1, 41):
        for k in (1, lanes - 1, lanes, lanes + 1, 2 * lanes + 3, 784):
            x = rng.standard_normal((n, k)).astype(dtype)
            x[rng.integers(n), rng.integers(k)] = np.nan
            x[rng.integers(n), rng.integers(k)] = -np.inf
            padded = -(-n // lanes) * lanes
            xT = np.full((k, padded), 7.0, dtype)
            inference._to_lanes(x, xT)
            np.testing.assert_array_equal(xT[:, :n], x.T)
            assert not xT[:, n:].any(), (n, k)


def count_splits(monkeypatch):
    """``(rows, threads, lanes)`` of each split Dense layer, one entry per split."""
    splits = []
    run_split = inference._run_split

    def counted(local, name, lanes, x, n, W, b, alpha, out, threads):
        splits.append((n, threads, lanes))
        return run_split(local, name, lanes, x, n, W, b, alpha, out, threads)

    monkeypatch.setattr(inference, "_run_split", counted)
    return splits


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_layer_split_over_the_threads_gives_the_same_bits(dtype, activation, bias,
                                                            monkeypatch):
    """A Dense layer above SPLIT_MIN_MACS runs split over the threads by output features, in
    the row form (fewer rows than a vector of lanes) and in the lanes form (one vector, on
    the calling thread): the outputs are those of one thread, bit for bit, and a softmax
    output layer (a row op) is never split."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS=1)")
    splits = count_splits(monkeypatch)
    rng = np.random.default_rng(4)
    model = Sequential([Dense(7, 48, activation=activation, rng=rng, dtype=dtype, bias=bias),
                        Dense(48, 40, activation=activation, rng=rng, dtype=dtype, bias=bias),
                        Dense(40, 24, activation="softmax", rng=rng, dtype=dtype)]).eval()
    lanes = 16 if dtype == np.float32 else 8
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for n in (1, 3, lanes - 1, lanes, 2 * lanes - 1):
            x = data(n, 7, dtype, seed=n)
            monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 1 << 62)
            one_thread = model.predict(x)
            assert splits == []
            monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 0)
            split = model.predict(x)
            # 48 and 40 features: two blocks of whole 4-feature blocks each; the softmax
            # output layer stays whole
            assert splits == [(n, 2, n >= lanes)] * 2
            splits.clear()
            np.testing.assert_array_equal(split, one_thread)
            assert_close(split, forward(model, x), dtype)
            monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 48 * 40 * n)  # the second only
            np.testing.assert_array_equal(model.predict(x), one_thread)
            assert splits == [(n, 2, n >= lanes)]
            splits.clear()
        numba.set_num_threads(1)  # one thread: nothing to split
        np.testing.assert_array_equal(model.predict(x), split)
        assert splits == []
    finally:
        numba.set_num_threads(previous)


def test_a_layer_whose_features_do_not_split_evenly_runs_whole(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS=1)")
    splits = count_splits(monkeypatch)
    monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 0)
    model = mlp("relu", np.float32, width=36, out=6)  # 36 = 2 threads × 18: not 4-blocks
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        x = data(3, 7, np.float32)
        assert_close(model.predict(x), forward(model, x), np.float32)
        assert splits == []
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_non_finite_input_raises_through_a_split_layer(dtype, monkeypatch):
    """The split's finiteness flags, one per block of features, decide as the whole
    kernel's flag does: a NaN or inf in any row fails, in either form."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS=1)")
    splits = count_splits(monkeypatch)
    monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 0)
    model = mlp("relu", dtype, width=32, out=6)
    zeroed = mlp("relu", dtype, width=32, out=6)
    zeroed.layers[0].W.data[:, 6] = 0.0
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for n in (1, 5, 16 if dtype == np.float32 else 8):
            for bad in (np.nan, np.inf, -np.inf):
                for row, col in ((0, 0), (n - 1, 6)):
                    for net in (model, zeroed):
                        x = data(n, 7, dtype, seed=n)
                        x[row, col] = bad
                        with pytest.raises(DataError, match=f"NaN or inf.*row {row}"):
                            net.predict(x)
        assert splits
    finally:
        numba.set_num_threads(previous)


# ---------------------------------------------------------------------------------------
# The parallel pass of a stack of Dense layers (PASS_MIN_BYTES)
def count_row_chunks(monkeypatch):
    """The row counts of the row form's chunked calls."""
    return count_calls(monkeypatch, "_row_chunks")


def test_the_row_forms_chunks_take_small_batches_of_a_cached_stack(monkeypatch):
    """From one vector of rows to below two per thread (but one per thread exactly), a
    stack that would run on several threads runs one chunk of rows per thread in the row
    form: the outputs are forward's to rounding, NaN/inf in any chunk raises, and the rule
    scales with the threads and the lanes."""
    take = inference._row_chunks_take
    assert [n for n in range(1, 80) if take(n, 2, 16)] == \
        [n for n in range(16, 56) if n != 32]
    assert [n for n in range(1, 40) if take(n, 2, 8)] == [n for n in range(8, 28) if n != 16]
    assert take(100, 4, 16) and not take(64, 4, 16) and not take(120, 4, 16)
    rows = count_row_chunks(monkeypatch)
    monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)
    with two_threads():
        for dtype, lanes in ((np.float32, 16), (np.float64, 8)):
            rows.clear()
            model = pass_mlp(dtype)  # (the pass tests' drivers: compiled once for all)
            for n in (lanes - 1, lanes, lanes + 3, 2 * lanes, 3 * lanes + 1):
                x = data(n, 9, dtype, seed=n)
                predicted, called = uses_plan(model, x)
                np.testing.assert_array_equal(predicted, called)
                assert_close(predicted, forward(model, x), dtype)
            # (one vector of rows of small weights: no threads, neither chunks nor a pass)
            taken = [lanes + 3, 3 * lanes + 1]
            assert rows == [n for n in taken for _ in range(2)]  # predict, then model(x)
            for row in (0, 2 * lanes - 1, 3 * lanes):
                x = data(3 * lanes + 1, 9, dtype, seed=row)
                x[row, 4] = np.nan
                with pytest.raises(DataError, match=f"row {row}"):
                    model.predict(x)
            assert rows[4:] == [3 * lanes + 1] * 3  # each through the chunks


def count_passes(monkeypatch):
    """``(rows, threads, lanes)`` of each parallel pass."""
    passes = []
    run_pass = inference.Plan._pass

    def counted(plan, n, threads, lanes, hidden):
        passes.append((n, threads, lanes))
        return run_pass(plan, n, threads, lanes, hidden)

    monkeypatch.setattr(inference.Plan, "_pass", counted)
    return passes


def two_threads():
    """Numba's thread count set to 2 for the block (skips where Numba runs one thread)."""
    import contextlib

    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba runs one thread here (NUMBA_NUM_THREADS=1)")

    @contextlib.contextmanager
    def scope():
        previous = numba.get_num_threads()
        numba.set_num_threads(2)
        try:
            yield
        finally:
            numba.set_num_threads(previous)
    return scope()


def pass_mlp(dtype=np.float32, bias=True, row_op="softmax", seed=5):
    """The pass tests' model: 9-48-21-6, relu, a softmax or linear output. Its drivers are
    compiled once per form, dtype and bias for all of them (a parallel driver takes seconds
    to compile, and every stack of activations and layout gets its own)."""
    rng = np.random.default_rng(seed)
    return Sequential([Dense(9, 48, activation="relu", rng=rng, dtype=dtype, bias=bias),
                       Dense(48, 21, activation="relu", rng=rng, dtype=dtype, bias=bias),
                       Dense(21, 6, activation=row_op, rng=rng, dtype=dtype,
                             bias=bias)]).eval()


def every_layer_in_a_pass(monkeypatch):
    monkeypatch.setattr(inference, "PASS_MIN_BYTES", 0)
    monkeypatch.setattr(inference, "PASS_LAYER_MIN_BYTES", 0)
    no_row_chunks(monkeypatch)


def no_row_chunks(monkeypatch):
    """The row form's chunks off (the batches they would take run as before them)."""
    monkeypatch.setattr(inference, "_row_chunks_take", lambda n, threads, lanes: False)


def no_threads(monkeypatch):
    monkeypatch.setattr(inference, "PASS_MIN_BYTES", 1 << 62)
    monkeypatch.setattr(inference, "SPLIT_MIN_MACS", 1 << 62)


@pytest.mark.parametrize("dtype, bias, row_op", [
    (np.float32, True, "softmax"), (np.float32, False, None), (np.float64, True, "softmax")],
    ids=["float32-bias-softmax", "float32-no-bias-linear-output", "float64-bias-softmax"])
def test_a_parallel_pass_gives_the_bits_of_one_thread(dtype, bias, row_op, monkeypatch):
    """A stack of Dense layers split over two threads in one parallel region, in the row
    form (fewer rows than a vector of lanes) and in the lanes form (up to two vectors, on
    the calling thread's plan): outputs bit for bit those of one thread, and forward's up to
    rounding. The widths leave uneven last blocks (21 = 12 + 9 features in the row form,
    16 + 5 in the lanes form), and a linear output layer of 6 features splits too; a softmax
    output layer runs whole. (The activations and both dtypes' other cases are the kernels'
    and the split's tests' concern: see pass_mlp.)"""
    passes = count_passes(monkeypatch)
    model = pass_mlp(dtype, bias, row_op)
    lanes = 16 if dtype == np.float32 else 8
    with two_threads():
        for n in (1, 3, 4, lanes - 1, lanes, 2 * lanes - 1):
            x = data(n, 9, dtype, seed=n)
            no_threads(monkeypatch)
            one_thread = model.predict(x)
            assert passes == []
            every_layer_in_a_pass(monkeypatch)
            got = model.predict(x), model(x)
            assert passes == [(n, 2, n >= lanes)] * 2
            passes.clear()
            for out in got:
                np.testing.assert_array_equal(out, one_thread)
            assert_close(got[0], forward(model, x), dtype)


def test_which_layers_a_pass_splits(monkeypatch):
    """One block per thread for a layer with enough bytes of weights, in whole 4-feature
    blocks (row form) or 8-row tiles (lanes form); a row op or small weights: one block;
    no pass where the split layers' weights fall short of PASS_MIN_BYTES."""
    rng = np.random.default_rng(0)
    model = Sequential([Dense(64, 100, activation="relu", rng=rng),   # 25 600 bytes
                        Dense(100, 30, activation="relu", rng=rng),   # 12 000 bytes
                        Dense(30, 20, activation="softmax", rng=rng)]).eval()
    plan = inference.plan_for(model)
    monkeypatch.setattr(inference, "PASS_LAYER_MIN_BYTES", 12_000)
    assert plan._pass_layout()[1:3] == ([True, True, False], 37_600)
    assert plan._pass_widths(2, lanes=False).tolist() == [52, 16, 20]
    assert plan._pass_widths(2, lanes=True).tolist() == [56, 16, 20]
    assert plan._pass_widths(3, lanes=False).tolist() == [36, 12, 20]
    assert plan._pass_widths(64, lanes=True).tolist() == [8, 8, 20]
    monkeypatch.setattr(inference, "PASS_LAYER_MIN_BYTES", 20_000)
    assert plan._pass_layout()[1:3] == ([True, False, False], 25_600)
    assert plan._pass_widths(2, lanes=False).tolist() == [52, 30, 20]
    passes = count_passes(monkeypatch)
    x = data(2, 64, np.float32)
    with two_threads():
        monkeypatch.setattr(inference, "PASS_MIN_BYTES", 25_601)
        model.predict(x)
        assert passes == []
        monkeypatch.setattr(inference, "PASS_MIN_BYTES", 25_600)
        model.predict(x)
        assert passes == [(2, 2, False)]


def test_the_mnist_mlp_takes_the_pass_by_default_and_the_digits_mlp_does_not(monkeypatch):
    """The defaults: the 784-256-256-10 MLP's 1 MiB of weights runs its small batches as a
    parallel pass (the 784×256 and 256×256 layers split), the 64-128-128-10 MLP's do not."""
    passes = count_passes(monkeypatch)
    rng = np.random.default_rng(0)

    def net(sizes):
        return Sequential([Dense(a, b, activation="relu" if i < len(sizes) - 2 else "softmax",
                                 rng=rng) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
                          ).eval()

    mnist, digits = net([784, 256, 256, 10]), net([64, 128, 128, 10])
    assert inference.plan_for(mnist)._pass_layout()[1] == [True, True, False]
    rows = count_row_chunks(monkeypatch)
    with two_threads():
        for n in (1, 15):
            digits.predict(data(n, 64, np.float32))
            assert passes == []
            x = data(n, 784, np.float32)
            got = mnist.predict(x)
            assert passes == [(n, 2, False)]
            passes.clear()
            assert_close(got, forward(mnist, x), np.float32)
        for n in (16, 17):  # from one vector of rows: one chunk of rows per thread
            mnist.predict(data(n, 784, np.float32))
        assert passes == [] and rows == [16, 17]
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        mnist.predict(data(1, 784, np.float32))
        assert passes == []  # one thread: no pass
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("lanes", [False, True], ids=["row", "lanes"])
def test_a_pass_completes_when_one_thread_runs_every_iteration(lanes, monkeypatch):
    """The pass's threads claim blocks, never wait for a block nobody took: with Numba
    running one thread, the driver's two iterations run one after the other, the first
    takes every block, and the result is the same (a pass with fixed owners would hang)."""
    every_layer_in_a_pass(monkeypatch)
    model = pass_mlp(bias=False, row_op=None)
    n = 16 if lanes else 3
    x = data(n, 9, np.float32)
    plan = inference.plan_for(model)
    with two_threads():
        expected = model.predict(x)
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        program = plan.lanes if lanes else plan.row
        route = plan._pass(n, 2, lanes, plan._allocate(n, program))
        out, finite = plan._execute(route, x, n, True)
        assert finite is True
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_array_equal(out, expected)


def test_non_finite_input_raises_through_a_pass(monkeypatch):
    """The first layer's blocks tell whether x is finite, however it is split: a NaN or
    inf in the first or the last row raises DataError naming it, in both forms, also where
    a weight column is zero (0·inf is NaN) — and non-finite weights are not a data error.
    (float32: the flags are the kernels', whose float64 build the split's test covers.)"""
    every_layer_in_a_pass(monkeypatch)
    passes = count_passes(monkeypatch)
    model = pass_mlp(bias=False, row_op=None)
    zeroed = pass_mlp(bias=False, row_op=None)
    zeroed.layers[0].W.data[:, 6] = 0.0
    with two_threads():
        for n in (1, 5, 16, 31):
            for bad in (np.nan, np.inf, -np.inf):
                for row, col in ((0, 0), (n - 1, 6)):
                    for net in (model, zeroed):
                        x = data(n, 9, np.float32, seed=n)
                        x[row, col] = bad
                        with pytest.raises(DataError, match=f"NaN or inf.*row {row}"):
                            net.predict(x)
        assert {lanes for _, _, lanes in passes} == {False, True}
        broken = pass_mlp(bias=False, row_op=None)
        broken.layers[1].W.data[3, 5] = np.inf
        out = broken.predict(data(3, 9, np.float32))
        assert not np.isfinite(out).all()


def test_a_pass_takes_one_thread_per_share_of_the_weights(monkeypatch):
    """At most one thread per PASS_BYTES_PER_THREAD of split weights (at least two), and
    more iterations than Numba has threads still complete (a thread runs two): 16 threads
    asked for, two running."""
    every_layer_in_a_pass(monkeypatch)
    model = pass_mlp(bias=False, row_op=None)
    plan = inference.plan_for(model)
    split = plan._pass_layout()[2]  # 9·48 + 48·21 + 21·6 weights, float32
    assert split == 4 * (9 * 48 + 48 * 21 + 21 * 6)
    x = data(3, 9, np.float32)
    with two_threads():
        expected = model.predict(x)
        monkeypatch.setattr(inference, "_threads", lambda: 16)
        for per_thread, team in ((split, 2), (split // 3, 3), (split // 8, 8), (1, 16)):
            monkeypatch.setattr(inference, "PASS_BYTES_PER_THREAD", per_thread)
            np.testing.assert_array_equal(model.predict(x), expected)
            assert ("pass", team, False, 0) in plan._local.buffers


# ---------------------------------------------------------------------------------------
# The packed form (large batches of a stack of Dense layers whose weights stay in cache)
needs_atomics = pytest.mark.skipif(not inference.atomics.AVAILABLE,
                                   reason="no yield call for the packed driver's waits: "
                                          f"{inference.atomics.REASON}")


def packed_mlp(dtype, activation="relu", bias=True, row_op=None):
    """Widths that leave a partial panel in every layer (panels of 32 float32 or 16 float64
    outputs: 45 and 33 need a masked second vector, 6 a masked first one)."""
    rng = np.random.default_rng(5)
    layers = [Dense(7, 45, activation=activation, bias=bias, rng=rng, dtype=dtype),
              Dense(45, 33, activation=activation, bias=bias, rng=rng, dtype=dtype),
              Dense(33, 6, activation=row_op, bias=bias, rng=rng, dtype=dtype)]
    return Sequential(layers).eval()


def run_packed(model, x, threads):
    """``(out, finite)`` of the packed driver's route for ``x`` on ``threads``."""
    plan = inference.plan_for(model)
    return plan._execute(plan._packed(len(x), threads), x, len(x), True)


@needs_atomics
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("activation, bias, row_op", [
    ("relu", True, None), ("gelu", False, None), ("tanh", True, "log_softmax")])
def test_the_packed_form_gives_the_lanes_forms_bits(dtype, activation, bias, row_op):
    """On any number of rows (blocks of 12-row tiles and every remainder) and threads, the
    packed form gives forward's outputs to rounding, and the lanes form's bits where no row
    op reorders a sum (the same products in the same order, the same σ)."""
    model = packed_mlp(dtype, activation, bias, row_op)
    for n in (1, 11, 12, 13, 16, 33, 100, 301, 1000):
        x = data(n, 7, dtype, seed=n) * 2
        expected = forward(model, x)
        lanes = model.predict(x) if n >= 16 else None  # (the lanes form from 16 rows on)
        for threads in (1, 2, 3):
            out, finite = run_packed(model, x, threads)
            assert finite and out.shape == (n, 6) and out.dtype == dtype
            assert_close(out, expected, dtype)
            if lanes is not None and row_op is None:
                np.testing.assert_array_equal(out, lanes)


@needs_atomics
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_predict_takes_the_packed_form_from_packed_min_rows(dtype, monkeypatch):
    calls = count_packed(monkeypatch)
    monkeypatch.setattr(inference, "PACKED_MIN_ROWS", 200)
    model = packed_mlp(dtype)
    for n in (199, 200, 777):
        x = data(n, 7, dtype, seed=n)
        predicted, called = uses_plan(model, x)
        np.testing.assert_array_equal(predicted, called)
        assert_close(predicted, forward(model, x), dtype)
    assert calls == [200, 200, 777, 777]


@needs_atomics
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_a_frozen_model_takes_the_packed_form_from_fewer_rows(dtype, monkeypatch):
    """From FROZEN_PACKED_MIN_ROWS rows, where a batch would run on more than one thread, a
    frozen model's batches run in the packed form (its panels are never checked); a live
    model's only from PACKED_MIN_ROWS (checking its panels would cost more than the tiles
    save); on one thread, neither."""
    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here: the threads' blocks need two")
    calls = count_packed(monkeypatch)
    monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)  # (tiny weights: no parallel
    model = packed_mlp(dtype)  # pass; chunks of rows from two vectors of rows)
    frozen = bp.freeze(model)
    P = inference.PACKED_MIN_ROWS
    rows = (15, 16, 31, 40, P - 1, P)
    for net in (frozen, model):
        for n in rows:
            x = data(n, 7, dtype, seed=n)
            assert_close(net.predict(x), forward(model, x), dtype)
    lanes = 16 if dtype == np.float32 else 8
    taken = [n for n in rows if n >= 16 and n > lanes] + [P]
    assert calls == taken
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        x = data(40, 7, dtype)
        assert_close(frozen.predict(x), forward(model, x), dtype)
    finally:
        numba.set_num_threads(previous)
    assert calls == taken  # one thread: the lanes form


@needs_atomics
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_non_finite_input_raises_through_a_frozen_models_small_batch(dtype, monkeypatch):
    """The first layer's epilogue of each thread's block is the only NaN/inf check of a
    frozen model's small batch in the packed form: a bad value in any row, in any block of
    features, fails."""
    calls = count_packed(monkeypatch)
    monkeypatch.setattr(inference, "PARALLEL_MIN_MACS", 0)
    wide = Sequential([Dense(300, 20, rng=0, dtype=dtype), Dense(20, 3, rng=1, dtype=dtype)])
    frozen = bp.freeze(wide)
    for n in (33, 100):
        for row, col in ((0, 0), (n - 1, 299), (n // 2, 150), (13, 299)):
            for bad in (np.nan, np.inf, -np.inf):
                x = data(n, 300, dtype, seed=row)
                x[row, col] = bad
                with pytest.raises(DataError, match=f"row {row}"):
                    frozen.predict(x)
            x[row, col] = 0.0
            assert np.isfinite(frozen.predict(x)).all()
    assert set(calls) == {33, 100}


@needs_atomics
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_non_finite_input_raises_through_the_packed_form(dtype, monkeypatch):
    """The first layer's epilogue is the packed form's only NaN/inf check: a bad value in any
    block of rows, in any block of features, also against all-zero weights, fails."""
    monkeypatch.setattr(inference, "PACKED_MIN_ROWS", 100)
    wide = Sequential([Dense(300, 20, rng=0, dtype=dtype), Dense(20, 3, rng=1, dtype=dtype)])
    assert_bad_values_raise(wide.eval(), 700, dtype,
                            lambda n: ((0, 0), (n - 1, 299), (n // 2, 150), (13, 299)))


@needs_atomics
def test_the_packed_form_reads_the_weights_at_every_call(monkeypatch):
    """The panels are packed at every call: in-place updates and new arrays are seen."""
    monkeypatch.setattr(inference, "PACKED_MIN_ROWS", 100)
    model = packed_mlp(np.float32)
    x = data(400, 7, np.float32)
    model.predict(x)
    model.layers[0].W.data *= 2.0
    model.layers[1].b.data += 1.0
    assert_close(model.predict(x), forward(model, x), np.float32)
    model.layers[2].W.data = model.layers[2].W.data[::-1].copy()
    assert_close(model.predict(x), forward(model, x), np.float32)


@needs_atomics
def test_the_packed_form_completes_when_one_thread_runs_every_iteration():
    """The threads claim panels and blocks of rows, and wait only for panels a running
    thread claimed: with Numba running one thread, three iterations run one after the
    other, the first does all the work, and the bits are those of any other split."""
    import numba

    model = packed_mlp(np.float32)
    x = data(500, 7, np.float32)
    expected, _ = run_packed(model, x, 2)
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        out, finite = run_packed(model, x, 3)
    finally:
        numba.set_num_threads(previous)
    assert finite
    np.testing.assert_array_equal(out, expected)


def test_the_packed_drivers_source_names_its_kernels():
    """One driver per stack of activations; its text names every kernel it calls (Numba's
    disk cache finds a driver by its text)."""
    source = inference._packed_source((("relu", 0), ("identity", 1)))
    assert "epilogue_relu_0(H1[t, :m], b0, a0)" in source
    assert "epilogue_identity_1(out[r0:r1], b1, a1)" in source
    assert "flags[c] = epilogue_relu_0" in source
    one = inference._packed_source((("tanh", 2),))
    assert "packed_product(x[r0:r1], P0, out[r0:r1])" in one and "H1" not in one


@pytest.mark.parametrize("n", [5, 40, 2000], ids=["row", "lanes", "packed"])
def test_weights_of_another_shape_take_the_normal_path(n):
    """A weight or bias array swapped for one of another shape than its layer's is never
    read by a plan's kernels (they index it unchecked): the normal path runs, and says what
    is wrong."""
    model = packed_mlp(np.float32)
    x = data(n, 7, np.float32)
    model.predict(x)
    model.layers[1].W.data = np.zeros((33, 44), np.float32)
    assert inference.run(model, x) is None
    with pytest.raises(Exception):
        model.predict(x)
    model.layers[1].W.data = np.zeros((33, 45), np.float32)
    model.layers[0].b.data = np.zeros(44, np.float32)
    assert inference.run(model, x) is None


@needs_atomics
def test_batches_of_any_size_share_one_set_of_panels(monkeypatch):
    """The panels (and the copy of the weights they were packed from) are the calling
    thread's, whatever the batch size: a change seen at one size is seen at the next."""
    monkeypatch.setattr(inference, "PACKED_MIN_ROWS", 100)
    model = packed_mlp(np.float32)
    plan = inference.plan_for(model)
    small, large = data(300, 7, np.float32), data(900, 7, np.float32, seed=1)
    model.predict(small)
    panels = plan._local.panels
    model.predict(large)
    assert plan._local.panels is panels
    model.layers[1].W.data *= -1.0
    assert_close(model.predict(small), forward(model, small), np.float32)
    assert_close(model.predict(large), forward(model, large), np.float32)
