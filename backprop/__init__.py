"""backprop: neural networks trained by explicit backpropagation on NumPy or CuPy."""


def _require_installed() -> None:
    """``backprop.kernels`` is the top-level ``kernels/`` folder, mapped into the package by
    the install (pyproject's package-dir): imported from a checkout that was never installed,
    it is missing, and the import would fail deep inside with a circular-import message."""
    import importlib.util

    if importlib.util.find_spec("backprop.kernels") is None:
        from pathlib import Path

        checkout = Path(__file__).resolve().parent.parent
        raise ImportError(
            f"backprop is imported from {checkout}, a source checkout that is not installed: "
            "its kernels (the kernels/ folder) become backprop.kernels only when it is "
            f"installed. Install it first: pip install -e {checkout} (or make test / "
            "make demo, which create .venv and install it)")


_require_installed()
from backprop import (activations, callbacks, clip, concurrency, data, distributed, graph,
                      init, layers, losses, metrics, optim, regularizers, schedules, training)
from backprop.backend import (
    Device, DeviceUnavailableError, asarray, device_info, get_array_module, get_device,
    get_dtype, get_xp, set_device, set_dtype, to_numpy, use_device, to_dlpack, from_dlpack,
)
from backprop.clip import clip_grad_norm, clip_grad_value, grad_norm
from backprop.concurrency import ConcurrentTrainingError, inference_mode
from backprop.data import DataError
from backprop.explain import explain
from backprop.frozen import FrozenModel, freeze
from backprop.gradcheck import GradcheckError, gradcheck
from backprop.gradient_health import GradientHealthWarning, GradientMonitor
from backprop.init import manual_seed
from backprop.io import CheckpointError, load, load_checkpoint, save
from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Layer, Residual, SyncBatchNorm
from backprop.loss_scaling import GradScaler
from backprop.losses import (BCELoss, BCEWithLogitsLoss, CategoricalCrossEntropyLoss,
                             CrossEntropyLoss, L1Loss, MSELoss, NLLLoss, SoftmaxCrossEntropyLoss)
from backprop.model import Sequential
from backprop.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from backprop.precision import PrecisionFallbackWarning, autocast
from backprop.regularizers import L1, L2, L1L2
from backprop.schedules import (CosineAnnealingLR, ExponentialLR, LinearWarmup, LRScheduler,
                                ReduceLROnPlateau, StepLR)
from backprop.callbacks import (Callback, CSVLogger, EarlyStopping, History,
                                LearningRateScheduler, ModelCheckpoint, TerminateOnNaN)
from backprop.kernels import KernelBackendError
from backprop.training import NonFiniteLossError, evaluate, fit, predict

# the activation layers (one per record of kernels/activations.py, and GELU, Softmax)
globals().update({name: getattr(activations, name) for name in activations.__all__
                  if isinstance(getattr(activations, name), type)})  # classes, not NAMES

__version__ = "0.1.0"


def __getattr__(name):
    if name == "xp":  # the array module of the current device, looked up on every access
        return get_xp()
    raise AttributeError(f"module 'backprop' has no attribute {name!r}")
