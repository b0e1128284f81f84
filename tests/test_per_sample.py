"""Per-sample gradient norms (backprop.per_sample): each row's norm against the gradient of a
one-row pass through the model's own backward, against central finite differences in
float64, and (where PyTorch is installed) against ``torch.func.vmap(grad)``; batching, the
state left behind, threads and errors."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop.callbacks import Callback
from backprop.concurrency import ConcurrentTrainingError, exclusive_training
from backprop.data import DataError
from backprop.layers import Layer
from backprop.parameter import Parameter
from backprop.per_sample import per_sample_grad_norms

ROOT = Path(__file__).resolve().parent.parent
N = 11  # rows: with batch_size=4 the last batch is partial


# ---------------------------------------------------------------------------------------
# Models and targets
def mlp(n_out, last=None, dtype="float64", seed=0):
    """Dense layers of several activations, one without a bias."""
    rng = np.random.default_rng(seed)
    return bp.Sequential([
        bp.Dense(5, 7, activation="tanh", rng=rng, dtype=dtype),
        bp.Dense(7, 6, activation="leaky_relu", bias=False, rng=rng, dtype=dtype),
        bp.Dense(6, 6, activation="sigmoid", rng=rng, dtype=dtype),
        bp.Dense(6, n_out, activation=last, rng=rng, dtype=dtype),
    ])


def deep(n_out, last=None, dtype="float64", seed=0):
    """BatchNorm (non-trivial running statistics and affine parameters), Dropout and a
    Residual block with a bias-free Dense."""
    rng = np.random.default_rng(seed)
    bn = bp.BatchNorm1d(8, dtype=dtype)
    model = bp.Sequential([
        bp.Dense(5, 8, activation="gelu", rng=rng, dtype=dtype),
        bn,
        bp.Dropout(0.4, seed=3),
        bp.Residual([bp.Dense(8, 8, activation="tanh", rng=rng, dtype=dtype),
                     bp.Dense(8, 8, bias=False, rng=rng, dtype=dtype)]),
        bp.Dense(8, n_out, activation=last, rng=rng, dtype=dtype),
    ])
    state = model.state_dict()
    state["1.running_mean"] = rng.normal(size=8)
    state["1.running_var"] = rng.uniform(0.5, 2.0, size=8)
    state["1.gamma"] = rng.uniform(0.5, 1.5, size=8)
    state["1.beta"] = rng.normal(size=8)
    model.load_state_dict(state)
    return model


# name -> (loss object factory, outputs, last activation, target kind)
LOSSES = {
    "cross_entropy": (lambda: "cross_entropy", 3, None, "labels"),
    "cross_entropy_soft": (lambda: bp.SoftmaxCrossEntropyLoss(label_smoothing=0.1), 3, None,
                           "probabilities"),
    "mse": (lambda: "mse", 2, None, "values"),
    "mse_sum": (lambda: bp.MSELoss(reduction="sum"), 2, None, "values"),
    "bce_with_logits": (lambda: "bce_with_logits", 2, None, "binary"),
    "nll": (lambda: "nll", 3, "log_softmax", "labels"),
}


def targets(kind, n_out, rng, n=N):
    if kind == "labels":
        return rng.integers(0, n_out, n)
    if kind == "probabilities":
        p = rng.uniform(size=(n, n_out))
        return p / p.sum(axis=1, keepdims=True)
    if kind == "binary":
        return (rng.uniform(size=(n, n_out)) > 0.5).astype(np.float64)
    return rng.normal(size=(n, n_out))


def problem(build, loss_name, dtype="float64", seed=0):
    make, n_out, last, kind = LOSSES[loss_name]
    rng = np.random.default_rng(seed + 100)
    model = build(n_out, last, dtype)
    X = rng.normal(size=(N, 5)).astype(dtype)
    return model, X, targets(kind, n_out, rng), make()


def one_row_norms(model, X, y, loss):
    """The reference: for each row alone, a forward and backward pass of the model (eval
    mode) on that one row, and the norm of every parameter's gradient."""
    loss = bp.training.make_loss(loss)
    out = []
    for i in range(len(X)):
        model.zero_grad()
        with bp.inference_mode():
            pred = model.forward(X[i:i + 1])
            loss.forward(pred, y[i:i + 1])
            model.backward(loss.backward(), need_input_grad=False)
        out.append(np.sqrt(sum(float((bp.to_numpy(p.grad).astype(np.float64) ** 2).sum())
                               for p in model.parameters())))
    model.zero_grad()
    return np.array(out)


