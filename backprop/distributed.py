"""Process groups for data-parallel training: who this process is, how many there are, and
the collectives between them, on standard engines only (MPI through mpi4py between
processes; NCCL through CuPy between GPUs).

Start every process the same way (``mpiexec -n 4 python train.py``, or with the launcher's
host file on a cluster) and call::

    import backprop as bp
    bp.distributed.init()          # reads the MPI launcher's environment
    model.fit(X, y, batch_size=256, ...)   # the same call as on one process

Without a launcher, ``init()`` makes a one-process group and never imports mpi4py, so a
script runs unchanged on a laptop. ``import backprop`` never imports mpi4py.

The collectives (for users' own loops; ``fit`` uses them itself):

- :func:`allreduce` ``(array, op="sum" | "mean")``: in place on a C-contiguous NumPy or
  CuPy array (returns it), or on a Python number (returns the reduced float);
- :func:`broadcast` ``(array, root=0)``: in place; :func:`broadcast_object`,
  :func:`allgather_object` for small Python objects (pickled by mpi4py: send only what you
  would trust from your own processes);
- :func:`barrier`.

Transports. Host arrays go through MPI. CuPy arrays go through NCCL when it is usable (the
unique id is exchanged over MPI; one GPU per rank, ``cuda:{local_rank % GPUs}``), else
explicitly through the host: copied to host memory, reduced over MPI, copied back, and
:func:`info` says ``"mpi (host-staged)"`` with the reason. CUDA-aware MPI is not assumed.

Faults (MPI abort semantics): after the processes have agreed to start training, an
exception on one rank (bad data in its shard, a callback that raises, a full disk on rank 0)
would leave the others waiting in a collective for ever. :func:`abort_on_error` — used by
``fit`` and the CLI — prints the failing rank's traceback to stderr and calls
``MPI_Abort``, which ends every process of the job with a non-zero exit status. A process
that is killed ends the job the same way (the launcher's behaviour: MPICH's hydra and
Open MPI both end the job when one process dies abnormally). Before that point, errors are
agreed on (:func:`agree`): every rank learns which rank failed and why, and raises, so a bad
argument gives one clean error, not N-1 hangs.

Threads: a group's collectives must be called in the same order on every rank, so they are
made by one thread per process; ``fit`` holds the group for its run and a second concurrent
distributed ``fit`` in the same process raises
:class:`~backprop.concurrency.ConcurrentTrainingError`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback

import numpy as np

from backprop.backend import get_array_module

__all__ = ["init", "is_initialized", "rank", "world_size", "local_rank", "barrier",
           "allreduce", "broadcast", "broadcast_object", "allgather_object", "info",
           "agree", "abort_on_error", "abort", "share", "DistributedError", "ProcessGroup",
           "current_group"]

# Variables that MPI launchers set in every process they start (MPICH/Intel MPI's hydra,
# Open MPI, PMIx-based launchers, Slurm's srun with PMI).
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                       "PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


class DistributedError(RuntimeError):
    """Another rank of the process group failed; the message names it and its error."""


def share(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of a global batch of ``rows`` rows that ``rank`` of ``world``
    processes takes: ``rows // world`` rows each, one more for the first ``rows % world``
    ranks, in rank order (so the shares differ by at most one row, and concatenated in rank
    order they are the global batch)."""
    from backprop import checks

    rows = checks.integer("rows", rows, minimum=0)
    world = checks.integer("world", world, minimum=1)
    rank = checks.integer("rank", rank, minimum=0)
    if rank >= world:
        raise ValueError(f"rank must be in [0, world={world}); got {rank}")
    base, extra = divmod(rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class ProcessGroup:
    """The processes that train one model together.

    ``rank`` (0..size-1), ``size``, ``local_rank`` (this process's index among the ranks on
    its node), ``comm`` (the mpi4py communicator; None for a one-process group without MPI),
    ``nccl`` (a ``cupy.cuda.nccl.NcclCommunicator`` once one is made, else None).
    """

    def __init__(self, comm=None):
        self.comm = comm
        if comm is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
            self._mpi = None
        else:
            self.rank, self.size = comm.Get_rank(), comm.Get_size()
            from mpi4py import MPI

            self._mpi = MPI  # kept: the step's collectives should not import it again
            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
            node.Free()
        self.nccl = None
        self.nccl_reason = ""  # why GPU arrays are staged through the host, once probed
        self._nccl_probed = False
        self.lock = threading.Lock()  # held by the fit() that uses the group
        self.agreements = 0          # how many times agree() ran (the CLI checks it)
        self.last_reports: list = []  # what every rank reported to the last agree()
        self.traceback_on_abort = True  # the CLI sets it from --debug
        # > 0: fit starts the gradient sum in buckets of this many bytes during backward
        # (see DataParallel.backward_and_reduce); 0: one allreduce after backward
        self.bucket_bytes = 0
        self.threads = None  # CPU threads per rank set by init() (None: left as they were)

    def __repr__(self) -> str:
        return f"ProcessGroup(rank={self.rank}, size={self.size})"

    # -- host collectives over MPI --------------------------------------------------------
    def _mpi_op(self, op: str):
        MPI = self._mpi
        return {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]

    def allreduce_host(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        if self.comm is not None and self.size > 1:
            self.comm.Allreduce(self._mpi.IN_PLACE, array, op=self._mpi_op(op))
        if op == "mean" and self.size > 1:
            array /= self.size
        return array

    def iallreduce_host(self, array: np.ndarray):
        """Start a non-blocking sum of ``array`` in place; returns a request with
        ``Wait()`` (None in a one-process group)."""
        if self.comm is None or self.size == 1:
            return None
        return self.comm.Iallreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)

    def wait_all(self, requests) -> None:
        """Wait for the non-blocking collectives ``requests`` (None entries skipped)."""
        requests = [r for r in requests if r is not None]
        if requests:
            self._mpi.Request.Waitall(requests)

    # -- device collectives ---------------------------------------------------------------
    def _nccl_comm(self):
        """The NCCL communicator for GPU arrays, made on first use (collectively: every rank
        reaches this on its first GPU reduction); None, with ``nccl_reason``, when NCCL is
        not usable, and then GPU arrays are staged through the host."""
        if self._nccl_probed:
            return self.nccl
        self._nccl_probed = True
        reason = ""
        try:
            from cupy.cuda import nccl

            if not getattr(nccl, "available", True):
                reason = "cupy.cuda.nccl is not available (CuPy found no NCCL library)"
        except Exception as exc:  # noqa: BLE001 - any import failure means no NCCL
            reason = f"cupy.cuda.nccl cannot be imported ({type(exc).__name__}: {exc})"
        # all ranks must take the same branch: agree on whether NCCL works everywhere
        reasons = self.comm.allgather(reason) if self.comm is not None else [reason]
        bad = [(r, why) for r, why in enumerate(reasons) if why]
        if bad:
            self.nccl_reason = f"rank {bad[0][0]}: {bad[0][1]}"
            return None
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0) if self.comm is not None else uid
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.nccl_reason = ""
        return self.nccl

    def allreduce(self, array, op: str = "sum"):
        """Reduce ``array`` in place over the group (see :func:`allreduce`)."""
        if self.size == 1:
            return array
        if get_array_module(array) is np:
            return self.allreduce_host(array, op)
        return self.allreduce_device(array, op)

    def allreduce_device(self, array, op: str = "sum"):
        """Reduce a CuPy ``array`` in place: NCCL on the current stream, or host-staged MPI
        when NCCL is not usable (also on a one-process group, for the GPU smoke test)."""
        xp = get_array_module(array)
        comm = self._nccl_comm()
        if comm is None:  # explicit host staging (info() reports it)
            host = array.get()
            self.allreduce_host(host, op)
            array.set(host)
            return array
        from cupy.cuda import nccl

        stream = xp.cuda.get_current_stream().ptr
        comm.allReduce(array.data.ptr, array.data.ptr, array.size, _nccl_dtype(nccl, array),
                       {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "max": nccl.NCCL_MAX,
                        "min": nccl.NCCL_MIN}[op], stream)
        if op == "mean" and self.size > 1:
            array /= self.size
        return array

    def broadcast(self, array, root: int = 0):
        """Overwrite ``array`` on every rank with ``root``'s (see :func:`broadcast`)."""
        if self.size == 1:
            return array
        xp = get_array_module(array)
        if xp is np:
            self.comm.Bcast(array, root=root)
            return array
        comm = self._nccl_comm()
        if comm is None:
            host = array.get()
            self.comm.Bcast(host, root=root)
            array.set(host)
            return array
        from cupy.cuda import nccl

        comm.bcast(array.data.ptr, array.size, _nccl_dtype(nccl, array), root,
                   xp.cuda.get_current_stream().ptr)
        return array

    def broadcast_object(self, obj, root: int = 0):
        return obj if self.size == 1 else self.comm.bcast(obj, root=root)

    def allgather_object(self, obj) -> list:
        return [obj] if self.size == 1 else self.comm.allgather(obj)

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        raise SystemExit(code)


