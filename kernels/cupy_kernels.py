"""CuPy backend: every op of the registry as a CuPy ``ElementwiseKernel`` or ``RawModule``.

The kernels are *data*: :data:`ELEMENTWISE` (name, parameters, body, preamble) and
:data:`RAW_MODULES` (templated CUDA C++ source, kernel names) are declared once, below, as
plain strings; importing this module needs neither a GPU nor a compiler. The ``cupy``
kernel objects are created on first use (:func:`elementwise_kernel`, :func:`raw_kernel`), and
CuPy compiles each one at its first launch per device (then from its disk cache). Every
hyperparameter (lr, betas, eps, alpha, scale, dropout key and threshold, ...) is a kernel
*argument*, so changing a learning rate never recompiles. ``T`` is float32 or float64: CuPy's
type placeholder in the elementwise kernels, a template parameter (both instantiated) in the
raw modules; literal constants are cast to ``T``; sums are accumulated in float64.

    op                   kernel(s)
    bias_act_forward     ElementwiseKernel per activation: no bias | bias (bias and Z ← Z + b
                         where σ' needs Z)
    bias_act_backward    RawModule per activation: δ and the column sums of δ in one pass
                         (+ ElementwiseKernel ``bp_bias_grad_finalize`` on tall batches)
    softmax_*            RawModule ``bp_softmax``: one block per row, shared-memory max/sum
    sgd/rmsprop/adam/    ElementwiseKernels over (flat) parameter buffers; a None state
    adagrad_step         buffer selects the kernel variant without it
    dropout              ElementwiseKernel: the counter hash of reference.dropout
    batchnorm_*          RawModule ``bp_batchnorm``: one block per 32-feature strip

Bias gradient of the backward epilogue: one RawKernel reads ``dA`` and ``σ'``'s input once,
writes δ and reduces each column strip (32 columns × 8 row lanes per block, coalesced rows)
in float64. A batch of at most ``_BIAS_ROWS_PER_BLOCK`` rows is one block row, which writes
``∂b`` itself: one launch. A taller batch is split over up to ``4 × SMs / strips`` block
rows, each writing its float64 partial sums to a workspace, and a small elementwise kernel
adds the partials per column. Partials rather than atomics keep the sum deterministic (same
bits every run) and in float64 whatever ``T`` is; the extra launch reads only G × M numbers.

All 2-D arguments of the raw kernels must be C-contiguous (checked, with the fix named).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import reference
from .activations import cuda_source
from .reference import ACTIVATIONS, NEEDS_Z

# ---------------------------------------------------------------------------------------
# Activations as CUDA device functions (templated on T, usable from both kinds of kernel)
def activation_source(act: str) -> str:
    """CUDA source of ``bp_activate<T>`` and ``bp_derivative<T>`` for one activation, printed
    from its record's formulas (``kernels/activations.py``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return cuda_source(act)


def _cuda_source(name: str, **constants) -> str:
    """The CUDA C++ of ``kernels/cuda/<name>`` (package data, so that it is read, diffed
    and highlighted as C++), with each ``constants`` name replaced by its value."""
    text = resources.files(__package__).joinpath("cuda", name).read_text(encoding="utf-8")
    for key, value in constants.items():
        text = text.replace(key, str(value))
    return text


# ---------------------------------------------------------------------------------------
# Kernel declarations
@dataclass(frozen=True)
class ElementwiseSpec:
    """One ``cupy.ElementwiseKernel``: ``scalars`` names the in-params passed as scalars
    (the others are arrays; ``raw`` ones are 1-D and indexed explicitly)."""

    name: str
    in_params: str
    out_params: str
    operation: str
    scalars: tuple[str, ...] = ()
    preamble: str = ""


@dataclass(frozen=True)
class RawModuleSpec:
    """One ``cupy.RawModule`` of ``template <typename T>`` kernels, each instantiated for
    float and double (``name_expressions``)."""

    name: str
    code: str
    kernels: tuple[str, ...]
    options: tuple[str, ...] = ()

    @property
    def name_expressions(self) -> tuple[str, ...]:
        return tuple(f"{k}<{c}>" for k in self.kernels for c in ("float", "double"))


