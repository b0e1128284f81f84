"""Every launch of the CuPy backend matches the kernel it launches, checked without a GPU.

A ``cupy.RawKernel`` packs its arguments by their Python types and never compares them with
the C++ signature: an ``int`` where the kernel takes ``long long``, a float64 scalar for a
``const T`` of a float kernel, or one argument too few is read as garbage on the GPU, not
reported. This test calls each op of ``backprop.kernels.cupy_kernels`` on NumPy stand-ins for
device arrays, with the launches recorded instead of run, and holds every recorded launch to
its kernel's declaration in the backend's own source:

* RawKernels: the parameter list of ``__global__ void <kernel>(...)`` in the module's code,
  with ``T`` the launch's dtype; a pointer takes an array of its element type, a scalar a
  NumPy scalar of exactly its type (``long long`` int64, ``int`` int32, ``double`` float64);
  the block is one that the kernel body assumes (``lanes[LANES][STRIP]`` shared memory: a
  (STRIP, LANES) block; a block reduction into ``scratch[32]``: a 1-D block of whole warps).
* ElementwiseKernels: as many arguments as in and out parameters, a scalar exactly where
  the spec declares one, arrays elsewhere (CuPy itself checks their dtypes at launch).

Every op runs for float32 and float64, every activation, and a short and a tall batch (the
tall one takes the two-stage bias gradient).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from backprop import kernels
from backprop.kernels import cupy_kernels as CK
from conftest import kernel_arguments
from cuda_host import C_SCALARS, install, kernel_signature

pytestmark = pytest.mark.kernel_harness  # ci/gpu.sh runs these in its kernels step

C_TYPES = {ctype: numpy_type for ctype, (numpy_type, _) in C_SCALARS.items()}  # besides T
SHAPES = [(6, 5), (600, 70)]  # 600 rows: more than _BIAS_ROWS_PER_BLOCK, so partial sums


def _count_params(params: str) -> int:
    return len([p for p in params.split(",") if p.strip()])


class Recorder:
    """Stands in for the kernel factories of the backend: records each launch."""

    def __init__(self):
        self.raw, self.elementwise = [], []

    def raw_kernel(self, module, kernel, dtype):
        return lambda grid, block, args: self.raw.append(
            (module, kernel, np.dtype(dtype), grid, block, args))

    def elementwise_kernel(self, name):
        return lambda *args: self.elementwise.append((name, args))


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    install(monkeypatch, rec.raw_kernel, rec.elementwise_kernel)
    return rec


CUPY_OPS = sorted(op for op, backends in kernels.OPS.items() if "cupy" in backends)
CASES = [pytest.param(op, dtype, act, shape,
                      id=f"{op}-{np.dtype(dtype).name}" + (f"-{act}" if act else "")
                      + f"-{shape[0]}x{shape[1]}")
         for op in CUPY_OPS for dtype in (np.float32, np.float64)
         for act in (kernels.ACTIVATIONS if op.startswith("bias_act") else (None,))
         for shape in SHAPES]


def _check_raw_launch(module, kernel, dtype, grid, block, args):
    where = f"{kernel}<{dtype.name}>"
    params, body = kernel_signature(CK.RAW_MODULES[module].code, kernel)
    assert len(args) == len(params), (f"{where}: {len(args)} arguments for {len(params)} "
                                      f"parameters {params}")
    for k, ((ctype, pointer, _), arg) in enumerate(zip(params, args)):
        want = dtype.type if ctype == "T" else C_TYPES[ctype]
        if pointer:
            assert isinstance(arg, np.ndarray) and arg.dtype == want, (
                f"{where}: parameter {k} is {ctype}*, given {type(arg).__name__} "
                f"{getattr(arg, 'dtype', '')}")
        else:
            assert type(arg) is want, (f"{where}: parameter {k} is {ctype} "
                                       f"({np.dtype(want).name}), given {type(arg).__name__}")
    assert all(isinstance(g, int) and g >= 1 for g in grid), f"{where}: grid {grid}"
    assert all(isinstance(b, int) for b in block) and np.prod(block) <= 1024, (
        f"{where}: block {block}")
    lanes = re.search(r"__shared__ double lanes\[(\d+)\]\[(\d+)\]", body)
    if lanes:
        assert block == (int(lanes.group(2)), int(lanes.group(1))), (
            f"{where}: block {block} for shared lanes[{lanes.group(1)}][{lanes.group(2)}]")
    if "scratch[32]" in body:
        assert len(block) == 1 and block[0] % 32 == 0, (
            f"{where}: a block reduction needs a 1-D block of whole warps, got {block}")


def _check_elementwise_launch(name, args):
    spec = CK.ELEMENTWISE[name]
    n_in, n_out = _count_params(spec.in_params), _count_params(spec.out_params)
    assert len(args) == n_in + n_out, (f"{name}: {len(args)} arguments for {n_in} in and "
                                       f"{n_out} out parameters")
    names = [p.split()[-1] for p in spec.in_params.split(",")]
    for param, arg in zip(names, args):
        scalar = param in spec.scalars
        assert isinstance(arg, np.ndarray) != scalar, (
            f"{name}: {param} is {'a scalar' if scalar else 'an array'}, given "
            f"{type(arg).__name__}")
    for arg in args[n_in:]:
        assert isinstance(arg, np.ndarray), f"{name}: an output given as {type(arg).__name__}"


@pytest.mark.parametrize("op, dtype, act, shape", CASES)
def test_launch_arguments_match_the_kernel(recorder, op, dtype, act, shape):
    getattr(CK, op)(*kernel_arguments(op, dtype, act, *shape))
    assert recorder.raw or recorder.elementwise, f"{op} launched nothing"
    for launch in recorder.raw:
        _check_raw_launch(*launch)
    for launch in recorder.elementwise:
        _check_elementwise_launch(*launch)


def test_the_tall_batch_takes_the_two_stage_bias_gradient(recorder):
    CK.bias_act_backward(*kernel_arguments("bias_act_backward", np.float32, "relu", *SHAPES[1]))
    assert [name for name, _ in recorder.elementwise] == ["bp_bias_grad_finalize"]


@pytest.mark.parametrize("mistake", ["python int", "float64 scalar", "missing"])
def test_a_wrong_argument_is_caught(recorder, mistake):
    """Negative control: the check fails on each kind of mistake it exists for."""
    CK.softmax_forward(*kernel_arguments("softmax_forward", np.float32, None))
    (module, kernel, dtype, grid, block, args), = recorder.raw
    args = {"python int": args[:-1] + (int(args[-1]),),
            "float64 scalar": args[:-1] + (np.float64(args[-1]),),
            "missing": args[:-1]}[mistake]
    with pytest.raises(AssertionError):
        _check_raw_launch(module, kernel, dtype, grid, block, args)
