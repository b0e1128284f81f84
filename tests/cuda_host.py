"""The CuPy backend's kernels run on the CPU: their CUDA C++ compiled for the host.

``kernels/cupy_kernels.py`` declares every kernel as source text (:data:`ELEMENTWISE` specs
and :data:`RAW_MODULES`). This module compiles all of it with the host C++ compiler and
``cuda_host.h`` (a block scheduler with coroutine threads, ``__syncthreads`` and warp
shuffles, bounds-checked pointers, the CUDA intrinsics the kernels call; see its header
comment), unchanged but for its pointer declarations (:func:`checked_pointers`) and its
``#include`` of CUDA headers (:func:`host_code`: ``cuda_host.h`` defines what they would),
into one shared library, and gives launchers
that run on NumPy arrays in place of ``cupy.RawKernel`` and ``cupy.ElementwiseKernel``.
:func:`install` puts them under the backend's own op functions, so that the tests run the
ops exactly as a GPU would be driven (launch geometry, two-stage reductions, workspaces) and
compare the results with the reference. An elementwise kernel becomes the loop CuPy would
generate: non-raw arguments bound to element ``i`` (read-only for inputs, by reference for
outputs), ``raw`` ones as pointers, scalars as values of their declared type.

What it shows besides the numbers: a barrier or shuffle not reached by every thread, an
index outside an array, and races that the order of the threads between two barriers
decides (odd blocks run their threads in reverse). What it cannot show: the GPU's own
rounding (CUDA's ``exp``, ``tanh``, ``erf`` are not the host's libm), races that only an
interleaving of instructions reveals (the emulator switches threads at barriers alone), and
indexes into a ``__shared__`` array where it is declared. ci/gpu.sh runs the same tests on
a GPU.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

import numpy as np

from backprop.kernels import cupy_kernels as CK

HEADER = Path(__file__).with_name("cuda_host.h")
COMPILERS = ("g++", "c++", "clang++")
FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-w")
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# CuPy's type names in ElementwiseKernel parameters -> C++ and NumPy
_CUPY_TYPES = {"int64": ("long long", np.int64), "int32": ("int", np.int32),
               "uint32": ("unsigned int", np.uint32), "uint16": ("unsigned short", np.uint16),
               "float64": ("double", np.float64), "float32": ("float", np.float32)}
# C++ scalar types of raw-kernel parameters (T aside) -> NumPy and ctypes
C_SCALARS = {"long long": (np.int64, ctypes.c_longlong), "int": (np.int32, ctypes.c_int),
              "unsigned int": (np.uint32, ctypes.c_uint),
              "unsigned short": (np.uint16, ctypes.c_ushort),
              "double": (np.float64, ctypes.c_double), "float": (np.float32, ctypes.c_float)}


def kernel_signature(code: str, kernel: str) -> tuple[list[tuple[str, bool, str]], str]:
    """``([(C type, is pointer, name), ...], body)`` of ``__global__ void kernel(...)`` in
    ``code`` (``const`` dropped: ``const T* x`` is ``("T", True, "x")``)."""
    match = re.search(rf"__global__\s+void\s+{kernel}\s*\((.*?)\)\s*\{{", code, re.S)
    assert match, f"no __global__ void {kernel}(...) in its module's source"
    params = []
    for param in match.group(1).split(","):
        words = param.replace("const", " ").replace("*", " * ").split()
        params.append((" ".join(w for w in words[:-1] if w != "*"), "*" in words, words[-1]))
    following = code[match.end():]
    end = following.find("template")
    return params, following if end < 0 else following[:end]


_POINTER = re.compile(
    r"\b((?:const\s+)?(?:T|double|float|long long|unsigned int|unsigned short|int))"
    r"\s*\*(?=\s*\w)")
# CUDA headers a kernel source includes; cuda_host.h defines what the kernels use of them
_CUDA_INCLUDE = re.compile(r"^[ \t]*#include\s*<cuda_fp16\.h>[ \t]*$", re.M)


def checked_pointers(code: str) -> str:
    """``code`` with every pointer declaration ``[const] X* name`` (parameters, locals and
    struct members) turned into ``bp_ptr<[const] X> name``, which checks each index
    (cuda_host.h)."""
    return _POINTER.sub(lambda m: f"bp_ptr<{m.group(1)}> ", code)


def host_code(code: str) -> str:
    """``code`` without its ``#include <cuda_fp16.h>``: the host has no CUDA headers, and
    cuda_host.h defines the intrinsics the kernels take from them (``__float2half_rn``,
    ``__half_as_ushort``)."""
    return _CUDA_INCLUDE.sub("// (cuda_fp16.h: cuda_host.h)", code)


def elementwise_params(params: str) -> list[tuple[bool, str, str]]:
    """``[(raw, CuPy type, name), ...]`` of an ElementwiseKernel parameter list."""
    out = []
    for param in filter(None, (p.strip() for p in params.split(","))):
        words = param.split()
        out.append((words[0] == "raw", words[-2], words[-1]))
    return out


# ---------------------------------------------------------------------------------------
# Code generation
def _cxx_type(cupy_type: str) -> str:
    return "T" if cupy_type == "T" else _CUPY_TYPES[cupy_type][0]


def _unpack(k: int, ctype: str, pointer: bool, name: str) -> str:
    """Argument ``k`` of a launch, read from ``void** a`` (each entry points at the value);
    a pointer becomes a ``bp_ptr`` over the ``n[k]`` elements of its array."""
    if pointer:
        return f'bp_ptr<{ctype}>(*({ctype}**)a[{k}], n[{k}], "{name}")'
    return f"*({ctype}*)a[{k}]"


_LAUNCHER = ('extern "C" int {symbol}({params}) {{\n    using T = {ctype};\n'
             "    return cuda_host::launch({grid}, [=] {{ {call}; }});\n}}")


def _raw_module_source(spec) -> str:
    lines = [f"namespace {spec.name} {{", checked_pointers(host_code(spec.code)), "}"]
    for kernel in spec.kernels:
        params, _ = kernel_signature(spec.code, kernel)
        args = ", ".join(_unpack(k, *param) for k, param in enumerate(params))
        for ctype in CTYPES.values():
            lines.append(_LAUNCHER.format(
                symbol=f"raw__{spec.name}__{kernel}__{ctype}", ctype=ctype, grid="g, b",
                params="const unsigned* g, const unsigned* b, void** a, const long long* n",
                call=f"{spec.name}::{kernel}<T>({args})"))
    return "\n".join(lines)


def _elementwise_source(spec) -> str:
    params = elementwise_params(spec.in_params) + elementwise_params(spec.out_params)
    n_in = len(elementwise_params(spec.in_params))
    decls, binds = [], []
    for k, (raw, ctype, name) in enumerate(params):
        ctype = _cxx_type(ctype)
        if name in spec.scalars:
            decls.append(f"const {ctype} {name}")
        elif raw:
            decls.append(f"bp_ptr<{ctype}> {name}")
        else:
            decls.append(f"bp_ptr<{ctype}> {name}_")
            binds.append(f"const {ctype} {name} = {name}_[i];" if k < n_in
                         else f"{ctype}& {name} = {name}_[i];")
    args = ", ".join(_unpack(k, _cxx_type(t), name not in spec.scalars, name)
                     for k, (_, t, name) in enumerate(params))
    lines = [f"namespace {spec.name} {{", host_code(spec.preamble),
             "template <typename T>",
             f"void run(const long long n, {', '.join(decls)}) {{",
             "    for (long long i = 0; i < n; ++i) {",
             *(f"        {b}" for b in binds),
             f"        {spec.operation};",
             "    }", "}", "}"]
    for ctype in CTYPES.values():  # one thread of one block: the loop as CuPy writes it
        lines.append(_LAUNCHER.format(
            symbol=f"elementwise__{spec.name}__{ctype}", ctype=ctype,
            grid="cuda_host::ONE, cuda_host::ONE",
            params="long long size, void** a, const long long* n",
            call=f"{spec.name}::run<T>(size, {args})"))
    return "\n".join(lines)


def source(raw_modules, elementwise) -> str:
    """The translation unit: the header, each raw module and each elementwise kernel in a
    namespace of its own name, with ``extern "C"`` launchers for float and double."""
    parts = ['#include "cuda_host.h"']
    parts += [_raw_module_source(spec) for spec in raw_modules]
    parts += [_elementwise_source(spec) for spec in elementwise]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------
# Build
def compiler() -> str | None:
    return next((c for c in map(shutil.which, COMPILERS) if c), None)


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return f"the host emulation of CUDA needs Linux's ucontext, not {sys.platform}"
    if compiler() is None:
        return f"no C++ compiler on PATH ({', '.join(COMPILERS)})"
    return None


_LIBRARIES: dict = {}


def _cache_dir() -> Path:
    """Where the compiled libraries are kept: ``$XDG_CACHE_HOME/backprop/cuda_host`` (as CuPy
    keeps its kernels under the home directory: a temp directory may be mounted noexec,
    which no shared library loads from), else the temp directory."""
    for base in (os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                 tempfile.gettempdir()):
        folder = Path(base) / "backprop" / "cuda_host"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise RuntimeError("no writable directory for the host-compiled CUDA kernels")


def build(raw_modules=(), elementwise=()) -> ctypes.CDLL:
    """The kernels of ``raw_modules`` (RawModuleSpecs) and ``elementwise`` (ElementwiseSpecs)
    compiled for the host, once per source (kept in :func:`_cache_dir`); a compile error
    raises with the compiler's message."""
    code, cxx = source(raw_modules, elementwise), compiler()
    key = hashlib.sha256("\n".join([code, HEADER.read_text(), cxx, *FLAGS]).encode()).hexdigest()
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    path = _cache_dir() / f"kernels-{key[:16]}.so"
    if not path.exists():
        # test workers start at once: one compiles, the others wait for its library
        # instead of compiling the same source beside it
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                _compile(code, cxx, path)
    # PyDLL keeps the GIL during a call: the emulator's state (__shared__ arrays as statics,
    # the scheduler, the error message) is process-global, so launches from two Python
    # threads must not overlap
    lib = _LIBRARIES[key] = ctypes.PyDLL(str(path))
    lib.cuda_host_error.restype = ctypes.c_char_p
    return lib


