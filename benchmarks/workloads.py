"""What the benchmarks run, shared by the pytest suite and ``torch_compare.py``.

- Targets: a (device, kernel backend) pair, with the reason it cannot run here and its array
  module; ``synced`` makes a callable wait for the device (CuPy launches are asynchronous).
- Kernel cases: one per fused op of the registry (and activation variant), with its
  arguments and its *minimum* memory traffic (every input read once, every output written
  once) and nominal FLOPs (1 per arithmetic operation or transcendental; integer hashing of
  dropout not counted), so a time turns into GB/s.
- MLPs: the four training-step workloads, their step and their matrix products alone.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from backprop import kernels as K
from backprop.kernels import activations as KA
from backprop.backend import cuda_status

DTYPE = np.dtype(np.float32)
COPY_BYTES = 64 * 2**20  # the copy-bandwidth buffer: 64 MB

# Elementwise/row ops run on (N, M) batches; "large" and "small" are the full-run shapes,
# SMOKE_SHAPES the ones used when the benchmarks run once as tests (--benchmark-disable).
SHAPES = {"large": (4096, 4096), "small": (256, 256)}
SMOKE_SHAPES = {"large": (64, 48), "small": (16, 24)}
# Optimizer ops update one flat buffer (as after backprop.parameter.flatten).
FLAT_SIZES = {"large": {"sgd_step": 6_000_000, "adam_step": 6_000_000,
                        "rmsprop_step": 4096 * 4096, "adagrad_step": 4096 * 4096},
              "small": 256 * 256}
SMOKE_FLAT_SIZES = {"large": 3000, "small": 384}
OPTIMIZER_OPS = ("sgd_step", "rmsprop_step", "adam_step", "adagrad_step")


# ---------------------------------------------------------------------------------------
# Targets: where a benchmark runs
@dataclass(frozen=True)
class Target:
    """A device (``cpu``/``cuda``) and the kernel backend whose ops run there."""

    device: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.device}-{self.backend}"

    def unavailable_reason(self) -> str | None:
        """None when this target can run here, else why not."""
        reason = device_unavailable_reason(self.device)
        if reason is not None:
            return reason
        reason = K.unavailable_reason(self.backend)
        if reason is not None:
            return f"kernel backend {self.backend} unavailable: {reason}"
        return None

    @property
    def xp(self):
        return array_module(self.device)

    @property
    def kernel_choice(self) -> str:
        """The ``K.set_backend`` choice that makes a model use this backend."""
        return {"reference": "reference", "numba_cpu": "numba", "numba_cuda": "numba",
                "cupy": "cupy"}[self.backend]


def array_module(device: str):
    """numpy for ``cpu``, cupy for ``cuda``."""
    if device == "cpu":
        return np
    import cupy

    return cupy


def synced(device: str, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so that a timer sees the whole work
    (CuPy launches return before the GPU is done)."""
    if device == "cpu":
        return fn
    import cupy

    def call():
        fn()
        cupy.cuda.Device().synchronize()

    return call


DEVICES = ("cpu", "cuda")
TARGETS = [Target(dev, name) for dev in DEVICES
           for name, (_, kind) in K.BACKENDS.items() if kind in ("any", dev)]


def device_unavailable_reason(device: str) -> str | None:
    if device == "cuda":
        status = cuda_status()
        if not status["available"]:
            return f"no CUDA device: {status['reason']}"
    return None


