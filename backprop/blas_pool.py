"""One thread pool for the matrix products and the fused kernels: OpenBLAS's parallel jobs
run on the OpenMP threads of Numba's kernels.

Why. On the CPU a training step alternates OpenBLAS products with Numba kernels, and each
library has its own threads. After a product, OpenBLAS's idle workers spin for up to 2²⁸
cycles (a tenth of a second) before they sleep; a parallel Numba kernel that runs in that
time shares a core with a spinning worker, and its half on that core runs at half speed or
less. On a 2-core machine, Adam over the 6.3 M parameters of a 1024-2048-2048-10 MLP took as
long right after a product as it does on one thread (benchmarks/README.md, "Threads and
spin-waiting", has the figures). XLA, which fuses the whole step, runs its products and its
elementwise work on one pool and never has the problem.

What. OpenBLAS (0.3.27 and later) lets the program run its parallel jobs:
``openblas_set_threads_callback_function(cb)`` makes it call ``cb(sync, dojob, numjobs,
elsize, jobdata, dojob_data)``, which must run ``dojob(i, jobdata + i·elsize, dojob_data)``
for every job ``i`` *at the same time* (the jobs of one product wait for each other's packed
panels, so run one after the other they would never finish). :func:`install` registers a
compiled callback (a Numba ``cfunc``) that runs them as one ``prange`` over the jobs, i.e.
on the OpenMP team that runs backprop's kernels, with exactly ``numjobs`` threads. OpenBLAS's
own workers are then never woken again, and the products and the kernels of a step take
turns on the same threads instead of fighting for the cores. The results are the same bits:
the jobs, and how OpenBLAS splits a product into them, do not change.

Where the shared pool cannot promise every job its own thread, the callback hands the jobs
to OpenBLAS's own workers instead: it clears the callback, calls OpenBLAS's ``exec_blas``
on the jobs (which then runs them as it did before :func:`install`) and puts the callback
back. That happens when the call comes from inside an OpenMP parallel region (a nested
region would run serially) and when OpenBLAS asks for more jobs than Numba has threads
(``NUMBA_NUM_THREADS``; e.g. after a caller raised OpenBLAS's thread count).
:func:`delegated_calls` counts those calls.

When it is installed. By :mod:`backprop.blas` the first time a forward or backward pass or
``fit`` asks for OpenBLAS's threads, where all of these hold (else nothing changes and
:func:`status` says why): ``BACKPROP_BLAS_POOL`` is not ``openblas``; the CPU kernels are
Numba's (``numba_cpu``) on its OpenMP threading layer (TBB's tasks do not promise that
all jobs run at once, and the workqueue layer allows one launch at a time); ``OMP_DYNAMIC``
is not set to true (an OpenMP runtime may then give a team fewer threads than asked for);
the OpenBLAS that NumPy loaded runs its own pthreads pool and has the callback; its
thread count is no more than Numba's; and its ``MAX_THREADS`` leaves room for job numbers
above its own threads (see ``_callback``). Only that one library is redirected (a SciPy
wheel's OpenBLAS, which Numba's own ``np.dot`` calls, keeps its workers). A child made by
``fork`` gets OpenBLAS's own workers back at once (an OpenMP runtime's threads do not
survive a fork).

Thread safety: the callback may be entered by any number of threads at once (the OpenMP
layer gives each calling thread its own team); :func:`install` and :func:`uninstall` take a
lock. The callback restores the calling thread's Numba thread count after each call.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from backprop.blas import openblas_function  # (blas imports this module only when it runs)

__all__ = ["install", "uninstall", "active", "status", "pool_calls", "delegated_calls"]

ENV = "BACKPROP_BLAS_POOL"
"""``numba`` (default): OpenBLAS's parallel jobs on Numba's threads where possible;
``openblas``: leave OpenBLAS's own pool alone."""