def _compile(code: str, cxx: str, path: Path) -> None:
    """Compile ``code`` into the shared library ``path`` (atomically)."""
    work = Path(tempfile.mkdtemp(prefix="kernels-", dir=path.parent))
    (work / "kernels.cpp").write_text(code)
    built = work / "kernels.so"
    result = subprocess.run([cxx, *FLAGS, f"-I{HEADER.parent}", "kernels.cpp", "-o",
                             built.name], cwd=work, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{cxx} could not compile the kernels for the host "
                           f"({work / 'kernels.cpp'}):\n{result.stderr[-4000:]}")
    os.replace(built, path)  # atomic: a reader never sees a partial library
    shutil.rmtree(work)


@functools.cache
def library() -> ctypes.CDLL:
    """Every kernel of the CuPy backend, compiled for the host."""
    return build(CK.RAW_MODULES.values(), CK.ELEMENTWISE.values())


# ---------------------------------------------------------------------------------------
# Launchers in place of cupy's kernel objects
def _pointers(values) -> ctypes.Array:
    return (ctypes.c_void_p * len(values))(
        *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])


def _sizes(args) -> ctypes.Array:
    """The element count of each array argument (0 for a scalar), for the ``bp_ptr``s."""
    return (ctypes.c_longlong * len(args))(
        *[a.size if isinstance(a, np.ndarray) else 0 for a in args])


