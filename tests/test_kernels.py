"""Every kernel backend against the reference, driven by the registry (one test body).

``test_matches_reference`` runs each case of ``CASES`` (an op, an input recipe and the
options it exercises) on every backend of ``kernels.BACKENDS`` but the reference, in float32
and float64, over several shapes, and compares every array the call may write (outputs,
in-place states, and inputs that must stay untouched) with the reference run on the same
values. Adding an op or a backend to the registry adds its tests; nothing else to write.

The oracle is the reference evaluated in float64 on the very values given to the backend
(float32 inputs are widened exactly), so only the backend's own rounding is measured.
An element passes when it is equal to the oracle, or when

    |got - want| <= rtol · scale + tiny(dtype),   rtol = 1e-6 (float32), 1e-12 (float64)

``scale`` is ``|want|`` for a plain elementwise result. Where a formula cancels (a sum of
terms of both signs: bias and BatchNorm gradients, ``1 + tanh`` in GELU, ``p - target`` in
the cross-entropy gradient, ``sqrt(s - ḡ²)`` in centered RMSprop) ``scale`` is the sum of
the magnitudes of the terms, propagated to first order through the formula: that is the
size of the error any correct implementation makes by rounding each term once, and
exactly the error a naive implementation exceeds (e.g. ``E[x²] - E[x]²`` for a variance).
Sums over 1023 rows get no extra factor: float64 (or pairwise) accumulation keeps their
error near that of the terms, and a float32 running sum, which can be off by ~n·eps, fails.
``tiny`` (the smallest normal number) allows for results that underflow.

Arrays are NumPy for numba_cpu and for numba_cuda under ``NUMBA_ENABLE_CUDASIM=1`` (the
simulator runs kernels on host arrays, one Python thread per element: shapes stay small
there), CuPy otherwise. A backend that cannot run here is skipped with
``kernels.unavailable_reason``; an available backend whose module fails to import fails.

``cupy_on_host`` is the CuPy backend without a GPU: its op functions drive its CUDA C++
sources compiled for the CPU by ``cuda_host.py`` (blocks in turn, threads as coroutines),
on NumPy arrays and fewer rows. It checks the kernels' logic and math here; the GPU's own
``exp``/``tanh``/``erf`` rounding is checked by the ``cupy`` backend on a GPU (ci/gpu.sh).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import cuda_host
from backprop import kernels as K
from backprop.kernels import reference as R

pytestmark = pytest.mark.kernel_harness  # ci/gpu.sh runs these in its kernels step
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CUPY_ON_HOST = "cupy_on_host"  # the CuPy backend's CUDA C++ compiled for the CPU (cuda_host.py)
BACKENDS = [name for name in K.BACKENDS if name != "reference"]
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-6, np.float64: 1e-12}
# activations whose formula multiplies z by a function of z (GELU, SiLU: z·Φ(z), z·σ(z)):
# NaN at -inf (-inf · 0), and an extra rounding of the product; found from the reference
with np.errstate(invalid="ignore", over="ignore"):
    GELUS = tuple(a for a in R.ACTIVATIONS
                  if np.isnan(R.activate(np, np.array([-np.inf]), a, 0.01))[0])


def batch_shapes(backend: str) -> list[tuple[int, int]]:
    if backend == "numba_cuda" and SIMULATOR:
        return [(1, 1), (3, 5), (17, 9)]
    if backend == CUPY_ON_HOST:  # every thread a coroutine: rows of 257 and tall batches
        return [(1, 1), (1, 300), (300, 1), (67, 257)]  # (two-stage bias sums), fewer rows
    return [(1, 1), (1, 300), (300, 1), (1023, 257)]


def flat_shapes(backend: str) -> list[tuple[int, ...]]:
    """Optimizer buffers: flat, and any shape (the kernels ravel them)."""
    if backend == "numba_cuda" and SIMULATOR:
        return [(1,), (17,), (3, 5)]
    return [(1,), (1000,), (33, 7), (1023 * 257,)]


def array_module(backend: str):
    if backend in ("numba_cpu", CUPY_ON_HOST) or (backend == "numba_cuda" and SIMULATOR):
        return np
    import cupy

    return cupy


# ---------------------------------------------------------------------------------------
# A call: the arrays and scalars of one invocation, and how to judge its results
@dataclass
class Call:
    arrays: dict  # argument name -> host array (the dtype under test) or None
    scalars: dict  # argument name -> Python scalar
    alias: dict = field(default_factory=dict)  # argument name -> the argument it shares
    scales: Callable | None = None  # (before, after, scalars) -> {name: scale}, in float64
    exact: bool = False  # compare bit for bit with the reference in the same dtype


def invoke(fn, op: str, call: Call, xp, dtype=None) -> dict:
    """Call ``fn`` on device copies of ``call``'s arrays (cast to ``dtype`` when given) and
    return every array afterwards, on the host (an alias under both of its names)."""
    objs = {}
    for name, a in call.arrays.items():
        if a is not None and dtype is not None and a.dtype.kind == "f":
            a = a.astype(dtype)
        objs[name] = None if a is None else xp.array(a, copy=True, order="C")
    for name, target in call.alias.items():
        objs[name] = objs[target]
    params = inspect.signature(getattr(R, op)).parameters
    fn(*[objs[p] if p in objs else call.scalars[p] if p in call.scalars else params[p].default
         for p in params])
    host = np.asarray if xp is np else xp.asnumpy
    return {name: host(a) for name, a in objs.items() if a is not None}


def assert_close(label: str, got: np.ndarray, want: np.ndarray, scale, dtype) -> None:
    assert got.shape == want.shape, f"{label}: shape {got.shape}, expected {want.shape}"
    got64 = got.astype(np.float64)
    nan_got, nan_want = np.isnan(got64), np.isnan(want)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got64 - want)
        tol = RTOL[dtype] * np.asarray(scale, dtype=np.float64) + np.finfo(dtype).tiny
        ok = (got64 == want) | (nan_got & nan_want) | (err <= tol)
    if not ok.all():
        idx = np.argwhere(~ok)[:5]
        lines = [f"  at {tuple(int(k) for k in i)}: got {got64[tuple(i)]!r}, want "
                 f"{want[tuple(i)]!r}, tolerance {np.broadcast_to(tol, want.shape)[tuple(i)]!r}"
                 for i in idx]
        count = f"{int((~ok).sum())} of {ok.size} elements differ"
        pytest.fail(f"{label}: {count}\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------
# Inputs
def values(rng, shape, kind: str) -> np.ndarray:
    """float64 test values: ``normal`` N(0, 3²); ``extreme`` mixes in exact zeros, ±30, ±90
    (past float32 exp's range) and ±1000 (saturating); ``nonfinite`` mixes in ±inf, NaN."""
    z = rng.standard_normal(shape) * 3.0
    special = {"normal": None, "extreme": [0.0, 0.0, 30.0, -30.0, 90.0, -90.0, 1e3, -1e3],
               "nonfinite": [np.inf, -np.inf, np.nan]}[kind]
    if special is not None:
        pick = rng.random(shape) < 0.3
        z[pick] = rng.choice(special, size=int(pick.sum()))
    return z


def cast(dtype, *arrays):
    return [None if a is None else np.asarray(a, dtype=dtype) for a in arrays]


def colsum(a):
    return np.abs(a).sum(axis=0)


# ---------------------------------------------------------------------------------------
# Scales (see the module docstring): first-order error magnitudes, float64
def derivative_terms(act, s, alpha):
    """Σ|terms| of ``σ'`` evaluated from ``s`` (``a``, or ``z`` for NEEDS_Z)."""
    if act == "identity":
        return np.ones_like(s)
    if act in ("relu", "leaky_relu", "softplus"):
        return np.abs(R.derivative(np, s, s, act, alpha))
    if act == "sigmoid":
        return np.abs(s) + s * s
    if act == "tanh":
        return 1.0 + s * s
    if act == "gelu_tanh":
        t = np.tanh(R.GELU_K * (s + R.GELU_C * s ** 3))
        return 0.5 * (1 + np.abs(t)) + 0.5 * np.abs(s) * (1 + t * t) * R.GELU_K * (
            1 + 3 * R.GELU_C * s * s)
    if act == "gelu_erf":
        return 0.5 * (1 + np.abs(R._erf(np, s * R.INV_SQRT2))) + np.abs(s) * (1 + s * s) * np.exp(
            -0.5 * s * s) * R.INV_SQRT_2PI
    # any other record: |σ'| plus |s σ''| (σ'' by central differences in float64), the
    # first-order effect of rounding s and of the products inside σ'
    with np.errstate(all="ignore"):
        d = np.abs(R.derivative(np, s, s, act, alpha))
        h = 1e-5 * (1.0 + np.abs(s))
        second = (R.derivative(np, s + h, s + h, act, alpha)
                  - R.derivative(np, s - h, s - h, act, alpha)) / (2 * h)
        terms = d + np.abs(s * second) + np.abs(s)
    return np.where(np.isfinite(terms), terms, d)  # at ±inf: |σ'| alone


def bias_act_forward_scales(before, after, sc):
    z, b = before["z"], before["b"]
    pre = z if b is None else z + b
    spread = np.abs(z) + (0 if b is None else np.abs(b))  # rounding of z + b
    act, alpha = sc["act"], sc["alpha"]
    slope = np.abs(R.derivative(np, R.activate(np, pre, act, alpha), pre, act, alpha))
    # (0 · inf is 0 here: a flat σ does not pass on the rounding of an infinite input)
    carried = np.where(slope == 0, 0.0, slope * np.where(slope == 0, 0.0, spread))
    out = np.abs(after["out"]) + carried + (np.abs(pre) if act in GELUS else 0)
    return {"out": out, "z": spread}


def bias_act_backward_scales(before, after, sc):
    act = sc["act"]
    s = before["z"] if act in R.NEEDS_Z else before["a"]
    terms = np.abs(before["da"]) * derivative_terms(act, s, sc["alpha"])
    scales = {"delta_out": terms}
    if before.get("db_out") is not None:
        scales["db_out"] = colsum(terms) + (np.abs(before["db_out"]) if sc["accumulate"] else 0)
    return scales


def softmax_forward_scales(before, after, sc):
    x = before["x"]
    spread = np.abs(x - x.max(axis=1, keepdims=True))  # exp's condition number
    return {"out": np.abs(after["out"]) * (1 + spread)}


def softmax_backward_scales(before, after, sc):
    dy, y = before["dy"], before["y"]
    s = np.abs(y) * (np.abs(dy) + np.abs(dy * y).sum(axis=1, keepdims=True))
    return {"out": s}


def softmax_xent_scales(before, after, sc):
    z, labels, eps_s, scale = before["logits"], before["labels"], sc["smoothing"], sc["scale"]
    n, c = z.shape
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = z - z.max(axis=1, keepdims=True)
        p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        spread = np.nan_to_num(np.abs(shifted), posinf=0.0)  # exp(-inf) = 0 exactly
        sum_err = (p * (1 + spread)).sum(axis=1)
        log_total = np.log(np.exp(shifted).sum(axis=1))
        picked = np.abs(shifted[np.arange(n), labels])
        loss = np.abs(log_total) + (1 - eps_s) * picked + eps_s / c * spread.sum(axis=1)
        target = np.full_like(z, eps_s / c)
        target[np.arange(n), labels] += 1 - eps_s
        grad = abs(scale) * (p * (1 + spread + sum_err[:, None]) + target)
    return {"loss_out": loss + sum_err, "grad_out": grad}


def sgd_scales(before, after, sc):
    p, g, buf = before["p"], before["g"], before["buf"]
    mu = sc["momentum"]
    sd = np.abs(g) + abs(sc["weight_decay"]) * np.abs(p)
    scales = {}
    step = sd
    if mu:
        sbuf = sd if sc["first_step"] else abs(mu) * np.abs(buf) + abs(1 - sc["dampening"]) * sd
        scales["buf"] = sbuf
        step = sd + abs(mu) * sbuf if sc["nesterov"] else sbuf
    scales["p"] = np.abs(p) + abs(sc["lr"]) * step
    return scales


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _quotient_scale(num, snum, den, sden):
    """Scale of ``num / den`` from the scales of both (and one rounding)."""
    return _safe_div(snum, den) + np.abs(num) * _safe_div(_safe_div(sden, den) + 1, den)


def rmsprop_scales(before, after, sc):
    p, g, s0 = before["p"], before["g"], before["square_avg"]
    a, mu = sc["alpha"], sc["momentum"]
    d = g + sc["weight_decay"] * p
    sd = np.abs(g) + abs(sc["weight_decay"]) * np.abs(p)
    ss = a * np.abs(s0) + (1 - a) * (d * d + 2 * np.abs(d) * sd)
    scales = {"square_avg": ss}
    var, svar = after["square_avg"].copy(), ss
    if sc["centered"]:
        g0 = before["grad_avg"]
        sg = np.abs(g0) + (1 - a) * (sd + np.abs(g0))
        g1 = after["grad_avg"]
        scales["grad_avg"] = sg
        var = var - g1 * g1
        svar = ss + 2 * np.abs(g1) * sg + g1 * g1
    root = np.sqrt(np.maximum(var, 0))
    avg = root + sc["eps"]
    step = _quotient_scale(d, sd, avg, _safe_div(0.5 * svar, root))
    if mu:
        step = abs(mu) * np.abs(before["buf"]) + step
        scales["buf"] = step
    scales["p"] = np.abs(p) + abs(sc["lr"]) * step
    return scales


def adam_scales(before, after, sc):
    p, g, m0, v0 = before["p"], before["g"], before["m"], before["v"]
    b1, b2, lr, wd, t = sc["beta1"], sc["beta2"], sc["lr"], sc["weight_decay"], sc["step"]
    l2 = 0.0 if sc["decoupled"] else wd
    d = g + l2 * p
    sd = np.abs(g) + abs(l2) * np.abs(p)
    sm = np.abs(m0) + (1 - b1) * (sd + np.abs(m0))
    sv = b2 * np.abs(v0) + (1 - b2) * (d * d + 2 * np.abs(d) * sd)
    scales = {"m": sm, "v": sv}
    second, s2 = after["v"], sv
    if before.get("vmax") is not None:
        second = after["vmax"]
        s2 = np.where(after["v"] >= before["vmax"], sv, np.abs(before["vmax"]))
        scales["vmax"] = s2
    bc2 = np.sqrt(1 - b2 ** t)
    root = np.sqrt(second) / bc2
    denom = root + sc["eps"]
    update = lr / (1 - b1 ** t) * _quotient_scale(after["m"], sm, denom,
                                                  _safe_div(0.5 * s2 / bc2, np.sqrt(second)))
    scales["p"] = np.abs(p) * (1 + (abs(lr * wd) if sc["decoupled"] else 0)) + update
    return scales


def adagrad_scales(before, after, sc):
    p, g, s0 = before["p"], before["g"], before["state_sum"]
    d = g + sc["weight_decay"] * p
    sd = np.abs(g) + abs(sc["weight_decay"]) * np.abs(p)
    ss = np.abs(s0) + d * d + 2 * np.abs(d) * sd
    root = np.sqrt(after["state_sum"])
    clr = sc["lr"] / (1 + (sc["step"] - 1) * sc["lr_decay"])
    update = abs(clr) * _quotient_scale(d, sd, root + sc["eps"], _safe_div(0.5 * ss, root))
    return {"state_sum": ss, "p": np.abs(p) + update}


def batchnorm_forward_scales(before, after, sc):
    x, gamma, beta = before["x"], before["gamma"], before["beta"]
    mean, var, r = after["mean_out"], after["var_out"], after["invstd_out"]
    mabs = np.abs(x).mean(axis=0)  # the rounding of the mean is ~eps·mean|x|
    svar = var + np.finfo(np.float32).eps * mabs * mabs  # allowance for that rounding
    sr = r * (1 + 0.5 * svar / (var + sc["eps"]))
    xhat = R.batchnorm_normalized(x, mean, r)
    sxhat = (np.abs(x - mean) + mabs) * r + np.abs(xhat) * sr / r
    return {"mean_out": mabs, "var_out": svar, "invstd_out": sr,
            "out": np.abs(gamma) * sxhat + np.abs(beta)}


def batchnorm_backward_scales(before, after, sc):
    dy, x, gamma, r = before["dy"], before["x"], before["gamma"], before["invstd"]
    n = dy.shape[0]
    sxhat = (np.abs(x) + np.abs(before["mean"])) * r  # x̂ recomputed: x - μ cancels
    sb, sg = colsum(dy), colsum(np.abs(dy) * sxhat)
    acc = sc["accumulate"]
    dx = np.abs(gamma * r / n) * (n * np.abs(dy) + sb + sxhat * sg)
    return {"dx_out": dx,
            "dbeta_out": sb + (np.abs(before["dbeta_out"]) if acc else 0),
            "dgamma_out": sg + (np.abs(before["dgamma_out"]) if acc else 0)}


# ---------------------------------------------------------------------------------------
# Cases: (op, variant id, build(rng, dtype, shape) -> Call)
CASES: list = []


def case(op: str, variant: str, build) -> None:
    CASES.append(pytest.param(op, build, id=f"{op}-{variant}"))


def bias_act_forward_case(act, kind, bias, alias):
    def build(rng, dtype, shape):
        z = values(rng, shape, kind)
        b = rng.standard_normal(shape[1]) if bias else None
        z, b, out = cast(dtype, z, b, np.full(shape, np.nan))
        return Call({"z": z, "b": b, "out": out}, {"act": act, "alpha": 0.1},
                    {"out": "z"} if alias else {}, bias_act_forward_scales)
    return build


def bias_act_backward_case(act, kind, db, accumulate=False, alias=False, pass_unused=True):
    def build(rng, dtype, shape):
        z = values(rng, shape, kind)
        da = values(rng, shape, "nonfinite" if kind == "nonfinite" else "normal")
        z, da = cast(dtype, z, da)
        with np.errstate(all="ignore"):
            a = R.activate(np, z.astype(np.float64), act, 0.1).astype(dtype)
        if not pass_unused:
            a, z = (None, z) if act in R.NEEDS_Z else (a, None)
        arrays = {"da": da, "a": a, "z": z, "delta_out": np.full(shape, np.nan, dtype),
                  "db_out": cast(dtype, rng.standard_normal(shape[1]))[0] if db else None}
        return Call(arrays, {"act": act, "alpha": 0.1, "accumulate": accumulate},
                    {"delta_out": "da"} if alias else {}, bias_act_backward_scales)
    return build


for _act in R.ACTIVATIONS:
    case("bias_act_forward", f"{_act}-bias", bias_act_forward_case(_act, "normal", True, False))
    if _act not in R.NEEDS_Z:  # z + b is written back for those: out cannot be z
        case("bias_act_forward", f"{_act}-bias-out_is_z",
             bias_act_forward_case(_act, "normal", True, True))
    case("bias_act_forward", f"{_act}-extreme-nobias-out_is_z",
         bias_act_forward_case(_act, "extreme", False, True))
    case("bias_act_backward", f"{_act}-db-delta_is_da",
         bias_act_backward_case(_act, "normal", True, alias=True))
    case("bias_act_backward", f"{_act}-db_accumulate",
         bias_act_backward_case(_act, "normal", True, accumulate=True, pass_unused=False))
    case("bias_act_backward", f"{_act}-nodb", bias_act_backward_case(_act, "normal", False))
    case("bias_act_backward", f"{_act}-extreme", bias_act_backward_case(_act, "extreme", True))
    if _act not in GELUS:  # the reference's GELU(-inf) is NaN (-inf · 0): not meaningful
        case("bias_act_forward", f"{_act}-nonfinite",
             bias_act_forward_case(_act, "nonfinite", True, False))
        case("bias_act_backward", f"{_act}-nonfinite",
             bias_act_backward_case(_act, "nonfinite", True))


def softmax_forward_case(kind, alias):
    def build(rng, dtype, shape):
        x = values(rng, shape, "normal")
        if kind == "extreme":
            x = x * (1e4 / 3.0)
        if kind == "masked":  # -inf logits (never a whole row)
            x[(rng.random(shape) < 0.3) & (np.arange(shape[1]) > 0)] = -np.inf
        x, out = cast(dtype, x, np.full(shape, np.nan))
        return Call({"x": x, "out": out}, {}, {"out": "x"} if alias else {},
                    softmax_forward_scales)
    return build


def softmax_backward_case(alias):
    def build(rng, dtype, shape):
        y = np.exp(values(rng, shape, "normal"))
        y /= y.sum(axis=1, keepdims=True)
        dy, y, out = cast(dtype, values(rng, shape, "normal"), y, np.full(shape, np.nan))
        return Call({"dy": dy, "y": y, "out": out}, {}, {"out": "dy"} if alias else {},
                    softmax_backward_scales)
    return build


def softmax_xent_case(kind, smoothing, mean, alias):
    def build(rng, dtype, shape):
        n, c = shape
        z = values(rng, shape, "normal")
        labels = rng.integers(0, c, n)
        if kind == "extreme":
            z = z * (1e4 / 3.0)
        if kind == "masked":
            masked = rng.random(shape) < 0.3
            masked[np.arange(n), labels] = False
            z[masked] = -np.inf
        z, grad, loss = cast(dtype, z, np.full(shape, np.nan), np.full(n, np.nan))
        return Call({"logits": z, "labels": labels, "grad_out": grad, "loss_out": loss},
                    {"smoothing": smoothing, "scale": 1.0 / n if mean else 1.0},
                    {"grad_out": "logits"} if alias else {}, softmax_xent_scales)
    return build


case("softmax_forward", "normal", softmax_forward_case("normal", False))
case("softmax_forward", "logits_1e4-out_is_x", softmax_forward_case("extreme", True))
case("softmax_forward", "masked_-inf", softmax_forward_case("masked", False))
case("softmax_backward", "normal", softmax_backward_case(False))
case("softmax_backward", "out_is_dy", softmax_backward_case(True))
case("softmax_xent", "mean", softmax_xent_case("normal", 0.0, True, False))
case("softmax_xent", "smoothing-sum", softmax_xent_case("normal", 0.1, False, False))
case("softmax_xent", "logits_1e4-smoothing-grad_is_logits",
     softmax_xent_case("extreme", 0.1, True, True))
case("softmax_xent", "logits_1e4", softmax_xent_case("extreme", 0.0, True, False))
case("softmax_xent", "masked_-inf", softmax_xent_case("masked", 0.0, True, False))


def optimizer_state(rng, shape):
    """Parameters, a gradient with exact zeros, and optimizer states of plausible sizes."""
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.2] = 0.0
    return {"p": rng.standard_normal(shape), "g": g,
            "momentum": rng.standard_normal(shape) * 0.1,
            "second": np.abs(rng.standard_normal(shape)) * 0.01 * (rng.random(shape) < 0.8)}