# Names under which the OpenBLAS and OpenMP functions the callback calls are registered with
# LLVM's symbol table (llvmlite.binding.add_symbol) before the callback is compiled or loaded
# from Numba's disk cache: the compiled code refers to them by name, so a cached copy links
# to this process's addresses.
_SYM_EXEC = "backprop_openblas_exec_blas"
_SYM_SET = "backprop_openblas_set_threads_callback"
_SYM_GET_THREADS = "get_num_threads"  # Numba's threading layer registers these two
_SYM_SET_THREADS = "set_num_threads"
_SYM_IN_PARALLEL = "backprop_omp_in_parallel"

_SYM_SHARED = "backprop_blas_pool_shared"
_SYM_NUM_THREADS = "backprop_openblas_blas_num_threads"  # OpenBLAS's int blas_num_threads

_lock = threading.Lock()
_state: dict = {"installed": None, "status": "not tried", "callback": None}
# Read and written by the compiled callback through _SYM_SHARED (a global array would be
# frozen into the machine code, and a cached copy would keep another process's values):
# [0] Numba's pool size, [1] calls run on the pool, [2] calls handed to OpenBLAS's workers,
# [3] the callback's address (to put back after a handed-over call), [4] OpenBLAS's
# MAX_THREADS, [5:] one flag per slot of job numbers (see _callback)
_SLOTS = 16
_SHARED = (ctypes.c_int64 * (5 + _SLOTS))()


def _external(name, ret, args):
    """An LLVM declaration of the registered symbol ``name`` in the current module."""
    def declare(builder):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)
    return declare


_I32, _I64, _VOIDP = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()


@intrinsic
def _run_job(typingctx, dojob, thread, job, data):
    """``dojob(thread, job, data)``: OpenBLAS's job function, called through its address."""
    def codegen(context, builder, signature, args):
        fn, t, j, d = args
        fnty = ir.FunctionType(ir.VoidType(), [_I32, _VOIDP, _I32])
        builder.call(builder.inttoptr(fn, fnty.as_pointer()),
                     [t, builder.inttoptr(j, _VOIDP), d])
        return context.get_dummy_value()
    return types.void(types.intp, types.int32, types.intp, types.int32), codegen


@intrinsic
def _in_parallel(typingctx):
    """``omp_in_parallel()`` of the OpenMP runtime under Numba's threads."""
    def codegen(context, builder, signature, args):
        fn = _external(_SYM_IN_PARALLEL, _I32, [])(builder)
        return builder.call(fn, [])
    return types.int32(), codegen


@intrinsic
def _own_pool(typingctx, numjobs, queue):
    """OpenBLAS's own ``exec_blas(numjobs, queue)`` with the callback cleared for the call
    and put back after it (a product another thread starts meanwhile runs on OpenBLAS's
    own workers too, which is how it ran before :func:`install`; after :func:`uninstall`
    the address put back is 0, none)."""
    def codegen(context, builder, signature, args):
        set_cb = _external(_SYM_SET, ir.VoidType(), [_VOIDP])(builder)
        execute = _external(_SYM_EXEC, _I32, [_I64, _VOIDP])(builder)
        builder.call(set_cb, [ir.Constant(_VOIDP, None)])
        builder.call(execute, [args[0], builder.inttoptr(args[1], _VOIDP)])
        own = builder.load(_shared_slot(builder, _I64(3)))
        builder.call(set_cb, [builder.inttoptr(own, _VOIDP)])
        return context.get_dummy_value()
    return types.void(types.int64, types.intp), codegen


@intrinsic
def _team_size(typingctx, count):
    """Set the calling thread's Numba thread count (Numba's own ``set_num_threads`` C
    function, called by name) and return the count it had."""
    def codegen(context, builder, signature, args):
        get = _external(_SYM_GET_THREADS, _I32, [])(builder)
        put = _external(_SYM_SET_THREADS, ir.VoidType(), [_I32])(builder)
        before = builder.call(get, [])
        builder.call(put, [args[0]])
        return before
    return types.int32(types.int32), codegen


