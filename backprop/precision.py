"""Mixed precision: float32 master weights, bfloat16 or float16 matrix products.

Under ``precision="bf16-mixed"`` (or ``"fp16-mixed"``) a float32 model trains with its
parameters, gradients and optimizer state in float32 (the *master* copy, the one that is
saved), while the three matrix products of each :class:`~backprop.layers.Dense` layer take
low-precision operands and accumulate in float32::

    Z  = X₁₆ · W₁₆ᵀ        (float32 Z; the epilogue adds b, applies σ in float32 and also
                           writes A₁₆, the next layer's X₁₆, in the same pass)
    ∂W = δ₁₆ᵀ · X₁₆        (δ in float32 for ∂b; the backward epilogue writes δ₁₆ beside it)
    ∂X = δ₁₆ · W₁₆

``W₁₆`` is cast once per step, by the optimizer's update kernel in the same pass as the
float32 update (``data_lp`` of the ``*_step`` kernels). The loss, softmax, BatchNorm, the
bias gradient and the optimizer run in float32. Every bf16·bf16 (and fp16·fp16) product is
exact in float32, so the only new rounding is that of the operands to 8 (11) significant
bits; the sums stay float32.

Where the mode pays, and where it does not, is decided per product
(:meth:`Policy.lowp`): on the CPU a product runs in bf16 when it has at least
``min_macs`` multiply-adds and an inner dimension of at least ``min_inner`` (a small
product's call overhead exceeds what bf16 saves; ``docs/bf16.md`` has the measurements), so
the tiny MLP stays float32 and the wide one runs every large product in bf16. The other
products of a step read the float32 tensors, which always exist.

Switches:

- ``fit(..., precision="bf16-mixed")``, the CLI's ``--precision``, and
  ``$BACKPROP_PRECISION`` (the default of ``fit``'s ``precision``);
- ``$BACKPROP_LOWP_MIN_MACS`` and ``$BACKPROP_LOWP_MIN_INNER`` override the per-product
  thresholds (0 and 1: every product in low precision, e.g. to study a mode's accuracy);
- ``with bp.autocast("bfloat16"):`` for hand-written loops and for ``model.forward``; per
  thread, nestable (``autocast(enabled=False)`` inside turns it off). The low-precision
  weights are cast again at their first use after each entry (as PyTorch's autocast cache),
  unless the optimizer's ``step()`` inside the region wrote them.

Formats: **bfloat16** has float32's exponent range (no overflow where float32 has none, no
loss scaling needed) and 8 significant bits; **float16** has 11 significant bits but
overflows above 65504 and loses gradients below 6e-8, so ``fp16-mixed`` scales the loss
(:class:`backprop.loss_scaling.GradScaler`; ``fit`` does it by itself).

Where it runs fast: bf16 on CPUs with AMX-BF16 or AVX512-BF16 through MKL
(:func:`backprop.bf16.bf16_support`, the ``bf16`` extra), bf16 and fp16 on NVIDIA GPUs with
tensor cores through cuBLAS (:mod:`backprop.cuda_lowp`). Elsewhere a mixed mode warns once
(:class:`PrecisionFallbackWarning`) and trains in float32, unless emulation is asked for
(``$BACKPROP_LOWP_EMULATE=1``, or ``BACKPROP_BF16_GEMM=emulate`` for bf16 on the CPU): the
exact numerics, with float32 products of the rounded operands, no faster than float32, for
tests and for checking a model's accuracy in a mode before running it on hardware that has it.

Threads: the autocast state is per thread; a parameter's low-precision copy is shared by
the threads that use the model (as the weights themselves are), and is rewritten only when
stale, with the same bits by whichever thread does it.

Not covered: a write into ``param.data`` by hand inside an autocast region (the copy is not
refreshed until the next region or optimizer step; ``load_state_dict`` and the optimizers
are tracked); the compiled inference plans of ``model(x)`` and ``predict`` for small
batches (:mod:`backprop.inference`), which stay float32; float64 models (mixed precision
needs float32 master weights: an error says so).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import warnings

import numpy as np

from backprop.concurrency import _MODE

__all__ = ["PRECISIONS", "autocast", "resolve", "Policy", "PrecisionRequest",
           "PrecisionFallbackWarning", "current", "policy_for", "lowp_copy", "describe",
           "MIN_MACS", "MIN_INNER"]

PRECISIONS = ("float32", "bf16-mixed", "fp16-mixed")
"""The training precisions: ``float32`` (the model's own dtype throughout; also what a
float64 model uses), ``bf16-mixed`` and ``fp16-mixed``."""

_ALIASES = {
    "float32": "float32", "fp32": "float32", "32": "float32", "32-true": "float32",
    "full": "float32", "none": "float32",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "bfloat16": "bf16-mixed",
    "fp16-mixed": "fp16-mixed", "fp16": "fp16-mixed", "float16": "fp16-mixed",
    "16-mixed": "fp16-mixed",
}

MIN_MACS = 1 << 21
"""Default of :attr:`Policy.min_macs` on the CPU: a product with fewer multiply-adds runs
in float32. MKL's call overhead is 2-3 µs, and whole training steps decided the value
(``benchmarks/mixed_precision.py``): the digits MLP's 2²⁰-multiply-add products, faster
alone in bf16, made its step slower than float32's with their conversions; mnist's
(8-26 M) pay."""

MIN_INNER = 32
"""Default of :attr:`Policy.min_inner` on the CPU: a product whose inner (summed) dimension
is smaller runs in float32 (an output layer's ``∂X = δ·W`` with 10 classes gains nothing)."""


class PrecisionFallbackWarning(RuntimeWarning):
    """A mixed precision was asked for where it cannot run fast; training goes on in
    float32 (the message says why, and how to emulate it instead)."""


def resolve(precision) -> str:
    """The canonical name (one of :data:`PRECISIONS`) of ``precision``: a name or alias
    (``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"16-mixed"``, ``"fp32"``...), or None for
    ``$BACKPROP_PRECISION`` (default ``float32``)."""
    if precision is None:
        env = os.environ.get("BACKPROP_PRECISION", "").strip()
        if not env:
            return "float32"
        name = _ALIASES.get(env.lower())
        if name is None:
            raise ValueError(f"BACKPROP_PRECISION={env!r}: expected one of "
                             f"{', '.join(PRECISIONS)}")
        return name
    if isinstance(precision, PrecisionRequest):
        return precision.name
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string such as 'bf16-mixed'; got "
                        f"{type(precision).__name__}")
    name = _ALIASES.get(precision.strip().lower())
    if name is None:
        raise ValueError(f"unknown precision {precision!r}: expected one of "
                         f"{', '.join(PRECISIONS)} (or the aliases bf16, fp16, fp32)")
    return name


