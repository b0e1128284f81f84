"""Every activation layer against PyTorch's module of the same name (``torch.nn.<layer>``),
forward and backward, float32 and float64, on the kernels of this run (CI's jobs run the
suite on each CPU backend). Skipped where PyTorch is not installed (it is never a
dependency: ``pip install torch`` to run these)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import backprop as bp
from backprop.activations import NAMES
from backprop.kernels.activations import RECORDS

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

LAYERS = sorted({(r.layer, r.alpha) for r in RECORDS.values() if r.layer}
                | {("GELU", None)})


def _torch_module(layer: str, alpha):
    cls = getattr(torch.nn, layer)
    if alpha is None:
        return cls()
    params = inspect.signature(cls).parameters
    key = "alpha" if "alpha" in params else "negative_slope"
    return cls(**{key: alpha})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer, alpha", LAYERS, ids=[name for name, _ in LAYERS])
def test_activation_matches_pytorch(layer, alpha, dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(scale=4.0, size=500),
                        [-200.0, -30.0, -1e-4, 1e-4, 30.0, 200.0]]).astype(dtype)[None, :]
    g = rng.normal(size=x.shape).astype(dtype)
    ours = getattr(bp, layer)(alpha) if alpha is not None else getattr(bp, layer)()
    out = bp.to_numpy(ours.forward(x.copy())).copy()
    dx = bp.to_numpy(ours.backward(g.copy()))
    t = torch.tensor(x, requires_grad=True)
    expected = _torch_module(layer, alpha)(t)
    expected.backward(torch.tensor(g))
    want, want_dx = expected.detach().numpy(), t.grad.numpy()
    if layer == "Softplus":  # PyTorch returns x (slope 1) above its threshold, 20; we do not
        want = np.where(x > 20, x + np.log1p(np.exp(-np.abs(x))), want)
        want_dx = np.where(x > 20, g / (1.0 + np.exp(-x)), want_dx)
    eps = np.finfo(dtype).eps
    # errors relative to the magnitudes involved (σ′ has roots: SiLU's near z = -1.28)
    np.testing.assert_allclose(out, want, rtol=8 * eps, atol=8 * eps)
    scale = np.abs(g) * (1.0 + np.abs(x)) * 8 * eps
    assert np.all(np.abs(dx - want_dx) <= scale + 8 * eps), layer


def test_every_layer_name_is_reachable_by_name():
    for record in RECORDS.values():
        if record.layer:
            assert isinstance(NAMES[record.name](), getattr(bp, record.layer))