@intrinsic
def _shared(typingctx, index):
    """``_SHARED[index]`` (read at run time, not frozen at compile time)."""
    def codegen(context, builder, signature, args):
        return builder.load(_shared_slot(builder, args[0]))
    return types.int64(types.intp), codegen


@intrinsic
def _count(typingctx, index):
    """Add one to ``_SHARED[index]`` (atomically: calls may come from several threads)."""
    def codegen(context, builder, signature, args):
        builder.atomic_rmw("add", _shared_slot(builder, args[0]), _I64(1), "monotonic")
        return context.get_dummy_value()
    return types.void(types.intp), codegen


def _external_global(builder, name, type_):
    """An LLVM declaration of the registered data symbol ``name`` in the current module."""
    module = builder.module
    try:
        return module.get_global(name)
    except KeyError:
        var = ir.GlobalVariable(module, type_, name)
        var.linkage = "external"
        return var


def _shared_slot(builder, index):
    slot = _external_global(builder, _SYM_SHARED, ir.ArrayType(_I64, len(_SHARED)))
    return builder.gep(slot, [_I32(0), index])


@intrinsic
def _claim(typingctx, slot):
    """Take slot ``slot`` if it is free (an atomic compare-and-swap of its flag 0 → 1)."""
    def codegen(context, builder, signature, args):
        pair = builder.cmpxchg(_shared_slot(builder, builder.add(args[0], _I64(5))), _I64(0),
                               _I64(1), "acq_rel", "monotonic")
        return builder.extract_value(pair, 1)
    return types.boolean(types.intp), codegen


@intrinsic
def _release(typingctx, slot):
    """Free slot ``slot`` (an atomic store of 0, after the jobs that used it)."""
    def codegen(context, builder, signature, args):
        builder.store_atomic(_I64(0), _shared_slot(builder, builder.add(args[0], _I64(5))),
                             "release", 8)
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def _openblas_threads(typingctx):
    """OpenBLAS's ``blas_num_threads``: its own workers are numbered below it."""
    def codegen(context, builder, signature, args):
        var = _external_global(builder, _SYM_NUM_THREADS, _I32)
        return builder.sext(builder.load_atomic(var, "monotonic", 4), _I64)
    return types.int64(), codegen


def _jobs_on_pool(dojob, numjobs, elsize, jobdata, dojob_data, first):
    """Every job at once, one per thread of a team of exactly ``numjobs`` threads; job ``i``
    runs as OpenBLAS's thread number ``first + i``."""
    for i in numba.prange(numjobs):
        _run_job(dojob, np.int32(first + i), jobdata + i * elsize, dojob_data)


def _callback(sync, dojob, numjobs, elsize, jobdata, dojob_data):
    """OpenBLAS's threads callback (see the module docstring).

    OpenBLAS's job function takes a thread number and, under it, marks a status word and
    keeps a packing buffer, both its own workers' (numbered below ``blas_num_threads``): the
    jobs of one call get numbers above those, and concurrent calls (other threads multiplying
    at the same time) different ones, one of :data:`_SLOTS` blocks of ``pool`` numbers
    each, within OpenBLAS's ``MAX_THREADS``; with no block free, OpenBLAS's workers run the
    call."""
    if numjobs <= 0:
        return
    pool = _shared(0)
    slot = -1
    if numjobs <= pool and _in_parallel() == 0:
        base = _openblas_threads()
        for k in range(_SLOTS):
            if base + (k + 1) * pool > _shared(4):
                break
            if _claim(k):
                slot = k
                break
    if slot < 0:
        _count(2)
        _own_pool(np.int64(numjobs), jobdata)
        return
    _count(1)
    before = _team_size(numjobs)
    _jobs_on_pool_compiled(dojob, numjobs, elsize, jobdata, dojob_data, base + slot * pool)
    _team_size(before)
    _release(slot)


