"""The host emulation of CUDA (``cuda_host.py``, ``cuda_host.h``) behaves as a GPU would
where backprop's CuPy kernels depend on it, and fails where a kernel is wrong.

test_kernels.py's ``cupy_on_host`` rows trust it to run the CuPy backend's sources as a GPU
would: thread and block indices, ``__syncthreads``, warp shuffles, shared memory. Each of
those is checked here on a small kernel, and the negative controls show that a missing
barrier, a divergent barrier and a wrong formula in the backend's own source are caught.
"""
from __future__ import annotations

import numpy as np
import pytest

import cuda_host
from backprop.kernels import cupy_kernels as CK
from backprop.kernels import reference as R

reason = cuda_host.unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=str(reason))

_PROBE_CODE = CK._BLOCK_REDUCE + r"""
// out[linear thread of the grid] = its (block, thread) coordinates, packed
template <typename T>
__global__ void bp_probe_indices(T* out) {
    const long long block = blockIdx.x + (long long)gridDim.x * blockIdx.y;
    const long long thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const long long size = (long long)blockDim.x * blockDim.y * blockDim.z;
    out[block * size + thread] = T(1000000 * blockIdx.y + 10000 * blockIdx.x
                                   + 100 * threadIdx.z + 10 * threadIdx.y + threadIdx.x);
}

// out[b, t] = the block sum and maximum of x[b, :] over a 1-D block, every thread's copy
template <typename T>
__global__ void bp_probe_block_reduce(const T* x, T* sums, T* maxes) {
    __shared__ double scratch[32];
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const double v = (double)x[k];
    sums[k] = (T)bp_block_sum(v, scratch);
    maxes[k] = (T)bp_block_max(v, scratch);
}

// x[t] = x[t + 1] with no barrier between the reads and the writes: a race
template <typename T>
__global__ void bp_probe_race(T* x) {
    T* row = x + (long long)blockIdx.x * blockDim.x;
    const T next = threadIdx.x + 1 < blockDim.x ? row[threadIdx.x + 1] : T(0);
    row[threadIdx.x] = next;
}

// out[t] = x[t + 1]: the last thread reads one past the end of x
template <typename T>
__global__ void bp_probe_past_the_end(const T* x, T* out) {
    const T* from = x + 1;
    out[threadIdx.x] = from[threadIdx.x];
}

// a __shared__ array of 32 written by every thread of the block
template <typename T>
__global__ void bp_probe_past_shared(T* out) {
    __shared__ double scratch[32];
    bp_ptr<double> s = scratch;
    s[threadIdx.x] = 1.0;
    out[threadIdx.x] = T(s[threadIdx.x]);
}

// a barrier that only the even threads reach
template <typename T>
__global__ void bp_probe_divergent(T* out) {
    if (threadIdx.x % 2 == 0) __syncthreads();
    out[threadIdx.x] = T(1);
}

// a shuffle over a partial mask (not emulated)
template <typename T>
__global__ void bp_probe_partial_mask(T* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffu, out[threadIdx.x], 1);
}
"""
_PROBE = CK.RawModuleSpec("bp_probe", _PROBE_CODE, (
    "bp_probe_indices", "bp_probe_block_reduce", "bp_probe_race", "bp_probe_past_the_end",
    "bp_probe_past_shared", "bp_probe_divergent", "bp_probe_partial_mask"))


def _probe(kernel: str, dtype=np.float64, code: str = _PROBE_CODE):
    spec = CK.RawModuleSpec(_PROBE.name, code, _PROBE.kernels)
    return cuda_host.raw_launcher(cuda_host.build([spec]), spec, kernel, dtype)


def test_thread_and_block_indices_follow_cuda():
    grid, block = (3, 2), (4, 2, 2)
    out = np.full(3 * 2 * 16, -1.0)
    _probe("bp_probe_indices")(grid, block, (out,))
    want = [1000000 * by + 10000 * bx + 100 * tz + 10 * ty + tx
            for by in range(2) for bx in range(3)
            for tz in range(2) for ty in range(2) for tx in range(4)]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_block_reductions_give_every_thread_the_result(threads):
    """``bp_block_sum`` / ``bp_block_max`` of the backend (warp shuffles, shared memory,
    two barriers), over several blocks in a row that reuse the same shared memory."""
    rng = np.random.default_rng(threads)
    x = rng.standard_normal((5, threads))
    sums, maxes = np.empty_like(x), np.empty_like(x)
    _probe("bp_probe_block_reduce")((5,), (threads,), (x, sums, maxes))
    np.testing.assert_allclose(sums, np.repeat(x.sum(1, keepdims=True), threads, 1),
                               rtol=1e-13)
    np.testing.assert_array_equal(maxes, np.repeat(x.max(1, keepdims=True), threads, 1))


def test_a_missing_barrier_gives_a_wrong_block_sum():
    """Negative control: without the barrier between the warps' writes to shared memory and
    the first warp's reads, the first warp reads what the previous block left there."""
    broken = CK._BLOCK_REDUCE.replace("if (lane == 0) scratch[warp] = v;\n    __syncthreads();",
                                      "if (lane == 0) scratch[warp] = v;", 1)
    assert broken != CK._BLOCK_REDUCE
    x = np.random.default_rng(0).standard_normal((3, 128))
    sums, maxes = np.empty_like(x), np.empty_like(x)
    _probe("bp_probe_block_reduce", code=_PROBE_CODE.replace(CK._BLOCK_REDUCE, broken))(
        (3,), (128,), (x, sums, maxes))
    assert not np.allclose(sums, np.repeat(x.sum(1, keepdims=True), 128, 1))


