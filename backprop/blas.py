"""BLAS threads for a model's matrix products: no more than their size pays for.

Each Dense layer of a training step runs three matrix products (``X Wᵀ``, ``δᵀX``, ``δW``)
of ``N·in·out`` multiply-adds each. OpenBLAS splits every product above 2¹⁸ multiply-adds
across all its threads; for the products of a small MLP the second thread costs more in
waking and joining than it saves, and spinning between products it slows the step's other
work too (the whole-step measurements that set :data:`MACS_PER_THREAD` are in
``docs/design.md``). So :func:`threads_for` caps OpenBLAS at one thread per :data:`MACS_PER_THREAD` multiply-adds
of the largest product (at least one, never more than it is set to), and ``fit`` trains
inside it. A forward or backward pass of a ``Sequential`` on the CPU outside ``fit`` (a
hand-written training loop, ``predict``) caps itself the same way for its own duration
(:func:`acquire` / :func:`release`, a few hundred nanoseconds each), so the fast setting is
the default everywhere and nothing changes for the caller's own NumPy code in between. The cap is set through threadpoolctl, which finds the OpenBLAS that NumPy loaded,
and only where that OpenBLAS runs its own pthreads pool (an OpenMP build shares its
thread-count setting with every OpenMP user of the thread, Numba's kernels among them; MKL
and other BLAS libraries are left alone). The first time it finds that OpenBLAS, it also
moves OpenBLAS's parallel jobs onto the threads of the fused kernels
(:mod:`backprop.blas_pool`), so that products and kernels share one pool.

The thread count of OpenBLAS is one setting for the whole process, while ``fit`` may run in
several threads at once: the caps of the ``fit`` calls in progress are kept in one
registry, the largest of them applies (no model is starved of the threads it pays for),
and the original count returns when the last one ends, whatever the order they end in.

Ceilings. :func:`set_ceiling` holds OpenBLAS at or below a count for as long as its owner
asks (:mod:`backprop.thread_governor`, while other programs keep cores busy): the smallest
ceiling applies over every cap, and the original count returns when the last cap and the
last ceiling have ended. A product's bits depend on OpenBLAS's thread count, so a ceiling
may change the rounding of the products run under it.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["MACS_PER_THREAD", "largest_product", "threads_for", "acquire", "release",
           "set_ceiling", "share_pool", "openblas_function"]

MACS_PER_THREAD = 1_500_000
"""Multiply-adds of the largest product per BLAS thread that ``fit`` lets OpenBLAS use."""

SINGLE_THREADED_MACS = 2**18
"""Products up to this many multiply-adds OpenBLAS runs on one thread by itself
(``GEMM_MULTITHREAD_THRESHOLD`` × 65536): no cap needed for a pass whose largest product is
no larger."""

_state: dict = {}
_UNKNOWN = object()  # _state has no "openblas" entry yet
_lock = threading.Lock()
_active: list[int] = []  # the caps of the threads_for blocks in progress, in any thread
_original: dict = {}  # the count OpenBLAS had before the first of them
_ceilings: dict = {}  # owner -> the most threads it lets OpenBLAS use (set_ceiling)


def largest_product(model, batch_size: int) -> int:
    """Multiply-adds of the largest matrix product of ``model`` on a batch of
    ``batch_size`` rows: ``batch_size · in · out`` of its largest Dense layer (0 for none)."""
    from backprop.layers import Dense

    return max((batch_size * m.in_features * m.out_features for m in model.modules()
                if isinstance(m, Dense)), default=0)


def _openblas():
    """``[(get, set), ...]``: the thread-count functions of each pthreads OpenBLAS library
    loaded here, found by threadpoolctl (None if there is none, or it cannot inspect this
    process). Called through ctypes directly: threadpoolctl's own setter costs more and,
    for a pthreads OpenBLAS, obeys only the first thread that called it."""
    if "openblas" not in _state:
        try:
            _state["openblas"] = _find_openblas()
        except Exception:  # threadpoolctl's inspection failed: leave BLAS as it is
            _state["openblas"] = None
        if _state["openblas"] is not None:
            from backprop import blas_pool

            blas_pool.install()  # OpenBLAS's jobs on the kernels' threads, where it can
    return _state["openblas"]


def openblas_function(dynlib, name: str):
    """The ctypes function ``name`` (``openblas_...``) of an OpenBLAS library under the
    symbol its build exports: plain, or SciPy's wheels' ``scipy_`` prefix with a ``64_`` /
    ``_64`` suffix for 64-bit integers; None if it has none of them."""
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            function = getattr(dynlib, f"{prefix}{name}{suffix}", None)
            if function is not None:
                return function
    return None


def share_pool() -> None:
    """Move OpenBLAS's parallel jobs onto the fused kernels' threads
    (:mod:`backprop.blas_pool`) where it can, as the first cap does; for a process whose
    products OpenBLAS does not run (:mod:`backprop.gemm` on MKL), so takes no cap."""
    _openblas()


def _find_openblas():
    from threadpoolctl import ThreadpoolController

    libraries = ThreadpoolController().select(internal_api="openblas").lib_controllers
    if not libraries or any(getattr(lib, "threading_layer", None) != "pthreads"
                            for lib in libraries):
        return None
    functions = []
    for lib in libraries:
        get = openblas_function(lib.dynlib, "openblas_get_num_threads")
        put = openblas_function(lib.dynlib, "openblas_set_num_threads")
        if get is None or put is None:
            return None
        functions.append((get, put))
    return functions


def _threads(openblas) -> int:
    if len(openblas) == 1:  # the usual case, without a generator (this is per pass)
        return openblas[0][0]()
    return min(get() for get, _ in openblas)


def _apply(openblas) -> None:
    """Set OpenBLAS to the largest active cap (never above the original count), or back to
    the original count when no cap is active, and at most the smallest ceiling
    (:func:`set_ceiling`). Called with ``_lock`` held; the count set
    last is remembered (nothing else changes it while a cap is active), so an unchanged
    count costs no call."""
    original = _original["threads"]
    count = min(max(_active), original) if _active else original
    if _ceilings:
        count = min(count, min(_ceilings.values()))
    if _original.get("now") != count:
        for _, put in openblas:
            put(count)
        _original["now"] = count


@contextlib.contextmanager
def threads_for(largest: int):
    """Within: OpenBLAS runs on at most ``max(1, largest // MACS_PER_THREAD)`` threads
    (``largest``: the multiply-adds of the largest product, see :func:`largest_product`),
    or on more where a concurrent block in another thread asked for more; the thread count
    it had is restored when the last block ends. Thread-safe."""
    openblas = _openblas()
    if openblas is None:
        yield
        return
    wanted = max(1, largest // MACS_PER_THREAD)
    with _lock:
        _remember_original(openblas)
        _active.append(wanted)
        _apply(openblas)
    try:
        yield
    finally:
        release(wanted)


def acquire(largest: int) -> int | None:
    """:func:`threads_for` without the context manager, for the hot path of a forward or
    backward pass: cap OpenBLAS for a product of ``largest`` multiply-adds and return the
    token to give :func:`release` afterwards (in a ``finally``), or None when nothing
    changes (no pthreads OpenBLAS; a product OpenBLAS runs on one thread anyway; the count
    already at or below the cap, e.g. inside a ``fit``; or a product large enough for
    every thread). Thread-safe."""
    if largest <= SINGLE_THREADED_MACS:
        return None
    openblas = _state.get("openblas", _UNKNOWN)
    if openblas is _UNKNOWN:
        openblas = _openblas()
    if openblas is None:
        return None
    wanted = largest // MACS_PER_THREAD or 1
    if _active and wanted <= max(_active):  # an active cap already covers it
        return None
    _lock.acquire()  # (not `with`: this runs twice per training step, and `with` costs more)
    try:
        if not _active:
            if _ceilings:  # OpenBLAS is held at a ceiling: a cap above it changes nothing
                if wanted >= _original["now"]:
                    return None
            else:  # the usual case (a pass outside fit, one thread): set it directly
                original = _threads(openblas)
                if wanted >= original:
                    return None
                _original["threads"] = original
                _active.append(wanted)
                for _, put in openblas:
                    put(wanted)
                _original["now"] = wanted
                return wanted
        _active.append(wanted)
        _apply(openblas)
    finally:
        _lock.release()
    return wanted


def release(token: int | None) -> None:
    """End the cap of :func:`acquire` (None: nothing to do); the count returns to what the
    remaining caps allow, or to the original count when none is left."""
    if token is None:
        return
    openblas = _state["openblas"]  # set by the acquire that returned the token
    _lock.acquire()
    try:
        _active.remove(token)
        if _active or _ceilings:
            _apply(openblas)
            return
        _restore(openblas)  # the usual case: the last cap ends
    finally:
        _lock.release()


def _remember_original(openblas) -> None:
    """Before the first cap or ceiling: note OpenBLAS's count, to restore after the last
    (``_lock`` held)."""
    if not _active and not _ceilings:
        _original["threads"] = _original["now"] = _threads(openblas)


def _restore(openblas) -> None:
    """OpenBLAS back to the count it had before the first cap or ceiling (``_lock`` held)."""
    original = _original["threads"]
    if _original["now"] != original:
        for _, put in openblas:
            put(original)
        _original["now"] = original


def set_ceiling(owner, count: int | None) -> None:
    """Hold OpenBLAS at no more than ``count`` threads (at least 1) for ``owner`` (any
    hashable key; None ends ``owner``'s ceiling), whatever the caps (:func:`threads_for`,
    :func:`acquire`) ask for; the smallest ceiling of all owners applies. Nothing happens
    where no pthreads OpenBLAS is loaded. Thread-safe."""
    openblas = _openblas()
    if openblas is None:
        return
    with _lock:
        if count is None:
            if _ceilings.pop(owner, None) is None:
                return
        else:
            _remember_original(openblas)
            _ceilings[owner] = max(1, int(count))
        if _active or _ceilings:
            _apply(openblas)
        else:
            _restore(openblas)
