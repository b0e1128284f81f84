"""The low-precision outputs of the fused kernels (mixed precision, ``kernels/lowp.py``).

The epilogues (``out_lp`` of ``bias_act_forward``, ``delta_lp`` of ``bias_act_backward``) and
the optimizer steps (``data_lp``) may also write a low-precision copy of the float32 value they
store, in the same pass. For every CPU backend (the reference and numba_cpu), both formats
(bfloat16 as ``uint16`` bits, float16), every activation and every optimizer variant:

- the float32 results are bit for bit those of the same call without the copy, but for
  the quiet bit of a NaN that was a signalling NaN on input: LLVM folds ``x · 1`` to ``x``
  (its default floating-point environment does not promise to quiet signalling NaNs), and
  whether it does depends on the rest of the loop, so two specialisations of a kernel may
  disagree there. Arithmetic never produces a signalling NaN; the inputs have some to check
  that the copies keep what the float32 result holds, whichever it is;
- the copy is bit for bit the conversion of the float32 result: bfloat16 against
  :func:`backprop.bf16.to_bf16` (an implementation apart from the kernels', NaN payloads
  included), float16 against NumPy's ``astype(np.float16)`` (NaN only as NaN: its payload is
  not part of the contract).

Inputs hold the values where conversions go wrong: NaNs with payloads (signalling, negative),
±inf, float32 values that round to inf (3.4e38 in bfloat16, 65520 in float16), float32
subnormals, exact ties of both formats, and both formats' subnormal ranges. Shapes are odd
(1×1, 7×13, 257×129). numba_cpu runs every activation (in bfloat16; one in both formats)
and every optimizer variant (in bfloat16; the first and last of each optimizer in both)
through its serial loops, every argument pattern with one activation, and its parallel
loops with that activation (the backward epilogue only with δ apart from dA) and two
variants of each optimizer in bfloat16, and once at a size above its parallel threshold
(the backward epilogue in place): compiling the whole grid twice would take minutes.
Invalid copies are refused before any work.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backprop import kernels as K
from backprop.bf16 import to_bf16
from backprop.kernels import optimizers as O
from backprop.kernels import reference as R

BACKENDS = ["reference", "numba_cpu"]
FORMATS = {"bfloat16": np.uint16, "float16": np.float16}
SHAPES = [(1, 1), (7, 13), (257, 129)]
FLAT_SHAPES = [(1,), (7, 13), (1000,)]

SPECIAL_BITS = [
    0x00000000, 0x80000000,  # ±0
    0x7F800000, 0xFF800000,  # ±inf
    0x7FC00000, 0x7FC00001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC12345,  # quiet NaNs, payloads
    0x7F800001, 0x7FBFFFFF, 0xFF800001, 0xFF812345,  # signalling NaNs
    0x7F7FFFFF, 0xFF7FFFFF,  # ±max float32 (3.4e38): inf in bfloat16
    0x7F7F8000, 0x7F7F7FFF,  # the tie at bfloat16's largest value (→ inf), just below
    0x00000001, 0x80000001, 0x007FFFFF, 0x00008000, 0x00018000, 0x00400000,  # subnormals
    0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001,  # bfloat16 ties, neighbours
    0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001,  # float16 ties, neighbours
    0x477FE000, 0x477FEFFF, 0x477FF000, 0xC77FF000, 0x47800000,  # float16 max, its tie → inf
    0x38800000, 0x387FE000, 0x387FF000, 0x387FFFFF,  # float16's smallest normal, below it
    0x33000000, 0x33000001, 0x33400000, 0x33C00000, 0x34000000, 0xB3000001,  # 2⁻²⁵ ties
    0x3A800000, 0x3A801000,  # a float16 subnormal, and a tie between two of them
]
SPECIAL = np.array(SPECIAL_BITS, np.uint32).view(np.float32)


def skip_unless_available(backend: str) -> None:
    reason = K.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"kernel backend {backend} unavailable: {reason}")


def values(rng, shape, scale=2.0, special=True) -> np.ndarray:
    """float32 normals of ``shape`` with up to half of the elements replaced by
    :data:`SPECIAL` values (a 1×1 array keeps its normal value)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    flat = x.reshape(-1)
    k = min(flat.size // 2, SPECIAL.size) if special else 0
    if k:
        flat[rng.choice(flat.size, k, replace=False)] = rng.permutation(SPECIAL)[:k]
    return x


def empty_lp(shape, fmt: str) -> np.ndarray:
    """A low-precision output filled with a pattern no correct kernel leaves behind in
    both formats (bfloat16 and float16 0x5A5A are finite numbers the inputs never round to)."""
    return np.full(shape, 0x5A5A, np.uint16).view(FORMATS[fmt])


def assert_bits_equal(label, got, want) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, label
    width = {8: np.uint64, 4: np.uint32, 2: np.uint16}[got.dtype.itemsize]
    bad = got.view(width) != want.view(width)
    if got.dtype == np.float32:  # a signalling NaN may come out quieted or not (see below)
        quiet = np.uint32(0x00400000)
        bad &= ~(np.isnan(got) & np.isnan(want)
                 & ((got.view(width) | quiet) == (want.view(width) | quiet)))
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[:5]
        raise AssertionError(f"{label}: {bad.sum()} elements differ, e.g. at {list(i)}: "
                             f"{[hex(v) for v in got.view(width).reshape(-1)[i]]} != "
                             f"{[hex(v) for v in want.view(width).reshape(-1)[i]]}")


def assert_copy(label, lp, source) -> None:
    """``lp`` is the conversion of the float32 ``source``: bfloat16 bit for bit (NaN
    payloads included), float16 bit for bit but for NaN, which must stay NaN."""
    assert lp.flags.c_contiguous and lp.shape == source.shape
    if lp.dtype == np.uint16:
        assert_bits_equal(f"{label}: bfloat16 copy", lp, to_bf16(source))
        return
    with np.errstate(over="ignore"):
        want = source.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(lp), nan), f"{label}: float16 copy: NaN elsewhere"
    assert_bits_equal(f"{label}: float16 copy", np.where(nan, 0, lp), np.where(nan, 0, want))