def thread_info() -> dict:
    """How many CPU threads the kernels and BLAS may use (as configured for this process)."""
    info = {"cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
        info["numba_threading_layer"] = numba.threading_layer()
    except ImportError:
        info["numba_threads"] = None
    except ValueError:  # no parallel Numba function has run yet in this process
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def shape_label(shape: tuple[int, ...]) -> str:
    """``4096x4096`` for a batch, ``6M``/``65.5k`` for a flat buffer."""
    if len(shape) == 2:
        return f"{shape[0]}x{shape[1]}"
    n = shape[0]
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 10_000:
        return f"{n / 1e3:.3g}k"
    return str(n)


# ---------------------------------------------------------------------------------------
# Kernel cases
@dataclass
class KernelCase:
    """One call of a registry op: its arguments, shape, minimum bytes moved and FLOPs."""

    op: str
    variant: str
    shape: tuple[int, ...]
    args: tuple
    bytes: int
    flops: int
    reset: Callable[[], None] | None = None  # in place: restores the overwritten input

    @property
    def name(self) -> str:
        label = ", ".join(filter(None, (self.variant, "in place" if self.reset else "")))
        return f"{self.op}[{label}]" if label else self.op

    def group(self) -> str:
        return f"kernel:{self.name}:{shape_label(self.shape)}"


# nominal FLOPs per element of the activation σ (forward) and of σ' (backward), counted on
# each record's formula (kernels/activations.py): 1 per operation, a math function as below
# (exp as 12; Φ, GELU's erf form, two polynomials and an exp, as 36)
_FUNCTION_FLOPS = {"exp": 12, "expm1": 14, "tanh": 16, "bp_sigmoid": 15, "bp_softplus": 28,
                   "bp_ndtr": 36, "bp_npdf": 14, "fabs": 1}
_ACT_FLOPS = {act: KA.operation_counts(act, _FUNCTION_FLOPS)
              for act in K.ACTIVATIONS}
ACT_VARIANTS = tuple(_ACT_FLOPS)


def _rand(rng, shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape).astype(DTYPE)


def _bias_act_forward(xp, rng, shape, act):
    n, m = shape
    z, b, out = _rand(rng, shape), _rand(rng, (m,)), np.empty(shape, DTYPE)
    writes_z = act in K.NEEDS_Z
    if writes_z:  # z ← z + b is written back: a zero bias keeps repeated calls on one input
        b[:] = 0.0
    nbytes = DTYPE.itemsize * ((3 if writes_z else 2) * n * m + m)
    args = (xp.asarray(z), xp.asarray(b), xp.asarray(out), act, 0.0)
    return args, nbytes, n * m * (1 + _ACT_FLOPS[act][0])


def _bias_act_backward(xp, rng, shape, act):
    n, m = shape
    da, z = _rand(rng, shape), _rand(rng, shape)
    a = K.reference.activate(np, z, act)
    args = (xp.asarray(da), xp.asarray(a), xp.asarray(z), act, 0.0,
            xp.empty(shape, DTYPE), xp.empty((m,), DTYPE), False)
    nbytes = DTYPE.itemsize * (3 * n * m + m)  # read dA and (A or Z), write δ and ∂b
    return args, nbytes, n * m * (_ACT_FLOPS[act][1] + 1)


def _softmax_forward(xp, rng, shape, _):
    n, m = shape
    return (xp.asarray(_rand(rng, shape)), xp.empty(shape, DTYPE)), \
        DTYPE.itemsize * 2 * n * m, 5 * n * m


def _softmax_backward(xp, rng, shape, _):
    n, m = shape
    y = K.reference.softmax_forward(_rand(rng, shape), np.empty(shape, DTYPE))
    return (xp.asarray(_rand(rng, shape)), xp.asarray(y), xp.empty(shape, DTYPE)), \
        DTYPE.itemsize * 3 * n * m, 4 * n * m


def _softmax_xent(xp, rng, shape, _):
    n, m = shape
    labels = rng.integers(0, m, size=n).astype(np.int64)
    args = (xp.asarray(_rand(rng, shape)), xp.asarray(labels), 0.0, 1.0 / n,
            xp.empty(shape, DTYPE), xp.empty((n,), DTYPE))
    nbytes = DTYPE.itemsize * (2 * n * m + n) + labels.itemsize * n
    return args, nbytes, 7 * n * m


def _flat(xp, rng, n, count, scale=1.0):
    return [xp.asarray(_rand(rng, (n,), -scale, scale)) for _ in range(count)]


def _sgd_step(xp, rng, shape, _):
    (n,) = shape
    p, g, buf = _flat(xp, rng, n, 3)
    # p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step
    return (p, g, buf, 1e-3, 0.9, 0.0, False, 0.0, False), DTYPE.itemsize * 5 * n, 4 * n


def _rmsprop_step(xp, rng, shape, _):
    (n,) = shape
    p, g = _flat(xp, rng, n, 2)
    square_avg = xp.asarray(rng.uniform(0.1, 1.0, size=n).astype(DTYPE))
    # p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay, momentum, centered
    args = (p, g, square_avg, None, None, 1e-3, 0.99, 1e-8, 0.0, 0.0, False)
    return args, DTYPE.itemsize * 5 * n, 9 * n


def _adam_step(xp, rng, shape, _):
    (n,) = shape
    p, g, m = _flat(xp, rng, n, 3)
    v = xp.asarray(rng.uniform(0.1, 1.0, size=n).astype(DTYPE))
    # p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, step
    args = (p, g, m, v, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 10)
    return args, DTYPE.itemsize * 7 * n, 13 * n


def _adagrad_step(xp, rng, shape, _):
    (n,) = shape
    p, g = _flat(xp, rng, n, 2)
    state_sum = xp.asarray(rng.uniform(0.1, 1.0, size=n).astype(DTYPE))
    # p, g, state_sum, lr, lr_decay, eps, weight_decay, step
    return (p, g, state_sum, 1e-2, 0.0, 1e-10, 0.0, 10), DTYPE.itemsize * 5 * n, 7 * n


def _dropout(xp, rng, shape, _):
    n, m = shape
    p = 0.5
    args = (xp.asarray(_rand(rng, shape)), K.dropout_key(0, 1), K.dropout_threshold(p),
            1.0 / (1.0 - p), xp.empty(shape, DTYPE))
    return args, DTYPE.itemsize * 2 * n * m, 2 * n * m


def _batchnorm_forward(xp, rng, shape, _):
    n, m = shape
    vec = [xp.asarray(v) for v in (_rand(rng, (m,), 0.5, 1.5), _rand(rng, (m,)))]
    args = (xp.asarray(_rand(rng, shape)), vec[0], vec[1], 1e-5, xp.empty(shape, DTYPE),
            xp.empty((m,), DTYPE), xp.empty((m,), DTYPE), xp.empty((m,), DTYPE))
    return args, DTYPE.itemsize * (2 * n * m + 5 * m), 8 * n * m


def _batchnorm_backward(xp, rng, shape, _):
    n, m = shape
    x = _rand(rng, shape)
    mean, invstd = x.mean(axis=0), 1.0 / x.std(axis=0)
    gamma = _rand(rng, (m,), 0.5, 1.5)
    args = (xp.asarray(_rand(rng, shape)), xp.asarray(x), xp.asarray(gamma),
            *(xp.asarray(v.astype(DTYPE)) for v in (mean, invstd)), xp.empty(shape, DTYPE),
            xp.empty((m,), DTYPE), xp.empty((m,), DTYPE), False)
    return args, DTYPE.itemsize * (3 * n * m + 5 * m), 11 * n * m


# op -> (builder, activation variants or ("",))
CASE_BUILDERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "bias_act_forward": (_bias_act_forward, ACT_VARIANTS),
    "bias_act_backward": (_bias_act_backward, ACT_VARIANTS),
    "softmax_forward": (_softmax_forward, ("",)),
    "softmax_backward": (_softmax_backward, ("",)),
    "softmax_xent": (_softmax_xent, ("",)),
    "sgd_step": (_sgd_step, ("momentum",)),
    "rmsprop_step": (_rmsprop_step, ("",)),
    "adam_step": (_adam_step, ("",)),
    "adagrad_step": (_adagrad_step, ("",)),
    "dropout": (_dropout, ("p=0.5",)),
    "batchnorm_forward": (_batchnorm_forward, ("",)),
    "batchnorm_backward": (_batchnorm_backward, ("",)),
}