def sgd_case(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False):
    def build(rng, dtype, shape):
        s = optimizer_state(rng, shape)
        buf = s["momentum"] if momentum else None
        if momentum and first_step:
            buf = np.full(shape, np.nan)  # the first step overwrites the buffer
        p, g, buf = cast(dtype, s["p"], s["g"], buf)
        return Call({"p": p, "g": g, "buf": buf},
                    {"lr": 0.1, "momentum": momentum, "dampening": dampening,
                     "nesterov": nesterov, "weight_decay": weight_decay,
                     "first_step": first_step}, scales=sgd_scales)
    return build


def rmsprop_case(momentum=0.0, weight_decay=0.0, centered=False):
    def build(rng, dtype, shape):
        s = optimizer_state(rng, shape)
        grad_avg = s["momentum"] if centered else None
        square_avg = s["second"] + (grad_avg ** 2 + 0.01 if centered else 0)  # s ≥ ḡ²
        p, g, sq, buf, ga = cast(dtype, s["p"], s["g"], square_avg,
                                 rng.standard_normal(shape) if momentum else None, grad_avg)
        return Call({"p": p, "g": g, "square_avg": sq, "buf": buf, "grad_avg": ga},
                    {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": weight_decay,
                     "momentum": momentum, "centered": centered}, scales=rmsprop_scales)
    return build


