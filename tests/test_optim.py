"""Optimizers and gradient clipping against PyTorch's update rules, written out again here.

The expectations below are independent of backprop: each optimizer is re-implemented from
the algorithm in the PyTorch documentation, in float64 NumPy on one flat vector, and the
trajectories of several steps on a small problem whose gradient depends on the parameters
are compared, for every option, on every device and kernel backend available. When PyTorch
is installed, a further test runs torch.optim itself on the same problem.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from backprop import kernels as K
from backprop import clip, optim
from backprop import backend
from backprop.backend import get_array_module, to_numpy
from backprop.parameter import Parameter, flat_layout

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

SHAPES = {"0.W": (3, 4), "0.b": (4,), "1.W": (4, 2)}
N = sum(math.prod(s) for s in SHAPES.values())
STEPS = 6
_rng = np.random.default_rng(7)
THETA0 = _rng.normal(size=N)
TARGET = _rng.normal(size=N)
CURVATURE = np.linspace(0.2, 2.0, N)
NOISE = 0.3 * _rng.normal(size=(2 * STEPS, N))


def gradient(theta, t):
    """∂/∂θ of ½ Σ c (θ − θ*)², plus noise that differs per step: a real trajectory."""
    return CURVATURE * (theta - TARGET) + NOISE[t]


# ---------------------------------------------------------------------------------------
# PyTorch's algorithms (torch.optim documentation), float64, one flat vector
def expected_sgd(theta, steps, lr, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0):
    theta, b, out = theta.copy(), None, []
    for t in range(steps):
        g = gradient(theta, t) + weight_decay * theta
        if momentum != 0:
            b = g.copy() if b is None else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        theta = theta - lr * g
        out.append(theta)
    return out


def expected_rmsprop(theta, steps, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                     momentum=0.0, centered=False):
    theta, out = theta.copy(), []
    v = np.zeros_like(theta)
    g_ave = np.zeros_like(theta)
    b = np.zeros_like(theta)
    for t in range(steps):
        g = gradient(theta, t) + weight_decay * theta
        v = alpha * v + (1 - alpha) * g * g
        v_tilde = v
        if centered:
            g_ave = alpha * g_ave + (1 - alpha) * g
            v_tilde = v_tilde - g_ave ** 2
        if momentum > 0:
            b = momentum * b + g / (np.sqrt(v_tilde) + eps)
            theta = theta - lr * b
        else:
            theta = theta - lr * g / (np.sqrt(v_tilde) + eps)
        out.append(theta)
    return out


def expected_adam(theta, steps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  amsgrad=False, decoupled=False):
    beta1, beta2 = betas
    theta, out = theta.copy(), []
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    v_max = np.zeros_like(theta)
    for t in range(1, steps + 1):
        g = gradient(theta, t - 1)
        if decoupled:
            theta = theta - lr * weight_decay * theta
        else:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        if amsgrad:
            v_max = np.maximum(v_max, v)
            v_hat = v_max / (1 - beta2 ** t)
        else:
            v_hat = v / (1 - beta2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(theta)
    return out


def expected_adamw(theta, steps, weight_decay=1e-2, **kw):
    return expected_adam(theta, steps, weight_decay=weight_decay, decoupled=True, **kw)


def expected_adagrad(theta, steps, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                     initial_accumulator_value=0.0):
    theta, out = theta.copy(), []
    state_sum = np.full_like(theta, initial_accumulator_value)
    for t in range(1, steps + 1):
        g = gradient(theta, t - 1)
        lr_t = lr / (1 + (t - 1) * lr_decay)
        g = g + weight_decay * theta
        state_sum = state_sum + g * g
        theta = theta - lr_t * g / (np.sqrt(state_sum) + eps)
        out.append(theta)
    return out


EXPECTED = {"SGD": expected_sgd, "RMSprop": expected_rmsprop, "Adam": expected_adam,
            "AdamW": expected_adamw, "Adagrad": expected_adagrad}

CASES = [  # every option of every optimizer, alone and combined
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.2}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.8}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "centered": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.05}),
    ("Adam", {"lr": 0.05}),
    ("Adam", {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.3, "betas": (0.5, 0.6), "amsgrad": True}),
    ("AdamW", {"lr": 0.05}),
    ("AdamW", {"lr": 0.3, "betas": (0.5, 0.6), "weight_decay": 0.3, "amsgrad": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.2, "weight_decay": 0.1, "eps": 1e-3,
                 "initial_accumulator_value": 0.5}),
]
CASE_IDS = [f"{name}-{'-'.join(sorted(kw)) or 'defaults'}" for name, kw in CASES]
TOLERANCE = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}


# ---------------------------------------------------------------------------------------
@pytest.fixture(params=["reference", "numba", "cupy"])
def kernel_backend(request, device):
    """Run the test with each kernel choice that can run on the device (others skipped)."""
    previous = K.get_choice()
    K.set_backend(request.param)
    try:
        name = K.backend_name(device.kind)
        K.implementation(name, "sgd_step")
    except (K.KernelBackendError, ImportError) as exc:
        K.set_backend(previous)
        pytest.skip(f"kernel choice {request.param!r} cannot run on {device}: {exc}")
    yield name
    K.set_backend(previous)


def make_params(xp, dtype, order=None):
    params, offset = {}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        data = THETA0[offset:offset + size].reshape(shape).astype(dtype)
        params[name] = Parameter(xp.asarray(data), name)
        offset += size
    return [params[n] for n in (order or SHAPES)]


def flat_values(params):
    by_name = {p.name: p for p in params}
    return np.concatenate([to_numpy(by_name[n].data).ravel() for n in SHAPES]).astype(np.float64)


def backward(params, t, skip=()):
    """What a backward pass does: write ∂L/∂θ into each gradient (stale ones skipped)."""
    g = gradient(flat_values(params), t)
    by_name, offset = {p.name: p for p in params}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        if name not in skip:
            p = by_name[name]
            buf, accumulate = p.grad_for_write()
            value = get_array_module(buf).asarray(g[offset:offset + size].reshape(shape))
            if accumulate:
                buf += value
            else:
                buf[...] = value
        offset += size


def run(opt, params, steps, start=0):
    out = []
    for t in range(start, start + steps):
        opt.zero_grad()
        backward(params, t)
        opt.step()
        out.append(flat_values(params))
        assert all(p.data.dtype == params[0].data.dtype for p in params)
    return out


def build(name, kw, params):
    return getattr(optim, name)(params, **kw)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_trajectory_matches_pytorch_formulas(name, kw, dtype, xp, kernel_backend):
    params = make_params(xp, dtype)
    got = run(build(name, kw, params), params, STEPS)
    want = EXPECTED[name](THETA0, STEPS, **kw)
    for step, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, **TOLERANCE[dtype], err_msg=f"step {step + 1}")
    for p in params:
        assert p.data.dtype == dtype and p.grad.dtype == dtype


@pytest.mark.parametrize("name,kw", [c for c in CASES if len(c[1]) > 1],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if len(c[1]) > 1])
def test_each_option_changes_the_trajectory(name, kw):
    """Guards the table above: an option that the problem never exercised would let a
    wrong implementation of it pass."""
    plain = EXPECTED[name](THETA0, STEPS, lr=kw["lr"])
    for option in kw:
        if option == "lr":
            continue
        without = {k: v for k, v in kw.items() if k != option}
        if option == "momentum" and kw.get("nesterov"):
            continue  # nesterov needs momentum
        if np.allclose(EXPECTED[name](THETA0, STEPS, **without)[-1],
                       EXPECTED[name](THETA0, STEPS, **kw)[-1], rtol=1e-6, atol=1e-9):
            pytest.fail(f"{name}: option {option}={kw[option]!r} does not change the trajectory")
    assert not np.allclose(plain[-1], EXPECTED[name](THETA0, STEPS, **kw)[-1])


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_trajectory_matches_torch(name, kw):
    torch = pytest.importorskip("torch")
    theta = torch.tensor(THETA0, dtype=torch.float64, requires_grad=True)
    opt = getattr(torch.optim, name)([theta], **kw)
    want = []
    for t in range(STEPS):
        theta.grad = torch.from_numpy(gradient(theta.detach().numpy(), t))
        opt.step()
        want.append(theta.detach().numpy().copy())
    params = make_params(np, np.float64)
    previous = K.get_choice()
    K.set_backend("reference")
    try:
        got = run(build(name, kw, params), params, STEPS)
    finally:
        K.set_backend(previous)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_one_kernel_call_per_step_and_per_dtype_group(xp, monkeypatch):
    calls = []
    real = K.adam_step
    monkeypatch.setattr(K, "adam_step", lambda p, *a: calls.append(p.size) or real(p, *a))
    params = make_params(xp, np.float64)
    opt = optim.Adam(params, lr=0.1)
    run(opt, params, 3)
    on_cpu = xp is np
    assert calls == [flat_layout(params, 8, on_cpu)[1]] * 3
    assert flat_layout(params, 8, on_cpu=False)[1] == N
    calls.clear()
    mixed = [Parameter(xp.ones((2, 2), np.float32), "a"), Parameter(xp.ones(3), "b"),
             Parameter(xp.ones(5, np.float32), "c")]
    opt = optim.Adam(mixed, lr=0.1)
    for p in mixed:
        p.grad = xp.ones(p.shape, p.dtype)
    opt.step()
    assert sorted(calls) == ([8, 32] if on_cpu else [3, 9])  # 16 floats, 8 doubles per line
    assert mixed[0].data.dtype == np.float32 and mixed[1].data.dtype == np.float64
    np.testing.assert_allclose(to_numpy(mixed[2].data), 1 - 0.1, rtol=1e-6)


def test_stale_gradient_counts_as_zero(xp):
    """A parameter left out of the backward pass is updated with a zero gradient, even
    though its slice of the flat gradient buffer still holds the previous step's values."""
    params = make_params(xp, np.float64)
    opt = optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    theta = THETA0.copy()
    buf = None
    b_slice = slice(12, 16)
    for t in range(4):
        opt.zero_grad()
        skip = ("0.b",) if t % 2 else ()
        g = gradient(flat_values(params), t)
        backward(params, t, skip=skip)
        if skip:
            g[b_slice] = 0.0
        g = g + 0.1 * theta
        buf = g if buf is None else 0.9 * buf + g
        theta = theta - 0.1 * buf
        opt.step()
        np.testing.assert_allclose(flat_values(params), theta, rtol=1e-12, atol=1e-14)


