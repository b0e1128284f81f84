"""Compiled inference plans: the eval-mode forward pass of a small batch on the CPU in a few
Numba calls, without the per-layer overheads of ``Sequential.forward``.

``model.predict(X)`` and ``model(x)`` use a plan, when one applies, for a C-contiguous NumPy
batch of at most :data:`MAX_ROWS` rows (more for a stack of Dense layers:
:data:`DENSE_MAX_ROWS`, and any number for weights that stay in a core's cache,
:data:`SMALL_WEIGHT_BYTES`) of the model's dtype and feature count,
with the model in eval mode (``model(x)``) or under :func:`~backprop.concurrency.inference_mode`
(``predict``). Anything else takes the normal path.

What a plan computes, layer by layer (the same math as the layers' eval-mode forward)::

    Dense        A = σ(X Wᵀ + b)       one kernel: the product, the bias and σ; a softmax
                                        or log-softmax output (or a following Softmax,
                                        LogSoftmax or elementwise activation layer, when
                                        the Dense has no activation of its own) is fused in
    BatchNorm1d  A = γ (X - μ)/sqrt(σ² + ε) + β, with the running statistics (not folded
                 into the weights: folding would need a copy of them, stale after an
                 in-place update)
    Activation   A = σ(X) elementwise; Softmax, LogSoftmax per row
    Dropout      A = X (eval mode); Flatten of a 2-D batch: A = X
    Residual     A = X + F(X), F planned the same way
    Sequential   its layers, in order

Any other layer (or a Dense whose activation is neither elementwise nor a softmax) makes
the model unplannable, and it always takes the normal path.

Kernels. Each Dense runs one kernel compiled for its activation: ``Z = X Wᵀ``, then
``+ b``, σ (the formula of the activation's record in ``kernels/activations.py``, built with
the same math as the ``numba_cpu`` kernels: vecmath's vectorisable functions, constants of
the array's dtype) and the row softmax. ``W`` is read as the layer stores it, ``(out, in)``:
no transposed copy is kept. The product has three forms:

- dot form, below one vector of rows (16 float32, 8 float64): blocks of 4 rows of ``X`` × 4
  rows of ``W``, each of the 16 dot products a vectorised reduction over the features;
- lanes form, from one vector of rows on (when every layer is a Dense): the batch is
  transposed once, ``(features, P)`` with the rows along the vector lanes, and
  ``Zᵀ = W Xᵀ`` is computed in tiles of 8 weight rows × 2 vectors of rows held in
  registers through the whole sum over the features
  (:func:`backprop.kernels.matmul.make_tile`): no horizontal reductions, which in the dot
  form cost as much as the products when the features are few. The output is transposed
  back at the end;
- packed form, from :data:`PACKED_MIN_ROWS` rows (a stack of Dense layers whose weights
  stay in a core's cache): each ``W`` is packed into panels of two vectors of outputs,
  ``Wᵀ`` strips that a tile of 12 rows of ``X`` × 2 vectors of outputs reads while it
  broadcasts ``X``'s values, read in place
  (:func:`backprop.kernels.matmul.packed_product`); the batch runs in blocks of rows, each
  through every layer (``_packed_source``), its bias, σ and row op applied while the block
  is in cache. The tiles sum each output in the lanes form's order, so the two forms give
  the same bits (a row op may round its sums differently). The panels are kept between
  calls (per calling thread) with a copy of the weights they were packed from: every call
  compares the weights with that copy, bit for bit, and packs again the panels whose
  weights changed (:func:`backprop.kernels.matmul.refresh_panel`), which costs a read of
  the weights instead of their transposition. A frozen model (:func:`backprop.freeze`)
  never compares them, and runs its batches in this form from
  :data:`FROZEN_PACKED_MIN_ROWS` rows, one block of rows per thread.

Threads of one call. A batch runs on the calling thread, unless it holds at least two
vectors of rows (:data:`PARALLEL_MIN_VECTORS`, the last one may be partial) and at least
:data:`PARALLEL_MIN_MACS` multiply-adds, Numba runs more than one thread and the model is a
stack of Dense layers: then the batch is cut into chunks of rows (each a whole number of
vectors, sized so that the busiest thread gets the fewest rows, :data:`CHUNK_ROWS`) and a
parallel driver runs the whole lanes program on each chunk, transposition, every layer and
the transposition back, in a single parallel region (one wake-up of the worker threads per
call, not one per layer; each core keeps its chunk's activations in its own cache). With
one to two vectors of rows per thread and weights in a core's cache, the chunks are one per
thread and run the row program instead (``_row_chunks_take``: no transposition, no padded
lanes). Below the threshold, waking a second thread costs more than it saves. The driver is
generated per stack of activations (its Python source is written once under the user's
cache directory, so that Numba's disk cache keeps its machine code between processes,
``_driver_for``). Under Numba's workqueue threading layer, which aborts on parallel
launches from two threads at once, the drivers take turns as numba_cpu's parallel kernels
do.

A smaller batch of a stack of Dense layers with large weights (:data:`PASS_MIN_BYTES`)
still uses every thread: a product of a few rows is bound by reading the weights, so each
large layer is split by its output features, each thread on its own block of weight rows
(the same rows on every call, which then stay in that core's cache), and the whole pass runs
in one parallel region whose threads wait for each other between layers on atomic
counters (``_pass_source``, :mod:`backprop.kernels.atomics`). A thread first claims its own
block of a layer, then any block no thread has claimed, so the pass completes however the
threads are scheduled. Other plans (BatchNorm, residual blocks) split each Dense layer of
at least :data:`SPLIT_MIN_MACS` multiply-adds (and no row op) the same way, in one parallel
region per layer (``_run_split``). Split or not, every output is that of one thread, bit
for bit. Kernels are compiled per activation, form and dtype on first use and cached on
disk.

Precision: every operation runs in the model's dtype, as in the normal path, but the dot
products are summed in another order (vectorised partial sums, fused multiply-adds), so the
results differ from ``model.forward``'s by rounding: a few units in the last place of
``Σ|xᵢ wᵢ|`` per output. tests/test_inference.py holds them to
``|plan - forward| <= rtol·|forward| + atol·max(1, max|forward|)`` with ``rtol=1e-4``,
``atol=1e-5`` in float32 and ``1e-10``, ``1e-12`` in float64. The outputs of a row do not
depend on which plan form ran, up to that rounding; bit for bit they may (as BLAS's do on
the shape of the product).

Routes. Each call picks its route (the form, the driver, the threads) from the batch's rows
and the thresholds above, and binds it to this thread's buffers and the layers' arrays
(``Plan._bind``) before it runs it. A frozen model (:func:`backprop.freeze`), whose layers
and arrays never change, keeps the route it bound for a batch size and thread count on the
calling thread (``Plan.bound``, :func:`run_frozen`): its later batches of that size skip
the choice, the plan's checks against the model and the reading of the layers' arrays, and
run on the checks of ``x`` alone (type, layout, dtype, features; NaN/inf on the first
layer's kernel). Such a route keeps the thresholds as they were when it was bound. A
frozen stack of Dense layers runs a batch that stays on the calling thread in one serial
driver call (``_serial_source``) where a live model runs its program's ops, one Numba call
per layer (gathering a driver's arguments on every call costs a live model more than the
dispatches it saves).

Invalidation: a plan holds the model's layer objects, not their arrays: every call reads
``W.data``, ``b.data``, the running statistics and each activation's ``alpha`` anew, so an
optimizer's in-place update, ``load_state_dict``, ``model.to(...)`` (new arrays) and
``Parameter.rebind`` are all seen at the next call. It is rebuilt when the structure it was
built from changes: the model's ``layers`` list (or a nested Sequential's), a Residual's
block, a Dense's activation object, or the dtype of the parameters.

Threads: a plan may run in any number of threads at once. The kernels release the GIL and
only read the weights; the intermediate outputs (and the packed form's panels and copy of
the weights, twice the weights' bytes) live in per-thread buffers (``threading.local``),
and the result is a fresh array. Building a plan is idempotent
(two threads may both build one; the model keeps either). As for the normal path, a plan
that runs while another thread trains or moves the model reads the weights as they are at
that moment.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numba
import numpy as np
from numba import njit, types
from numba.core.caching import FunctionCache
from numba.extending import intrinsic, overload

from backprop import kernels as K
from backprop.concurrency import _MODE
from backprop.kernels import activations as _activations
from backprop.kernels import atomics, inline, matmul, vecmath
from backprop.kernels.activations import RECORDS, Math

__all__ = ["MAX_ROWS", "DENSE_MAX_ROWS", "SMALL_WEIGHT_BYTES", "PACKED_MIN_ROWS",
           "PACKED_BLOCK_ROWS", "FROZEN_PACKED_MIN_ROWS",
           "l2_cache_bytes", "CHUNK_ROWS", "CHUNK_MAX_ROWS",
           "PARALLEL_MIN_VECTORS", "PARALLEL_MIN_MACS", "PASS_MIN_BYTES", "PASS_LAYER_MIN_BYTES",
           "PASS_BYTES_PER_THREAD",
           "SPLIT_MIN_MACS", "plan_for", "run", "run_frozen", "clear"]

MAX_ROWS = 64
"""Batches of at most this many rows run through any plan. A stack of Dense layers also
takes up to :data:`DENSE_MAX_ROWS` rows, and any number when its weights stay in a core's
cache (they fit in one core's L2, :func:`l2_cache_bytes`, or in :data:`SMALL_WEIGHT_BYTES`):
in chunks of rows on every thread, from :data:`PACKED_MIN_ROWS` rows in the packed form;
other batches take the normal path, whose multithreaded BLAS products win there."""

DENSE_MAX_ROWS = 128
"""Rows up to which a stack of Dense layers of any size runs through its plan. Beyond, a
model whose weights do not stay in a core's cache is faster on the normal path: each chunk
of rows reads every weight again, where BLAS blocks its products for the caches
(benchmarks/inference_paths.py)."""

def _read_l2_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """One core's L2 cache as Linux's sysfs describes CPU 0 (``root``), or 0 where it does
    not."""
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2" and \
                    (index / "type").read_text().strip() in ("Unified", "Data"):
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 0


@functools.lru_cache(maxsize=None)
def l2_cache_bytes() -> int:
    """Bytes of one core's L2 cache (read once, from Linux's sysfs), or 0 where unknown: a
    plan then keeps to :data:`DENSE_MAX_ROWS` unless its weights fit in
    :data:`SMALL_WEIGHT_BYTES`, as for weights that do not fit."""
    return _read_l2_cache_bytes()


SMALL_WEIGHT_BYTES = 256 << 10
"""A stack of Dense layers whose weights take at most this many bytes runs through its plan
at any batch size, whatever :func:`l2_cache_bytes` says (any current core's L2 holds them):
its weights stay in each core's cache while the rows stream through, and the plan stays
ahead of the normal path at every size measured (the digits MLP; the mnist MLP's 1 MiB too,
on a core with a 2 MiB L2; benchmarks/inference_paths.py). Weights beyond a core's L2 (the
wide MLP) are read again from farther away for each chunk of rows, where BLAS blocks its
products for the caches."""

PACKED_MIN_ROWS = 160
"""Rows from which such a stack (weights in a core's cache, :data:`SMALL_WEIGHT_BYTES`)
runs through the packed driver instead of the chunked lanes form: the batch read in place,
in blocks of about :data:`PACKED_BLOCK_ROWS` rows that each pass through every layer
while their activations stay in the core's L2, each layer's weights in panels that the
product's tiles stream from L1 (``kernels/matmul.py``), the bias, σ and the finiteness
check run on each block while it is in cache. Checking the panels against the weights
costs a read of the weights per call (and packing, after a change), which from about this
many rows the faster products repay (benchmarks/inference_paths.py; measured again, with
the balanced chunks, the 4-row cuts and the 8-row tile: level at 144–160 rows, faster from
176, benchmarks/results/intel-xeon-2c-2026-12-07/NOTES.md)."""

PACKED_BLOCK_ROWS = 240
"""Rows per block of the packed driver, about: a block's activations and its slice of the
batch stay in the core's L2 cache while the layers' panels pass over them."""

FROZEN_PACKED_MIN_ROWS = 16
"""Rows from which a frozen model's stack (:func:`backprop.freeze`: its panels are never
checked against the weights) runs a batch below :data:`PACKED_MIN_ROWS` rows through the
packed driver too, where it would otherwise run on more than one thread (chunks of rows,
:data:`PARALLEL_MIN_MACS`, or a parallel pass of large weights, :data:`PASS_MIN_BYTES`):
one block of rows per thread, each through every layer, on the packed tiles and without an
exchange of activations between the cores, instead of chunks of the lanes form (whose tiles
hold a single vector of rows at 32 rows) or the lanes form's pass (whose threads hand every
layer's activations to each other). Below this, the threads' blocks are too few rows for
the packed tiles. A live model's check of its panels costs more than the tiles save below
:data:`PACKED_MIN_ROWS` (benchmarks/results/intel-xeon-2c-2026-12-06i/NOTES.md)."""

CHUNK_ROWS = 64
"""The chunked driver's rows per chunk, at most, unless a larger chunk (up to
:data:`CHUNK_MAX_ROWS`) shares the rows out more evenly among the threads (``_chunking``):
a chunk's activations stay close to L1."""

