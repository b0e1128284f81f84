"""Fewer threads while other programs keep cores busy: a training loop's thread count,
chosen by timing its own steps (``BACKPROP_THREADS=adaptive``; off by default).

Why. backprop's parallel work runs in OpenMP regions (Numba's kernels, the compiled tiles,
OpenBLAS's jobs on the same team, :mod:`backprop.blas_pool`): each thread gets a fixed share
of a region, and the region ends when its last thread is done. When another process keeps
one core busy, the thread that shares that core runs only part of the time and every region
waits for it, so that two threads can take longer than one, while one thread keeps its usual
speed (``benchmarks/README.md``, "Sharing the cores", has the figures). XLA's work-stealing
pool, whose idle threads take over a late thread's work, loses far less there.

What. Each thread that calls ``Optimizer.step()`` on CPU parameters (``fit`` does, once per
batch) has a governor, which times the steps (from one ``step()`` to the next, so whatever
the loop does in between counts too) in windows of at least :data:`WINDOW_STEPS` steps and
:data:`WINDOW_SECONDS` seconds, each window's step time the median of its steps' (a pause
between two steps, an evaluation, a checkpoint, weighs as one slow step). It runs trials:
windows alternating between the thread count in use and its neighbours on a ladder (all
threads ``T``, ``T - 1``, ``T // 2``, 1), :data:`TRIAL_ROUNDS` windows each; the count with
the lowest median of its windows wins, if it beats the count in use by :data:`MARGIN`. The
schedule runs on the steps' own time (pauses do not count): the first trial after
:data:`FIRST_TRIAL_SECONDS` of steps, then after a wait that doubles while trials keep the
count (from :data:`MIN_WAIT_SECONDS` up to :data:`MAX_WAIT_SECONDS`, or
:data:`MAX_REDUCED_WAIT_SECONDS` while fewer threads run, so that the loop soon gets its
threads back once the cores are free), and at once (at most every :data:`MIN_WAIT_SECONDS`)
when a window's step time is :data:`SLOWDOWN` times the one the count had in the last trial.

A count applies to the calling thread's Numba threads (``numba.set_num_threads``: the kernels,
the tiles and the inference plans that thread runs; MKL's products follow them,
:mod:`backprop.gemm`) and, below all threads, caps OpenBLAS for the whole process
(:func:`backprop.blas.set_ceiling`; the smallest count of any governor applies).

Results. Numba's kernels and the compiled tiles give the same bits on any thread count
(their sums are split by the data's shape, never by the threads), but OpenBLAS's and MKL's
products do not: under ``adaptive`` a product's rounding may depend on the thread count in
use at that step, so two runs of one seeded script may differ in the last bits. That is why
it is not the default: ``fixed`` keeps every run reproducible.

Settings: ``BACKPROP_THREADS`` = ``fixed`` (default) | ``adaptive``, read when backprop is
imported (any other value is refused at the first ``step()`` and reported by ``python -m
backprop info``); :func:`set_mode` changes it at run time (a thread's governor then hands its
threads back at its next step). A thread whose Numba thread count was changed by someone
else since the governor set it starts over from that count. :func:`status` says what the
calling thread's governor is doing.

Thread-safe: the governors are per thread (``threading.local``); the OpenBLAS ceiling goes
through :mod:`backprop.blas`'s lock.
"""
from __future__ import annotations

import statistics
import threading
import time
import weakref

__all__ = ["MODES", "ENGAGED", "WINDOW_STEPS", "WINDOW_SECONDS", "MAX_WINDOW_STEPS", "TRIAL_ROUNDS",
           "MARGIN", "SLOWDOWN", "FIRST_TRIAL_SECONDS", "MIN_WAIT_SECONDS",
           "MAX_WAIT_SECONDS", "MAX_REDUCED_WAIT_SECONDS", "mode", "set_mode", "tick",
           "status", "Governor"]

MODES = ("fixed", "adaptive")

WINDOW_STEPS = 8
"""The fewest steps of a timing window (the step in flight when the count changes is not
timed)."""
WINDOW_SECONDS = 0.05
"""The shortest timing window: small steps are timed in windows of more steps."""
MAX_WINDOW_STEPS = 256
"""The most steps of a timing window."""
TRIAL_ROUNDS = 3
"""Windows per count in a trial, alternated with the others' (the median of their step times
counts: one window that a passing change of conditions made fast or slow does not decide)."""
MARGIN = 0.95
"""Another count wins a trial only where its step time is below this fraction of the
count in use's: noise alone does not move the count."""
SLOWDOWN = 1.3
"""A window's step time this many times the count's in the last trial starts a trial."""
FIRST_TRIAL_SECONDS = 1.0
"""The first trial after this many seconds of steps (compilation and warm-up first)."""
MIN_WAIT_SECONDS = 2.0
"""Seconds of steps before the next trial after one that changed the count; the least wait
between trials."""
MAX_WAIT_SECONDS = 64.0
"""The longest wait (seconds of steps) between trials that keep all threads."""
MAX_REDUCED_WAIT_SECONDS = 8.0
"""The longest wait (seconds of steps) between trials while fewer threads run."""