RUNS = ["reference", "numba_cpu-serial", "numba_cpu-parallel"]
# numba_cpu compiles one specialisation per activation, format and argument pattern (bias or
# None, in place or not, db or None), each taking seconds, serial and parallel apart. The
# copy's store is the same statement after the float32 store in every one: numba_cpu runs
# every activation in one pattern, and every pattern with VARIANT_ACTIVATION; its parallel
# loops (the same statements under prange) with VARIANT_ACTIVATION alone. The reference
# runs the whole grid.
VARIANT_ACTIVATION = "relu"
FORWARD_VARIANTS = [(bias, layout) for bias in (False, True)
                    for layout in ("separate", "in_place")]
BACKWARD_VARIANTS = [(db, layout) for db in ("no_db", "db", "db_accumulate")
                     for layout in ("separate", "in_place")]
# The backward's parallel loops, the slowest specialisations to compile, without δ in place
# (a specialisation of its own: delta_arg None): the serial loops run that layout with
# every db pattern, and test_numba_cpu_epilogues_above_the_parallel_threshold runs the
# parallel loops in place, with db.
PARALLEL_BACKWARD_VARIANTS = [v for v in BACKWARD_VARIANTS if v[1] == "separate"]


def epilogue_params(variants, default, parallel_variants=None):
    """pytest params ``(run, act, fmt, *variant)``: the reference on the whole grid,
    numba_cpu as described above; its parallel loops on ``parallel_variants`` (by default
    ``variants``)."""
    out = []
    for run in RUNS:
        for act in R.ACTIVATIONS:
            if run.endswith("parallel") and act != VARIANT_ACTIVATION:
                continue
            chosen = variants if run == "reference" or act == VARIANT_ACTIVATION \
                else [default]
            if run.endswith("parallel") and parallel_variants is not None:
                chosen = parallel_variants
            # the copy's conversion follows the activation's value, whatever the formula:
            # numba_cpu runs the other activations with bfloat16, VARIANT_ACTIVATION with both
            formats = FORMATS if run == "reference" or act == VARIANT_ACTIVATION \
                else ["bfloat16"]
            for fmt in formats:
                for variant in chosen:
                    out.append(pytest.param(run, act, fmt, *variant,
                                            id="-".join([run, act, fmt, *map(str, variant)])))
    return out