CHUNK_MAX_ROWS = 128
"""The chunked driver's rows per chunk, at most, whatever the balance: a chunk's
activations (and a stack's weights in a core's cache, :data:`SMALL_WEIGHT_BYTES`) stay in
L2."""


def _row_chunks_take(n: int, threads: int, lanes: int) -> bool:
    """Whether a batch of ``n`` rows of a stack of Dense layers whose weights stay in a
    core's cache, one that would run on ``threads`` > 1 threads, runs in the row form, one
    chunk of rows per thread (each read in place, every layer in the dot form, no exchange
    between the cores): from one vector of ``lanes`` rows while the batch is too small for
    two whole vectors on every thread (below ``2·threads - ½`` vectors: 56 float32 rows on
    two threads), unless it fills one vector per thread exactly. The lanes form there either
    pads and imbalances its chunks or runs the parallel pass of large weights (up to one
    vector of rows), whose tiles hold a single vector of rows and whose threads hand every
    layer's activations to each other: mnist at 16–24 and 40 rows 0.72–0.82× the time, 32
    and 48 rows 1.05× and 0.99× (hence the exception), 8 and 12 rows 1.10× and 1.26× (the
    pass in the row form, which splits the weights, stays; benchmarks/results/
    intel-xeon-2c-2026-12-06i/NOTES.md)."""
    return lanes <= n and 2 * n < (4 * threads - 1) * lanes and n % (threads * lanes) != 0


_FLAGS = dict(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy", nogil=True,
              cache=True)
"""``reassoc`` lets LLVM vectorise the dot products' sums; never ``nnan``/``ninf``: NaN and
inf propagate as in NumPy, and comparisons with NaN stay false (the finiteness flags below
count values failing ``|v| <= max``: an integer sum, which no float flag can fold away)."""

_THREAD_BUFFERS_KEPT = 8  # sets of buffers (batch sizes, drivers) a thread keeps per plan

PARALLEL_MIN_VECTORS = 2
"""A batch of fewer vectors of lanes (16 float32 rows, 8 float64; the last may be partial)
runs on one thread, so two threads start at 17 float32 rows, one vector each (the second
partial: from 17 to 31 rows of the mnist MLP, two chunks took 0.80–0.89× the time of the
lanes form's parallel pass, benchmarks/results/intel-xeon-2c-2026-12-06i/NOTES.md). With
Numba's workers awake (calls back to back; they spin briefly after each, see
``backprop.kernels``) two 16-row chunks of the
784-256-256-10 MLP took 0.74× the time of one 32-row call; after 3 ms idle, when the second
thread must be woken, 1.06× (docs/design.md)."""

PARALLEL_MIN_MACS = 1 << 21
"""A batch whose product sizes add up to fewer multiply-adds runs on one thread: waking the
second thread of a parallel region costs tens of microseconds in Numba's driver (argument
unpacking, the scheduler), the time of about this much work on one core
(benchmarks/inference_paths.py). Such a batch may still split a large layer over the
threads (:data:`SPLIT_MIN_MACS`)."""


PASS_MIN_BYTES = 1 << 19
"""A batch of a stack of Dense layers that runs on the calling thread (fewer rows than
:data:`PARALLEL_MIN_VECTORS` vectors of lanes, or less work than :data:`PARALLEL_MIN_MACS`)
runs as one parallel pass when Numba runs more than one thread and the layers it splits
(:data:`PASS_LAYER_MIN_BYTES`) hold at least this many bytes of weights: every thread takes
its block of the output features of each of those layers, and the threads wait for each other
between layers inside the one parallel region (``_pass_source``). A product of a few rows is
bound by reading the weights, which the threads then share, each reading its block of weight
rows from its own core's cache. The region's start and each hand-over of activations between
the cores cost a few microseconds, which only the reading of large weights repays: the mnist
MLP's 1 MiB from one row on, never the digits MLP's 100 KiB (benchmarks/inference_paths.py)."""

PASS_LAYER_MIN_BYTES = 1 << 16
"""A layer of a parallel pass (:data:`PASS_MIN_BYTES`) whose weights take at least this many
bytes, and that ends in no row op (softmax), is split into one block of output features per
thread; any other layer runs as one block, on whichever thread reaches it first."""

PASS_BYTES_PER_THREAD = 1 << 18
"""A parallel pass (:data:`PASS_MIN_BYTES`) runs on at most one thread per this many bytes of
the weights it splits (and on at least two): the mnist MLP's 1 MiB on up to four threads. A
block with less to read costs its thread's barriers more than it saves; Numba's other
threads get no iteration of the pass and wait for its end."""

SPLIT_MIN_MACS = 1 << 20
"""A Dense layer of a batch that runs on the calling thread (fewer rows than
:data:`PARALLEL_MIN_VECTORS` vectors of lanes, or less work than
:data:`PARALLEL_MIN_MACS`) and not in a parallel pass (:data:`PASS_MIN_BYTES`: a plan with
layers other than Dense, or small weights) whose product has at least this many
multiply-adds runs split over Numba's threads by its output features, each thread on its
block of the weight rows: one parallel region for that layer, the other layers on the
calling thread (the region's start costs about what a second thread saves on a product of
a few rows of the 784×256 layer of the mnist MLP, docs/design.md)."""


class _Stale(Exception):
    """Raised by an op when the structure it was built from has changed."""


class _Unsupported(Exception):
    """A layer the plans do not cover: the model takes the normal path."""


# ---------------------------------------------------------------------------------------
# Kernels. Module-level functions (not closures over other functions), so that Numba's disk
# cache finds them again in the next process; compiled on first use.
_DEPENDS = hashlib.sha256(b"".join(
    Path(m.__file__).read_bytes()
    for m in (inline, vecmath, _activations, atomics, matmul))).hexdigest()


