"""The kernel registry: every fused op of backprop, and which backends implement it.

Each op is declared once, by its reference function in :mod:`reference` (plain ``xp``
math with the docstring that states it). A backend module defines a function of the same
name and signature for each op it accelerates; for every other op the reference is used.
The accelerated backends build the activations' kernels from the records of
:mod:`activations` and the optimizer updates' from those of ``kernels/optimizers.py`` (one formula
each, instantiated per backend); the reference states both apart, as the oracle.

    op                    reference   numba_cpu   numba_cuda   cupy
    bias_act_forward          ✓           ✓           ✓          ✓    A = σ(Z + b)
    bias_act_backward         ✓           ✓           ✓          ✓    δ = dA ⊙ σ'(Z), db = Σδ
    softmax_forward           ✓           ✓           ✓          ✓    row softmax
    softmax_backward          ✓           ✓           ✓          ✓    y ⊙ (dy - Σ dy y)
    softmax_xent              ✓           ✓           ✓          ✓    loss and (softmax - y)/N
    sgd_step, rmsprop_step,   ✓           ✓           ✓          ✓    in-place updates
    adam_step, adagrad_step
    dropout                   ✓           ✓           ✓          ✓    counter-hash mask · 1/(1-p)
    batchnorm_forward         ✓           ✓           ✓          ✓    per-feature normalisation
    batchnorm_backward        ✓           ✓           ✓          ✓    and its gradient

Low-precision copies (mixed precision, ``kernels/lowp.py``), in every backend: the last
argument of ``bias_act_forward`` (``out_lp``), ``bias_act_backward`` (``delta_lp``) and of
every optimizer step (``data_lp``) is None or a ``uint16`` (bfloat16 bits) or ``float16``
array that also receives the copy of the float32 result (``A``, ``δ``, the updated weights)
that the next matrix product reads, written in the same pass from exactly the float32 value
stored. Float32 data only; None, the default, costs nothing. The dispatchers below pass
keywords through.

Selection: ``BACKPROP_KERNELS`` = ``auto`` (cupy on CUDA arrays, numba_cpu on NumPy arrays,
reference where neither is importable) | ``cupy`` | ``numba`` (numba_cpu / numba_cuda) |
``reference``, or :func:`set_backend`. The backend is chosen per call from the type of the
first array argument, so a model on the CPU and one on the GPU can live side by side.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

# How long Numba's OpenMP workers spin after a parallel loop before they sleep. The OpenMP
# runtime reads this once, at the first parallel launch of any Numba function in the process
# (not only ours), so it is set when backprop is imported, before any can run, and only where
# the user set none of these variables. With OpenBLAS's jobs on the same threads
# (backprop.blas_pool, the default) a short spin (GNU OpenMP's GOMP_SPINCOUNT: about half a
# millisecond here) hands each product and kernel of a step to a thread that is still awake,
# and nothing else spins. With OpenBLAS keeping its own pool (BACKPROP_BLAS_POOL=openblas) the
# workers sleep at once (PASSIVE), since spinning they fought OpenBLAS's threads for the cores
# (docs/design.md has the figures). Intel's OpenMP (MKL's, in the bf16 extra) sleeps at once
# in both cases (KMP_BLOCKTIME=0, what PASSIVE meant for it before).
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The OpenMP settings backprop may set at import (benchmarks clear them for other
frameworks' processes, which should run under their own defaults)."""

if not any(v in os.environ for v in OMP_VARIABLES):
    if os.environ.get("BACKPROP_BLAS_POOL", "numba").strip().lower() == "openblas":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = "30000"
        os.environ["KMP_BLOCKTIME"] = "0"

import numpy as np  # noqa: E402

from . import reference  # noqa: E402

OPS: dict[str, tuple[str, ...]] = {
    "bias_act_forward": ("numba_cpu", "numba_cuda", "cupy"),
    "bias_act_backward": ("numba_cpu", "numba_cuda", "cupy"),
    "softmax_forward": ("numba_cpu", "numba_cuda", "cupy"),
    "softmax_backward": ("numba_cpu", "numba_cuda", "cupy"),
    "softmax_xent": ("numba_cpu", "numba_cuda", "cupy"),
    "sgd_step": ("numba_cpu", "numba_cuda", "cupy"),
    "rmsprop_step": ("numba_cpu", "numba_cuda", "cupy"),
    "adam_step": ("numba_cpu", "numba_cuda", "cupy"),
    "adagrad_step": ("numba_cpu", "numba_cuda", "cupy"),
    "dropout": ("numba_cpu", "numba_cuda", "cupy"),
    "batchnorm_forward": ("numba_cpu", "numba_cuda", "cupy"),
    "batchnorm_backward": ("numba_cpu", "numba_cuda", "cupy"),
}

BACKENDS = {  # backend name -> (module, device kind it runs on)
    "reference": ("backprop.kernels.reference", "any"),
    "numba_cpu": ("backprop.kernels.numba_cpu", "cpu"),
    "numba_cuda": ("backprop.kernels.numba_cuda", "cuda"),
    "cupy": ("backprop.kernels.cupy_kernels", "cuda"),
}
CHOICES = ("auto", "cupy", "numba", "reference")