def adam_case(weight_decay=0.0, decoupled=False, amsgrad=False, step=1):
    def build(rng, dtype, shape):
        s = optimizer_state(rng, shape)
        vmax = s["second"] * rng.uniform(0.5, 1.5, shape) if amsgrad else None
        p, g, m, v, vm = cast(dtype, s["p"], s["g"], s["momentum"], s["second"], vmax)
        return Call({"p": p, "g": g, "m": m, "v": v, "vmax": vm},
                    {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                     "weight_decay": weight_decay, "decoupled": decoupled, "step": step},
                    scales=adam_scales)
    return build


def adagrad_case(lr_decay=0.0, weight_decay=0.0, step=1):
    def build(rng, dtype, shape):
        s = optimizer_state(rng, shape)
        p, g, ss = cast(dtype, s["p"], s["g"], s["second"])
        return Call({"p": p, "g": g, "state_sum": ss},
                    {"lr": 0.01, "lr_decay": lr_decay, "eps": 1e-10,
                     "weight_decay": weight_decay, "step": step}, scales=adagrad_scales)
    return build


case("sgd_step", "plain", sgd_case())
case("sgd_step", "weight_decay", sgd_case(weight_decay=1e-2))
case("sgd_step", "momentum-first_step", sgd_case(momentum=0.9, first_step=True))
case("sgd_step", "momentum-dampening", sgd_case(momentum=0.9, dampening=0.1))
case("sgd_step", "nesterov-weight_decay", sgd_case(momentum=0.9, nesterov=True,
                                                   weight_decay=1e-2))