def _forward_specs(act: str) -> list[ElementwiseSpec]:
    pre = activation_source(act)
    plain = ElementwiseSpec(f"bp_act_{act}", "T z, T alpha", "T a",
                            "a = bp_activate<T>(z, alpha)", ("alpha",), pre)
    if act in NEEDS_Z:  # with a bias, also keeps the pre-activation for the backward pass
        return [plain, ElementwiseSpec(
            f"bp_bias_act_keep_z_{act}", "raw T b, int64 m, T alpha", "T z, T a",
            "const T pre = z + b[i % m];\nz = pre;\na = bp_activate<T>(pre, alpha)",
            ("m", "alpha"), pre)]
    return [plain, ElementwiseSpec(
        f"bp_bias_act_{act}", "T z, raw T b, int64 m, T alpha", "T a",
        "a = bp_activate<T>(z + b[i % m], alpha)", ("m", "alpha"), pre)]


_OPTIMIZER_SPECS = [
    # d = g + λp (λ = 0 leaves g untouched, as in the reference, even for p = ±inf)
    ElementwiseSpec(
        "bp_sgd", "T g, T lr, T weight_decay", "T p",
        "const T d = weight_decay != T(0) ? g + weight_decay * p : g;\np = p - lr * d",
        ("lr", "weight_decay")),
    ElementwiseSpec(
        "bp_sgd_momentum",
        "T g, T lr, T momentum, T one_minus_dampening, T weight_decay, int32 nesterov, "
        "int32 first_step", "T p, T buf",
        "const T d = weight_decay != T(0) ? g + weight_decay * p : g;\n"
        "const T v = first_step ? d : buf * momentum + one_minus_dampening * d;\n"
        "buf = v;\n"
        "p = p - lr * (nesterov ? d + momentum * v : v)",
        ("lr", "momentum", "one_minus_dampening", "weight_decay", "nesterov", "first_step")),
]

_RMSPROP_IN = "T g, T lr, T alpha, T one_minus_alpha, T eps, T weight_decay, T momentum"
_RMSPROP_SCALARS = ("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum")


def _rmsprop_spec(centered: bool, momentum: bool) -> ElementwiseSpec:
    outs = ["T p", "T square_avg"] + (["T grad_avg"] if centered else []) + (
        ["T buf"] if momentum else [])
    body = ["const T d = weight_decay != T(0) ? g + weight_decay * p : g;",
            "square_avg = square_avg * alpha + one_minus_alpha * d * d;"]
    if centered:
        body += ["grad_avg = grad_avg + one_minus_alpha * (d - grad_avg);",
                 "const T avg = sqrt(square_avg - grad_avg * grad_avg) + eps;"]
    else:
        body += ["const T avg = sqrt(square_avg) + eps;"]
    if momentum:
        body += ["buf = buf * momentum + d / avg;", "p = p - lr * buf"]
    else:
        body += ["p = p - lr * (d / avg)"]
    name = "bp_rmsprop" + ("_centered" if centered else "") + ("_momentum" if momentum else "")
    return ElementwiseSpec(name, _RMSPROP_IN, ", ".join(outs), "\n".join(body),
                           _RMSPROP_SCALARS)


def _adam_spec(amsgrad: bool) -> ElementwiseSpec:
    # decay = 1 - lr λ (AdamW) or 1; l2 = λ (Adam) or 0; step_size = lr / (1 - β1ᵗ)
    outs = "T p, T exp_avg, T exp_avg_sq" + (", T max_exp_avg_sq" if amsgrad else "")
    second = "exp_avg_sq"
    body = ["p = p * decay;",
            "const T d = l2 != T(0) ? g + l2 * p : g;",
            "exp_avg = exp_avg + one_minus_beta1 * (d - exp_avg);",
            "exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * d * d;"]
    if amsgrad:  # NaN-propagating max, as xp.maximum
        body += ["max_exp_avg_sq = (exp_avg_sq > max_exp_avg_sq || exp_avg_sq != exp_avg_sq)"
                 " ? exp_avg_sq : max_exp_avg_sq;"]
        second = "max_exp_avg_sq"
    body += [f"const T denom = sqrt({second}) / bias2_sqrt + eps;",
             "p = p - step_size * (exp_avg / denom)"]
    return ElementwiseSpec(
        "bp_adam" + ("_amsgrad" if amsgrad else ""),
        "T g, T decay, T l2, T one_minus_beta1, T beta2, T one_minus_beta2, T step_size, "
        "T bias2_sqrt, T eps", outs, "\n".join(body),
        ("decay", "l2", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size",
         "bias2_sqrt", "eps"))


