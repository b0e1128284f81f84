"""Mixed precision (backprop.precision, backprop.loss_scaling): the mode's numerics against
an independent float64 computation on the rounded operands, the routing of each product,
the low-precision weight copies' freshness, fit/CLI integration and the fallback."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import backprop as bp
from backprop import bf16, precision
from backprop.loss_scaling import GradScaler
from backprop.precision import PrecisionFallbackWarning, PrecisionRequest, autocast

FORMATS = ["bf16-mixed", "fp16-mixed"]


def _gemms():
    """The product implementations runnable here: the emulation always, MKL where bf16
    is fast on this CPU."""
    out = [pytest.param(True, id="emulated")]
    fast = bf16.bf16_support()["fast"]
    out.append(pytest.param(None, id="mkl", marks=pytest.mark.skipif(
        not fast, reason="bf16 products are not fast here: " + bf16.bf16_support()["reason"])))
    return out


def _round(x, name):
    """x (float32) rounded to the format, as float64."""
    x = np.asarray(x, np.float32)
    if name == "bf16-mixed":
        return bf16.bf16_round(x).astype(np.float64)
    return x.astype(np.float16).astype(np.float64)


def _mlp(seed=0, acts=("relu", "tanh", None), sizes=(40, 48, 36, 5)):
    rng = np.random.default_rng(seed)
    return bp.Sequential([bp.Dense(a, b, activation=act, rng=rng, dtype="float32")
                          for a, b, act in zip(sizes[:-1], sizes[1:], acts)])


def _bound(a, b, k):
    """(K + 2)·2⁻²⁴·|a||b| elementwise (float32 sums of exact products) plus float32's
    rounding of the result."""
    return (k + 2) * 2.0 ** -24 * (np.abs(a) @ np.abs(b)) + 1e-30


# ---------------------------------------------------------------------------------------
def test_resolve_names_aliases_and_env(monkeypatch):
    assert precision.resolve("bf16") == "bf16-mixed"
    assert precision.resolve("BFloat16") == "bf16-mixed"
    assert precision.resolve("16-mixed") == "fp16-mixed"
    assert precision.resolve("fp32") == "float32"
    monkeypatch.delenv("BACKPROP_PRECISION", raising=False)
    assert precision.resolve(None) == "float32"
    monkeypatch.setenv("BACKPROP_PRECISION", "bf16")
    assert precision.resolve(None) == "bf16-mixed"
    monkeypatch.setenv("BACKPROP_PRECISION", "half")
    with pytest.raises(ValueError, match="BACKPROP_PRECISION='half'"):
        precision.resolve(None)
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        precision.resolve("int8")
    with pytest.raises(TypeError, match="precision must be a string"):
        precision.resolve(16)


def test_autocast_is_per_thread_and_nestable():
    seen = {}

    def other():
        seen["other"] = precision.current()

    with autocast("bf16", emulate=True) as outer:
        assert precision.current() is outer
        with autocast(enabled=False):
            assert precision.current() is None
        with autocast("fp16", emulate=True) as inner:
            assert precision.current() is inner and inner.fmt == "float16"
        assert precision.current() is outer
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] is None
    assert precision.current() is None


def _cuda_reason():
    from backprop.backend import cuda_status

    status = cuda_status()
    return None if status["available"] else f"no CUDA device: {status['reason']}"


def _runs():
    """(device, emulate): the CPU emulated and on MKL (where bf16 is fast here), the GPU
    emulated and on cuBLAS (where a GPU is)."""
    out = [pytest.param("cpu", *p.values, id=f"cpu-{p.id}", marks=p.marks) for p in _gemms()]
    reason = _cuda_reason()
    for emulate, id_ in ((True, "emulated"), (None, "cublas")):
        out.append(pytest.param("cuda", emulate, id=f"cuda-{id_}", marks=pytest.mark.skipif(
            reason is not None, reason=reason or "")))
    return out


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("device, emulate", _runs())
def test_forward_and_backward_match_the_rounded_products(name, device, emulate):
    """Every product in low precision (thresholds 0): each layer's A, ∂W, ∂b and ∂X
    against float64 products of the rounded float32 operands the layer had."""
    if name == "fp16-mixed" and device == "cpu" and emulate is None:
        pytest.skip("fp16 products run emulated on the CPU")
    if device == "cuda" and emulate is None:
        from backprop import cuda_lowp

        key = "bf16_fast" if name == "bf16-mixed" else "fp16_fast"
        if not cuda_lowp.support()[key]:
            pytest.skip(f"this GPU has no fast {name} products: {cuda_lowp.support()}")
    host = bp.to_numpy
    model = _mlp(acts=("relu", "relu", None))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((33, 40)).astype(np.float32)
    dy = rng.standard_normal((33, 5)).astype(np.float32)
    if device == "cuda":
        model.to("cuda")
    xd, dyd = bp.asarray(x, device=device), bp.asarray(dy, device=device)
    deltas = {}
    for layer in model.layers:
        layer.backward_observer = lambda lay, d: deltas.__setitem__(id(lay), host(d).copy())
    with autocast(name, min_macs=0, min_inner=1, emulate=emulate):
        out = host(model.forward(xd)).copy()
        inputs = [x] + [host(layer._ctx.saved[2]).copy() for layer in model.layers[:-1]]
        outs = [host(layer._ctx.saved[2]).copy() for layer in model.layers]
        model.zero_grad()
        dx = host(model.backward(dyd.copy(), need_input_grad=True)).copy()
    for layer, xin, a in zip(model.layers, inputs, outs):
        W, b = host(layer.W.data), host(layer.b.data)
        rx, rw = _round(xin, name), _round(W, name)
        ref = rx @ rw.T + b
        if layer.activation.name == "relu":  # ReLU is 1-Lipschitz: the bound carries over
            ref = np.maximum(ref, 0)
        assert np.all(np.abs(a - ref) <= _bound(rx, rw.T, W.shape[1]) + 1e-7 * np.abs(ref))
        d = deltas[id(layer)]
        rd = _round(d, name)
        dW = rd.T @ rx
        assert np.all(np.abs(host(layer.W.grad) - dW) <=
                      _bound(rd.T, rx, len(x)) + 1e-7 * np.abs(dW))
        np.testing.assert_allclose(host(layer.b.grad), d.astype(np.float64).sum(0),
                                   rtol=1e-5, atol=1e-6)
    first = model.layers[0]
    rd, rw = _round(deltas[id(first)], name), _round(host(first.W.data), name)
    assert np.all(np.abs(dx - rd @ rw) <= _bound(rd, rw, rw.shape[0]) + 1e-7 * np.abs(rd @ rw))
    # and it is a different computation from float32's (the rounding shows)
    assert not np.array_equal(out, host(model.forward(xd)))


@pytest.mark.parametrize("name", FORMATS)
def test_products_below_the_thresholds_stay_float32_bit_for_bit(name):
    model = _mlp()
    x = np.random.default_rng(2).standard_normal((16, 40)).astype(np.float32)
    dy = np.random.default_rng(3).standard_normal((16, 5)).astype(np.float32)
    ref = model.forward(x).copy()
    model.zero_grad()
    model.backward(dy.copy())
    grads = [p.grad.copy() for p in model.parameters()]
    with autocast(name, min_macs=10**12, emulate=True):
        out = model.forward(x).copy()
        model.zero_grad()
        model.backward(dy.copy())
    assert np.array_equal(out, ref)
    for p, g in zip(model.parameters(), grads):
        assert np.array_equal(p.grad, g)


def test_policy_thresholds_decide_per_product():
    policy = precision.policy_for("bf16-mixed", "cpu", emulate=True)
    assert policy.min_macs == precision.MIN_MACS and policy.min_inner == precision.MIN_INNER
    assert policy.lowp(256, 2048, 1024)          # wide's first layer
    assert not policy.lowp(32, 32, 64)           # tiny's
    assert not policy.lowp(256, 1024, 10)        # ∂X of a 10-class head: inner 10
    assert policy.lowp(256, 10, 2048)            # the head's forward on wide


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop", "adagrad", "adamw"])
@pytest.mark.parametrize("name", FORMATS)
def test_optimizer_writes_the_low_precision_weights_in_its_step(opt, name):
    model = _mlp()
    optimizer = bp.training.make_optimizer(opt, model.parameters(), lr=0.01)
    x = np.random.default_rng(4).standard_normal((8, 40)).astype(np.float32)
    with autocast(name, min_macs=0, min_inner=1, emulate=True) as request:
        for _ in range(2):
            optimizer.zero_grad()
            model.forward(x)
            model.backward(np.ones((8, 5), np.float32))
            optimizer.step()
        for p in model.parameters():
            assert p._lp_for is not None and p._lp_for[0] is p.data
            assert p._lp_for[1] == request.generation
            want = bf16.to_bf16(p.data) if name == "bf16-mixed" else p.data.astype(np.float16)
            assert p._lp.dtype == want.dtype
            assert np.array_equal(p._lp.view(np.uint16), want.view(np.uint16))


def test_weights_written_outside_the_optimizer_are_cast_again():
    model = _mlp()
    x = np.random.default_rng(5).standard_normal((8, 40)).astype(np.float32)
    other = _mlp(seed=9)
    with autocast("bf16", min_macs=0, min_inner=1, emulate=True):
        model.forward(x)
        model.load_state_dict(other.state_dict())   # in place: the copies must follow
        got = model.forward(x).copy()
        want = other.forward(x).copy()
    assert np.array_equal(got, want)


def test_a_step_outside_autocast_makes_the_copies_stale():
    model = _mlp()
    optimizer = bp.SGD(model.parameters(), lr=0.5)
    x = np.random.default_rng(6).standard_normal((8, 40)).astype(np.float32)
    with autocast("bf16", min_macs=0, min_inner=1, emulate=True):
        model.forward(x)
        model.backward(np.ones((8, 5), np.float32))
        with autocast(enabled=False):
            optimizer.step()                         # no low-precision write here
        assert all(p._lp_for is None for p in model.parameters())
        got = model.forward(x).copy()
    twin = _mlp()
    twin.load_state_dict(model.state_dict())
    with autocast("bf16", min_macs=0, min_inner=1, emulate=True):
        assert np.array_equal(got, twin.forward(x))


def test_a_custom_update_does_not_claim_fresh_copies():
    class Halve(bp.SGD):
        def _update(self, group, lr, step):
            group.data *= 0.5

    assert Halve._writes_lowp is False and bp.AdamW._writes_lowp is True
    model = _mlp()
    opt = Halve(model.parameters(), lr=0.1)
    with autocast("bf16", min_macs=0, min_inner=1, emulate=True):
        model.forward(np.ones((4, 40), np.float32))
        opt.step()
        assert all(p._lp_for is None for p in model.parameters())


def test_float64_models_are_refused_before_training():
    model = bp.Sequential([bp.Dense(4, 3, dtype="float64")])
    X, y = np.ones((8, 4)), np.zeros(8, dtype=np.int64)
    with pytest.raises(ValueError, match="needs a float32 model"):
        model.fit(X, y, loss="cross_entropy", verbose=0, precision="bf16-mixed")


def test_fallback_warns_once_and_trains_float32(monkeypatch):
    monkeypatch.setattr(precision, "_fast_gemm", lambda fmt, dev: (None, "no bf16 here (test)"))
    monkeypatch.delenv("BACKPROP_LOWP_EMULATE", raising=False)
    monkeypatch.setattr(precision, "_WARNED", set())
    X = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    a, b = _mlp(sizes=(6, 8, 8, 2)), _mlp(sizes=(6, 8, 8, 2))
    with pytest.warns(PrecisionFallbackWarning, match="no bf16 here"):
        h = a.fit(X, y, loss="cross_entropy", epochs=2, seed=0, verbose=0,
                  precision="bf16-mixed")
    assert h.params["precision"] == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and reason
        a.fit(X, y, loss="cross_entropy", epochs=1, seed=0, verbose=0, precision="bf16")
    h2 = b.fit(X, y, loss="cross_entropy", epochs=2, seed=0, verbose=0)
    assert h.history["loss"][:2] == h2.history["loss"]


def _digits():
    from backprop.data import load_digits

    X, y = load_digits("float32")
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).astype(np.float32)
    return X[:1400], y[:1400], X[1400:], y[1400:]


@pytest.mark.parametrize("name", FORMATS)
def test_fit_in_mixed_precision_learns_as_float32_does(name, tmp_path):
    Xtr, ytr, Xte, yte = _digits()
    results = {}
    for prec in ("float32", PrecisionRequest(name, min_macs=0, min_inner=1, emulate=True)):
        model = _mlp(seed=3, acts=("relu", "relu", None), sizes=(64, 128, 128, 10))
        h = model.fit(Xtr, ytr, loss="cross_entropy", epochs=6, batch_size=64, seed=1,
                      verbose=0, precision=prec, lr=2e-3)
        results[h.params["precision"]] = (model.evaluate(Xte, yte)["accuracy"], h, model)
    acc32, h32, _ = results["float32"]
    acc16, h16, m16 = results[name]
    assert h16.history["loss"][-1] < 0.5 * h16.history["loss"][0]
    assert abs(acc16 - acc32) <= 0.03, (acc16, acc32)
    assert h16.history["loss"] != h32.history["loss"]   # it really ran in low precision
    if name == "fp16-mixed":
        assert "loss_scale" in h16.history and h16.history["loss_scale"][-1] > 1
    # checkpoints hold the float32 master weights only
    path = tmp_path / "m.npz"
    bp.save(m16, path)
    back = bp.load(path)
    for p, q in zip(m16.parameters(), back.parameters()):
        assert q.data.dtype == np.float32 and np.array_equal(p.data, q.data)


def test_fit_with_a_request_object_uses_its_thresholds():
    Xtr, ytr, _, _ = _digits()
    model = _mlp(seed=3, acts=("relu", "relu", None), sizes=(64, 128, 128, 10))
    h = model.fit(Xtr[:256], ytr[:256], loss="cross_entropy", epochs=1, batch_size=64, seed=1,
                  verbose=0, precision=PrecisionRequest("bf16", min_macs=0, emulate=True))
    assert h.params["precision"] == "bf16-mixed"
    assert all(layer._ctx.saved[3] is not None for layer in model.layers)


# ---------------------------------------------------------------------------------------
class _FakeOptimizer:
    def __init__(self, grads):
        self.grads, self.steps = grads, 0

    def flat_gradients(self):
        return self.grads

    def step(self):
        self.steps += 1
        return "stepped"


def test_grad_scaler_unscales_skips_and_adapts():
    s = GradScaler(init_scale=8.0, growth_interval=2)
    delta = np.ones(3, np.float32)
    assert s.scale(delta) is delta and np.array_equal(delta, [8, 8, 8])
    opt = _FakeOptimizer([np.full(4, 16.0, np.float32)])
    assert s.step(opt) == "stepped" and np.array_equal(opt.grads[0], [2, 2, 2, 2])
    s.update()
    assert s.get_scale() == 8.0
    opt.grads[0][:] = 1
    s.step(opt)
    s.update()
    assert s.get_scale() == 16.0                     # two good steps in a row: grow
    opt.grads[0][1] = np.inf
    assert s.step(opt) is None and opt.steps == 2    # skipped
    s.update()
    assert s.get_scale() == 8.0 and s.skipped_steps == 1
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale_(opt)
    s.update()
    state = s.state_dict()
    t = GradScaler()
    t.load_state_dict(state)
    assert t.get_scale() == s.get_scale() and t.skipped_steps == 1
    off = GradScaler(enabled=False)
    assert off.get_scale() == 1.0 and off.step(opt) == "stepped"
    with pytest.raises(ValueError, match="growth_factor must be > 1"):
        GradScaler(growth_factor=1.0)


def test_fp16_fit_backs_off_from_an_overflowing_scale(monkeypatch):
    """Started at 2⁴⁰, the scaled gradients overflow float16: the first steps are skipped
    (weights unchanged), the scale halves until they fit, and training proceeds."""
    import backprop.training as training

    monkeypatch.setattr(training, "GradScaler", lambda: GradScaler(init_scale=2.0 ** 40))
    Xtr, ytr, _, _ = _digits()
    model = _mlp(seed=3, acts=("relu", "relu", None), sizes=(64, 128, 128, 10))
    before = [p.data.copy() for p in model.parameters()]
    logs = []

    class Spy(bp.Callback):
        def on_batch_end(self, batch, logs_):
            logs.append(logs_["loss_scale"])

    h = model.fit(Xtr[:640], ytr[:640], loss="cross_entropy", epochs=2, batch_size=64,
                  seed=0, verbose=0, callbacks=[Spy()],
                  precision=PrecisionRequest("fp16", min_macs=0, min_inner=1, emulate=True))
    assert logs[0] == 2.0 ** 39 and logs[-1] < 2.0 ** 30
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert any(not np.array_equal(p.data, b) for p, b in zip(model.parameters(), before))


def test_cli_precision_flag(tmp_path, monkeypatch, capsys):
    from backprop import cli

    monkeypatch.setenv("BACKPROP_LOWP_EMULATE", "1")
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", "two_moons", "--epochs", "2", "--precision", "bf16-mixed",
                   "--out", str(out), "--no-plot", "--verbose", "0"])
    assert rc == 0
    meta = bp.io.load_checkpoint(out / "model.npz")
    assert meta.extra["precision"] == "bf16-mixed"
    capsys.readouterr()
    assert cli.main(["train", "--data", "two_moons", "--precision", "bf16-mixed", "--dtype",
                     "float64", "--out", str(out)]) == 2
    assert "cannot be combined with --dtype float64" in capsys.readouterr().err