case("rmsprop_step", "plain", rmsprop_case())
case("rmsprop_step", "momentum-weight_decay", rmsprop_case(momentum=0.9, weight_decay=1e-2))
case("rmsprop_step", "centered", rmsprop_case(centered=True))
case("rmsprop_step", "centered-momentum", rmsprop_case(momentum=0.9, centered=True,
                                                       weight_decay=1e-2))
case("adam_step", "plain-step1", adam_case())
case("adam_step", "l2-step7", adam_case(weight_decay=1e-2, step=7))
case("adam_step", "adamw-step7", adam_case(weight_decay=1e-2, decoupled=True, step=7))
case("adam_step", "amsgrad-step3", adam_case(amsgrad=True, step=3))
case("adam_step", "amsgrad-adamw", adam_case(weight_decay=1e-2, decoupled=True, amsgrad=True,
                                             step=2))
case("adagrad_step", "plain", adagrad_case())
case("adagrad_step", "lr_decay-weight_decay", adagrad_case(lr_decay=0.1, weight_decay=1e-2,
                                                           step=5))


def dropout_case(p, seed, alias=False, kind="normal"):
    def build(rng, dtype, shape):
        (x,) = cast(dtype, values(rng, shape, kind))
        return Call({"x": x, "out": np.full(shape, np.nan, dtype)},
                    {"key": R.dropout_key(seed, 12345), "threshold": R.dropout_threshold(p),
                     "scale": 1.0 / (1.0 - p)}, {"out": "x"} if alias else {}, exact=True)
    return build


case("dropout", "p0", dropout_case(0.0, 1))
case("dropout", "p0.1", dropout_case(0.1, 2**40 + 7))
case("dropout", "p0.5-out_is_x", dropout_case(0.5, 3, alias=True))
case("dropout", "p0.9-nonfinite", dropout_case(0.9, 4, kind="nonfinite"))


def batchnorm_forward_case(offset, eps):
    def build(rng, dtype, shape):
        x = offset + values(rng, shape, "normal")
        m = shape[1]
        x, gamma, beta = cast(dtype, x, rng.standard_normal(m), rng.standard_normal(m))
        outs = {"out": np.full(shape, np.nan, dtype)}
        outs.update({k: np.full(m, np.nan, dtype) for k in ("mean_out", "var_out", "invstd_out")})
        return Call({"x": x, "gamma": gamma, "beta": beta, **outs},
                    {"eps": eps}, scales=batchnorm_forward_scales)
    return build


def batchnorm_backward_case(accumulate, alias, offset=0.0):
    def build(rng, dtype, shape):
        m = shape[1]
        x = offset + rng.standard_normal(shape)
        dy, x, gamma, mean, invstd, dg, db = cast(
            dtype, values(rng, shape, "normal"), x, rng.standard_normal(m), x.mean(axis=0),
            rng.uniform(0.1, 3.0, m), rng.standard_normal(m), rng.standard_normal(m))
        return Call({"dy": dy, "x": x, "gamma": gamma, "mean": mean, "invstd": invstd,
                     "dx_out": np.full(shape, np.nan, dtype), "dgamma_out": dg, "dbeta_out": db},
                    {"accumulate": accumulate}, {"dx_out": "dy"} if alias else {},
                    batchnorm_backward_scales)
    return build


