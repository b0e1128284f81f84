"""BLAS threads for a model's matrix products: no more than their size pays for.

Each Dense layer of a training step runs three matrix products (``X Wᵀ``, ``δᵀX``, ``δW``)
of ``N·in·out`` multiply-adds each. OpenBLAS splits every product above 2¹⁸ multiply-adds
across all its threads; for the products of a small MLP the second thread costs more in
waking and joining than it saves, and spinning between products it slows the step's other
work too (the whole-step measurements that set :data:`MACS_PER_THREAD` are in
``docs/design.md``). So :func:`threads_for` caps OpenBLAS at one thread per :data:`MACS_PER_THREAD` multiply-adds
of the largest product (at least one, never more than it is set to), and ``fit`` trains
inside it. The cap is set through threadpoolctl, which finds the OpenBLAS that NumPy loaded,
and only where that OpenBLAS runs its own pthreads pool (an OpenMP build shares its
thread-count setting with every OpenMP user of the thread, Numba's kernels among them; MKL
and other BLAS libraries are left alone).

The thread count of OpenBLAS is one setting for the whole process, while ``fit`` may run in
several threads at once: the caps of the ``fit`` calls in progress are kept in one
registry, the largest of them applies (no model is starved of the threads it pays for),
and the original count returns when the last one ends, whatever the order they end in.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["MACS_PER_THREAD", "largest_product", "threads_for"]

MACS_PER_THREAD = 1_500_000
"""Multiply-adds of the largest product per BLAS thread that ``fit`` lets OpenBLAS use."""

_state: dict = {}
_lock = threading.Lock()
_active: list[int] = []  # the caps of the threads_for blocks in progress, in any thread
_original: dict = {}  # the count OpenBLAS had before the first of them


def largest_product(model, batch_size: int) -> int:
    """Multiply-adds of the largest matrix product of ``model`` on a batch of
    ``batch_size`` rows: ``batch_size · in · out`` of its largest Dense layer (0 for none)."""
    from backprop.layers import Dense

    return max((batch_size * m.in_features * m.out_features for m in model.modules()
                if isinstance(m, Dense)), default=0)


def _openblas():
    """threadpoolctl's controller of the pthreads OpenBLAS libraries loaded here (None if
    there is none, or threadpoolctl cannot inspect this process)."""
    if "openblas" not in _state:
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController().select(internal_api="openblas")
            libraries = controller.lib_controllers
            pthreads = libraries and all(getattr(lib, "threading_layer", None) == "pthreads"
                                         for lib in libraries)
            _state["openblas"] = controller if pthreads else None
        except Exception:  # threadpoolctl's inspection failed: leave BLAS as it is
            _state["openblas"] = None
    return _state["openblas"]


def _apply(openblas) -> None:
    """Set OpenBLAS to the largest active cap (never above the original count), or back to
    the original count when no cap is active. Called with ``_lock`` held."""
    original = _original["threads"]
    count = min(max(_active), original) if _active else original
    for lib in openblas.lib_controllers:
        if lib.num_threads != count:
            lib.set_num_threads(count)


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
        if not _active:
            _original["threads"] = min(lib.num_threads for lib in openblas.lib_controllers)
        _active.append(wanted)
        _apply(openblas)
    try:
        yield
    finally:
        with _lock:
            _active.remove(wanted)
            _apply(openblas)