# The calls that the layers make in place (Dense's epilogues and softmax, the backward passes
# of Dropout and BatchNorm): op -> (index of the output argument, of the input it overwrites).
# A fresh output buffer costs a kernel more than the same bytes written over its input,
# whose cache lines it has just read (a store to a line not in cache reads it in first), so
# these ops are timed both ways. bias_act_forward runs in place only where σ' needs A alone.
IN_PLACE = {"bias_act_forward": (2, 0), "bias_act_backward": (5, 0), "softmax_forward": (1, 0),
            "softmax_backward": (2, 0), "dropout": (4, 0), "batchnorm_backward": (5, 0)}


def kernel_variants() -> list[tuple[str, str, bool]]:
    """Every (op, variant, in place) of the registry that the suite benchmarks, in registry
    order. An op without a case builder raises, so a new op cannot go unbenchmarked."""
    missing = sorted(set(K.OPS) - set(CASE_BUILDERS))
    if missing:
        raise KeyError(f"benchmarks/workloads.py has no kernel case for the registry op(s) "
                       f"{missing}: add a builder to CASE_BUILDERS")
    return [(op, v, in_place) for op in K.OPS for v in CASE_BUILDERS[op][1]
            for in_place in (False, True) if not in_place or _runs_in_place(op, v)]