def test_gradients_accumulate_between_steps(xp):
    params = make_params(xp, np.float64)
    opt = optim.SGD(params, lr=0.5)
    opt.zero_grad()
    backward(params, 0)
    backward(params, 0)  # two backward passes without zero_grad add up
    opt.step()
    np.testing.assert_allclose(flat_values(params), THETA0 - 0.5 * 2 * gradient(THETA0, 0),
                               rtol=1e-12)


def test_zero_grad_reads_as_zeros(xp):
    params = make_params(xp, np.float32)
    opt = optim.SGD(params, lr=0.1)
    backward(params, 0)
    opt.zero_grad()
    assert all(float(abs(p.grad).max()) == 0.0 for p in params)


# ---------------------------------------------------------------------------------------
STATEFUL = [c for c in CASES if c[0] in ("Adagrad", "Adam", "AdamW") or len(c[1]) > 2]


@pytest.mark.parametrize("name,kw", STATEFUL, ids=[f"{c[0]}-{i}" for i, c in enumerate(STATEFUL)])
def test_state_dict_round_trip_continues_the_trajectory(name, kw, xp):
    params = make_params(xp, np.float64)
    opt = build(name, kw, params)
    straight = run(opt, params, STEPS)

    params = make_params(xp, np.float64)
    first = build(name, kw, params)
    run(first, params, 3)
    saved = first.state_dict()
    json.dumps(saved["hyper"])
    assert saved["step"] == 3 and saved["type"] == name
    assert all(isinstance(v, np.ndarray) for v in saved["state"].values())
    assert {k.rsplit(".", 1)[0] for k in saved["state"]} == set(SHAPES)
    values = {p.name: to_numpy(p.data).copy() for p in params}

    # a fresh model with the parameters in another order, a fresh optimizer with other
    # hyperparameters: everything comes from the checkpoint
    resumed = make_params(xp, np.float64, order=["1.W", "0.W", "0.b"])
    for p in resumed:
        p.data[...] = xp.asarray(values[p.name])
    other = dict(kw, lr=123.0)
    opt2 = build(name, other, resumed)
    opt2.load_state_dict(saved)
    assert opt2.lr == kw["lr"]
    rest = run(opt2, resumed, STEPS - 3, start=3)
    np.testing.assert_allclose(rest, straight[3:], rtol=1e-12, atol=1e-14)


