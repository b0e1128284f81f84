"""Shared fixtures: every test that takes ``device`` runs once per device, and a device that
cannot run here is skipped with its reason shown (``pytest -ra`` lists them)."""
from __future__ import annotations

import os
import re
import threading

import numpy as np
import pytest

import backprop as bp
from backprop import kernels
from backprop.backend import cuda_status

DEVICES = ["cpu", "cuda"]
BACKENDS = list(kernels.BACKENDS)


def run_threads(target, arguments) -> None:
    """``target(*args)`` for each ``args`` of ``arguments``, each in its own thread, all
    started before any is joined. (An exception in a thread fails nothing: ``target``
    records what went wrong for the test to assert on.)"""
    threads = [threading.Thread(target=target, args=args) for args in arguments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def skip_unless_device(name: str) -> None:
    if name == "cuda":
        status = cuda_status()
        if not status["available"]:
            pytest.skip(f"no CUDA device: {status['reason']}")


@pytest.fixture(params=DEVICES)
def device(request):
    """Run the test on each device (skipped with the reason where it is unavailable)."""
    skip_unless_device(request.param)
    with bp.use_device(request.param) as dev:
        yield dev


@pytest.fixture
def xp(device):
    """The array module of the device under test."""
    return device.xp


@pytest.fixture
def kernels_for_both_devices():
    """For a test that computes on the CPU and on a GPU in turn: where the job selected
    BACKPROP_KERNELS=cupy (CUDA arrays only, as the GPU CI does), the test runs with ``auto``
    instead (cupy on CUDA arrays, numba_cpu on NumPy arrays)."""
    previous = kernels.get_choice()
    if previous == "cupy":
        kernels.set_backend("auto")
    yield
    kernels.set_backend(previous)


# ---------------------------------------------------------------------------------------
# Kernel backends as a test parameter
BACKENDS_ON_HOST = ("default", "reference", "cupy_on_host", "numba_cuda_sim")
DEFAULT_BACKENDS = ("default", "reference", "cupy_on_host")


def pytest_addoption(parser):
    parser.addoption(
        "--backend", action="append", choices=BACKENDS_ON_HOST, default=None,
        help="kernel backend(s) that the tests marked 'backends' run on (repeatable; default: "
             f"{', '.join(DEFAULT_BACKENDS)}). default: the dispatch of this process "
             "(BACKPROP_KERNELS; Numba on the CPU); reference: the plain-xp oracle; "
             "cupy_on_host: the CuPy backend's CUDA C++ compiled for the CPU (cuda_host.py); "
             "numba_cuda_sim: the Numba CUDA backend in Numba's simulator (needs "
             "NUMBA_ENABLE_CUDASIM=1 set before Python starts)")


def pytest_generate_tests(metafunc):
    """Tests marked ``backends`` (the model-level files mark themselves) run once per
    selected backend: the ``cpu_kernels`` fixture routes every kernel call on NumPy arrays
    to it, so layers, losses, optimizers and ``fit`` drive that backend as a run on it
    would (its buffers, aliases, accumulation flags and workspaces)."""
    if (metafunc.definition.get_closest_marker("backends") is None
            or metafunc.definition.get_closest_marker("one_backend") is not None):
        return
    chosen = metafunc.config.getoption("--backend") or list(DEFAULT_BACKENDS)
    metafunc.parametrize("cpu_kernels", chosen, indirect=True, scope="function")


@pytest.fixture(autouse=True)
def cpu_kernels(request, monkeypatch):
    """The kernel backend of this test (``default`` for tests not marked ``backends``); see
    :func:`pytest_generate_tests`. Yields its name."""
    choice = getattr(request, "param", "default")
    if choice == "cupy_on_host":
        import cuda_host

        reason = cuda_host.unavailable_reason()
        if reason is not None:
            pytest.skip(f"the CuPy kernels cannot run on the host: {reason}")
        cuda_host.install(monkeypatch)
        route_cpu_kernels(monkeypatch, cuda_host.CK)
    elif choice == "numba_cuda_sim":
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            pytest.skip("numba_cuda_sim needs NUMBA_ENABLE_CUDASIM=1 set before Python starts")
        from backprop.kernels import numba_cuda

        route_cpu_kernels(monkeypatch, numba_cuda)
    elif choice == "reference":
        from backprop.kernels import reference

        route_cpu_kernels(monkeypatch, reference)
    yield choice


def route_cpu_kernels(monkeypatch, module) -> None:
    """Until the test ends, kernel calls on NumPy arrays run ``module``'s op functions."""
    monkeypatch.setitem(kernels._state["tables"], "cpu",
                        {op: getattr(module, op) for op in kernels.OPS})


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def skip_unless_backend(name: str) -> None:
    reason = kernels.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"kernel backend {name} unavailable: {reason}")


