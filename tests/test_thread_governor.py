"""The adaptive thread count of a training loop (backprop/thread_governor.py): its decisions
on simulated step times (a fake clock whose steps take what the thread count in use costs),
the mode setting, the optimizer's hook, and the setters it drives (Numba's thread count,
OpenBLAS's ceiling in backprop/blas.py). CPU only."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest

from backprop import blas
from backprop import thread_governor as tg
from backprop.backend import use_device
from backprop.layers import Dense
from backprop.losses import SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop.optim import Adam


@pytest.fixture(autouse=True)
def governor_state():
    """The module's mode and its step hook's flag put back after each test."""
    state, engaged = dict(tg._STATE), tg.ENGAGED[0]
    yield
    tg._STATE.clear()
    tg._STATE.update(state)
    tg.ENGAGED[0] = engaged


class Loop:
    """A training loop on a fake clock: each step takes ``cost[count]`` seconds for the
    thread count the governor has set (times ``noise`` drawn around 1)."""

    def __init__(self, top, cost, noise=0.0, seed=0):
        self.now = 0.0
        self.cost = dict(cost)
        self.count = top
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.applied = []
        self.gov = tg.Governor(top, clock=lambda: self.now, apply=self.apply,
                               threads=lambda: self.count)

    def apply(self, count, top, numba_too=True):
        self.count = count
        self.applied.append(count)

    def run(self, seconds):
        end = self.now + seconds
        while self.now < end:
            factor = 1.0 + (self.rng.uniform(-self.noise, self.noise) if self.noise else 0.0)
            self.now += self.cost[self.count] * factor
            self.gov.tick()
        return self.gov


def test_all_threads_stay_where_they_are_faster():
    loop = Loop(2, {2: 1.0e-3, 1: 1.6e-3})
    gov = loop.run(30.0)
    assert gov.current == 2 and gov.trials >= 3 and gov.changes == 0
    assert gov.reference[2] == pytest.approx(1.0e-3) and gov.reference[1] == pytest.approx(1.6e-3)
    assert set(loop.applied) == {1, 2}  # trials ran one thread, then handed both back
    assert gov.wait > tg.MIN_WAIT_SECONDS  # trials that keep the count come less often


def test_one_thread_under_contention_and_all_threads_once_the_cores_are_free():
    loop = Loop(2, {2: 1.0e-3, 1: 1.6e-3})
    loop.run(20.0)
    loop.cost[2] = 5.0e-3  # another process now shares a core
    gov = loop.run(1.0)  # the slowdown starts a trial at once: no waiting for the schedule
    assert gov.current == 1 and gov.changes == 1
    loop.run(30.0)
    assert gov.current == 1 and gov.changes == 1  # still contended: trials keep one thread
    loop.cost[2] = 1.0e-3  # the other process ends
    loop.run(tg.MAX_REDUCED_WAIT_SECONDS + 2.0)
    assert gov.current == 2 and gov.changes == 2


def test_noise_alone_does_not_move_the_count():
    loop = Loop(2, {2: 1.0e-3, 1: 1.0e-3}, noise=0.2, seed=3)
    gov = loop.run(200.0)
    assert gov.trials >= 5 and gov.changes == 0 and gov.current == 2


def test_pauses_between_steps_neither_start_trials_nor_decide_them():
    """An evaluation (or a stopped process) between two steps is one slow step of a
    window: the window's median ignores it, and the schedule runs on the steps' time."""
    loop = Loop(2, {2: 1.0e-3, 1: 1.6e-3})
    gov = loop.gov
    for i in range(40000):
        loop.now += loop.cost[loop.count] + (2.0 if i % 97 == 0 else 0.0)
        gov.tick()
    assert gov.changes == 0 and gov.current == 2
    # 40 s of steps: a first trial after 1 s, then waits of 2, 4, 8, 16 s
    assert gov.trials == 5, gov.trials


def test_small_steps_are_timed_in_longer_windows():
    loop = Loop(2, {2: 20e-6, 1: 30e-6})
    gov = loop.run(2.0)
    assert gov.window_steps == tg.MAX_WINDOW_STEPS or \
        gov.window_steps * 20e-6 >= tg.WINDOW_SECONDS
    assert gov.current == 2 and gov.trials >= 1


def test_the_ladder_climbs_down_to_the_fastest_count():
    assert tg.Governor(8, clock=lambda: 0.0, apply=lambda *a, **k: None,
                       threads=lambda: 8).ladder == [8, 7, 4, 1]
    assert tg.Governor(1, clock=lambda: 0.0, apply=lambda *a, **k: None,
                       threads=lambda: 1).ladder == [1]
    loop = Loop(8, {8: 3.0e-3, 7: 2.5e-3, 4: 1.2e-3, 1: 2.0e-3})
    gov = loop.run(60.0)
    assert gov.current == 4


def test_a_thread_count_set_by_someone_else_starts_over():
    loop = Loop(2, {2: 1.0e-3, 1: 1.6e-3, 3: 0.8e-3})
    gov = loop.run(5.0)
    loop.count = 3  # the program called numba.set_num_threads(3) between steps
    loop.run(0.5)
    assert gov.top == 3 and gov.ladder == [3, 2, 1]


@use_device("cpu")
def test_a_bad_mode_is_refused_at_the_first_step(monkeypatch):
    """``BACKPROP_THREADS`` with a value of neither mode at import: the first optimizer step
    raises, naming the variable."""
    monkeypatch.setitem(tg._STATE, "mode", None)
    monkeypatch.setenv("BACKPROP_THREADS", "lots")
    tg._STATE["mode"] = tg._mode_at_import()  # as at import
    tg.ENGAGED[0] = tg._STATE["mode"] != "fixed"
    assert tg.ENGAGED[0]
    model = Sequential([Dense(4, 2, rng=0)])
    opt = Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="BACKPROP_THREADS must be one of fixed, adaptive"):
        opt.step()


def test_the_mode_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setitem(tg._STATE, "mode", None)
    monkeypatch.setenv("BACKPROP_THREADS", "Adaptive ")
    assert tg.mode() == "adaptive"
    monkeypatch.setitem(tg._STATE, "mode", None)
    monkeypatch.setenv("BACKPROP_THREADS", "sometimes")
    with pytest.raises(ValueError, match="BACKPROP_THREADS must be one of fixed, adaptive"):
        tg.mode()
    monkeypatch.setitem(tg._STATE, "mode", None)
    monkeypatch.delenv("BACKPROP_THREADS")
    assert tg.mode() == "fixed"
    with pytest.raises(ValueError, match="mode must be one of"):
        tg.set_mode("often")
    assert tg.mode() == "fixed"
    tg.ENGAGED[0] = False
    tg.set_mode("adaptive")  # (the fixture puts the mode back)
    assert tg.ENGAGED[0]


def _in_thread(fn):
    """Run ``fn`` in a new thread (the governor and Numba's thread count are per thread)
    and return its result, re-raising what it raised."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller)
            out["error"] = error

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@use_device("cpu")
def test_optimizer_steps_drive_the_governor_and_fixed_hands_the_threads_back(monkeypatch):
    monkeypatch.setitem(tg._STATE, "mode", "adaptive")
    tg.ENGAGED[0] = True
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = rng.integers(0, 4, 32)

    def train():
        model = Sequential([Dense(16, 8, activation="relu", rng=0), Dense(8, 4, rng=1)])
        loss, opt = SoftmaxCrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)
        assert tg.status()["threads"] is None
        for _ in range(3):
            opt.zero_grad()
            loss.forward(model.forward(x), y)
            model.backward(loss.backward())
            opt.step()
        during = tg.status()
        gov = tg._LOCAL.governor
        gov._set(1)  # as a trial would
        assert numba.get_num_threads() == 1
        tg.set_mode("fixed")
        opt.step()
        return during, tg.status(), numba.get_num_threads()

    during, after, threads = _in_thread(train)
    assert during["mode"] == "adaptive" and during["threads"] == during["top"] == \
        numba.get_num_threads()
    assert after["threads"] is None and after["mode"] == "fixed"
    assert threads == numba.get_num_threads()


