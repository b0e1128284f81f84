"""Matrix products tiled in vector registers, in compiled code: the Dense layers' three
products where NumPy's BLAS is slow on the shapes of a small model's training step
(``backprop.gemm`` chooses; the compiled inference plans use the tiles too).

The one kernel shape. ``C (+)= A' B`` with ``C`` ``(M, P)`` and ``B`` ``(K, P)``
C-contiguous, the columns of both along the vector lanes (16 float32, 8 float64 per
512-bit vector), and ``A'`` ``(M, K)`` read one scalar at a time through two strides
(``A'[r, k] = A.flat[r·a_row + k·a_k]``: ``A`` itself or ``Aᵀ`` of a C-contiguous ``A``).
A tile holds ``C[j:j+R, i:i+V·L]`` in ``R × V`` vector registers through the whole sum
over k: per k, ``V`` vector loads of a row of ``B``, ``R`` broadcast scalars of ``A'``,
``R·V`` fused multiply-adds (:func:`make_tile`). No horizontal sums, no packing: a tile's
``B`` strip streams from L2, so the columns are cut into panels of at most
:data:`PANEL_BYTES` of ``B``. The last partial vector of columns is loaded and stored under
a lane mask. Every tile sums over k in order, so the tile shapes and the split over threads
never change a result (it differs from a BLAS's only by rounding).

The Dense layer's products (``X`` ``(N, in)``, ``W`` ``(out, in)``, ``δ`` ``(N, out)``)::

    ∂X = δ W             C = ∂X, A' = δ (a_row = out, a_k = 1), B = W
    ∂W (+)= δᵀ X         C = ∂W, A' = δᵀ (a_row = 1, a_k = out), B = X
    Z = X Wᵀ             Zᵀ = W Xᵀ: C = Zᵀ, A' = W, B = Xᵀ; ``X`` transposed into
                         ``Xᵀ`` and ``Zᵀ`` back into ``Z`` by blocks of L × L values
                         in registers (:func:`forward`)

Packed panels (the inference plans' large batches, :func:`packed_product`). ``Z = X Wᵀ``
with the batch read in place: ``W`` ``(M, K)`` is copied into panels of two vectors of
outputs, ``Wp[p, k, c] = W[p·w + c, k]`` (``w`` = :func:`panel_width`, zero past ``M``),
each panel a contiguous ``(K, w)`` strip of ``Wᵀ``; tiles of :data:`PACKED_ROWS` rows
broadcast ``X``'s values and load the panel's rows. The sum over k runs in blocks of at most
:data:`PACKED_K` features, so that one panel's block (32 KiB) stays in L1 while every strip
of rows passes over it; a block adds to the partial sums the previous one stored, which
sums each output in the same order as one pass over k, and as the lanes form's tiles (the
same products, fused-multiply-added in the same order): the same bits.
:func:`refresh_panel` packs a panel again only where the weights differ from the copy it
was packed from.

Threads. :func:`product` and :func:`forward` split ``C`` over ``parts`` threads in one
Numba parallel region (``parts = 1``: no region, the calling thread alone): rows of ``C``
in whole tiles, or columns in whole pairs of vectors where the rows are too few; the
forward pass splits the outputs (rows of ``W``), each thread transposing the batch into its
own ``Xᵀ``, so that no thread waits for another. Threads never write the same element, and
nothing is shared between calls: the functions are safe to call from several threads at
once on distinct outputs (the scratch ``Xᵀ``/``Zᵀ`` of :func:`forward` is the caller's);
:func:`run` launches its parallel regions one at a time under Numba's workqueue threading
layer, as ``numba_cpu`` does (that layer aborts the process on two launches at once).
"""
from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from backprop.kernels import inline

__all__ = ["PANEL_BYTES", "threads", "lanes", "make_tile", "transpose_block", "transpose",
           "split", "product",
           "forward_parts", "forward_scratch", "forward", "run", "launch_parallel",
           "PACKED_K", "PACKED_ROWS", "panel_width", "panels", "pack_panel", "refresh_panel",
           "packed_product"]

PANEL_BYTES = 1 << 20
"""The most bytes of ``B`` one panel of columns spans (``K`` rows × the panel's columns):
the strip a row of tiles streams stays in the core's L2 cache for the next row of tiles."""

_FLAGS = dict(nogil=True, cache=True, error_model="numpy")
_LEGAL_WIDTH = '"min-legal-vector-width"="512"'
_COMPILE_LOCK = threading.Lock()


# Numba's threading layer module: its private accessor of the calling thread's count is set
# once its threads run (where a Numba release lacks it, threads() takes the public function)
_NUMBA_PARALLEL = numba.np.ufunc.parallel
_GET_THREADS: list = [None]  # that accessor, once Numba's threads run


