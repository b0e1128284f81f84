"""Device dispatch: which array module (``xp = numpy | cupy``), which device, which dtype.

The device comes from ``BACKPROP_DEVICE`` (``auto`` by default, ``cpu``, ``cuda``/``gpu``,
``cuda:N``) or from :func:`set_device` / :func:`use_device`. ``auto`` picks CUDA when CuPy
imports *and* a device answers a small allocation, else the CPU, and records why
(:func:`device_info`). An explicit CUDA request that cannot be met raises
:class:`DeviceUnavailableError` naming the cause.

CuPy is probed at most once per process and only when a device is first needed, so
``import backprop`` stays fast on a machine without CuPy.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Device", "DeviceUnavailableError", "get_device", "set_device", "use_device", "get_xp",
    "get_array_module", "asarray", "to_numpy", "get_dtype", "set_dtype", "device_info",
    "parse_device", "cuda_status", "to_dlpack", "from_dlpack",
]

_DTYPES = {"float32": np.float32, "float64": np.float64}


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Device:
    """A place where arrays live: ``Device("cpu")`` or ``Device("cuda", index)``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def xp(self):
        """The array module of this device (numpy or cupy)."""
        if self.kind == "cpu":
            return np
        return _cupy()


def parse_device(name) -> Device | str:
    """Parse ``auto | cpu | cuda | gpu | cuda:N`` (or a :class:`Device`); ``auto`` stays a str."""
    if isinstance(name, Device):
        return name
    text = str(name).strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text == "cpu":
        return Device("cpu")
    m = re.fullmatch(r"(cuda|gpu)(?::(\d+))?", text)
    if m:
        return Device("cuda", int(m.group(2) or 0))
    raise ValueError(
        f"unknown device {name!r}: expected 'auto', 'cpu', 'cuda', 'gpu' or 'cuda:N' "
        "(set BACKPROP_DEVICE or call bp.set_device)")


# ---------------------------------------------------------------------------------------
# CuPy probe (once per process)
_probe_lock = threading.Lock()
_probe: dict | None = None


def cuda_status() -> dict:
    """Probe CuPy once: ``{"available": bool, "reason": str, "devices": int, ...}``.

    ``import cupy`` can succeed on a machine with no usable GPU and fail only at the first
    allocation, so the probe allocates and reduces a small array and catches everything.
    """
    global _probe
    with _probe_lock:
        if _probe is not None:
            return _probe
        status = {"available": False, "reason": "", "devices": 0, "cupy_version": None,
                  "runtime_version": None, "driver_version": None, "names": []}
        if importlib.util.find_spec("cupy") is None:
            status["reason"] = ("CuPy is not installed (pip install 'backprop[cuda12]' or "
                                "'backprop[cuda13]')")
        else:
            try:
                import cupy

                status["cupy_version"] = cupy.__version__
                n = cupy.cuda.runtime.getDeviceCount()
                status["devices"] = n
                if n == 0:
                    status["reason"] = "CuPy is installed but no CUDA device is visible"
                else:
                    status["driver_version"] = cupy.cuda.runtime.driverGetVersion()
                    status["runtime_version"] = cupy.cuda.runtime.runtimeGetVersion()
                    float((cupy.arange(4, dtype=cupy.float32) * 2).sum())  # a real allocation
                    for i in range(n):
                        props = cupy.cuda.runtime.getDeviceProperties(i)
                        name = props["name"]
                        status["names"].append(name.decode() if isinstance(name, bytes) else name)
                    status["available"] = True
                    status["reason"] = f"CUDA device found ({status['names'][0]})"
            except Exception as exc:  # any failure means: no usable GPU
                text = f"{type(exc).__name__}: {exc}".strip()
                if "insufficientdriver" in text.lower().replace(" ", ""):
                    if ctypes.util.find_library("cuda") is None:
                        text = f"no NVIDIA driver is installed (libcuda not found; {text})"
                    else:
                        text = f"the NVIDIA driver is too old for this CuPy build ({text})"
                status["reason"] = f"CuPy is installed but CUDA is unusable: {text}"
        _probe = status
        return status