def _openblas_threads() -> int:
    if blas._openblas() is None:
        pytest.skip("no OpenBLAS with a pthreads pool in this process (threadpoolctl found "
                    "none): there is no OpenBLAS ceiling to set")
    return blas._threads(blas._openblas())


def test_the_openblas_ceiling_holds_over_caps_and_ends_with_its_owner():
    before = _openblas_threads()
    if before < 2:
        pytest.skip("OpenBLAS runs one thread here: a ceiling of 1 would change nothing")
    blas.set_ceiling("a", 1)
    try:
        assert _openblas_threads() == 1
        token = blas.acquire(1 << 40)  # a cap that asks for every thread: the ceiling wins
        assert _openblas_threads() == 1
        blas.release(token)
        with blas.threads_for(1 << 40):
            assert _openblas_threads() == 1
        assert _openblas_threads() == 1
        blas.set_ceiling("b", 2)  # the smallest ceiling applies
        assert _openblas_threads() == 1
    finally:
        blas.set_ceiling("a", None)
    assert _openblas_threads() == min(2, before)
    blas.set_ceiling("b", None)
    blas.set_ceiling("never-set", None)
    assert _openblas_threads() == before
    with blas.threads_for(1 << 40):  # a cap begun before a ceiling outlives it correctly
        blas.set_ceiling("c", 1)
        assert _openblas_threads() == 1
        blas.set_ceiling("c", None)
        assert _openblas_threads() == before
    assert _openblas_threads() == before


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_a_governor_sets_numba_and_openblas_and_its_ceiling_goes_with_it():
    before = _openblas_threads()

    def reduce_and_leave():
        gov = tg.Governor(numba.get_num_threads())
        gov._set(1)
        seen = (numba.get_num_threads(), blas._threads(blas._openblas()), len(blas._ceilings))
        return seen  # the governor is dropped here, with its thread, still at one thread

    threads, openblas, ceilings = _in_thread(reduce_and_leave)
    assert threads == 1 and openblas == 1 and ceilings == 1
    gc.collect()
    assert not blas._ceilings and _openblas_threads() == before

    def reduce_and_release():
        gov = tg.Governor(numba.get_num_threads())
        gov._set(1)
        gov.release()
        return numba.get_num_threads(), blas._threads(blas._openblas())

    assert _in_thread(reduce_and_release) == (numba.config.NUMBA_NUM_THREADS, before)