def _nccl_dtype(nccl, array):
    names = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}
    name = names.get(array.dtype.name)
    if name is None:
        raise TypeError(f"NCCL cannot reduce {array.dtype} arrays; use one of "
                        f"{sorted(names)}")
    return getattr(nccl, name)


# ---------------------------------------------------------------------------------------
# The process-wide group
_group: ProcessGroup | None = None
_init_lock = threading.Lock()


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (its environment variables are set)."""
    return any(v in os.environ for v in _LAUNCHER_SIZE_VARS)


def launcher_rank() -> int:
    """This process's rank as the MPI launcher's environment gives it (0 without one),
    known before MPI is initialised."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def init(*, mpi: bool | None = None, bucket_mb: float | None = None) -> ProcessGroup:
    """Join the process group (idempotent; returns it).

    ``mpi=None`` (default): use MPI when an MPI launcher started this process, else make a
    one-process group without importing mpi4py. ``mpi=True`` always uses MPI (a singleton
    MPI process without a launcher); ``mpi=False`` never does.

    On a GPU device (``BACKPROP_DEVICE=cuda``) each rank takes ``cuda:{local_rank % GPUs}``
    as its current device. Raises ImportError with the install command when a launcher
    started the process but mpi4py is missing.

    ``bucket_mb`` (default: ``BACKPROP_BUCKET_MB``, else 0): overlap the gradient allreduce
    with the backward pass in buckets of this many megabytes (CPU, MPI); 0 reduces the
    whole gradient once after backward. ``benchmarks/distributed_step.py --bucket-mb``
    measures whether it pays on a machine."""
    global _group
    with _init_lock:
        if _group is not None:
            return _group
        use_mpi = launched_by_mpi() if mpi is None else bool(mpi)
        comm = None
        if use_mpi:
            try:
                from mpi4py import MPI
            except ImportError as exc:
                raise ImportError(
                    "backprop.distributed needs mpi4py and an MPI library: pip install "
                    "'backprop[mpi]' (mpi4py and the mpich wheel, which provides mpiexec)"
                ) from exc
            comm = MPI.COMM_WORLD
        group = ProcessGroup(comm)
        if bucket_mb is None:
            bucket_mb = float(os.environ.get("BACKPROP_BUCKET_MB", "0") or 0)
        if not 0 <= float(bucket_mb) < float("inf"):
            raise ValueError(f"bucket_mb must be a finite number >= 0, got {bucket_mb!r}")
        group.bucket_bytes = int(float(bucket_mb) * 2**20)
        _select_gpu(group)
        _share_cores(group)
        _group = group
        return group