def _cupy():
    status = cuda_status()
    if not status["available"]:
        raise DeviceUnavailableError(f"CUDA requested but unavailable: {status['reason']}")
    import cupy

    return cupy


# ---------------------------------------------------------------------------------------
# Current device and dtype
_state = threading.local()
_default: dict = {"device": None, "fallback_reason": "", "dtype": None}


def _resolve(spec) -> tuple[Device, str]:
    parsed = parse_device(spec)
    if parsed == "auto":
        status = cuda_status()
        if status["available"]:
            return Device("cuda", 0), ""
        return Device("cpu"), f"auto chose the CPU: {status['reason']}"
    if parsed.kind == "cuda":
        cupy = _cupy()
        count = cuda_status()["devices"]
        if parsed.index >= count:
            raise DeviceUnavailableError(
                f"device cuda:{parsed.index} requested but only {count} CUDA device(s) exist")
        del cupy
    return parsed, ""


def _global_device() -> Device:
    if _default["device"] is None:
        device, reason = _resolve(os.environ.get("BACKPROP_DEVICE", "auto"))
        _default["device"], _default["fallback_reason"] = device, reason
    return _default["device"]


def get_device() -> Device:
    """The current device (a :class:`Device`; ``str(device)`` is ``'cpu'`` or ``'cuda:N'``)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _global_device()


def set_device(name) -> Device:
    """Make ``name`` (``auto | cpu | cuda | gpu | cuda:N``) the process-wide current device."""
    device, reason = _resolve(name)
    _default["device"], _default["fallback_reason"] = device, reason
    if device.kind == "cuda":
        _cupy().cuda.Device(device.index).use()
    return device


@contextlib.contextmanager
def use_device(name):
    """Context manager: run the body with ``name`` as the current device (thread-local)."""
    device, _ = _resolve(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(device)
    try:
        if device.kind == "cuda":
            with _cupy().cuda.Device(device.index):
                yield device
        else:
            yield device
    finally:
        stack.pop()


def get_xp():
    """The array module of the current device: numpy or cupy."""
    return get_device().xp


def get_array_module(x):
    """numpy or cupy, whichever owns ``x`` (numpy for anything that is not a CuPy array)."""
    if type(x) is np.ndarray:
        return np
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def get_dtype():
    """The default floating dtype (``BACKPROP_DTYPE``: float32 by default, or float64)."""
    if _default["dtype"] is None:
        name = os.environ.get("BACKPROP_DTYPE", "float32").strip().lower()
        if name not in _DTYPES:
            raise ValueError(f"BACKPROP_DTYPE={name!r}: expected 'float32' or 'float64'")
        _default["dtype"] = np.dtype(_DTYPES[name])
    return _default["dtype"]


def set_dtype(dtype) -> np.dtype:
    """Set the default floating dtype for new parameters and inputs (float32 or float64)."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype {dt} is not supported: use float32 or float64")
    _default["dtype"] = dt
    return dt


