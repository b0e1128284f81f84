"""What backprop shares between threads, and how each shared thing is kept safe.

The contract (also in the README, *Threads*):

- **Inference is thread-safe.** ``model.predict``, ``model.evaluate``, ``model(x)`` and
  ``loss.forward`` may run on one model (and one loss object) from any number of threads at
  once, each getting exactly the result it would get alone. Each thread has its own
  reused buffers and its own saved tensors on every layer and loss (:class:`PerThread`), and
  inference never touches the shared ``training`` flags: it runs in :func:`inference_mode`,
  a per-thread override of them.
- **Different models train in parallel.** Any number of threads may train *different*
  models at once, with results identical to training each alone. The kernels keep their
  scratch memory per thread (per thread and stream on a GPU).
- **One model trains in one thread.** Training updates the parameters in place, so two
  threads training one model would mix their updates. ``fit`` claims the model's parameters
  and its optimizer for its whole run (:func:`exclusive_training`); a second ``fit`` on any
  of them, from any thread, or a concurrent ``optimizer.step()`` from another thread, raises
  :class:`ConcurrentTrainingError` before doing any work. A hand-written training loop is
  the user's own: run it in one thread per model.
- **Not synchronised** (the user's to order): ``predict`` on a model while another thread
  trains it or moves it (``model.to``, ``load_state_dict``) reads the weights as they are
  at each moment, possibly mid-update; callbacks, metrics objects and optimizers passed to
  two concurrent ``fit`` calls are shared by them (``fit`` copies metric objects, not
  callbacks).

Process-wide settings (``set_device``, ``set_dtype``, ``kernels.set_backend``) are meant to
be made once at start-up; ``use_device`` is per thread. The BLAS thread cap of ``fit``
(:mod:`backprop.blas`) is process-wide and reference-counted across threads.
"""
from __future__ import annotations

import contextlib
import threading

from backprop.backend import empty_aligned, get_array_module

__all__ = ["ConcurrentTrainingError", "PerThread", "WithPerThread", "inference_mode",
           "targets_validated", "exclusive_training"]

_BUFFERS_KEPT = 12  # per object and thread: a few names × (full batch, last partial batch)


class ConcurrentTrainingError(RuntimeError):
    """A model (or one of its parameters, or its optimizer) is already being trained by a
    ``fit`` call; training one model from two threads at once would mix their updates."""


class PerThread(threading.local):
    """What a layer or loss keeps between its forward and backward passes, one copy per
    thread: ``buffers`` (reused output and work arrays, keyed by name and shape) and the
    tensors saved for backward (set as attributes by ``forward``). Reading a saved tensor
    that this thread's ``forward`` has not set raises a clear ``RuntimeError``."""

    def __init__(self, owner: str = "layer"):
        # threading.local runs __init__ again, with these arguments, in each new thread
        self.buffers = {}
        self.runs = {}  # prepared kernel calls (backprop.kernels.prepare), by call site
        self._owner = owner

    def __getattr__(self, name):
        # called only for an attribute that this thread has not set
        if name.startswith("_"):
            raise AttributeError(name)
        raise RuntimeError(f"{self._owner}: backward() needs what forward() saved in the same "
                           f"thread ({name!r}), and this thread has not run forward(): call "
                           "forward() first, in this thread")


class WithPerThread:
    """Mixin for objects that keep a :class:`PerThread` in ``self._ctx`` (layers, losses):
    :meth:`_buffer` hands out this thread's reused arrays, and a copy or an unpickled object
    starts with an empty context of its own (a ``threading.local`` can be neither pickled
    nor shared by copies)."""

    def _buffer(self, name: str, shape, like, dtype=None):
        """A reusable array ``name`` of ``shape`` (device of ``like``; dtype ``dtype``, or
        ``like``'s), this thread's own; the oldest is dropped beyond ``_BUFFERS_KEPT``."""
        cache = self._ctx.buffers
        dtype = like.dtype if dtype is None else dtype
        key = (name, tuple(shape), dtype)
        buf = cache.get(key)
        if buf is None:
            if len(cache) >= _BUFFERS_KEPT:
                cache.pop(next(iter(cache)))
            buf = cache[key] = empty_aligned(get_array_module(like), shape, dtype)
        return buf

    def __getstate__(self):
        state = dict(vars(self))
        state.pop("_ctx", None)
        return state

    def __setstate__(self, state):
        vars(self).update(state)
        self._ctx = PerThread(type(self).__name__)


class _Mode(threading.local):
    """Per-thread switches (class attributes are the defaults every thread starts with)."""

    eval = False          # inside inference_mode(): layers behave as in eval()
    targets_valid = False  # inside targets_validated(): skip per-call target checks
    autocast = None       # inside autocast(): the PrecisionRequest (backprop.precision)


_MODE = _Mode()


@contextlib.contextmanager
def _switched(name: str, value: bool):
    before = getattr(_MODE, name)
    setattr(_MODE, name, value)
    try:
        yield
    finally:
        setattr(_MODE, name, before)


def inference_mode(enabled: bool = True):
    """Within, in this thread only, every layer behaves as in ``eval()`` mode (Dropout is
    the identity, BatchNorm uses its running statistics), whatever its ``training`` flag;
    other threads are not affected. ``predict`` and ``evaluate`` run inside it, and ``fit``
    runs with it disabled. Nestable."""
    return _switched("eval", bool(enabled))


def targets_validated():
    """Within, in this thread only, losses skip their per-call target checks (NaN, label
    type and range: a host sync each): for callers that validated the whole data set."""
    return _switched("targets_valid", True)


_claims_lock = threading.Lock()


@contextlib.contextmanager
def exclusive_training(params, optimizer=None, who: str = "fit"):
    """Claim ``params`` and ``optimizer`` (if not None) for the calling thread for the
    block, or raise :class:`ConcurrentTrainingError` (claiming nothing) when any of them is
    already claimed, by another thread or by an enclosing ``fit`` of this one."""
    me = threading.current_thread()
    claimed = [*params] + ([] if optimizer is None else [optimizer])
    with _claims_lock:
        for obj in claimed:
            owner = getattr(obj, "_trainer", None)  # the thread whose fit holds it
            if owner is None:
                continue
            what = f"parameter {obj.name!r}" if obj is not optimizer else \
                f"the optimizer {type(optimizer).__name__}"
            if owner is me:
                raise ConcurrentTrainingError(
                    f"{who}: {what} is already being trained by a fit() running in this "
                    "thread (a fit() called from a callback?): train a model with one fit at "
                    "a time")
            raise ConcurrentTrainingError(
                f"{who}: {what} is already being trained by a fit() in thread "
                f"{owner.name!r}: one model trains in one thread at a time (wait for that fit "
                "to return, or train a copy of the model)")
        for obj in claimed:
            obj._trainer = me
    try:
        yield
    finally:
        with _claims_lock:
            for obj in claimed:
                obj._trainer = None