def backend_of(run: str, monkeypatch) -> str:
    """The backend of ``run``; for numba_cpu, with every call below its parallel threshold
    (serial loops) or above it (parallel loops)."""
    backend, _, loops = run.partition("-")
    skip_unless_available(backend)
    if backend == "numba_cpu":
        from backprop.kernels import numba_cpu

        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_ELEMENTS",
                            0 if loops == "parallel" else 1 << 62)
    return backend


# ---------------------------------------------------------------------------------------
# The epilogues
def forward_case(backend, act, fmt, bias, layout, shape, seed):
    """One ``bias_act_forward`` call without and with ``out_lp`` on the same values; checks
    both and returns nothing."""
    fn = K.implementation(backend, "bias_act_forward")
    rng = np.random.default_rng(seed)
    z0 = values(rng, shape)
    b = values(rng, shape[1:], special=shape[1] > 4) if bias else None
    results = []
    for with_lp in (False, True):
        z = z0.copy()
        out = z if layout == "in_place" else np.full_like(z, np.nan)
        lp = empty_lp(shape, fmt) if with_lp else None
        with np.errstate(all="ignore"):
            returned = fn(z, b, out, act, 0.1, out_lp=lp) if with_lp else fn(z, b, out, act, 0.1)
        assert returned is out
        results.append((z, out, lp))
    (z1, out1, _), (z2, out2, lp) = results
    label = f"{backend} {act} {fmt} bias={bias} {layout} {shape}"
    assert_bits_equal(f"{label}: out", out2, out1)
    assert_bits_equal(f"{label}: z", z2, z1)
    assert_copy(label, lp, out2)


@pytest.mark.parametrize("run, act, fmt, bias, layout",
                         epilogue_params(FORWARD_VARIANTS, (True, "separate")))
def test_forward_epilogue_writes_the_copy_of_what_it_stores(run, act, fmt, bias, layout,
                                                            monkeypatch):
    backend = backend_of(run, monkeypatch)
    for k, shape in enumerate(SHAPES):
        forward_case(backend, act, fmt, bias, layout, shape, seed=k)


def backward_case(backend, act, fmt, db_mode, layout, shape, seed):
    fn = K.implementation(backend, "bias_act_backward")
    rng = np.random.default_rng(seed)
    z = values(rng, shape)
    with np.errstate(all="ignore"):
        a = R.activate(np, z, act, 0.1)
    da0 = values(rng, shape)
    db0 = values(rng, shape[1:], special=False)
    results = []
    for with_lp in (False, True):
        da = da0.copy()
        delta = da if layout == "in_place" else np.full_like(da, np.nan)
        db = None if db_mode == "no_db" else db0.copy()
        lp = empty_lp(shape, fmt) if with_lp else None
        args = (da, a.copy(), z.copy(), act, 0.1, delta, db, db_mode == "db_accumulate")
        with np.errstate(all="ignore"):
            returned = fn(*args, delta_lp=lp) if with_lp else fn(*args)
        assert returned is delta
        results.append((delta, db, lp))
    (delta1, db1, _), (delta2, db2, lp) = results
    label = f"{backend} {act} {fmt} {db_mode} {layout} {shape}"
    assert_bits_equal(f"{label}: delta", delta2, delta1)
    if db1 is not None:
        assert_bits_equal(f"{label}: db", db2, db1)
    assert_copy(label, lp, delta2)


@pytest.mark.parametrize("run, act, fmt, db_mode, layout",
                         epilogue_params(BACKWARD_VARIANTS, ("db", "separate"),
                                         PARALLEL_BACKWARD_VARIANTS))
