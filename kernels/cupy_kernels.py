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
                         where σ' needs Z); each also with a low-precision copy of A
    bias_act_backward    RawModule per activation: δ and the column sums of δ in one pass
                         (+ ElementwiseKernel ``bp_bias_grad_finalize`` on tall batches); a
                         RawModule per activation and format with a low-precision copy of δ
    softmax_*            RawModule ``bp_softmax``: one block per row, shared-memory max/sum
    sgd/rmsprop/adam/    ElementwiseKernel per variant over (flat) parameter buffers, its
    adagrad_step         body printed from the record's formula (kernels/optimizers.py); a
                         None state buffer selects the variant without it; each variant also
                         with a low-precision copy of the new parameters
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

Low-precision copies (mixed precision, ``kernels/lowp.py``): given ``out_lp``, ``delta_lp``
or ``data_lp``, an op launches its kernel's low-precision variant, which also stores
``bp_lowp_bits(x)`` of each float32 value ``x`` it stores, in the same pass. Both formats are
written as ``uint16`` bits (a float16 array is passed as its ``uint16`` view), so one kernel
source serves both; only ``bp_lowp_bits`` differs (:data:`LOWP_BITS`): the integer formula
of ``kernels.lowp.CUDA_BF16_BITS`` for bfloat16 (bitwise equal to the CPU, NaN payloads
included, where ``__float2bfloat16_rn`` makes every NaN canonical), ``__float2half_rn`` for
float16. The variants are separate kernels (suffix ``_bf16`` / ``_f16``), so the float32-only
ones are unchanged, and only float32 data has a low-precision copy (checked before the
launch by ``reference.check_lowp``): their ``double`` instantiations are compiled with the
rest but never launched.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import reference
from .activations import cuda_source
from .lowp import CUDA_BF16_BITS, lowp_kind
from .optimizers import RECORDS as OPTIMIZERS
from .optimizers import cuda_update, entry_point
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
# Low-precision copies: bp_lowp_bits(float) -> unsigned short, per format
LOWP_SUFFIX = {"bfloat16": "bf16", "float16": "f16"}
"""The kernel-name suffix of each low-precision format's variants."""

LOWP_BITS = {
    "bfloat16": CUDA_BF16_BITS + (
        "__device__ __forceinline__ unsigned short bp_lowp_bits(float x) {\n"
        "    return backprop_bf16_bits(x);\n}\n"),
    # cuda_fp16.h only here: the bf16 and float32 kernels compile without the CUDA headers
    "float16": (
        "#include <cuda_fp16.h>\n"
        "// IEEE binary16, round to nearest even; a NaN stays a NaN (its payload is the GPU's)\n"
        "__device__ __forceinline__ unsigned short bp_lowp_bits(float x) {\n"
        "    return __half_as_ushort(__float2half_rn(x));\n}\n"),
}
"""CUDA C++ of ``bp_lowp_bits``, the bits of a float32's low-precision copy, per format."""


def _lowp_bits(op: str, name: str, out, source, *others):
    """``out`` checked as the low-precision copy of ``source`` overlapping none of the call's
    ``others`` (``reference.check_lowp``, so every backend refuses the same buffers), and
    ``(suffix of its format's kernels, out as uint16 bits)``."""
    reference.check_lowp(op, name, out, source, *others)
    kind = lowp_kind(out)
    return LOWP_SUFFIX[kind], out if kind == "bfloat16" else out.view(np.uint16)


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


def _with_lowp_copy(spec: ElementwiseSpec, output: str, kind: str) -> ElementwiseSpec:
    """``spec``'s low-precision variant: also the out parameter ``uint16 <output>_lp``,
    assigned the bits of ``output`` after ``spec``'s body has stored it (read back from the
    output reference: exactly the float32 value stored)."""
    return ElementwiseSpec(
        f"{spec.name}_{LOWP_SUFFIX[kind]}", spec.in_params,
        f"{spec.out_params}, uint16 {output}_lp",
        f"{spec.operation.rstrip().rstrip(';')};\n{output}_lp = bp_lowp_bits({output})",
        spec.scalars, spec.preamble + LOWP_BITS[kind])