def rtol(dtype):
    return 1e-10 if dtype == "float64" else 2e-5


# ---------------------------------------------------------------------------------------
# The math
@pytest.mark.backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("build", [mlp, deep], ids=["mlp", "bn_dropout_residual"])
def test_each_norm_is_that_of_the_row_alone(build, loss_name, dtype):
    model, X, y, loss = problem(build, loss_name, dtype)
    got = per_sample_grad_norms(model, X, y, loss=loss, batch_size=4)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (N,)
    want = one_row_norms(model, X, y, loss)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=rtol(dtype), atol=0)


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_norms_match_finite_differences(loss_name):
    """Independent of every backward pass: central differences of ℓᵢ in every parameter
    element (float64, smooth activations only)."""
    model, X, y, loss = problem(deep, loss_name, "float64")
    got = per_sample_grad_norms(model, X, y, loss)
    loss = bp.training.make_loss(loss)

    def row_losses():  # eval mode: each output row depends on its input row only
        with bp.inference_mode():
            out = model.forward(X).copy()
            return np.array([float(loss.forward(out[i:i + 1], y[i:i + 1])) for i in range(N)])

    h = 1e-6
    sq = np.zeros(N)
    for p in model.parameters():
        flat = p.data.reshape(-1)
        for k in range(flat.size):
            keep = flat[k]
            flat[k] = keep + h
            up = row_losses()
            flat[k] = keep - h
            down = row_losses()
            flat[k] = keep
            sq += ((up - down) / (2 * h)) ** 2
    np.testing.assert_allclose(got, np.sqrt(sq), rtol=1e-6)


def test_batch_size_does_not_change_the_result():
    model, X, y, loss = problem(deep, "cross_entropy")
    results = [per_sample_grad_norms(model, X, y, loss, batch_size=b) for b in (1, 3, N, 1000)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-12)


def test_method_of_the_model_and_list_inputs():
    model, X, y, loss = problem(mlp, "cross_entropy")
    a = model.per_sample_grad_norms(X, y, loss=loss)
    b = per_sample_grad_norms(model, X.tolist(), y.tolist(), loss)
    np.testing.assert_array_equal(a, b)


def test_mean_reduction_is_undone_so_mean_and_sum_agree_per_row():
    """For one output, ℓᵢ of MSE is the same under mean and sum: the mean's 1/N is undone."""
    rng = np.random.default_rng(1)
    model, X, y = mlp(1), rng.normal(size=(N, 5)), rng.normal(size=(N, 1))
    mean = per_sample_grad_norms(model, X, y, bp.MSELoss(reduction="mean"), batch_size=4)
    total = per_sample_grad_norms(model, X, y, bp.MSELoss(reduction="sum"), batch_size=4)
    np.testing.assert_allclose(mean, total, rtol=1e-12)


def test_on_each_device(device, kernels_for_both_devices):
    model, X, y, loss = problem(deep, "cross_entropy", "float32")
    model.to(device)
    got = per_sample_grad_norms(model, X, y, loss, batch_size=4)
    assert type(got) is np.ndarray and got.dtype == np.float64
    model.to("cpu")
    np.testing.assert_allclose(got, one_row_norms(model, X, y, loss), rtol=1e-4)


# ---------------------------------------------------------------------------------------
# What is left behind
def test_model_grads_modes_and_state_are_left_as_they_were():
    model, X, y, loss = problem(deep, "cross_entropy")
    opt = bp.Adam(model.parameters(), lr=1e-3)  # flat buffers: .grad are views of one array
    model.train()
    model.fit(X, y, loss=loss, optimizer=opt, epochs=1, batch_size=4, verbose=0, seed=0)
    model.zero_grad()
    with bp.inference_mode():  # gradients that are not stale, on every parameter
        model.forward(X)
        model.backward(np.ones((N, 3)), need_input_grad=False)
    params = model.parameters()
    params[-1].zero_grad()  # a stale gradient stays stale
    before = {p.name: (p._grad, p._stale, bp.to_numpy(p._grad).copy()) for p in params}
    state = model.state_dict()
    counter = model[2].counter
    model[1].eval()  # mixed modes, restored exactly

    per_sample_grad_norms(model, X, y, loss, batch_size=4)

    for p in params:
        buf, stale, values = before[p.name]
        assert p._grad is buf and p._stale == stale, p.name
        if not stale:
            np.testing.assert_array_equal(p._grad, values)
    assert [m.training for m in model.modules()] == \
        [not isinstance(m, bp.BatchNorm1d) for m in model.modules()]
    assert model[2].counter == counter
    after = model.state_dict()
    for k in state:
        np.testing.assert_array_equal(after[k], state[k])
    assert all("backward_observer" not in vars(m) for m in model.modules())
    opt.step()  # the optimizer's flat buffers still hold the parameters