def test_info_names_the_mode_and_refuses_a_bad_one(monkeypatch):
    """``python -m backprop info`` says how the thread count is chosen; a bad
    ``BACKPROP_THREADS`` is one of its problems."""
    from backprop import cli

    problems: list = []
    monkeypatch.setitem(tg._STATE, "mode", "adaptive")
    assert cli._threads_report(problems).startswith("adaptive (")
    monkeypatch.setitem(tg._STATE, "mode", "fixed")
    assert cli._threads_report(problems).startswith("fixed (")
    monkeypatch.setitem(tg._STATE, "mode", None)
    monkeypatch.setenv("BACKPROP_THREADS", "many")
    assert cli._threads_report(problems) is None
    assert problems == ["BACKPROP_THREADS must be one of fixed, adaptive; got 'many': fix or "
                        "unset BACKPROP_THREADS"]


def test_the_environment_variable_governs_fit_in_a_new_process():
    """``BACKPROP_THREADS=adaptive`` set before Python starts: ``fit``'s steps make the
    calling thread's governor; without it they make none."""
    script = (
        "import numpy as np, backprop as bp\n"
        "from backprop import thread_governor as tg\n"
        "from backprop.layers import Dense\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((64, 8)).astype(np.float32); y = rng.integers(0, 3, 64)\n"
        "model = bp.Sequential([Dense(8, 3, rng=0)])\n"
        "model.fit(x, y, loss='softmax_cross_entropy', epochs=2, batch_size=16, verbose=0)\n"
        "s = tg.status(); print(s['mode'], s['threads'] is not None)\n")
    for value, expected in (("adaptive", "adaptive True"), ("fixed", "fixed False")):
        env = {**os.environ, "BACKPROP_THREADS": value, "BACKPROP_DEVICE": "cpu"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split("\n")[-2] == expected, done.stdout