def _optimizer_spec(record, present) -> ElementwiseSpec:
    """The ElementwiseKernel of one variant of an optimizer record (``kernels/optimizers.py``):
    ``g``, the scalars (``T``) and the flags (``int32``) in, ``p`` and the kept states out
    (updated in place), its body printed from the record's formula."""
    ins = ["T g"] + [f"T {s}" for s in record.scalars] + [f"int32 {f}" for f in record.flags]
    outs = ["T p"] + [f"T {s}" for s, kept in zip(record.states, present) if kept]
    return ElementwiseSpec(f"bp_{record.variant_name(present)}", ", ".join(ins), ", ".join(outs),
                           cuda_update(record, present), record.scalars + record.flags)


_OPTIMIZER_SPECS = [_optimizer_spec(record, present) for record in OPTIMIZERS.values()
                    for present in record.variants]
_FORWARD_SPECS = [spec for act in ACTIVATIONS for spec in _forward_specs(act)]
_LOWP_SPECS = [_with_lowp_copy(spec, output, kind) for kind in LOWP_SUFFIX
               for specs, output in ((_FORWARD_SPECS, "a"), (_OPTIMIZER_SPECS, "p"))
               for spec in specs]

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
        _FORWARD_SPECS + _OPTIMIZER_SPECS + [_DROPOUT_SPEC, _BIAS_GRAD_FINALIZE_SPEC]
        + _LOWP_SPECS)
}

# Block-level reductions shared by the raw modules (blockDim.x a multiple of 32, ≤ 1024).
_BLOCK_REDUCE = _cuda_source("block_reduce.cuh")

_SOFTMAX_CODE = _BLOCK_REDUCE + _cuda_source("softmax.cu")

_STRIP = 32        # columns per block of the column-strip kernels (one warp, coalesced)
_BIAS_LANES = 8    # row lanes per block of the bias-gradient kernel
_BN_LANES = 16     # row lanes per block of the batch-norm kernels

_BIAS_BACKWARD_CODE = _cuda_source("bias_act_backward.cu", LANES=_BIAS_LANES, STRIP=_STRIP)
_BIAS_BACKWARD_LOWP_CODE = _cuda_source("bias_act_backward_lowp.cu", LANES=_BIAS_LANES,
                                        STRIP=_STRIP)

_BATCHNORM_CODE = _cuda_source("batchnorm.cu", LANES=_BN_LANES, STRIP=_STRIP)

