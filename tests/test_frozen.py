"""backprop.frozen: a frozen model computes what its model computed at the freeze, on every
inference path (the plans' row, lanes and packed forms, the normal path), whatever happens
to the model afterwards; checks its input like predict; threads; pickling."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import backprop as bp
from backprop import inference, kernels
from backprop.data import DataError
from backprop.layers import BatchNorm1d, Dense
from backprop.model import Sequential


@pytest.fixture(autouse=True)
def numba_on_cpu():
    previous = kernels.get_choice()
    kernels.set_backend("auto")
    with bp.use_device("cpu"):
        yield
    kernels.set_backend(previous)


def mlp(dtype=np.float32):
    rng = np.random.default_rng(0)
    return Sequential([Dense(7, 45, activation="relu", rng=rng, dtype=dtype),
                       Dense(45, 33, activation="tanh", rng=rng, dtype=dtype),
                       Dense(33, 6, rng=rng, dtype=dtype)])


def data(n, features=7, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, features)).astype(dtype)


ROWS = (3, 40, 300, 1500)  # the row form, the lanes form, the packed form (from 256 rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_a_frozen_model_keeps_the_outputs_of_the_freeze(dtype):
    model = mlp(dtype)
    inputs = [data(n, dtype=dtype, seed=n) for n in ROWS]
    before = [model.predict(x) for x in inputs]
    frozen = bp.freeze(model)
    assert model._training  # the model's own mode is untouched
    for x, expected in zip(inputs, before):
        np.testing.assert_array_equal(frozen.predict(x), expected)
        np.testing.assert_array_equal(frozen(x), expected)
    model.layers[0].W.data *= 2.0  # in place: seen by the model, not by the snapshot
    model.layers[2].b.data = model.layers[2].b.data + 1.0
    for x, expected in zip(inputs, before):
        np.testing.assert_array_equal(frozen.predict(x), expected)
        assert not np.array_equal(model.predict(x), expected)
    assert frozen.in_features == 7
    assert "FrozenModel(Sequential(" in repr(frozen)


def test_training_the_model_after_the_freeze_changes_nothing():
    model = mlp()
    X, y = data(256), np.random.default_rng(1).integers(0, 6, 256)
    frozen = bp.freeze(model)
    expected = frozen.predict(X)
    bp.fit(model, X, y, loss=bp.SoftmaxCrossEntropyLoss(), optimizer="adam", lr=0.05,
           epochs=2, batch_size=64, verbose=0)
    np.testing.assert_array_equal(frozen.predict(X), expected)
    assert not np.array_equal(model.predict(X), expected)


@pytest.mark.skipif(not inference.atomics.AVAILABLE,
                    reason=f"no packed form here: {inference.atomics.REASON}")
def test_a_frozen_plan_packs_once_and_never_checks():
    """The snapshot's panels are packed on its first large batch and never compared with the
    weights again: a change made behind the contract (to the private copy) is not seen by
    the packed form, where the live model's plan sees it."""
    frozen = bp.freeze(mlp())
    plan = inference.plan_for(frozen._model)
    assert plan.frozen and not inference.plan_for(mlp()).frozen
    x = data(1500)
    first = frozen.predict(x)
    frozen._model.layers[0].W.data[:] = 0.0
    np.testing.assert_array_equal(frozen.predict(x), first)  # the panels as first packed
    assert not np.array_equal(frozen.predict(x[:40]), first[:40])  # the lanes form reads W


