"""Threads (backprop/concurrency.py): different models train at once with the results of
training each alone; predict, evaluate and a loss run on one object from many threads; a
model trained by two fits at once is refused, never corrupted. Per device (the GPU CI runs
the cuda rows), and on the CPU with whatever kernel backend the job selected (numba_cpu,
reference, or a GPU backend run on the host)."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
import textwrap

import numpy as np
import pytest

import backprop as bp
from backprop import callbacks as C
from backprop import kernels as K
from backprop.backend import use_device
from backprop.concurrency import ConcurrentTrainingError, inference_mode
from backprop.layers import BatchNorm1d, Dense, Dropout
from backprop.losses import SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop.regularizers import L2

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


# a batch of 2048 rows of 1024 features takes the parallel path of the numba_cpu kernels,
# which release the GIL (2**21 elements against PARALLEL_MIN_ELEMENTS)
ROWS, FEATURES, WIDE = 4096, 64, 1024
BATCH = 2048


@pytest.fixture
def cpu(kernels_for_both_devices):
    """CPU arrays, with CPU kernels also where the job selected BACKPROP_KERNELS=cupy."""
    with use_device("cpu"):
        yield


def _model(seed, wide=WIDE):
    return Sequential([Dense(FEATURES, wide, activation="relu", rng=seed), BatchNorm1d(wide),
                       Dropout(0.2, seed=seed), Dense(wide, 10, rng=seed + 1)])


class _Work:
    """How much each race test does. The full sizes make the numba_cpu kernels take their
    parallel path (which releases the GIL) and give the threads time to interleave; the host
    runs of the other backends (reference, cupy_on_host: NumPy and serial C++ on the CPU,
    which the conftest routes every kernel call to) exercise the same library code (per-
    thread buffers, workspaces, flags) and are many times slower per element, so they run
    an eighth of the width and fewer rounds."""

    def __init__(self, full: bool):
        self.wide, self.batch, self.rows = (WIDE, BATCH, ROWS) if full else (128, 256, 1024)
        self.rounds = 1 if full else 0.2  # a fraction of each test's own repeat count
        self.shapes = ((BATCH, WIDE), (1536, 700)) if full else ((256, 128), (192, 90))

    def repeats(self, n: int) -> int:
        return max(2, int(n * self.rounds))


@pytest.fixture
def work(cpu_kernels):
    return _Work(full=cpu_kernels == "default")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    return X, rng.integers(0, 10, ROWS)


def _run_in_threads(targets):
    """Start every callable at once (a barrier), join, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def run(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_the_shapes_take_the_parallel_path_of_the_numba_cpu_kernels(cpu):
    from backprop.kernels import numba_cpu

    assert BATCH * WIDE >= numba_cpu.PARALLEL_MIN_ELEMENTS


def test_two_models_trained_in_two_threads_equal_each_trained_alone(device, data, work):
    X, y = (a[:work.rows] for a in data)
    shared = L2(1e-4)  # one regularizer object serving both models: its scratch is per thread

    def train(model, seed):
        model.add_regularizer(shared)
        model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=work.batch,
                  seed=seed, verbose=0)

    alone = []
    for seed in (1, 2):
        model = _model(seed, work.wide)
        train(model, seed)
        alone.append(model.state_dict())
    together = [_model(1, work.wide), _model(2, work.wide)]
    _run_in_threads([lambda: train(together[0], 1), lambda: train(together[1], 2)])
    for model, expected in zip(together, alone):
        state = model.state_dict()  # NumPy copies, from either device
        for name in expected:
            np.testing.assert_array_equal(state[name], expected[name], err_msg=name)


