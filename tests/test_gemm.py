"""backprop.gemm: the Dense layers' products on MKL where it is installed, or on the
compiled tiles (backprop.kernels.matmul)."""
from __future__ import annotations


import numba
import numpy as np
import pytest

import backprop as bp
from backprop import bf16, gemm
from conftest import run_threads


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
    monkeypatch.setattr(gemm, "MIN_MACS", 1)
    assert gemm.set_backend("mkl") == "mkl"


def backend_or_skip(name):
    if name == "mkl":
        mkl_or_skip()
    elif numba.config.DISABLE_JIT:
        pytest.skip("NUMBA_DISABLE_JIT=1: the tiles are compiled code")


@pytest.fixture(params=["mkl", "numba"])
def on_backend(request, monkeypatch, backend_restored):
    """MKL or the tiles, for products of any size (the thresholds are tested on their
    own); its name."""
    name = request.param
    backend_or_skip(name)
    monkeypatch.setattr(gemm, "MIN_MACS", 1)
    monkeypatch.setattr(gemm, "NUMBA_BACKWARD_MIN_MACS", 1)
    monkeypatch.setattr(gemm, "NUMBA_MIN_OUTPUTS", 1)
    assert gemm.set_backend(name) == name
    return name


def runs_form(name, trans_a, trans_b, accumulate) -> bool:
    """Whether the backend takes this form (the tiles: not both operands transposed, and
    the forward form ``a bᵀ`` not accumulated: no layer asks for either)."""
    return name == "mkl" or not (trans_b and (trans_a or accumulate))