def _runs_in_place(op: str, variant: str) -> bool:
    """Whether the layers call ``op`` in place: every op of :data:`IN_PLACE`, except the
    forward epilogue of an activation whose σ' needs Z (Z and A are two buffers then)."""
    return op in IN_PLACE and not (op == "bias_act_forward" and variant in K.NEEDS_Z)


def case_shape(op: str, size: str, smoke: bool) -> tuple[int, ...]:
    if op in OPTIMIZER_OPS:
        table = SMOKE_FLAT_SIZES if smoke else FLAT_SIZES
        n = table[size][op] if isinstance(table[size], dict) else table[size]
        return (n,)
    return (SMOKE_SHAPES if smoke else SHAPES)[size]


def kernel_case(op: str, variant: str, size: str, xp, smoke: bool = False,
                seed: int = 0, in_place: bool = False) -> KernelCase:
    """The arguments of one ``op`` call on arrays of ``xp`` (fresh buffers, fixed seed); with
    ``in_place``, the output is the input of :data:`IN_PLACE`, and the case's ``reset``
    restores that input (a benchmark calls it before each timed call). On the CPU it
    restores with :func:`parallel_copy`, on every thread, as the product before an
    epilogue keeps every core busy: ``np.copyto`` (one thread, 8 ms for 64 MB) left the
    second core idle that long, and a kernel started then ran at half speed on this VM
    (sigmoid forward in place, 4096x4096: 6.2 ms after a one-thread restore, 3.5 ms after
    a parallel one, 3.0 ms with no restore at all)."""
    builder, _ = CASE_BUILDERS[op]
    shape = case_shape(op, size, smoke)
    args, nbytes, flops = builder(xp, np.random.default_rng(seed), shape,
                                  variant if variant in _ACT_FLOPS else None)
    reset = None
    if in_place:
        out, source = IN_PLACE[op]
        args = args[:out] + (args[source],) + args[out + 1:]
        original = args[source].copy()
        restore = xp.copyto if xp is not np else parallel_copy()

        def reset():
            restore(args[source].reshape(-1), original.reshape(-1))

    return KernelCase(op, variant, shape, args, int(nbytes), int(flops), reset)


# ---------------------------------------------------------------------------------------
# Copy bandwidth
def copy_buffers(xp, nbytes: int):
    n = nbytes // DTYPE.itemsize
    src = xp.asarray(np.random.default_rng(0).standard_normal(n, dtype=np.float32))
    return src, xp.empty_like(src)


_PARALLEL_COPIES: dict = {}