_OPTIMIZER_SPECS += [_rmsprop_spec(c, m) for c in (False, True) for m in (False, True)]
_OPTIMIZER_SPECS += [_adam_spec(False), _adam_spec(True)]
_OPTIMIZER_SPECS += [ElementwiseSpec(
    "bp_adagrad", "T g, T clr, T eps, T weight_decay", "T p, T state_sum",
    "const T d = weight_decay != T(0) ? g + weight_decay * p : g;\n"
    "state_sum = state_sum + d * d;\n"
    "p = p - clr * (d / (sqrt(state_sum) + eps))", ("clr", "eps", "weight_decay"))]

_DROPOUT_SPEC = ElementwiseSpec(
    # keep element i iff mix32((i·φ) ^ key) >> 8 >= threshold (reference.dropout), in uint32
    "bp_dropout", "T x, uint32 key, uint32 threshold, T scale", "T y",
    f"unsigned int h = ((unsigned int)i * {reference.GOLDEN32:#x}u) ^ key;\n"
    "h ^= h >> 16;\nh *= 0x7feb352du;\nh ^= h >> 15;\nh *= 0x846ca68bu;\nh ^= h >> 16;\n"
    "y = (h >> 8) >= threshold ? x * scale : T(0)", ("key", "threshold", "scale"))

_BIAS_GRAD_FINALIZE_SPEC = ElementwiseSpec(
    # db_j = Σ_g partial[g, j] (float64), cast to T, added to db when accumulating
    "bp_bias_grad_finalize", "raw float64 partial, int32 groups, int64 m, int32 accumulate",
    "T db",
    "double s = 0.0;\n"
    "for (int k = 0; k < groups; ++k) s += partial[k * m + i];\n"
    "db = accumulate ? T(db + T(s)) : T(s)", ("groups", "m", "accumulate"))

#: Every elementwise kernel, by name.
ELEMENTWISE: dict[str, ElementwiseSpec] = {
    s.name: s for s in (
        [spec for act in ACTIVATIONS for spec in _forward_specs(act)]
        + _OPTIMIZER_SPECS + [_DROPOUT_SPEC, _BIAS_GRAD_FINALIZE_SPEC])
}

# Block-level reductions shared by the raw modules (blockDim.x a multiple of 32, ≤ 1024).
_BLOCK_REDUCE = _cuda_source("block_reduce.cuh")

_SOFTMAX_CODE = _BLOCK_REDUCE + _cuda_source("softmax.cu")

_STRIP = 32        # columns per block of the column-strip kernels (one warp, coalesced)
_BIAS_LANES = 8    # row lanes per block of the bias-gradient kernel
_BN_LANES = 16     # row lanes per block of the batch-norm kernels

_BIAS_BACKWARD_CODE = _cuda_source("bias_act_backward.cu", LANES=_BIAS_LANES, STRIP=_STRIP)

_BATCHNORM_CODE = _cuda_source("batchnorm.cu", LANES=_BN_LANES, STRIP=_STRIP)

#: Every raw module, by name.
RAW_MODULES: dict[str, RawModuleSpec] = {
    s.name: s for s in (
        [RawModuleSpec(f"bp_bias_act_backward_{act}",
                       activation_source(act) + _BIAS_BACKWARD_CODE,
                       ("bp_bias_act_backward",)) for act in ACTIVATIONS]
        + [RawModuleSpec("bp_softmax", _SOFTMAX_CODE,
                         ("bp_softmax_forward", "bp_softmax_backward", "bp_softmax_xent")),
           RawModuleSpec("bp_batchnorm", _BATCHNORM_CODE,
                         ("bp_batchnorm_forward", "bp_batchnorm_backward"))])
}

