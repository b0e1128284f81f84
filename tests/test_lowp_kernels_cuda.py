"""The low-precision copies written by the CUDA backends' fused kernels (``kernels/lowp.py``).

Under mixed precision ``bias_act_forward(..., out_lp=)``, ``bias_act_backward(...,
delta_lp=)`` and the optimizer ops (``data_lp=``) also write the bf16 bits (``uint16``) or
float16 copy of the float32 tensor they produce, in the same kernel. Held here, for each
CUDA backend that can run without a GPU:

* ``cupy_on_host``: the CuPy backend's own op functions driving its CUDA C++ compiled for
  the CPU (``cuda_host.py``, as test_kernels.py runs them); ``numba_cuda_sim``: the Numba
  CUDA backend in Numba's CUDA simulator (only with ``NUMBA_ENABLE_CUDASIM=1`` set before
  Python starts; skipped otherwise, with that reason);
* every activation, both formats, bias none / zero / random, ``out`` aliasing ``z``, the bias
  gradient none / overwritten / accumulated, δ in place, and every variant of every
  optimizer; inputs with NaN payloads (quiet, signalling), ±inf, 3.4e38 (rounds to inf in
  bf16), float32 subnormals, bf16 and float16 ties, odd shapes:
  - every float32 output (and every array the op updates) is bitwise the one of the same
    call without the copy (a NaN computed from NaNs may carry another NaN's payload: see
    :func:`assert_same_bits`);
  - the copy is ``kernels.lowp.to_lowp`` of that float32 output, bitwise (bf16: also
    ``backprop.bf16.to_bf16``; float16: NaN where it is NaN, whatever its payload, which
    ``__float2half_rn`` does not keep);
* the conversions themselves (cuda_host.h's ``__float2half_rn`` against NumPy's, the bf16
  formula against the reference) over half a million float32 patterns, and the bits of the
  special values against a table written out by hand;
* a bad copy buffer (dtype, shape, layout, overlap, read-only, float64 data) is refused
  before anything is launched;
* compiled without a GPU: the CuPy variants by NVRTC for sm_80 and sm_90 (cubins; their PTX
  converts to float16 with ``cvt.rn.f16.f32`` and never to bf16 in hardware, whose NaN is
  canonical), the Numba CUDA variants by NVVM for sm_80 and sm_90 (no float64 instruction
  in the element-wise ones). Running either on a GPU is ci/gpu.sh's.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import cuda_host
from backprop import bf16 as B
from backprop import kernels as K
from backprop.kernels import cupy_kernels as CK
from backprop.kernels import lowp as L
from backprop.kernels import optimizers
from backprop.kernels import reference as R

pytestmark = [
    pytest.mark.kernel_harness,  # ci/gpu.sh runs these in its kernels step
    # NaN, inf and values past float16's range are the inputs here; the simulator's threads
    # warn about them outside the tests' np.errstate (which is per thread)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
FORMATS = {"bfloat16": np.uint16, "float16": np.float16}

# float32 bit patterns that each conversion must get right, and their bf16 bits
SPECIALS = {
    0x7FC12345: 0x7FC1,  # quiet NaN with a payload: kept
    0xFFA00001: 0xFFE0,  # negative signalling NaN with a payload: made quiet, payload kept
    0x7F800001: 0x7FC0,  # signalling NaN whose payload is all in the dropped bits
    0x7F800000: 0x7F80,  # +inf
    0xFF800000: 0xFF80,  # -inf
    0x7F7FC99E: 0x7F80,  # 3.4e38: rounds to inf
    0xFF7FC99E: 0xFF80,  # -3.4e38
    0x7F7F7FFF: 0x7F7F,  # the largest float32 with a finite bf16
    0x7F7F8000: 0x7F80,  # the tie above it: to even, inf
    0x00000001: 0x0000,  # float32 subnormals: rounded, not flushed
    0x807FFFFF: 0x8080,
    0x00408000: 0x0040,
    0x00418000: 0x0042,
    0x3F808000: 0x3F80,  # ties: to even (down)
    0x3F818000: 0x3F82,  # ties: to even (up)
    0x3F808001: 0x3F81,
    0x477FF000: 0x4780,  # 65520: inf in float16
    0x477FEFFF: 0x4780,  # just below: 65504 in float16
    0x33000000: 0x3300,  # 2^-25: a float16 tie with 0
    0x33000001: 0x3300,  # just above: the smallest float16 subnormal
    0x387FE000: 0x3880,  # float16: the tie between the largest subnormal and 2^-14
    0x387FA000: 0x3880,  # float16: a subnormal tie, to even (down)
    0x00000000: 0x0000,
    0x80000000: 0x8000,
}
SPECIAL_BITS = np.array(list(SPECIALS), np.uint32)


# ---------------------------------------------------------------------------------------
# Inputs and checks
def extreme(rng, shape, fraction=0.4) -> np.ndarray:
    """float32 N(0, 3²) with the special values in a ``fraction`` of the elements (each
    special at least once where the array is large enough)."""
    x = (rng.standard_normal(shape) * 3.0).astype(np.float32)
    flat = x.reshape(-1).view(np.uint32)
    count = max(1, int(flat.size * fraction))
    where = rng.permutation(flat.size)[:count]
    flat[where] = np.resize(rng.permutation(SPECIAL_BITS), count)
    return x


def assert_same_bits(label: str, got: np.ndarray, want: np.ndarray) -> None:
    """``got`` is ``want`` bit for bit, but for the payload of a NaN both have: a NaN
    computed from two NaNs (``z · σ(z)`` of a NaN ``z``) takes the payload of either, by
    the operand order the compiler picks, which two separately compiled kernels need not
    share (IEEE 754 leaves it open; a GPU makes every computed NaN canonical anyway)."""
    assert got.dtype == want.dtype and got.shape == want.shape, label
    bits = {4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    differ = (got.view(bits) != want.view(bits)) & ~(np.isnan(got) & np.isnan(want))
    assert not differ.any(), (f"{label}: {int(differ.sum())} of {got.size} elements differ "
                              f"from the call without the copy, e.g. {got[differ][:3]} "
                              f"for {want[differ][:3]}")


def assert_copy_of(label: str, lp: np.ndarray, x: np.ndarray) -> None:
    """``lp`` is the low-precision copy of the float32 ``x``, bit for bit."""
    with np.errstate(over="ignore"):  # finite float32 beyond float16's range: inf
        want = L.to_lowp(x, np.empty_like(lp))
    if lp.dtype == np.float16:
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(lp), nan), f"{label}: NaN where there is none or none"
        got, want = lp.view(np.uint16)[~nan], want.view(np.uint16)[~nan]
    else:
        assert np.array_equal(want, B.to_bf16(np.ascontiguousarray(x))), "the references differ"
        got = lp
    differ = got != want
    assert not differ.any(), (f"{label}: {int(differ.sum())} of {got.size} copies differ, "
                              f"e.g. {[hex(v) for v in got[differ][:3]]} for "
                              f"{[hex(v) for v in want[differ][:3]]}")


def lowp_buffer(fmt: str, shape) -> np.ndarray:
    """An uninitialised-looking copy buffer (a fixed junk pattern, so unwritten elements show)."""
    return np.full(shape, 0x5A5A, np.uint16).view(FORMATS[fmt])


# ---------------------------------------------------------------------------------------
# The backends
BACKENDS = ["cupy_on_host", "numba_cuda_sim", "cupy", "numba_cuda"]


@dataclass(frozen=True)
class Backend:
    """A CUDA backend under test: its op module, and ``put``/``get`` to move a host array
    to the arrays it takes and back (the identity on the host; None passes)."""

    name: str
    ops: Any
    on_gpu: bool = False

    def put(self, a):
        if a is None or not self.on_gpu:
            return a
        import cupy

        return cupy.asarray(a)

    def get(self, a):
        if a is None or not self.on_gpu:
            return a
        import cupy

        return cupy.asnumpy(a)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> Backend:
    """The CuPy backend on the host emulation, the Numba CUDA backend in the simulator, and
    both on a GPU where there is one (ci/gpu.sh's kernels step)."""
    name = request.param
    if name == "cupy_on_host":
        reason = cuda_host.unavailable_reason()
        if reason is not None:
            pytest.skip(f"the CuPy kernels cannot run on the host: {reason}")
        cuda_host.install(monkeypatch)
        return Backend(name, CK)
    if name == "numba_cuda_sim":
        if not SIMULATOR:
            pytest.skip("numba_cuda_sim needs NUMBA_ENABLE_CUDASIM=1 set before Python starts")
        from backprop.kernels import numba_cuda

        return Backend(name, numba_cuda)
    if SIMULATOR:
        pytest.skip(f"{name} on a GPU: not in the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    reason = K.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"{name} needs a GPU: {reason}")
    if name == "cupy":
        return Backend(name, CK, on_gpu=True)
    from backprop.kernels import numba_cuda

    return Backend(name, numba_cuda, on_gpu=True)


def batch_shapes(name: str):
    if name == "numba_cuda_sim":  # one Python thread per simulated thread: small shapes
        return [(1, 1), (3, 5), (17, 9)]
    if name == "cupy_on_host":  # every thread a coroutine; 600 rows: two-stage bias sums
        return [(1, 1), (7, 37), (600, 5)]
    return [(1, 1), (7, 37), (600, 5), (1023, 257)]


def flat_shapes(name: str):
    if name == "numba_cuda_sim":
        return [(1,), (17,), (3, 5)]
    return [(1,), (37,), (5, 7), (1000,), (1023 * 257,)]


# ---------------------------------------------------------------------------------------
# The conversions of the host emulation (what every CuPy kernel test below relies on)
_PROBE_CODE = CK.LOWP_BITS["bfloat16"].replace("bp_lowp_bits", "bp_bf16") + \
    CK.LOWP_BITS["float16"].replace("bp_lowp_bits", "bp_f16") + r"""
template <typename T>
__global__ void bp_probe_lowp(const float* x, unsigned short* bf16, unsigned short* f16,
                              const long long n) {
    for (long long k = threadIdx.x; k < n; k += blockDim.x) {
        bf16[k] = bp_bf16(x[k]);
        f16[k] = bp_f16(x[k]);
    }
}
"""


def test_the_host_conversions_round_as_the_gpu():
    """cuda_host.h's ``__float2half_rn`` is NumPy's round-to-nearest-even (NaN: CUDA's
    0x7FFF), and ``backprop_bf16_bits`` the reference, over every sign, exponent and top
    mantissa bits of float32 with low halves at and around the rounding points of both
    formats."""
    reason = cuda_host.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CuPy kernels cannot run on the host: {reason}")
    spec = CK.RawModuleSpec("bp_probe_lowp", _PROBE_CODE, ("bp_probe_lowp",))
    launch = cuda_host.raw_launcher(cuda_host.build([spec]), spec, "bp_probe_lowp", np.float32)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
                    0xFFFF, 0x5A5A], np.uint32)
    x = (high[:, None] | low[None, :]).reshape(-1).view(np.float32)
    x = np.concatenate([x, SPECIAL_BITS.view(np.float32)])
    bf16, f16 = np.empty(x.shape, np.uint16), np.empty(x.shape, np.uint16)
    launch((1,), (1,), (x, bf16, f16, np.int64(x.size)))
    np.testing.assert_array_equal(bf16, L.to_lowp(x, np.empty(x.shape, np.uint16)))
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(f16[~nan], want[~nan])
    assert (f16[nan] == 0x7FFF).all()


