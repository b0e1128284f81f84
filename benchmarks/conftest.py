"""Fixtures of the benchmark suite.

``pytest benchmarks/ --benchmark-only`` times everything; ``pytest benchmarks/
--benchmark-disable`` (the smoke mode the test suite runs) executes every benchmark body once
on small shapes, so the suite cannot rot. Timings are never asserted.
"""
from __future__ import annotations

import time

import pytest

from backprop import kernels as K
from workloads import DTYPE, TARGETS, Target, synced, thread_info


def pytest_benchmark_update_machine_info(config, machine_info):
    """Describe the machine (CPU model, cores, BLAS, GPU, library versions) in the JSON."""
    from report import describe_machine

    machine_info["backprop"] = describe_machine()


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """Keep the statistics of each benchmark, drop its per-round times from the JSON (tens of
    MB for the microsecond benchmarks)."""
    outcome = yield
    for bench in outcome.get_result()["benchmarks"]:
        bench["stats"].pop("data", None)


@pytest.fixture
def smoke(benchmark) -> bool:
    """True when benchmarks run once as tests (``--benchmark-disable``, or under xdist):
    workloads then use small shapes."""
    return benchmark.disabled


@pytest.fixture(params=TARGETS, ids=lambda t: t.id)
def target(request) -> Target:
    """Each (device, kernel backend) pair; skipped with its reason where it cannot run."""
    reason = request.param.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def kernel_choice():
    """Select the kernels a model uses for the duration of a test (``K.set_backend``)."""
    previous = K.get_choice()
    yield K.set_backend
    K.set_backend(previous)


MAX_RESET_ROUNDS = 2000  # rounds of an in-place benchmark (each restores its input first)


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, device=..., group=..., reset=None, **info)``: warm ``fn`` up (compilation,
    first-call allocations), then time it with pytest-benchmark, synchronising the device after
    each call, and record ``info`` (bytes, flops, shape, …) with the device, dtype and threads.
    ``reset`` (untimed) runs before every call of ``fn``: an in-place call overwrites its input,
    and repeated on its own output it would drift (into subnormals, which slow the arithmetic
    down, or to a fixed point)."""

    def run(fn, *, device: str, group: str, warmup: int = 2, reset=None, **info):
        call = synced(device, fn)
        setup = None if reset is None else synced(device, reset)
        elapsed = 0.0
        if benchmark.enabled:
            for _ in range(warmup):
                if setup is not None:
                    setup()
                start = time.perf_counter()
                call()
                elapsed = time.perf_counter() - start
        benchmark.group = group
        benchmark.extra_info.update(device=device, dtype=str(DTYPE), **info)
        if device == "cpu":
            benchmark.extra_info["threads"] = thread_info()
        if setup is None:
            benchmark(call)
            return
        # pedantic: a setup before each round; rounds as pytest-benchmark's max-time would give
        option = request.config.getoption  # (their defaults are strings)
        rounds = int(float(option("benchmark_max_time")) / max(elapsed, 1e-7))
        rounds = max(int(option("benchmark_min_rounds")), min(rounds, MAX_RESET_ROUNDS))
        benchmark.pedantic(call, setup=setup, rounds=rounds)

    return run