def _emulation_requested(fmt: str, kind: str) -> bool:
    flag = os.environ.get("BACKPROP_LOWP_EMULATE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if fmt == "bfloat16" and kind == "cpu":
        from backprop import bf16

        return bf16._requested() == "emulate"
    return False


# ---------------------------------------------------------------------------------------
class Policy:
    """How one precision runs on one device kind: the storage dtype of the low-precision
    copies, the product (:meth:`plan`), the conversion (:meth:`convert`) and which products
    pay (:meth:`lowp`). Made by :func:`policy_for`; immutable."""

    __slots__ = ("name", "fmt", "lp_dtype", "device", "gemm", "min_macs", "min_inner",
                 "generation_of")

    def __init__(self, name, fmt, device, gemm, min_macs, min_inner):
        self.name, self.fmt, self.device, self.gemm = name, fmt, device, gemm
        self.lp_dtype = np.dtype(np.uint16 if fmt == "bfloat16" else np.float16)
        self.min_macs, self.min_inner = int(min_macs), int(min_inner)

    def lowp(self, m: int, n: int, k: int) -> bool:
        """True when the product of an m×k and a k×n matrix should run in low precision."""
        return k >= self.min_inner and m * n * k >= self.min_macs

    def convert(self, x, out):
        """``out ← x`` (float32) in the low-precision format; returns ``out``."""
        if self.device == "cpu":
            if self.fmt == "bfloat16":
                from backprop import bf16

                return bf16.to_bf16(x, out)
            with np.errstate(over="ignore"):  # ±inf: what loss scaling looks for
                np.copyto(out, x, casting="unsafe")  # IEEE round to nearest even
            return out
        from backprop import cuda_lowp

        return cuda_lowp.to_lowp(x, out)

    def plan(self, a, b, out, trans_a=False, trans_b=False, beta=0.0):
        """A callable computing ``out = op(a)·op(b) + beta·out`` (low-precision ``a``,
        ``b``; float32 ``out``) on these arrays whenever it is called."""
        if self.gemm == "emulate":
            return _EmulatedProduct(a, b, out, trans_a, trans_b, beta)
        if self.device == "cpu":
            from backprop import bf16

            return bf16.plan_gemm_bf16(a, b, out, trans_a, trans_b, 1.0, beta, backend="mkl")
        from backprop import cuda_lowp

        planner = getattr(cuda_lowp, "plan_gemm_lowp", None)
        if planner is not None:
            return planner(a, b, out, trans_a, trans_b, 1.0, beta)
        return lambda: cuda_lowp.gemm_lowp(a, b, out, trans_a, trans_b, 1.0, beta)

    def __repr__(self):
        return (f"Policy({self.name!r} on {self.device}: {self.gemm} products of at least "
                f"{self.min_macs} multiply-adds and inner dimension {self.min_inner})")


class _EmulatedProduct:
    """The emulated low-precision product: both operands converted to float32 exactly,
    then the float32 product (NumPy or CuPy). Correct, never faster than float32."""

    __slots__ = ("a", "b", "out", "trans_a", "trans_b", "beta")

    def __init__(self, a, b, out, trans_a, trans_b, beta):
        self.a, self.b, self.out = a, b, out
        self.trans_a, self.trans_b, self.beta = trans_a, trans_b, float(beta)

    def __call__(self):
        a, b = _widen(self.a), _widen(self.b)
        a = a.T if self.trans_a else a
        b = b.T if self.trans_b else b
        xp = np if isinstance(a, np.ndarray) else _cupy()
        with np.errstate(all="ignore"):
            if self.beta == 0.0:
                xp.matmul(a, b, out=self.out)
            else:
                self.out *= np.float32(self.beta)
                self.out += xp.matmul(a, b)
        return self.out


def _cupy():
    import cupy

    return cupy


def _widen(h):
    """A low-precision array as float32, exactly."""
    if h.dtype == np.float16:
        return h.astype(np.float32)
    xp = np if isinstance(h, np.ndarray) else _cupy()
    return (h.astype(xp.uint32) << 16).view(xp.float32)


# ---------------------------------------------------------------------------------------
_GENERATIONS = itertools.count(1)
_WARNED: set = set()
_LOCK = threading.Lock()


class PrecisionRequest:
    """What an :func:`autocast` region asks for: a precision name and the thresholds, and
    the policy resolved for each device kind on first use (None where the mode falls back
    to float32). ``generation`` tells the low-precision weight copies made in this region
    from older ones."""

    __slots__ = ("name", "fmt", "min_macs", "min_inner", "emulate", "generation", "_policies")

    def __init__(self, name: str, min_macs=None, min_inner=None, emulate=None):
        self.name = resolve(name)
        if self.name == "float32":
            raise ValueError("PrecisionRequest is for the mixed precisions; float32 needs none")
        self.fmt = "bfloat16" if self.name == "bf16-mixed" else "float16"
        self.min_macs = _threshold("min_macs", min_macs)
        self.min_inner = _threshold("min_inner", min_inner)
        if emulate is not None and not isinstance(emulate, bool):
            raise TypeError(f"emulate must be True, False or None; got {emulate!r}")
        self.emulate = emulate
        self.generation = next(_GENERATIONS)
        self._policies = {}

    def refresh(self) -> None:
        """Mark every low-precision weight copy stale: each is cast again at its next use
        (after a write into the weights that the copies cannot see)."""
        self.generation = next(_GENERATIONS)

    def policy(self, like):
        """The :class:`Policy` for arrays like ``like`` (a float32 NumPy or CuPy array), or
        None where this precision falls back to float32 for them."""
        kind = "cpu" if type(like) is np.ndarray else "cuda"
        try:
            return self._policies[kind]
        except KeyError:
            pass
        policy = policy_for(self.name, kind, self.min_macs, self.min_inner, self.emulate)
        self._policies[kind] = policy
        return policy

    def __repr__(self):
        return f"PrecisionRequest({self.name!r})"


def _threshold(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 or None; got {value!r}")
    return int(value)


def policy_for(precision, device: str = "cpu", min_macs=None, min_inner=None, emulate=None):
    """The :class:`Policy` that runs ``precision`` on ``device`` ("cpu" or "cuda"), or None
    when it falls back to float32 there (warning once per process and reason with a
    :class:`PrecisionFallbackWarning`). ``emulate``: True always emulates the products (the
    mode's exact numerics, no faster than float32; on any machine), False never does, None
    emulates instead of falling back where ``$BACKPROP_LOWP_EMULATE=1`` (or, for bf16 on
    the CPU, ``BACKPROP_BF16_GEMM=emulate``)."""
    name = resolve(precision)
    if name == "float32":
        return None
    fmt = "bfloat16" if name == "bf16-mixed" else "float16"
    gemm, reason = (None, "emulation was asked for") if emulate else _fast_gemm(fmt, device)
    if gemm is None:
        if emulate or (emulate is None and _emulation_requested(fmt, device)):
            gemm = "emulate"
        else:
            key = (name, device, reason)
            with _LOCK:
                first = key not in _WARNED
                _WARNED.add(key)
            if first:
                warnings.warn(
                    f"precision={name!r} cannot run fast on this {device.upper()}: {reason}. "
                    "Training in float32 instead (set BACKPROP_LOWP_EMULATE=1 to emulate the "
                    "mode's numerics, no faster than float32)", PrecisionFallbackWarning,
                    stacklevel=4)
            return None
    if device == "cpu":
        macs, inner = MIN_MACS, MIN_INNER
    else:  # tensor cores: every product (not measured on hardware yet)
        macs, inner = 0, 1
    macs = _env_threshold("BACKPROP_LOWP_MIN_MACS", macs) if min_macs is None else min_macs
    inner = _env_threshold("BACKPROP_LOWP_MIN_INNER", inner) if min_inner is None else min_inner
    return Policy(name, fmt, device, gemm, macs, inner)


def _env_threshold(variable: str, default: int) -> int:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{variable}={text!r}: expected an integer >= 0")
    return value


_FAST: dict = {}


def _fast_gemm(fmt: str, device: str):
    """``(gemm, None)`` where ``fmt`` products run fast on ``device``, else
    ``(None, reason)``; probed once per process (the probe reads /proc/cpuinfo and loads
    MKL: tens of microseconds that every autocast region would otherwise pay)."""
    key = (fmt, device)
    found = _FAST.get(key)
    if found is None:
        found = _FAST[key] = _probe_fast_gemm(fmt, device)
    return found


def _probe_fast_gemm(fmt: str, device: str):
    if device == "cpu":
        if fmt == "float16":
            return None, ("float16 products are not wired to a CPU library (fp16-mixed is "
                          "meant for GPUs; on the CPU use bf16-mixed)")
        from backprop import bf16

        info = bf16.bf16_support()
        if info["fast"]:
            return "mkl", None
        return None, info["reason"]
    try:
        from backprop import cuda_lowp

        info = cuda_lowp.support()
    except Exception as exc:  # noqa: BLE001 - any failure means: not fast here
        return None, f"the CUDA low-precision products are unusable ({exc})"
    key = "bf16_fast" if fmt == "bfloat16" else "fp16_fast"
    if info.get(key):
        return "cublas", None
    return None, info.get("reason") or f"this GPU has no fast {fmt} products"


# ---------------------------------------------------------------------------------------
def current():
    """The calling thread's :class:`PrecisionRequest`, or None outside autocast."""
    return _MODE.autocast


@contextlib.contextmanager
def autocast(precision="bfloat16", *, enabled: bool = True, min_macs=None, min_inner=None,
             emulate=None):
    """Within, in this thread, Dense layers run their matrix products in ``precision``
    (``"bfloat16"``/``"bf16-mixed"`` or ``"float16"``/``"fp16-mixed"``, or a
    :class:`PrecisionRequest`) where it pays, with float32 master weights (see the module
    docstring). ``enabled=False`` turns a surrounding region off. ``min_macs``/``min_inner``
    override the per-product thresholds (:class:`Policy`; 0 and 1 make every product low
    precision); ``emulate`` as in :func:`policy_for`. Nestable; yields the
    :class:`PrecisionRequest` (None when disabled)."""
    before = _MODE.autocast
    if not enabled or resolve(precision) == "float32":
        request = None
    elif isinstance(precision, PrecisionRequest):
        request = precision
    else:
        request = PrecisionRequest(precision, min_macs, min_inner, emulate)
    _MODE.autocast = request
    try:
        yield request
    finally:
        _MODE.autocast = before


def lowp_copy(param, policy, request):
    """The low-precision copy of ``param.data`` for ``policy``, cast now unless the copy
    made or written in ``request``'s current generation is still there."""
    tag = param._lp_for
    data = param.data
    if tag is not None and tag[0] is data and tag[1] == request.generation:
        return param._lp
    lp = param._lp
    if lp is None or lp.shape != data.shape or lp.dtype != policy.lp_dtype or \
            type(lp) is not type(data):
        from backprop.backend import empty_aligned

        lp = param._lp = empty_aligned(np if type(data) is np.ndarray else _cupy(),
                                       data.shape, policy.lp_dtype)
    policy.convert(data, lp)
    param._lp_for = (data, request.generation)
    return lp


def describe() -> dict:
    """What each mixed precision does on this machine's CPU (and GPU where one is usable):
    ``{"bf16-mixed": {"cpu": ..., "cuda": ...}, "fp16-mixed": {...}}``, each a sentence.
    Emits no warning."""
    out = {}
    for name in PRECISIONS[1:]:
        fmt = "bfloat16" if name == "bf16-mixed" else "float16"
        row = {}
        for device in ("cpu", "cuda"):
            if device == "cuda":
                from backprop.backend import cuda_status

                status = cuda_status()
                if not status["available"]:
                    row[device] = f"no GPU: {status['reason']}"
                    continue
            gemm, reason = _fast_gemm(fmt, device)
            if gemm is not None:
                row[device] = f"fast ({gemm})"
            elif _emulation_requested(fmt, device):
                row[device] = f"emulated ({reason})"
            else:
                row[device] = f"falls back to float32 ({reason})"
        out[name] = row
    return out
