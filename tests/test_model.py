"""Sequential: names, end-to-end gradients, state and config round trips, summary, modes,
devices, input validation and the delegation to backprop.training / backprop.io."""
from __future__ import annotations

import json

import numpy as np
import pytest

import backprop as bp
from backprop import io, training
from backprop.activations import ReLU
from backprop.gradcheck import gradcheck
from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual, from_config
from backprop.losses import SoftmaxCrossEntropyLoss
from backprop.model import Sequential

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


def four_layer(dtype="float64"):
    return Sequential([
        Dense(4, 8, activation="relu", dtype=dtype, rng=0),
        BatchNorm1d(8, dtype=dtype),
        Residual([Dense(8, 8, activation="gelu", dtype=dtype, rng=1)]),
        Dropout(0.3, seed=4),
        Dense(8, 6, activation="tanh", dtype=dtype, rng=2),
        Dense(6, 3, dtype=dtype, rng=3),
    ])


def test_parameter_names_follow_the_layer_path():
    names = [p.name for p in four_layer().parameters()]
    assert names == ["0.W", "0.b", "1.gamma", "1.beta", "2.block.0.W", "2.block.0.b",
                     "4.W", "4.b", "5.W", "5.b"]
    assert list(dict(four_layer().named_buffers())) == ["1.running_mean", "1.running_var"]


def test_four_layer_network_gradcheck(device, xp, rng):
    model = four_layer()
    x = xp.asarray(rng.normal(size=(7, 4)))
    labels = xp.asarray(rng.integers(0, 3, 7))
    for loss, target in ((None, None), (SoftmaxCrossEntropyLoss(0.05), labels)):
        result = gradcheck(model, x, loss=loss, target=target)
        assert result.worst < 1e-6, str(result)
        assert set(result.errors) == {"input"} | {p.name for p in model.parameters()}


def test_backward_skips_the_input_gradient_of_the_first_layer(device, xp, rng):
    model = four_layer()
    out = model.forward(xp.asarray(rng.normal(size=(5, 4))))
    assert model.backward(xp.ones_like(out), need_input_grad=False) is None
    assert all(float(abs(p.grad).sum()) > 0 for p in model.parameters())


def test_state_dict_round_trip_writes_in_place(device, xp, rng):
    a, b = four_layer(), four_layer()
    for p in b.parameters():
        p.data[...] = 0.0
    x = xp.asarray(rng.normal(size=(5, 4)))
    a.forward(x)  # moves the running statistics away from their initial values
    a.eval(), b.eval()
    arrays = [p.data for p in b.parameters()]
    b.load_state_dict(a.state_dict())
    assert all(p.data is arr for p, arr in zip(b.parameters(), arrays))
    np.testing.assert_array_equal(bp.to_numpy(a(x)), bp.to_numpy(b(x)))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    state["0.W"][...] = 123.0  # a copy: the model is untouched
    assert float(a[0].W.data[0, 0]) != 123.0


def test_load_state_dict_rejects_mismatches():
    model = four_layer()
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing \['0.W'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "0.W"})
    with pytest.raises(ValueError, match=r"unexpected \['9.W'\]"):
        model.load_state_dict({**state, "9.W": state["0.W"]})
    with pytest.raises(ValueError, match=r"'0.W'\] has shape \(4, 8\).*\(8, 4\)"):
        model.load_state_dict({**state, "0.W": state["0.W"].T})


def test_config_json_round_trip(device, xp, rng):
    model = Sequential([Flatten(), *four_layer().layers, ReLU()])
    cfg = json.loads(json.dumps(model.config()))
    rebuilt = from_config(cfg)
    assert rebuilt.config() == model.config()
    assert [p.name for p in rebuilt.parameters()] == [p.name for p in model.parameters()]
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = xp.asarray(rng.normal(size=(3, 2, 2)))
    np.testing.assert_array_equal(bp.to_numpy(model(x)), bp.to_numpy(rebuilt(x)))


def test_summary_lists_layers_shapes_and_totals():
    model = four_layer()
    text = model.summary()
    lines = text.splitlines()
    assert "Output shape" in lines[0] and "Params" in lines[0]
    assert "Dense(4, 8, activation='relu')" in text and "(None, 8)" in text and "(None, 3)" in text
    counts = [4 * 8 + 8, 16, 8 * 8 + 8, 0, 8 * 6 + 6, 6 * 3 + 3]
    for i, count in enumerate(counts):
        assert lines[2 + i].split()[0] == str(i) and lines[2 + i].split()[-1] == f"{count:,}"
    assert f"Total params: {sum(counts):,}" in lines[-1] and "buffers: 16" in lines[-1]
    assert model.num_parameters() == sum(counts)
    unknown = Sequential([Flatten(), Dense(6, 2)]).summary()
    assert "?" in unknown
    assert "(None, 2)" in Sequential([Flatten(), Dense(6, 2)]).summary(input_shape=(2, 3))