def test_parameter_without_a_grad_buffer_keeps_none():
    model, X, y, loss = problem(mlp, "mse")
    assert all(p._grad is None for p in model.parameters())
    per_sample_grad_norms(model, X, y, loss)
    assert all(p._grad is None and p._stale for p in model.parameters())


def test_training_mode_gives_the_eval_mode_result():
    model, X, y, loss = problem(deep, "cross_entropy")
    in_eval = per_sample_grad_norms(model.eval(), X, y, loss)
    in_train = per_sample_grad_norms(model.train(), X, y, loss)
    np.testing.assert_array_equal(in_eval, in_train)
    assert all(m.training for m in model.modules())


def test_an_existing_observer_is_restored_and_not_fed_these_passes():
    model, X, y, loss = problem(mlp, "cross_entropy")
    calls = []
    model[0].backward_observer = lambda layer, delta: calls.append(layer)
    per_sample_grad_norms(model, X, y, loss)
    assert calls == [] and model[0].backward_observer is not None
    model[0].backward_observer(model[0], None)
    assert calls == [model[0]]


# ---------------------------------------------------------------------------------------
# Threads
def test_refused_while_another_thread_trains_the_model():
    model, X, y, loss = problem(mlp, "cross_entropy")
    claimed, release = threading.Event(), threading.Event()

    def trainer():
        with exclusive_training(model.parameters()):
            claimed.set()
            release.wait(10)

    t = threading.Thread(target=trainer, name="trainer")
    t.start()
    try:
        assert claimed.wait(10)
        with pytest.raises(ConcurrentTrainingError, match="trainer"):
            per_sample_grad_norms(model, X, y, loss)
    finally:
        release.set()
        t.join()
    assert all(p._trainer is None for p in model.parameters())


def test_from_a_callback_of_fit_leaves_the_training_run_unchanged():
    X, y = bp.data.two_moons(n=64, seed=0)
    X = X.astype(np.float32)
    seen = []

    class Look(Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(per_sample_grad_norms(self.model, X, y, "cross_entropy", batch_size=16))

    def run(callbacks):
        model = bp.Sequential([bp.Dense(2, 16, activation="tanh", rng=0),
                               bp.Dropout(0.2, seed=1), bp.Dense(16, 2, rng=1)])
        model.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, seed=0, verbose=0,
                  callbacks=callbacks)
        return model.state_dict()

    plain, looked = run([]), run([Look()])
    assert len(seen) == 3 and all(s.shape == (64,) for s in seen)
    for k in plain:
        np.testing.assert_array_equal(plain[k], looked[k])


# ---------------------------------------------------------------------------------------
# Errors, before any work
class Scale(Layer):
    """A custom layer with a parameter: ``A = X ⊙ s``."""

    preserves_shape = True

    def __init__(self, n):
        super().__init__()
        self.s = Parameter(np.ones(n), "s")

    def forward(self, x):
        self._ctx.saved = x
        return x * self.s.data

    def backward(self, grad, need_input_grad=True):
        self.s.grad_for_write()[0][...] = (grad * self._ctx.saved).sum(axis=0)
        return grad * self.s.data