# ---------------------------------------------------------------------------------------
# Lazy creation of the cupy kernel objects
_elementwise: dict = {}
_modules: dict = {}
_functions: dict = {}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def elementwise_kernel(name: str):
    """The ``cupy.ElementwiseKernel`` of :data:`ELEMENTWISE` ``[name]`` (created once; CuPy
    compiles it at its first launch)."""
    kernel = _elementwise.get(name)
    if kernel is None:
        import cupy

        spec = ELEMENTWISE[name]
        kernel = cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.operation,
                                        spec.name, preamble=spec.preamble)
        _elementwise[name] = kernel
    return kernel


def raw_module(name: str):
    """The ``cupy.RawModule`` of :data:`RAW_MODULES` ``[name]`` (created once, compiled at
    the first :meth:`get_function`)."""
    module = _modules.get(name)
    if module is None:
        import cupy

        spec = RAW_MODULES[name]
        module = cupy.RawModule(code=spec.code, options=spec.options,
                                name_expressions=spec.name_expressions)
        _modules[name] = module
    return module


def raw_kernel(module: str, kernel: str, dtype):
    """The ``cupy.RawKernel`` ``kernel<T>`` of a raw module, for ``dtype`` = float32|float64."""
    key = (module, kernel, dtype)
    fn = _functions.get(key)
    if fn is None:
        fn = raw_module(module).get_function(f"{kernel}<{_ctype(dtype)}>")
        _functions[key] = fn
    return fn


def _ctype(dtype) -> str:
    ctype = _CTYPES.get(np.dtype(dtype))
    if ctype is None:
        raise TypeError(f"CuPy kernels take float32 or float64 arrays, got {np.dtype(dtype)}: "
                        "cast the arrays with .astype(cupy.float32)")
    return ctype


def _require_c_contiguous(**arrays) -> None:
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous, got an array with strides "
                             f"{a.strides} and shape {a.shape}: pass cupy.ascontiguousarray"
                             f"({name})")


_sm_counts: dict = {}
_workspaces = threading.local()  # .cache: {(device, stream): workspace}, one per thread


def _sm_count() -> int:
    import cupy

    device = cupy.cuda.Device()
    count = _sm_counts.get(device.id)
    if count is None:
        count = _sm_counts[device.id] = int(device.attributes["MultiProcessorCount"])
    return count


def _workspace(size: int):
    """A float64 scratch vector of at least ``size`` elements, reused by every call of this
    thread on the current device and stream: kernels on one stream run in the order they
    were queued, so a thread's next call cannot overwrite it before its last one has read
    it. Another thread (or stream) would queue between the two launches of a call that
    uses it, hence one per thread and stream."""
    import cupy

    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    cache = vars(_workspaces).setdefault("cache", {})
    ws = cache.get(key)
    if ws is None or ws.size < size:
        ws = cache[key] = cupy.empty(max(size, 4096), dtype=cupy.float64)
    return ws


def _row_block(c: int) -> int:
    """Threads per row of the softmax kernels: a power of two in [32, 256] covering ``c``."""
    return min(256, max(32, 1 << max(0, c - 1).bit_length()))