class KernelBackendError(RuntimeError):
    """A kernel backend was asked for that cannot run here; the message says why."""


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run on this machine, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "numba_cpu":
        return None if importlib.util.find_spec("numba") else "Numba is not installed"
    from backprop.backend import cuda_status

    if backend == "cupy":
        status = cuda_status()
        return None if status["available"] else status["reason"]
    if backend == "numba_cuda":
        if importlib.util.find_spec("numba") is None:
            return "Numba is not installed"
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return None
        status = cuda_status()
        if not status["available"]:
            return status["reason"]
        try:
            from numba import cuda

            if not cuda.is_available():
                return "numba.cuda reports no usable CUDA driver/device"
        except Exception as exc:  # numba-cuda missing or broken
            return f"numba.cuda is unusable: {type(exc).__name__}: {exc}"
        return None
    raise KernelBackendError(f"unknown kernel backend {backend!r}; expected one of {list(BACKENDS)}")


def _choice_from_env() -> str:
    choice = os.environ.get("BACKPROP_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise KernelBackendError(
            f"BACKPROP_KERNELS={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


_state: dict = {"choice": None, "tables": {}}


def get_choice() -> str:
    """The requested kernel choice: auto | cupy | numba | reference."""
    if _state["choice"] is None:
        _state["choice"] = _choice_from_env()
    return _state["choice"]


def set_backend(choice: str) -> None:
    """Select kernels in code: ``auto | cupy | numba | reference``."""
    choice = str(choice).strip().lower()
    if choice not in CHOICES:
        raise KernelBackendError(f"unknown kernel choice {choice!r}; expected one of {CHOICES}")
    _state["choice"] = choice
    _state["tables"] = {}


def backend_name(device_kind: str) -> str:
    """The backend that runs ops on arrays of ``device_kind`` ('cpu' or 'cuda') under the
    current choice; raises :class:`KernelBackendError` when an explicit choice cannot run."""
    choice = get_choice()
    if choice == "reference":
        return "reference"
    if choice == "auto":
        preferred = "numba_cpu" if device_kind == "cpu" else "cupy"
        return preferred if unavailable_reason(preferred) is None else "reference"
    if choice == "cupy":
        if device_kind == "cpu":
            raise KernelBackendError(
                "BACKPROP_KERNELS=cupy runs only on CUDA arrays, but these arrays are on the "
                "CPU: use BACKPROP_DEVICE=cuda, or BACKPROP_KERNELS=numba|reference|auto")
        name = "cupy"
    else:  # numba
        name = "numba_cpu" if device_kind == "cpu" else "numba_cuda"
    reason = unavailable_reason(name)
    if reason is not None:
        raise KernelBackendError(f"kernel backend {name!r} was requested but cannot run: {reason}")
    return name


def implementation(backend: str, op: str):
    """The function that implements ``op`` on ``backend`` (the reference where the backend
    does not fuse it)."""
    if op not in OPS:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(OPS)}")
    if backend == "reference" or backend not in OPS[op]:
        return getattr(reference, op)
    module = importlib.import_module(BACKENDS[backend][0])
    return getattr(module, op)


def _table(device_kind: str) -> dict:
    table = _state["tables"].get(device_kind)
    if table is None:
        name = backend_name(device_kind)
        table = {op: implementation(name, op) for op in OPS}
        _state["tables"][device_kind] = table
    return table


def _dispatcher(op: str):
    def dispatch(*args, **kwargs):
        kind = "cpu" if type(args[0]) is np.ndarray else "cuda"
        tables = _state["tables"]
        table = tables.get(kind) or _table(kind)
        return table[op](*args, **kwargs)

    dispatch.__name__ = op
    dispatch.__doc__ = getattr(reference, op).__doc__
    return dispatch


def prepare(op: str, *args, **kwargs):
    """``(token, run)``: ``run()`` performs ``op(*args, **kwargs)`` again, on the same
    arguments, with their checks done once, here (the backend's ``prepare`` where it has one:
    numba_cpu's Dense epilogues and softmax cross-entropy, whose checks cost more than
    their kernels on small batches; elsewhere ``run`` is the op itself). ``run()`` returns
    nothing.

    The contract that makes skipping the checks safe is the caller's: run only while
    :func:`current` (``token``) holds (the backend selection has not changed) and while
    each array argument is the same object with the same shape as when prepared; a layer
    checks the identity of its arguments (and the shape of those it does not own) before
    every run. The prepared arguments may include the calling thread's scratch arrays
    (numba_cpu), so a run belongs to the thread that prepared it."""
    kind = "cpu" if type(args[0]) is np.ndarray else "cuda"
    table = _state["tables"].get(kind) or _table(kind)
    implementation_ = table[op]
    bind = getattr(implementation_, "prepare", None)
    run = functools.partial(implementation_, *args, **kwargs) if bind is None else \
        bind(*args, **kwargs)
    return (kind, table), run


def current(token) -> bool:
    """Whether a run of :func:`prepare` that returned ``token`` still runs the backend that
    its arrays' device uses (:func:`set_backend`, or a new table of ops for the device, makes
    every earlier run stale)."""
    return _state["tables"].get(token[0]) is token[1]


bias_act_forward = _dispatcher("bias_act_forward")
bias_act_backward = _dispatcher("bias_act_backward")
softmax_forward = _dispatcher("softmax_forward")
softmax_backward = _dispatcher("softmax_backward")
softmax_xent = _dispatcher("softmax_xent")
sgd_step = _dispatcher("sgd_step")
rmsprop_step = _dispatcher("rmsprop_step")
adam_step = _dispatcher("adam_step")
adagrad_step = _dispatcher("adagrad_step")
dropout = _dispatcher("dropout")
batchnorm_forward = _dispatcher("batchnorm_forward")
batchnorm_backward = _dispatcher("batchnorm_backward")

ACTIVATIONS = reference.ACTIVATIONS
NEEDS_Z = reference.NEEDS_Z
dropout_key = reference.dropout_key
dropout_threshold = reference.dropout_threshold