def test_state_dict_hyper_is_json_and_loads_structural_options(xp):
    params = make_params(xp, np.float32)
    opt = optim.Adam(params, lr=0.01, amsgrad=True)
    run(opt, params, 2)
    saved = json.loads(json.dumps({k: v for k, v in opt.state_dict().items() if k != "state"}))
    assert saved["hyper"]["betas"] == [0.9, 0.999]
    fresh = optim.Adam(make_params(xp, np.float32), lr=0.01)  # no amsgrad buffer yet
    fresh.load_state_dict(opt.state_dict())
    assert fresh.hyper["amsgrad"] is True and fresh.hyper["betas"] == (0.9, 0.999)
    assert fresh.state_dict()["state"]["0.W.max_exp_avg_sq"].dtype == np.float32


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(type="SGD"), "from a SGD optimizer"),
    (lambda d: d.pop("step"), "keys"),
    (lambda d: d["hyper"].pop("eps"), "do not match"),
    (lambda d: d["hyper"].update(eps=-1.0), "Invalid eps"),
    (lambda d: d.update(step=-2), "'step'"),
    (lambda d: d["state"].pop("0.b.exp_avg"), "missing ['0.b.exp_avg']"),
    (lambda d: d["state"].update({"2.W.exp_avg": np.zeros(2)}), "unexpected ['2.W.exp_avg']"),
    (lambda d: d["state"].update({"0.W.exp_avg_sq": np.zeros((4, 3))}), "shape (4, 3)"),
])
def test_load_state_dict_rejects_mismatches_and_changes_nothing(xp, mutate, message):
    params = make_params(xp, np.float64)
    opt = optim.Adam(params, lr=0.01)
    run(opt, params, 2)
    saved = opt.state_dict()
    saved["hyper"] = dict(saved["hyper"])
    mutate(saved)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["step"] == before["step"] and after["hyper"] == before["hyper"]
    for key in before["state"]:
        np.testing.assert_array_equal(after["state"][key], before["state"][key])