def parallel_copy(plain_stores: bool = False):
    """A Numba ``prange`` copy (all threads), compiled on first use: NumPy's ``copyto``
    runs on one thread, which understates what the parallel kernels can reach.

    LLVM turns the plain loop into ``memcpy``, whose string-move instructions may write whole
    cache lines without reading them first; a kernel's loop writes with ordinary vector
    stores, which read each line in first (read-for-ownership) unless it is already cached.
    ``plain_stores=True`` copies ``x + 0`` (not foldable, so not a memcpy): the ceiling of a
    kernel that writes a fresh buffer, measured beside the memcpy one."""
    if plain_stores not in _PARALLEL_COPIES:
        from numba import njit, prange

        if plain_stores:
            @njit(parallel=True, cache=False)
            def copy(dst, src):
                for i in prange(src.size):
                    dst[i] = src[i] + np.float32(0.0)
        else:
            @njit(parallel=True, cache=False)
            def copy(dst, src):
                for i in prange(src.size):
                    dst[i] = src[i]

        _PARALLEL_COPIES[plain_stores] = copy
    return _PARALLEL_COPIES[plain_stores]


# ---------------------------------------------------------------------------------------
# The four MLPs of the training-step benchmarks
@dataclass(frozen=True)
class MLP:
    """A relu MLP ``sizes[0] → … → sizes[-1]`` trained with softmax cross-entropy and Adam."""

    name: str
    sizes: tuple[int, ...]
    batch: int

    @property
    def layers(self) -> list[tuple[int, int]]:
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def n_params(self) -> int:
        return sum(i * o + o for i, o in self.layers)

    def largest_product(self) -> int:
        """Multiply-adds of the step's largest matrix product (``backprop.blas``)."""
        return max(self.batch * i * o for i, o in self.layers)

    def blas_threads(self, device: str):
        """The BLAS thread cap under which ``fit`` would train this MLP on ``device``: the
        step and its floor are timed inside it."""
        from backprop import blas

        return blas.threads_for(self.largest_product()) if device == "cpu" \
            else contextlib.nullcontext()

    def matmul_flops(self) -> int:
        """Forward X Wᵀ per layer, backward δᵀX per layer and δW for all but the first."""
        per = [2 * self.batch * i * o for i, o in self.layers]
        return 2 * sum(per) + sum(per[1:])

    def epilogue_bytes(self, itemsize: int = DTYPE.itemsize) -> int:
        """Minimum traffic of everything but the matrix products in one step: the forward
        epilogue (read Z, write A) and backward epilogue (read dA and A, write δ, ∂b) of each
        hidden layer, the bias add of the output layer, the loss (read logits and labels,
        write ∂L/∂logits and per-row loss), the bias gradient of the output layer."""
        n = self.batch
        total = 0
        for _, o in self.layers[:-1]:
            total += (2 * n * o + o) + (3 * n * o + o)
        c = self.sizes[-1]
        total += (2 * n * c + c) + (2 * n * c + n) + (n * c + c)
        return total * itemsize + 8 * n  # int64 labels

    def optimizer_bytes(self, itemsize: int = DTYPE.itemsize) -> int:
        """Adam on flat buffers: read θ, g, m, v and write θ, m, v."""
        return 7 * self.n_params * itemsize

    def smoke(self) -> "MLP":
        """The same depth with widths ≤ 64 and a batch ≤ 32 (for the one-shot smoke run)."""
        sizes = (min(self.sizes[0], 64),) + tuple(min(s, 48) for s in self.sizes[1:-1]) \
            + (self.sizes[-1],)
        return MLP(self.name, sizes, min(self.batch, 32))


MLPS = {m.name: m for m in (
    MLP("tiny", (64, 32, 10), 32),
    MLP("digits", (64, 128, 128, 10), 64),
    MLP("mnist", (784, 256, 256, 10), 128),
    MLP("wide", (1024, 2048, 2048, 10), 256),
)}

# One hidden layer of the mnist MLP at large batches (benchmarks/frameworks.py): where the
# step is almost all GEMM, against PyTorch.
LARGE_BATCH_MLPS = {m.name: m for m in (
    MLP("b1024", (784, 256, 10), 1024),
    MLP("b4096", (784, 256, 10), 4096),
    MLP("b8192", (784, 256, 10), 8192),
)}


