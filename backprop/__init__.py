"""backprop: neural networks trained by explicit backpropagation on NumPy or CuPy."""
from backprop import (activations, callbacks, clip, concurrency, data, distributed, init,
                      layers, losses, metrics, optim, regularizers, schedules, training)
from backprop.activations import GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from backprop.backend import (
    Device, DeviceUnavailableError, asarray, device_info, get_array_module, get_device,
    get_dtype, get_xp, set_device, set_dtype, to_numpy, use_device,
)
from backprop.clip import clip_grad_norm, clip_grad_value, grad_norm
from backprop.concurrency import ConcurrentTrainingError, inference_mode
from backprop.data import DataError
from backprop.gradcheck import GradcheckError, gradcheck
from backprop.init import manual_seed
from backprop.io import CheckpointError, load, load_checkpoint, save
from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Layer, Residual, SyncBatchNorm
from backprop.losses import (BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, L1Loss, MSELoss,
                             SoftmaxCrossEntropyLoss)
from backprop.model import Sequential
from backprop.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from backprop.regularizers import L1, L2, L1L2
from backprop.kernels import KernelBackendError
from backprop.training import NonFiniteLossError, evaluate, fit, predict

__version__ = "0.1.0"


def __getattr__(name):
    if name == "xp":  # the array module of the current device, looked up on every access
        return get_xp()
    raise AttributeError(f"module 'backprop' has no attribute {name!r}")