def test_the_special_values_have_the_bits_written_out():
    """The table of special values is right, by the references (independent of any
    kernel), and float16 rounds them as IEEE does."""
    x = SPECIAL_BITS.view(np.float32)
    np.testing.assert_array_equal(L.to_lowp(x, np.empty(x.shape, np.uint16)),
                                  np.array(list(SPECIALS.values()), np.uint16))
    np.testing.assert_array_equal(B.to_bf16(x), np.array(list(SPECIALS.values()), np.uint16))
    with np.errstate(over="ignore"):
        half = L.to_lowp(x, np.empty(x.shape, np.float16)).view(np.uint16)
    expect = {0x477FF000: 0x7C00, 0x477FEFFF: 0x7BFF, 0x33000000: 0x0000, 0x33000001: 0x0001,
              0x387FE000: 0x0400, 0x387FA000: 0x03FE, 0x7F7FC99E: 0x7C00, 0xFF7FC99E: 0xFC00,
              0x3F808000: 0x3C04, 0x00000001: 0x0000, 0x807FFFFF: 0x8000}
    for bits, want in expect.items():
        assert half[list(SPECIALS).index(bits)] == want, hex(bits)


# ---------------------------------------------------------------------------------------
# Dense epilogues
@pytest.mark.parametrize("bias", ["none", "zeros", "random"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_forward_copy(backend, act, fmt, bias):
    bk = backend
    rng = np.random.default_rng([R.ACTIVATIONS.index(act), len(bias)])
    for shape in batch_shapes(bk.name):
        z0 = extreme(rng, shape)
        b = bk.put({"none": None, "zeros": np.zeros(shape[1], np.float32),
                    "random": extreme(rng, shape[1], 0.2)}[bias])
        # out may be z itself unless the op writes z + b into z
        for alias in (False, True) if b is None or act not in R.NEEDS_Z else (False,):
            label = f"{bk.name} bias_act_forward {act} {fmt} b={bias} {shape} alias={alias}"
            results = []
            for lp in (None, bk.put(lowp_buffer(fmt, shape))):
                z = bk.put(z0.copy())
                out = z if alias else bk.put(np.full(shape, np.nan, np.float32))
                with np.errstate(all="ignore"):
                    ret = bk.ops.bias_act_forward(z, b, out, act, 0.1,
                                                  **({} if lp is None else {"out_lp": lp}))
                assert ret is out
                results.append(tuple(map(bk.get, (z, out, lp))))
            (z1, out1, _), (z2, out2, lp) = results
            assert_same_bits(f"{label} z", z2, z1)
            assert_same_bits(f"{label} out", out2, out1)
            assert_copy_of(f"{label} out_lp", lp, out2)


@pytest.mark.parametrize("inplace", [False, True], ids=["delta", "delta_in_place"])
@pytest.mark.parametrize("db", ["no_db", "db", "db_accumulate"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_backward_copy(backend, act, fmt, db, inplace):
    bk = backend
    rng = np.random.default_rng([R.ACTIVATIONS.index(act), len(db), inplace])
    for shape in batch_shapes(bk.name):
        da0 = extreme(rng, shape)
        z = (rng.standard_normal(shape) * 2.0).astype(np.float32)
        with np.errstate(all="ignore"):
            a = bk.put(R.activate(np, z, act, 0.1).astype(np.float32))
        z = bk.put(z)
        db0 = None if db == "no_db" else (rng.standard_normal(shape[1]) * 4).astype(np.float32)
        label = f"{bk.name} bias_act_backward {act} {fmt} {db} {shape} in_place={inplace}"
        results = []
        for lp in (None, bk.put(lowp_buffer(fmt, shape))):
            da = bk.put(da0.copy())
            delta = da if inplace else bk.put(np.full(shape, np.nan, np.float32))
            dbuf = bk.put(None if db0 is None else db0.copy())
            with np.errstate(all="ignore"):
                ret = bk.ops.bias_act_backward(da, a, z, act, 0.1, delta, dbuf,
                                               db == "db_accumulate",
                                               **({} if lp is None else {"delta_lp": lp}))
            assert ret is delta
            results.append(tuple(map(bk.get, (da, delta, dbuf, lp))))
        (da1, delta1, db1, _), (da2, delta2, db2, lp) = results
        assert_same_bits(f"{label} da", da2, da1)
        assert_same_bits(f"{label} delta", delta2, delta1)
        if db1 is not None:
            assert_same_bits(f"{label} db", db2, db1)
        assert_copy_of(f"{label} delta_lp", lp, delta2)


def test_the_inputs_reach_the_copies(backend):
    """The identity passes the special values through unchanged: their copies are the bits
    of the hand-written table (NaN payloads, ties, overflow, subnormals), not only what the
    reference says. The forward pass only stores z; the backward pass multiplies by 1, which
    keeps every bit on the host but not on a GPU (canonical NaNs; -ftz=true in the CuPy
    kernels)."""
    bk = backend
    x = np.resize(SPECIAL_BITS, (3, len(SPECIALS))).view(np.float32)
    want = np.resize(np.array(list(SPECIALS.values()), np.uint16), x.shape)
    out, lp = bk.put(np.empty_like(x)), bk.put(np.empty(x.shape, np.uint16))
    bk.ops.bias_act_forward(bk.put(x), None, out, "identity", 0.0, out_lp=lp)
    np.testing.assert_array_equal(bk.get(lp), want)
    if bk.on_gpu:
        return
    delta, lp = np.empty_like(x), np.empty(x.shape, np.uint16)
    with np.errstate(all="ignore"):
        bk.ops.bias_act_backward(x.copy(), x, None, "identity", 0.0, delta, None, False,
                                 delta_lp=lp)
    np.testing.assert_array_equal(lp, want)


# ---------------------------------------------------------------------------------------
# Optimizer updates: every variant of every record
def _sgd(rng, p, momentum, nesterov, first_step, weight_decay):
    return dict(buf=rng.standard_normal(p.shape).astype(np.float32), lr=0.1,
                momentum=momentum, dampening=0.1, nesterov=nesterov,
                weight_decay=weight_decay, first_step=first_step)


def _rmsprop(rng, p, momentum, centered, weight_decay):
    f = lambda scale=1.0: (rng.standard_normal(p.shape) * scale).astype(np.float32)  # noqa: E731
    grad_avg = f(0.1)  # square_avg ≥ grad_avg²: the centered variance stays positive
    return dict(square_avg=grad_avg * grad_avg + np.abs(f()), buf=f(), grad_avg=grad_avg,
                lr=0.01, alpha=0.99,
                eps=1e-8, weight_decay=weight_decay, momentum=momentum, centered=centered)


def _adam(rng, p, amsgrad, decoupled, weight_decay):
    f = lambda: rng.standard_normal(p.shape).astype(np.float32)  # noqa: E731
    return dict(m=f(), v=np.abs(f()), vmax=np.abs(f()) if amsgrad else None, lr=1e-3,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                decoupled=decoupled, step=3)


def _adagrad(rng, p, lr_decay, weight_decay):
    return dict(state_sum=np.abs(rng.standard_normal(p.shape)).astype(np.float32), lr=0.1,
                lr_decay=lr_decay, eps=1e-10, weight_decay=weight_decay, step=2)


OPTIMIZER_CASES = {
    "sgd_plain": ("sgd", _sgd, (0.0, False, False, 0.0)),
    "sgd_momentum_first": ("sgd", _sgd, (0.9, False, True, 0.0)),
    "sgd_nesterov_decay": ("sgd", _sgd, (0.9, True, False, 0.01)),
    "rmsprop": ("rmsprop", _rmsprop, (0.0, False, 0.0)),
    "rmsprop_momentum": ("rmsprop", _rmsprop, (0.9, False, 0.01)),
    "rmsprop_centered": ("rmsprop", _rmsprop, (0.0, True, 0.0)),
    "rmsprop_centered_momentum": ("rmsprop", _rmsprop, (0.9, True, 0.01)),
    "adam": ("adam", _adam, (False, False, 0.0)),
    "adam_l2": ("adam", _adam, (False, False, 0.01)),
    "adamw_amsgrad": ("adam", _adam, (True, True, 0.01)),
    "adam_amsgrad": ("adam", _adam, (True, False, 0.0)),
    "adagrad": ("adagrad", _adagrad, (0.0, 0.0)),
    "adagrad_decay": ("adagrad", _adagrad, (0.01, 0.01)),
}


def _variant(record, kwargs) -> tuple:
    """Which states the op keeps for ``kwargs`` (the kernel variant it launches)."""
    kept = []
    captured = {}
    record.arguments(lambda p, g, states, *rest: captured.update(states=states),
                     np.zeros(1, np.float32), np.zeros(1, np.float32), **kwargs)
    for state in captured["states"]:
        kept.append(state is not None)
    return tuple(kept)


def test_the_optimizer_cases_cover_every_variant():
    rng = np.random.default_rng(0)
    covered = {(name, _variant(optimizers.RECORDS[name], build(rng, np.zeros(1), *args)))
               for name, build, args in OPTIMIZER_CASES.values()}
    assert covered == {(name, tuple(v)) for name, r in optimizers.RECORDS.items()
                       for v in r.variants}


def optimizer_step(ops, record, p, g, kwargs, data_lp):
    """``<record>_step`` of ``ops`` on ``p``, with ``data_lp`` when given (the op's host side,
    kernels/optimizers.py, passes it on to the backend's ``run``)."""
    op = getattr(ops, record.op)
    return op(p, g, **kwargs) if data_lp is None else op(p, g, **kwargs, data_lp=data_lp)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_copy(backend, case, fmt):
    bk = backend
    record_name, build, args = OPTIMIZER_CASES[case]
    record = optimizers.RECORDS[record_name]
    rng = np.random.default_rng([list(OPTIMIZER_CASES).index(case), len(fmt)])
    for shape in flat_shapes(bk.name):
        p0 = extreme(rng, shape)
        g = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        g[rng.random(shape) < 0.5] = 0.0  # with no decay, p keeps its special value there
        g = bk.put(g)
        kwargs0 = build(rng, p0, *args)
        label = f"{bk.name} {record.op} {case} {fmt} {shape}"
        results = []
        for lp in (None, bk.put(lowp_buffer(fmt, shape))):
            p = bk.put(p0.copy())
            kwargs = {k: bk.put(v.copy()) if isinstance(v, np.ndarray) else v
                      for k, v in kwargs0.items()}
            with np.errstate(all="ignore"):
                optimizer_step(bk.ops, record, p, g, kwargs, lp)
            states = {k: bk.get(kwargs[k]) for k, v in kwargs0.items()
                      if isinstance(v, np.ndarray)}
            results.append((bk.get(p), states, bk.get(lp)))
        (p1, states1, _), (p2, states2, lp) = results
        assert_same_bits(f"{label} p", p2, p1)
        for key, value in states1.items():
            assert_same_bits(f"{label} {key}", states2[key], value)
        assert_copy_of(f"{label} data_lp", lp, p2)


# ---------------------------------------------------------------------------------------
# A bad copy buffer is refused before anything is launched
def _overlapping(x):
    """A uint16 buffer of ``x``'s shape over ``x``'s first half."""
    return x.view(np.uint16).reshape(-1)[:x.size].reshape(x.shape)


def _bad_buffers(data, other):
    """``{what: (copy buffer for data, error, message)}`` (``other``: an input of the call)."""
    n, m = data.shape
    read_only = np.zeros(data.shape, np.uint16)
    read_only.flags.writeable = False
    return {
        "float32 dtype": (np.zeros(data.shape, np.float32), TypeError, "uint16"),
        "wrong shape": (np.zeros((n, m + 1), np.uint16), ValueError, "shape"),
        "strided": (np.zeros((n, 2 * m), np.uint16)[:, ::2], ValueError, "contiguous"),
        "over the data": (_overlapping(data), ValueError, "overlaps the float32 data"),
        "over an input": (_overlapping(other), ValueError, "overlaps another argument"),
        "read-only": (read_only, ValueError, "writeable"),
    }


def _no_launch(*args, **kwargs):
    raise AssertionError("a kernel was launched (or created) before the arguments were checked")


@pytest.fixture(params=["cupy", "numba_cuda"])
def unlaunched(request, monkeypatch):
    """The op module of a CUDA backend with every launch turned into a test failure (no
    GPU, no simulator, no compiler needed: only the checks before a launch run)."""
    if request.param == "cupy":
        cuda_host.install(monkeypatch, raw=_no_launch, elementwise=_no_launch)
        return CK
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from backprop.kernels import numba_cuda

    monkeypatch.setattr(numba_cuda, "_launch", _no_launch)
    return numba_cuda


@pytest.mark.parametrize("op", ["bias_act_forward", "bias_act_backward", "adam_step"])
def test_a_bad_copy_buffer_is_refused_before_the_launch(unlaunched, op):
    """As the reference refuses it (``reference.check_lowp``), before any kernel is made."""
    ops = unlaunched
    data, other = np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)
    cases = _bad_buffers(data, other)
    cases["float64 data"] = (np.zeros(data.shape, np.uint16), ValueError, "float32")
    for what, (bad, error, message) in cases.items():
        if what == "float64 data":
            data, other = data.astype(np.float64), other.astype(np.float64)
        if op == "bias_act_forward":  # other: z
            call = lambda m: m.bias_act_forward(other, None, data, "relu", 0.0,  # noqa: E731
                                                out_lp=bad)
        elif op == "bias_act_backward":  # other: dA
            call = lambda m: m.bias_act_backward(other, data.copy(), None, "relu",  # noqa: E731
                                                 0.0, data, None, False, delta_lp=bad)
        else:  # other: the gradient
            record = optimizers.RECORDS["adam"]
            kwargs = dict(m=np.zeros_like(data), v=np.zeros_like(data), vmax=None, lr=1e-3,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled=False, step=1)
            call = lambda m: optimizer_step(m, record, data, other, kwargs, bad)  # noqa: E731
        for module in (ops, R):
            with pytest.raises(error, match=message):
                call(module)


# ---------------------------------------------------------------------------------------
# The float32-only kernels stay as they were: the copy is a separate kernel variant
def test_every_cupy_kernel_with_an_output_for_a_product_has_a_variant_per_format():
    forward = [n for n in CK.ELEMENTWISE if n.startswith(("bp_act_", "bp_bias_act_"))
               and not n.endswith(("_bf16", "_f16"))]
    optimizer = [f"bp_{r.variant_name(v)}" for r in optimizers.RECORDS.values()
                 for v in r.variants]
    for name in forward + optimizer:
        spec = CK.ELEMENTWISE[name]
        assert "lowp" not in spec.operation + spec.preamble, name
        for suffix in CK.LOWP_SUFFIX.values():
            variant = CK.ELEMENTWISE[f"{name}_{suffix}"]
            assert variant.in_params == spec.in_params
            assert variant.out_params.startswith(spec.out_params + ", uint16 ")
            assert variant.operation.startswith(spec.operation.rstrip().rstrip(";"))
    for act in R.ACTIVATIONS:
        assert "bp_lowp_bits" not in CK.RAW_MODULES[f"bp_bias_act_backward_{act}"].code
        for suffix in CK.LOWP_SUFFIX.values():
            assert CK.RAW_MODULES[f"bp_bias_act_backward_{suffix}_{act}"].kernels == (
                "bp_bias_act_backward_lowp",)


def test_cupy_ops_launch_the_plain_kernel_without_a_copy(monkeypatch):
    launched = []
    cuda_host.install(
        monkeypatch,
        raw=lambda module, kernel, dtype: lambda grid, block, args: launched.append(
            (module, kernel, len(args))),
        elementwise=lambda name: lambda *args: launched.append((name, len(args))))
    x = np.zeros((3, 4), np.float32)
    for lp in (None, np.zeros(x.shape, np.uint16), np.zeros(x.shape, np.float16)):
        extra = {} if lp is None else {"out_lp": lp}
        CK.bias_act_forward(x.copy(), np.zeros(4, np.float32), np.empty_like(x), "relu", 0.0,
                            **extra)
        extra = {} if lp is None else {"delta_lp": lp}
        CK.bias_act_backward(x.copy(), x.copy(), None, "relu", 0.0, np.empty_like(x), None,
                             False, **extra)
    assert launched == [
        ("bp_bias_act_relu", 5), ("bp_bias_act_backward_relu", "bp_bias_act_backward", 10),
        ("bp_bias_act_relu_bf16", 6),
        ("bp_bias_act_backward_bf16_relu", "bp_bias_act_backward_lowp", 11),
        ("bp_bias_act_relu_f16", 6),
        ("bp_bias_act_backward_f16_relu", "bp_bias_act_backward_lowp", 11)]


def test_numba_cuda_ops_launch_the_plain_kernel_without_a_copy(monkeypatch):
    """Without a copy, the forward, backward and Adam kernels of before (6, 7 and 6
    arguments); with one, a variant per format that takes it as one more argument."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from backprop.kernels import numba_cuda

    launched = []
    monkeypatch.setattr(numba_cuda, "_launch", lambda kernel, grid, block, *args:
                        launched.append((kernel, len(args))))
    x, p = np.zeros((3, 4), np.float32), np.zeros(4, np.float32)
    adam = dict(m=np.zeros_like(p), v=np.zeros_like(p), vmax=None, lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, step=1)
    runs = {}
    for fmt in (None, *FORMATS):
        launched.clear()
        lp, data_lp = (None, None) if fmt is None else (lowp_buffer(fmt, x.shape),
                                                        lowp_buffer(fmt, p.shape))
        numba_cuda.bias_act_forward(x.copy(), None, np.empty_like(x), "relu", 0.0,
                                    **({} if lp is None else {"out_lp": lp}))
        numba_cuda.bias_act_backward(x.copy(), x.copy(), None, "relu", 0.0, np.empty_like(x),
                                     None, False, **({} if lp is None else {"delta_lp": lp}))
        optimizer_step(numba_cuda, optimizers.RECORDS["adam"], p, np.zeros_like(p), adam,
                       data_lp)
        runs[fmt] = list(launched)
    assert [n for _, n in runs.pop(None)] == [6, 7, 6]
    kernels = [[k for k, _ in launched] for launched in runs.values()]
    for fmt, launched in runs.items():
        assert [n for _, n in launched] == [7, 8, 7], fmt
    assert all(a is not b for a, b in zip(*kernels)), "both formats launched one kernel"


# ---------------------------------------------------------------------------------------
# Compiled for the GPU without one: the CuPy variants by NVRTC
ARCHS = ("80", "90")
# tests/test_cupy_compile.py compiles every variant once; here a sample of them (the
# activations with the simplest, a branchy and the heaviest formula, and every optimizer
# variant) is also built for both architectures and its PTX read
COMPILED_ACTIVATIONS = ("identity", "relu", "gelu_erf")
LOWP_ELEMENTWISE = sorted(
    n for n in CK.ELEMENTWISE if n.endswith(("_bf16", "_f16"))
    and (not any(a in n for a in R.ACTIVATIONS) or any(f"_{a}_" in n or n.endswith(f"_{a}")
                                                         or f"{a}_" in n
                                                         for a in COMPILED_ACTIVATIONS)))
LOWP_MODULES = sorted(n for n in CK.RAW_MODULES
                      if n.startswith(("bp_bias_act_backward_bf16_", "bp_bias_act_backward_f16_"))
                      and n.endswith(COMPILED_ACTIVATIONS))


@pytest.fixture(scope="module")
def nvrtc():
    """``compile(source, options, arch, output, cupy_headers, name_expressions)`` as
    tests/test_cupy_compile.py compiles (CuPy's own path, the device query replaced by the
    architecture named), for ``output`` "cubin" or "ptx"; skipped without CuPy or NVRTC."""
    pytest.importorskip("cupy", reason="CuPy is not installed: NVRTC is driven through it")
    try:
        from cupy_backends.cuda.libs import nvrtc as lib

        lib.getVersion()
    except Exception as exc:  # a missing or broken libnvrtc
        pytest.skip(f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); "
                    "pip install nvidia-cuda-nvrtc-cu12")
    from cupy._core import core
    from cupy.cuda import compiler

    def compile(source, options, arch, output, *, cupy_headers, name_expressions=None):
        if cupy_headers:
            source = "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + source
        options = core.assemble_cupy_compiler_options(tuple(options)) + ("-ftz=true",)
        flag = f"-arch={'sm' if output == 'cubin' else 'compute'}_{arch}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                       lambda arch=None: (flag, output))
            code, lowered = compiler.compile_using_nvrtc(source, options, arch=arch,
                                                         name_expressions=name_expressions)
        return code.decode() if output == "ptx" and isinstance(code, bytes) else code, lowered

    return compile


def _check_ptx(name: str, ptx: str) -> None:
    """A float16 copy through cvt.rn.f16.f32; a bf16 one by the integer formula, never the
    hardware conversion (whose NaN is canonical); both stored as 16 bits."""
    assert re.search(r"st\.global\.[ub]16", ptx), f"{name}: no 16-bit store"
    assert not re.search(r"cvt\.rn(\.\w+)?\.bf16\.f32", ptx), f"{name}: hardware bf16 rounding"
    if name.endswith("_f16") or "_f16_" in name:
        assert re.search(r"cvt\.rn\.f16\.f32", ptx), f"{name}: no float16 conversion"
    else:
        assert not re.search(r"cvt\.rn\.f16\.f32", ptx), f"{name}: a float16 conversion"


def _elementwise_source(name):
    from test_cupy_compile import elementwise_source

    kernel = CK.elementwise_kernel(name)
    source = elementwise_source(kernel, CK.ELEMENTWISE[name].scalars, np.float32)
    return source, tuple(kernel.kwargs.get("options", ()))


@pytest.fixture(scope="module")
def lowp_bundles(nvrtc):
    """The variants compiled in a few NVRTC programs per architecture and output
    (tests/nvrtc_bundle.py: one per set of headers, each kernel in its own namespace)."""
    import nvrtc_bundle

    return nvrtc_bundle.Bundles(
        lambda: {n: _elementwise_source(n) for n in LOWP_ELEMENTWISE},
        lambda source, options, key: nvrtc(source, options, *key, cupy_headers=True)[0])


@pytest.mark.parametrize("name", LOWP_ELEMENTWISE)
def test_cupy_elementwise_variant_compiles(lowp_bundles, name):
    import nvrtc_bundle

    source, _ = _elementwise_source(name)
    assert "typedef float T;" in source and "CArray<unsigned short" in source
    for arch in ARCHS:
        cubin = lowp_bundles.compiled(name, source, (arch, "cubin"))
        assert name.encode() in cubin, arch
    ptx = lowp_bundles.compiled(name, source, (ARCHS[0], "ptx"))
    _check_ptx(name, nvrtc_bundle.ptx_of_entry(ptx, name))


@pytest.mark.parametrize("name", LOWP_MODULES)
def test_cupy_backward_variant_compiles(nvrtc, name):
    module = CK.raw_module(name)
    expressions = [e for e in module.name_expressions if e.endswith("<float>")]
    for arch in ARCHS:
        cubin, lowered = nvrtc(module.code, module.options, arch, "cubin", cupy_headers=False,
                               name_expressions=module.name_expressions)
        for expression in module.name_expressions:
            assert lowered[expression].encode() in cubin, (arch, expression)
    ptx, _ = nvrtc(module.code, module.options, ARCHS[0], "ptx", cupy_headers=False,
                   name_expressions=expressions)
    _check_ptx(name, ptx)


# ---------------------------------------------------------------------------------------
# Compiled for the GPU without one: the Numba CUDA variants by NVVM
CCS = ((8, 0), (9, 0))


@pytest.fixture(scope="module")
def numba_cuda():
    """The Numba CUDA kernel module, compiling for a GPU (skipped in the simulator, which
    cannot compile, or without libNVVM)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0"):
        pytest.skip("numba.cuda.compile_ptx is not simulated: run this test without "
                    "NUMBA_ENABLE_CUDASIM=1")
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:
        pytest.skip(f"libNVVM is unavailable, so no PTX can be compiled (pip install "
                    f"nvidia-cuda-nvcc-cu12): {type(exc).__name__}: {exc}")
    from backprop.kernels import numba_cuda

    return numba_cuda


def _compile_numba(kernel, args, label: str, element_wise: bool, fmt: str) -> None:
    import numba
    from numba import cuda

    signature = tuple(numba.typeof(a) for a in args)
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
        assert ".entry" in ptx, (label, cc)
        _check_ptx(f"{label}_{CK.LOWP_SUFFIX[fmt]}", ptx)
        if element_wise:
            f64 = [line.strip() for line in ptx.splitlines() if re.search(r"\.f64\b", line)]
            assert not f64, f"{label} sm_{cc[0]}{cc[1]} computes in float64: {f64[:3]}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", ["bias_act_forward", "bias_act_backward"])
@pytest.mark.parametrize("act", COMPILED_ACTIVATIONS)
def test_numba_cuda_epilogue_variant_compiles(numba_cuda, monkeypatch, act, op, fmt):
    launches = []
    monkeypatch.setattr(numba_cuda, "_launch",
                        lambda kernel, grid, block, *a: launches.append((kernel, a)))
    x = np.ones((6, 5), np.float32)
    lp = lowp_buffer(fmt, x.shape)
    if op == "bias_act_forward":
        numba_cuda.bias_act_forward(x.copy(), np.ones(5, np.float32), np.empty_like(x), act,
                                    0.1, out_lp=lp)
    else:
        numba_cuda.bias_act_backward(x, x.copy(), x.copy(), act, 0.1, np.empty_like(x),
                                     np.zeros(5, np.float32), True, delta_lp=lp)
    kernel, args = launches[0]
    assert any(a is lp for a in args), "the copy is not an argument of the first kernel"
    _compile_numba(kernel, args, f"{op} {act}", op == "bias_act_forward", fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(optimizers.RECORDS))
def test_numba_cuda_optimizer_variant_compiles(numba_cuda, name, fmt):
    record = optimizers.RECORDS[name]
    array = np.zeros(4, np.float32)
    c = tuple(np.float32(0.5) for _ in record.scalars) + (True,) * len(record.flags)
    variants = list(record.variants)
    for present in dict.fromkeys([tuple(variants[0]), tuple(variants[-1])]):  # fewest, most
        kept = tuple(present) + (False,) * (optimizers.SLOTS - len(present))
        kernel = numba_cuda._optimizer_kernel(name, kept, np.dtype(np.float32), fmt)
        args = (array,) * (2 + optimizers.SLOTS) + (lowp_buffer(fmt, 4), c)
        assert len(inspect.signature(kernel.py_func).parameters) == len(args)
        _compile_numba(kernel, args, record.variant_name(present), True, fmt)