def threads() -> int:
    """``numba.get_num_threads()`` (the calling thread's count of Numba threads). Once
    Numba's threads run, read straight from its threading layer: the public function takes
    two locks first, which cost more than the rest of a small parallel call's set-up."""
    get = _GET_THREADS[0]
    if get is not None:
        count = get()
        if count > 0:
            return count
    elif getattr(_NUMBA_PARALLEL, "_is_initialized", False):
        _GET_THREADS[0] = getattr(_NUMBA_PARALLEL, "_get_num_threads", None)
    return numba.get_num_threads()


def lanes(like):
    """Vector lanes of the dtype of the array ``like``: 16 float32 or 8 float64 (512 bits;
    on narrower hardware LLVM splits each vector). Compiled code only."""
    raise NotImplementedError("compiled code only")


@overload(lanes)
def _lanes_impl(like):
    count = 16 if like.dtype == types.float32 else 8
    return lambda like: count


def _wide(builder) -> None:
    # 512-bit vector types in a function that prefers 256 bits (LLVM's default on AVX-512
    # cores) are split in two by the backend: the function gets the preference for them,
    # and the minimum legal width, which (unlike the preference) LLVM's inliner carries
    # into a caller, such as the function of a parallel region
    set.add(builder.function.attributes, inline.WIDE_VECTORS)
    set.add(builder.function.attributes, _LEGAL_WIDTH)


def _float_arrays(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
               for a in arrays) and arrays[0].dtype in (types.float32, types.float64) and \
        all(a.dtype == arrays[0].dtype for a in arrays)