case("batchnorm_forward", "normal", batchnorm_forward_case(0.0, 1e-5))
case("batchnorm_forward", "mean_1000-eps_0.1", batchnorm_forward_case(1000.0, 0.1))
case("batchnorm_backward", "dx_is_dy", batchnorm_backward_case(False, True))
case("batchnorm_backward", "accumulate", batchnorm_backward_case(True, False))
case("batchnorm_backward", "mean_1000", batchnorm_backward_case(False, False, offset=1000.0))


# ---------------------------------------------------------------------------------------
# The test
def skip_unless_available(backend: str) -> None:
    reason = (cuda_host.unavailable_reason() if backend == CUPY_ON_HOST
              else K.unavailable_reason(backend))
    if reason is not None:
        pytest.skip(f"kernel backend {backend} unavailable: {reason}")


def backend_implementation(backend: str, op: str, monkeypatch):
    """``op`` of ``backend``; for :data:`CUPY_ON_HOST`, the CuPy backend's own op function
    driving its kernels compiled for the host (:func:`cuda_host.install`)."""
    if backend == CUPY_ON_HOST:
        cuda_host.install(monkeypatch)
        return getattr(cuda_host.CK, op)
    return K.implementation(backend, op)


def test_every_op_has_cases():
    assert {param.values[0] for param in CASES} == set(K.OPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op, build", CASES)
@pytest.mark.parametrize("backend", BACKENDS + [CUPY_ON_HOST])
def test_matches_reference(backend, op, build, dtype, request, monkeypatch):
    skip_unless_available(backend)
    if backend == "numba_cpu":  # the largest shapes through the parallel loops, others serial
        monkeypatch.setattr(importlib.import_module("backprop.kernels.numba_cpu"),
                            "PARALLEL_MIN_ELEMENTS", 1023 * 257)
    fn = backend_implementation(backend, op, monkeypatch)
    xp = array_module(backend)
    shapes = flat_shapes(backend) if op.endswith("_step") else batch_shapes(backend)
    for shape in shapes:
        seed = zlib.crc32(f"{request.node.callspec.id}-{shape}".encode())
        call = build(np.random.default_rng(seed), dtype, shape)
        label = f"{backend} {op} {np.dtype(dtype).name} {shape}"
        got = invoke(fn, op, call, xp)
        if call.exact:
            want = invoke(getattr(R, op), op, call, np)
            for name, w in want.items():
                assert np.array_equal(got[name], w, equal_nan=True), f"{label}: {name} differs"
            continue
        before = {k: None if a is None else a.astype(np.float64) if a.dtype.kind == "f" else a
                  for k, a in call.arrays.items()}
        with np.errstate(all="ignore"):
            want = invoke(getattr(R, op), op, call, np, dtype=np.float64)
            scales = call.scales(before, want, call.scalars) if call.scales else {}
        written_as = {target: name for name, target in call.alias.items()}  # z -> out
        for name, w in want.items():
            if name in call.alias:
                continue  # compared under the name of the array it shares
            scale = scales.get(written_as.get(name, name), scales.get(name, np.abs(w)))
            assert_close(f"{label} {name}", got[name], w, scale, dtype)


# ---------------------------------------------------------------------------------------
# Denormal optimizer states are flushed to 0 (reference.flush_denormals)
FLUSH_CASES = [  # op, the arguments after p and g (states first), the states' names
    ("adam_step", lambda s: (s[0], s[1], s[2], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 7),
     ("m", "v", "vmax")),
    ("rmsprop_step", lambda s: (s[0], s[1], s[2], 1e-2, 0.99, 1e-8, 0.0, 0.9, True),
     ("square_avg", "buf", "grad_avg")),
    ("sgd_step", lambda s: (s[0], 0.1, 0.9, 0.0, True, 0.0, False), ("buf",)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op, arguments, names", FLUSH_CASES, ids=[c[0] for c in FLUSH_CASES])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS + [CUPY_ON_HOST])
def test_optimizer_states_keep_no_denormal_value(backend, op, arguments, names, dtype,
                                                 monkeypatch):
    """Where a parameter's gradient is 0, its states decay; a decayed state that would be
    denormal is stored as 0, by every backend and the reference alike, and the weights are
    what they would be without the flush. Normal states, zeros, NaN and ±inf are kept."""
    if backend != "reference":
        skip_unless_available(backend)
    fn = getattr(R, op) if backend == "reference" else \
        backend_implementation(backend, op, monkeypatch)
    xp = np if backend == "reference" else array_module(backend)
    tiny = np.finfo(dtype).tiny
    denormal = np.array([tiny / 2, -tiny / 4, tiny * 2 ** -20, tiny * 1.1, -tiny * 3,
                         0.0, 1.0, np.inf], dtype)
    n = len(denormal)
    p = np.linspace(0.5, 1.5, n).astype(dtype)
    g = np.zeros(n, dtype)  # units that never fire
    states = [denormal.copy() for _ in names]
    if op == "rmsprop_step":  # square_avg - grad_avg² must stay >= 0 (centered)
        states[0] = np.abs(states[0])
        states[2] = np.zeros(n, dtype)
    if op == "adam_step":  # second moments are >= 0
        states[1], states[2] = np.abs(states[1]), np.abs(states[2])
    arrays = [xp.asarray(a) for a in (p, g, *states)]
    fn(arrays[0], arrays[1], *arguments(arrays[2:]))
    got = [np.asarray(a.get() if hasattr(a, "get") else a) for a in arrays]
    for name, a in zip(names, got[2:]):
        finite = np.isfinite(a)
        small = finite & (a != 0) & (np.abs(a) < tiny)
        assert not small.any(), f"{backend} {op}: {name} keeps denormal values {a[small]}"
    assert np.array_equal(got[0][:5], p[:5]), f"{backend} {op}: the weights moved"


# ---------------------------------------------------------------------------------------
# Prepared calls (K.prepare): the op's work without its checks, for the layers' hot path
PREPARED_OPS = ["bias_act_forward", "bias_act_backward", "softmax_xent", "softmax_forward",
                "adam_step"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", PREPARED_OPS)
@pytest.mark.parametrize("choice", ["numba", "reference"])
def test_a_prepared_run_writes_what_the_op_writes(choice, op, dtype, monkeypatch):
    """Run twice (a prepared run is reused), on fresh copies of the inputs each time, it
    writes bit for bit what the op writes, with the backends that prepare their calls
    (numba_cpu's Dense epilogues and softmax cross-entropy) and those that do not."""
    from conftest import kernel_arguments

    if choice == "numba":
        skip_unless_available("numba_cpu")
    monkeypatch.setitem(K._state, "choice", choice)
    monkeypatch.setitem(K._state, "tables", {})
    act = "relu" if op.startswith("bias_act") else None
    args = kernel_arguments(op, dtype, act, n=37, m=19)
    if op == "bias_act_forward":
        args = (args[0], args[1], args[2], args[3], 0.0)
    arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]

    def fresh():
        return [a.copy() if i in arrays else a for i, a in enumerate(args)]

    want = fresh()
    getattr(K, op)(*want)
    got = fresh()
    token, run = K.prepare(op, *got)
    assert K.current(token)
    for _ in range(2):
        for i in arrays:  # the same objects, their inputs restored
            got[i][...] = args[i]
        run()
    for i in arrays:
        assert np.array_equal(got[i], want[i], equal_nan=True), f"{op}: argument {i} differs"


def test_a_prepared_run_goes_stale_with_the_backend(monkeypatch):
    skip_unless_available("numba_cpu")
    monkeypatch.setitem(K._state, "choice", "numba")
    monkeypatch.setitem(K._state, "tables", {})
    z = np.ones((4, 3), np.float32)
    token, _ = K.prepare("bias_act_forward", z, None, z, "relu", 0.0)
    assert K.current(token)
    K.set_backend("reference")
    try:
        assert not K.current(token)
        token, _ = K.prepare("bias_act_forward", z, None, z, "relu", 0.0)
        assert K.current(token)
        monkeypatch.setitem(K._state["tables"], "cpu", dict(K._state["tables"]["cpu"]))
        assert not K.current(token)  # a new table of ops for the device (as tests route)
    finally:
        K.set_backend("numba")


def test_prepare_checks_as_the_op_does():
    skip_unless_available("numba_cpu")
    z = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        K.implementation("numba_cpu", "bias_act_forward").prepare(
            z, np.ones(4, np.float32), z, "relu", 0.0)


# ---------------------------------------------------------------------------------------
# Contract checks that are not numbers
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_unknown_activation_is_rejected(backend):
    skip_unless_available(backend)
    xp = array_module(backend) if backend != "reference" else np
    z = xp.zeros((2, 3))
    with pytest.raises(ValueError, match="activation"):
        K.implementation(backend, "bias_act_forward")(z, None, xp.empty_like(z), "swish")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_buffers_are_rejected_or_handled(backend):
    """A non-contiguous ``out`` must raise a clear error or be written correctly, never be
    silently mis-indexed."""
    skip_unless_available(backend)
    xp = array_module(backend)
    z = xp.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    out = xp.zeros((6, 4)).T
    try:
        K.implementation(backend, "bias_act_forward")(z, None, out, "relu")
    except (TypeError, ValueError) as exc:
        assert "contiguous" in str(exc).lower()
        return
    np.testing.assert_array_equal(np.asarray(out if xp is np else xp.asnumpy(out)),
                                  np.maximum(np.asarray(z if xp is np else xp.asnumpy(z)), 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("backend", BACKENDS + [CUPY_ON_HOST])
def test_a_label_outside_the_classes_gives_a_nan_row(backend, dtype, monkeypatch):
    """The losses validate labels before any kernel sees them; a kernel called directly with
    a label outside [0, C) must still not read outside its row (a GPU would read stray
    memory, CuPy would wrap a negative index): its loss and gradient row are NaN, and the
    other rows are what they would be without it."""
    skip_unless_available(backend)
    fn = backend_implementation(backend, "softmax_xent", monkeypatch)
    xp = array_module(backend)
    rng = np.random.default_rng(5)
    n, c = 6, 7
    logits = rng.standard_normal((n, c)).astype(dtype)
    labels = rng.integers(0, c, n)
    bad = [1, n - 1]
    labels[bad] = [-1, c]  # the last row's: past the end of the whole array
    grad, loss = xp.empty((n, c), dtype), xp.empty(n, dtype)
    fn(xp.asarray(logits), xp.asarray(labels), 0.1, 1.0 / n, grad, loss)
    grad, loss = (a if xp is np else xp.asnumpy(a) for a in (grad, loss))
    assert np.isnan(loss[bad]).all() and np.isnan(grad[bad]).all()
    good = np.setdiff1d(np.arange(n), bad)
    want_grad, want_loss = np.empty((good.size, c)), np.empty(good.size)
    R.softmax_xent(logits[good].astype(np.float64), labels[good], 0.1, 1.0 / n, want_grad,
                   want_loss)
    np.testing.assert_allclose(loss[good], want_loss, rtol=10 * RTOL[dtype])
    np.testing.assert_allclose(grad[good], want_grad, rtol=10 * RTOL[dtype],
                               atol=10 * RTOL[dtype] / n)


def test_numba_cpu_rejects_bad_buffers_clearly():
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"out must be .*float32.*\(3, 4\).*got .*float64"):
        numba_cpu.bias_act_forward(z, None, np.zeros((3, 4)), "relu")
    with pytest.raises(ValueError, match="b must be .*shape \\(4,\\)"):
        numba_cpu.bias_act_forward(z, np.zeros(3, np.float32), np.zeros_like(z), "relu")
    p = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="needs a momentum buffer"):
        numba_cpu.sgd_step(p, p.copy(), None, 0.1, 0.9, 0.0, False, 0.0, True)
    readonly = np.zeros(5, np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="m must be a C-contiguous writeable"):
        numba_cpu.adam_step(p, p.copy(), readonly, p.copy(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                            False, 1)


def test_numba_cpu_rejects_partial_overlap():
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    buf = np.zeros(12, np.float32)
    x, out = buf[:6].reshape(2, 3), buf[3:9].reshape(2, 3)
    with pytest.raises(ValueError, match="out overlaps x without being it"):
        numba_cpu.softmax_forward(x, out)
    same = buf[:6].reshape(2, 3)  # another view of x's memory counts as x itself
    numba_cpu.softmax_forward(x, same)
    np.testing.assert_allclose(x, np.full((2, 3), 1 / 3), rtol=1e-6)


def test_numba_cpu_cache_is_keyed_by_the_modules_it_compiles_in():
    """The kernels inline vecmath's functions (through inline's calls), reference's
    constants and the activations' and optimizers' formulas; Numba keys its disk cache by
    the kernel's own file, so the key must also cover those five sources."""
    pytest.importorskip("numba")
    import hashlib
    from pathlib import Path

    from backprop.kernels import activations, inline, lowp, numba_cpu, optimizers, reference, \
        vecmath

    p = np.ones(3, np.float32)
    numba_cpu.adam_step(p, p.copy(), p.copy(), p.copy(), None, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                        False, 1)
    sources = b"".join(Path(m.__file__).read_bytes()
                       for m in (inline, vecmath, reference, activations, optimizers, lowp))
    for dispatcher in (numba_cpu._adam.serial, numba_cpu._adam.parallel):
        assert isinstance(dispatcher._cache, numba_cpu._KernelCache)
        if not dispatcher.signatures:
            continue
        key = dispatcher._cache._index_key(dispatcher.signatures[0],
                                           dispatcher.targetctx.codegen())
        assert key[-1] == hashlib.sha256(sources).hexdigest()


def _fresh_ir(loops, *args) -> str:
    """Optimised LLVM IR of a numba_cpu kernel's serial loop compiled afresh for ``args``
    (Numba cannot show the IR of code it loaded from its disk cache)."""
    import numba

    kernel = loops.serial
    options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**options)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_llvm(fresh.signatures[0])


@pytest.mark.codegen
@pytest.mark.parametrize("case", [(act, "forward") for act in R.ACTIVATIONS]
                         + [(act, "backward") for act in R.ACTIVATIONS]
                         + [("gelu_erf", "backward_db")], ids="-".join)
def test_numba_cpu_activation_is_inlined_and_the_loop_vectorised(case):
    """Each activation's formula (and vecmath's functions in it) is inlined into the
    epilogue's loop, which then runs on SIMD vectors. Left to LLVM's cost model, GELU's
    derivative (Φ and φ, the largest formula) stayed a call in three of its four backward
    specialisations, which ran 6× slower."""
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu
    from backprop.kernels.inline import WIDE_VECTORS
    from conftest import outlined_calls

    act, direction = case
    z = np.ones((4, 8), np.float32)
    if direction == "forward":
        ir = _fresh_ir(numba_cpu._forward_kernel(act), z, z[0], np.empty_like(z), 0.1)
    else:
        db, partial = ((np.zeros(8, np.float32), np.zeros((1, 8))) if direction == "backward_db"
                       else (None, None))
        ir = _fresh_ir(numba_cpu._backward_kernel(act), z, z, 0.1, np.empty_like(z), db,
                       False, partial)
    assert outlined_calls(ir) == []
    assert "x float>" in ir, "the loop was not vectorised"
    assert WIDE_VECTORS in ir, "the kernel does not prefer the CPU's widest vectors"


@pytest.mark.codegen
@pytest.mark.parametrize("op", ["softmax_forward", "softmax_xent"])
@pytest.mark.parametrize("pipelined", [False, True], ids=["in_order", "pipelined"])
def test_numba_cpu_softmax_rows_load_vectors_not_gathers(op, pipelined):
    """The softmax kernels' row loops load whole vectors. The pipelined kernel indexes its
    blocks from a computed offset; had a signed index kept Numba's negative-index
    wraparound, LLVM would gather each lane instead (that ran 4x slower)."""
    pytest.importorskip("numba")
    import re

    from backprop.kernels import numba_cpu

    x = np.ones((8, 600), np.float32)
    if op == "softmax_forward":
        ir = _fresh_ir(numba_cpu._SOFTMAX[pipelined], x, 2, np.empty_like(x))
    else:
        ir = _fresh_ir(numba_cpu._SOFTMAX_XENT[pipelined], x, np.zeros(8, np.int64), 0.1,
                       0.125, 2, np.empty_like(x), np.empty(8, np.float32))
    assert re.search(r"load <\d+ x float>", ir), "the row loops were not vectorised"
    assert "gather" not in ir


@pytest.mark.codegen
@pytest.mark.parametrize("kept", ["required", "all"], ids=["required_states", "all_states"])
@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam", "adagrad"])
def test_numba_cpu_optimizer_loop_is_vectorised_in_float32(name, kept):
    """The loop of each optimizer record (kernels/optimizers.py) inlines its formula and
    runs on float32 vectors; its scalars are rounded to float32 once, so no arithmetic is
    done in float64 (which would halve the lanes)."""
    pytest.importorskip("numba")
    import re

    from backprop.kernels import numba_cpu, optimizers

    record = optimizers.RECORDS[name]
    states = [np.ones(64, np.float32) if kept == "all" or s not in record.optional else None
              for s in record.states]
    states += [None] * (optimizers.SLOTS - len(states))
    args = (0.5,) * len(record.scalars) + (False,) * len(record.flags)
    ir = _fresh_ir(getattr(numba_cpu, f"_{name}"), np.ones(64, np.float32),
                   np.ones(64, np.float32), *states, args)
    assert re.search(r"= f(add|sub|mul|div) <\d+ x float>", ir), "the loop was not vectorised"
    assert not re.search(r"= f(add|sub|mul|div) (double|<\d+ x double>)", ir)
    calls = re.findall(r'call [^@]*@"?([\w.$]+)', ir)
    assert not [c for c in calls if "10optimizers" in c or "_update_impl" in c]


def _host_has_avx512() -> bool:
    import llvmlite.binding as llvm

    return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


@pytest.mark.codegen
def test_numba_cpu_math_loops_use_512_bit_vectors_where_the_cpu_has_them():
    """On a CPU with AVX-512, a kernel that inlines vecmath runs 16 float32 lanes at a time,
    not LLVM's default 8 for such cores (sigmoid's forward epilogue: 1.3-1.8× faster)."""
    pytest.importorskip("numba")
    if not _host_has_avx512():
        pytest.skip("this CPU has no AVX-512: 256-bit vectors are its widest")
    from backprop.kernels import numba_cpu

    z = np.ones((4, 64), np.float32)
    ir = _fresh_ir(numba_cpu._forward_kernel("sigmoid"), z, z[0], np.empty_like(z), 0.0)
    assert "<16 x float>" in ir


_AS_PYTHON = """
import copy
import numpy as np
from conftest import kernel_arguments
from backprop.kernels import OPS, numba_cpu, reference
assert not hasattr(numba_cpu._sgd.serial, "py_func"), "the JIT is not disabled"
for op in OPS:
    for act in reference.ACTIVATIONS if op.startswith("bias_act") else [None]:
        for dtype, rtol in ((np.float32, 2e-6), (np.float64, 1e-12)):
            args = kernel_arguments(op, dtype, act)
            if op == "rmsprop_step":  # a reachable centered state: square_avg >= grad_avg²
                args[2][:] += args[4] ** 2
            ours, theirs = copy.deepcopy(args), copy.deepcopy(args)
            getattr(numba_cpu, op)(*ours)
            getattr(reference, op)(*theirs)
            for a, b in zip(ours, theirs):
                if isinstance(a, np.ndarray):
                    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-30, err_msg=op)
print("ok")
"""


def test_numba_cpu_kernels_run_as_python_with_the_jit_disabled():
    """``NUMBA_DISABLE_JIT=1`` (to step through a kernel in a debugger) runs every numba_cpu
    op as plain Python, intrinsics included (their Python stubs), with the reference's
    results."""
    pytest.importorskip("numba")
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NUMBA_DISABLE_JIT="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _AS_PYTHON], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_numba_cpu_leaky_relu_rounds_its_slope_to_the_dtype_as_the_reference():
    """float32 ``z · α`` multiplies by α rounded to float32, as NumPy does (and in float32
    lanes); multiplying by the float64 α and rounding the product differs in the last bit."""
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    z = np.random.default_rng(8).standard_normal((64, 512)).astype(np.float32)
    expected = R.activate(np, z, "leaky_relu", 0.1)
    out = numba_cpu.bias_act_forward(z, None, np.empty_like(z), "leaky_relu", 0.1)
    np.testing.assert_array_equal(out, expected)
    da = np.ones_like(z)
    delta = numba_cpu.bias_act_backward(da, out, None, "leaky_relu", 0.1, np.empty_like(z))
    np.testing.assert_array_equal(delta, R.derivative(np, out, None, "leaky_relu", 0.1))


def test_numba_cpu_serial_and_parallel_kernels_agree_bit_for_bit(monkeypatch):
    """Small calls run serially, large ones in parallel: the same loops in the same order."""
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    rng = np.random.default_rng(5)
    da = rng.standard_normal((300, 77)).astype(np.float32)
    a = rng.random((300, 77)).astype(np.float32)
    logits = rng.standard_normal((300, 77)).astype(np.float32) * 5
    labels = rng.integers(0, 77, 300)
    results = []
    for threshold in (0, 1 << 62):  # all parallel (softmax pipelined), then all serial
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_ELEMENTS", threshold)
        monkeypatch.setattr(numba_cpu, "_PIPELINE_MIN_ELEMENTS", threshold)
        delta, db = np.empty_like(da), np.empty(77, np.float32)
        numba_cpu.bias_act_backward(da, a, None, "sigmoid", 0.0, delta, db)
        out = numba_cpu.bias_act_forward(da.copy(), db, np.empty_like(da), "gelu_tanh")
        grad, loss = np.empty_like(logits), np.empty(300, np.float32)
        numba_cpu.softmax_xent(logits, labels, 0.1, 1 / 300, grad, loss)
        results.append((delta, db, out, grad, loss))
    for serial, parallel in zip(*results):
        np.testing.assert_array_equal(serial, parallel)


@pytest.mark.parametrize("shape", [(1, 1), (1, 600), (2, 256), (37, 600), (300, 77)])
def test_numba_cpu_pipelined_softmax_matches_rows_in_order(monkeypatch, shape):
    """Large softmax calls read each row's maximum while the previous row's exponentials are
    computed, block by block: the results are the same, bit for bit, as row by row, in place
    too, and around rows with a bad label, NaN or inf."""
    pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    n, c = shape
    rng = np.random.default_rng(n * 1000 + c)
    logits = (rng.standard_normal(shape) * 5).astype(np.float32)
    labels = rng.integers(0, c, n)
    if n > 2:
        logits[1, c // 2], logits[2, 0] = np.nan, np.inf
        labels[n // 2] = c  # invalid: a NaN row, and the pipeline must go on past it
    results = []
    for threshold in (0, 1 << 62):  # pipelined, then in order
        monkeypatch.setattr(numba_cpu, "_PIPELINE_MIN_ELEMENTS", threshold)
        y, in_place = np.empty_like(logits), logits.copy()
        numba_cpu.softmax_forward(logits, y)
        numba_cpu.softmax_forward(in_place, in_place)
        grad, loss = np.empty_like(logits), np.empty(n, np.float32)
        numba_cpu.softmax_xent(logits, labels, 0.1, 1 / n, grad, loss)
        results.append((y, in_place, grad, loss))
    for pipelined, in_order in zip(*results):
        np.testing.assert_array_equal(pipelined, in_order)
    np.testing.assert_array_equal(results[0][0], results[0][1])


def test_numba_cpu_sums_do_not_depend_on_thread_count():
    numba = pytest.importorskip("numba")
    from backprop.kernels import numba_cpu

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread here; nothing to compare")
    rng = np.random.default_rng(7)
    da = rng.standard_normal((1023, 257)).astype(np.float32) * 1e3
    a = rng.random((1023, 257)).astype(np.float32)
    results = []
    saved = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            delta, db = np.empty_like(da), np.empty(257, np.float32)
            numba_cpu.bias_act_backward(da, a, None, "sigmoid", 0.0, delta, db)
            dx, dg, dbeta = np.empty_like(da), np.empty(257, np.float32), np.empty(257, np.float32)
            numba_cpu.batchnorm_backward(da, a, db, db, db, dx, dg, dbeta)
            results.append((db, dg, dbeta, dx))
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# ---------------------------------------------------------------------------------------
# The registry
@pytest.fixture
def kernel_choice(monkeypatch):
    """Lets a test change the kernel choice; the previous one is restored afterwards."""
    saved = K._state["choice"]
    yield monkeypatch
    K._state["choice"] = saved
    K._state["tables"] = {}


def test_backend_resolution(kernel_choice):
    cpu_auto = "numba_cpu" if K.unavailable_reason("numba_cpu") is None else "reference"
    K.set_backend("auto")
    assert K.backend_name("cpu") == cpu_auto
    K.set_backend("reference")
    assert K.backend_name("cpu") == K.backend_name("cuda") == "reference"
    K.set_backend("cupy")
    with pytest.raises(K.KernelBackendError, match="only on CUDA arrays.*CPU"):
        K.backend_name("cpu")
    if K.unavailable_reason("cupy") is not None:
        with pytest.raises(K.KernelBackendError, match="'cupy' was requested but cannot run"):
            K.backend_name("cuda")
    K.set_backend("numba")
    if K.unavailable_reason("numba_cpu") is None:
        assert K.backend_name("cpu") == "numba_cpu"
    if K.unavailable_reason("numba_cuda") is None:
        assert K.backend_name("cuda") == "numba_cuda"
    else:
        with pytest.raises(K.KernelBackendError, match="numba_cuda"):
            K.backend_name("cuda")
    with pytest.raises(K.KernelBackendError, match="unknown kernel choice"):
        K.set_backend("fastest")


@pytest.mark.parametrize("choice, expected", [("reference", "reference"), ("numba", "numba_cpu"),
                                              ("auto", "numba_cpu"), ("", "numba_cpu")])
def test_env_choice_selects_the_cpu_kernels(kernel_choice, choice, expected):
    if expected == "numba_cpu":
        skip_unless_available("numba_cpu")
    kernel_choice.setenv("BACKPROP_KERNELS", choice)
    K._state["choice"], K._state["tables"] = None, {}
    assert K.backend_name("cpu") == expected
    z = np.linspace(-1, 1, 6).reshape(2, 3)
    out = K.bias_act_forward(z, None, np.empty_like(z), "relu")  # dispatched on numpy arrays
    np.testing.assert_array_equal(out, np.maximum(z, 0))
    assert K._table("cpu")["bias_act_forward"] is K.implementation(expected, "bias_act_forward")


def test_env_choice_rejects_unknown_values(kernel_choice):
    kernel_choice.setenv("BACKPROP_KERNELS", "fastest")
    K._state["choice"] = None
    with pytest.raises(K.KernelBackendError, match="BACKPROP_KERNELS='fastest'.*expected"):
        K.get_choice()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_module_defines_every_op_it_claims(backend):
    """A backend's module must import where its dependencies are installed and define a
    function for every op that OPS lists for it."""
    module_name = K.BACKENDS[backend][0]
    reason = K.unavailable_reason(backend)
    if importlib.util.find_spec(module_name) is None:
        assert reason is not None, f"{module_name} does not exist, yet {backend} is available"
        pytest.skip(f"{module_name} is not written yet and {backend} is unavailable: {reason}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # only a missing third-party package excuses it
        missing = (exc.name or "").split(".")[0]
        if reason is None or missing not in ("cupy", "cupyx", "numba") or \
                importlib.util.find_spec(missing) is not None:
            raise
        pytest.skip(f"{module_name} needs {missing}, which is not installed: {reason}")
    claimed = [op for op, backends in K.OPS.items() if backend in backends]
    missing_ops = [op for op in claimed if not callable(getattr(module, op, None))]
    assert not missing_ops, f"{module_name} lacks {missing_ops}, which kernels.OPS lists for it"
    for op in claimed:
        ours = list(inspect.signature(getattr(module, op)).parameters)
        theirs = list(inspect.signature(getattr(R, op)).parameters)
        assert ours == theirs, f"{module_name}.{op}{ours} differs from the reference {theirs}"
