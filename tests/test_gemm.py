"""backprop.gemm: the Dense layers' products on MKL where it is installed."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import backprop as bp
from backprop import bf16, gemm


def mkl_or_skip():
    info = bf16._mkl()
    if info.get("lib") is None:
        pytest.skip(f"MKL cannot be used here: {info['error']}")


@pytest.fixture
def backend_restored():
    yield
    gemm._STATE.clear()  # the next product resolves BACKPROP_GEMM again


@pytest.fixture
def on_mkl(monkeypatch, backend_restored):
    """MKL, for products of any size (the threshold is tested on its own)."""
    mkl_or_skip()
    monkeypatch.setattr(gemm, "MKL_MIN_MACS", 1)
    assert gemm.set_backend("mkl") == "mkl"


FORMS = [(False, True), (True, False), (False, False), (True, True)]


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("trans_a, trans_b", FORMS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_product_matches_numpy(on_mkl, dtype, rtol, trans_a, trans_b, accumulate):
    rng = np.random.default_rng(7)
    for m, k, n in [(1, 1, 1), (3, 5, 2), (37, 19, 11), (128, 257, 64)]:
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        start = rng.standard_normal((m, n)).astype(dtype)
        out = start.copy()
        want = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if accumulate:
            want = want + start
        assert gemm.product(a, b, out, trans_a, trans_b, accumulate)
        scale = np.abs(a).max() * np.abs(b).max() * k + np.abs(start).max()
        np.testing.assert_allclose(out, want, rtol=0, atol=rtol * scale)


def test_product_declines_what_it_cannot_run(on_mkl, monkeypatch):
    a = np.ones((8, 6), np.float32)
    b = np.ones((6, 4), np.float32)
    out = np.zeros((8, 4), np.float32)
    big_endian = np.zeros((8, 4), ">f4")
    declined = [
        (a[:, ::2], np.ones((3, 4), np.float32), out),         # a strided view
        (a, b.astype(np.float64), out),                         # mixed dtypes
        (a, b, out.astype(np.float64)),
        (a.astype(np.float16), b.astype(np.float16), out.astype(np.float16)),
        (a.astype(np.int32), b.astype(np.int32), out.astype(np.int32)),
        (a, b, np.zeros((8, 5), np.float32)),                   # shapes that disagree
        (a, np.ones((5, 4), np.float32), out),
        (a, b, out[:, ::1].T.copy().T),                         # out not C-contiguous
        (a, b, big_endian),                                     # not native byte order
        (a.tolist(), b, out),                                   # not an ndarray
        (a[None], b, out),                                      # not two-dimensional
        (np.ones((8, 0), np.float32), np.ones((0, 4), np.float32), out),  # k = 0
    ]
    for x, y, o in declined:
        before = o.copy() if isinstance(o, np.ndarray) else None
        assert not gemm.product(x, y, o, False, False)
        assert before is None or np.array_equal(o, before)
    square = np.ones((6, 6), np.float32)
    assert not gemm.product(square, square, square, False, False)  # out is an input
    block = np.ones((12, 6), np.float32)
    block[6:] = 0
    assert gemm.product(block[:6], square, block[6:], False, False)
    assert np.array_equal(block[6:], np.full((6, 6), 6, np.float32))  # apart: it ran
    assert not gemm.product(block[:6], square, block[5:11], False, False)  # one row shared
    readonly = out.copy()
    readonly.flags.writeable = False
    assert not gemm.product(a, b, readonly, False, False)
    frozen_a, frozen_b = a.copy(), b.copy()  # read-only inputs are fine
    frozen_a.flags.writeable = frozen_b.flags.writeable = False
    assert gemm.product(frozen_a, frozen_b, out, False, False)
    assert np.array_equal(out, np.full((8, 4), 6, np.float32))
    out[:] = 0
    monkeypatch.setattr(gemm, "MKL_MIN_MACS", 8 * 6 * 4 + 1)
    assert not gemm.product(a, b, out, False, False)  # below the threshold
    monkeypatch.setattr(gemm, "MKL_MIN_MACS", 8 * 6 * 4)
    assert gemm.product(a, b, out, False, False) and out.all()
    out[:] = 0
    gemm.set_backend("numpy")
    assert not gemm.product(a, b, out, False, False)
    assert not out.any()


def test_products_that_openblas_would_thread_run_on_mkl(backend_restored):
    """The threshold is OpenBLAS's own for threading a product: the smaller ones, which it
    runs on one thread, stay on NumPy."""
    from backprop import blas

    assert gemm.MKL_MIN_MACS == blas.SINGLE_THREADED_MACS + 1
    mkl_or_skip()
    gemm.set_backend("mkl")
    small, large = (np.ones((64, 64), np.float32), np.ones((64, 64), np.float32),
                    np.ones((64, 64), np.float32)), \
        (np.ones((64, 64), np.float32), np.ones((64, 65), np.float32),
         np.ones((64, 65), np.float32))
    assert not gemm.product(*small, False, False)  # 64³ = 2¹⁸
    assert gemm.product(*large, False, False)
    assert gemm.runs(np.float32) and gemm.runs(np.dtype("float64"))
    assert not gemm.runs(np.float16)
    gemm.set_backend("numpy")
    assert not gemm.runs(np.float32)


def test_product_sets_and_restores_the_mkl_thread_count(on_mkl):
    """Each product asks MKL for one thread per blas.MACS_PER_THREAD multiply-adds and
    leaves the calling thread's count as it found it (bf16's products track it)."""
    set_local = bf16._mkl()["set_threads"]
    rng = np.random.default_rng(2)
    a = rng.standard_normal((256, 256)).astype(np.float32)
    out = np.empty((256, 256), np.float32)
    for count in (1, 2):
        previous = set_local(count)
        try:
            assert gemm.product(a, a, out, False, True)
            assert set_local(count) == count  # (returns the count it replaces)
        finally:
            set_local(previous)
    np.testing.assert_allclose(out, a @ a.T, rtol=0, atol=2e-5 * 256 * np.abs(a).max() ** 2)


def test_backend_selection(monkeypatch, backend_restored):
    with pytest.raises(ValueError, match="gemm backend must be one of"):
        gemm.set_backend("openblas")
    monkeypatch.setenv("BACKPROP_GEMM", "blis")
    gemm._STATE.clear()
    with pytest.raises(ValueError, match="BACKPROP_GEMM must be one of"):
        gemm.backend()
    monkeypatch.setenv("BACKPROP_GEMM", "numpy")
    gemm._STATE.clear()
    assert gemm.backend() == "numpy"
    class NoGemm:  # a library without cblas_sgemm
        pass

    partial = {"lib": NoGemm(), "path": "/opt/libmkl_rt.so", "error": None}
    monkeypatch.setattr(bf16, "_mkl", lambda: partial)
    assert gemm.set_backend("auto") == "numpy"
    with pytest.raises(RuntimeError, match="has no cblas_sgemm"):
        gemm.set_backend("mkl")
    missing = {"lib": None, "gemm": None, "error": "MKL is not installed (test)"}
    monkeypatch.setattr(bf16, "_mkl", lambda: missing)
    assert gemm.set_backend("auto") == "numpy"  # auto falls back quietly
    with pytest.raises(RuntimeError, match="BACKPROP_GEMM=mkl: MKL is not installed"):
        gemm.set_backend("mkl")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_training_step_on_mkl_matches_numpy(on_mkl, dtype):
    """Forward, backward (with ∂W accumulated over two passes, MKL's beta = 1) and Adam,
    on MKL and on NumPy's BLAS: the same up to rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 20)).astype(dtype)
    y = rng.integers(0, 5, 50)
    results = {}
    for name in ("mkl", "numpy"):
        gemm.set_backend(name)
        model = bp.Sequential([bp.Dense(20, 30, activation="relu", rng=1, dtype=dtype),
                               bp.Dense(30, 5, rng=2, dtype=dtype)])
        loss = bp.losses.SoftmaxCrossEntropyLoss()
        opt = bp.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            for half in (slice(0, 25), slice(25, 50)):  # gradients accumulate
                loss.forward(model.forward(x[half]), y[half])
                model.backward(loss.backward())
            opt.step()
        results[name] = [p.data.copy() for p in model.parameters()]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in zip(results["mkl"], results["numpy"]):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_products_from_several_threads(on_mkl):
    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((64, 96)).astype(np.float32),
              rng.standard_normal((96, 48)).astype(np.float32)) for _ in range(4)]
    wrong = []

    def work(a, b):
        out = np.empty((64, 48), np.float32)
        want = a @ b
        for _ in range(50):
            gemm.product(a, b, out, False, False)
            if not np.allclose(out, want, rtol=1e-5, atol=1e-4):
                wrong.append(1)

    threads = [threading.Thread(target=work, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