def test_kernels_called_from_two_threads_give_the_single_thread_results(cpu, work):
    """The ops that keep partial sums in scratch memory (bias gradient, BatchNorm), called
    at once from two threads on different shapes."""
    rng = np.random.default_rng(3)
    cases = []
    for n, m in work.shapes:
        da = rng.normal(size=(n, m)).astype(np.float32)
        z = rng.normal(size=(n, m)).astype(np.float32)
        cases.append((da, z))

    def run(da, z):
        delta, db = np.empty_like(da), np.empty(da.shape[1], np.float32)
        K.bias_act_backward(da, z, z, "gelu_erf", 0.0, delta, db, False)
        x = da + 1.0
        m = x.shape[1]
        out, mean, var, invstd = (np.empty_like(x), np.empty(m, np.float32),
                                  np.empty(m, np.float32), np.empty(m, np.float32))
        gamma, beta = np.ones(m, np.float32), np.zeros(m, np.float32)
        K.batchnorm_forward(x, gamma, beta, 1e-5, out, mean, var, invstd)
        dx, dgamma, dbeta = np.empty_like(x), np.empty(m, np.float32), np.empty(m, np.float32)
        K.batchnorm_backward(da, x, gamma, mean, invstd, dx, dgamma, dbeta, False)
        return delta, db, out, dx, dgamma, dbeta

    expected = [run(*case) for case in cases]
    for _ in range(work.repeats(3)):
        got = [None, None]

        def worker(i):
            def fn():
                for _ in range(work.repeats(4)):
                    got[i] = run(*cases[i])
                    for a, b in zip(got[i], expected[i]):
                        np.testing.assert_array_equal(a, b)
            return fn
        _run_in_threads([worker(0), worker(1)])


def test_predict_and_evaluate_from_eight_threads_on_one_model(device, data, work):
    X, y = data
    model = _model(5, work.wide)
    model.fit(X[:512], y[:512], loss="cross_entropy", epochs=1, batch_size=64, seed=0,
              verbose=0)
    model.train()  # predict must be eval-mode even while the model's flag says training
    loss = SoftmaxCrossEntropyLoss()
    parts = [X[i * 300:(i + 1) * 300] for i in range(8)]
    labels = [y[i * 300:(i + 1) * 300] for i in range(8)]
    expected = [bp.to_numpy(model.predict(p, batch_size=64)) for p in parts]
    expected_eval = [model.evaluate(p, t, loss=loss, batch_size=64)
                     for p, t in zip(parts, labels)]
    mismatches = []

    def worker(i):
        def fn():
            for _ in range(work.repeats(10)):
                out = bp.to_numpy(model.predict(parts[i], batch_size=64))
                if not np.array_equal(out, expected[i]):
                    mismatches.append(("predict", i))
                if model.evaluate(parts[i], labels[i], loss=loss, batch_size=64) \
                        != expected_eval[i]:
                    mismatches.append(("evaluate", i))
        return fn
    _run_in_threads([worker(i) for i in range(8)])
    assert mismatches == []
    assert model.training  # nobody flipped the shared flag
    assert loss.validate_labels  # nor the loss's own switch


def test_model_call_from_threads_returns_each_callers_output(cpu):
    rng = np.random.default_rng(1)
    model = Sequential([Dense(8, 32, activation="tanh", rng=rng), Dense(32, 3, rng=rng)])
    inputs = [rng.normal(size=(50 + i, 8)).astype(np.float32) for i in range(6)]
    expected = [model(x) for x in inputs]
    bad = []

    def worker(i):
        def fn():
            for _ in range(200):
                if not np.array_equal(model(inputs[i]), expected[i]):
                    bad.append(i)
        return fn
    _run_in_threads([worker(i) for i in range(6)])
    assert bad == []


def test_one_loss_object_computes_each_threads_gradient(cpu, work):
    rng = np.random.default_rng(2)
    loss = SoftmaxCrossEntropyLoss()
    logits = [rng.normal(size=(64, 5)).astype(np.float32) for _ in range(4)]
    labels = [rng.integers(0, 5, 64) for _ in range(4)]
    expected = []
    for z, t in zip(logits, labels):
        value = float(loss.forward(z, t))
        expected.append((value, loss.backward().copy()))
    bad = []

    def worker(i):
        def fn():
            for _ in range(work.repeats(200)):
                value = float(loss.forward(logits[i], labels[i]))
                if value != expected[i][0] or not np.array_equal(loss.backward(), expected[i][1]):
                    bad.append(i)
        return fn
    _run_in_threads([worker(i) for i in range(4)])
    assert bad == []