def test_state_dict_needs_unique_names():
    params = [Parameter(np.ones(2), "w"), Parameter(np.ones(3), "w")]
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"empty or repeated: \['w'\]"):
        opt.state_dict()


# ---------------------------------------------------------------------------------------
def test_replaced_data_is_reflattened_with_its_state(xp, kernel_backend):
    params = make_params(xp, np.float64)
    opt = optim.Adam(params, lr=0.05, amsgrad=True)
    want = expected_adam(THETA0, STEPS, lr=0.05, amsgrad=True)
    got = run(opt, params, 2)
    params[0].data = params[0].data.copy()  # what model.to() or a user assignment does
    params[2].data = params[2].data * 1.0
    got += run(opt, params, STEPS - 2, start=2)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    flat = opt._groups[0].data
    assert all(xp.shares_memory(p.data, flat) for p in params), \
        "parameters must live in the flat buffer"


def test_dtype_change_carries_state_and_keeps_float32(xp):
    params = make_params(xp, np.float64)
    opt = optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True)
    want = expected_rmsprop(THETA0, STEPS, lr=0.01, momentum=0.5, centered=True)
    got = run(opt, params, 3)
    for p in params:
        p.data = p.data.astype(np.float32)
    got += run(opt, params, STEPS - 3, start=3)
    assert all(p.data.dtype == np.float32 for p in params)
    assert all(v.dtype == np.float32 for v in opt.state_dict()["state"].values())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_changed_shape_is_a_clear_error(xp):
    params = make_params(xp, np.float64)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    run(opt, params, 1)
    params[1].data = xp.zeros(5)
    with pytest.raises(ValueError, match=r"'0.b' changed shape from \(4,\) to \(5,\)"):
        opt.step()