def test_a_race_between_threads_makes_blocks_disagree():
    """Odd blocks run their threads in the opposite order: in the even block every thread
    reads its neighbour before the neighbour writes, in the odd one after."""
    x = np.tile(np.arange(1.0, 5.0), (2, 1))
    _probe("bp_probe_race")((2,), (4,), (x,))
    np.testing.assert_array_equal(x, [[2, 3, 4, 0], [0, 0, 0, 0]])


def test_an_index_past_an_array_is_an_error():
    """Every pointer of a kernel knows its array: a read one past the end of an argument
    (through a pointer computed from it) and a write past a __shared__ array are caught."""
    x, out = np.arange(8.0), np.zeros(8)
    _probe("bp_probe_past_the_end")((1,), (7,), (x, out))  # threads 0..6 read x[1..7]
    np.testing.assert_array_equal(out[:7], x[1:])
    with pytest.raises(RuntimeError, match=r"x\[8\] is outside the 8 elements of x"):
        _probe("bp_probe_past_the_end")((1,), (8,), (x, out))
    _probe("bp_probe_past_shared")((1,), (32,), (out := np.zeros(64),))
    with pytest.raises(RuntimeError, match=r"__shared__ array\[32\] is outside the 32"):
        _probe("bp_probe_past_shared")((1,), (64,), (out,))


def test_a_barrier_not_reached_by_every_thread_is_an_error():
    with pytest.raises(RuntimeError, match="different barriers"):
        _probe("bp_probe_divergent")((1,), (64,), (np.zeros(64),))


def test_a_partial_shuffle_mask_is_an_error():
    with pytest.raises(RuntimeError, match="partial mask"):
        _probe("bp_probe_partial_mask")((1,), (32,), (np.zeros(32),))


def test_a_block_larger_than_cuda_allows_is_an_error():
    with pytest.raises(RuntimeError, match="1 to 1024"):
        _probe("bp_probe_indices")((1,), (1025,), (np.zeros(1025),))


def test_a_scalar_of_the_wrong_type_is_refused():
    """A ``long long`` parameter given a Python int would be misread on a GPU."""
    x = np.zeros((2, 3), np.float32)
    launch = cuda_host.raw_kernel("bp_softmax", "bp_softmax_forward", np.float32)
    with pytest.raises(AssertionError, match="long long given as int"):
        launch((2,), (32,), (x, np.empty_like(x), 3))


def test_a_wrong_formula_in_the_backend_source_is_caught(monkeypatch):
    """Negative control through the op: AdamW's decay dropped from the backend's Adam
    kernel, run as test_kernels' ``cupy_on_host`` runs it, differs from the reference."""
    good = CK.ELEMENTWISE["bp_adam"]
    assert "(p * decay)" in good.operation
    bad = CK.ElementwiseSpec(good.name, good.in_params, good.out_params,
                             good.operation.replace("(p * decay)", "p", 1), good.scalars)
    lib = cuda_host.build((), [bad])
    cuda_host.install(monkeypatch, elementwise=lambda name: cuda_host.elementwise_launcher(
        lib, bad))
    rng = np.random.default_rng(1)
    p, g, m = (rng.standard_normal(50) for _ in range(3))
    v = np.abs(rng.standard_normal(50))
    args = (1e-2, 0.9, 0.999, 1e-8, 0.1, True, 3)  # lr, betas, eps, weight decay, AdamW, step
    got = [a.copy() for a in (p, g, m, v)]
    CK.adam_step(*got, None, *args)
    want = [a.copy() for a in (p, g, m, v)]
    R.adam_step(*want, None, *args)
    assert not np.allclose(got[0], want[0], rtol=1e-12)


def test_a_training_step_launches_one_kernel_per_fused_op(monkeypatch):
    """What a GPU step of the CuPy backend launches besides cuBLAS's matrix products: one
    kernel per layer and direction (Dense's epilogues, BatchNorm, Dropout), one for the loss,
    and one Adam update for all eight parameter tensors of the model."""
    from conftest import route_cpu_kernels
    from test_no_allocation import _step_and_model

    launched = []

    def recorded(factory, name):
        launch = factory()
        return lambda *args: (launched.append(name), launch(*args))

    cuda_host.install(
        monkeypatch,
        raw=lambda module, kernel, dtype: recorded(
            lambda: cuda_host.raw_kernel(module, kernel, dtype), kernel),
        elementwise=lambda name: recorded(lambda: cuda_host.elementwise_kernel(name), name))
    route_cpu_kernels(monkeypatch, CK)
    step = _step_and_model(np.float32)  # Dense gelu, BatchNorm, Dropout, Dense relu, Dense
    step()
    launched.clear()
    step()
    assert launched == [
        "bp_bias_act_keep_z_gelu_erf", "bp_batchnorm_forward", "bp_dropout",
        "bp_bias_act_relu", "bp_bias_act_identity",
        "bp_softmax_xent",
        "bp_bias_act_backward", "bp_bias_act_backward", "bp_dropout", "bp_batchnorm_backward",
        "bp_bias_act_backward",
        "bp_adam"]
