"""The private Numba APIs that the Numba backends build on, each named with the file that uses
it: when a Numba release moves one, this fails with the name and the place to port, instead
of the kernels failing to compile somewhere deep in a traceback (or, for the cache key,
silently loading stale machine code). pyproject.toml pins numba and numba-cuda to the minor
versions these were checked against; raise the pins after this file passes on the new ones.
"""
from __future__ import annotations

import importlib
import inspect

import pytest

numba = pytest.importorskip("numba")

# (module, attribute path, the file that uses it, what for)
MODULE_ATTRIBUTES = [
    ("numba.core.caching", "FunctionCache", "kernels/numba_cpu.py",
     "_KernelCache: the on-disk cache keyed also by vecmath/reference sources"),
    ("numba.core.caching", "FunctionCache._index_key", "kernels/numba_cpu.py",
     "_KernelCache._index_key(sig, codegen) extends the cache key"),
    ("numba.core.imputils", "lower_builtin", "kernels/inline.py",
     "lowering of the inlined device-function calls"),
    ("numba.core.cgutils", "if_unlikely", "kernels/inline.py", "error status branch"),
    ("numba.core.cgutils", "get_or_insert_function", "kernels/vecmath.py",
     "declaring LLVM intrinsics (llvm.<op>.<type>)"),
    ("numba.extending", "intrinsic", "kernels/vecmath.py, kernels/numba_cpu.py",
     "LLVM IR of vecmath and the dropout hash"),
    ("numba.extending", "type_callable", "kernels/inline.py", "typing of the inlined calls"),
    ("numba.core.cgutils", "get_or_insert_function", "backprop/blas_pool.py",
     "declaring the OpenBLAS/OpenMP functions the BLAS callback calls by name"),
    ("numba.np.ufunc.parallel", "_load_threading_functions", "backprop/blas_pool.py",
     "registers get_num_threads/set_num_threads, which the callback calls by name"),
]

# methods of the CPU target context that the lowering code calls
CONTEXT_METHODS = ["cast", "add_linking_libs", "declare_function", "get_value_type"]
CALL_CONV_METHODS = ["call_function", "return_status_propagate"]


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module, path, user, purpose", MODULE_ATTRIBUTES,
                         ids=[f"{m}.{p}" for m, p, _, _ in MODULE_ATTRIBUTES])
def test_private_numba_api_is_where_the_backend_expects_it(module, path, user, purpose):
    try:
        _resolve(module, path)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"numba {numba.__version__} has no {module}.{path} ({exc}); {user} uses it "
                    f"({purpose}): port that code, or pin numba to the last release that has "
                    "it")


def test_the_cache_key_hook_keeps_its_signature():
    from numba.core.caching import FunctionCache

    params = list(inspect.signature(FunctionCache._index_key).parameters)
    assert params == ["self", "sig", "codegen"], (
        f"numba {numba.__version__}: FunctionCache._index_key{tuple(params)}; "
        "kernels/numba_cpu.py's _KernelCache overrides _index_key(self, sig, codegen)")


def test_the_lowering_context_has_the_methods_inline_calls():
    from numba.core.registry import cpu_target

    context = cpu_target.target_context
    missing = [m for m in CONTEXT_METHODS if not hasattr(context, m)]
    missing += [f"call_conv.{m}" for m in CALL_CONV_METHODS
                if not hasattr(context.call_conv, m)]
    assert not missing, (f"numba {numba.__version__}: the CPU target context lacks {missing}, "
                         "which kernels/inline.py calls to inline device functions")


def test_dispatchers_and_compile_results_have_what_the_backend_reads():
    f = numba.njit(lambda x: x + 1)
    f(1)
    result = next(iter(f.overloads.values()))
    missing = [name for name, obj in (("library", result), ("fndesc", result),
                                      ("signature", result), ("_cache", f), ("py_func", f))
               if not hasattr(obj, name)]
    assert not missing, (f"numba {numba.__version__}: missing {missing} (compile results' "
                         "library/fndesc/signature: kernels/inline.py; a dispatcher's _cache "
                         "and py_func: kernels/numba_cpu.py)")


def test_the_threading_layer_registers_the_functions_the_blas_callback_calls():
    """backprop/blas_pool.py's callback calls the C functions ``get_num_threads`` and
    ``set_num_threads`` of Numba's threading layer by the names Numba registers them under,
    and finds ``omp_in_parallel`` through the OpenMP layer's extension module."""
    source = inspect.getsource(importlib.import_module("numba.np.ufunc.parallel")
                               ._load_threading_functions)
    for name in ("get_num_threads", "set_num_threads"):
        assert f"add_symbol('{name}'" in source or f'add_symbol("{name}"' in source, (
            f"numba {numba.__version__} no longer registers {name!r}: port "
            "backprop/blas_pool.py's _team_size")
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        pytest.skip("Numba's OpenMP layer is not available here (the shared BLAS pool needs it)")
    import ctypes

    assert ctypes.CDLL(omppool.__file__).omp_in_parallel is not None


def test_the_cuda_simulator_array_type_is_importable():
    pytest.importorskip("numba.cuda")
    try:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"numba-cuda moved FakeCUDAArray ({exc}); kernels/numba_cuda.py imports "
                    "it to recognise the simulator's arrays")