_POOL_THREADS = numba.config.NUMBA_NUM_THREADS
# void cb(int sync, dojob, int numjobs, size_t elsize, void *jobdata, int dojob_data);
# elsize as a signed intp: intp + uint64 arithmetic would promote to float64 in Numba
_CALLBACK_SIG = types.void(types.int32, types.intp, types.int32, types.intp, types.intp,
                           types.int32)
_jobs_on_pool_compiled = None  # compiled by _compile, after the symbols are registered


def _compile():
    """The callback's address: compiled (or loaded from Numba's cache) once per process."""
    global _jobs_on_pool_compiled
    if _state["callback"] is None:
        _jobs_on_pool_compiled = numba.njit(parallel=True, nogil=True, cache=True)(_jobs_on_pool)
        _state["callback"] = numba.cfunc(_CALLBACK_SIG, cache=True)(_callback)
    return _state["callback"].address


def _numpy_openblas():
    """``(dynlib, setter, threads, max_threads)`` of the pthreads OpenBLAS that NumPy loaded
    (its callback setter, thread count and build's ``MAX_THREADS``), or a string saying why
    there is none to redirect."""
    from threadpoolctl import ThreadpoolController

    libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    ours = [lib for lib in libs if os.path.basename(os.path.dirname(lib.filepath)) == "numpy.libs"
            and os.path.dirname(os.path.dirname(lib.filepath)) == numpy_dir]
    if len(ours) != 1:
        ours = libs if len(libs) == 1 else []
    if not ours:
        return "no OpenBLAS that is NumPy's alone (found %d OpenBLAS libraries)" % len(libs)
    lib = ours[0]
    if getattr(lib, "threading_layer", None) != "pthreads":
        return f"OpenBLAS runs on {getattr(lib, 'threading_layer', '?')}, not its own pthreads"
    setter = openblas_function(lib.dynlib, "openblas_set_threads_callback_function")
    if setter is None or getattr(lib.dynlib, "exec_blas", None) is None:
        return f"OpenBLAS {lib.version} has no threads callback (0.3.27 and later have it)"
    setter.argtypes, setter.restype = [ctypes.c_void_p], None
    config = openblas_function(lib.dynlib, "openblas_get_config")
    if config is None:
        return "OpenBLAS does not say its MAX_THREADS (no openblas_get_config)"
    config.restype = ctypes.c_char_p
    match = re.search(r"MAX_THREADS=(\d+)", (config() or b"").decode("ascii", "replace"))
    if match is None:
        return "OpenBLAS does not say its MAX_THREADS (openblas_get_config)"
    return lib.dynlib, setter, lib.num_threads, int(match.group(1))


def _omp_in_parallel_address():
    from numba.np.ufunc import omppool

    return ctypes.cast(ctypes.CDLL(omppool.__file__).omp_in_parallel, ctypes.c_void_p).value


def _opted_out() -> bool:
    """``BACKPROP_BLAS_POOL=openblas`` (also read, before this module can be imported, by
    ``backprop.kernels`` to choose the OpenMP wait policy)."""
    return os.environ.get(ENV, "numba").strip().lower() == "openblas"


def _why_not() -> str | None:
    """None where Numba's side allows a shared pool, else the reason it does not (the layer
    must have started: :func:`install` starts it)."""
    from backprop import kernels as K

    if K.backend_name("cpu") != "numba_cpu":
        return f"the CPU kernels are {K.backend_name('cpu')}, not numba_cpu"
    if os.environ.get("OMP_DYNAMIC", "").strip().lower() in ("true", "1", "yes"):
        return "OMP_DYNAMIC is set: a team may get fewer threads than jobs"
    try:
        layer = numba.threading_layer()
    except ValueError:
        return "Numba's threading layer has not started"
    if layer != "omp":
        return f"Numba's threading layer is {layer}, not omp"
    return None


def _start_layer():
    """Launch one parallel Numba function, so the threading layer is chosen and started."""
    from backprop.kernels import numba_cpu

    numba_cpu.run_parallel(_layer_probe, np.zeros(2))