_STATE = {"mode": None, "governors": False}  # governors: whether any thread made one
_LOCAL = threading.local()


def _env_mode() -> str:
    from backprop import checks

    return checks.env_choice("BACKPROP_THREADS", MODES, "fixed")


def _mode_at_import():
    """The mode ``BACKPROP_THREADS`` sets, or None where it holds no mode (:func:`mode`
    then reads it again, and refuses it)."""
    try:
        return _env_mode()
    except ValueError:
        return None


_STATE["mode"] = _mode_at_import()
ENGAGED = [_STATE["mode"] != "fixed"]
"""``[bool]``: whether ``Optimizer.step`` calls :func:`tick` (the mode is ``adaptive``, a
governor may have threads to hand back, or ``BACKPROP_THREADS`` holds a value to refuse):
under ``fixed`` a step then costs one list lookup more."""


def mode() -> str:
    """``fixed`` or ``adaptive`` (``BACKPROP_THREADS`` as read at import, or
    :func:`set_mode`); ``ValueError`` where the variable holds neither."""
    current = _STATE["mode"]
    if current is None:
        current = _STATE["mode"] = _env_mode()
    return current


def set_mode(value: str) -> None:
    """Set the mode for every thread (``fixed`` or ``adaptive``); a thread's governor
    applies it at that thread's next step (``fixed``: its threads and OpenBLAS's back)."""
    value = str(value).strip().lower()
    if value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {value!r}")
    _STATE["mode"] = value
    ENGAGED[0] = value == "adaptive" or _STATE["governors"]


def _numba_threads() -> int:
    from backprop.kernels import matmul

    return matmul.threads()


def _set_numba_threads(count: int) -> None:
    import numba

    numba.set_num_threads(count)


def _set_blas_ceiling(owner, count) -> None:
    from backprop import blas

    blas.set_ceiling(owner, count)