def test_backward_epilogue_writes_the_copy_of_what_it_stores(run, act, fmt, db_mode, layout,
                                                             monkeypatch):
    backend = backend_of(run, monkeypatch)
    for k, shape in enumerate(SHAPES):
        backward_case(backend, act, fmt, db_mode, layout, shape, seed=100 + k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_numba_cpu_epilogues_above_the_parallel_threshold(fmt):
    skip_unless_available("numba_cpu")
    from backprop.kernels import numba_cpu

    shape = (1031, 517)
    assert shape[0] * shape[1] >= numba_cpu.PARALLEL_MIN_ELEMENTS
    forward_case("numba_cpu", "relu", fmt, True, "separate", shape, seed=7)
    # in place: the one run of the backward's parallel loops in that layout (see
    # PARALLEL_BACKWARD_VARIANTS)
    backward_case("numba_cpu", "relu", fmt, "db", "in_place", shape, seed=8)


# ---------------------------------------------------------------------------------------
# Every pattern of the conversion, through the kernels' own arithmetic: the identity
# forward epilogue without a bias stores z itself, so its copy converts the inputs as given
def _patterns(rng) -> np.ndarray:
    """Every SPECIAL value, every bfloat16 and float16 rounding boundary of every binade
    (the values just below, at and just above each tie), and random bit patterns. (The
    float16 formula of numba_cpu was also checked on all 2³² patterns, once: too slow here.)"""
    ties = []
    # the half-unit of every position (ties wherever a format's last kept bit is; float16's
    # moves with the exponent in its subnormal range), odd and even, and the top patterns
    mantissas = [1 << k for k in range(23)] + [3 << k for k in range(22)] + [0x7FFFFF,
                                                                              0x7F8000, 0x7FF000]
    for exponent in range(256):
        for sign in (0, 0x80000000):
            base = sign | (exponent << 23)
            for mantissa in mantissas:
                for delta in (-1, 0, 1):
                    ties.append((base | mantissa) + delta & 0xFFFFFFFF)
    bits = np.concatenate([np.array(SPECIAL_BITS + ties, np.uint32),
                           rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint32)])
    return bits.view(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_copy_of_every_rounding_boundary(backend, fmt):
    skip_unless_available(backend)
    x = _patterns(np.random.default_rng(11))
    x = x[: x.size // 509 * 509].reshape(-1, 509)  # 509 columns: an odd row length
    out, lp = np.empty_like(x), empty_lp(x.shape, fmt)
    K.implementation(backend, "bias_act_forward")(x, None, out, "identity", 0.0, lp)
    assert_bits_equal("identity", out, x)
    assert_copy(f"{backend} every boundary", lp, x)
    if fmt == "bfloat16":  # independent of to_bf16: ml_dtypes, where installed
        try:
            import ml_dtypes
        except ImportError:
            return
        with np.errstate(invalid="ignore"):
            want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        nan = np.isnan(x)
        assert_bits_equal("ml_dtypes", np.where(nan, 0, lp), np.where(nan, 0, want))


# ---------------------------------------------------------------------------------------
# The optimizers: every op and every variant, each with data_lp
def _sgd(rng, shape, momentum, nesterov, first_step, weight_decay):
    p, g = values(rng, shape), values(rng, shape, special=False)
    buf = values(rng, shape, special=False) if momentum else None
    return [p, g, buf, 0.1, momentum, 0.1, nesterov, weight_decay, first_step]


def _rmsprop(rng, shape, momentum, centered, weight_decay):
    p, g = values(rng, shape), values(rng, shape, special=False)
    avg = values(rng, shape, special=False) if centered else None
    square = np.abs(values(rng, shape, special=False)) + (avg ** 2 if centered else 0.0)
    buf = values(rng, shape, special=False) if momentum else None
    return [p, g, square, buf, avg, 0.01, 0.99, 1e-8, weight_decay, momentum, centered]


def _adam(rng, shape, amsgrad, decoupled, weight_decay):
    p, g, m = values(rng, shape), values(rng, shape, special=False), \
        values(rng, shape, special=False)
    v = np.abs(values(rng, shape, special=False))
    vmax = np.abs(values(rng, shape, special=False)) if amsgrad else None
    return [p, g, m, v, vmax, 1e-3, 0.9, 0.999, 1e-8, weight_decay, decoupled, 3]


def _adagrad(rng, shape, weight_decay, lr_decay):
    p, g = values(rng, shape), values(rng, shape, special=False)
    return [p, g, np.abs(values(rng, shape, special=False)), 0.1, lr_decay, 1e-10,
            weight_decay, 2]


OPTIMIZER_CASES = {
    "sgd_step": [
        ("plain", lambda rng, s: _sgd(rng, s, 0.0, False, False, 0.0)),
        ("weight_decay", lambda rng, s: _sgd(rng, s, 0.0, False, False, 0.01)),
        ("momentum_first_step", lambda rng, s: _sgd(rng, s, 0.9, False, True, 0.0)),
        ("momentum", lambda rng, s: _sgd(rng, s, 0.9, False, False, 0.01)),
        ("nesterov", lambda rng, s: _sgd(rng, s, 0.9, True, False, 0.01)),
    ],
    "rmsprop_step": [
        ("plain", lambda rng, s: _rmsprop(rng, s, 0.0, False, 0.0)),
        ("momentum", lambda rng, s: _rmsprop(rng, s, 0.9, False, 0.01)),
        ("centered", lambda rng, s: _rmsprop(rng, s, 0.0, True, 0.0)),
        ("centered_momentum", lambda rng, s: _rmsprop(rng, s, 0.9, True, 0.01)),
    ],
    "adam_step": [
        ("adam", lambda rng, s: _adam(rng, s, False, False, 0.0)),
        ("adam_weight_decay", lambda rng, s: _adam(rng, s, False, False, 0.01)),
        ("adamw", lambda rng, s: _adam(rng, s, False, True, 0.01)),
        ("amsgrad", lambda rng, s: _adam(rng, s, True, False, 0.01)),
        ("adamw_amsgrad", lambda rng, s: _adam(rng, s, True, True, 0.01)),
    ],
    "adagrad_step": [
        ("plain", lambda rng, s: _adagrad(rng, s, 0.0, 0.0)),
        ("weight_decay_lr_decay", lambda rng, s: _adagrad(rng, s, 0.01, 0.1)),
    ],
}
def optimizer_params():
    """``(run, fmt, op, build)``: every case on the reference in both formats and on
    numba_cpu's serial loop in bfloat16; numba_cpu's serial loop in float16 and its parallel
    loop (the same statements under prange, compiled apart) in bfloat16 with each op's first
    and last case (the copy's conversion is the same statement in every variant: what differs
    between the formats is the conversion, what differs between the variants the update)."""
    out = []
    for run in RUNS:
        for fmt in FORMATS:
            if run.endswith("parallel") and fmt != "bfloat16":
                continue
            for op, cases in OPTIMIZER_CASES.items():
                fewer = run.endswith("parallel") or (run != "reference" and fmt != "bfloat16")
                chosen = [cases[0], cases[-1]] if fewer else cases
                for name, build in dict(chosen).items():
                    out.append(pytest.param(run, fmt, op, build, id=f"{run}-{fmt}-{op}-{name}"))
    return out


def test_every_optimizer_op_has_cases():
    assert set(OPTIMIZER_CASES) == {record.op for record in O.RECORDS.values()}


def optimizer_case(backend, op, build, fmt, shape, seed, dispatch=False):
    fn = getattr(K, op) if dispatch else K.implementation(backend, op)
    args0 = build(np.random.default_rng(seed), shape)
    results = []
    for with_lp in (False, True):
        args = [a.copy() if isinstance(a, np.ndarray) else a for a in args0]
        lp = empty_lp(shape, fmt) if with_lp else None
        with np.errstate(all="ignore"):
            fn(*args, data_lp=lp) if with_lp else fn(*args)
        results.append((args, lp))
    (args1, _), (args2, lp) = results
    label = f"{backend} {op} {fmt} {shape}"
    for k, (a1, a2) in enumerate(zip(args1, args2)):
        if isinstance(a1, np.ndarray):  # p, g and every state: the same bits
            assert_bits_equal(f"{label}: argument {k}", a2, a1)
    assert_copy(label, lp, args2[0])


@pytest.mark.parametrize("run, fmt, op, build", optimizer_params())
def test_optimizer_writes_the_copy_of_the_updated_weights(run, fmt, op, build, monkeypatch):
    backend = backend_of(run, monkeypatch)
    for k, shape in enumerate(FLAT_SHAPES):
        optimizer_case(backend, op, build, fmt, shape, seed=200 + k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_numba_cpu_optimizer_above_the_parallel_threshold_and_through_the_dispatcher(fmt):
    skip_unless_available("numba_cpu")
    from backprop.kernels import numba_cpu

    shape = (numba_cpu.PARALLEL_MIN_ELEMENTS + 13,)
    for op, cases in OPTIMIZER_CASES.items():
        optimizer_case("numba_cpu", op, cases[-1][1], fmt, shape, seed=9)
        optimizer_case("numba_cpu", op, cases[0][1], fmt, (33, 7), seed=10, dispatch=True)


def test_sgd_without_a_step_copies_the_weights_as_they_are():
    """lr = 0 and g = 0 leave p as it is (signalling NaNs aside, which the subtraction
    quiets): the copy is then the conversion of every SPECIAL value, made by the optimizer
    loop's own arithmetic."""
    for backend in BACKENDS:
        skip_unless_available(backend)
        for fmt in FORMATS:
            p = np.tile(SPECIAL, 3)
            lp = empty_lp(p.shape, fmt)
            with np.errstate(invalid="ignore"):  # 0 · inf in lr · d, as every step computes
                K.implementation(backend, "sgd_step")(p, np.zeros_like(p), None, 0.0, 0.0,
                                                      0.0, False, 0.0, True, lp)
            finite = np.isfinite(SPECIAL)
            assert_bits_equal("p", p[: SPECIAL.size][finite], SPECIAL[finite])
            assert_copy(f"{backend} sgd {fmt}", lp, p)


# ---------------------------------------------------------------------------------------
# Signatures and validation
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_with_a_copy_takes_it_last_with_default_none(backend):
    skip_unless_available(backend)
    names = {"bias_act_forward": "out_lp", "bias_act_backward": "delta_lp"}
    names.update({record.op: "data_lp" for record in O.RECORDS.values()})
    for op, name in names.items():
        for fn in (K.implementation(backend, op), getattr(R, op)):
            params = inspect.signature(fn).parameters
            last = list(params.values())[-1]
            assert last.name == name and last.default is None, f"{backend} {op}: {params}"
            assert inspect.signature(fn) == inspect.signature(getattr(R, op))


def _invalid_calls(backend, fmt):
    """(label, call, exception, message, arrays that must stay untouched) for each kind of
    invalid copy, on every op that takes one."""
    lp_type = FORMATS[fmt]
    forward = K.implementation(backend, "bias_act_forward")
    backward = K.implementation(backend, "bias_act_backward")
    adam = K.implementation(backend, "adam_step")
    shape = (6, 5)
    # values every valid call would change: out = relu(z) = 2, δ = 3 · relu'(z) = 3, and p
    z, out, da = np.full(shape, 2.0, np.float32), np.ones(shape, np.float32), \
        np.full(shape, 3.0, np.float32)
    p = np.ones(shape, np.float32)
    p64, z64 = np.ones(shape), np.ones(shape)
    good = np.zeros(shape, lp_type)
    wide = np.zeros((6, 10), lp_type)
    readonly = np.zeros(shape, lp_type)
    readonly.flags.writeable = False
    over_out = out.view(np.uint16).reshape(-1)[: out.size].reshape(shape).view(lp_type)
    over_z = z.view(np.uint16).reshape(-1)[: z.size].reshape(shape).view(lp_type)
    over_g = np.ones(shape, np.float32)
    over_g_lp = over_g.view(np.uint16).reshape(-1)[: p.size].reshape(shape).view(lp_type)

    def fwd(lp, zz=z, oo=out):
        return lambda: forward(zz, None, oo, "relu", 0.0, out_lp=lp)

    def bwd(lp, dd=da):
        return lambda: backward(dd, z, None, "relu", 0.0, out, None, False, delta_lp=lp)

    def opt(lp, pp=p, g=None):
        g = np.ones_like(pp) if g is None else g
        return lambda: adam(pp, g, np.zeros_like(pp), np.zeros_like(pp), None, 1e-3, 0.9,
                            0.999, 1e-8, 0.0, False, 1, data_lp=lp)

    return [
        ("float64 forward", fwd(good, z64, np.ones(shape)), ValueError, "float32", []),
        ("float64 backward", lambda: backward(np.ones(shape), np.ones(shape), None, "relu",
                                              0.0, np.ones(shape), None, False,
                                              delta_lp=good), ValueError, "float32", []),
        ("float64 optimizer", opt(good, p64), ValueError, "float32", [p64]),
        ("wrong shape forward", fwd(np.zeros((5, 6), lp_type)), ValueError, "shape", [out]),
        ("wrong shape backward", bwd(np.zeros((6, 4), lp_type)), ValueError, "shape", [out]),
        ("wrong shape optimizer", opt(np.zeros(30, lp_type)), ValueError, "shape", [p]),
        ("float32 copy", fwd(np.zeros(shape, np.float32)), TypeError, "uint16", [out]),
        ("int16 copy", fwd(np.zeros(shape, np.int16)), TypeError, "uint16", [out]),
        ("uint32 copy", opt(np.zeros(shape, np.uint32)), TypeError, "uint16", [p]),
        ("a list", opt(np.zeros(shape, lp_type).tolist()), TypeError, "ndarray", [p]),
        ("non-contiguous forward", fwd(wide[:, ::2]), ValueError, "contiguous", [out]),
        ("non-contiguous optimizer", opt(wide[:, 1::2]), ValueError, "contiguous", [p]),
        ("read-only", bwd(readonly), ValueError, "writeable", [out]),
        ("out_lp is out", fwd(out), TypeError, "uint16", [out]),
        ("overlaps out", fwd(over_out), ValueError, "overlap", [out]),
        ("overlaps z", fwd(over_z), ValueError, "overlap", [out]),
        ("overlaps delta", bwd(over_out), ValueError, "overlap", [out]),
        ("overlaps p", opt(p.view(np.uint16).reshape(-1)[: p.size].reshape(shape)
                                    .view(lp_type)), ValueError, "overlap", [p]),
        ("overlaps g", opt(over_g_lp, g=over_g), ValueError, "overlap", [p]),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_copies_are_refused_before_any_work(backend, fmt):
    skip_unless_available(backend)
    for label, call, exception, message, untouched in _invalid_calls(backend, fmt):
        before = [a.copy() for a in untouched]
        with pytest.raises(exception, match=message):
            call()
        for a, b in zip(untouched, before):
            assert_bits_equal(f"{backend} {label}: written before the check", a, b)


# ---------------------------------------------------------------------------------------
# numba_cpu's compiled code
_AS_PYTHON = """
import numpy as np
import test_lowp_kernels as T
from backprop.kernels import numba_cpu
assert not hasattr(numba_cpu._sgd.serial, "py_func"), "the JIT is not disabled"
for fmt in T.FORMATS:
    for act in ("relu", "gelu_erf"):
        T.forward_case("numba_cpu", act, fmt, True, "separate", (3, 40), seed=1)
        T.backward_case("numba_cpu", act, fmt, "db", "in_place", (3, 40), seed=2)
    for op, cases in T.OPTIMIZER_CASES.items():
        T.optimizer_case("numba_cpu", op, cases[-1][1], fmt, (60,), seed=3)
print("ok")
"""


def test_numba_cpu_copies_with_the_jit_disabled():
    """Under ``NUMBA_DISABLE_JIT=1`` the kernels run as Python, the conversion included (the
    Python body of its intrinsic's stub)."""
    skip_unless_available("numba_cpu")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _AS_PYTHON], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def _fresh_ir(loops, *args) -> str:
    """Optimised LLVM IR of a numba_cpu kernel's serial loop compiled afresh for ``args``."""
    import numba

    kernel = loops.serial
    options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**options)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_llvm(fresh.signatures[0])


@pytest.mark.codegen
@pytest.mark.parametrize("kernel", ["forward", "backward_db", "adam"])
def test_numba_cpu_copy_is_stored_by_the_vector_loop_and_absent_without_one(kernel):
    """With a copy, the loop that stores float32 vectors stores 16-bit vectors too (the
    conversion is inlined and vectorised); without one, the kernel has no 16-bit code at all
    (the ``None`` branch is pruned at compile time: the float32 loop is the one it was)."""
    skip_unless_available("numba_cpu")
    import re

    from backprop.kernels import numba_cpu

    z = np.ones((4, 64), np.float32)
    p = np.ones(64, np.float32)
    if kernel == "forward":
        loops, args = numba_cpu._forward_kernel("relu"), (z, z[0], np.empty_like(z), 0.1)
        shape = z.shape
    elif kernel == "backward_db":
        loops = numba_cpu._backward_kernel("relu")
        args = (z, z, 0.1, np.empty_like(z), np.zeros(64, np.float32), False, np.zeros((1, 64)))
        shape = z.shape
    else:
        loops, args, shape = numba_cpu._adam, (p, p.copy(), p.copy(), p.copy(), None,
                                               (0.5,) * 8), p.shape
    assert not re.search(r"\bi16\b", _fresh_ir(loops, *args))
    for lp_type in (np.uint16, np.int16):  # bfloat16 bits, and float16's view
        ir = _fresh_ir(loops, *args, np.empty(shape, lp_type))
        assert re.search(r"store <\d+ x i16>", ir), f"{lp_type.__name__}: no vector store"
        assert re.search(r"store <\d+ x float>", ir)