FORMS = [(False, True), (True, False), (False, False), (True, True)]


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("trans_a, trans_b", FORMS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_product_matches_numpy(on_backend, dtype, rtol, trans_a, trans_b, accumulate):
    rng = np.random.default_rng(7)
    for m, k, n in [(1, 1, 1), (3, 5, 2), (37, 19, 11), (128, 257, 64)]:
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        start = rng.standard_normal((m, n)).astype(dtype)
        out = start.copy()
        want = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if accumulate:
            want = want + start
        ran = gemm.product(a, b, out, trans_a, trans_b, accumulate)
        assert ran == runs_form(on_backend, trans_a, trans_b, accumulate)
        if not ran:
            assert np.array_equal(out, start)
            continue
        scale = np.abs(a).max() * np.abs(b).max() * k + np.abs(start).max()
        np.testing.assert_allclose(out, want, rtol=0, atol=rtol * scale)


def test_product_declines_what_it_cannot_run(on_backend, monkeypatch):
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
    # read-only inputs: MKL runs them; the tiles decline them (another compiled variant)
    frozen_a, frozen_b = a.copy(), b.copy()
    frozen_a.flags.writeable = frozen_b.flags.writeable = False
    assert gemm.product(frozen_a, frozen_b, out, False, False) == (on_backend == "mkl")
    if on_backend == "mkl":
        assert np.array_equal(out, np.full((8, 4), 6, np.float32))
    out[:] = 0
    monkeypatch.setattr(gemm, "MIN_MACS", 8 * 6 * 4 + 1)
    assert not gemm.product(a, b, out, False, False)  # below the threshold
    monkeypatch.setattr(gemm, "MIN_MACS", 8 * 6 * 4)
    assert gemm.product(a, b, out, False, False) and out.all()
    out[:] = 0
    gemm.set_backend("numpy")
    assert not gemm.product(a, b, out, False, False)
    assert not out.any()


def test_products_that_openblas_would_thread_run_on_mkl(backend_restored):
    """The threshold is OpenBLAS's own for threading a product: the smaller ones, which it
    runs on one thread, stay on NumPy."""
    from backprop import blas

    assert gemm.MIN_MACS == blas.SINGLE_THREADED_MACS + 1
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
    monkeypatch.setattr(gemm, "_wide_vectors", lambda: False)  # a CPU without AVX-512
    assert gemm.set_backend("auto") == "numpy"
    with pytest.raises(RuntimeError, match="has no cblas_sgemm"):
        gemm.set_backend("mkl")
    missing = {"lib": None, "gemm": None, "error": "MKL is not installed (test)"}
    monkeypatch.setattr(bf16, "_mkl", lambda: missing)
    assert gemm.set_backend("auto") == "numpy"  # auto falls back quietly
    with pytest.raises(RuntimeError, match="BACKPROP_GEMM=mkl: MKL is not installed"):
        gemm.set_backend("mkl")
    # without MKL, auto takes the tiles on an AVX-512 CPU, and numba takes them anywhere
    if not numba.config.DISABLE_JIT:
        assert gemm.set_backend("numba") == "numba"
        assert not gemm.runs(np.float32)  # OpenBLAS keeps the larger products: its cap stays
        monkeypatch.setattr(gemm, "_wide_vectors", lambda: True)
        assert gemm.set_backend("auto") == "numba"
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert gemm.set_backend("auto") == "numpy"
    with pytest.raises(RuntimeError, match="BACKPROP_GEMM=numba: NUMBA_DISABLE_JIT=1"):
        gemm.set_backend("numba")


def test_tiles_take_the_products_of_their_windows(monkeypatch, backend_restored):
    """The tiles run a forward product below NUMBA_FORWARD_MAX_MACS multiply-adds, ∂W and
    ∂X from NUMBA_BACKWARD_MIN_MACS to below NUMBA_MAX_MACS (a float64 multiply-add weighing
    NUMBA_FLOAT64_WEIGHT toward those bounds), all only for a layer of at least
    NUMBA_MIN_OUTPUTS outputs; what they decline is left untouched (the layer runs it on
    NumPy)."""
    backend_or_skip("numba")
    assert gemm.set_backend("numba") == "numba"
    monkeypatch.setattr(gemm, "MIN_MACS", 1)
    monkeypatch.setattr(gemm, "NUMBA_BACKWARD_MIN_MACS", 32 * 8 * 14)
    monkeypatch.setattr(gemm, "NUMBA_MAX_MACS", 32 * 8 * 16 + 1)
    monkeypatch.setattr(gemm, "NUMBA_FORWARD_MAX_MACS", 32 * 8 * 24 + 1)
    monkeypatch.setattr(gemm, "NUMBA_MIN_OUTPUTS", 12)
    rng = np.random.default_rng(9)

    def forward(n, k, m, dtype=np.float32):
        x, w = (rng.standard_normal(s).astype(dtype) for s in ((n, k), (m, k)))
        z = np.zeros((n, m), dtype)
        ran = gemm.product(x, w, z, False, True)
        assert np.allclose(z, x @ w.T, atol=1e-4) if ran else not z.any()
        return ran

    def grads(n, k, m, dtype=np.float32):  # ∂X = δ W and ∂W = δᵀ X of m outputs
        d, w, x = (rng.standard_normal(s).astype(dtype) for s in ((n, m), (m, k), (n, k)))
        dx, dw = np.zeros((n, k), dtype), np.zeros((m, k), dtype)
        ran = gemm.product(d, w, dx, False, False), gemm.product(d, x, dw, True, False)
        assert ran[0] == ran[1]
        assert (not dx.any() and not dw.any()) or (np.allclose(dx, d @ w, atol=1e-4)
                                                   and np.allclose(dw, d.T @ x, atol=1e-4))
        return ran[0]

    # a float64 multiply-add weighs NUMBA_FLOAT64_WEIGHT toward the upper bounds only
    weight = gemm.NUMBA_FLOAT64_WEIGHT
    assert not forward(32, 8, 12, np.float64)  # 12·weight > 24: above the window
    monkeypatch.setattr(gemm, "NUMBA_FORWARD_MAX_MACS", 32 * 8 * 12 * weight + 1)
    assert forward(32, 8, 12, np.float64) and not forward(32, 8, 13, np.float64)
    monkeypatch.setattr(gemm, "NUMBA_FORWARD_MAX_MACS", 32 * 8 * 24 + 1)
    assert grads(32, 8, 14, np.float64) is False  # 14·weight > 16: above the window
    monkeypatch.setattr(gemm, "NUMBA_MAX_MACS", 32 * 8 * 14 * weight + 1)
    assert grads(32, 8, 14, np.float64) and not grads(32, 8, 15, np.float64)
    monkeypatch.setattr(gemm, "NUMBA_MAX_MACS", 32 * 8 * 16 + 1)
    assert forward(32, 8, 24) and not forward(32, 8, 25)
    assert forward(32, 8, 12) and not forward(32, 8, 11)
    assert grads(32, 8, 16) and not grads(32, 8, 17)
    assert grads(32, 8, 14) and not grads(32, 8, 13)
    monkeypatch.setattr(gemm, "NUMBA_BACKWARD_MIN_MACS", 1)
    assert grads(32, 8, 12) and not grads(32, 8, 11)
    monkeypatch.setattr(gemm, "MIN_MACS", 32 * 8 * 12 + 1)
    assert not grads(32, 8, 12) and not forward(32, 8, 12)


def test_info_names_the_backend_and_its_windows(monkeypatch, backend_restored):
    """``python -m backprop info`` says what runs the products, the tiles' windows
    included."""
    from backprop import cli

    problems: list = []
    gemm.set_backend("numpy")
    assert cli._gemm_report(problems) == "numpy (NumPy's BLAS)"
    if not numba.config.DISABLE_JIT:
        gemm.set_backend("numba")
        text = cli._gemm_report(problems)
        assert text.startswith("numba (compiled tiles") and str(gemm.NUMBA_MAX_MACS) in text
    monkeypatch.setenv("BACKPROP_GEMM", "blis")
    gemm._STATE.clear()
    assert cli._gemm_report(problems) is None and "BACKPROP_GEMM" in problems[-1]
    assert not problems[:-1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_training_step_matches_numpy(on_backend, monkeypatch, dtype):
    """Forward, backward (with ∂W accumulated over two passes, MKL's beta = 1) and Adam,
    on MKL or the tiles and on NumPy's BLAS: the same up to rounding; every product of
    the layers ran on the backend."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 20)).astype(dtype)
    y = rng.integers(0, 5, 50)
    ran = []
    original = gemm.product

    def counted(*args, **kwargs):
        done = original(*args, **kwargs)
        ran.append(done)
        return done

    monkeypatch.setattr(gemm, "product", counted)
    results = {}
    for name in (on_backend, "numpy"):
        gemm.set_backend(name)
        ran.clear()
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
        # per pass: 2 forward products, 2 ∂W, 1 ∂X (not the input's)
        assert ran == [name != "numpy"] * 5 * 2 * 3
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in zip(results[on_backend], results["numpy"]):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_products_from_several_threads(on_backend):
    """Four threads at once, each on its own operands, in the forward form (the tiles'
    scratch is per thread, for two batch sizes in turn) and the plain one."""
    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((64, 96)).astype(np.float32),
              rng.standard_normal((96, 48)).astype(np.float32)) for _ in range(4)]
    wrong = []

    def work(a, b):
        out = np.empty((64, 48), np.float32)
        want = a @ b
        bt = np.ascontiguousarray(b.T)
        for i in range(50):
            rows = 64 if i % 2 else 40
            if not gemm.product(a, b, out, False, False) or \
                    not np.allclose(out, want, rtol=1e-5, atol=1e-4):
                wrong.append("plain")
            z = np.empty((rows, 48), np.float32)
            if not gemm.product(a[:rows], bt, z, False, True) or \
                    not np.allclose(z, want[:rows], rtol=1e-5, atol=1e-4):
                wrong.append("forward")

    run_threads(work, pairs)
    assert not wrong