def make_tile(rows: int, vectors: int, general: bool = False, masked: bool = False,
              offset: bool = False):
    """An intrinsic that computes one tile, ``rows`` rows of ``C`` × ``vectors`` vectors of
    lanes, its accumulators in registers through the whole sum over k.

    - ``general=False``: ``tile(B, A, C, j, i)``: ``C[j:j+rows, i:i+vectors·L] =
      A[j:j+rows, :] @ B[:, i:i+vectors·L]`` for a C-contiguous ``A`` ``(M, K)`` (the
      compiled inference plans: ``B = Xᵀ``, ``A = W``);
    - ``general=True``: ``tile(B, A, C, j, i, a_row, a_k, accumulate, limit)``: ``A'`` read
      through the strides, ``C`` added to where ``accumulate``; with ``masked`` only the
      columns below ``limit`` of the last vector are read and written (``limit`` is unused
      otherwise);
    - ``general=True, offset=True``: ``tile(B, A, C, j, i, a_row, a_k, accumulate, limit,
      a_start)``: ``A'[r, k] = A.flat[a_start + r·a_row + k·a_k]`` and ``B``'s columns from
      0 (``C``'s from ``i``): a block of features of a packed panel
      (:func:`packed_product`).

    The arrays are two-dimensional, C-contiguous, of one float dtype (checked when typed;
    anything else does not type); the caller keeps the indices in bounds."""

    def codegen_for(context, builder, signature, args):
        _wide(builder)
        single = signature.args[0].dtype == types.float32
        count = 16 if single else 8
        align = 4 if single else 8
        fty = context.get_value_type(signature.args[0].dtype)
        vty = ir.VectorType(fty, count)
        intp = context.get_value_type(types.intp)
        b_arr, a_arr, c_arr = (context.make_array(t)(context, builder, a)
                               for t, a in zip(signature.args[:3], args[:3]))

        def index(pos):
            return context.cast(builder, args[pos], signature.args[pos], types.intp)

        j, i = index(3), index(4)
        k_in = builder.extract_value(b_arr.shape, 0)
        b_stride = builder.extract_value(b_arr.shape, 1)
        c_stride = builder.extract_value(c_arr.shape, 1)
        a_start = index(9) if offset else ir.Constant(intp, 0)
        b_col = ir.Constant(intp, 0) if offset else i
        if general:
            a_row, a_k = index(5), index(6)
            accumulate = context.cast(builder, args[7], signature.args[7], types.boolean)
        else:
            a_row, a_k = builder.extract_value(a_arr.shape, 1), ir.Constant(intp, 1)
            accumulate = None
        mask = None
        if masked:  # lanes of the last vector whose column is below limit
            first_col = builder.add(i, ir.Constant(intp, (vectors - 1) * count))
            room = builder.sub(index(8), first_col)
            splat = builder.shuffle_vector(
                builder.insert_element(ir.Constant(ir.VectorType(intp, count), ir.Undefined),
                                       room, ir.Constant(ir.IntType(32), 0)),
                ir.Constant(ir.VectorType(intp, count), ir.Undefined),
                ir.Constant(ir.VectorType(ir.IntType(32), count), [0] * count))
            mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(intp, count),
                                                        list(range(count))), splat)
        i32 = ir.IntType(32)
        mty = ir.VectorType(ir.IntType(1), count)
        suffix = f"v{count}f{32 if single else 64}"
        masked_load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mty, vty]),
            f"llvm.masked.load.{suffix}.p0")
        masked_store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), i32, mty]),
            f"llvm.masked.store.{suffix}.p0")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.{suffix}")
        zero = ir.Constant(vty, None)

        def vector_at(data, row, stride, v, col=i):
            offset = builder.add(builder.add(builder.mul(row, stride), col),
                                 ir.Constant(intp, v * count))
            return builder.bitcast(builder.gep(data, [offset], inbounds=True),
                                   vty.as_pointer())

        def load(ptr, v):
            if mask is not None and v == vectors - 1:
                return builder.call(masked_load, [ptr, i32(align), mask, zero])
            return builder.load(ptr, align=align)

        def store(value, ptr, v):
            if mask is not None and v == vectors - 1:
                builder.call(masked_store, [value, ptr, i32(align), mask])
            else:
                builder.store(value, ptr, align=align)

        c_rows = [builder.add(j, ir.Constant(intp, r)) for r in range(rows)]
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)]
                for _ in range(rows)]
        if accumulate is not None:
            with builder.if_then(accumulate):
                for r in range(rows):
                    for v in range(vectors):
                        builder.store(load(vector_at(c_arr.data, c_rows[r], c_stride, v), v),
                                      accs[r][v])
        a_rows = [builder.gep(a_arr.data, [builder.add(builder.mul(c_rows[r], a_row), a_start)],
                              inbounds=True)
                  for r in range(rows)]
        undef = ir.Constant(vty, ir.Undefined)
        broadcast = ir.Constant(ir.VectorType(i32, count), [0] * count)
        with cgutils.for_range(builder, k_in) as loop:
            k = loop.index
            bs = [load(vector_at(b_arr.data, k, b_stride, v, b_col), v) for v in range(vectors)]
            a_k_offset = builder.mul(k, a_k)
            for r in range(rows):
                a = builder.load(builder.gep(a_rows[r], [a_k_offset], inbounds=True))
                av = builder.shuffle_vector(builder.insert_element(undef, a, i32(0)), undef,
                                            broadcast)
                for v in range(vectors):
                    builder.store(builder.call(fma, [av, bs[v], builder.load(accs[r][v])]),
                                  accs[r][v])
        for r in range(rows):
            for v in range(vectors):
                store(builder.load(accs[r][v]), vector_at(c_arr.data, c_rows[r], c_stride, v), v)
        return context.get_dummy_value()

    if offset:
        @intrinsic
        def tile(typingctx, B, A, C, j, i, a_row, a_k, accumulate, limit, a_start):
            if not _float_arrays(B, A, C) or not all(
                    isinstance(v, types.Integer) for v in (j, i, a_row, a_k, limit, a_start)) \
                    or not isinstance(accumulate, types.Boolean):
                return None
            return types.void(B, A, C, j, i, a_row, a_k, accumulate, limit, a_start), \
                codegen_for
    elif general:
        @intrinsic
        def tile(typingctx, B, A, C, j, i, a_row, a_k, accumulate, limit):
            if not _float_arrays(B, A, C) or not all(
                    isinstance(v, types.Integer) for v in (j, i, a_row, a_k, limit)) or \
                    not isinstance(accumulate, types.Boolean):
                return None
            return types.void(B, A, C, j, i, a_row, a_k, accumulate, limit), codegen_for
    else:
        @intrinsic
        def tile(typingctx, B, A, C, j, i):
            if not _float_arrays(B, A, C) or not all(isinstance(v, types.Integer)
                                                     for v in (j, i)):
                return None
            return types.void(B, A, C, j, i), codegen_for
    return tile


