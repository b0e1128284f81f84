"""NVRTC compiles every CuPy kernel of ``kernels/cupy_kernels.py``, float32 and float64, with
no GPU (CI has none), so a syntax or type error in a kernel body fails here, not on a GPU.

How, and why this way: the test drives CuPy's own code path as far as it goes without a
device, and replaces only the device query.

* ElementwiseKernels: CuPy writes the CUDA source of an ``ElementwiseKernel`` only at its first
  launch, from the arguments (``_ArgInfo``: array/scalar/indexer, dtype, ndim, contiguity) and
  the type map. Its generator ``cupy._core._kernel._get_elementwise_kernel_code`` is a
  module-level function that needs no device, so the test builds the very
  ``cupy.ElementwiseKernel`` objects the backend launches (``cupy_kernels.elementwise_kernel``),
  describes the arguments as ``ElementwiseKernel.__call__`` does for C-contiguous arrays
  (reduced to 1-D), Python scalars and the 1-D indexer, takes the type map from the kernel's
  own ``_decide_params_type``, and asks CuPy for the source: the real ``typedef float T;``,
  ``CArray`` element references, ``raw`` indexers, the loop index ``i`` and ``_ind``.
* RawModules: the ``cupy.RawModule`` objects of the backend, whose ``code``, ``options`` and
  ``name_expressions`` (``kernel<float>``, ``kernel<double>``) are compiled as given.
* Compilation is what ``cupy._core.core.compile_with_cache`` does: the CuPy headers prepended
  for elementwise kernels, ``assemble_cupy_compiler_options`` (bundled CCCL and CuPy include
  paths, C++ standard), ``-ftz=true``, then ``cupy.cuda.compiler.compile_using_nvrtc``, which
  adds ``--device-as-default-execution-space`` and the architecture. Only CuPy's per-device
  architecture query (``_get_arch_for_options_for_nvrtc``, which asks the driver) is patched to
  return ``-arch=sm_90`` (H100/H200, ``BACKPROP_NVRTC_ARCH`` to change it), so NVRTC emits a
  cubin (ptxas runs too). Loading the module and launching it need a GPU: not done here.

The test is skipped only when CuPy or NVRTC cannot be loaded (the reason is shown). The last
two tests are negative controls: a broken body must fail to compile.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed: NVRTC is driven through it")


def _nvrtc_unavailable() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # a missing or broken libnvrtc
        return (f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); "
                "pip install nvidia-cuda-nvrtc-cu12")
    return None


_reason = _nvrtc_unavailable()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from cupy._core import _carray, _kernel, _scalar, core  # noqa: E402
from cupy.cuda import compiler  # noqa: E402

import nvrtc_bundle  # noqa: E402
from backprop import kernels as K  # noqa: E402
from backprop.kernels import cupy_kernels as ck  # noqa: E402
from backprop.kernels import reference  # noqa: E402

pytestmark = pytest.mark.kernel_harness  # ci/gpu.sh runs these in its kernels step

ARCH = os.environ.get("BACKPROP_NVRTC_ARCH", "90")
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ARRAY, _INDEXER, _SCALAR = 1, 2, 3  # cupy._core._kernel._ArgKind


@pytest.fixture(scope="module", autouse=True)
def _explicit_arch():
    """CuPy asks the current device for its architecture; there is none: name one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                   lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
        yield


def nvrtc_compile(source: str, options=(), *, cupy_headers: bool, name_expressions=None):
    """Compile like ``compile_with_cache`` would; returns (cubin bytes, lowered-name map)."""
    if cupy_headers:
        source = "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + source
    options = core.assemble_cupy_compiler_options(tuple(options)) + ("-ftz=true",)
    return compiler.compile_using_nvrtc(source, options, arch=ARCH,
                                        name_expressions=name_expressions)


def elementwise_source(kernel, scalars, dtype) -> str:
    """The CUDA source CuPy generates for ``kernel`` called with C-contiguous ``dtype``
    arrays, Python scalars for the ``scalars`` params, and all outputs given."""
    infos, in_dtypes, out_dtypes = [], [], []
    for index, p in enumerate(kernel.params):
        if p.name == "_ind":
            infos.append(_kernel._ArgInfo(_INDEXER, _carray.Indexer, None, 1, True, True))
            continue
        dt = np.dtype(dtype) if p.dtype is None else np.dtype(p.dtype)
        if p.name in scalars:
            infos.append(_kernel._ArgInfo(_SCALAR, _scalar.CScalar, dt, 0, True, True))
            in_dtypes.append(None)
        else:
            infos.append(_kernel._ArgInfo(_ARRAY, cupy.ndarray, dt, 1, True, True))
            (in_dtypes if index < kernel.nin else out_dtypes).append(dt)
    _, _, type_map = kernel._decide_params_type(tuple(in_dtypes), tuple(out_dtypes))
    return _kernel._get_elementwise_kernel_code(
        tuple(infos), type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble,
        **kernel.kwargs)


def _elementwise_cases():
    """Every kernel in each dtype it can run in: the variants that also write a
    low-precision copy take float32 data only (float64 is refused before a launch)."""
    return [pytest.param(name, dtype, id=f"{name}-{dtype}") for name in sorted(ck.ELEMENTWISE)
            for dtype in DTYPES
            if dtype == np.float32 or not name.endswith(("_bf16", "_f16"))]


def _source_and_options(name, dtype):
    kernel = ck.elementwise_kernel(name)
    source = elementwise_source(kernel, ck.ELEMENTWISE[name].scalars, dtype)
    return source, tuple(kernel.kwargs.get("options", ()))