def test_a_frozen_model_checks_its_input_like_predict():
    frozen = bp.freeze(mlp())
    for n in ROWS:
        x = data(n)
        x[n // 2, 3] = np.nan
        with pytest.raises(DataError, match=f"NaN or inf.*row {n // 2}"):
            frozen.predict(x)
    with pytest.raises(DataError):
        frozen.predict(data(5, features=8))
    with pytest.raises(TypeError, match="freeze takes a backprop model"):
        bp.freeze(object())


def test_other_layers_and_modes_take_the_normal_path():
    model = Sequential([BatchNorm1d(7), Dense(7, 3, rng=0)])
    x = data(500)
    model.train()
    bp.fit(model, x, np.zeros((500, 3), np.float32), loss=bp.MSELoss(), epochs=1,
           batch_size=100, verbose=0)
    frozen = bp.freeze(model)
    assert model._training  # frozen in eval mode, the model left as it was
    with bp.inference_mode():
        expected = model.forward(x).copy()
    np.testing.assert_allclose(frozen.predict(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frozen(x), expected, rtol=1e-5, atol=1e-6)


def test_threads_and_pickle():
    frozen = bp.freeze(mlp())
    inputs = [data(n, seed=n) for n in ROWS]
    expected = [frozen.predict(x) for x in inputs]
    clone = pickle.loads(pickle.dumps(frozen))
    assert inference.plan_for(clone._model).frozen
    for x, e in zip(inputs, expected):
        np.testing.assert_array_equal(clone.predict(x), e)
    errors, bad = [], []

    def worker(offset):
        try:
            for k in range(40):
                i = (k + offset) % len(inputs)
                if not np.array_equal(frozen.predict(inputs[i]), expected[i]):
                    bad.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bad == []


def count_binds(monkeypatch):
    """The row counts of the routes the plans bind (``Plan._bind``), one entry per route."""
    binds = []
    real = inference.Plan._bind

    def counted(plan, n):
        binds.append(n)
        return real(plan, n)

    monkeypatch.setattr(inference.Plan, "_bind", counted)
    return binds


def test_a_frozen_model_binds_a_batch_size_once_per_thread(monkeypatch):
    """A frozen model's route for a batch size and thread count is bound on its first call
    on a thread and run at once after (``Plan.bound``): the same bits, NaN/inf still raise
    naming the row, the first packing of the panels is not kept; a live model binds on
    every call."""
    binds = count_binds(monkeypatch)
    frozen = bp.freeze(mlp())
    for n in ROWS:
        x = data(n, seed=n)
        first = frozen.predict(x)
        for _ in range(2):
            np.testing.assert_array_equal(frozen.predict(x), first)
        for row in (0, n - 1):
            bad = x.copy()
            bad[row, 6] = np.inf
            with pytest.raises(DataError, match=f"row {row}"):
                frozen.predict(bad)
    # the 300 rows' first call packs the panels (not kept); the 1500 rows' finds them packed
    packed = [300] if inference.atomics.AVAILABLE else []
    assert binds == [3, 40, 300, *packed, 1500]
    plan = inference.plan_for(frozen._model)
    assert plan.bound(40) is not None and plan.bound(41) is None
    binds.clear()
    model = mlp()
    for _ in range(3):
        model.predict(data(40))
    assert binds == [40] * 3


def test_a_frozen_models_bound_routes_follow_the_threads_and_the_kernels(monkeypatch):
    """The bound route is per thread count (Numba's count is per calling thread) and per
    calling thread; another kernel choice takes the normal path; at most
    ``_THREAD_BUFFERS_KEPT`` routes are kept per thread."""
    import numba

    binds = count_binds(monkeypatch)
    frozen = bp.freeze(mlp())
    plan = inference.plan_for(frozen._model)
    x = data(40)
    expected = frozen.predict(x)
    frozen.predict(x)
    assert binds == [40]
    if numba.get_num_threads() > 1:
        previous = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            assert plan.bound(40) is None
            np.testing.assert_array_equal(frozen.predict(x), expected)
            assert binds == [40, 40]
        finally:
            numba.set_num_threads(previous)
    seen = []
    thread = threading.Thread(target=lambda: seen.append((plan.bound(40), frozen.predict(x))))
    thread.start()
    thread.join()
    assert seen[0][0] is None  # another thread's routes are its own
    np.testing.assert_array_equal(seen[0][1], expected)
    binds.clear()
    kernels.set_backend("reference")
    np.testing.assert_allclose(frozen.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert binds == []
    kernels.set_backend("auto")
    for n in range(1, 3 * inference._THREAD_BUFFERS_KEPT):
        frozen.predict(data(n))
    assert len(plan._local.bound) == inference._THREAD_BUFFERS_KEPT
    np.testing.assert_array_equal(frozen.predict(x), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_a_frozen_stacks_serial_driver_gives_the_ops_bits(dtype):
    """Where a batch runs on the calling thread, a frozen stack of Dense layers runs its
    whole program in one Numba call (the serial driver, row form below one vector of rows,
    lanes form from it): the kernels of the live model's ops in the same order, so the
    same bits, with or without bias, through a row op; NaN/inf raise."""
    rng = np.random.default_rng(3)
    model = Sequential([Dense(7, 20, activation="tanh", bias=False, rng=rng, dtype=dtype),
                        Dense(20, 9, activation="relu", rng=rng, dtype=dtype),
                        Dense(9, 4, activation="log_softmax", rng=rng, dtype=dtype)]).eval()
    frozen = bp.freeze(model)
    plan = inference.plan_for(frozen._model)
    for n in (1, 3, 16, 21):
        x = data(n, 7, dtype, seed=n)
        expected = model.predict(x)
        for _ in range(2):  # the route's first call, then its bound call
            np.testing.assert_array_equal(frozen.predict(x), expected)
        np.testing.assert_array_equal(frozen(x), model(x))
        assert plan.bound(n)[0].py_func.__name__ == (
            "serial_lanes_driver" if n >= (16 if dtype == np.float32 else 8)
            else "serial_row_driver")
        x[n - 1, 6] = np.nan
        with pytest.raises(DataError, match=f"row {n - 1}"):
            frozen.predict(x)


def test_live_and_frozen_plans_from_two_threads_under_the_workqueue_layer():
    """Numba's workqueue layer aborts the process when two threads launch parallel code at
    once: the plans' parallel drivers take turns there (never launched straight), whether
    for a live model or through a frozen model's bound route, beside serial drivers."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading, numpy as np, backprop as bp
        from backprop import inference
        from backprop.layers import Dense
        from backprop.model import Sequential
        rng = np.random.default_rng(0)
        model = Sequential([Dense(7, 45, activation="relu", rng=rng),
                            Dense(45, 33, activation="tanh", rng=rng),
                            Dense(33, 6, rng=rng)]).eval()
        frozen = bp.freeze(model)
        data = [np.random.default_rng(n).normal(size=(n, 7)).astype(np.float32)
                for n in (3, 40, 300)]
        frozen.predict(data[0])  # (a serial driver)
        inference.PARALLEL_MIN_MACS = 0  # two threads' chunks from 17 rows
        expected = [model.predict(x) for x in data]
        bad = []
        def work(seed):
            for k in range(40):
                x, want = data[(k + seed) % 3], expected[(k + seed) % 3]
                for net in (model, frozen):
                    if not np.allclose(net.predict(x), want, rtol=1e-5, atol=1e-6):
                        bad.append((seed, k))
        threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
        [t.start() for t in threads]; [t.join() for t in threads]
        import numba; print(numba.threading_layer(), len(bad))
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["workqueue", "0"]