class _DefaultApply:
    """A governor's setter: the calling thread's Numba threads and, below all of them,
    OpenBLAS's ceiling under the governor's token."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, count: int, top: int, numba_too: bool = True) -> None:
        if numba_too:
            _set_numba_threads(count)
        _set_blas_ceiling(self.owner, count if count < top else None)


class Governor:
    """One thread's governor (see the module's docstring) for ``top`` threads at most.
    ``apply(count, top, numba_too=True)`` sets the thread count, ``clock()`` reads the time,
    ``threads()`` the count in use (injectable for tests: the defaults are Numba's and
    OpenBLAS's setters and ``time.perf_counter``)."""

    def __init__(self, top: int, clock=time.perf_counter, apply=None, threads=None):
        self.clock = clock
        self._threads = threads if threads is not None else _numba_threads
        if apply is None:
            # OpenBLAS's ceiling is keyed by a token, not by this object, so that a thread
            # that ends while its governor holds one gives it back when the governor goes
            # (not at exit: OpenBLAS's count no longer matters then)
            owner = object()
            weakref.finalize(self, _set_blas_ceiling, owner, None).atexit = False
            apply = _DefaultApply(owner)
        self._apply_count = apply
        self._reset(top)

    def _reset(self, top: int) -> None:
        self.top = max(1, int(top))
        self.ladder = sorted({self.top, self.top - 1, self.top // 2, 1} - {0}, reverse=True)
        self.current = self.top
        self.last = None  # when the last step ended
        self.skip = True  # the next step is not timed (the first; the one in flight at a change)
        self.times: list[float] = []  # this window's step times
        self.window_steps = WINDOW_STEPS
        self.elapsed = 0.0  # seconds of timed steps (the trials' schedule: pauses do not count)
        self.plan: list[int] = []  # the trial's counts still to run, one window each
        self.kept = self.top  # the count in use when the running trial started
        self.results: dict[int, list[float]] = {}  # count -> its windows' step times, this trial
        self.reference: dict[int, float] = {}  # count -> its step time in the last trial
        self.next_trial = None
        self.wait = MIN_WAIT_SECONDS
        self.last_trial = None
        self.trials = 0
        self.changes = 0

    def _set(self, count: int) -> None:
        if count != self.current:
            self._apply_count(count, self.top)
            self.current = count
            self.skip = True  # (the step in flight ran partly on the old count)

    def release(self) -> None:
        """Hand the threads back (all of them, OpenBLAS's ceiling ended)."""
        if self.current != self.top:
            self._apply_count(self.top, self.top)
            self.current = self.top

    def tick(self) -> None:
        """One step done: time it; at the end of a window (the median of its step times, so
        that a pause between two steps, such as an evaluation, a checkpoint or a stopped
        process, weighs as one slow step), run the trial's next window or decide whether
        to start one."""
        now = self.clock()
        last, self.last = self.last, now
        if self.skip:
            self.skip = False
            return
        times = self.times
        times.append(now - last)
        if len(times) < self.window_steps:
            return
        step_time = statistics.median(times)
        self.elapsed += step_time * len(times)
        times.clear()
        self.window_steps = min(MAX_WINDOW_STEPS, max(
            WINDOW_STEPS,
            int(WINDOW_SECONDS / step_time) + 1 if step_time > 0 else MAX_WINDOW_STEPS))
        now = self.elapsed  # the schedule runs on the steps' time: pauses do not count
        if self.next_trial is None:
            self.next_trial = now + FIRST_TRIAL_SECONDS
        if self._threads() != self.current:  # someone else set the thread count: start over
            if self.current != self.top:
                self._apply_count(self.top, self.top, numba_too=False)
            self._reset(self._threads())
            return
        if self.plan:  # a trial runs
            self._trial_window(step_time, now)
            return
        reference = self.reference.get(self.current)
        slow = reference is not None and step_time > SLOWDOWN * reference and (
            self.last_trial is None or now - self.last_trial >= MIN_WAIT_SECONDS)
        if (now >= self.next_trial or slow) and len(self.ladder) > 1:
            self._start_trial(step_time)

    def _start_trial(self, step_time: float) -> None:
        i = self.ladder.index(self.current)
        neighbours = [c for c in self.ladder[max(0, i - 1):i + 2] if c != self.current]
        self.kept = self.current
        self.results = {self.current: [step_time]}  # the window just timed is its first
        # (the current count's last window is left out: its first is the one just timed)
        self.plan = ((neighbours + [self.current]) * TRIAL_ROUNDS)[:-1]
        self.trials += 1
        self._set(self.plan[0])

    def _trial_window(self, step_time: float, now: float) -> None:
        count = self.plan.pop(0)
        self.results.setdefault(count, []).append(step_time)
        if self.plan:
            self._set(self.plan[0])
            return
        times = {c: statistics.median(t) for c, t in self.results.items()}
        kept = self.kept
        best = min(times, key=times.get)
        self.reference = times
        self.results = {}
        self.last_trial = now
        if best != kept and times[best] < MARGIN * times[kept]:
            self.changes += 1
            kept, self.wait = best, MIN_WAIT_SECONDS  # (the wait starts over)
        self._set(kept)
        self.next_trial = now + self.wait
        self.wait = min(2 * self.wait, MAX_WAIT_SECONDS if kept == self.top
                        else MAX_REDUCED_WAIT_SECONDS)


def _governor():
    """The calling thread's governor, made at its first step."""
    governor = getattr(_LOCAL, "governor", None)
    if governor is None:
        governor = _LOCAL.governor = Governor(_numba_threads())
        _STATE["governors"] = True
    return governor


def tick() -> None:
    """An optimizer's step on CPU parameters has ended (called by ``Optimizer.step``)."""
    current = _STATE["mode"] or mode()
    if current == "adaptive":
        _governor().tick()
    elif _STATE["governors"]:  # adaptive was switched off: hand the threads back
        governor = getattr(_LOCAL, "governor", None)
        if governor is not None:
            governor.release()
            _LOCAL.governor = None


def status() -> dict:
    """The calling thread's governor: ``{"mode", "threads", "top", "trials", "changes",
    "reference"}`` (``reference``: each count's step time in seconds in the last
    trial); ``threads`` None where it has not run."""
    governor = getattr(_LOCAL, "governor", None)
    if governor is None:
        return {"mode": mode(), "threads": None, "top": None, "trials": 0, "changes": 0,
                "reference": {}}
    return {"mode": mode(), "threads": governor.current, "top": governor.top,
            "trials": governor.trials, "changes": governor.changes,
            "reference": dict(governor.reference)}