@pytest.fixture(scope="module")
def elementwise_bundles():
    """Per dtype, every elementwise kernel compiled in a few NVRTC programs
    (tests/nvrtc_bundle.py: one per set of headers, each kernel in its own namespace)."""
    def bundles(dtype):
        names = [n for n, d in (p.values for p in _elementwise_cases()) if d == dtype]
        return nvrtc_bundle.Bundles(
            lambda: {n: _source_and_options(n, dtype) for n in names},
            lambda source, options, key: nvrtc_compile(source, options, cupy_headers=True)[0])
    return {dtype: bundles(dtype) for dtype in DTYPES}


@pytest.mark.parametrize("name, dtype", _elementwise_cases())
def test_elementwise_kernel_compiles(elementwise_bundles, name, dtype):
    source, _ = _source_and_options(name, dtype)
    assert f"typedef {CTYPES[dtype]} T;" in source
    assert "CIndexer<1, 1> _ind" in source  # the argument kinds were understood
    cubin = elementwise_bundles[dtype].compiled(name, source)
    assert name.encode() in cubin


def test_a_bundle_compiles_each_kernel_as_it_would_alone():
    """Two kernels of one program keep their own typedefs (float and double ``T``) and
    helpers of one name; a kernel that uses a header it does not include is not rescued by
    another kernel's include (groups are by headers, so it is compiled alone and fails)."""
    sources = {
        "k_float": ("typedef float T; __device__ T h(T x) { return x; }\n"
                    'extern "C" __global__ void k_float(T* p) { p[0] = h(p[0]); }', ()),
        "k_double": ("typedef double T; __device__ T h(T x) { return 2 * x; }\n"
                     'extern "C" __global__ void k_double(T* p) { p[0] = h(p[0]); }', ()),
        "k_half": ("#include <cuda_fp16.h>\n"
                   'extern "C" __global__ void k_half(__half* p) { p[0] = __float2half_rn(1.f); }',
                   ()),
        "k_no_include": ('extern "C" __global__ void k_no_include(unsigned short* p) '
                         "{ p[0] = __half_as_ushort(__float2half_rn(1.f)); }", ()),
    }
    programs = []

    def compile(source, options, key):
        programs.append(source)
        return nvrtc_compile(source, options, cupy_headers=False)[0]

    good = {n: sources[n] for n in ("k_float", "k_double", "k_half")}
    bundles = nvrtc_bundle.Bundles(lambda: good, compile)
    for name in good:
        assert name.encode() in bundles.compiled(name, sources[name][0])
    assert len(programs) == 2  # float and double in one program, the fp16 one in another
    assert "k_float" in programs[0] and "k_double" in programs[0]
    mixed = {n: sources[n] for n in ("k_half", "k_no_include")}
    bundles = nvrtc_bundle.Bundles(lambda: mixed, compile)
    assert b"k_half" in bundles.compiled("k_half", sources["k_half"][0])
    with pytest.raises(compiler.CompileException, match="__float2half_rn"):
        bundles.compiled("k_no_include", sources["k_no_include"][0])


@pytest.mark.parametrize("name", sorted(ck.RAW_MODULES))
def test_raw_module_compiles_for_both_dtypes(name):
    module = ck.raw_module(name)
    assert module.code == ck.RAW_MODULES[name].code
    assert len(module.name_expressions) == 2 * len(ck.RAW_MODULES[name].kernels)
    cubin, lowered = nvrtc_compile(module.code, module.options, cupy_headers=False,
                                   name_expressions=module.name_expressions)
    for expression in module.name_expressions:
        assert lowered[expression].encode() in cubin, expression


def test_every_registry_op_has_the_reference_signature():
    ops = [op for op, backends in K.OPS.items() if "cupy" in backends]
    assert ops, "the registry lists no cupy op"
    for op in ops:
        ours = inspect.signature(getattr(ck, op))
        theirs = inspect.signature(getattr(reference, op))
        assert ours == theirs, f"{op}: {ours} != reference {theirs}"


def test_every_activation_has_every_kernel_variant():
    for act in reference.ACTIVATIONS:
        assert f"bp_act_{act}" in ck.ELEMENTWISE
        keeps_z = act in reference.NEEDS_Z  # with a bias: one kernel, either way
        assert (f"bp_bias_act_{act}" in ck.ELEMENTWISE) != keeps_z
        assert (f"bp_bias_act_keep_z_{act}" in ck.ELEMENTWISE) == keeps_z
        assert f"bp_bias_act_backward_{act}" in ck.RAW_MODULES


def test_import_needs_no_cupy_and_compiles_nothing():
    code = ("import sys; import backprop.kernels.cupy_kernels as m; "
            "assert 'cupy' not in sys.modules, 'importing cupy_kernels imported cupy'; "
            "assert not (m._elementwise or m._modules or m._functions)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_nvrtc_rejects_a_broken_elementwise_body():
    spec = ck.ELEMENTWISE["bp_sgd"]
    operation = spec.operation.replace("lr * ", "lr * undeclared_d * ", 1)
    assert operation != spec.operation
    broken = cupy.ElementwiseKernel(spec.in_params, spec.out_params, operation, spec.name)
    source = elementwise_source(broken, spec.scalars, np.float32)
    with pytest.raises(compiler.CompileException, match="undeclared_d"):
        nvrtc_compile(source, cupy_headers=True)


def test_nvrtc_rejects_a_type_error_in_a_raw_module():
    spec = ck.RAW_MODULES["bp_softmax"]
    code = spec.code.replace("const T s = (T)sum;", "const T* s = sum;")
    assert code != spec.code
    with pytest.raises(compiler.CompileException):
        nvrtc_compile(code, spec.options, cupy_headers=False,
                      name_expressions=spec.name_expressions)