class _Hold(C.Callback):
    """Holds fit at the start of its first epoch until released."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def on_epoch_begin(self, epoch, logs=None):
        self.entered.set()
        assert self.release.wait(30)


def test_a_second_fit_on_a_model_in_training_is_refused_and_changes_nothing(device, data):
    X, y = data
    X, y = X[:256], y[:256]
    model = _model(7)
    optimizer = bp.Adam(model.parameters(), lr=1e-3)
    hold = _Hold()
    errors = []

    def first():
        try:
            model.fit(X, y, loss="cross_entropy", optimizer=optimizer, epochs=1,
                      batch_size=64, seed=0, verbose=0, callbacks=[hold])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=first, name="trainer-A")
    thread.start()
    try:
        assert hold.entered.wait(30)
        before = model.state_dict()
        with pytest.raises(ConcurrentTrainingError, match="trainer-A"):
            model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=64, verbose=0)
        with pytest.raises(ConcurrentTrainingError, match="trainer-A"):
            optimizer.step()
        other = Sequential([model[0]] + [Dense(WIDE, 2)])  # shares the first layer
        with pytest.raises(ConcurrentTrainingError, match="parameter '0.W'"):
            other.fit(X, y % 2, loss="cross_entropy", epochs=1, batch_size=64, verbose=0)
        after = model.state_dict()
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    finally:
        hold.release.set()
        thread.join()
    assert errors == []
    # the claim ends with the fit: the model trains again, from this thread
    model.fit(X, y, loss="cross_entropy", optimizer=optimizer, epochs=1, batch_size=64,
              verbose=0)


def test_fit_from_a_callback_of_fit_on_the_same_model_is_refused(cpu, data):
    X, y = data
    X, y = X[:128], y[:128]
    model = _model(8)
    seen = []

    class Nested(C.Callback):
        def on_epoch_end(self, epoch, logs=None):
            try:
                model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=64, verbose=0)
            except ConcurrentTrainingError as exc:
                seen.append(str(exc))

    model.fit(X, y, loss="cross_entropy", epochs=1, batch_size=64, verbose=0,
              callbacks=[Nested()])
    assert len(seen) == 1 and "this thread" in seen[0]


def test_the_claim_is_released_when_fit_raises(cpu, data):
    X, y = data
    model = _model(9)

    class Fail(C.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise KeyError("from a callback")

    with pytest.raises(KeyError):
        model.fit(X[:128], y[:128], loss="cross_entropy", epochs=1, batch_size=64, verbose=0,
                  callbacks=[Fail()])
    model.fit(X[:128], y[:128], loss="cross_entropy", epochs=1, batch_size=64, verbose=0)


def test_inference_mode_is_per_thread(cpu):
    layer = Dropout(0.5)
    seen = {}

    def other():
        seen["other"] = layer.training

    with inference_mode():
        assert not layer.training
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["other"] and layer.training


def test_backward_without_forward_in_this_thread_says_so(cpu):
    layer = Dense(3, 2)
    layer.forward(np.ones((4, 3), np.float32))
    errors = []

    def other():
        try:
            layer.backward(np.ones((4, 2), np.float32))
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "forward() first, in this thread" in errors[0]


def test_models_copy_and_pickle_with_their_per_thread_state_left_behind(device, data):
    X, y = data
    model = _model(11)
    model.add_regularizer(L2(1e-3))
    model.fit(X[:256], y[:256], loss="cross_entropy", epochs=1, batch_size=64, verbose=0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(bp.to_numpy(clone.predict(X[:100])),
                                      bp.to_numpy(model.predict(X[:100])))
        clone.fit(X[:256], y[:256], loss="cross_entropy", epochs=1, batch_size=64, verbose=0)


@pytest.mark.one_backend
def test_parallel_kernels_from_two_threads_under_the_workqueue_layer(cpu, cpu_kernels):
    """Numba's workqueue layer aborts the process when two threads launch parallel kernels
    at once; numba_cpu serialises its parallel launches under it."""
    if cpu_kernels != "default" or K.get_choice() == "reference":
        pytest.skip("concerns Numba's threading layers (numba_cpu kernels)")
    script = textwrap.dedent(f"""
        import threading, numpy as np
        from backprop.kernels import numba_cpu
        z = [np.random.default_rng(i).normal(size=({BATCH}, {WIDE})).astype(np.float32)
             for i in range(2)]
        def run(a):
            for _ in range(20):
                numba_cpu.bias_act_forward(a, None, np.empty_like(a), "sigmoid", 0.0)
        threads = [threading.Thread(target=run, args=(a,)) for a in z]
        [t.start() for t in threads]; [t.join() for t in threads]
        import numba; print(numba.threading_layer())
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "workqueue"