def test_to_device_moves_parameters_and_state(device, kernels_for_both_devices):
    params = make_params(np, np.float64)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    want = expected_sgd(THETA0, 4, lr=0.1, momentum=0.9)
    got = run(opt, params, 2)
    assert opt.to(str(device)) is opt
    assert all(type(p.data) is type(device.xp.zeros(1)) for p in params)
    got += run(opt, params, 2, start=2)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build_it,error,message", [
    (lambda p: optim.SGD(p, lr=-0.1), ValueError, "Invalid lr"),
    (lambda p: optim.SGD(p, lr=float("nan")), ValueError, "Invalid lr"),
    (lambda p: optim.SGD(p, lr="0.1"), TypeError, "lr must be a real number"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.5), ValueError, "Invalid momentum"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1), ValueError, "Invalid weight_decay"),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), ValueError, "Nesterov momentum requires"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "zero dampening"),
    (lambda p: optim.Adam(p, betas=(1.0, 0.999)), ValueError, "Invalid beta1"),
    (lambda p: optim.Adam(p, betas=(0.9, -0.1)), ValueError, "Invalid beta2"),
    (lambda p: optim.Adam(p, betas=0.9), ValueError, "betas must be a pair"),
    (lambda p: optim.Adam(p, eps=-1e-8), ValueError, "Invalid eps"),
    (lambda p: optim.AdamW(p, amsgrad="yes"), TypeError, "amsgrad must be True or False"),
    (lambda p: optim.RMSprop(p, alpha=-0.5), ValueError, "Invalid alpha"),
    (lambda p: optim.RMSprop(p, momentum=-1), ValueError, "Invalid momentum"),
    (lambda p: optim.Adagrad(p, lr_decay=-1), ValueError, "Invalid lr_decay"),
    (lambda p: optim.Adagrad(p, initial_accumulator_value=-1), ValueError,
     "Invalid initial_accumulator_value"),
    (lambda p: optim.SGD([], lr=0.1), ValueError, "empty parameter list"),
    (lambda p: optim.SGD([{"params": p}], lr=0.1), TypeError, "parameter groups"),
    (lambda p: optim.SGD([np.zeros(3)], lr=0.1), TypeError, "expected Parameter objects"),
    (lambda p: optim.SGD(p + p[:1], lr=0.1), ValueError, "given twice"),
    (lambda p: optim.SGD([Parameter(np.arange(3), "i")], lr=0.1), TypeError, "floating point"),
])
def test_hyperparameters_are_validated(build_it, error, message):
    with pytest.raises(error, match=message):
        build_it(make_params(np, np.float32))


