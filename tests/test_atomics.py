"""backprop.kernels.atomics: the counters and the wait of the inference plans' parallel pass.
Increments from every thread of a parallel region are never lost, a wait returns once its
count is reached (and only then), and the intrinsics refuse arrays they cannot count in."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from backprop.kernels import atomics

pytestmark = pytest.mark.skipif(numba.config.DISABLE_JIT,
                                reason="the atomics exist in compiled code only")


@njit(parallel=True)
def _count_from_every_thread(counters, per_thread, olds):
    for t in prange(olds.shape[0]):
        for r in range(per_thread):
            olds[t, r] = atomics.fetch_add(counters, 1)


@njit(parallel=True)
def _hand_over(counters, box, seen):
    """Iteration 0 writes ``box`` then counts; iteration 1 waits for the count, then reads."""
    for t in prange(2):
        if t == 0:
            box[0] = 42.0
            atomics.fetch_add(counters, 0)
        else:
            atomics.wait_until(counters, 0, 1)
            seen[0] = box[0]


def test_increments_from_every_thread_are_never_lost():
    threads = max(2, numba.get_num_threads())
    per_thread = 20_000
    counters = np.zeros(3, np.int64)
    olds = np.empty((threads, per_thread), np.int64)
    _count_from_every_thread(counters, per_thread, olds)
    assert counters.tolist() == [0, threads * per_thread, 0]  # neighbours untouched
    # every value before an increment was returned to exactly one of them
    assert np.array_equal(np.sort(olds.ravel()), np.arange(threads * per_thread))


def test_a_wait_returns_after_the_count_and_sees_the_writes_before_it():
    for _ in range(200):
        counters = np.zeros(1, np.int64)
        box, seen = np.zeros(1), np.zeros(1)
        _hand_over(counters, box, seen)
        assert seen[0] == 42.0 and counters[0] == 1


@njit
def _load(counters, i):
    return atomics.load_acquire(counters, i)


@njit
def _wait(counters, i, target):
    atomics.wait_until(counters, i, target)
    return counters[i]


def test_a_reached_count_returns_at_once_and_loads_read_the_value():
    counters = np.array([5, 7], np.int64)
    assert _load(counters, 1) == 7
    assert _wait(counters, 0, 5) == 5
    assert _wait(counters, 0, -1) == 5


@pytest.mark.parametrize("counters", [np.zeros(2, np.int32), np.zeros(2), np.zeros((2, 2),
                                                                                    np.int64)],
                         ids=["int32", "float64", "2-d"])
def test_anything_but_a_1d_int64_array_is_refused_when_compiled(counters):
    with pytest.raises(numba.core.errors.TypingError):
        _load(counters, 0)


def test_a_read_only_array_is_refused():
    counters = np.zeros(2, np.int64)
    counters.flags.writeable = False

    @njit
    def add(c):
        return atomics.fetch_add(c, 0)

    with pytest.raises(numba.core.errors.TypingError):
        add(counters)


def test_the_yield_call_is_found_here():
    """On the platforms backprop supports the OS's yield exists; were it missing, the
    plans would skip the parallel pass (AVAILABLE False) rather than fail."""
    assert atomics.AVAILABLE, atomics.REASON
