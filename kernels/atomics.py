"""Atomic counters and a spin-wait for the threads of one Numba parallel region (compiled code
only; ``backprop.inference`` runs a whole small-batch forward pass in one region with them).

Numba's CPU target has no atomics; these are LLVM's, as intrinsics on an ``int64`` array
(compiled code only, so the two intrinsics are described here):

- ``fetch_add`` ``(counters, i)``: ``counters[i] += 1`` as one atomic read-modify-write,
  returning the value before (sequentially consistent: the writes a thread made before it
  are seen by any thread that reads the new value with ``load_acquire``);
- ``load_acquire`` ``(counters, i)``: ``counters[i]``, read atomically with acquire order
  (never hoisted out of a loop, and no later read moves before it);
- :func:`wait_until` ``(counters, i, target)``: spin until ``counters[i] >= target``, with
  the CPU's pause hint for the first :data:`SPINS` rounds, then giving the core away on each
  round (``sched_yield``; ``SwitchToThread`` on Windows): a thread waits on a partner that
  is running, for microseconds, but must not starve one the OS has descheduled.

:data:`AVAILABLE` is False (and :data:`REASON` says why) where the yield call could not be
found: nothing may then wait. Reading a counter that other threads write only through these
functions is safe; plain reads and writes of it while a region runs are data races.
"""
from __future__ import annotations

import ctypes
import platform
import sys

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["AVAILABLE", "REASON", "SPINS", "fetch_add", "load_acquire", "wait_until"]

SPINS = 2048
"""Pause-hinted spins before a waiting thread starts yielding its core on every round (about
0.1 ms on current x86 cores, whose pause takes ~100 cycles; far longer than a partner in the
same region needs for its block of work)."""

_SYMBOL = "backprop_atomics_yield"  # the OS's yield, registered with LLVM under this name
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _yield_address() -> tuple[int | None, str]:
    try:
        if sys.platform == "win32":
            fn = ctypes.windll.kernel32.SwitchToThread  # type: ignore[attr-defined]
        else:
            fn = ctypes.CDLL(None).sched_yield
        return ctypes.cast(fn, ctypes.c_void_p).value, ""
    except (OSError, AttributeError) as error:
        return None, f"no thread-yield call found ({error})"


_ADDRESS, REASON = _yield_address()
REASON: str
"""Why :data:`AVAILABLE` is False (empty where it is True)."""
AVAILABLE = _ADDRESS is not None
"""Whether :func:`wait_until` can run (the OS's yield call was found)."""
if AVAILABLE:
    # by symbol, not by a constant address in the machine code: Numba's disk cache keeps
    # the code of functions that call it, and the address changes between processes
    llvm.add_symbol(_SYMBOL, _ADDRESS)


def _pointer(context, builder, arytype, ary, index):
    array = context.make_array(arytype)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, arytype, array, [index])


def _typed(counters, i) -> bool:
    return (isinstance(counters, types.Array) and counters.ndim == 1
            and counters.dtype == types.int64 and counters.mutable
            and isinstance(i, types.Integer))


@intrinsic
def fetch_add(typingctx, counters, i):
    """``counters[i] += 1`` atomically; the value before. ``counters``: a writable 1-D
    ``int64`` array (``i`` is not bounds-checked)."""
    if not _typed(counters, i):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "seq_cst")
    return types.int64(counters, i), codegen


@intrinsic
def load_acquire(typingctx, counters, i):
    """``counters[i]``, read atomically with acquire order."""
    if not _typed(counters, i):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(counters, i), codegen


@intrinsic
def _pause(typingctx):
    """The CPU's spin-loop hint (x86 ``pause``; nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _yield(typingctx):
    """Give the core to another thread (the OS's call registered as :data:`_SYMBOL`)."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), _SYMBOL)
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@njit(nogil=True, cache=True)
def wait_until(counters, i, target):
    """Return once ``counters[i] >= target`` (read with ``load_acquire``)."""
    spins = 0
    while load_acquire(counters, i) < target:
        if spins < SPINS:
            spins += 1
            _pause()
        else:
            _yield()