def test_lr_attribute_is_a_python_float_and_validated(xp):
    params = make_params(xp, np.float32)
    opt = optim.SGD(params, lr=0.1)
    opt.lr = np.float64(0.05)
    assert type(opt.lr) is float and opt.lr == 0.05
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.lr = -1.0
    run(opt, params, 1)
    np.testing.assert_allclose(flat_values(params), THETA0 - 0.05 * gradient(THETA0, 0),
                               rtol=1e-5, atol=1e-6)
    assert all(p.data.dtype == np.float32 for p in params)


def test_step_closure_returns_the_loss(xp):
    params = make_params(xp, np.float64)
    opt = optim.SGD(params, lr=0.1)
    assert opt.step(lambda: 3.5) == 3.5 and opt.step() is None


# ---------------------------------------------------------------------------------------
# Gradient clipping
def flat_grads(params):
    return np.concatenate([to_numpy(p.grad).ravel() for p in params])


def set_grads(params, xp, scale=1.0):
    g = scale * gradient(THETA0, 0)
    offset = 0
    for p in params:
        p.grad = xp.asarray(g[offset:offset + p.size].reshape(p.shape))
        offset += p.size
    return g


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_clip_grad_norm(xp, flat, norm_type):
    params = make_params(xp, np.float32)
    if flat:
        optim.SGD(params, lr=0.1)
    assert len(clip._gradients(params)) == (1 if flat else len(params))
    g = set_grads(params, xp).astype(np.float32).astype(np.float64)
    total = np.max(np.abs(g)) if norm_type == math.inf else np.sum(np.abs(g) ** norm_type) ** (
        1 / norm_type)
    assert clip.grad_norm(params, norm_type) == pytest.approx(total, rel=1e-5)
    max_norm = total / 4
    returned = clip.clip_grad_norm(params, max_norm, norm_type)
    assert type(returned) is float and returned == pytest.approx(total, rel=1e-5)
    np.testing.assert_allclose(flat_grads(params), g * max_norm / (total + 1e-6), rtol=1e-5)
    assert all(p.grad.dtype == np.float32 for p in params)
    # below the limit nothing changes
    before = flat_grads(params)
    clip.clip_grad_norm(params, 10 * total, norm_type)
    np.testing.assert_array_equal(flat_grads(params), before)


def test_clip_counts_stale_gradients_as_zero(xp):
    params = make_params(xp, np.float64)
    opt = optim.SGD(params, lr=0.1)
    set_grads(params, xp, scale=100.0)  # leaves large values in the flat buffer
    opt.zero_grad()
    params[0].grad = xp.ones((3, 4))
    assert clip.grad_norm(params) == pytest.approx(math.sqrt(12))
    assert clip.clip_grad_norm(params, 1.0) == pytest.approx(math.sqrt(12))
    np.testing.assert_allclose(flat_grads(params)[:12], 1 / (math.sqrt(12) + 1e-6))
    assert not flat_grads(params)[12:].any()


def test_clip_subset_of_a_flat_buffer_touches_only_the_subset(xp):
    params = make_params(xp, np.float64)
    optim.SGD(params, lr=0.1)
    g = set_grads(params, xp)
    merged = clip._gradients(params[:2])  # consecutive: one view of their memory
    starts = flat_layout(params, 8, on_cpu=xp is np)[0]
    assert len(merged) == 1 and merged[0].size == starts[1] + 4  # with the zeros between
    total = np.linalg.norm(g[:16])
    assert clip.clip_grad_norm(params[:2], 0.5) == pytest.approx(total)
    np.testing.assert_allclose(flat_grads(params)[:16], g[:16] * 0.5 / (total + 1e-6))
    np.testing.assert_array_equal(flat_grads(params)[16:], g[16:])