def _select_gpu(group: ProcessGroup) -> None:
    """One GPU per rank on a node: ``cuda:{local_rank % GPUs}`` when the device is CUDA."""
    if group.size == 1:
        return
    from backprop import backend

    if os.environ.get("BACKPROP_DEVICE", "auto").strip().lower() in ("cpu", ""):
        return
    status = backend.cuda_status()
    if status["available"] and status["devices"] > 0 and backend.get_device().kind == "cuda":
        backend.set_device(f"cuda:{group.local_rank % status['devices']}")


_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _share_cores(group: ProcessGroup) -> None:
    """Divide this node's cores between its ranks: each rank's BLAS (threadpoolctl) and
    Numba's parallel kernels (in the thread that calls init; at most ``NUMBA_NUM_THREADS``)
    use ``cores // ranks on the node`` threads, or ``BACKPROP_THREADS_PER_RANK``. Without
    this, every rank starts a thread per core, and on a node full of ranks the threads,
    spinning while they wait (OpenBLAS between products, MPI in a collective), take the
    cores from each other. BLAS is left alone where ``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set; nothing changes on one
    process."""
    if group.local_size <= 1:
        return
    chosen = os.environ.get("BACKPROP_THREADS_PER_RANK", "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"BACKPROP_THREADS_PER_RANK={chosen!r}: expected a whole number "
                             ">= 1")
        threads = int(chosen)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        threads = max(1, cores // group.local_size)
    if not any(os.environ.get(v, "").strip() for v in _BLAS_VARS):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # no Numba: the reference kernels need no threads
        pass
    group.threads = threads


def current_group() -> ProcessGroup | None:
    """The group made by :func:`init`, or None before it."""
    return _group


def is_initialized() -> bool:
    return _group is not None


def _require() -> ProcessGroup:
    if _group is None:
        raise RuntimeError("backprop.distributed is not initialized: call "
                           "backprop.distributed.init() first (in every process)")
    return _group


def rank() -> int:
    """This process's rank (0 when not initialized: a one-process program is rank 0)."""
    return 0 if _group is None else _group.rank


def world_size() -> int:
    """Number of processes in the group (1 when not initialized)."""
    return 1 if _group is None else _group.size


def local_rank() -> int:
    """This process's index among the ranks on its node (0 when not initialized)."""
    return 0 if _group is None else _group.local_rank


def barrier() -> None:
    """Wait until every rank has called ``barrier()``."""
    _require().barrier()


def _check_op(op: str) -> str:
    if op not in ("sum", "mean", "max", "min"):
        raise ValueError(f"op must be 'sum', 'mean', 'max' or 'min', got {op!r}")
    return op


def allreduce(array, op: str = "mean"):
    """Reduce over all ranks: ``op="mean"`` (default) or ``"sum"`` (also ``"max"``,
    ``"min"``). A NumPy or CuPy array is reduced in place (it must be C-contiguous and
    writable) and returned; a Python number returns the reduced float."""
    group = _require()
    _check_op(op)
    if isinstance(array, (int, float, np.number)) and not isinstance(array, bool):
        buf = np.array([float(array)])
        return float(group.allreduce(buf, op)[0])
    if not hasattr(array, "flags") or not array.flags.c_contiguous or \
            not array.flags.writeable:
        raise ValueError("allreduce needs a C-contiguous, writable NumPy or CuPy array (it "
                         "reduces in place); pass np.ascontiguousarray(a) and use the result")
    return group.allreduce(array, op)


def broadcast(array, root: int = 0):
    """Overwrite ``array`` (C-contiguous, writable; NumPy or CuPy) on every rank with the
    values of rank ``root``; returns it."""
    group = _require()
    if not 0 <= int(root) < group.size:
        raise ValueError(f"root must be a rank in [0, {group.size}), got {root!r}")
    if not hasattr(array, "flags") or not array.flags.c_contiguous or \
            not array.flags.writeable:
        raise ValueError("broadcast needs a C-contiguous, writable NumPy or CuPy array")
    return group.broadcast(array, int(root))


def broadcast_object(obj, root: int = 0):
    """``root``'s ``obj`` on every rank (pickled: for small, trusted objects)."""
    return _require().broadcast_object(obj, root)


def allgather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (pickled: for small, trusted objects)."""
    return _require().allgather_object(obj)


def info() -> dict:
    """Where this process stands: ``initialized``, ``rank``, ``size``, ``local_rank``,
    ``transport`` (``"none"``, ``"mpi"``; for GPU arrays ``"nccl"`` or
    ``"mpi (host-staged)"``), the MPI library's version and the reason NCCL is not used."""
    g = _group
    if g is None:
        return {"initialized": False, "rank": 0, "size": 1, "local_rank": 0,
                "transport": "none", "launched_by_mpi": launched_by_mpi()}
    out = {"initialized": True, "rank": g.rank, "size": g.size, "local_rank": g.local_rank,
           "ranks_on_node": g.local_size, "threads_per_rank": g.threads,
           "transport": "none" if g.comm is None else "mpi",
           "launched_by_mpi": launched_by_mpi()}
    if g.comm is not None:
        from mpi4py import MPI

        out["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
    if g.nccl is not None:
        out["gpu_transport"] = "nccl"
    elif g._nccl_probed:
        out["gpu_transport"] = "mpi (host-staged)"
        out["nccl_reason"] = g.nccl_reason
    return out


# ---------------------------------------------------------------------------------------
# Faults
def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def agree(group: ProcessGroup, error: BaseException | None) -> None:
    """Collective: every rank reports whether it failed. Returns when none did; when some
    did, a failing rank returns (its caller re-raises its own error) and the others raise
    :class:`DistributedError` naming the first failing rank and its error."""
    if group.size == 1:
        return
    reports = group.comm.allgather(None if error is None else _describe(error))
    group.agreements += 1
    group.last_reports = reports
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if error is not None:
        error._agreed_by_all_ranks = True  # every rank raises now: no abort needed
    elif failed:
        r, msg = failed[0]
        exc = DistributedError(f"rank {r} of {group.size} failed, so this rank stops too: {msg}")
        exc._agreed_by_all_ranks = True
        raise exc


def abort(group: ProcessGroup, exc: BaseException, code: int = 1,
          show_traceback: bool | None = None) -> None:
    """Print ``exc`` (with its traceback when ``show_traceback``, by default the group's
    ``traceback_on_abort``), prefixed by this rank, and end the whole job with exit status
    ``code``."""
    if show_traceback is None:
        show_traceback = group.traceback_on_abort
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__) if show_traceback \
        else [f"{_describe(exc)}\n"]
    sys.stderr.write(f"backprop: rank {group.rank} of {group.size} failed; aborting the job "
                     f"(MPI_Abort):\n" + "".join(lines))
    sys.stderr.flush()
    # MPI_Abort makes the launcher kill every process at once, and hydra's output proxy
    # could drop this rank's message still in its pipe: give the proxy a moment to read it
    time.sleep(0.2)
    group.abort(code)


@contextlib.contextmanager
def abort_on_error(group: ProcessGroup | None = None, consistent=(), show_traceback=None):
    """Run the body; an exception on a multi-rank group ends the whole job (:func:`abort`),
    except the ``consistent`` exception types, which every rank raises at the same point
    (decided from globally reduced values), and errors that every rank learnt of through
    :func:`agree`: these propagate normally."""
    group = _group if group is None else group
    try:
        yield
    except BaseException as exc:
        if group is None or group.size == 1 or isinstance(exc, tuple(consistent)) or \
                getattr(exc, "_agreed_by_all_ranks", False) or \
                (isinstance(exc, SystemExit) and not exc.code):
            raise
        abort(group, exc, show_traceback=show_traceback)