@numba.njit(parallel=True, cache=True)
def _layer_probe(a):
    for i in numba.prange(a.size):
        a[i] = i


def install() -> bool:
    """Run OpenBLAS's parallel jobs on Numba's OpenMP threads where the conditions of the
    module docstring hold; True if installed (now or before). Idempotent, thread-safe."""
    with _lock:
        if _state["installed"] is not None:
            return _state["installed"] is not False
        _state["installed"] = False
        try:
            reason = f"{ENV}=openblas" if _opted_out() else None
            if reason is None:
                _start_layer()
                reason = _why_not()
            found = _numpy_openblas() if reason is None else reason
            if isinstance(found, str):
                _state["status"] = f"not installed: {found}"
                return False
            dynlib, setter, threads, max_threads = found
            if threads > _POOL_THREADS:
                _state["status"] = (f"not installed: OpenBLAS has {threads} threads, Numba "
                                    f"{_POOL_THREADS}")
                return False
            if threads + _POOL_THREADS > max_threads:  # no block of job numbers would fit
                _state["status"] = (f"not installed: OpenBLAS's MAX_THREADS={max_threads} "
                                    f"leaves no job numbers above its {threads} threads")
                return False
            llvm.add_symbol(_SYM_EXEC, ctypes.cast(dynlib.exec_blas, ctypes.c_void_p).value)
            llvm.add_symbol(_SYM_SET, ctypes.cast(setter, ctypes.c_void_p).value)
            llvm.add_symbol(_SYM_IN_PARALLEL, _omp_in_parallel_address())
            _SHARED[0], _SHARED[4] = _POOL_THREADS, max_threads
            llvm.add_symbol(_SYM_NUM_THREADS, ctypes.addressof(
                ctypes.c_int.in_dll(dynlib, "blas_num_threads")))
            llvm.add_symbol(_SYM_SHARED, ctypes.addressof(_SHARED))
            address = _compile()
            _SHARED[3] = address
        except Exception as exc:  # an unexpected build: OpenBLAS keeps its own pool
            _state["status"] = f"not installed: {type(exc).__name__}: {exc}"
            return False
        setter(address)
        from backprop.kernels import numba_cpu

        # the workers that ran a product are awake: smaller kernels pay for two threads
        numba_cpu.PARALLEL_MIN_ELEMENTS = numba_cpu.PARALLEL_MIN_ELEMENTS_SHARED_POOL
        _state.update(installed=setter, status="installed: OpenBLAS's parallel jobs run on "
                      f"Numba's OpenMP threads (at most {_POOL_THREADS} at once)")
        return True


def uninstall() -> None:
    """Give OpenBLAS its own pool back (its workers wake on the next parallel product);
    :func:`install` may install again. Thread-safe."""
    with _lock:
        setter = _state["installed"]
        if setter:
            _SHARED[3] = 0  # a handed-over call in flight puts back no callback
            setter(None)
            from backprop.kernels import numba_cpu

            numba_cpu.PARALLEL_MIN_ELEMENTS = numba_cpu.PARALLEL_MIN_ELEMENTS_OWN_POOLS
            _state["status"] = "uninstalled"
        _state["installed"] = None


def active() -> bool:
    """Whether OpenBLAS's parallel jobs run on Numba's threads now."""
    return bool(_state["installed"])


def status() -> str:
    """What :func:`install` did, and why not where it did not."""
    return _state["status"]


def pool_calls() -> int:
    """Parallel products run on Numba's threads in this process so far."""
    return int(_SHARED[1])


def delegated_calls() -> int:
    """Parallel products the callback handed to OpenBLAS's own workers (see the module
    docstring) in this process so far."""
    return int(_SHARED[2])


def _after_fork_in_child() -> None:
    setter = _state["installed"]
    if setter:
        _SHARED[3] = 0
        setter(None)
    _state.update(installed=None, status="uninstalled in a forked child")


os.register_at_fork(after_in_child=_after_fork_in_child)