def test_custom_layer_with_parameters_is_refused_by_name():
    rng = np.random.default_rng(0)
    model = bp.Sequential([bp.Dense(5, 4, rng=rng, dtype="float64"),
                           bp.Residual([Scale(4)]), bp.Dense(4, 3, rng=rng, dtype="float64")])
    X = rng.normal(size=(N, 5))
    with pytest.raises(TypeError, match=r"Scale\(\) \(parameters '1\.block\.0\.s'\)"):
        per_sample_grad_norms(model, X, np.zeros(N, np.int64), "cross_entropy")
    assert all(p._grad is None for p in model.parameters())
    assert all("backward_observer" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("X, y, error, match", [
    (np.zeros((N, 4)), np.zeros(N, np.int64), DataError, "X has 4 features"),
    (np.zeros((N, 5, 1)), np.zeros(N, np.int64), DataError, "X must be 2-D"),
    (np.zeros((N, 5)), np.full(N, 3), DataError, r"labels must be in \[0, 3\)"),
    (np.zeros((N, 5)), np.zeros(N - 1, np.int64), DataError, "y has 10"),
    (np.full((N, 5), np.nan), np.zeros(N, np.int64), DataError, "NaN"),
    (np.zeros((N, 5)), None, DataError, "y is None"),
])
def test_bad_data_is_reported_before_any_work(X, y, error, match):
    model = mlp(3)
    with pytest.raises(error, match=match):
        per_sample_grad_norms(model, X, y, "cross_entropy")
    assert all(p._grad is None for p in model.parameters())


def test_bad_arguments():
    model, X, y, loss = problem(mlp, "cross_entropy")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        per_sample_grad_norms(model, X, y, loss, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        per_sample_grad_norms(model, X, y, loss, batch_size=2.0)
    with pytest.raises(ValueError, match="unknown loss"):
        per_sample_grad_norms(model, X, y, "hinge")
    with pytest.raises(TypeError, match="must be a backprop Layer"):
        per_sample_grad_norms(lambda x: x, X, y, loss)
    with pytest.raises(ValueError, match="has no parameters"):
        per_sample_grad_norms(bp.Sequential([bp.Tanh()]), X, X, "mse")

    class NoReduction:
        def forward(self, pred, target):
            return 0.0

        def backward(self):
            return None

    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        per_sample_grad_norms(model, X, y, NoReduction())


# ---------------------------------------------------------------------------------------
# PyTorch: torch.func.vmap(grad) of the same network
@pytest.mark.backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse", "mse_sum", "bce_with_logits",
                                       "nll"])
def test_matches_pytorch_per_sample_autograd(loss_name, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    from torch.func import grad, vmap

    model, X, y, loss = problem(deep, loss_name, dtype)
    got = per_sample_grad_norms(model, X, y, loss, batch_size=4)

    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    params = {k: state[k] for k in (p.name for p in model.parameters())}
    bn = model[1]

    def net(p, x):  # W is (out, in), as torch.nn.Linear.weight
        h = F.gelu(x @ p["0.W"].T + p["0.b"])
        h = (h - state["1.running_mean"]) / torch.sqrt(state["1.running_var"] + bn.eps)
        h = h * p["1.gamma"] + p["1.beta"]
        r = torch.tanh(h @ p["3.block.0.W"].T + p["3.block.0.b"]) @ p["3.block.1.W"].T
        z = (h + r) @ p["4.W"].T + p["4.b"]
        return F.log_softmax(z, dim=-1) if loss_name == "nll" else z

    def row_loss(p, x, t):
        z = net(p, x[None])
        if loss_name == "cross_entropy":
            return F.cross_entropy(z, t[None])
        if loss_name == "nll":
            return F.nll_loss(z, t[None])
        if loss_name == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(z, t[None])
        return F.mse_loss(z, t[None], reduction="sum" if loss_name == "mse_sum" else "mean")

    t = torch.tensor(y) if y.dtype.kind in "iu" else torch.tensor(y, dtype=torch.float64)
    x = torch.tensor(X, dtype=torch.float64)
    grads = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, x, t)
    want = torch.sqrt(sum((g.reshape(N, -1) ** 2).sum(dim=1) for g in grads.values())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10 if dtype == "float64" else 1e-4)


# ---------------------------------------------------------------------------------------
def test_mislabelled_digits_example_finds_flipped_rows():
    spec = importlib.util.spec_from_file_location("mislabelled_digits",
                                                  ROOT / "examples" / "mislabelled_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(epochs=8, verbose=False)
    assert result["grad_norm"] > 0.3 and result["random"] == pytest.approx(0.02, abs=0.005)