# ---------------------------------------------------------------------------------------
# Kernel calls built from the registry's signatures (the PTX and CuPy launch tests)
def _arrays(dtype, *shapes):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


def kernel_arguments(op, dtype, act, n=6, m=5):
    """Arguments for one call of the registry op ``op`` (NumPy arrays of ``dtype``, an (n, m)
    batch, activation ``act`` where the op takes one) with every optional buffer given."""
    if op == "bias_act_forward":
        z, b, out = _arrays(dtype, (n, m), (m,), (n, m))
        return z, b, out, act, 0.1
    if op == "bias_act_backward":
        da, a, z, delta, db = _arrays(dtype, (n, m), (n, m), (n, m), (n, m), (m,))
        return da, a, z, act, 0.1, delta, db, True
    if op == "softmax_forward":
        return tuple(_arrays(dtype, (n, m), (n, m)))
    if op == "softmax_backward":
        return tuple(_arrays(dtype, (n, m), (n, m), (n, m)))
    if op == "softmax_xent":
        logits, grad, loss = _arrays(dtype, (n, m), (n, m), (n,))
        return logits, np.arange(n, dtype=np.int64) % m, 0.1, 1.0 / n, grad, loss
    if op == "sgd_step":
        p, g, buf = _arrays(dtype, m, m, m)
        return p, g, buf, 0.1, 0.9, 0.1, True, 0.01, False
    if op == "rmsprop_step":
        p, g, sq, buf, avg = _arrays(dtype, m, m, m, m, m)
        return p, g, np.abs(sq), buf, avg, 0.01, 0.99, 1e-8, 0.01, 0.9, True
    if op == "adam_step":
        p, g, mom, v, vmax = _arrays(dtype, m, m, m, m, m)
        return p, g, mom, np.abs(v), np.abs(vmax), 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3
    if op == "adagrad_step":
        p, g, s = _arrays(dtype, m, m, m)
        return p, g, np.abs(s), 0.1, 0.01, 1e-10, 0.01, 2
    if op == "dropout":
        x, out = _arrays(dtype, (n, m), (n, m))
        return x, kernels.dropout_key(1, 2), kernels.dropout_threshold(0.25), 1 / 0.75, out
    if op == "batchnorm_forward":
        x, gamma, beta, out, mean, var, invstd = _arrays(dtype, (n, m), m, m, (n, m), m, m, m)
        return x, gamma, beta, 1e-5, out, mean, var, invstd
    if op == "batchnorm_backward":
        dy, x, gamma, mean, invstd, dx, dgamma, dbeta = _arrays(
            dtype, (n, m), (n, m), m, m, m, (n, m), m, m)
        return dy, x, gamma, mean, np.abs(invstd), dx, dgamma, dbeta, True
    raise KeyError(op)


def outlined_calls(ir: str) -> list:
    """The functions of ``kernels/vecmath.py`` and the activation formulas of
    ``kernels/numba_cpu.py`` that optimised LLVM IR still calls (not inlined); Numba's
    mangled names spell each module as its length and name."""
    return [name for name in re.findall(r'call [^@]*@"?([\w.$]+)', ir)
            if re.search(r"7kernels(7vecmath|9numba_cpu\d+_(activation|derivative)_impl)", name)]
