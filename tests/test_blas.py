"""BLAS threads sized to a model's matrix products (backprop/blas.py) and fit running under
that cap. CPU models only (the cap concerns the host's BLAS), also under
``BACKPROP_DEVICE=cuda``."""
from __future__ import annotations

import numpy as np
import pytest

from backprop import blas, gemm
from backprop import callbacks as C
from backprop import training
from backprop.backend import use_device
from backprop.layers import BatchNorm1d, Dense, Dropout, Layer, Residual
from backprop.model import Sequential


@pytest.fixture(autouse=True)
def products_on_openblas():
    """The Dense layers' products on NumPy's OpenBLAS, which the cap concerns, even where
    MKL is installed (where MKL runs them, a pass takes no cap: test_mkl_products_...)."""
    before = gemm.backend()
    gemm.set_backend("numpy")
    yield
    gemm.set_backend(before)


def _openblas_threads() -> int:
    """OpenBLAS's thread count now, or skip (with the reason) where it cannot be capped."""
    if blas._openblas() is None:
        pytest.skip("no OpenBLAS with a pthreads pool in this process (threadpoolctl found "
                    "none): blas.threads_for leaves BLAS alone here")
    return blas._threads(blas._openblas())


@use_device("cpu")
def test_largest_product_is_the_largest_dense_layer_times_the_batch():
    model = Sequential([Dense(64, 128, activation="relu"), BatchNorm1d(128), Dropout(0.1),
                        Residual([Dense(128, 300, activation="relu"), Dense(300, 128)]),
                        Dense(128, 10)])
    assert blas.largest_product(model, 32) == 32 * 128 * 300
    assert blas.largest_product(Sequential([Dropout(0.5)]), 32) == 0


def test_small_products_run_on_one_thread_and_the_count_is_restored():
    before = _openblas_threads()
    if before < 2:
        pytest.skip(f"OpenBLAS runs {before} thread here: nothing to cap")
    with blas.threads_for(blas.MACS_PER_THREAD - 1):
        assert _openblas_threads() == 1
    assert _openblas_threads() == before
    with blas.threads_for(before * blas.MACS_PER_THREAD):  # large enough for every thread
        assert _openblas_threads() == before
    assert _openblas_threads() == before


class _BlasThreads(C.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_batch_end(self, batch, logs=None):
        self.seen.append(_openblas_threads())


@pytest.mark.parametrize("features, width", [(8, 32), (64, 2048)], ids=["small", "large"])
@use_device("cpu")
def test_fit_trains_under_the_cap_of_its_model(features, width):
    before = _openblas_threads()
    if before < 2:
        pytest.skip(f"OpenBLAS runs {before} thread here: nothing to cap")
    model = Sequential([Dense(features, width, activation="relu"), Dense(width, 2)])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((256, features)).astype(np.float32), rng.integers(0, 2, 256)
    record = _BlasThreads()
    training.fit(model, X, y, loss="cross_entropy", epochs=1, batch_size=128,
                 callbacks=[record], verbose=0, seed=0)
    # 128·8·32 multiply-adds: one thread; 128·64·2048 = 16.8 M: every thread OpenBLAS has
    want = min(before, max(1, 128 * features * width // blas.MACS_PER_THREAD))
    assert want == (1 if width == 32 else before)
    assert record.seen == [want, want]
    assert _openblas_threads() == before


class _RecordThreads(Layer):
    """Passes its input through, recording OpenBLAS's thread count in forward and backward."""

    preserves_shape = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(("forward", _openblas_threads()))
        return x

    def backward(self, grad, need_input_grad=True):
        self.seen.append(("backward", _openblas_threads()))
        return grad


def _probed_model(rows, width):
    """``(OpenBLAS's threads now, the probe, a model with the probe between two Dense
    layers, a batch)``; skipped where OpenBLAS runs one thread (nothing to cap)."""
    before = _openblas_threads()
    if before < 2:
        pytest.skip(f"OpenBLAS runs {before} thread here: nothing to cap")
    probe = _RecordThreads()
    model = Sequential([Dense(width, width, activation="relu"), probe, Dense(width, 2)])
    x = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    return before, probe, model, x


@pytest.mark.parametrize("rows, width, capped", [(64, 128, True), (4, 16, False),
                                                 (256, 2048, False)],
                         ids=["digits-size", "one-thread-anyway", "large"])
@use_device("cpu")
def test_a_pass_outside_fit_caps_itself_and_restores_the_count(rows, width, capped):
    """A hand-written loop's forward and backward run under the cap fit would set, and the
    caller's own code before and after runs on the threads it had; products OpenBLAS runs
    on one thread anyway, and large ones, leave the count alone."""
    before, probe, model, x = _probed_model(rows, width)
    model.backward(model.forward(x).copy())
    inside = 1 if capped else before
    assert probe.seen == [("forward", inside), ("backward", inside)]
    assert _openblas_threads() == before
    token = blas.acquire(rows * width * width)
    try:
        assert (token is None) == (not capped)
    finally:
        blas.release(token)
    assert _openblas_threads() == before


@pytest.mark.parametrize("rows, width, capped", [(4, 16, False), (256, 2048, True)],
                         ids=["one-thread-anyway", "large"])
@use_device("cpu")
def test_a_mixed_precision_pass_caps_only_what_openblas_would_thread(rows, width, capped,
                                                                    monkeypatch):
    """Under autocast the float32 products left to OpenBLAS run on one thread (a second one,
    spinning, took the core from MKL's); a pass whose products OpenBLAS runs on one thread
    by itself leaves the count alone, without a call (two set_num_threads calls per pass
    cost a tiny model's step a fifth of its time)."""
    import backprop as bp

    monkeypatch.setenv("BACKPROP_LOWP_EMULATE", "1")
    before, probe, model, x = _probed_model(rows, width)
    calls = []
    acquire = blas.acquire
    monkeypatch.setattr(blas, "acquire", lambda largest: calls.append(largest) or
                        acquire(largest))
    with bp.autocast("bfloat16", emulate=True):
        model.backward(model.forward(x).copy())
    inside = 1 if capped else before
    assert probe.seen == [("forward", inside), ("backward", inside)]
    assert (calls != []) == capped
    assert _openblas_threads() == before


@use_device("cpu")
def test_a_pass_whose_products_run_on_mkl_takes_no_cap(monkeypatch):
    """Where MKL runs every Dense product (backprop.gemm), OpenBLAS has none to run: a pass
    leaves its thread count alone, without a call."""
    from backprop import bf16

    if bf16._mkl().get("lib") is None:
        pytest.skip(f"MKL cannot be used here: {bf16._mkl()['error']}")
    before, probe, model, x = _probed_model(64, 128)
    gemm.set_backend("mkl")
    calls = []
    acquire = blas.acquire
    monkeypatch.setattr(blas, "acquire", lambda largest: calls.append(largest) or
                        acquire(largest))
    model.backward(model.forward(x).copy())
    assert probe.seen == [("forward", before), ("backward", before)]
    assert calls == []
    gemm.set_backend("numpy")
    model.backward(model.forward(x).copy())  # the same pass on OpenBLAS: capped
    assert probe.seen[2:] == [("forward", 1), ("backward", 1)] and len(calls) == 2