def _make_transpose_block(placed: bool = False):
    """An intrinsic ``block(x, xT, i, k)``: ``xT[k:k+L, i:i+L] = x[i:i+L, k:k+L]ᵀ`` for L
    lanes (16 float32, 8 float64): L vector loads of rows of ``x``, the transposition in
    registers (log₂ L rounds of two-vector shuffles, each swapping the off-diagonal blocks
    of a size within every block of twice that size), L vector stores into rows of ``xT``.
    ``placed``: ``block(x, xT, i, k, c)`` writes ``xT[k:k+L, c:c+L]`` instead. The arrays
    are C-contiguous of one float dtype (checked when typed); the caller keeps the indices
    in bounds."""

    def typed(x, xT, indices):
        return _float_arrays(x, xT) and all(isinstance(v, types.Integer) for v in indices)

    def codegen(context, builder, signature, args):
        _wide(builder)
        xa, ta, iv, kv = args[:4]
        xarr, tarr = (context.make_array(t)(context, builder, a)
                      for t, a in zip(signature.args[:2], (xa, ta)))
        single = signature.args[0].dtype == types.float32
        count = 16 if single else 8
        align = 4 if single else 8
        vty = ir.VectorType(context.get_value_type(signature.args[0].dtype), count)
        intp = context.get_value_type(types.intp)
        iv = context.cast(builder, iv, signature.args[2], types.intp)
        kv = context.cast(builder, kv, signature.args[3], types.intp)
        x_stride = builder.extract_value(xarr.shape, 1)
        t_stride = builder.extract_value(tarr.shape, 1)
        out_col = context.cast(builder, args[4], signature.args[4], types.intp) if placed \
            else iv

        def at(data, row, stride, col):
            offset = builder.add(builder.mul(row, stride), col)
            return builder.bitcast(builder.gep(data, [offset], inbounds=True),
                                   vty.as_pointer())

        rows = [builder.load(at(xarr.data, builder.add(iv, ir.Constant(intp, r)),
                                x_stride, kv), align=align) for r in range(count)]
        size = 1
        while size < count:
            mask = ir.VectorType(ir.IntType(32), count)
            low = ir.Constant(mask, [count + c - size if c & size else c
                                     for c in range(count)])
            high = ir.Constant(mask, [count + c if c & size else c + size
                                      for c in range(count)])
            swapped = list(rows)
            for r in range(count):
                if not r & size:
                    a, b = rows[r], rows[r + size]
                    swapped[r] = builder.shuffle_vector(a, b, low)
                    swapped[r + size] = builder.shuffle_vector(a, b, high)
            rows, size = swapped, 2 * size
        for c in range(count):
            builder.store(rows[c], at(tarr.data, builder.add(kv, ir.Constant(intp, c)),
                                      t_stride, out_col), align=align)
        return context.get_dummy_value()

    if placed:
        @intrinsic
        def block(typingctx, x, xT, i, k, c):
            return (types.void(x, xT, i, k, c), codegen) if typed(x, xT, (i, k, c)) else None
    else:
        @intrinsic
        def block(typingctx, x, xT, i, k):
            return (types.void(x, xT, i, k), codegen) if typed(x, xT, (i, k)) else None
    return block


transpose_block = _make_transpose_block()
_placed_block = _make_transpose_block(placed=True)

_t82, _t81, _t81m = make_tile(8, 2, True), make_tile(8, 1, True), make_tile(8, 1, True, True)
_t42, _t41, _t41m = make_tile(4, 2, True), make_tile(4, 1, True), make_tile(4, 1, True, True)
_t12, _t11, _t11m = make_tile(1, 2, True), make_tile(1, 1, True), make_tile(1, 1, True, True)


PACKED_K = 256
"""The most features one block of the packed product sums over (see the module's
docstring)."""

PACKED_ROWS = 12
"""Rows of a packed product's tile (× two vectors of outputs: 24 accumulators of the 32
vector registers); a block of rows is best a multiple of it."""

_P2, _P2m, _P1m = (make_tile(PACKED_ROWS, 2, True, False, True),
                   make_tile(PACKED_ROWS, 2, True, True, True),
                   make_tile(PACKED_ROWS, 1, True, True, True))
_E2, _E2m, _E1m = (make_tile(8, 2, True, False, True), make_tile(8, 2, True, True, True),
                   make_tile(8, 1, True, True, True))
_Q2, _Q2m, _Q1m = (make_tile(4, 2, True, False, True), make_tile(4, 2, True, True, True),
                   make_tile(4, 1, True, True, True))
_S2, _S2m, _S1m = (make_tile(1, 2, True, False, True), make_tile(1, 2, True, True, True),
                   make_tile(1, 1, True, True, True))