def mlp_data(mlp: MLP, xp, seed: int = 0):
    """A random batch ``(X, labels)`` for ``mlp`` on the device of ``xp``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((mlp.batch, mlp.sizes[0]), dtype=np.float32)
    y = rng.integers(0, mlp.sizes[-1], size=mlp.batch).astype(np.int64)
    return xp.asarray(x), xp.asarray(y)


@dataclass
class MatmulFloor:
    """The matrix products of one training step alone, into preallocated ``out=`` buffers:
    forward ``Z = X Wᵀ``, backward ``∂W = δᵀX`` and ``∂X = δW`` (not for the first layer),
    each on the library the Dense layers use for it (``backprop.gemm``: MKL for the large
    ones where installed, else NumPy's BLAS)."""

    mlp: MLP
    xp: object
    buffers: list = field(default_factory=list)

    def __post_init__(self):
        n, rng = self.mlp.batch, np.random.default_rng(0)

        def arr(shape):
            return self.xp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.1)

        for i, (fan_in, fan_out) in enumerate(self.mlp.layers):
            self.buffers.append({
                "x": arr((n, fan_in)), "w": arr((fan_out, fan_in)), "z": arr((n, fan_out)),
                "delta": arr((n, fan_out)), "dw": arr((fan_out, fan_in)),
                "dx": arr((n, fan_in)) if i > 0 else None})

    def __call__(self) -> None:
        from backprop.gemm import product  # the library the layers' products run on

        matmul = self.xp.matmul
        for b in self.buffers:
            if not product(b["x"], b["w"], b["z"], False, True):
                matmul(b["x"], b["w"].T, out=b["z"])
        for b in reversed(self.buffers):
            if not product(b["delta"], b["x"], b["dw"], True, False):
                matmul(b["delta"].T, b["x"], out=b["dw"])
            if b["dx"] is not None and not product(b["delta"], b["w"], b["dx"], False, False):
                matmul(b["delta"], b["w"], out=b["dx"])


class TrainingStep:
    """One training step of ``mlp`` with backprop, as ``fit`` runs it: ``zero_grad``, forward,
    softmax cross-entropy, backward (no ``∂X`` for the data), Adam step; float32, relu hidden
    layers, on one fixed batch. Labels are validated once here, not per step (as in ``fit``)."""

    def __init__(self, mlp: MLP, device: str, lr: float = 1e-3, seed: int = 0):
        from backprop.layers import Dense
        from backprop.losses import SoftmaxCrossEntropyLoss
        from backprop.model import Sequential
        from backprop.optim import Adam

        last = len(mlp.layers) - 1
        layers = [Dense(i, o, activation="relu" if k < last else None, rng=seed + k,
                        dtype=DTYPE) for k, (i, o) in enumerate(mlp.layers)]
        self.model = Sequential(layers).to(device)
        self.loss = SoftmaxCrossEntropyLoss()
        self.loss.validate_labels = False
        self.optimizer = Adam(self.model.parameters(), lr=lr)
        self.x, self.y = mlp_data(mlp, array_module(device), seed)

    def __call__(self):
        self.optimizer.zero_grad()
        value = self.loss.forward(self.model.forward(self.x), self.y)
        self.model.backward(self.loss.backward(), need_input_grad=False)
        self.optimizer.step()
        return value


def interleaved_medians(first, second, seconds: float = 2.0, min_pairs: int = 5) -> tuple:
    """Median times of two callables run alternately (first, second, first, ...) for about
    ``seconds``: on a shared machine whose speed drifts, their ratio is then measured in the
    same conditions, which two benchmarks run a minute apart are not."""
    import time

    times: tuple[list, list] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < min_pairs or time.perf_counter() - start < seconds:
        for fn, out in zip((first, second), times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return float(np.median(times[0])), float(np.median(times[1]))