# ---------------------------------------------------------------------------------------
# The ops (signatures and semantics of kernels/reference.py)
def bias_act_forward(z, b, out, act: str, alpha: float = 0.0):
    """``out = σ(z + b)``, and ``z ← z + b`` for NEEDS_Z activations (one elementwise pass;
    ``b[i % M]`` is the bias of column ``i % M``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    alpha = float(alpha)
    if b is None:
        elementwise_kernel(f"bp_act_{act}")(z, alpha, out)
    elif act in NEEDS_Z:
        elementwise_kernel(f"bp_bias_act_keep_z_{act}")(b, z.shape[-1], alpha, z, out)
    else:
        elementwise_kernel(f"bp_bias_act_{act}")(z, b, z.shape[-1], alpha, out)
    return out


_BIAS_ROWS_PER_BLOCK = 256  # rows one block row of bp_bias_act_backward handles at least


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False):
    """``δ = dA ⊙ σ'(a or z)`` and ``∂b = Σ_rows δ`` (float64 sums) in one pass over the
    batch; see the module docstring for the block layout."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    s = z if act in NEEDS_Z else a
    if s is None:
        which = "z (the pre-activation)" if act in NEEDS_Z else "a (the activation output)"
        raise ValueError(f"bias_act_backward({act!r}) needs {which}, got None")
    n, m = da.shape
    _require_c_contiguous(da=da, **{"a" if s is a else "z": s}, delta_out=delta_out)
    want_db = db_out is not None
    if da.size == 0:
        if want_db and not accumulate:
            db_out.fill(0)
        return delta_out
    strips = -(-m // _STRIP)
    groups = 1
    if want_db:
        groups = max(1, min(-(-n // _BIAS_ROWS_PER_BLOCK), 4 * _sm_count() // strips, 65535))
    partial = _workspace(groups * m if groups > 1 else 1)  # read only when groups > 1
    kernel = raw_kernel(f"bp_bias_act_backward_{act}", "bp_bias_act_backward", da.dtype)
    t = da.dtype.type
    kernel((strips, groups), (_STRIP, _BIAS_LANES),
           (da, s, t(alpha), delta_out, partial, db_out if want_db else delta_out,
            np.int64(n), np.int64(m), np.int32(want_db), np.int32(bool(accumulate))))
    if groups > 1:
        elementwise_kernel("bp_bias_grad_finalize")(partial, groups, m, int(bool(accumulate)),
                                                    db_out)
    return delta_out


def softmax_forward(x, out):
    """Row softmax ``exp(x - max) / Σ exp(x - max)``: one block per row."""
    _require_c_contiguous(x=x, out=out)
    n, c = x.shape
    if x.size:
        raw_kernel("bp_softmax", "bp_softmax_forward", x.dtype)(
            (n,), (_row_block(c),), (x, out, np.int64(c)))
    return out


def softmax_backward(dy, y, out):
    """``dx = y ⊙ (dy - Σ_k dy_k y_k)`` per row: one block per row."""
    _require_c_contiguous(dy=dy, y=y, out=out)
    n, c = dy.shape
    if dy.size:
        raw_kernel("bp_softmax", "bp_softmax_backward", dy.dtype)(
            (n,), (_row_block(c),), (dy, y, out, np.int64(c)))
    return out


def softmax_xent(logits, labels, smoothing: float, scale: float, grad_out, loss_out):
    """Per-row loss ``(1-ε)(lse - z_y) - ε/C (Σ z - C lse)`` and ``grad = scale (softmax - y)``
    in one block per row (labels read as int64)."""
    import cupy

    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    _require_c_contiguous(logits=logits, grad_out=grad_out, loss_out=loss_out)
    n, c = logits.shape
    if logits.size:
        t = logits.dtype.type
        raw_kernel("bp_softmax", "bp_softmax_xent", logits.dtype)(
            (n,), (_row_block(c),),
            (logits, labels, t(smoothing / c), t(1.0 - smoothing), t(scale),
             np.float64(smoothing), grad_out, loss_out, np.int64(c)))
    return loss_out


def sgd_step(p, g, buf, lr, momentum, dampening, nesterov, weight_decay, first_step):
    """SGD of reference.sgd_step in one elementwise pass (variant without ``buf`` when μ = 0)."""
    if momentum:
        if buf is None:
            raise ValueError("sgd_step with momentum needs its buffer, got buf=None")
        elementwise_kernel("bp_sgd_momentum")(
            g, float(lr), float(momentum), 1.0 - dampening, float(weight_decay),
            int(bool(nesterov)), int(bool(first_step)), p, buf)
    else:
        elementwise_kernel("bp_sgd")(g, float(lr), float(weight_decay), p)


def rmsprop_step(p, g, square_avg, buf, grad_avg, lr, alpha, eps, weight_decay, momentum,
                 centered):
    """RMSprop of reference.rmsprop_step in one elementwise pass; the variant follows which of
    ``grad_avg`` (centered) and ``buf`` (momentum) are used."""
    name = "bp_rmsprop" + ("_centered" if centered else "") + ("_momentum" if momentum else "")
    states = [square_avg] + ([grad_avg] if centered else []) + ([buf] if momentum else [])
    if any(state is None for state in states):
        raise ValueError("rmsprop_step needs grad_avg when centered and buf when momentum "
                         f"≠ 0 (centered={centered}, momentum={momentum}), got None")
    elementwise_kernel(name)(g, float(lr), float(alpha), 1.0 - alpha, float(eps),
                             float(weight_decay), float(momentum), p, *states)


def adam_step(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """Adam/AdamW of reference.adam_step in one elementwise pass; the bias corrections are
    computed on the host (``step_size = lr / (1 - β1ᵗ)``); the amsgrad variant when ``vmax``."""
    decay = 1.0 - lr * weight_decay if (weight_decay and decoupled) else 1.0
    l2 = 0.0 if decoupled else float(weight_decay)
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    args = (g, decay, l2, 1.0 - beta1, float(beta2), 1.0 - beta2, lr / bias1, bias2_sqrt,
            float(eps), p, m, v)
    if vmax is None:
        elementwise_kernel("bp_adam")(*args)
    else:
        elementwise_kernel("bp_adam_amsgrad")(*args, vmax)


def adagrad_step(p, g, state_sum, lr, lr_decay, eps, weight_decay, step):
    """Adagrad of reference.adagrad_step; ``clr = lr / (1 + (t - 1) η)`` computed on the host."""
    clr = lr / (1.0 + (step - 1) * lr_decay)
    elementwise_kernel("bp_adagrad")(g, float(clr), float(eps), float(weight_decay), p,
                                     state_sum)


def dropout(x, key: int, threshold: int, scale: float, out):
    """``out_i = x_i · scale`` if ``mix32((i·φ) ^ key) >> 8 >= threshold`` else 0: the mask of
    reference.dropout, bit for bit (uint32 arithmetic on the flat C-order index)."""
    elementwise_kernel("bp_dropout")(x, np.uint32(key), np.uint32(threshold), float(scale),
                                     out)
    return out


def batchnorm_forward(x, gamma, beta, eps, out, mean_out, var_out, invstd_out):
    """Training-mode batch norm of reference.batchnorm_forward: mean, biased variance (two
    passes, float64 sums) and ``γ x̂ + β`` in one launch, one block per 32 features."""
    _require_c_contiguous(x=x, out=out, gamma=gamma, beta=beta, mean_out=mean_out,
                          var_out=var_out, invstd_out=invstd_out)
    n, m = x.shape
    if m:
        raw_kernel("bp_batchnorm", "bp_batchnorm_forward", x.dtype)(
            (-(-m // _STRIP),), (_STRIP, _BN_LANES),
            (x, gamma, beta, x.dtype.type(eps), out, mean_out, var_out, invstd_out,
             np.int64(n), np.int64(m)))
    return out


def batchnorm_backward(dy, x, gamma, mean, invstd, dx_out, dgamma_out, dbeta_out,
                       accumulate=False):
    """reference.batchnorm_backward: x̂ recomputed from ``x``, ``∂β, ∂γ`` column sums
    (float64) and ``dx = γ r / N (N dy - ∂β - x̂ ∂γ)`` in one launch, one block per 32
    features."""
    _require_c_contiguous(dy=dy, x=x, gamma=gamma, mean=mean, invstd=invstd, dx_out=dx_out,
                          dgamma_out=dgamma_out, dbeta_out=dbeta_out)
    n, m = dy.shape
    if m:
        raw_kernel("bp_batchnorm", "bp_batchnorm_backward", dy.dtype)(
            (-(-m // _STRIP),), (_STRIP, _BN_LANES),
            (dy, x, gamma, mean, invstd, dx_out, dgamma_out, dbeta_out, np.int64(n),
             np.int64(m), np.int32(bool(accumulate))))
    return dx_out