def _as_bits(a):
    """``a`` viewed as unsigned integers of its size (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(_as_bits)
def _as_bits_impl(a):
    bits = np.uint32 if a.dtype == types.float32 else np.uint64
    return lambda a: a.view(bits)


def panel_width(dtype) -> int:
    """Outputs per packed panel: two vectors of lanes (32 float32, 16 float64)."""
    return 32 if np.dtype(dtype) == np.float32 else 16


def panels(m: int, dtype) -> int:
    """Packed panels of ``m`` outputs."""
    return -(-m // panel_width(dtype))


@njit(**_FLAGS)
def pack_panel(W, Wp, p):
    """``Wp[p] = W[p·w:(p+1)·w]ᵀ``, the columns past ``W``'s rows zero: blocks of L × L
    values transposed in registers (``transpose_block``), the edges one by one."""
    m, k_in = W.shape
    count = lanes(W)
    width = Wp.shape[2]
    panel = Wp[p]
    j0 = p * width
    j1 = min(m, j0 + width)
    whole = (j1 - j0) // count * count  # the panel's columns in whole blocks
    cols = k_in - k_in % count
    for c in range(0, whole, count):
        for k in range(0, cols, count):
            _placed_block(W, panel, j0 + c, k, c)
    zero = W.dtype.type(0.0)
    for k in range(k_in):
        start = 0 if k >= cols else whole
        for c in range(start, j1 - j0):
            panel[k, c] = W[j0 + c, k]
        for c in range(j1 - j0, width):
            panel[k, c] = zero


@njit(**_FLAGS)
def refresh_panel(W, S, Wp, p, fresh):
    """Panel ``p`` of ``W`` packed into ``Wp`` (:func:`pack_panel`) unless ``S``, a copy of
    the weights it was last packed from, holds the same bits in the panel's rows of ``W``
    (compared as integers, so a zero changed to a negative zero counts as a change and an
    unchanged NaN does not); ``S`` is then brought up to date. ``fresh``: pack, whatever
    ``S`` holds. Returns whether it packed."""
    width = Wp.shape[2]
    j0 = p * width
    j1 = min(W.shape[0], j0 + width)
    now, then = W[j0:j1], S[j0:j1]
    if not fresh:
        bits, kept = _as_bits(now), _as_bits(then)
        changed = 0
        for j in range(j1 - j0):
            for k in range(W.shape[1]):
                changed += bits[j, k] != kept[j, k]
        if changed == 0:
            return False
    then[:, :] = now
    pack_panel(W, Wp, p)
    return True


@njit(**_FLAGS)
def _packed_tile(A, B, C, j, c0, acc, limit, k0, rows, mode):
    """One tile of :func:`packed_product`, ``rows`` (PACKED_ROWS, 8, 4 or 1) rows from row
    ``j``, outputs from ``c0``: ``mode`` 0 two whole vectors, 1 two vectors (the second
    masked at ``limit``), 2 one masked vector."""
    a_row = A.shape[1]
    one = np.intp(1)
    if rows == PACKED_ROWS:
        if mode == 0:
            _P2(B, A, C, j, c0, a_row, one, acc, limit, k0)
        elif mode == 1:
            _P2m(B, A, C, j, c0, a_row, one, acc, limit, k0)
        else:
            _P1m(B, A, C, j, c0, a_row, one, acc, limit, k0)
    elif rows == 8:
        if mode == 0:
            _E2(B, A, C, j, c0, a_row, one, acc, limit, k0)
        elif mode == 1:
            _E2m(B, A, C, j, c0, a_row, one, acc, limit, k0)
        else:
            _E1m(B, A, C, j, c0, a_row, one, acc, limit, k0)
    elif rows == 4:
        if mode == 0:
            _Q2(B, A, C, j, c0, a_row, one, acc, limit, k0)
        elif mode == 1:
            _Q2m(B, A, C, j, c0, a_row, one, acc, limit, k0)
        else:
            _Q1m(B, A, C, j, c0, a_row, one, acc, limit, k0)
    elif mode == 0:
        _S2(B, A, C, j, c0, a_row, one, acc, limit, k0)
    elif mode == 1:
        _S2m(B, A, C, j, c0, a_row, one, acc, limit, k0)
    else:
        _S1m(B, A, C, j, c0, a_row, one, acc, limit, k0)


@njit(**_FLAGS)
def packed_product(A, Wp, C):
    """``C = A Wᵀ`` for ``A`` ``(N, K)`` C-contiguous, read in place, and ``W`` ``(M, K)``
    packed into ``Wp`` ``(panels(M), K, w)`` (:func:`pack_panel`); ``C`` ``(N, M)``
    C-contiguous. On the calling thread: blocks of at most :data:`PACKED_K` features (of
    equal size), each panel's block over every strip of rows (tiles of
    :data:`PACKED_ROWS`, then 8, 4, then single rows: a last 8 rows in one tile, whose
    16 multiply-adds per 10 loads beat two 4-row tiles' 8 per 6). The caller checks
    shapes."""
    n, k_in = A.shape
    m = C.shape[1]
    count = lanes(C)
    width = Wp.shape[2]
    blocks = -(-k_in // PACKED_K)
    kc = -(-k_in // blocks)
    for k0 in range(0, k_in, kc):
        k1 = min(k_in, k0 + kc)
        acc = k0 > 0
        for p in range(Wp.shape[0]):
            B = Wp[p, k0:k1]
            c0 = p * width
            left = m - c0
            mode = 0 if left >= width else (1 if left > count else 2)
            j = 0
            for rows in (PACKED_ROWS, 8, 4, 1):  # (a tuple: one compiled _packed_tile)
                while j + rows <= n:
                    _packed_tile(A, B, C, j, c0, acc, m, k0, rows, mode)
                    j += rows


@njit(**_FLAGS)
def _strip(A, B, C, j, rows, p0, p1, a_row, a_k, accumulate):
    """``C[j:j+rows, p0:p1]`` in tiles of ``rows`` (8, 4 or 1) rows: pairs of vectors, then
    a vector, then the last partial vector under a mask."""
    count = lanes(C)
    i = p0
    while i + 2 * count <= p1:
        if rows == 8:
            _t82(B, A, C, j, i, a_row, a_k, accumulate, p1)
        elif rows == 4:
            _t42(B, A, C, j, i, a_row, a_k, accumulate, p1)
        else:
            _t12(B, A, C, j, i, a_row, a_k, accumulate, p1)
        i += 2 * count
    if i + count <= p1:
        if rows == 8:
            _t81(B, A, C, j, i, a_row, a_k, accumulate, p1)
        elif rows == 4:
            _t41(B, A, C, j, i, a_row, a_k, accumulate, p1)
        else:
            _t11(B, A, C, j, i, a_row, a_k, accumulate, p1)
        i += count
    if i < p1:
        if rows == 8:
            _t81m(B, A, C, j, i, a_row, a_k, accumulate, p1)
        elif rows == 4:
            _t41m(B, A, C, j, i, a_row, a_k, accumulate, p1)
        else:
            _t11m(B, A, C, j, i, a_row, a_k, accumulate, p1)


@njit(**_FLAGS)
def _block(A, B, C, r0, r1, c0, c1, a_row, a_k, accumulate):
    """``C[r0:r1, c0:c1] (+)= A'[r0:r1] B[:, c0:c1]`` (``c0`` on a vector boundary): panels
    of columns, each in strips of 8, then 4, then single rows. (Callers pass variables,
    not literal constants: Numba compiles a function once per literal value it is given.)"""
    count = lanes(C)
    k_in = B.shape[0]
    panel = max(2 * count, PANEL_BYTES // max(1, k_in * C.itemsize) // (2 * count)
                * (2 * count))
    for p0 in range(c0, c1, panel):
        p1 = min(c1, p0 + panel)
        j = r0
        for rows in (8, 4, 1):  # (a tuple: one compiled _strip, not one per literal size)
            while j + rows <= r1:
                _strip(A, B, C, j, rows, p0, p1, a_row, a_k, accumulate)
                j += rows


@njit(parallel=True, **_FLAGS)
def _parallel(A, B, C, XT, ZT, a_row, a_k, accumulate, row_parts, col_parts, step):
    """The one parallel region of both entry points (one region to compile per dtype, not
    two): with ``step > 0`` :func:`forward`'s (``A, B, C = X, W, Z``, ``row_parts`` blocks of
    ``step`` outputs), else :func:`product`'s (rows in whole strips, columns in whole pairs
    of vectors: a cache line of ``C`` is never written by two threads)."""
    m, p = C.shape
    k_in = A.shape[1]
    count = lanes(C)
    rstep = (-(-m // row_parts) + 7) // 8 * 8
    cstep = (-(-p // col_parts) + 2 * count - 1) // (2 * count) * (2 * count)
    for t in prange(row_parts * col_parts):
        if step > 0:
            j0 = t * step
            j1 = min(B.shape[0], j0 + step)
            if j0 < j1:
                _forward_outputs(A, B, C, XT[t * k_in:(t + 1) * k_in], ZT, j0, j1)
        else:
            r0 = (t // col_parts) * rstep
            c0 = (t % col_parts) * cstep
            r1 = min(m, r0 + rstep)
            c1 = min(p, c0 + cstep)
            if r0 < r1 and c0 < c1:
                _block(A, B, C, r0, r1, c0, c1, a_row, a_k, accumulate)


@njit(**_FLAGS)
def split(m, p, count, parts):
    """``(row_parts, col_parts)`` for ``parts`` threads on a ``C`` of ``m × p`` with
    ``count`` lanes per vector: rows in whole strips of 8 while each thread gets at least
    two strips, else columns in whole pairs of vectors, else fewer threads."""
    if parts <= 1:
        return 1, 1
    if m >= 16 * parts:
        return parts, 1
    vectors = -(-p // count)
    if vectors >= 2 * parts:
        return 1, parts
    return max(1, min(parts, m // 8, vectors)), 1


@njit(**_FLAGS)
def product(A, B, C, a_row, a_k, accumulate, parts):
    """``C (+)= A' B`` (``A'[r, k] = A.flat[r·a_row + k·a_k]``) on ``parts`` threads (see
    the module's docstring). Shapes, strides and overlap are the caller's to check: this
    reads and writes through raw offsets (:func:`run` checks them)."""
    row_parts, col_parts = split(C.shape[0], C.shape[1], lanes(C), parts)
    if row_parts * col_parts == 1:
        origin = np.intp(0)
        _block(A, B, C, origin, C.shape[0], origin, C.shape[1], a_row, a_k, accumulate)
    else:
        _parallel(A, B, C, C[:0], C[:0], a_row, a_k, accumulate, row_parts, col_parts,
                  np.intp(0))


@njit(**_FLAGS)
def transpose(x, xT):
    """``xT[:, :N] = xᵀ`` for ``x`` ``(N, K)`` (``xT`` may have more columns: they are left
    as they are): blocks of L × L values through registers, a vector of L rows of ``xT``
    written whole at a time, the edges one by one."""
    count = lanes(x)
    n, k_in = x.shape
    rows = n - n % count
    cols = k_in - k_in % count
    for k in range(0, cols, count):
        for i in range(0, rows, count):
            transpose_block(x, xT, i, k)
    for k in range(cols, k_in):
        for i in range(rows):
            xT[k, i] = x[i, k]
    for i in range(rows, n):
        for k in range(k_in):
            xT[k, i] = x[i, k]


@njit(**_FLAGS)
def _forward_outputs(X, W, Z, XT, ZT, j0, j1):
    """``Z[:, j0:j1] = X W[j0:j1]ᵀ`` on the calling thread: ``X`` transposed into ``XT``
    (this thread's own), ``ZT[j0:j1] = W[j0:j1] Xᵀ``, then transposed into ``Z``'s
    columns ``j0:j1``."""
    n = X.shape[0]
    transpose(X, XT)
    _block(W, XT, ZT, j0, j1, np.intp(0), n, W.shape[1], np.intp(1), np.bool_(False))
    # the block of ZT's rows j, columns i goes to Z's rows i, columns j
    count = lanes(Z)
    rows = n - n % count
    whole = j0 + (j1 - j0) // count * count
    for j in range(j0, whole, count):
        for i in range(0, rows, count):
            transpose_block(ZT, Z, j, i)
    for i in range(rows):
        for j in range(whole, j1):
            Z[i, j] = ZT[j, i]
    for i in range(rows, n):
        for j in range(j0, j1):
            Z[i, j] = ZT[j, i]


@njit(**_FLAGS)
def forward_parts(m, count, parts):
    """``(parts, step)``: how :func:`forward` splits ``m`` outputs over at most ``parts``
    threads, ``step`` each (whole vectors of ``count`` lanes; the last part may hold
    fewer)."""
    parts = max(1, min(parts, m // count))
    step = -(-(-(-m // parts)) // count) * count
    return -(-m // step), step


def forward_scratch(n: int, k: int, m: int, dtype, parts: int) -> tuple[tuple, tuple]:
    """The shapes of the scratch ``XT`` and ``ZT`` that :func:`forward` needs for an
    ``(n, k)`` batch and ``m`` outputs on ``parts`` threads: a ``(k, n)`` block of ``Xᵀ``
    per thread, stacked, and one ``(m, n)`` ``Zᵀ`` whose rows the threads share out."""
    parts, _ = forward_parts(m, 16 if np.dtype(dtype) == np.float32 else 8, parts)
    return (parts * k, n), (m, n)


@njit(**_FLAGS)
def forward(X, W, Z, XT, ZT, parts):
    """``Z = X Wᵀ`` for ``X`` ``(N, K)``, ``W`` ``(M, K)``, ``Z`` ``(N, M)``, through the
    caller's scratch ``XT`` and ``ZT`` of the shapes :func:`forward_scratch` gives for
    the same ``parts``: the outputs (rows of ``W``) split into blocks of whole vectors,
    each thread transposing the whole batch into its own ``Xᵀ``, computing its rows of
    ``Zᵀ = W Xᵀ`` and transposing them into its columns of ``Z``. Each thread reads only
    its block of ``W``: in a training step the optimizer's threads have just written the
    weights, each its own part of them, and a thread reading the whole of ``W`` took the
    other core's part from that core's cache (the batch split that did so ran the mnist
    MLP's first layer 1.4× slower within a step than alone). The caller checks shapes and
    overlap."""
    parts, step = forward_parts(W.shape[0], lanes(X), parts)
    if parts == 1:
        _forward_outputs(X, W, Z, XT, ZT, np.intp(0), W.shape[0])
    else:
        one = np.intp(1)
        _parallel(X, W, Z, XT, ZT, one, one, np.bool_(False), parts, one, step)


@njit(**_FLAGS)
def _apart(x, y):
    """Whether the memory of the arrays ``x`` and ``y`` does not overlap."""
    x0, y0 = x.ctypes.data, y.ctypes.data
    return x0 + x.size * x.itemsize <= y0 or y0 + y.size * y.itemsize <= x0


def _run(a, b, out, trans_a, trans_b, accumulate, xt, zt, parts):
    """:func:`run` once the arguments' types qualify (compiled for each combination met)."""
    if trans_a and trans_b:
        return False
    m, k = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if k != kb or out.shape[0] != m or out.shape[1] != n or m == 0 or n == 0 or k == 0:
        return False
    if not (_apart(out, a) and _apart(out, b)):
        return False
    if trans_b:  # out = a bᵀ: the Dense forward product, through the scratch
        if accumulate:
            return False
        used, step = forward_parts(n, lanes(out), parts)
        if xt.shape[0] != used * k or zt.shape[0] != n or xt.shape[1] != m or \
                zt.shape[1] != m or not (_apart(xt, zt) and _apart(xt, a) and _apart(
                    xt, b) and _apart(xt, out) and _apart(zt, a) and _apart(zt, b) and
                    _apart(zt, out)):
            return False
        forward(a, b, out, xt, zt, parts)
    else:
        if trans_a:  # out (+)= aᵀ b: a's columns are the rows of A'
            a_row, a_k = 1, a.shape[1]
        else:
            a_row, a_k = k, 1
        product(a, b, out, a_row, a_k, accumulate, parts)
    return True


_RUN = njit(**_FLAGS)(_run)
# compiled per combination of argument types on demand, by run (below), once they qualify
# (Numba's disable_compile() refuses a dispatcher with no signature yet: hence the flag)
_RUN._can_compile = False


_FLOAT_NUMS = (np.dtype(np.float32).num, np.dtype(np.float64).num)


def _likely(a, b, out) -> bool:
    """The operands' checks that the compiled signatures cannot make cheaply: a declined
    call into them costs tens of microseconds (Numba searches for conversions). (Equal
    dtypes, not identical objects: an unpickled array has a dtype object of its own.)"""
    dtype = out.dtype
    if dtype.num not in _FLOAT_NUMS or not dtype.isnative or a.dtype != dtype or \
            b.dtype != dtype:
        return False
    fa, fb, fo = a.flags, b.flags, out.flags
    return fa.c_contiguous and fb.c_contiguous and fo.c_contiguous and fa.writeable and \
        fb.writeable and fo.writeable


def _qualifies(a, b, out, xt, zt) -> bool:
    """All of :func:`run`'s type conditions (the first call of a combination of types)."""
    return all(type(x) is np.ndarray and x.ndim == 2 for x in (a, b, out, xt, zt)) and \
        _likely(a, b, out) and _likely(xt, zt, out)


def run(a, b, out, trans_a: bool, trans_b: bool, accumulate: bool, xt, zt,
        parts: int) -> bool:
    """``out (+)= op(a) op(b)`` on ``parts`` threads, where it applies; returns whether it
    ran (False, having done nothing, otherwise). Applies to two-dimensional C-contiguous
    writeable float32/float64 NumPy arrays of one dtype in native byte order (read-only
    operands are declined: each would compile another variant, seconds, for a rare case),
    ``out`` apart from the inputs, shapes that agree, not both operands transposed; ``trans_b``
    (the forward product ``X Wᵀ``) without ``accumulate``, through the scratch ``xt`` and
    ``zt`` of the shapes :func:`forward_scratch` gives (other products ignore them: pass
    any 0×0 arrays of the dtype). A combination of argument types is compiled the first
    time it is met (Numba's disk cache keeps it), after the checks in Python; later calls
    check in compiled code."""
    if type(a) is not np.ndarray or type(b) is not np.ndarray or \
            type(out) is not np.ndarray or not _likely(a, b, out):
        return False
    try:
        return _launch(a, b, out, trans_a, trans_b, accumulate, xt, zt, parts)
    except TypeError:  # types not compiled yet, or not qualifying
        pass
    if not _qualifies(a, b, out, xt, zt):
        return False
    signature = tuple(numba.typeof(x) for x in (a, b, out, trans_a, trans_b, accumulate, xt,
                                                zt, parts))
    with _COMPILE_LOCK:
        if signature not in _RUN.overloads:
            _RUN._can_compile = True
            try:
                _RUN.compile(signature)
            finally:
                _RUN._can_compile = False
    return _launch(a, b, out, trans_a, trans_b, accumulate, xt, zt, parts)


_TURNS: list = []  # numba_cpu's run_parallel and _PARALLEL, imported at the first launch


def launch_parallel(fn, *args):
    """``fn(*args)`` for a function that runs a Numba parallel region, launched as
    ``numba_cpu`` launches its parallel kernels: under Numba's workqueue threading layer,
    which aborts the process when two threads launch parallel code at once, one launch at
    a time (the OpenMP and TBB layers take any number at once)."""
    if not _TURNS:
        from backprop.kernels import numba_cpu

        _TURNS.extend((numba_cpu.run_parallel, numba_cpu._PARALLEL))
    if _TURNS[1]["serialize"] is False:  # the common case, without another call
        return fn(*args)
    return _TURNS[0](fn, *args)


def _launch(a, b, out, trans_a, trans_b, accumulate, xt, zt, parts):
    """``_RUN(...)``, through :func:`launch_parallel` where it runs a parallel region."""
    if parts > 1:
        return launch_parallel(_RUN, a, b, out, trans_a, trans_b, accumulate, xt, zt, parts)
    return _RUN(a, b, out, trans_a, trans_b, accumulate, xt, zt, parts)
