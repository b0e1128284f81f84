"""The optimizer records of ``kernels/optimizers.py``: on every backend, and right.

tests/test_kernels.py compares each backend's ops with the reference; these tests hold the
records themselves: every record is an op of the registry on every accelerated backend, with
the reference's signature; every variant has its CuPy kernel; each formula, evaluated on
NumPy arrays, agrees with the reference's independent statement of the update in every
variant and for every flag; and the printed C++ writes no state before reading all of them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import itertools

import numpy as np
import pytest

from backprop import kernels as K
from backprop.kernels import optimizers as O
from backprop.kernels import reference as R

ACCELERATED = ("numba_cpu", "numba_cuda", "cupy")
NUMPY = {dtype: O.UpdateMath(
    K=np.dtype(dtype).type, where=np.where, sqrt=np.sqrt, maximum=np.maximum,
    flush=lambda x, tiny=np.finfo(dtype).tiny: np.where(np.abs(x) < tiny, 0, x).astype(x.dtype))
    for dtype in (np.float32, np.float64)}


def test_every_record_is_an_op_on_every_backend_with_the_reference_signature():
    for record in O.RECORDS.values():
        assert K.OPS[record.op] == ACCELERATED
        theirs = inspect.signature(getattr(R, record.op))
        assert inspect.signature(functools.partial(record.arguments, None)) == theirs
        assert getattr(K, record.op).__name__ == record.op
        for backend in ACCELERATED:
            if backend != "cupy" and importlib.util.find_spec("numba") is None:
                continue
            module = importlib.import_module(K.BACKENDS[backend][0])
            op = getattr(module, record.op)
            assert op.__name__ == record.op and inspect.signature(op) == theirs


def test_every_variant_has_its_cupy_kernel():
    from backprop.kernels import cupy_kernels as ck

    names = {f"bp_{r.variant_name(v)}" for r in O.RECORDS.values() for v in r.variants}
    assert names == {"bp_sgd", "bp_sgd_momentum", "bp_rmsprop", "bp_rmsprop_momentum",
                     "bp_rmsprop_centered", "bp_rmsprop_centered_momentum", "bp_adam",
                     "bp_adam_amsgrad", "bp_adagrad"}
    assert names <= set(ck.ELEMENTWISE)


# every combination of the hyperparameters that choose a variant or a branch of a formula
GRID = {
    "sgd": dict(lr=[0.1], momentum=[0.0, 0.9], dampening=[0.0, 0.25], nesterov=[False, True],
                weight_decay=[0.0, 1e-2], first_step=[False, True]),
    "rmsprop": dict(lr=[0.01], alpha=[0.99], eps=[1e-8], weight_decay=[0.0, 1e-2],
                    momentum=[0.0, 0.9], centered=[False, True]),
    "adam": dict(lr=[1e-3], beta1=[0.9], beta2=[0.999], eps=[1e-8], weight_decay=[0.0, 1e-2],
                 decoupled=[False, True], step=[1, 7], amsgrad=[False, True]),
    "adagrad": dict(lr=[0.01], lr_decay=[0.0, 0.1], eps=[1e-10], weight_decay=[0.0, 1e-2],
                    step=[1, 5]),
}


def _returned(*args):
    return args


def _calls(name):
    grid = GRID[name]
    for values in itertools.product(*grid.values()):
        yield dict(zip(grid, values))


def _buffers(name, hyper, dtype, rng, n=257):
    """The array arguments of one call (None where the variant keeps no such state)."""
    def a(scale=1.0, positive=False):
        x = rng.standard_normal(n) * scale
        return (np.abs(x) if positive else x).astype(dtype)

    g = a()
    g[::7] = 0.0
    if name == "sgd":
        return dict(p=a(), g=g, buf=a(0.1) if hyper["momentum"] else None)
    if name == "rmsprop":
        grad_avg = a(0.1) if hyper["centered"] else None
        square = a(0.01, True) + (grad_avg ** 2 + 0.01 if hyper["centered"] else 0)
        return dict(p=a(), g=g, square_avg=square.astype(dtype),
                    buf=a() if hyper["momentum"] else None, grad_avg=grad_avg)
    if name == "adam":
        return dict(p=a(), g=g, m=a(0.1), v=a(0.01, True),
                    vmax=a(0.01, True) if hyper.pop("amsgrad") else None)
    return dict(p=a(), g=g, state_sum=a(0.01, True))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("name", sorted(O.RECORDS))
def test_the_formula_agrees_with_the_reference_in_every_variant(name, dtype, rtol):
    """Each formula on whole NumPy arrays (scalars rounded to the dtype, as every backend
    rounds them) against the reference's own statement of the update."""
    record, rng = O.RECORDS[name], np.random.default_rng(5)
    for hyper in _calls(name):
        buffers = _buffers(name, hyper, dtype, rng)
        ours = {k: None if v is None else v.copy() for k, v in buffers.items()}
        p, g, states, scalars, flags = record.arguments(_returned, **ours, **hyper)
        c = tuple(np.dtype(dtype).type(x) for x in scalars) + flags
        new = record.update(NUMPY[dtype])(p, g, *states, c)
        getattr(R, record.op)(**buffers, **hyper)
        _, _, want_states, _, _ = record.arguments(_returned, **buffers, **hyper)
        for got, want in zip(new, (buffers["p"],) + want_states):
            assert (got is None) == (want is None), hyper
            if got is not None:
                assert got.dtype == dtype, hyper
                np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-30,
                                           err_msg=f"{name} {hyper}")


def test_the_cuda_body_reads_every_state_before_it_writes_one():
    """ElementwiseKernel out parameters are references: every new value is a ``const``
    temporary before the first assignment, and each state is assigned once."""
    for record in O.RECORDS.values():
        for present in record.variants:
            lines = O.cuda_update(record, present).splitlines()
            assigned = [line.split(" = ")[0] for line in lines if not line.startswith("const")]
            kept = ["p"] + [s for s, k in zip(record.states, present) if k]
            assert sorted(assigned) == sorted(kept)
            assert lines[-len(kept):] == [line for line in lines
                                         if not line.startswith("const")]


def test_a_formula_that_branches_on_a_value_is_refused_when_printed():
    def bad(m):
        zero = m.K(0.0)
        return lambda p, g, s, c: ((p - g if c[0] != zero else p), s)

    record = O.OptimizerDef("bad", bad, lambda p, g, s, lr: None, ("s",), ("lr",))
    with pytest.raises(TypeError, match="where"):
        O.cuda_update(record, (True,))