def test_train_eval_and_zero_grad_reach_nested_layers(device, xp, rng):
    model = four_layer()
    assert model.eval() is model
    assert all(not m.training for m in model.modules())
    x = xp.asarray(rng.normal(size=(4, 4)))
    np.testing.assert_array_equal(bp.to_numpy(model(x)), bp.to_numpy(model(x)))  # no dropout
    model.train()
    assert all(m.training for m in model.modules())
    out = model.forward(x)
    model.backward(xp.ones_like(out))
    model.zero_grad()
    assert all(float(abs(p.grad).max()) == 0.0 for p in model.parameters())


def test_call_returns_a_fresh_array_and_forward_the_buffer(device, xp, rng):
    model = Sequential([Dense(2, 3, activation="relu"), Dense(3, 1)])
    x = rng.normal(size=(4, 2)).astype(np.float32)
    fresh = model(x)  # a host array is moved to the model's device
    assert isinstance(fresh, xp.ndarray) and fresh.dtype == np.float32
    assert model(x) is not fresh
    buffer = model.forward(xp.asarray(x))
    assert model.forward(xp.asarray(x)) is buffer
    assert model([[0.5, -1.0]]).shape == (1, 1)  # a list adopts the model's dtype


def test_input_validation_names_expected_and_given(device, xp):
    model = Sequential([Dropout(0.1), Dense(3, 2)])
    assert model.in_features == 3
    with pytest.raises(ValueError, match=r"model expects input of shape \(N, 3\); got \(5, 4\)"):
        model.forward(xp.ones((5, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Flatten"):
        model.forward(xp.ones((5, 3, 1), dtype=np.float32))
    with pytest.raises(TypeError, match=r"float32 parameters but got a float64 input.*astype"):
        model(np.ones((5, 3)))
    with pytest.raises(TypeError, match="int64 input"):
        model(np.ones((5, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="not a Layer"):
        Sequential([Dense(2, 2), "relu"])
    with pytest.raises(ValueError, match="at least one layer"):
        Sequential([])


def test_to_device_returns_self_and_keeps_working(device, xp, rng):
    model = four_layer()
    assert model.to(str(device)) is model
    assert all(isinstance(p.data, xp.ndarray) for p in model.parameters())
    out = model.forward(xp.asarray(rng.normal(size=(3, 4))))
    assert isinstance(out, xp.ndarray)


def test_regularizers_are_collected():
    model = four_layer()
    assert model.regularizers == []
    marker = object()
    model.add_regularizer(marker)
    assert model.regularizers == [marker]


def test_workflow_methods_delegate(monkeypatch):
    calls = []
    for module, name in ((training, "fit"), (training, "evaluate"), (training, "predict"),
                         (io, "save")):
        monkeypatch.setattr(module, name,
                            lambda *a, _n=name, **k: calls.append((_n, a, k)) or _n)
    model = four_layer()
    assert model.fit("X", "y", loss="mse", epochs=2) == "fit"
    assert model.evaluate("X", "y") == "evaluate"
    assert model.predict("X", batch_size=8) == "predict"
    assert model.save("ckpt.npz", optimizer="opt", epoch=3) == "save"
    assert calls == [("fit", (model, "X", "y"), {"loss": "mse", "epochs": 2}),
                     ("evaluate", (model, "X", "y"), {}),
                     ("predict", (model, "X", 8), {}),  # positional: the fast call path
                     ("save", (model, "ckpt.npz"), {"optimizer": "opt", "epoch": 3})]


def test_a_layer_object_used_twice_is_refused_naming_both_places():
    d = Dense(4, 4, rng=0)
    with pytest.raises(ValueError, match=r"layer 1 .* same object as layer 0"):
        Sequential([d, d])
    act = ReLU()
    with pytest.raises(ValueError, match=r"layer 2\.block\.0 .* same object as layer 0"):
        Sequential([act, Dense(4, 4), Residual([act])])


@bp.use_device("cpu")
def test_one_activation_object_given_to_two_dense_layers_gives_each_its_own(
        kernels_for_both_devices):
    act = bp.LeakyReLU(0.2)
    a, b = Dense(3, 4, activation=act, rng=0), Dense(4, 2, activation=act, rng=1)
    model = Sequential([a, b])  # accepted: each Dense holds a copy
    assert a.activation is not b.activation and a.activation.alpha == 0.2
    x = np.random.default_rng(0).normal(size=(5, 3))
    result = gradcheck(Sequential([Dense(3, 4, activation=act, dtype="float64", rng=0),
                                   Dense(4, 2, activation=act, dtype="float64", rng=1)]), x)
    assert result.ok, result
    assert model(x.astype(np.float32)).shape == (5, 2)


def test_to_dtype_casts_in_place_on_the_same_device_and_refuses_other_dtypes():
    model = four_layer("float32")
    array_type = type(model[0].W.data)
    model.to(dtype="float64")
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert model[1].running_var.dtype == np.float64
    assert type(model[0].W.data) is array_type
    for bad, error in (("int32", ValueError), ("float16", ValueError), ("nope", TypeError)):
        with pytest.raises(error, match="float32 or float64|not a NumPy dtype"):
            model.to(dtype=bad)
    assert all(p.dtype == np.float64 for p in model.parameters())
