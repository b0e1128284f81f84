"""Shared fixtures: every test that takes ``device`` runs once per device, and a device that
cannot run here is skipped with its reason shown (``pytest -ra`` lists them)."""
from __future__ import annotations

import numpy as np
import pytest

import backprop as bp
from backprop import kernels
from backprop.backend import cuda_status

DEVICES = ["cpu", "cuda"]
BACKENDS = list(kernels.BACKENDS)


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


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def skip_unless_backend(name: str) -> None:
    reason = kernels.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"kernel backend {name} unavailable: {reason}")
