"""backprop: neural networks trained by explicit backpropagation on NumPy or CuPy."""
from backprop.backend import (
    Device, DeviceUnavailableError, asarray, device_info, get_array_module, get_device,
    get_dtype, get_xp, set_device, set_dtype, to_numpy, use_device,
)

__version__ = "0.1.0"


def __getattr__(name):
    if name == "xp":  # the array module of the current device, looked up on every access
        return get_xp()
    raise AttributeError(f"module 'backprop' has no attribute {name!r}")