def test_flat_buffer_keeps_each_parameter_aligned_and_the_gaps_zero(xp):
    """On the CPU every parameter's view starts on a cache line (the inference plans' loads
    pay for one that does not); the zeros between them stay zero through every update, and
    clipping merges across them only while they are zeros."""
    shapes = [(7, 45), (45,), (45, 3), (3,), (5,)]
    for dtype in (np.float32, np.float64):
        params = [Parameter(xp.asarray(np.linspace(-1, 1, math.prod(s)).reshape(s), dtype),
                            f"p{i}") for i, s in enumerate(shapes)]
        before = [to_numpy(p.data).copy() for p in params]
        for make in (lambda: optim.AdamW(params, lr=0.1, weight_decay=0.5),
                     lambda: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1,
                                       nesterov=True),
                     lambda: optim.RMSprop(params, lr=0.01, centered=True, weight_decay=0.1),
                     lambda: optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.3,
                                           weight_decay=0.1)):
            opt = make()  # each re-homes the parameters into buffers of its own
            flat = opt._groups[0].data
            for p, value in zip(params, before):
                assert xp.shares_memory(p.data, flat)
                np.testing.assert_array_equal(to_numpy(p.data), value)
                if xp is np:
                    assert p.data.ctypes.data % backend.ALIGNMENT == 0
            for _ in range(3):
                for p in params:
                    p.grad = xp.ones(p.shape, dtype)
                opt.step()
            used = np.zeros(flat.size, bool)
            for start, p in zip(opt._groups[0].starts, params):
                used[start:start + p.size] = True
                assert xp.shares_memory(p.data, flat[start:start + p.size])
            for buf in (flat, opt._groups[0].grad, *opt._groups[0].state.values()):
                gaps = to_numpy(buf)[~used]
                if isinstance(opt, optim.Adagrad) and buf is not flat and \
                        buf is not opt._groups[0].grad:
                    continue  # the accumulator's gaps start at its initial value
                np.testing.assert_array_equal(gaps, 0)
            before = [to_numpy(p.data).copy() for p in params]
        if xp is np:  # a gap that is not zero: clipping goes parameter by parameter
            grad = opt._groups[0].grad
            merged = clip._gradients(params[:2])
            assert len(merged) == 1 and np.shares_memory(merged[0], grad)
            grad[params[0].size] = 1.0  # the first gap
            assert len(clip._gradients(params[:2])) == 2
            grad[params[0].size] = 0.0


def test_clip_nonfinite(xp):
    params = make_params(xp, np.float64)
    optim.SGD(params, lr=0.1)
    set_grads(params, xp)
    params[1].grad[0] = np.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_grad_norm(params, 1.0, error_if_nonfinite=True)
    assert np.isnan(flat_grads(params)).sum() == 1  # untouched
    assert math.isnan(clip.clip_grad_norm(params, 1.0))
    assert np.isnan(flat_grads(params)).all()  # scaled by NaN, as PyTorch does
    set_grads(params, xp)
    params[1].grad = xp.full(4, np.inf)
    assert clip.grad_norm(params, math.inf) == math.inf
    assert clip.grad_norm(params, 2.0) == math.inf


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    params = make_params(np, np.float64)
    g = set_grads(params, np)
    tensors = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in params]
    offset = 0
    for t in tensors:
        t.grad = torch.from_numpy(g[offset:offset + t.numel()].reshape(t.shape).copy())
        offset += t.numel()
    for norm_type in (2.0, 1.0, math.inf):
        want = float(torch.nn.utils.clip_grad_norm_(tensors, 0.7, norm_type))
        assert clip.clip_grad_norm(params, 0.7, norm_type) == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(flat_grads(params),
                                   np.concatenate([t.grad.numpy().ravel() for t in tensors]),
                                   rtol=1e-12)


def test_clip_grad_value(xp):
    params = make_params(xp, np.float32)
    optim.Adam(params)
    g = set_grads(params, xp).astype(np.float32)
    clip.clip_grad_value(params, 0.5)
    np.testing.assert_array_equal(flat_grads(params), np.clip(g, -0.5, 0.5))
    assert all(p.grad.dtype == np.float32 for p in params)
    with pytest.raises(ValueError, match="clip_value must be >= 0"):
        clip.clip_grad_value(params, -1)
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clip.grad_norm(params, 0)