def asarray(x, dtype=None, device=None):
    """``x`` as an array on ``device`` (default: current) with ``dtype`` (default: as is).

    Moves between host and GPU when needed; never copies when nothing has to change.
    """
    dev = get_device() if device is None else _resolve(device)[0]
    src = get_array_module(x)
    if dev.kind == "cpu":
        if src is not np:
            x = x.get()
        return np.asarray(x, dtype=dtype)
    cupy = _cupy()
    with cupy.cuda.Device(dev.index):
        return cupy.asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy array with the contents of ``x`` (copies from the GPU when needed)."""
    if get_array_module(x) is not np:
        return x.get()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------
# DLPack: zero-copy exchange with PyTorch, JAX, CuPy, NumPy >= 2 and other array libraries
# DLPack device types (dlpack.h): where a tensor's memory lives
_DL_HOST = {1: "CPU", 3: "CUDA host (pinned)", 11: "ROCm host (pinned)"}
_DL_GPU = {2: "CUDA", 10: "ROCm", 13: "CUDA managed"}
_DL_NAMES = {4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 12: "ExtDev", 14: "oneAPI",
             15: "WebGPU", 16: "Hexagon", 17: "MAIA", **_DL_HOST, **_DL_GPU}


def _describe(obj) -> str:
    """``torch.Tensor of dtype torch.bfloat16 on meta``: an object's type, dtype and device
    where it says them (for error messages)."""
    text = f"{type(obj).__module__}.{type(obj).__qualname__}"
    dtype, device = getattr(obj, "dtype", None), getattr(obj, "device", None)
    if dtype is not None:
        text += f" of dtype {dtype}"
    if device is not None and not callable(device):
        text += f" on {device}"
    return text


def to_dlpack(a):
    """A DLPack capsule of ``a`` (a NumPy or CuPy array, e.g. a result of ``predict``) for
    a consumer that takes capsules: ``torch.from_dlpack(bp.to_dlpack(out))``,
    ``torch.utils.dlpack.from_dlpack``, ``cupy.from_dlpack``. No copy: the consumer's
    tensor shares ``a``'s memory (writes through either show in both), and a capsule can be
    consumed once. Consumers that speak the DLPack protocol (``torch.from_dlpack``,
    ``jax.numpy.from_dlpack``, ``cupy.from_dlpack``, ``np.from_dlpack``) also accept ``a``
    itself, which is the better way on the GPU (the protocol orders the consumer's CUDA
    stream after the producer's); JAX accepts only that. Raises ``TypeError`` for anything
    that is not a NumPy or CuPy array, and ``BufferError`` for an array DLPack cannot
    describe (a read-only or byte-swapped NumPy array: export ``a.copy()``)."""
    if get_array_module(a) is np and not isinstance(a, np.ndarray):
        raise TypeError(f"to_dlpack takes a NumPy or CuPy array (backprop's arrays), got "
                        f"{_describe(a)}; convert it first with bp.asarray")
    try:
        return a.__dlpack__()
    except BufferError as exc:
        raise BufferError(f"to_dlpack: {exc} (export a copy: bp.to_dlpack(a.copy()))") from None


def from_dlpack(obj, device=None):
    """The tensor ``obj`` (anything with ``__dlpack__``: a PyTorch or JAX tensor, a CuPy or
    NumPy array...) as a NumPy array (memory on the host) or a CuPy array (memory on a CUDA
    device), sharing its memory: no copy. A PyTorch tensor that requires grad is detached
    first (backprop computes its own gradients and never differentiates through data), one
    with the conjugate bit set is resolved (a copy). With ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:N"``) the result is then moved there, a copy when it lives elsewhere.

    The result may be read-only (a JAX array's memory is immutable). Raises
    :class:`backprop.data.DataError` naming the type, dtype and device of a tensor that
    cannot be imported: on a device DLPack cannot describe (``meta``) or that CuPy cannot
    reach (CUDA on a machine without a usable GPU), a dtype NumPy lacks (``bfloat16``),
    a sparse tensor."""
    from backprop.data import DataError

    if not hasattr(obj, "__dlpack__"):
        raise DataError(f"from_dlpack needs an object with __dlpack__ (a PyTorch, JAX or CuPy "
                        f"tensor, a NumPy array...), got {_describe(obj)}")
    array = _import_dlpack(obj, "from_dlpack")
    return array if device is None else asarray(array, device=device)


def _import_dlpack(obj, who: str):
    """``obj`` (with ``__dlpack__``) as a NumPy or CuPy array sharing its memory; see
    :func:`from_dlpack`. ``who`` starts each error message."""
    from backprop.data import DataError

    if getattr(obj, "requires_grad", False) and callable(getattr(obj, "detach", None)):
        obj = obj.detach()  # PyTorch refuses to export a tensor that requires grad
    is_conj = getattr(obj, "is_conj", None)
    if callable(is_conj) and is_conj():
        obj = obj.resolve_conj()
    try:
        kind, index = obj.__dlpack_device__()
        kind, index = int(kind), int(index)
    except Exception as exc:  # e.g. a torch tensor on 'meta': no memory, no DLPack device
        raise DataError(f"{who}: {_describe(obj)} has no memory that DLPack can describe "
                        f"({type(exc).__name__}: {exc}); give a tensor on the CPU or a CUDA "
                        "device") from None
    if kind in _DL_HOST:
        importer = np.from_dlpack
    elif kind in _DL_GPU:
        status = cuda_status()
        if not status["available"]:
            raise DataError(f"{who}: {_describe(obj)} lives on a {_DL_NAMES[kind]} device "
                            f"({index}) but CUDA is unusable here ({status['reason']}); move "
                            "it to the CPU first (tensor.cpu())")
        importer = _cupy().from_dlpack
    else:
        where = _DL_NAMES.get(kind, f"DLPack device type {kind}")
        raise DataError(f"{who}: {_describe(obj)} lives on a {where} device, which backprop "
                        "cannot read; move it to the CPU (or a CUDA device) first")
    try:
        return importer(obj)
    except Exception as exc:  # a dtype NumPy lacks (bfloat16), sparse or strided layouts...
        raise DataError(f"{who}: {_describe(obj)} cannot be imported through DLPack "
                        f"({type(exc).__name__}: {exc}); convert it to a dense float32 or "
                        "float64 tensor first (tensor.float())") from None


ALIGNMENT = 64
"""Bytes that the buffers of products and parameters are aligned to on the CPU (a cache
line; MKL's bf16 GEMM ran 2-3x slower into a float32 output off a 64-byte boundary, and
NumPy aligns to 16 only). CuPy's allocations are 256-byte aligned already."""


def empty_aligned(xp, shape, dtype, zero: bool = False):
    """``xp.empty(shape, dtype)`` (``xp.zeros`` with ``zero``), starting on an
    :data:`ALIGNMENT`-byte boundary on the CPU."""
    if xp is not np:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8) if zero else np.empty(nbytes + ALIGNMENT,
                                                                       np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned(a):
    """``a`` itself where it is not a NumPy array or starts on an :data:`ALIGNMENT`-byte
    boundary, else a C-contiguous copy that does (:func:`empty_aligned`). Layers keep their
    parameters aligned: a vector load from weights off a cache-line boundary reads two
    lines, which the one-row products of the compiled inference plans pay on every load
    (``benchmarks/results/intel-xeon-2c-2026-12-06h/NOTES.md``)."""
    if type(a) is not np.ndarray or (a.ctypes.data % ALIGNMENT == 0 and a.flags.c_contiguous):
        return a
    out = empty_aligned(np, a.shape, a.dtype)
    out[...] = a
    return out


def device_info(mixed_precision: bool = True) -> dict:
    """What runs where: device, dtype, kernel backend, CuPy/Numba status, fallback reason,
    and (``mixed_precision=True``; it loads MKL, which takes a moment) what each mixed
    precision does on the CPU and GPU here (:func:`backprop.precision.describe`)."""
    from backprop import kernels

    device = get_device()
    status = cuda_status()
    info = {
        "device": str(device),
        "dtype": str(get_dtype()),
        "requested": os.environ.get("BACKPROP_DEVICE", "auto"),
        "fallback_reason": _default["fallback_reason"],
        "kernels": kernels.backend_name(device.kind),
        "kernels_requested": kernels.get_choice(),
        "cupy": status["cupy_version"] or "not installed",
        "cuda_available": status["available"],
        "cuda_reason": status["reason"],
        "cuda_devices": status["names"],
        "numba": _version_of("numba"),
        "numba_cuda": _version_of("numba_cuda"),
        "numpy": np.__version__,
    }
    if mixed_precision:
        from backprop import precision

        info["mixed_precision"] = {f"{name} on {where}": text
                                   for name, row in precision.describe().items()
                                   for where, text in row.items()}
    return info


def _version_of(module: str) -> str:
    """The installed version of ``module``, or why there is none (never raises: ``info``
    reports it on a broken installation too)."""
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not importable"
    from importlib import metadata

    for dist in (module.replace("_", "-"), module):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "installed"