def _array(where: str, arg, dtype) -> ctypes.c_void_p:
    assert isinstance(arg, np.ndarray) and arg.dtype == dtype and arg.flags.c_contiguous, (
        f"{where}: expected a C-contiguous {np.dtype(dtype).name} array, got "
        f"{type(arg).__name__} {getattr(arg, 'dtype', '')}")
    return ctypes.c_void_p(arg.ctypes.data)


def raw_launcher(lib: ctypes.CDLL, spec, kernel: str, dtype):
    """``kernel<T>`` of the raw module ``spec`` in ``lib``, as ``launch(grid, block, args)``
    (the call of a ``cupy.RawKernel``): pointers take C-contiguous arrays of their element
    type, scalars NumPy scalars of exactly their type."""
    dtype = np.dtype(dtype)
    fn = getattr(lib, f"raw__{spec.name}__{kernel}__{CTYPES[dtype]}")
    params, _ = kernel_signature(spec.code, kernel)
    scalar_t = (dtype.type, C_SCALARS[CTYPES[dtype]][1])

    def launch(grid, block, args):
        where = f"{kernel}<{dtype.name}>"
        assert len(args) == len(params), f"{where}: {len(args)} arguments for {len(params)}"
        values = []
        for (ctype, pointer, _), arg in zip(params, args):
            want, cvalue = scalar_t if ctype == "T" else C_SCALARS[ctype]
            if pointer:
                values.append(_array(where, arg, want))
            else:
                assert type(arg) is want, f"{where}: {ctype} given as {type(arg).__name__}"
                values.append(cvalue(arg))
        dims = [(ctypes.c_uint * 3)(*(tuple(d) + (1,) * (3 - len(d)))) for d in (grid, block)]
        if fn(*dims, _pointers(values), _sizes(args)):
            raise RuntimeError(f"{where}: {lib.cuda_host_error().decode()}")

    return launch


