"""Layers, activations and initialisers: gradients (finite differences in float64), values
against independent formulas, buffer reuse, dtype discipline and error messages."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import backprop as bp
from backprop import init
from backprop.activations import (GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus,
                                  Tanh)
from backprop.gradcheck import gradcheck
from backprop.kernels.activations import RECORDS
from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Layer, Residual, from_config
from backprop.model import Sequential

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh",
               "softplus", "softmax", "log_softmax"]
KINKED = {"relu", "leaky_relu"}  # not differentiable at 0: keep inputs away from it


def _erf(z):
    return np.vectorize(math.erf)(z)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# Independent formulas (float64, NumPy) for the activation values.
FORMULAS = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "gelu": lambda z: z * 0.5 * (1.0 + _erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "softplus": lambda z: np.log(1.0 + np.exp(z)),
    "softmax": lambda z: np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True),
    "log_softmax": lambda z: z - np.log(np.exp(z).sum(axis=-1, keepdims=True)),
}
# every other activation record (kernels/activations.py): its own independent definition
for _name, _record in RECORDS.items():
    if _record.layer and _name not in FORMULAS:
        ACTIVATIONS.append(_name)
        FORMULAS[_name] = (lambda r: lambda z: r.check(z, r.alpha or 0.0))(_record)


def away_from_zero(x, margin=0.1):
    return np.where(x >= 0, x + margin, x - margin)


def dense64(n_in, n_out, activation=None, seed=0, **kw):
    return Dense(n_in, n_out, activation=activation, dtype="float64", rng=seed, **kw)


# ---------------------------------------------------------------------------------------
# Gradients
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_gradcheck_each_activation(device, xp, rng, activation):
    layer = dense64(4, 3, activation)
    x = xp.asarray(rng.normal(size=(5, 4)))
    z = bp.to_numpy(x) @ bp.to_numpy(layer.W.data).T + bp.to_numpy(layer.b.data)
    assert np.abs(z).min() > 1e-3  # the finite differences never cross a kink
    result = gradcheck(layer, x)
    assert result.ok and result.worst < 1e-6, str(result)
    assert set(result.errors) == {"input", "W", "b"}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_layer_gradcheck(device, xp, rng, activation):
    from backprop import activations

    x = xp.asarray(away_from_zero(rng.normal(size=(4, 6))))
    result = gradcheck(activations.get(activation), x)
    assert result.worst < 1e-6, str(result)


def test_dense_without_bias_gradcheck(device, xp, rng):
    layer = dense64(3, 2, "tanh", bias=False)
    assert layer.b is None and [p.name for p in layer.parameters()] == ["W"]
    result = gradcheck(layer, xp.asarray(rng.normal(size=(4, 3))))
    assert result.worst < 1e-6, str(result)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradcheck(device, xp, rng, affine, training):
    bn = BatchNorm1d(3, affine=affine, dtype="float64").train(training)
    if affine:
        bn.gamma.data[...] = xp.asarray([0.5, 1.5, -2.0])
        bn.beta.data[...] = xp.asarray([0.1, -0.3, 0.7])
    bn.running_mean[...] = xp.asarray([0.2, -0.1, 0.4])
    bn.running_var[...] = xp.asarray([0.8, 1.3, 2.1])
    result = gradcheck(bn, xp.asarray(rng.normal(2.0, 3.0, size=(6, 3))))
    assert result.worst < 1e-6, str(result)


def test_residual_gradcheck(device, xp, rng):
    block = Residual([dense64(4, 6, "tanh", seed=1), dense64(6, 4, seed=2)])
    assert [p.name for p in block.parameters()] == ["block.0.W", "block.0.b", "block.1.W",
                                                    "block.1.b"]
    result = gradcheck(block, xp.asarray(rng.normal(size=(5, 4))))
    assert result.worst < 1e-6, str(result)


def test_dropout_gradcheck_with_fixed_mask(device, xp, rng):
    model = Sequential([dense64(4, 8, "tanh"), Dropout(0.5, seed=7), dense64(8, 2, seed=1)])
    result = gradcheck(model, xp.asarray(rng.normal(size=(6, 4))))
    assert result.worst < 1e-6, str(result)


def test_flatten_gradcheck(device, xp, rng):
    model = Sequential([Flatten(), dense64(6, 2, "sigmoid")])
    x = xp.asarray(rng.normal(size=(4, 2, 3)))
    assert model.forward(x).shape == (4, 2)
    result = gradcheck(model, x)
    assert result.worst < 1e-6 and result.rows[0][1] == (4, 2, 3), str(result)


def test_batch_of_one(device, xp, rng):
    for activation in ACTIVATIONS:
        layer = dense64(3, 4, activation, seed=3)
        result = gradcheck(layer, xp.asarray(rng.normal(size=(1, 3)) + 0.05))
        assert result.worst < 1e-6, (activation, str(result))
    bn = BatchNorm1d(3, dtype="float64").eval()
    assert bn.forward(xp.ones((1, 3))).shape == (1, 3)


# ---------------------------------------------------------------------------------------
# Values against independent formulas
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_matches_formula(device, xp, rng, activation):
    layer = dense64(4, 3, activation)
    layer.b.data[...] = xp.asarray([0.3, -0.2, 0.1])
    x = rng.normal(size=(5, 4))
    z = x @ bp.to_numpy(layer.W.data).T + np.array([0.3, -0.2, 0.1])
    got = bp.to_numpy(layer.forward(xp.asarray(x)))
    np.testing.assert_allclose(got, FORMULAS[activation](z), rtol=1e-12, atol=1e-12)


def test_dense_backward_matches_formula(device, xp, rng):
    layer = dense64(4, 3, "tanh")
    x, da = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    a = bp.to_numpy(layer.forward(xp.asarray(x))).copy()
    dx = bp.to_numpy(layer.backward(xp.array(da)))  # backward may overwrite its argument
    delta = da * (1 - a * a)                                  # δ = dA ⊙ σ'(Z)
    np.testing.assert_allclose(bp.to_numpy(layer.W.grad), delta.T @ x, rtol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(layer.b.grad), delta.sum(0), rtol=1e-12)
    np.testing.assert_allclose(dx, delta @ bp.to_numpy(layer.W.data), rtol=1e-12)


def test_gradients_accumulate_until_zero_grad(device, xp, rng):
    layer = dense64(3, 2, "sigmoid")
    x, da = xp.asarray(rng.normal(size=(4, 3))), rng.normal(size=(4, 2))
    layer.forward(x)
    layer.backward(xp.array(da))
    once = bp.to_numpy(layer.W.grad).copy(), bp.to_numpy(layer.b.grad).copy()
    layer.forward(x)
    layer.backward(xp.array(da))
    np.testing.assert_allclose(bp.to_numpy(layer.W.grad), 2 * once[0], rtol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(layer.b.grad), 2 * once[1], rtol=1e-12)
    layer.zero_grad()
    assert float(abs(layer.W.grad).max()) == 0.0


def test_need_input_grad_false_still_computes_parameter_grads(device, xp, rng):
    layer = dense64(3, 2, "relu")
    layer.forward(xp.asarray(rng.normal(size=(4, 3))))
    assert layer.backward(xp.asarray(rng.normal(size=(4, 2))), need_input_grad=False) is None
    assert float(abs(layer.W.grad).sum()) > 0


def test_leaky_relu_alpha_inside_dense(device, xp):
    layer = Dense(1, 1, activation=LeakyReLU(0.2), dtype="float64")
    layer.W.data[...] = 1.0
    out = layer.forward(xp.asarray([[-2.0], [3.0]]))
    np.testing.assert_allclose(bp.to_numpy(out).ravel(), [-0.4, 3.0])


def test_gelu_default_is_exact_erf_and_tanh_differs(device, xp):
    z = np.array([[-1.5, -0.3, 0.7, 2.0]])
    exact = bp.to_numpy(GELU().forward(xp.asarray(z)))
    approx = bp.to_numpy(GELU(approximate="tanh").forward(xp.asarray(z)))
    np.testing.assert_allclose(exact, FORMULAS["gelu"](z), rtol=1e-14)
    assert np.abs(exact - approx).max() > 1e-5
    with pytest.raises(ValueError, match="approximate"):
        GELU(approximate="fast")


def test_softmax_rows_sum_to_one_for_3d_input(device, xp, rng):
    x = xp.asarray(rng.normal(size=(2, 3, 5)))
    y = bp.to_numpy(Softmax().forward(x))
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(y, FORMULAS["softmax"](bp.to_numpy(x)), rtol=1e-12)


def test_extreme_inputs_are_finite_without_warnings(device, xp):
    x = xp.asarray([[-1000.0, -30.0, 0.0, 30.0, 1000.0]])
    # underflow to 0 is the right answer; overflow, 0/0 and log(0) would be bugs
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        sig = bp.to_numpy(Sigmoid().forward(x))
        soft = bp.to_numpy(Softplus().forward(x))
        tanh = bp.to_numpy(Tanh().forward(x))
        smax = bp.to_numpy(Softmax().forward(x))
        dense = Dense(5, 1, activation="sigmoid", dtype="float64")
        dense.W.data[...] = 1.0
        dense_out = bp.to_numpy(dense.forward(xp.asarray([[-1000.0, 0, 0, 0, 0]])))
    assert sig[0, 0] == 0.0 and sig[0, -1] == 1.0 and sig[0, 2] == 0.5
    assert dense_out[0, 0] == 0.0
    assert soft[0, 0] == 0.0 and soft[0, -1] == 1000.0
    assert tanh[0, 0] == -1.0 and tanh[0, -1] == 1.0
    assert smax[0, -1] == 1.0 and np.isfinite(smax).all()


# ---------------------------------------------------------------------------------------
# Dropout
def test_dropout_mask_statistics_and_backward(device, xp):
    drop = Dropout(0.25, seed=3)
    x = xp.ones((200, 50), dtype=np.float32)
    out = bp.to_numpy(drop.forward(x))
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    grad = bp.to_numpy(drop.backward(xp.full((200, 50), 2.0, dtype=np.float32)))
    assert ((grad != 0) == kept).all()                           # the same mask
    np.testing.assert_allclose(grad[kept], 2 / 0.75, rtol=1e-6)
    assert drop.counter == 1
    second = bp.to_numpy(drop.forward(x))
    assert drop.counter == 2 and ((second != 0) != kept).any()   # a new mask per step


def test_dropout_is_identity_in_eval_mode_and_reproducible(device, xp, rng):
    x = xp.asarray(rng.normal(size=(8, 4)))
    drop = Dropout(0.5, seed=11).eval()
    assert drop.forward(x) is x and drop.backward(x) is x and drop.counter == 0
    a = bp.to_numpy(Dropout(0.5, seed=11).forward(x))
    b = bp.to_numpy(Dropout(0.5, seed=11).forward(x))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "half"])
def test_dropout_rejects_bad_probability(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(p)


# ---------------------------------------------------------------------------------------
# BatchNorm
def test_batchnorm_running_statistics_follow_pytorch(device, xp, rng):
    bn = BatchNorm1d(3, momentum=0.1, dtype="float64")
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=(8, 3))
        out = bp.to_numpy(bn.forward(xp.asarray(x)))
        mean = 0.9 * mean + 0.1 * x.mean(0)
        var = 0.9 * var + 0.1 * x.var(0, ddof=1)                 # unbiased running variance
        np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(bn.running_mean), mean, rtol=1e-12)
    np.testing.assert_allclose(bp.to_numpy(bn.running_var), var, rtol=1e-12)
    bn.eval()
    x = rng.normal(size=(4, 3))
    np.testing.assert_allclose(bp.to_numpy(bn.forward(xp.asarray(x))),
                               (x - mean) / np.sqrt(var + 1e-5), rtol=1e-12)
    assert set(dict(bn.named_buffers())) == {"running_mean", "running_var"}


def test_batchnorm_training_batch_of_one_is_a_clear_error(device, xp):
    with pytest.raises(ValueError, match="at least 2 rows"):
        BatchNorm1d(3, dtype="float64").forward(xp.ones((1, 3)))


# ---------------------------------------------------------------------------------------
# Buffers and dtypes
def test_forward_reuses_buffers_per_batch_size(device, xp, rng):
    layer = Dense(4, 3, activation="relu")
    full, last = xp.asarray(rng.normal(size=(8, 4)), dtype=np.float32), \
        xp.asarray(rng.normal(size=(3, 4)), dtype=np.float32)
    seen = []
    for _ in range(3):  # full batch, last partial batch, alternating: no reallocation
        a_full = layer.forward(full)
        dx_full = layer.backward(xp.ones((8, 3), dtype=np.float32))
        a_last = layer.forward(last)
        dx_last = layer.backward(xp.ones((3, 3), dtype=np.float32))
        seen.append((id(a_full), id(dx_full), id(a_last), id(dx_last)))
    assert seen[0] == seen[1] == seen[2]
    assert layer.forward(full) is a_full


@pytest.mark.parametrize("layer_factory", [
    lambda: Dense(4, 4, activation="gelu"), lambda: Dense(4, 4, activation="softmax"),
    lambda: Dense(4, 4, activation="relu"), lambda: BatchNorm1d(4), lambda: Dropout(0.3, seed=1),
    lambda: Residual([Dense(4, 4, activation="tanh")]), lambda: Flatten(),
    lambda: Softmax(), lambda: Softplus(), lambda: ReLU(), lambda: Identity()],
    ids=["dense_gelu", "dense_softmax", "dense_relu", "batchnorm", "dropout", "residual",
         "flatten", "softmax", "softplus", "relu", "identity"])
def test_float32_stays_float32(device, xp, rng, layer_factory):
    layer = layer_factory()
    for p in layer.parameters():
        assert p.dtype == np.float32
    x = xp.asarray(rng.normal(size=(5, 4)), dtype=np.float32)
    out = layer.forward(x)
    dx = layer.backward(xp.ones_like(out))
    assert out.dtype == np.float32 and dx.dtype == np.float32
    for p in layer.parameters():
        assert p.grad.dtype == np.float32


def test_dense_input_errors_name_expected_and_given(device, xp):
    layer = Dense(3, 2)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3\); got \(4, 5\)"):
        layer.forward(xp.ones((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"reshape\(1, -1\)"):
        layer.forward(xp.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        layer.forward(xp.ones((4, 3), dtype=np.float64))


def test_residual_shape_mismatch_is_a_clear_error(device, xp):
    with pytest.raises(ValueError, match=r"maps shape \(2, 3\) to \(2, 4\)"):
        Residual(Dense(3, 4)).forward(xp.ones((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="Residual wraps a Layer"):
        Residual("dense")


def test_unknown_activation_lists_the_names():
    with pytest.raises(ValueError, match="relu"):
        Dense(2, 2, activation="swishy")


def test_to_casts_parameters_and_buffers(device, xp, rng):
    model = Sequential([Dense(3, 4, activation="relu"), BatchNorm1d(4)])
    assert model.to(dtype="float64") is model
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert all(b.dtype == np.float64 for _, b in model.named_buffers())
    out = model.forward(xp.asarray(rng.normal(size=(4, 3))))
    assert out.dtype == np.float64


# ---------------------------------------------------------------------------------------
# Config round trips
@pytest.mark.parametrize("layer", [
    Dense(3, 4, activation="relu", init="he_normal"), Dense(3, 4, activation=LeakyReLU(0.3)),
    Dense(3, 4, activation="gelu_tanh", bias=False, dtype="float64"), Dropout(0.2, seed=5),
    BatchNorm1d(4, eps=1e-3, momentum=0.2, affine=False), Flatten(),
    Residual([Dense(4, 4, activation="tanh")]), ReLU(), LeakyReLU(0.05), Sigmoid(), Tanh(),
    GELU(), GELU("tanh"), Softplus(), Softmax(), Identity()], ids=repr)
def test_from_config_round_trip(layer):
    cfg = json.loads(json.dumps(layer.config()))
    rebuilt = from_config(cfg)
    assert type(rebuilt) is type(layer) and rebuilt.config() == layer.config()
    assert repr(rebuilt) == repr(layer)
    rebuilt.load_state_dict(layer.state_dict())
    for (name, a), (name2, b) in zip(layer.state_dict().items(), rebuilt.state_dict().items()):
        assert name == name2 and np.array_equal(a, b)


def test_from_config_errors():
    with pytest.raises(ValueError, match="unknown layer type 'Conv2d'"):
        from_config({"type": "Conv2d"})
    with pytest.raises(ValueError, match="'type' key"):
        from_config(["Dense"])
    with pytest.raises(NotImplementedError, match="config"):
        type("Bare", (Layer,), {})().config()


# ---------------------------------------------------------------------------------------
# Initialisers
@pytest.mark.parametrize("name, bound, std", [
    ("xavier_uniform", math.sqrt(6 / 500), math.sqrt(2 / 500)),
    ("xavier_normal", None, math.sqrt(2 / 500)),
    ("he_uniform", math.sqrt(6 / 200), math.sqrt(2 / 200)),
    ("he_normal", None, math.sqrt(2 / 200)),
    ("zeros", 0.0, 0.0),
    ("normal", None, 0.01)])
def test_initialisers_follow_their_formulas(name, bound, std):
    w = init.get(name)((300, 200), np.random.default_rng(0))  # fan_in 200, fan_out 300
    assert w.shape == (300, 200) and w.dtype == np.float64
    if bound is not None:
        assert np.abs(w).max() <= bound
    assert abs(w.std() - std) <= 0.02 * std + 1e-12
    assert abs(w.mean()) <= 0.02 * max(std, 1e-12) + 1e-12


def test_default_init_and_seeding():
    assert init.default_for("relu") == "he_uniform" and init.default_for(ReLU()) == "he_uniform"
    assert init.default_for("tanh") == init.default_for(None) == "xavier_uniform"
    init.manual_seed(42)
    a = Dense(5, 3, activation="relu", dtype="float64")
    init.manual_seed(42)
    b = Dense(5, 3, activation="relu", dtype="float64")
    c = Dense(5, 3, activation="relu", dtype="float64")
    assert np.array_equal(bp.to_numpy(a.W.data), bp.to_numpy(b.W.data))
    assert not np.array_equal(bp.to_numpy(b.W.data), bp.to_numpy(c.W.data))
    assert np.abs(bp.to_numpy(a.W.data)).max() <= math.sqrt(6 / 5)
    assert np.array_equal(bp.to_numpy(Dense(5, 3, rng=7).W.data),
                          bp.to_numpy(Dense(5, 3, rng=np.random.default_rng(7)).W.data))
    assert init.as_generator(None) is init.as_generator(None)
    with pytest.raises(TypeError, match="rng must be"):
        init.as_generator("seed")
    with pytest.raises(ValueError, match="unknown initialiser"):
        Dense(2, 2, init="orthogonal")


# ---------------------------------------------------------------------------------------
# The prepared kernel calls of Dense and SoftmaxCrossEntropyLoss (K.prepare): the checks
# are skipped only while every argument is the object checked before
def _dense_step(layer, loss, x, y):
    layer.zero_grad()
    out = layer.forward(x)
    value = loss.forward(out, y)
    layer.backward(loss.backward(), need_input_grad=False)
    return value, out.copy(), layer.W.grad.copy(), layer.b.grad.copy()


def test_dense_fast_path_rechecks_a_replaced_or_reshaped_array():
    rng = np.random.default_rng(0)
    layer = Dense(6, 4, activation="relu", rng=0)
    loss = bp.losses.SoftmaxCrossEntropyLoss()
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0])
    first = _dense_step(layer, loss, x, y)
    again = _dense_step(layer, loss, x, y)  # the prepared runs: the same results
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    good = layer.b.data
    layer.b.data = np.zeros(5, np.float32)  # a new bias of the wrong size: checked again
    with pytest.raises(ValueError):
        layer.forward(x)
    layer.b.data = good
    out = layer.forward(x)
    loss.forward(out, y)
    grad = loss.backward()
    layer.backward(grad)
    grad.shape = (4, 5)  # the same object, reshaped in place: not run unchecked
    with pytest.raises(ValueError, match="shape"):
        layer.backward(grad)
    out = layer.forward(x)
    y.shape = (5, 1)  # the labels, reshaped in place
    with pytest.raises(ValueError, match="shape"):
        loss.forward(out, y)
    y.shape = (5,)
    out.shape = (4, 5)  # the logits, reshaped in place
    with pytest.raises(ValueError):
        loss.forward(out, y)


def test_dense_fast_path_follows_a_change_of_backend(monkeypatch):
    from backprop import kernels as K
    from backprop.kernels import reference

    rng = np.random.default_rng(1)
    layer = Dense(6, 4, activation="tanh", rng=0, dtype="float64")
    loss = bp.losses.SoftmaxCrossEntropyLoss()
    x = rng.standard_normal((5, 6))
    y = np.array([0, 1, 2, 3, 0])
    calls = []
    for op in ("bias_act_forward", "bias_act_backward", "softmax_xent"):
        def counted(*args, _op=getattr(reference, op), _name=op, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)
        monkeypatch.setattr(reference, op, counted)
    choice = K.get_choice()
    first = _dense_step(layer, loss, x, y)
    _dense_step(layer, loss, x, y)
    seen = len(calls)  # 0 where numba_cpu runs them
    K.set_backend("reference")
    try:
        ref = _dense_step(layer, loss, x, y)
    finally:
        K.set_backend(choice)
    assert calls[seen:] == ["bias_act_forward", "softmax_xent", "bias_act_backward"]
    for a, b in zip(first, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_parameters_start_on_a_cache_line_on_the_cpu():
    """Dense and BatchNorm1d parameters start on a backend.ALIGNMENT boundary when made,
    cast (``to``), copied, unpickled and frozen (NumPy itself aligns to 16 bytes only);
    ``aligned`` leaves an aligned array, and anything not NumPy, as it is."""
    import copy
    import pickle

    import backprop as bp
    from backprop import backend
    from backprop.layers import BatchNorm1d, Dense
    from backprop.model import Sequential

    def offsets(model):
        return {p.data.ctypes.data % backend.ALIGNMENT for p in model.parameters()}

    with bp.use_device("cpu"):
        model = Sequential([Dense(7, 45, rng=0), BatchNorm1d(45), Dense(45, 3, rng=1)])
        assert offsets(model) == {0}
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                      bp.freeze(model)._model, model.to(dtype="float64")):
            assert offsets(other) == {0}
    # room for any start offset of the buffer: up to ALIGNMENT - 1 bytes to a boundary,
    # then 4 more, then the 32 bytes viewed
    raw = np.zeros(backend.ALIGNMENT + 4 + 32, np.uint8)
    start = -raw.ctypes.data % backend.ALIGNMENT + 4
    off = raw[start:start + 32].view(np.float32)
    assert off.size == 8 and off.ctypes.data % backend.ALIGNMENT == 4
    fixed = backend.aligned(off)
    assert fixed.ctypes.data % backend.ALIGNMENT == 0 and np.array_equal(fixed, off)
    assert backend.aligned(fixed) is fixed
    listed = [1.0, 2.0]
    assert backend.aligned(listed) is listed