class _Cache(FunctionCache):
    """Numba's on-disk cache, keyed also on the source of the kernel modules whose functions
    are compiled into these kernels (Numba keys an entry by this file alone)."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (_DEPENDS,)


def _jit(fn):
    dispatcher = njit(**_FLAGS)(fn)
    if hasattr(dispatcher, "py_func"):  # (under NUMBA_DISABLE_JIT njit returns fn itself)
        dispatcher._cache = _Cache(dispatcher.py_func)
    return dispatcher


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Mark the calling function to vectorise to the widest registers (512 bits with
    AVX-512, where LLVM's default is 256): the dot products then run twice the lanes."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, inline.WIDE_VECTORS)
        return context.get_dummy_value()
    return types.none(), codegen


def _cast(value, like):
    """``value`` as a scalar of the dtype of the array ``like`` (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(_cast)
def _cast_impl(value, like):
    scalar = np.float32 if like.dtype == types.float32 else np.float64
    return lambda value, like: scalar(value)


def _largest(like):
    """The largest finite value of the dtype of the array ``like`` (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(_largest)
def _largest_impl(like):
    top = np.finfo(np.float32 if like.dtype == types.float32 else np.float64).max
    return lambda like: top


@inline.jit
def _where(c, a, b):
    return a if c else b


@functools.lru_cache(maxsize=None)
def _math(scalar) -> Math:
    """The math of the formula builders, as the numba_cpu kernels instantiate it: vecmath's
    vectorisable functions, constants and ``alpha`` of the array's NumPy type ``scalar``."""
    return Math(K=scalar, cast=scalar, where=_where, abs=abs, exp=vecmath.exp,
                expm1=vecmath.expm1, tanh=vecmath.tanh, sigmoid=vecmath.sigmoid,
                softplus=vecmath.softplus, ndtr=vecmath.ndtr, ndtr_pdf=vecmath.ndtr_pdf)


def _activation_impl(act, v, alpha):
    name = act.literal_value if isinstance(act, types.StringLiteral) else None
    record = RECORDS.get(name)
    if record is None:
        return None
    return record.forward(_math(np.float32 if v == types.float32 else np.float64))


@inline.inlined(_activation_impl)
def _activate(act, v, alpha):
    """``σ(v)`` of the record named by the literal ``act``, inlined (compiled code only: the
    plans are off under ``NUMBA_DISABLE_JIT``)."""
    raise NotImplementedError("compiled code only")


@_jit
def _gemm(x, W, out):
    """``out = x Wᵀ``: 4×4 blocks of dot products, each reduced over the features."""
    _prefer_wide_vectors()
    n, k_in = x.shape
    m = W.shape[0]
    zero = _cast(0.0, out)
    blocks = m // 4
    for jb in range(blocks):
        j = jb * 4
        i = 0
        while i + 4 <= n:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero
            for k in range(k_in):
                w0, w1, w2, w3 = W[j, k], W[j + 1, k], W[j + 2, k], W[j + 3, k]
                v = x[i, k]
                a00 += v * w0; a01 += v * w1; a02 += v * w2; a03 += v * w3  # noqa: E702
                v = x[i + 1, k]
                a10 += v * w0; a11 += v * w1; a12 += v * w2; a13 += v * w3  # noqa: E702
                v = x[i + 2, k]
                a20 += v * w0; a21 += v * w1; a22 += v * w2; a23 += v * w3  # noqa: E702
                v = x[i + 3, k]
                a30 += v * w0; a31 += v * w1; a32 += v * w2; a33 += v * w3  # noqa: E702
            out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = a00, a01, a02, a03
            out[i + 1, j], out[i + 1, j + 1], out[i + 1, j + 2], out[i + 1, j + 3] = \
                a10, a11, a12, a13
            out[i + 2, j], out[i + 2, j + 1], out[i + 2, j + 2], out[i + 2, j + 3] = \
                a20, a21, a22, a23
            out[i + 3, j], out[i + 3, j + 1], out[i + 3, j + 2], out[i + 3, j + 3] = \
                a30, a31, a32, a33
            i += 4
        while i < n:
            a0 = a1 = a2 = a3 = zero
            for k in range(k_in):
                v = x[i, k]
                a0 += v * W[j, k]; a1 += v * W[j + 1, k]  # noqa: E702
                a2 += v * W[j + 2, k]; a3 += v * W[j + 3, k]  # noqa: E702
            out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = a0, a1, a2, a3
            i += 1
    for j in range(blocks * 4, m):
        for i in range(n):
            a = zero
            for k in range(k_in):
                a += x[i, k] * W[j, k]
            out[i, j] = a


# The lanes form, for batches of at least one vector of rows: a batch is kept transposed,
# ``(features, P)`` with the rows along the vector lanes (P: the rows rounded up to whole
# vectors, the padding lanes zero in the input and never read in the output), so that
# ``Zᵀ = W Xᵀ`` is a sum over k of a broadcast weight times a row of ``Xᵀ``: tiles of
# ``Zᵀ`` stay in vector registers across the whole sum, with no horizontal reductions (the
# dot form above pays one per output, which dominates when the features are few).
_lanes = matmul.lanes

_tile82, _tile81, _tile42, _tile41 = (matmul.make_tile(8, 2), matmul.make_tile(8, 1),
                                      matmul.make_tile(4, 2), matmul.make_tile(4, 1))
_tile161 = matmul.make_tile(16, 1)


@_jit
def _tiles(xT, W, outT):
    """``outT = W xT`` for ``xT`` ``(K, P)``, ``outT`` ``(M, P)``, P a multiple of the lanes:
    tiles of 8 (then 4) weight rows × 2 vectors of lanes; a last single vector of lanes (a
    chunk of one vector of rows, the parallel driver's smallest) in tiles of 16, 8, then 4
    rows (16 accumulators per ``xT`` load: 1.3× the 8-row tile's speed on a 784-feature
    layer, docs/design.md); the last rows alone. Every tile sums over k in the same order,
    so the tile shapes never change a result."""
    _prefer_wide_vectors()
    k_in, p = xT.shape
    m = W.shape[0]
    wide = 2 * _lanes(xT)
    pairs = p - p % wide  # lanes in whole pairs of vectors
    j = 0
    while j + 8 <= m:
        i = 0
        while i < pairs:
            _tile82(xT, W, outT, j, i)
            i += wide
        j += 8
    if j + 4 <= m:
        i = 0
        while i < pairs:
            _tile42(xT, W, outT, j, i)
            i += wide
        j += 4
    if pairs < p:  # one vector of lanes left, over rows [0, j)
        r = 0
        while r + 16 <= j:
            _tile161(xT, W, outT, r, pairs)
            r += 16
        if r + 8 <= j:
            _tile81(xT, W, outT, r, pairs)
            r += 8
        if r + 4 <= j:
            _tile41(xT, W, outT, r, pairs)
    zero = _cast(0.0, xT)
    for jj in range(j, m):
        for lane in range(p):
            outT[jj, lane] = zero
        for k in range(k_in):
            w = W[jj, k]
            for lane in range(p):
                outT[jj, lane] += w * xT[k, lane]


@_jit
def _to_lanes(x, xT):
    """``xT[:, :n] = xᵀ`` (:func:`backprop.kernels.matmul.transpose`), the padding lanes
    zero. Whether ``x`` is finite is told by the first Dense kernel, which reads ``xT``
    next, at no cost of its own: a count here would slow this copy."""
    matmul.transpose(x, xT)
    n, k_in = x.shape
    zero = _cast(0.0, x)
    for k in range(k_in):
        for i in range(n, xT.shape[1]):
            xT[k, i] = zero


@_jit
def _from_lanes(outT, out):
    """``out = outT[:, :n]ᵀ``."""
    n, m = out.shape
    for i in range(n):
        for j in range(m):
            out[i, j] = outT[j, i]


@_jit
def _softmax_columns(outT):
    """:func:`_softmax_rows` of the transposed batch: each lane over the features."""
    m, p = outT.shape
    top = outT[0].copy()
    for j in range(m):
        for lane in range(p):
            top[lane] = vecmath.fmax(top[lane], outT[j, lane])
    total = np.zeros(p)
    for j in range(m):
        for lane in range(p):
            e = vecmath.exp(outT[j, lane] - top[lane])
            outT[j, lane] = e
            total[lane] += e
    for lane in range(p):
        top[lane] = _cast(1.0 / total[lane], outT)
    for j in range(m):
        for lane in range(p):
            outT[j, lane] = outT[j, lane] * top[lane]


@_jit
def _log_softmax_columns(outT):
    """:func:`_log_softmax_rows` of the transposed batch."""
    m, p = outT.shape
    top = outT[0].copy()
    for j in range(m):
        for lane in range(p):
            top[lane] = vecmath.fmax(top[lane], outT[j, lane])
    total = np.zeros(p)
    for j in range(m):
        for lane in range(p):
            outT[j, lane] = outT[j, lane] - top[lane]
            total[lane] += vecmath.exp(outT[j, lane])
    for lane in range(p):
        top[lane] = _cast(np.log(total[lane]), outT)
    for j in range(m):
        for lane in range(p):
            outT[j, lane] = outT[j, lane] - top[lane]


@_jit
def _softmax_rows(out):
    """Each row ``e^(z - max z) / Σ e^(z - max z)`` in place, as the numba_cpu kernel: the
    maximum skips NaN, the sum runs in float64, its reciprocal is rounded to the dtype."""
    n, m = out.shape
    for i in range(n):
        top = out[i, 0]
        for j in range(m):
            top = vecmath.fmax(top, out[i, j])
        for j in range(m):
            out[i, j] = vecmath.exp(out[i, j] - top)
        total = 0.0
        for j in range(m):
            total += out[i, j]
        inv = _cast(1.0 / total, out)
        for j in range(m):
            out[i, j] = out[i, j] * inv


@_jit
def _log_softmax_rows(out):
    """Each row ``z - max z - log Σ e^(z - max z)`` in place (the sum in float64)."""
    n, m = out.shape
    for i in range(n):
        top = out[i, 0]
        for j in range(m):
            top = vecmath.fmax(top, out[i, j])
        for j in range(m):
            out[i, j] = out[i, j] - top
        total = 0.0
        for j in range(m):
            total += vecmath.exp(out[i, j])
        lse = _cast(np.log(total), out)
        for j in range(m):
            out[i, j] = out[i, j] - lse


_ROW, _LANES = 0, 1  # Dense kernel forms (the layout of input and output)


def _dense_kernel(act: str, row: int, form: int):
    """``out = row_op(σ(x Wᵀ + b))`` (row op 0: none, 1: softmax, 2: log-softmax), in the
    dot form on ``(n, ·)`` batches (``_ROW``) or in the lanes form on transposed ``(·, P)``
    batches whose first ``n`` lanes are rows (``_LANES``). Returns whether every
    ``x Wᵀ + b`` of the real rows is finite (a NaN or inf input value makes its whole
    output row non-finite, so this also tells whether ``x`` may hold one)."""
    epilogue = _kernel(_EPILOGUES, _epilogue_kernel, act, row)

    def dense(x, n, W, b, alpha, out):
        if form == _ROW:
            _gemm(x, W, out)
            return epilogue(out, b, alpha)
        top = _largest(out)
        bad = 0
        _tiles(x, W, out)
        m, p = out.shape
        for j in range(m):
            for lane in range(p):
                v = out[j, lane]
                if b is not None:
                    v += b[j]
                bad += 0 if abs(v) <= top or lane >= n else 1
                out[j, lane] = _activate(act, v, alpha)
        if row == 1:
            _softmax_columns(out)
        elif row == 2:
            _log_softmax_columns(out)
        return bad == 0
    dense.__qualname__ = dense.__name__ = f"dense_{act}_{row}_{form}"  # the cache's file names
    return _jit(dense)


def _epilogue_kernel(act: str, row: int):
    """``z = row_op(σ(z + b))`` in place on ``(n, m)`` rows of products ``z = x Wᵀ``
    (``b`` None: no bias); returns whether every ``z + b`` was finite (a NaN or inf input
    value makes its whole row of products non-finite, so this also tells whether ``x`` may
    hold one)."""
    def epilogue(z, b, alpha):
        top = _largest(z)
        bad = 0
        rows, m = z.shape
        for i in range(rows):
            for j in range(m):
                v = z[i, j]
                if b is not None:
                    v += b[j]
                bad += 0 if abs(v) <= top else 1  # NaN and ±inf: 1 (no FP sum to fold)
                z[i, j] = _activate(act, v, alpha)
        if row == 1:
            _softmax_rows(z)
        elif row == 2:
            _log_softmax_rows(z)
        return bad == 0
    epilogue.__qualname__ = epilogue.__name__ = f"epilogue_{act}_{row}"
    return _jit(epilogue)


def _act_kernel(act: str, row: int):
    """``out = row_op(σ(x))``, σ elementwise."""
    def elementwise(x, alpha, out):
        n, m = x.shape
        for i in range(n):
            for j in range(m):
                out[i, j] = _activate(act, x[i, j], alpha)
        if row == 1:
            _softmax_rows(out)
        elif row == 2:
            _log_softmax_rows(out)
    elementwise.__qualname__ = elementwise.__name__ = f"elementwise_{act}_{row}"
    return _jit(elementwise)


@_jit
def _batchnorm(x, mean, var, gamma, beta, eps, out):
    """``out = (x - μ) r γ + β`` with ``r = 1/sqrt(σ² + ε)`` per feature, in the dtype and in
    the order of BatchNorm1d's eval forward (``gamma`` None: no affine part)."""
    n, m = x.shape
    e = _cast(eps, x)
    one = _cast(1.0, x)
    for j in range(m):
        r = one / np.sqrt(var[j] + e)
        for i in range(n):
            v = (x[i, j] - mean[j]) * r
            if gamma is not None:
                v = v * gamma[j] + beta[j]
            out[i, j] = v


@_jit
def _add(x, h, out):
    """``out = x + h``."""
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            out[i, j] = x[i, j] + h[i, j]


@_jit
def _all_finite(x):
    n, m = x.shape
    top = _largest(x)
    bad = 0
    for i in range(n):
        for j in range(m):
            bad += 0 if abs(x[i, j]) <= top else 1
    return bad == 0


_threads = matmul.threads  # (a module global: tests replace it)


_DENSE: dict = {}
_EPILOGUES: dict = {}
_ELEMENTWISE: dict = {}
_ROW_OPS = {"softmax": 1, "log_softmax": 2}


def _kernel(table, make, *key):
    kernel = table.get(key)
    if kernel is None:
        kernel = table[key] = make(*key)
    return kernel


_DRIVERS: dict = {}
_DRIVERS_LOCK = threading.Lock()


def _kernel_name(act: str, row: int) -> str:
    return "dense_" + "".join(c if c.isalnum() else "_" for c in act) + f"_{row}"


def _driver_source(spec, lanes: bool = True) -> str:
    """The parallel driver of a stack of Dense layers, ``spec`` = ``((activation, row op),
    ...)``: for each chunk ``c`` of ``chunk`` rows (in parallel), ``B0[c] = x[rows]ᵀ``,
    ``B{i+1}[c] = layer i (B{i}[c])`` in the lanes form, ``out[rows] = B{L}[c]ᵀ``; whether
    each chunk of ``x`` is finite goes to ``flags[c]`` (an array, not a reduction: a
    reduction costs the parallel region an allocation per call). ``lanes`` False: the row
    form instead (``_row_chunks_take``), ``x[rows]`` read in place and
    ``B{i}[c, :m]`` the hidden activations of the chunk's ``m`` rows."""
    layers = len(spec)
    buffers = ", ".join(f"B{i}" for i in range(0 if lanes else 1, layers + (1 if lanes else 0)))
    params = ", ".join(f"W{i}, b{i}, a{i}" for i in range(layers))
    name = "plan_driver" if lanes else "row_driver"
    # the kernels by their names (dense_<activation>_<row op>): the text alone must say
    # which machine code the file stands for, since Numba's disk cache finds a driver's
    # compiled code by its file and bytecode, not by the functions its globals hold
    lines = [f"# the parallel inference driver of the Dense stack {spec!r}, "
             f"{'lanes' if lanes else 'row'} form",
             f"def {name}(x, out, chunk, flags, {buffers}{', ' if buffers else ''}{params}):",
             "    n = x.shape[0]",
             "    for c in prange((n + chunk - 1) // chunk):",
             "        r0 = c * chunk",
             "        r1 = min(n, r0 + chunk)",
             "        m = r1 - r0"]
    if lanes:
        lines.append("        to_lanes(x[r0:r1], B0[c])")
    # the first layer's kernel says whether the chunk of x is finite (see _dense_kernel)
    for i, (act, row) in enumerate(spec):
        if lanes:
            src, dst, kernel = f"B{i}[c]", f"B{i + 1}[c]", _kernel_name(act, row) + "_lanes"
        else:
            src = "x[r0:r1]" if i == 0 else f"B{i}[c, :m]"
            dst = "out[r0:r1]" if i == layers - 1 else f"B{i + 1}[c, :m]"
            kernel = _kernel_name(act, row) + "_row"
        lines.append(f"        {'flags[c] = ' if i == 0 else ''}{kernel}"
                     f"({src}, m, W{i}, b{i}, a{i}, {dst})")
    if lanes:
        lines.append(f"        from_lanes(B{layers}[c], out[r0:r1])")
    lines.append("")
    return "\n".join(lines)


def _serial_source(spec, lanes: bool) -> str:
    """The serial driver of a stack of Dense layers, ``spec`` = ``((activation, row op),
    ...)``, on the calling thread: the whole program in one Numba call (its ops make one
    per layer, each with its dispatch and its Python around it), through the program's
    buffers: in the row form ``B1 … B{L-1}`` ``(n, ·)``, the last layer into ``out``; in
    the lanes form ``B0 = xᵀ``, ``B1 … BL`` transposed and ``out = BLᵀ``. Returns whether
    ``x`` is finite (the first layer's kernel, see :func:`_dense_kernel`)."""
    layers = len(spec)
    first, last = (0, layers) if lanes else (1, layers - 1)
    buffers = "".join(f"B{i}, " for i in range(first, last + 1))
    params = ", ".join(f"W{i}, b{i}, a{i}" for i in range(layers))
    suffix = "_lanes" if lanes else "_row"
    name = "serial_lanes_driver" if lanes else "serial_row_driver"
    lines = [f"# the serial inference driver of the Dense stack {spec!r}, "
             f"{'lanes' if lanes else 'row'} form",
             f"def {name}(x, out, {buffers}{params}):",
             "    n = x.shape[0]"]
    if lanes:
        lines.append("    to_lanes(x, B0)")
    for i, (act, row) in enumerate(spec):
        src = f"B{i}" if lanes or i else "x"
        dst = f"B{i + 1}" if lanes or i < layers - 1 else "out"
        lines.append(f"    {'finite = ' if i == 0 else ''}{_kernel_name(act, row)}{suffix}"
                     f"({src}, n, W{i}, b{i}, a{i}, {dst})")
    if lanes:
        lines.append(f"    from_lanes(B{layers}, out)")
    lines += ["    return finite", ""]
    return "\n".join(lines)


def _serial_driver_for(spec, lanes: bool):
    """The serial driver of ``spec`` in one form (built once per process; compiled on
    first call)."""
    def build():
        return _compile_driver(_serial_source(spec, lanes),
                               "serial_lanes_driver" if lanes else "serial_row_driver",
                               _form_kernels(spec, lanes), parallel=False)
    return _cached_driver(("serial", spec, lanes), build)


def _form_kernels(spec, lanes: bool) -> dict:
    """The Dense kernels of ``spec`` in the lanes or the row form, by the names the
    drivers' sources call them (``dense_<activation>_<row op>_lanes`` or ``_row``)."""
    form, suffix = (_LANES, "_lanes") if lanes else (_ROW, "_row")
    return {_kernel_name(act, row) + suffix: _kernel(_DENSE, _dense_kernel, act, row, form)
            for act, row in spec}


@functools.lru_cache(maxsize=1024)
def _chunking(n: int, threads: int, lanes: int, preferred: int, most: int
              ) -> tuple[int, int]:
    """``(chunk, chunks)`` for the chunked driver: ``n`` rows in ``chunks`` chunks of
    ``chunk`` rows (a whole number of ``lanes``, of at least two vectors where the threads'
    shares have them, for the tiles; the last chunk holds the rest) on ``threads``.

    A parallel loop gives each thread a run of consecutive chunks (the longer runs first),
    so the size decides the balance: 160 float32 rows on two threads in chunks of 64 gave
    one thread 128 rows and the other 32; in chunks of 80, 80 each. The size that leaves the
    busiest thread the fewest rows wins; among those, the largest of at most ``preferred``
    rows, else the smallest above (up to ``most``; benchmarks/results/
    intel-xeon-2c-2026-12-06i/NOTES.md)."""
    vectors = -(-n // lanes)
    share = -(-vectors // threads)
    best = None
    for size in range(min(2, share), max(min(2, share), min(vectors, most // lanes)) + 1):
        chunk = size * lanes
        chunks = -(-n // chunk)
        busiest, start = 0, 0
        for t in range(threads):  # runs of ⌈chunks/threads⌉, then ⌊…⌋ chunks
            run = chunks // threads + (1 if t < chunks % threads else 0)
            busiest = max(busiest, min(n, (start + run) * chunk) - min(n, start * chunk))
            start += run
        key = (busiest, chunk > preferred, -chunk if chunk <= preferred else chunk)
        if best is None or key < best[0]:
            best = (key, chunk, chunks)
    return best[1], best[2]


def _driver_dir() -> Path | None:
    """Where the drivers' sources are written: ``$XDG_CACHE_HOME/backprop/inference``
    (``~/.cache``), as cuda_host keeps its libraries; None where it cannot be created."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "backprop" / "inference"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _driver_file(source: str) -> str:
    """The path of a file holding ``source`` (written once, atomically: a rewrite would
    change its modification time, which Numba's disk cache takes as an edit), or a
    pseudo-path where no cache directory can be written (the driver is then compiled
    without a disk cache)."""
    digest = hashlib.sha256("\0".join([
        source, _DEPENDS, hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        numba.__version__]).encode()).hexdigest()[:24]
    folder = _driver_dir()
    if folder is None:
        return f"<backprop plan driver {digest}>"
    path = folder / f"plan_driver_{digest}.py"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return f"<backprop plan driver {digest}>"
    return str(path)


def _driver_for(spec, lanes: bool = True):
    """The parallel driver of ``spec`` in the lanes or the row form (built once per
    process; compiled on first call)."""
    def build():
        return _compile_driver(_driver_source(spec, lanes),
                               "plan_driver" if lanes else "row_driver",
                               _form_kernels(spec, lanes))
    return _cached_driver(spec if lanes else ("rows", spec), build)


def _cached_driver(key, build):
    """``_DRIVERS[key]``, made by ``build()`` the first time (under the drivers' lock)."""
    with _DRIVERS_LOCK:
        driver = _DRIVERS.get(key)
        if driver is None:
            driver = _DRIVERS[key] = build()
    return driver


def _split_source(act: str, kernel: str, bias: bool, lanes: bool) -> str:
    """The split driver of one Dense layer (activation ``act``, no row op): thread ``t``
    computes output features ``[t·w, (t+1)·w)`` from its block of weight rows, whether they
    are finite into ``flags[t]``. In the lanes form (``out`` transposed) its block of ``out``
    is a block of rows; in the row form each block goes to ``parts[t]``, and ``out``
    gathers them after. ``kernel``: the name the layer's kernel has in the source."""
    b = "b[j0:j0 + width]" if bias else "None"
    head = [f"# the split driver of a Dense layer, activation {act!r}, bias {bias}, "
            f"{'lanes' if lanes else 'row'} form",
            "def split_driver(x, n, W, b, alpha, parts, flags, out):",
            "    width = W.shape[0] // flags.shape[0]",
            "    for t in prange(flags.shape[0]):",
            "        j0 = t * width"]
    if lanes:
        return "\n".join(head + [
            f"        flags[t] = {kernel}(x, n, W[j0:j0 + width], {b}, alpha, "
            "out[j0:j0 + width])", ""])
    return "\n".join(head + [
        f"        flags[t] = {kernel}(x, n, W[j0:j0 + width], {b}, alpha, parts[t])",
        "    for t in range(flags.shape[0]):",
        "        for i in range(out.shape[0]):",
        "            for j in range(width):",
        "                out[i, t * width + j] = parts[t, i, j]", ""])


def _split_driver_for(act: str, bias: bool, lanes: bool):
    """The split driver of a Dense layer (built once per process; compiled on first call)."""
    def build():
        # the row and lanes kernels under different names: the source text alone must say
        # which machine code its cached driver stands for (see _driver_source)
        name = _kernel_name(act, 0) + ("_lanes" if lanes else "")
        kernel = _kernel(_DENSE, _dense_kernel, act, 0, _LANES if lanes else _ROW)
        return _compile_driver(_split_source(act, name, bias, lanes), "split_driver",
                               {name: kernel})
    return _cached_driver(("split", act, bias, lanes), build)


def _pass_source(spec, lanes: bool, splits) -> str:
    """The parallel pass of a stack of Dense layers, ``spec`` = ``((activation, row op),
    ...)``, on a batch of ``n`` rows in the row form (``lanes`` False: ``x`` and the hidden
    ``B1 … B{L-1}`` are ``(n, ·)``) or the lanes form (``B0 = xᵀ``, ``B1 … BL`` transposed).

    One iteration per thread (``flags.shape[0]`` of them). A layer that ``splits`` is cut
    into blocks of ``widths[i]`` output features, any other is one block (its kernel called
    on the whole arrays, as on one thread: a row op then sums in the same order).
    ``counters[i·(T+1) + 1 + k]`` claims block ``k`` of layer ``i`` (the first thread to add
    one to it computes it), ``counters[i·(T+1)]`` counts its blocks done, and every thread
    waits for all of layer ``i`` before it starts on layer ``i + 1``. Thread ``t`` claims
    its own block ``t`` first (the same weight rows on every call, so they stay in its
    core's cache), then any block still unclaimed: the pass ends whichever threads run, even
    if the iterations run one after the other on one thread (a thread only ever waits for
    blocks that a running thread has claimed). The first layer's blocks say whether ``x`` is
    finite (``flags``; see :func:`_dense_kernel`), and so does the result."""
    layers = len(spec)
    first = 0 if lanes else 1
    buffers = ", ".join(f"B{i}" for i in range(first, layers + (1 if lanes else 0)))
    params = ", ".join(f"W{i}, b{i}, a{i}" for i in range(layers))
    lines = [f"# the parallel pass of the Dense stack {spec!r}, {'lanes' if lanes else 'row'} "
             f"form, split layers {tuple(splits)!r}",
             f"def pass_driver(x, n, widths, counters, flags, {buffers}{', ' if buffers else ''}"
             f"out, {params}):",
             "    threads = flags.shape[0]",
             "    stride = threads + 1",
             # a loop, not counters[:] = 0: Numba would make that a parallel region of its
             # own, with a second start of the threads
             "    for i in range(counters.shape[0]):",
             "        counters[i] = 0"]
    if lanes:
        lines.append("    to_lanes(x, B0)")
    lines.append("    for t in prange(threads):")
    for i, ((act, row), split) in enumerate(zip(spec, splits)):
        kernel = _kernel_name(act, row) + ("_lanes" if lanes else "")
        last = i == layers - 1
        src = f"B{i}" if lanes or i else "x"
        dst = f"B{i + 1}" if lanes or not last else "out"
        flag = "flags[0] = " if i == 0 else ""
        if split:
            lines += [f"        w = widths[{i}]",
                      f"        m = W{i}.shape[0]",
                      "        blocks = (m + w - 1) // w",
                      "        for s in range(blocks):",
                      "            k = (t + s) % blocks",
                      f"            if fetch_add(counters, {i} * stride + 1 + k) == 0:",
                      "                j0 = k * w",
                      "                j1 = min(m, j0 + w)",
                      f"                {flag.replace('[0]', '[k]')}{kernel}({src}, n, "
                      f"W{i}[j0:j1], None if b{i} is None else b{i}[j0:j1], a{i}, "
                      f"{dst}[{'' if lanes else ':, '}j0:j1])",
                      f"                fetch_add(counters, {i} * stride)"]
        else:
            lines += ["        blocks = 1",
                      f"        if fetch_add(counters, {i} * stride + 1) == 0:",
                      f"            {flag}{kernel}({src}, n, W{i}, b{i}, a{i}, {dst})",
                      f"            fetch_add(counters, {i} * stride)"]
        if not last:
            lines.append(f"        wait_until(counters, {i} * stride, blocks)")
    lines += ["    finite = True",
              "    for k in range((W0.shape[0] + widths[0] - 1) // widths[0]):",
              "        finite = finite and flags[k]"]
    if lanes:
        lines.append(f"    from_lanes(B{layers}, out)")
    lines += ["    return finite", ""]
    return "\n".join(lines)


def _pass_driver_for(spec, lanes: bool, splits):
    """The parallel pass of ``spec`` in one form with those layers split (built once per
    process; compiled on first call)."""
    splits = tuple(bool(split) for split in splits)

    def build():
        kernels = {_kernel_name(act, row) + ("_lanes" if lanes else ""):
                   _kernel(_DENSE, _dense_kernel, act, row, _LANES if lanes else _ROW)
                   for act, row in spec}
        kernels.update(fetch_add=atomics.fetch_add, wait_until=atomics.wait_until)
        return _compile_driver(_pass_source(spec, lanes, splits), "pass_driver", kernels)
    return _cached_driver(("pass", spec, lanes, splits), build)


def _epilogue_name(act: str, row: int) -> str:
    return "epilogue_" + _kernel_name(act, row)[len("dense_"):]


def _packed_source(spec) -> str:
    """The packed driver of a stack of Dense layers, ``spec`` = ``((activation, row op),
    ...)``, for a large batch: ``x`` read in place in blocks of ``rows`` rows, each block
    through every layer before the next (its activations ``H{i}[t]`` in the thread's
    cache), each layer ``packed_product`` (``kernels/matmul.py``) then its epilogue.

    Block ``c`` holds tiles (of ``tile`` rows) ``c·tiles//blocks`` up to the next block's
    first: blocks of whole tiles that differ by at most one tile.

    One iteration per thread. First the threads bring every layer's panels (``P{i}``) up to
    date: ``counters[0]`` claims a panel, which is packed again where its weights differ
    from the copy ``S{i}`` they were packed from (``mode`` 0; 1: packed whatever the copy
    holds; 2: neither, the panels of a frozen model), ``counters[1]`` counts the panels
    done, and every thread waits for all of them. Then ``counters[2]`` claims the blocks of
    rows in order: a thread that runs late (its core shared with another program) takes
    fewer blocks instead of holding up the others, and a thread only ever waits for panels
    that a running thread has claimed. The first layer's epilogue of block ``c`` says
    whether it was finite into ``flags[c]``."""
    layers = len(spec)
    hidden = ", ".join(f"H{i}" for i in range(1, layers))
    packed = ", ".join(f"P{i}, S{i}" for i in range(layers))
    params = ", ".join(f"W{i}, b{i}, a{i}" for i in range(layers))
    ends = [" + ".join(f"P{j}.shape[0]" for j in range(i + 1)) for i in range(layers)]
    lines = [f"# the packed inference driver of the Dense stack {spec!r}",
             f"def packed_driver(x, out, tile, threads, mode, counters, flags, "
             f"{hidden}{', ' if hidden else ''}{packed}, {params}):",
             "    n = x.shape[0]",
             "    blocks = flags.shape[0]",
             "    tiles = (n + tile - 1) // tile",
             f"    total = 0 if mode == 2 else {ends[-1]}",
             "    fresh = mode == 1",
             # a loop, not counters[:] = 0 (see _pass_source)
             "    for i in range(counters.shape[0]):",
             "        counters[i] = 0",
             "    for t in prange(threads):",
             "        while True:",
             "            q = fetch_add(counters, 0)",
             "            if q >= total:",
             "                break"]
    for i in range(layers):
        start = f" - ({ends[i - 1]})" if i else ""
        test = "if q < " if i == 0 else "elif q < " if i < layers - 1 else "else"
        lines += [f"            {test}{ends[i] if i < layers - 1 else ''}:",
                  f"                refresh_panel(W{i}, S{i}, P{i}, q{start}, fresh)"]
    lines += ["            fetch_add(counters, 1)",
              "        wait_until(counters, 1, total)",
              "        while True:",
              "            c = fetch_add(counters, 2)",
              "            if c >= blocks:",
              "                break",
              "            r0 = c * tiles // blocks * tile",
              "            r1 = min(n, (c + 1) * tiles // blocks * tile)",
              "            m = r1 - r0"]
    for i, (act, row) in enumerate(spec):
        src = "x[r0:r1]" if i == 0 else f"H{i}[t, :m]"
        dst = "out[r0:r1]" if i == layers - 1 else f"H{i + 1}[t, :m]"
        flag = "flags[c] = " if i == 0 else ""
        lines += [f"            packed_product({src}, P{i}, {dst})",
                  f"            {flag}{_epilogue_name(act, row)}({dst}, b{i}, a{i})"]
    lines.append("")
    return "\n".join(lines)


def _packed_driver_for(spec):
    """The packed driver of ``spec`` (built once per process; compiled on first call)."""
    def build():
        kernels = {_epilogue_name(act, row): _kernel(_EPILOGUES, _epilogue_kernel, act, row)
                   for act, row in spec}
        kernels.update(fetch_add=atomics.fetch_add, wait_until=atomics.wait_until,
                       refresh_panel=matmul.refresh_panel,
                       packed_product=matmul.packed_product)
        return _compile_driver(_packed_source(spec), "packed_driver", kernels)
    return _cached_driver(("packed", spec), build)


def _compile_driver(source: str, name: str, kernels: dict, parallel: bool = True):
    """The parallel (or, not ``parallel``, serial) function ``name`` defined by ``source``
    (which calls ``kernels`` by name), with Numba's disk cache where its source file could
    be written."""
    filename = _driver_file(source)
    # __name__: Numba's disk cache re-imports a function's module when it loads the machine
    # code (to rebuild its environment); the driver's is this module
    scope = {"__name__": __name__, "prange": numba.prange, "to_lanes": _to_lanes,
             "from_lanes": _from_lanes, **kernels}
    exec(compile(source, filename, "exec"), scope)  # noqa: S102 (our own source)
    cached = not filename.startswith("<")
    driver = njit(parallel=parallel, **{**_FLAGS, "cache": cached})(scope[name])
    if cached and hasattr(driver, "py_func"):
        driver._cache = _Cache(driver.py_func)
    return driver


# (under Numba's workqueue layer, which aborts the process on two parallel launches at once,
# the drivers launch one at a time, as numba_cpu's parallel kernels do)
_parallel_launch = matmul.launch_parallel
_LAUNCH = _parallel_launch
# launch_parallel's [run_parallel, numba_cpu's layer state], filled at the first launch: once
# the layer is known to take launches from any number of threads at once, Plan._execute
# calls a driver straight, as launch_parallel would (one Python call and a repacking of
# two dozen arguments fewer per small batch)
_TURNS = matmul._TURNS


# ---------------------------------------------------------------------------------------
# Plans
class _Local(threading.local):
    def __init__(self):
        self.buffers = {}  # rows -> this thread's intermediate arrays
        self.panels = None  # the packed form's panels, weight copies and whether fresh
        self.bound = {}  # a frozen plan's routes: (rows, threads) -> route (Plan.bound)


class _State:
    """What a plan (or the finding that none applies) was made from, checked on every call:
    the model's ``layers`` list and the array type and dtype of its first parameter (which
    ``model.to`` changes)."""

    def _record(self, model):
        layers = getattr(model, "layers", None)
        self.layers = None if layers is None else list(layers)
        params = model.parameters() if hasattr(model, "parameters") else []
        self.first = params[0] if params else None
        data = None if self.first is None else self.first.data
        self.array_type = type(data)
        self.dtype = getattr(data, "dtype", None)

    def usable(self, model) -> bool:
        """Whether this still describes ``model`` (structure, dtype, device)."""
        if self.layers != getattr(model, "layers", None):
            return False
        first = self.first
        return first is None or (type(first.data) is self.array_type
                                 and first.data.dtype == self.dtype)


class _NoPlan(_State):
    """A model that no plan covers (kept, so that this is not found again on every call)."""

    ok = False

    def __init__(self, model):
        self._record(model)


class Plan(_State):
    """The eval-mode forward pass of a :class:`~backprop.model.Sequential` as a list of ops
    over registers: register 0 is the input batch, the last is the output (a fresh array per
    call), the others are this thread's buffers. Built by :func:`plan_for`; see the module
    docstring for what it covers, its precision, invalidation and threads."""

    ok = True

    def __init__(self, model):
        from backprop.layers import Layer

        if not isinstance(model, Layer) or not hasattr(model, "layers"):
            raise _Unsupported("not a Sequential")
        if numba.config.DISABLE_JIT:
            raise _Unsupported("Numba's JIT is disabled")
        self._record(model)
        if self.first is None:
            raise _Unsupported("no parameters")
        if self.array_type is not np.ndarray or self.dtype not in (np.float32, np.float64):
            raise _Unsupported("not float32/float64 NumPy parameters")
        if any(type(p.data) is not np.ndarray or p.data.dtype != self.dtype
               for p in model.parameters()):
            raise _Unsupported("parameters of mixed dtypes or devices")
        self.in_features = model.in_features
        if self.in_features is None:
            raise _Unsupported("unknown input features")
        # a frozen copy (backprop.frozen): its weights never change, so the packed form packs
        # its panels once and never compares them with the weights
        self.frozen = bool(model.__dict__.get("_inference_frozen", False))
        self.sensitive = []  # layers whose forward differs in training mode
        self._widths = [self.in_features]
        self._steps = []
        last, width = self._sequence(model, 0, self.in_features, top=True)
        if not self._steps or last == 0:
            raise _Unsupported("no operation")
        self.out_width = width
        self._finalize(last)
        self._local = _Local()

    # -- building --------------------------------------------------------------------------
    def _register(self, width) -> int:
        self._widths.append(width)
        return len(self._widths) - 1

    def _sequence(self, seq, reg, width, top=False):
        if not top:
            self._steps.append(("guard", seq, list(seq.layers)))
        fusable = None  # the step of a Dense without activation whose output is `reg`
        for layer in seq.layers:
            reg, width, fusable = self._layer(layer, reg, width, fusable)
        return reg, width

    def _layer(self, layer, reg, width, fusable):
        from backprop.activations import Activation, LogSoftmax, Softmax
        from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual
        from backprop.model import Sequential

        kind = type(layer)
        if isinstance(layer, Dense) and kind.forward is Dense.forward:
            if layer.in_features != width:
                raise _Unsupported("feature count mismatch")
            act = layer.activation
            name, row = self._activation(act)
            out = self._register(layer.out_features)
            step = ["dense", layer, act, act, name, row, reg, out]
            self._steps.append(step)
            return out, layer.out_features, step if (name, row) == ("identity", 0) else None
        if isinstance(layer, Activation) and kind.forward in (
                Activation.forward, Softmax.forward, LogSoftmax.forward):
            name, row = self._activation(layer)
            if fusable is not None and (row or fusable[4] == "identity"):
                # a Dense without activation, then this: one kernel (σ, then a row op)
                if row:
                    fusable[5] = row
                    return reg, width, None
                fusable[3], fusable[4] = layer, name
                return reg, width, fusable
            out = self._register(width)
            step = ["act", layer, name, row, reg, out]
            self._steps.append(step)
            return out, width, None
        if kind is Dropout or (isinstance(layer, Dropout) and kind.forward is Dropout.forward):
            if layer.p > 0:
                self.sensitive.append(layer)
            return reg, width, fusable
        if isinstance(layer, Flatten) and kind.forward is Flatten.forward:
            return reg, width, fusable  # a 2-D batch is flat already
        if isinstance(layer, BatchNorm1d) and kind.forward in (
                BatchNorm1d.forward, _sync_forward()):
            if layer.num_features != width:
                raise _Unsupported("feature count mismatch")
            self.sensitive.append(layer)
            out = self._register(width)
            self._steps.append(["bn", layer, reg, out])
            return out, width, None
        if isinstance(layer, Residual) and kind.forward is Residual.forward:
            block = layer.block
            self._steps.append(("guard_block", layer, block))
            inner, inner_width = self._layer_or_sequence(block, reg, width)
            if inner_width != width:
                raise _Unsupported("a residual block that changes the width")
            out = self._register(width)
            self._steps.append(["add", reg, inner, out])
            return out, width, None
        if isinstance(layer, Sequential) and kind.forward is Sequential.forward:
            reg, width = self._sequence(layer, reg, width)
            return reg, width, None
        raise _Unsupported(f"layer {layer!r}")

    def _layer_or_sequence(self, layer, reg, width):
        reg, width, _ = self._layer(layer, reg, width, None)
        return reg, width

    @staticmethod
    def _activation(act):
        kernel = act.kernel
        if kernel in RECORDS:
            return kernel, 0
        if kernel in _ROW_OPS:
            return "identity", _ROW_OPS[kernel]
        raise _Unsupported(f"activation {kernel!r}")

    def _finalize(self, last):
        """Make the programs: the row program (every layout ``(n, ·)``) and, for a stack of
        Dense layers, the lanes program (the batch transposed, see :func:`_tiles`)."""
        self.guards = [_guard_op(*step) for step in self._steps if step[0].startswith("guard")]
        steps = [step for step in self._steps if not step[0].startswith("guard")]
        self.row = _Program(steps, self._widths, last, lanes=False)
        self.lanes = None
        self.dense = None  # for the parallel driver: ((layer, own activation, act), ...)
        if all(step[0] == "dense" for step in steps):
            self.lanes = _Program(steps, self._widths, last, lanes=True)
            self.dense = tuple((layer, own, act) for _, layer, own, act, *_ in steps)
            self._checked = [(None, None)] * len(self.dense)  # see _dense_params
            self.spec = tuple((name, row) for _, _, _, _, name, row, _, _ in steps)
            self.widths = [steps[0][1].in_features] + [st[1].out_features for st in steps]
            self.macs_per_row = sum(st[1].in_features * st[1].out_features for st in steps)
            # the largest layer that an op may split over the threads (no row op, _dense_op)
            self.split_macs = max((st[1].in_features * st[1].out_features
                                   for st in steps if st[5] == 0), default=0)
            self.weight_bytes = self.macs_per_row * np.dtype(self.dtype).itemsize
            self._pass_cache = None  # see _pass_layout
        self.lanes_from = 16 if self.dtype == np.float32 else 8  # rows: one vector of lanes
        del self._steps, self._widths

    # -- running ---------------------------------------------------------------------------
    def __call__(self, x, check: bool):
        """``(output, finite)``: the output for ``x`` (C-contiguous, ``(n, in_features)``, the
        plan's dtype, ``n`` rows that :meth:`takes`) as a fresh array. ``finite`` is True when
        ``x`` is surely finite; when False (only computed with ``check``), ``x`` may hold
        NaN or inf, or the weights do (or the products overflowed).

        The route for ``n`` rows is bound anew on every call of a live model (its weights
        are read anew: see the module docstring); a frozen model's steady route for ``n``
        rows and the calling thread's thread count is bound once, kept per thread
        (:meth:`bound`)."""
        for guard in self.guards:
            guard()
        n = x.shape[0]
        if not self.frozen:
            return self._execute(self._bind(n), x, n, check)
        key = (n, _threads())
        route = self._local.bound.get(key)
        if route is None:
            route = self._bind(n)
            fresh = route[4]
            if fresh is None or not fresh[0]:  # (not the first packing of the panels)
                _keep_in(self._local.bound, key, route)
        return self._execute(route, x, n, check)

    def bound(self, n: int):
        """A frozen model's route for batches of ``n`` rows on the calling thread, for
        :meth:`_execute`, where an earlier call bound it with this thread's current thread
        count, else None. Bound with every array it reads (the weights, the packed panels,
        the thread's buffers) and the route that the thresholds of this module chose then:
        a frozen model's weights and layers never change."""
        return self._local.bound.get((n, _threads()))

    def _execute(self, route, x, n, check):
        """``(output, finite)`` (see :meth:`__call__`) of a bound ``route``:
        ``(driver, head, tail, flags, fresh)``, the parallel driver launched as
        ``driver(x, *head, out, *tail)`` (a serial one, ``head`` None, called as
        ``driver(x, out, *tail)``), whether ``x`` is finite its result (``flags`` None) or
        ``flags.all()``, and ``fresh[0]`` cleared after the packed driver's call; or
        ``(None, program, hidden, None, None)``, a program's ops."""
        driver, head, tail, flags, fresh = route
        out = np.empty((n, self.out_width), self.dtype)
        if driver is None:  # the program's ops (inline: one call fewer per small batch)
            program, regs = head, [x, *tail, out]
            if program.flags_input:
                for op in program.before:
                    op(regs, n)
                finite = program.head(regs, n)
                for op in program.rest:
                    op(regs, n)
            else:
                finite = _all_finite(x) if check else True
                for op in program.ops:
                    op(regs, n)
            return out, finite
        if head is None:  # a serial driver: no parallel region, no turns to take
            finite = driver(x, out, *tail)
        elif _parallel_launch is _LAUNCH and _TURNS and _TURNS[1]["serialize"] is False:
            finite = driver(x, *head, out, *tail)
        else:
            finite = _parallel_launch(driver, x, *head, out, *tail)
        if fresh is not None:
            fresh[0] = False
        return out, finite if flags is None else bool(flags.all())

    def _bind(self, n):
        """The route for ``n`` rows (:meth:`_execute`), bound to this thread's buffers and
        the weights as they are now."""
        threads, large = 1, False
        if self.dense is not None:
            chunks = n > (PARALLEL_MIN_VECTORS - 1) * self.lanes_from
            layout = self._pass_layout()
            large = layout[2] >= PASS_MIN_BYTES and atomics.AVAILABLE
            if chunks or large:
                threads = _threads()
                shared = threads > 1 and n * self.macs_per_row >= PARALLEL_MIN_MACS
                parallel = chunks and shared or large and threads > 1  # (else one thread)
                resident = self.resident()
                if atomics.AVAILABLE and resident and (n >= PACKED_MIN_ROWS or (
                        self.frozen and parallel and n >= FROZEN_PACKED_MIN_ROWS)):
                    return self._packed(n, threads)
                if parallel and resident and _row_chunks_take(n, threads, self.lanes_from):
                    return self._row_chunks(n, threads)
                if chunks and (n > MAX_ROWS or shared):
                    return self._chunked(n, threads)
        program = self.lanes if n >= self.lanes_from and self.lanes is not None else self.row
        hidden = self._local.buffers.get(n)
        if hidden is None:
            hidden = self._allocate(n, program)
        if large and threads > 1:
            team = layout[3]  # the most threads the pass takes (PASS_BYTES_PER_THREAD)
            return self._pass(n, team if threads > team else threads,
                              program is self.lanes, hidden)
        if self.frozen and self.dense is not None and n * self.split_macs < SPLIT_MIN_MACS:
            # one Numba call for the stack, for a route bound once (a live model, which
            # would gather the driver's arguments on every call, runs its ops faster)
            return (_serial_driver_for(self.spec, program is self.lanes), None,
                    (*hidden, *self._dense_params()), None, None)
        return None, program, hidden, None, None

    def takes(self, n: int) -> bool:
        """Whether a batch of ``n`` rows runs through this plan (see :data:`MAX_ROWS`)."""
        return 0 < n <= MAX_ROWS or (self.dense is not None and (
            n <= DENSE_MAX_ROWS or self.resident()))

    def resident(self) -> bool:
        """Whether the weights of this stack of Dense layers stay in a core's cache
        (:data:`SMALL_WEIGHT_BYTES`, :func:`l2_cache_bytes`)."""
        return self.weight_bytes <= max(SMALL_WEIGHT_BYTES, l2_cache_bytes())

    def _row_chunks(self, n, threads):
        """The route of the row program run by the parallel driver on one chunk of rows per
        thread (``_row_chunks_take``), each read in place."""
        chunk = -(-n // threads)
        return self._run_chunks(n, chunk, -(-n // chunk), lanes=False)

    def _chunked(self, n, threads):
        """The route of the lanes program run by the parallel driver on chunks of rows of
        equal size, a whole number of vectors of lanes (``_chunking``)."""
        chunk, chunks = _chunking(n, max(threads, 1), self.lanes_from, CHUNK_ROWS,
                                  CHUNK_MAX_ROWS)
        return self._run_chunks(n, chunk, chunks, lanes=True)

    def _run_chunks(self, n, chunk, chunks, lanes: bool):
        """The route of the parallel driver (:func:`_driver_source`) in the lanes or the row
        form on ``chunks`` chunks of ``chunk`` rows, through this thread's buffers for them:
        in the lanes form every layer's input and output transposed,
        ``(chunks, width, chunk)``; in the row form the hidden activations only,
        ``(chunks, chunk, width)``."""
        key = ("parallel" if lanes else "rows", n, chunk)
        buffers = self._local.buffers.get(key)
        if buffers is None:
            shapes = ([(chunks, w, chunk) for w in self.widths] if lanes else
                      [(chunks, chunk, w) for w in self.widths[1:-1]])
            buffers = self._keep(key, (np.empty(chunks, np.bool_),
                                       [np.empty(shape, self.dtype) for shape in shapes]))
        flags, hidden = buffers
        return (_driver_for(self.spec, lanes), (), (chunk, flags, *hidden,
                                                    *self._dense_params()), flags, None)

    def _packed(self, n, threads):
        """The route of the packed driver (:data:`PACKED_MIN_ROWS`,
        :data:`FROZEN_PACKED_MIN_ROWS`, :func:`_packed_source`): blocks of about
        :data:`PACKED_BLOCK_ROWS` rows in whole tiles of the packed product, as many as a
        multiple of ``threads`` (equal shares while no thread runs late) and at most one
        per tile. With one block per thread, the blocks are cut at multiples of 4 rows
        (the product's 4-row tiles) instead of its 12-row tiles: 32 rows then run as 16 and
        16, not 24 and 8. Its ``fresh[0]`` (the route's last item) is True while this
        thread's panels wait to be packed: the route's first call packs them."""
        blocks = -(-(-(-n // PACKED_BLOCK_ROWS)) // threads) * threads
        step = 4 if blocks == threads else matmul.PACKED_ROWS
        tiles = -(-n // step)
        blocks = min(blocks, tiles)
        rows = -(-tiles // blocks) * step
        key = ("packed", rows, blocks, threads)
        state = self._local.buffers.get(key)
        if state is None:
            state = self._keep(key, (
                np.zeros(3, np.int64), np.empty(blocks, np.bool_),
                [np.empty((threads, rows, w), self.dtype) for w in self.widths[1:-1]],
                _packed_driver_for(self.spec)))
        counters, flags, hidden, driver = state
        local = self._local
        if local.panels is None:  # one set per calling thread, whatever the batch size
            width = matmul.panel_width(self.dtype)
            local.panels = [array for layer, _, _ in self.dense for array in (
                np.empty((matmul.panels(layer.out_features, self.dtype),
                          layer.in_features, width), self.dtype),
                np.empty((layer.out_features, layer.in_features), self.dtype))], [True]
        packed, fresh = local.panels
        mode = 1 if fresh[0] else (2 if self.frozen else 0)  # pack, check, neither
        return (driver, (), (step, threads, mode, counters, flags, *hidden, *packed,
                             *self._dense_params()), flags, fresh)

    def _pass(self, n, threads, lanes, hidden):
        """The route of the parallel pass (:data:`PASS_MIN_BYTES`, :func:`_pass_source`)
        through this thread's ``hidden`` buffers of the program in the ``lanes`` form or
        the row form, on at most ``threads`` (its team: :data:`PASS_BYTES_PER_THREAD`,
        applied by the caller)."""
        key = ("pass", threads, lanes, PASS_LAYER_MIN_BYTES)
        state = self._local.buffers.get(key)
        if state is None:
            state = self._keep(key, (
                self._pass_widths(threads, lanes),
                np.zeros(len(self.dense) * (threads + 1), np.int64),
                np.empty(threads, np.bool_),
                _pass_driver_for(self.spec, lanes, self._pass_layout()[1])))
        widths, counters, flags, driver = state
        return driver, (n, widths, counters, flags, *hidden), self._dense_params(), None, None

    def _pass_widths(self, threads, lanes):
        """Each layer's block width in a parallel pass on ``threads``: for a
        layer it splits, one block per thread, of whole 4-feature blocks of the dot form (so
        that every output is summed as on one thread, bit for bit) or whole 8-row tiles of
        the lanes form; the whole layer for any other."""
        quantum = 8 if lanes else 4
        widths = []
        for (layer, _, _), split in zip(self.dense, self._pass_layout()[1]):
            m = layer.out_features
            width = -(-m // threads)
            width = -(-width // quantum) * quantum
            widths.append(width if split and width < m else m)
        return np.array(widths, np.int64)

    def _pass_layout(self):
        """``(threshold, splits, bytes, team, per_thread)``: which layers a parallel pass
        splits over the threads (weights of at least :data:`PASS_LAYER_MIN_BYTES`, the
        threshold, no row op), their bytes of weights (:data:`PASS_MIN_BYTES`) and the most
        threads the pass takes (:data:`PASS_BYTES_PER_THREAD`, ``per_thread``); worked out
        once per value of the thresholds."""
        layout = self._pass_cache
        if (layout is None or layout[0] != PASS_LAYER_MIN_BYTES
                or layout[4] != PASS_BYTES_PER_THREAD):
            size = np.dtype(self.dtype).itemsize
            sizes = [layer.in_features * layer.out_features * size for layer, _, _ in self.dense]
            splits = [row == 0 and b >= PASS_LAYER_MIN_BYTES
                      for b, (_, row) in zip(sizes, self.spec)]
            split = sum(b for b, s in zip(sizes, splits) if s)
            layout = self._pass_cache = (PASS_LAYER_MIN_BYTES, splits, split,
                                         max(2, split // PASS_BYTES_PER_THREAD),
                                         PASS_BYTES_PER_THREAD)
        return layout

    def _allocate(self, n, program):
        """This thread's intermediate arrays for batches of ``n`` rows."""
        lanes = 16 if self.dtype == np.float32 else 8
        padded = -(-n // lanes) * lanes
        return self._keep(n, [np.empty((w, padded) if transposed else (n, w), self.dtype)
                              for w, transposed in program.hidden])

    def _keep(self, key, buffers):
        """``buffers``, kept as this thread's under ``key`` (:func:`_keep_in`)."""
        return _keep_in(self._local.buffers, key, buffers)

    def _dense_params(self) -> list:
        """``[W, b, alpha, ...]`` of the stack of Dense layers as they are now (``b`` None
        without bias); raises ``_Stale`` where a layer's activation object was replaced or
        its arrays no longer have the layer's shapes (the kernels read them unchecked)."""
        params = []
        checked = self._checked
        for i, (layer, own, act) in enumerate(self.dense):
            if layer.activation is not own:
                raise _Stale
            W, b = layer.W.data, layer.b
            b = None if b is None else b.data
            if W is not checked[i][0] or b is not checked[i][1]:  # (when they change)
                _check_shapes(layer, W, b)
                checked[i] = W, b
            params += (W, b, act.alpha)
        return params


def _keep_in(kept: dict, key, value):
    """``value``, kept in one of a thread's dicts under ``key``, the oldest entry dropped
    beyond ``_THREAD_BUFFERS_KEPT``."""
    if len(kept) >= _THREAD_BUFFERS_KEPT:
        kept.pop(next(iter(kept)))
    kept[key] = value
    return value


class _Program:
    """A plan's ops in order, over the registers ``regs = [x, *hidden, out]`` (``out``: the
    fresh output array); ``hidden`` lists each hidden register's ``(width, transposed)``.
    The row program keeps every batch ``(n, ·)``; the lanes program (a stack of Dense
    layers only) keeps them transposed, ``(·, P)``, and transposes the output back last."""

    def __init__(self, steps, widths, last, lanes):
        number = {0: 0}  # the plan's registers -> indices into regs
        hidden = []
        for step in steps:  # the output of each step, except the last one's in the row form
            dst = step[-1]
            if lanes or dst != last:
                number[dst] = len(hidden) + 1
                hidden.append((widths[dst], lanes))
        ops = []
        if lanes:  # first x transposed into regs[1] (the pass also checks that x is finite)
            hidden.insert(0, (steps[0][1].in_features, True))
            # every index moves up by one, and the first Dense reads the transposed x
            number = {r: i + 1 if r else 1 for r, i in number.items()}
            ops.append(_transpose_op(0, 1))
        else:
            number[last] = len(hidden) + 1
        for step in steps:
            kind = step[0]
            if kind == "dense":
                _, layer, own, act, name, row, src, dst = step
                kernel = _kernel(_DENSE, _dense_kernel, name, row, _LANES if lanes else _ROW)
                ops.append(_dense_op(layer, own, act, kernel, number[src], number[dst],
                                     split=name if row == 0 else None, lanes=lanes))
            elif kind == "act":
                _, layer, name, row, src, dst = step
                ops.append(_act_op(layer, _kernel(_ELEMENTWISE, _act_kernel, name, row),
                                   number[src], number[dst]))
            elif kind == "bn":
                _, layer, src, dst = step
                ops.append(_bn_op(layer, number[src], number[dst]))
            else:
                _, a, b, dst = step
                ops.append(_add_op(number[a], number[b], number[dst]))
        if lanes:
            ops.append(_untranspose_op(number[last], len(hidden) + 1))
        # the first Dense kernel's result says whether x is finite when it reads x, or its
        # transposed copy (its output rows are non-finite wherever x's are): ``head``
        self.flags_input = lanes or (steps[0][0] == "dense" and steps[0][-2] == 0)
        self.ops, self.hidden = ops, hidden
        first = 1 if lanes else 0  # the lanes program transposes x first
        self.before, self.head, self.rest = ops[:first], ops[first], ops[first + 1:]


def _sync_forward():
    from backprop.layers import SyncBatchNorm

    return SyncBatchNorm.forward  # in eval mode it is BatchNorm1d's forward


def _guard_op(kind, owner, snapshot):
    if kind == "guard":
        def op():
            if owner.layers != snapshot:
                raise _Stale
    else:
        def op():
            if owner.block is not snapshot:
                raise _Stale
    return op


def _dense_op(layer, own, act, kernel, src, dst, split=None, lanes=False):
    """A Dense layer's kernel; ``split``: the activation's name where the layer may run
    split over the threads (no row op; see :data:`SPLIT_MIN_MACS`), in the lanes form where
    ``lanes``."""
    local = threading.local()  # the split's per-thread blocks and driver
    checked = [None, None]  # the arrays last found of the layer's shapes
    size = layer.in_features * layer.out_features  # (W's size, once its shape is checked)

    def op(regs, n):
        if layer.activation is not own:
            raise _Stale
        W, b = layer.W.data, layer.b
        if b is not None:
            b = b.data
        if W is not checked[0] or b is not checked[1]:  # (checked when they change: the
            _check_shapes(layer, W, b)                   # kernels read them unchecked)
            checked[:] = W, b
        if split is not None and n * size >= SPLIT_MIN_MACS:
            threads = _threads()
            if threads > 1 and W.shape[0] % (4 * threads) == 0:  # whole 4-feature blocks
                return _run_split(local, split, lanes, regs[src], n, W, b, act.alpha,
                                  regs[dst], threads)
        return kernel(regs[src], n, W, b, act.alpha, regs[dst])
    return op


def _run_split(local, name, lanes, x, n, W, b, alpha, out, threads) -> bool:
    """A Dense layer's kernel split over ``threads`` blocks of output features (each a
    whole number of the row form's 4-feature blocks; the lanes form's tiles sum every
    output in the same order whatever their shape), bit for bit the output of one thread;
    whether ``x Wᵀ + b`` is finite."""
    state = getattr(local, "split", None)
    if (state is None or state[0] != n or state[1] != threads or state[2] != (b is None)
            or state[3].dtype != W.dtype):
        parts = (threads, 0, 0) if lanes else (threads, n, W.shape[0] // threads)
        state = local.split = (n, threads, b is None, np.empty(parts, W.dtype),
                               np.empty(threads, np.bool_),
                               _split_driver_for(name, b is not None, lanes))
    _, _, _, parts, flags, driver = state
    _parallel_launch(driver, x, n, W, b, alpha, parts, flags, out)
    return bool(flags.all())


def _check_shapes(layer, W, b) -> None:
    """Raise ``_Stale`` where a Dense layer's weight or bias array is not of the layer's
    shape."""
    if W.shape != (layer.out_features, layer.in_features) or (
            b is not None and b.shape != (layer.out_features,)):
        raise _Stale


def _act_op(layer, kernel, src, dst):
    def op(regs, n):
        kernel(regs[src], layer.alpha, regs[dst])
    return op


def _bn_op(layer, src, dst):
    buffers = layer._buffers

    def op(regs, n):
        gamma, beta = (layer.gamma.data, layer.beta.data) if layer.affine else (None, None)
        _batchnorm(regs[src], buffers["running_mean"], buffers["running_var"], gamma, beta,
                   layer.eps, regs[dst])
    return op


def _add_op(a, b, dst):
    def op(regs, n):
        _add(regs[a], regs[b], regs[dst])
    return op


def _transpose_op(src, dst):
    def op(regs, n):
        return _to_lanes(regs[src], regs[dst])
    return op


def _untranspose_op(src, dst):
    def op(regs, n):
        _from_lanes(regs[src], regs[dst])
    return op


def _build(model):
    """A new :class:`Plan` of ``model``, or a :class:`_NoPlan` saying none applies; kept
    on the model for the next call."""
    try:
        plan = Plan(model)
    except _Unsupported:
        plan = _NoPlan(model)
    model._inference_plan = plan
    return plan


def plan_for(model):
    """The ``Plan`` of ``model`` (built on first use, rebuilt when stale), or None when
    no plan covers its layers or its parameters are not float32/float64 NumPy arrays."""
    plan = model.__dict__.get("_inference_plan")
    if plan is None or not plan.usable(model):
        plan = _build(model)
    return plan if plan.ok else None


def clear(model) -> None:
    """Forget ``model``'s plan (the next call builds it again)."""
    model.__dict__.pop("_inference_plan", None)


_NUMBA_CHOICES = ("auto", "numba")  # kernel choices under which the CPU runs Numba kernels


def run(model, x, check: bool = False, eval_mode: bool = False):
    """``model``'s eval-mode output for the NumPy batch ``x`` through its plan, as a fresh
    array, or None where no plan applies (the caller then takes the normal path): ``x`` not
    a C-contiguous 2-D array of the model's dtype with its feature count and a number of rows
    the plan takes (``Plan.takes``, :data:`MAX_ROWS`), a model on the GPU or with a layer no plan covers, a layer in
    training mode whose forward depends on it (Dropout, BatchNorm1d) outside
    :func:`~backprop.concurrency.inference_mode`, or kernels other than Numba's selected.

    ``check=True`` (``predict``): ``x`` must hold no NaN or inf, or this raises
    :class:`~backprop.data.DataError` naming the first bad row. ``eval_mode=True``: run as
    inside inference_mode (every layer in eval mode), whatever the training flags."""
    plan = model.__dict__.get("_inference_plan")
    if plan is None or not plan.usable(model):
        plan = _build(model)
    if not _fits(plan, x) or not plan.takes(x.shape[0]):
        return None
    if plan.sensitive and not (eval_mode or _MODE.eval) and any(
            m._training for m in plan.sensitive):
        return None
    try:
        out, finite = plan(x, check)
    except _Stale:
        plan = _build(model)
        if not _fits(plan, x) or not plan.takes(x.shape[0]):
            return None
        try:
            out, finite = plan(x, check)
        except _Stale:  # arrays of other shapes than their layers': the normal path says so
            return None
    if check and not finite:
        _raise_if_not_finite(x)
    return out


def run_frozen(model, x):
    """``run(model, x, check=True, eval_mode=True)`` for a frozen copy
    (:mod:`backprop.frozen`), the same outputs; the model-level fast path of serving. Where
    this thread has run a batch of as many rows through the model's plan with the same
    thread count, the route bound then runs at once (``Plan.bound``): the checks of
    ``x`` (NumPy, C-contiguous, 2-D, the plan's dtype and features, NaN/inf on the first
    layer's kernel) and of the kernel choice, and no check of the plan against the model,
    whose layers and arrays never change."""
    plan = model.__dict__.get("_inference_plan")
    if plan is not None and type(x) is np.ndarray and _fits(plan, x):
        route = plan.bound(x.shape[0])
        if route is not None:
            out, finite = plan._execute(route, x, x.shape[0], True)
            if not finite:
                _raise_if_not_finite(x)
            return out
    return run(model, x, True, True)


def _fits(plan, x) -> bool:
    """Whether the NumPy batch ``x`` is one a usable ``plan`` may run (rows aside,
    ``Plan.takes``): 2-D, C-contiguous, of the plan's dtype and feature count, with Numba's
    kernels selected."""
    return (plan.ok and x.ndim == 2 and x.dtype == plan.dtype
            and x.shape[1] == plan.in_features and x.flags.c_contiguous
            and K.get_choice() in _NUMBA_CHOICES)


def _raise_if_not_finite(x) -> None:
    """Raise :class:`~backprop.data.DataError` naming the first row of ``x`` that holds NaN
    or inf, if any (a plan's kernels found a non-finite product: the input, or else the
    weights or an overflow, which the normal path reports the same way)."""
    if not bool(np.isfinite(x).all()):
        from backprop import data as bpdata

        bpdata.validate(x, name="prediction data")  # raises, naming the first bad row