def elementwise_launcher(lib: ctypes.CDLL, spec):
    """The elementwise kernel ``spec`` in ``lib``, as ``call(*in_args, *out_args)`` (the
    call of a ``cupy.ElementwiseKernel``; ``T`` from the arrays, scalars cast to their
    declared type, non-raw arrays of one size and C-contiguous)."""
    params = elementwise_params(spec.in_params) + elementwise_params(spec.out_params)
    name = spec.name

    def call(*args):
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)}"
        dtype = next(a.dtype for (_, t, _), a in zip(params, args)
                     if t == "T" and isinstance(a, np.ndarray))
        sizes = {a.size for (raw, _, p), a in zip(params, args)
                 if not raw and p not in spec.scalars}
        assert len(sizes) == 1, f"{name}: non-raw arrays of different sizes {sizes}"
        values = []
        for (raw, t, p), arg in zip(params, args):
            numpy_type = dtype.type if t == "T" else _CUPY_TYPES[t][1]
            if p in spec.scalars:
                assert not isinstance(arg, np.ndarray), f"{name}: {p} is a scalar"
                value = numpy_type(arg)
                values.append(np.ctypeslib.as_ctypes_type(value.dtype)(value))
            else:
                values.append(_array(f"{name} {p}", arg, numpy_type))
        fn = getattr(lib, f"elementwise__{name}__{CTYPES[dtype]}")
        if fn(ctypes.c_longlong(sizes.pop()), _pointers(values), _sizes(args)):
            raise RuntimeError(f"{name}: {lib.cuda_host_error().decode()}")

    return call


def raw_kernel(module: str, kernel: str, dtype):
    """The CuPy backend's ``raw_kernel``, on the host."""
    return raw_launcher(library(), CK.RAW_MODULES[module], kernel, dtype)


def elementwise_kernel(name: str):
    """The CuPy backend's ``elementwise_kernel``, on the host."""
    return elementwise_launcher(library(), CK.ELEMENTWISE[name])


class _Workspace(threading.local):
    def __init__(self):
        self.array = np.empty(0)


_WORKSPACE = _Workspace()


def _workspace(size: int) -> np.ndarray:
    """The backend's float64 scratch vector, on the host: grown when too small, then reused
    (as the backend's own, so a warm training step allocates nothing), one per thread (as
    the backend's own is per thread and stream)."""
    if _WORKSPACE.array.size < size:
        _WORKSPACE.array = np.empty(max(size, 4096), np.float64)
    return _WORKSPACE.array


def install(monkeypatch, raw=raw_kernel, elementwise=elementwise_kernel) -> None:
    """Drive ``cupy_kernels``' ops on NumPy arrays: its kernel factories replaced by ``raw``
    and ``elementwise`` (these launchers, or a recorder), an H100's 132 SMs, a host
    workspace, and ``cupy.ascontiguousarray`` (the one CuPy function an op calls itself) by
    NumPy's: on CuPy's module where it is installed, else on a stand-in module."""
    monkeypatch.setattr(CK, "raw_kernel", raw)
    monkeypatch.setattr(CK, "elementwise_kernel", elementwise)
    monkeypatch.setattr(CK, "_sm_count", lambda: 132)
    monkeypatch.setattr(CK, "_workspace", _workspace)
    if importlib.util.find_spec("cupy") is not None:
        import cupy

        monkeypatch.setattr(cupy, "ascontiguousarray", np.ascontiguousarray)
    else:
        monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
            ascontiguousarray=np.ascontiguousarray, int64=np.int64))