#: Every raw module, by name.
RAW_MODULES: dict[str, RawModuleSpec] = {
    s.name: s for s in (
        [RawModuleSpec(f"bp_bias_act_backward_{act}",
                       activation_source(act) + _BIAS_BACKWARD_CODE,
                       ("bp_bias_act_backward",)) for act in ACTIVATIONS]
        + [RawModuleSpec(f"bp_bias_act_backward_{suffix}_{act}",
                         LOWP_BITS[kind] + activation_source(act) + _BIAS_BACKWARD_CODE
                         + _BIAS_BACKWARD_LOWP_CODE, ("bp_bias_act_backward_lowp",))
           for kind, suffix in LOWP_SUFFIX.items() for act in ACTIVATIONS]
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
def bias_act_forward(z, b, out, act: str, alpha: float = 0.0, out_lp=None):
    """``out = σ(z + b)``, and ``z ← z + b`` for NEEDS_Z activations (one elementwise pass;
    ``b[i % M]`` is the bias of column ``i % M``); with ``out_lp``, also ``out_lp ←
    lowp(out)`` in the same pass (the kernel's ``_bf16``/``_f16`` variant)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    alpha = float(alpha)
    reference.check_shape("bias_act_forward", z.shape, out=out)
    reference.check_shape("bias_act_forward", z.shape[-1:], b=b)
    suffix, lowp = "", ()
    if out_lp is not None:
        suffix, bits = _lowp_bits("bias_act_forward", "out_lp", out_lp, out, z, b)
        suffix, lowp = f"_{suffix}", (bits,)
    if b is None:
        elementwise_kernel(f"bp_act_{act}{suffix}")(z, alpha, out, *lowp)
    elif act in NEEDS_Z:
        elementwise_kernel(f"bp_bias_act_keep_z_{act}{suffix}")(b, z.shape[-1], alpha, z, out,
                                                                *lowp)
    else:
        elementwise_kernel(f"bp_bias_act_{act}{suffix}")(z, b, z.shape[-1], alpha, out, *lowp)
    return out


_BIAS_ROWS_PER_BLOCK = 256  # rows one block row of bp_bias_act_backward handles at least


def bias_act_backward(da, a, z, act: str, alpha, delta_out, db_out=None, accumulate=False,
                      delta_lp=None):
    """``δ = dA ⊙ σ'(a or z)`` and ``∂b = Σ_rows δ`` (float64 sums) in one pass over the
    batch; see the module docstring for the block layout. With ``delta_lp``, also ``delta_lp
    ← lowp(δ)`` in the same pass (the module ``bp_bias_act_backward_<bf16|f16>_<act>``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    s = z if act in NEEDS_Z else a
    if s is None:
        which = "z (the pre-activation)" if act in NEEDS_Z else "a (the activation output)"
        raise ValueError(f"bias_act_backward({act!r}) needs {which}, got None")
    n, m = da.shape
    source = {"a" if s is a else "z": s}
    reference.check_shape("bias_act_backward", da.shape, **source, delta_out=delta_out)
    reference.check_shape("bias_act_backward", (m,), db_out=db_out)
    _require_c_contiguous(da=da, **source, delta_out=delta_out)
    if delta_lp is not None:
        suffix, bits = _lowp_bits("bias_act_backward", "delta_lp", delta_lp, delta_out, da, a,
                                  z, db_out)
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
    t = da.dtype.type
    tail = (partial, db_out if want_db else delta_out, np.int64(n), np.int64(m),
            np.int32(want_db), np.int32(bool(accumulate)))
    if delta_lp is None:
        kernel = raw_kernel(f"bp_bias_act_backward_{act}", "bp_bias_act_backward", da.dtype)
        kernel((strips, groups), (_STRIP, _BIAS_LANES), (da, s, t(alpha), delta_out) + tail)
    else:
        kernel = raw_kernel(f"bp_bias_act_backward_{suffix}_{act}", "bp_bias_act_backward_lowp",
                            da.dtype)
        kernel((strips, groups), (_STRIP, _BIAS_LANES),
               (da, s, t(alpha), delta_out, bits) + tail)
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


def _optimizer_op(record):
    """The op of an optimizer record: one ElementwiseKernel launch over ``p`` and its kept
    states; the kernel variant follows which states the call keeps, and whether it writes
    ``data_lp ← lowp(p)`` (the ``_bf16``/``_f16`` variant)."""
    names = {present: f"bp_{record.variant_name(present)}" for present in record.variants}

    def run(p, g, states, scalars, flags, data_lp=None):
        kept = [s for s in states if s is not None]
        name = names[tuple(s is not None for s in states)]
        if data_lp is None:
            elementwise_kernel(name)(g, *scalars, *map(int, flags), p, *kept)
        else:
            suffix, bits = _lowp_bits(record.op, "data_lp", data_lp, p, g, *kept)
            elementwise_kernel(f"{name}_{suffix}")(g, *scalars, *map(int, flags), p, *kept,
                                                    bits)

    return entry_point(record, run, f"reference.{record.op} in one elementwise pass, from "
                       f"the formula of kernels/optimizers.py ({record.name!r}).")


globals().update({record.op: _optimizer_op(record) for record in OPTIMIZERS.values()})


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
