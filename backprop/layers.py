"""Layers: each one a forward pass that caches what its backward pass needs.

A batch is a C-contiguous ``(N, features)`` array. ``forward(x)`` returns a buffer the layer
owns (reused by the next forward of the same batch size, so a training step allocates
nothing once warm); ``backward(grad)`` may overwrite ``grad``, adds the parameter gradients
into ``Parameter.grad`` and returns ``∂L/∂x`` (None with ``need_input_grad=False``).

Threads: the buffers and the tensors that ``forward`` saves for ``backward`` live in
``self._ctx``, a :class:`~backprop.concurrency.PerThread` (one copy per thread), and
``training`` is read through the per-thread :func:`~backprop.concurrency.inference_mode`
override, so any number of threads may run forward passes of one layer at once (see
:mod:`backprop.concurrency` for the whole contract).

    Dense        Z = X Wᵀ + b,  A = σ(Z)          δ = dA ⊙ σ'(Z),  ∂W = δᵀX,  ∂b = Σδ,  ∂X = δW
    Dropout      A = X ⊙ M / (1-p)                ∂X = dA ⊙ M / (1-p)
    BatchNorm1d  A = γ (X - μ)/sqrt(σ² + ε) + β    (see kernels.reference.batchnorm_backward)
    Residual     A = X + F(X)                     ∂X = dA + ∂F/∂X · dA
    Flatten      A = X.reshape(N, -1)             ∂X = dA.reshape(X.shape)
"""
from __future__ import annotations

import copy
import math
import numbers

import numpy as np

from backprop import gemm
from backprop import init as initializers
from backprop import kernels as K
from backprop.backend import aligned, asarray, get_array_module, get_dtype, to_numpy
from backprop.concurrency import _MODE, PerThread, WithPerThread
from backprop.parameter import Parameter

__all__ = ["Layer", "Dense", "Dropout", "BatchNorm1d", "SyncBatchNorm", "Residual", "Flatten",
           "from_config", "check_input"]

class Layer(WithPerThread):
    """Base class: implement ``forward``/``backward`` (and ``config`` to be serialisable).

    Attributes that hold a :class:`Parameter` are the layer's parameters and attributes that
    hold a ``Layer`` are its sub-layers, both found by name (``"W"``, ``"block.0.W"``);
    ``self._buffers`` holds state that is saved but not trained (e.g. running statistics).
    ``self._ctx`` holds what one thread's forward pass leaves for its backward pass: reused
    arrays (:meth:`_buffer`) and saved tensors (``self._ctx.saved = x, z`` in forward,
    ``x, z = self._ctx.saved`` in backward), separately for each thread.
    """

    in_features = None        # features the layer checks its input against (None: any)
    preserves_shape = False   # output shape == input shape (used by summary and input checks)
    min_batch_rows = 1        # rows a training batch needs (fit checks it before the first step)
    _counters: tuple[str, ...] = ()  # integer attributes saved in state_dict (e.g. RNG counters)
    _registry: dict = {}
    #: None, or a callable ``observer(layer, delta)`` that ``backward`` calls with the
    #: gradient at the layer's pre-activation, before using it: ``δ = ∂L/∂Z`` for Dense
    #: (after σ'), ``∂L/∂A`` for BatchNorm1d (its output; x̂ is recomputed from
    #: ``layer._ctx.saved``). It reads ``delta`` (and ``layer._ctx.saved``, the tensors of the
    #: forward pass) and must not modify them. Set on an instance by the tools that look
    #: inside a backward pass (:class:`backprop.gradient_health.GradientMonitor`,
    #: :func:`backprop.per_sample.per_sample_grad_norms`); one attribute read per backward
    #: when unset. It is the layer's, so it sees the backward passes of every thread.
    backward_observer = None
    #: The column names of the pandas DataFrame the model was fitted on (a list of str, as
    #: scikit-learn's ``feature_names_in_``), or None: set by ``fit``, saved in checkpoints,
    #: and checked against the columns of a DataFrame given to ``model(x)``, ``predict``
    #: and ``evaluate`` (:func:`backprop.data.check_feature_names`).
    feature_names_in_ = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Layer._registry[cls.__name__] = cls

    def __init__(self):
        self.training = True
        self._buffers = {}
        self._ctx = PerThread(type(self).__name__)

    @property
    def training(self) -> bool:
        """True in training mode (``train()``), False after ``eval()`` and, in the calling
        thread only, inside :func:`~backprop.concurrency.inference_mode`."""
        return self._training and not _MODE.eval

    @training.setter
    def training(self, mode) -> None:
        self._training = bool(mode)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x)")

    def backward(self, grad, need_input_grad=True):
        raise NotImplementedError(
            f"{type(self).__name__} must implement backward(grad, need_input_grad=True)")

    def __call__(self, x):
        """Forward on any array-like (see :meth:`prepare_input`); returns a fresh array of
        the parameters' type (NumPy or CuPy; ``forward`` returns a buffer)."""
        return self.forward(self.prepare_input(x)).copy()

    # -- structure -------------------------------------------------------------------------
    def children(self):
        """``(name, layer)`` for each direct sub-layer."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Layer) and k[0] != "_"]

    def modules(self):
        """This layer and all layers below it, depth first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    def named_parameters(self, prefix: str = ""):
        for k, v in vars(self).items():
            if isinstance(v, Parameter) and k[0] != "_":
                yield prefix + k, v
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for k, v in self._buffers.items():
            yield prefix + k, v
        for name, child in self.children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def name_parameters(self) -> None:
        """Set each parameter's ``.name`` to its path below this layer (``"2.block.0.W"``)."""
        for name, p in self.named_parameters():
            p.name = name

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- modes, gradients, devices -----------------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def to(self, device=None, dtype=None):
        """Move to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; None: where each array is)
        and/or cast to ``dtype`` (float32 or float64, the dtypes the kernels compute in) the
        parameters and buffers; returns self. Both are checked first (a bad one changes
        nothing). An optimizer built before follows its parameters at its next step.
        Not thread-safe: no other thread may use the model meanwhile."""
        if dtype is not None:
            dtype = _float_dtype(dtype)
        if device is not None:
            from backprop.backend import _resolve

            device = _resolve(device)[0]

        def moved(a):
            if device is None:
                return aligned(get_array_module(a).asarray(a, dtype=dtype))
            return aligned(asarray(a, dtype=dtype, device=device))

        params = self.parameters()
        new_params = [moved(p.data) for p in params]  # all converted before any is replaced
        new_buffers = [(m, {k: moved(v) for k, v in m._buffers.items()}) for m in self.modules()]
        for p, data in zip(params, new_params):
            p.data = data
        for m, buffers in new_buffers:
            m._buffers.update(buffers)
            m._ctx = PerThread(type(m).__name__)  # every thread's buffers are stale now
        return self

    # -- state and config --------------------------------------------------------------------
    def _state_arrays(self) -> dict:
        arrays = {name: p.data for name, p in self.named_parameters()}
        arrays.update(self.named_buffers())
        return arrays

    def _named_counters(self, prefix: str = ""):
        """``(name, layer, attribute)`` for the ``_counters`` of this layer and those below."""
        for attr in self._counters:
            yield prefix + attr, self, attr
        for name, child in self.children():
            yield from child._named_counters(f"{prefix}{name}.")

    def state_dict(self) -> dict:
        """``name -> NumPy array`` (copies) of every parameter and buffer, and each integer
        counter (as a 0-d int64 array) that makes a resumed run continue exactly."""
        state = {name: to_numpy(a).copy() for name, a in self._state_arrays().items()}
        state.update({name: np.array(getattr(layer, attr), dtype=np.int64)
                      for name, layer, attr in self._named_counters()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Write ``state`` into the existing arrays in place (names and shapes must match).
        A counter absent from ``state`` (a checkpoint older than the counter) keeps its value."""
        own = self._state_arrays()
        counters = {name: (layer, attr) for name, layer, attr in self._named_counters()}
        state = dict(state)
        for name, (layer, attr) in counters.items():
            if name in state:
                value = np.asarray(state.pop(name))
                if value.shape != () or value.dtype.kind not in "iu":
                    raise ValueError(f"state_dict[{name!r}] must be an integer scalar; got "
                                     f"{value.dtype} of shape {value.shape}")
                setattr(layer, attr, int(value))
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match {type(self).__name__}: missing "
                           f"{missing}, unexpected {unexpected}")
        for name, arr in own.items():
            value = state[name]
            if tuple(np.shape(value)) != tuple(arr.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(np.shape(value))}, "
                                 f"but the layer's array has shape {tuple(arr.shape)}")
            arr[...] = get_array_module(arr).asarray(value)
        for _, p in self.named_parameters():
            p.mark_changed()

    def config(self) -> dict:
        raise NotImplementedError(
            f"{type(self).__name__} does not define config(): return "
            "{'type': class name, **constructor arguments} to make it serialisable")

    @classmethod
    def from_config(cls, cfg: dict):
        """Rebuild a layer from its ``config()``; on ``Layer`` itself, dispatch on ``type``."""
        if cls is Layer:
            return _layer_class(cfg).from_config(cfg)
        return cls(**{k: v for k, v in cfg.items() if k != "type"})

    # -- helpers for subclasses ----------------------------------------------------------------
    def output_shape(self, input_shape):
        """Output shape for an input shape (None where unknown); used by ``summary``."""
        return input_shape if self.preserves_shape else None

    def prepare_input(self, x):
        """``x`` as a C-contiguous array on the device of the parameters.

        ``x`` is anything :func:`backprop.data.as_array` converts (NumPy, CuPy, PyTorch or
        JAX tensors through DLPack, objects with ``__array__``, pandas DataFrames, nested
        lists); anything else is a :class:`~backprop.data.DataError`. Nested lists, Python
        numbers and DataFrames (which have no dtype of their own) adopt the parameters'
        dtype; an array or tensor keeps its dtype, which the forward pass checks. A
        DataFrame's columns must match ``feature_names_in_`` when the model has names."""
        from backprop import data as bpdata

        params = self.parameters()
        like = params[0].data if params else None
        adopt = isinstance(x, (list, tuple, int, float)) or (
            bpdata._is_pandas(x) and getattr(x, "ndim", 0) == 2)
        x, names = bpdata._convert(x, "model input", "x")
        bpdata.check_feature_names(self.feature_names_in_, names, "model input")
        xp = get_array_module(like if like is not None else x)
        if adopt and x.dtype.kind in "fiub":  # no dtype of its own: adopt the model's
            x = x.astype(like.dtype if like is not None else get_dtype(), copy=False)
        x = to_numpy(x) if xp is np else xp.asarray(x)
        if like is None and x.dtype.kind != "f":
            raise TypeError(f"{self!r} needs a floating-point input; got {x.dtype}: "
                            "convert with x.astype('float32')")
        return xp.ascontiguousarray(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def from_config(cfg: dict) -> Layer:
    """Rebuild any layer (Sequential included) from its ``config()``."""
    return Layer.from_config(cfg)


def _layer_class(cfg):
    import backprop.activations  # noqa: F401  (registers the activation layers)
    import backprop.model  # noqa: F401  (registers Sequential)

    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"a layer config is a dict with a 'type' key; got {cfg!r}")
    cls = Layer._registry.get(cfg["type"])
    if cls is None:
        raise ValueError(f"unknown layer type {cfg['type']!r}; known: {sorted(Layer._registry)} "
                         "(a custom layer must be imported before from_config)")
    return cls


def check_input(x, who, in_features, like) -> None:
    """Raise a clear error unless ``x`` is an ``(N, in_features)`` array of ``like``'s array
    type and dtype (``in_features=None`` skips the shape check). ``who`` (a string, or a
    layer whose repr is taken only for a message) names the caller in the error."""
    if type(x) is type(like) and x.dtype == like.dtype and (
            in_features is None or (x.ndim == 2 and x.shape[1] == in_features)):
        return  # the common case, checked first: this runs on every forward pass
    who = who if isinstance(who, str) else repr(who)
    if type(x) is not type(like):
        raise TypeError(
            f"{who} has its parameters in {type(like).__module__}.{type(like).__name__} arrays "
            f"but got a {type(x).__module__}.{type(x).__name__}: convert with bp.asarray(x), or "
            "call the model (model(x) converts)")
    if in_features is not None and (x.ndim != 2 or x.shape[1] != in_features):
        hint = ""
        if x.ndim == 1 and x.shape[0] == in_features:
            hint = ": a single sample needs a batch axis, x.reshape(1, -1)"
        elif x.ndim > 2:
            hint = ": add a Flatten() layer first"
        raise ValueError(f"{who} expects input of shape (N, {in_features}); got "
                         f"{tuple(x.shape)}{hint}")
    if x.dtype != like.dtype:
        raise TypeError(f"{who} has {like.dtype} parameters but got a {x.dtype} input: convert "
                        f"with x.astype('{like.dtype}') or build the model with dtype='{x.dtype}'")


def _rows(a):
    """A 2-D ``(N, -1)`` view of a batch (kernels take 2-D arrays)."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1)


def _positive_int(value, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}")
    return int(value)


def _float_dtype(dtype) -> np.dtype:
    """``dtype`` (None: the default, ``bp.get_dtype()``) if the kernels compute in it."""
    if dtype is None:
        return get_dtype()
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype {dtype!r} is not a NumPy dtype; use 'float32' or "
                        "'float64'") from None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype {dt} is not supported: the kernels compute in float32 or "
                         "float64; use one of those")
    return dt


class Dense(Layer):
    """Fully connected layer with a fused bias + activation epilogue.

    Forward, for a batch ``X`` (N, in) and ``W`` (out, in)::

        Z = X Wᵀ + b          A = σ(Z)

    Backward, given ``dA = ∂L/∂A``::

        δ = dA ⊙ σ'(Z)        ∂W = δᵀ X        ∂b = Σ_rows δ        ∂X = δ W

    ``Z = X Wᵀ`` is one GEMM into a reused buffer; ``K.bias_act_forward`` then adds ``b`` and
    applies σ in one pass, writing ``A`` over ``Z`` when σ' can be computed from ``A``
    (``σ ∉ K.NEEDS_Z``). With ``activation="softmax"`` the epilogue adds ``b`` and the row
    softmax kernels follow. ``activation`` is a name (``"relu"``, ``"gelu"``...), an
    activation object or None; ``init`` an initialiser name or callable (default: He for
    ReLU-like activations, Xavier otherwise); ``rng`` an int seed or a Generator.

    The epilogues' argument checks run when their arrays change: each thread keeps its
    prepared kernel calls (:func:`backprop.kernels.prepare`) and reruns one while ``Z``,
    ``A``, ``b`` and ``∂b`` are the objects it was prepared with and ``dA`` is too, with the
    same shape (on a small batch the checks cost more than the kernel). A new array, a
    reshaped ``dA`` or another kernel backend is checked again.
    """

    def __init__(self, in_features, out_features, activation=None, init=None, bias=True,
                 rng=None, dtype=None):
        super().__init__()
        from backprop import activations

        self.in_features = _positive_int(in_features, "Dense in_features")
        self.out_features = _positive_int(out_features, "Dense out_features")
        # a layer of its own, even when the caller passes one activation object to several
        self.activation = activations.get(activation)
        if self.activation is activation:
            self.activation = copy.copy(activation)
        self.init = init
        dtype = _float_dtype(dtype)
        draw = initializers.get(init or initializers.default_for(self.activation))
        w = draw((self.out_features, self.in_features), initializers.as_generator(rng))
        self.W = Parameter(aligned(asarray(w, dtype=dtype)), "W")
        self.b = Parameter(aligned(asarray(np.zeros(self.out_features), dtype=dtype)),
                           "b") if bias else None

    def forward(self, x):
        request = _MODE.autocast
        if request is not None:  # mixed precision (backprop.precision)
            policy = self._lowp_policy(request)
            if policy is not None and getattr(x, "ndim", 0) == 2 and \
                    self.lowp_products(x.shape[0], policy) != (False, False, False):
                return self.forward_lowp(x, None, policy, request, False)[0]
        return self._forward_f32(x)

    def _forward_f32(self, x):
        W, act = self.W.data, self.activation.kernel
        check_input(x, self, self.in_features, W)
        z = self._buffer("z", (x.shape[0], self.out_features), W)
        # (the size test first: gemm.product's own checks cost a small product too much)
        if not (x.shape[0] * W.size >= gemm.MIN_MACS and gemm.product(x, W, z, False, True)):
            get_array_module(W).matmul(x, W.T, out=z)
        b = None if self.b is None else self.b.data
        if act == "softmax":  # out of place: Z stays, as the logits a paired loss reads
            a = K.softmax_forward(K.bias_act_forward(z, b, z, "identity", 0.0),
                                  self._buffer("a", z.shape, W))
        elif act not in K.ACTIVATIONS:  # a row activation layer (log_softmax): its own pass
            a = self.activation.forward(K.bias_act_forward(z, b, z, "identity", 0.0))
        else:
            a = self._buffer("a", z.shape, W) if act in K.NEEDS_Z else z
            alpha = self.activation.alpha
            runs = self._ctx.runs
            run = runs.get("forward")
            # z and a are this thread's buffers and b a parameter's array: while they are the
            # objects of the last call, the epilogue runs unchecked (backprop.kernels.prepare)
            if (run is None or run[2] is not z or run[3] is not b or run[4] is not a
                    or run[5] != act or run[6] != alpha or not K.current(run[0])):
                run = runs["forward"] = (*K.prepare("bias_act_forward", z, b, a, act, alpha),
                                         z, b, a, act, alpha)
            run[1]()
        self._ctx.saved = x, z, a  # one per-thread access: each costs a dict switch
        return a

    def logits(self):
        """``Z`` of this thread's last forward pass, when the activation is softmax: the
        logits that a loss paired with the softmax output reads
        (:func:`backprop.losses.paired_output`)."""
        if self.activation.kernel != "softmax":
            raise ValueError(f"{self!r}: logits() is for a softmax output layer")
        return self._ctx.saved[1]

    def backward(self, grad, need_input_grad=True, from_logits=False):
        """``from_logits=True``: ``grad`` is already ``∂L/∂Z`` (a loss paired with the
        softmax output computed it from the logits), so σ' is skipped."""
        saved = self._ctx.saved
        if len(saved) == 4:  # the forward pass ran in mixed precision
            return self._backward_lowp(saved, grad, need_input_grad, from_logits)
        x, z, a = saved
        W = self.W.data
        xp = get_array_module(W)
        grad, act = self._through_row_activation(grad, a, from_logits)
        db, accumulate_b = (None, False) if self.b is None else self.b.grad_for_write()
        alpha = self.activation.alpha
        runs = self._ctx.runs
        run = runs.get("backward")
        # as in forward; grad is the caller's array, so its shape is compared as well (the
        # same object may have been reshaped in place since)
        if (run is None or run[2] is not grad or run[3] is not a or run[4] is not z
                or run[5] is not db or run[6] != accumulate_b or run[7] != act
                or run[8] != alpha or grad.shape != run[9] or not K.current(run[0])):
            run = runs["backward"] = (
                *K.prepare("bias_act_backward", grad, a, z, act, alpha, grad, db, accumulate_b),
                grad, a, z, db, accumulate_b, act, alpha, grad.shape)
        run[1]()
        delta = grad
        if self.backward_observer is not None:
            self.backward_observer(self, delta)
        large = x.shape[0] * W.size >= gemm.MIN_MACS  # all three products' size
        self._weight_grad(delta, x, W, xp, large)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", x.shape, W)
        if not (large and gemm.product(delta, W, dx, False, False)):
            xp.matmul(delta, W, out=dx)
        return dx

    def _weight_grad(self, delta, x, W, xp, try_mkl: bool) -> None:
        """``∂W (+)= δᵀ X`` in the working precision: on MKL where ``try_mkl`` and
        :func:`backprop.gemm.product` runs it (``beta = 1`` to accumulate), else on ``xp``
        (accumulated through this thread's buffer)."""
        dW, accumulate = self.W.grad_for_write()
        if try_mkl and gemm.product(delta, x, dW, True, False, accumulate):
            return
        if accumulate:
            dW += xp.matmul(delta.T, x, out=self._buffer("dW", W.shape, W))
        else:
            xp.matmul(delta.T, x, out=dW)

    def _through_row_activation(self, grad, a, from_logits):
        """``(grad, act)`` for the backward epilogue: a row activation (softmax, a layer's
        own) is differentiated here first and the epilogue applies the identity; with
        ``from_logits`` ``grad`` is already ``∂L/∂Z``."""
        act = self.activation.kernel
        if from_logits:
            return grad, "identity"
        if act == "softmax":
            K.softmax_backward(grad, a, grad)
            return grad, "identity"
        if act not in K.ACTIVATIONS:
            return self.activation.backward(grad), "identity"
        return grad, act

    # -- mixed precision (backprop.precision) ------------------------------------------
    def _lowp_policy(self, request):
        """The Policy of ``request`` for this layer's weights, or None (float32 here)."""
        W = self.W.data
        return request.policy(W) if W.dtype == np.float32 else None

    def lowp_products(self, rows: int, policy) -> tuple[bool, bool, bool]:
        """Which of the three products of a pass of ``rows`` rows run in low precision
        under ``policy``: ``(forward, ∂W, ∂X)``."""
        out_f, in_f = self.W.data.shape
        return (policy.lowp(rows, out_f, in_f), policy.lowp(out_f, in_f, rows),
                policy.lowp(rows, in_f, out_f))

    def takes_lowp_input(self, rows: int, policy) -> bool:
        """True when a mixed-precision forward pass of ``rows`` rows reads the input's
        low-precision copy (its forward product or its ``∂W`` runs in low precision): the
        layer before then writes that copy in its epilogue."""
        fwd, dw, _ = self.lowp_products(rows, policy)
        return fwd or dw

    def forward_lowp(self, x, x_lp, policy, request, emit: bool):
        """The forward pass in mixed precision: returns ``(A, A_lp)``.

        ``x_lp`` is ``x``'s low-precision copy when the layer before wrote it (else None:
        converted here when needed). Each of the three products runs in low precision where
        ``policy.lowp(m, n, k)`` says it pays (the others read the float32 tensors, which
        always exist). ``emit``: also write ``A_lp`` (the next Dense layer reads it) in the
        epilogue's pass; None otherwise."""
        W, act = self.W.data, self.activation.kernel
        check_input(x, self, self.in_features, W)
        n = x.shape[0]
        out_f = W.shape[0]
        fwd, dw, dx = self.lowp_products(n, policy)
        lp = policy.lp_dtype
        if (fwd or dw) and x_lp is None:
            x_lp = policy.convert(x, self._buffer("x_lp", x.shape, W, lp))
        z = self._buffer("z", (n, out_f), W)
        if fwd:
            from backprop.precision import lowp_copy

            self._product("fwd", policy, x_lp, lowp_copy(self.W, policy, request), z,
                          False, True, 0.0)
        elif not gemm.product(x, W, z, False, True):
            get_array_module(W).matmul(x, W.T, out=z)
        b = None if self.b is None else self.b.data
        a_lp = self._buffer("a_lp", z.shape, W, lp) if emit else None
        if act == "softmax":
            a = K.softmax_forward(K.bias_act_forward(z, b, z, "identity", 0.0),
                                  self._buffer("a", z.shape, W))
            if a_lp is not None:
                policy.convert(a, a_lp)
        elif act not in K.ACTIVATIONS:
            a = self.activation.forward(K.bias_act_forward(z, b, z, "identity", 0.0))
            if a_lp is not None:
                policy.convert(a, a_lp)
        else:
            a = self._buffer("a", z.shape, W) if act in K.NEEDS_Z else z
            K.bias_act_forward(z, b, a, act, self.activation.alpha, out_lp=a_lp)
        self._ctx.saved = x, z, a, (x_lp if dw else None, dw, dx, policy, request)
        return a, a_lp

    def _product(self, name, policy, a, b, out, trans_a, trans_b, beta) -> None:
        """``out = op(a)·op(b) + beta·out`` in low precision, through a plan kept per
        thread for these arrays (checked once; rebuilt when any array is a new one)."""
        ctx = self._ctx
        plans = getattr(ctx, "_lp_plans", None)
        if plans is None:
            plans = ctx._lp_plans = {}
        key = (name, out.shape, beta)
        entry = plans.get(key)
        if entry is None or entry[1] is not a or entry[2] is not b or entry[3] is not out \
                or entry[4] is not policy:
            if len(plans) >= 12:
                plans.clear()
            entry = plans[key] = (policy.plan(a, b, out, trans_a, trans_b, beta), a, b, out,
                                  policy)
        entry[0]()

    def _backward_lowp(self, saved, grad, need_input_grad, from_logits):
        x, z, a, (x_lp, dw, dx, policy, request) = saved
        W = self.W.data
        xp = get_array_module(W)
        grad, act = self._through_row_activation(grad, a, from_logits)
        dx = dx and need_input_grad
        delta_lp = self._buffer("delta_lp", grad.shape, W, policy.lp_dtype) \
            if dw or dx else None
        db, accumulate_b = (None, False) if self.b is None else self.b.grad_for_write()
        delta = K.bias_act_backward(grad, a, z, act, self.activation.alpha, grad, db,
                                    accumulate_b, delta_lp=delta_lp)
        if self.backward_observer is not None:
            self.backward_observer(self, delta)
        if dw:
            dW, accumulate_w = self.W.grad_for_write()
            self._product("dW", policy, delta_lp, x_lp, dW, True, False,
                          1.0 if accumulate_w else 0.0)
        else:
            self._weight_grad(delta, x, W, xp, True)
        if not need_input_grad:
            return None
        dx_out = self._buffer("dx", x.shape, W)
        if dx:
            from backprop.precision import lowp_copy

            self._product("dX", policy, delta_lp, lowp_copy(self.W, policy, request), dx_out,
                          False, False, 0.0)
            return dx_out
        if not gemm.product(delta, W, dx_out, False, False):
            xp.matmul(delta, W, out=dx_out)
        return dx_out

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_features)

    def config(self) -> dict:
        return {"type": "Dense", "in_features": self.in_features,
                "out_features": self.out_features, "activation": self.activation.config(),
                "init": self.init if isinstance(self.init, str) else None,
                "bias": self.b is not None, "dtype": str(self.W.dtype)}

    def __repr__(self) -> str:
        act = "" if self.activation.name == "identity" else f", activation={self.activation.name!r}"
        return f"Dense({self.in_features}, {self.out_features}{act}" + \
            ("" if self.b is not None else ", bias=False") + ")"


class Dropout(Layer):
    """Inverted dropout: ``A = X ⊙ M / (1-p)`` in training, ``A = X`` in eval mode.

    The mask ``M`` is a hash of ``(seed, counter, element index)`` (``K.dropout``): no mask
    is stored, backward applies the same call to ``dA``, and every backend draws the same
    mask. ``counter`` advances once per training forward (and is saved in ``state_dict``, so
    a resumed run draws the masks the uninterrupted one would); with ``fixed_mask = True`` it
    does not (gradcheck uses this so that every evaluation sees one mask).

    ``stream`` (0 by default) selects an independent family of masks from the same seed:
    a data-parallel ``fit`` sets it to the process's rank, so that every rank drops
    different units, and rank 0 draws exactly the masks of a one-process run.
    """

    preserves_shape = True
    _counters = ("counter",)
    _STREAM_STRIDE = 0x9E3779B9  # odd, so seed + stride·stream differs for 2³² streams

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability p must be in [0, 1); got {p!r}")
        self.p = float(p)
        self.seed = int(initializers.as_generator(None).integers(2**32)) if seed is None \
            else int(seed)
        self.counter = 0
        self.fixed_mask = False
        self.stream = 0

    def forward(self, x):
        ctx = self._ctx
        if not self.training or self.p == 0.0:
            ctx.key = None
            return x
        seed = self.seed + self._STREAM_STRIDE * self.stream
        key = ctx.key = K.dropout_key(seed, self.counter)
        if not self.fixed_mask:
            self.counter += 1
        out = self._buffer("out", x.shape, x)
        K.dropout(_rows(x), key, K.dropout_threshold(self.p), 1.0 / (1.0 - self.p), _rows(out))
        return out

    def backward(self, grad, need_input_grad=True):
        if not need_input_grad:
            return None
        key = self._ctx.key
        if key is not None:
            g = _rows(grad)
            K.dropout(g, key, K.dropout_threshold(self.p), 1.0 / (1.0 - self.p), g)
        return grad

    def config(self) -> dict:
        return {"type": "Dropout", "p": self.p, "seed": self.seed}

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class BatchNorm1d(Layer):
    """Batch normalisation per feature, PyTorch semantics.

    Training: ``A = γ x̂ + β`` with ``x̂ = (X - μ_B)/sqrt(σ²_B + ε)`` from the batch (biased
    variance), and the running statistics move towards the batch ones::

        running_mean ← (1 - m) running_mean + m μ_B
        running_var  ← (1 - m) running_var  + m σ²_B · N/(N-1)     (unbiased)

    Eval: the same formula with the running statistics (then ``∂X = dA γ / sqrt(σ² + ε)``).

    x̂ is not stored: backward recomputes it from the input ``X`` (kept by reference, as
    ``Dense`` keeps its ``X`` for ``∂W``), ``μ`` and ``1/sqrt(σ² + ε)``.
    """

    preserves_shape = True
    min_batch_rows = 2  # a variance needs two rows

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, dtype=None):
        super().__init__()
        self.num_features = self.in_features = _positive_int(num_features, "num_features")
        self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
        dtype = _float_dtype(dtype)
        n = self.num_features
        self.gamma = Parameter(aligned(asarray(np.ones(n), dtype=dtype)),
                               "gamma") if affine else None
        self.beta = Parameter(aligned(asarray(np.zeros(n), dtype=dtype)),
                              "beta") if affine else None
        self._buffers = {"running_mean": asarray(np.zeros(n), dtype=dtype),
                         "running_var": asarray(np.ones(n), dtype=dtype)}

    @property
    def running_mean(self):
        return self._buffers["running_mean"]

    @property
    def running_var(self):
        return self._buffers["running_var"]

    def _affine(self, like):
        """``(γ, β)``: the parameters, or constant ones and zeros when ``affine=False``."""
        if self.affine:
            return self.gamma.data, self.beta.data
        cache = self._ctx.buffers
        if "unit" not in cache:
            xp = get_array_module(like)
            cache["unit"] = (xp.ones(self.num_features, like.dtype),
                             xp.zeros(self.num_features, like.dtype))
        return cache["unit"]

    def forward(self, x):
        rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
        check_input(x, self, self.num_features, rm)
        (n, m), xp = x.shape, get_array_module(x)
        gamma, beta = self._affine(x)
        out, invstd = self._buffer("out", x.shape, x), self._buffer("invstd", (m,), x)
        ctx = self._ctx
        training = ctx.trained = self.training
        if training:
            if n < 2:
                raise ValueError("BatchNorm1d in training mode needs at least 2 rows per batch "
                                 f"to estimate a variance; got {n}: use larger batches or "
                                 "call model.eval()")
            mean, var = self._buffer("mean", (m,), x), self._buffer("var", (m,), x)
            K.batchnorm_forward(x, gamma, beta, self.eps, out, mean, var, invstd)
            mom, step = self.momentum, self._buffer("step", (m,), x)
            xp.subtract(mean, rm, out=step); step *= mom; rm += step  # noqa: E702
            var *= n / (n - 1); var -= rv; var *= mom; rv += var     # noqa: E702
        else:
            mean = rm
            xp.reciprocal(xp.sqrt(xp.add(rv, self.eps, out=invstd), out=invstd), out=invstd)
            xp.multiply(xp.subtract(x, mean, out=out), invstd, out=out)  # x̂
            out *= gamma
            out += beta
        ctx.saved = x, mean, invstd  # backward recomputes x̂ from x
        return out

    def backward(self, grad, need_input_grad=True):
        ctx = self._ctx
        x, mean, invstd = ctx.saved
        if self.backward_observer is not None:
            self.backward_observer(self, grad)
        gamma, _ = self._affine(grad)
        if self.affine:
            dgamma, acc_g = self.gamma.grad_for_write()
            dbeta, acc_b = self.beta.grad_for_write()
            if acc_g != acc_b:  # only one was zeroed: zero the other explicitly, then add
                (dbeta if acc_g else dgamma).fill(0)
            accumulate = acc_g or acc_b
        else:
            m = self.num_features
            dgamma, dbeta = self._buffer("dgamma", (m,), grad), self._buffer("dbeta", (m,), grad)
            accumulate = False
        if ctx.trained:
            K.batchnorm_backward(grad, x, gamma, mean, invstd, grad, dgamma, dbeta, accumulate)
        else:  # eval: μ and σ² are constants, so ∂X = dA γ r, ∂γ = Σ dA x̂, ∂β = Σ dA
            xp = get_array_module(grad)
            xhat = self._buffer("xhat", x.shape, x)
            xp.multiply(xp.subtract(x, mean, out=xhat), invstd, out=xhat)
            sums = ((grad * xhat).sum(axis=0), grad.sum(axis=0))
            for out, s in zip((dgamma, dbeta), sums):
                if accumulate:
                    out += s
                else:
                    out[...] = s
            grad *= gamma * invstd
        return grad if need_input_grad else None

    def config(self) -> dict:
        return {"type": "BatchNorm1d", "num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "affine": self.affine,
                "dtype": str(self._buffers["running_mean"].dtype)}

    def __repr__(self) -> str:
        return f"BatchNorm1d({self.num_features})"


class SyncBatchNorm(BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the **global** batch of a
    data-parallel ``fit`` (PyTorch's ``SyncBatchNorm``): the ranks sum ``Σx`` and the row
    count, then ``Σ(x - μ)²`` (forward), and ``Σ dA``, ``Σ dA ⊙ x̂`` (backward), so that
    with N rows in all::

        μ = Σ_all x / N ;  σ² = Σ_all (x - μ)² / N ;  x̂ = (x - μ)/sqrt(σ² + ε)
        ∂X = γ r / N · (N dA - Σ_all dA - x̂ Σ_all dA x̂)

    and N ranks compute what one process computes on the whole batch (the running
    statistics move by the global ones, identically on every rank). ∂γ and ∂β are this
    rank's sums; the gradient allreduce of ``fit`` adds them up. Costs three small
    allreduces per training step. On one process, and in eval mode, it is BatchNorm1d.

    Every rank must run its forward and backward passes (``fit`` sees to it: a
    BatchNorm layer needs at least ``min_batch_rows`` rows on every rank).
    """

    def _group(self):
        if not self.training:
            return None
        from backprop.distributed import current_group

        group = current_group()
        return group if group is not None and group.size > 1 else None

    def forward(self, x):
        group = self._group()
        if group is None:
            self._ctx.synced = False
            return super().forward(x)
        rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
        check_input(x, self, self.num_features, rm)
        (n, m), xp = x.shape, get_array_module(x)
        gamma, beta = self._affine(x)
        sums = self._buffer("sums", (m + 1,), x)
        x.sum(axis=0, out=sums[:m])
        sums[m] = n
        group.allreduce(sums, "sum")
        total = float(sums[m])
        mean = self._buffer("mean", (m,), x)
        xp.divide(sums[:m], total, out=mean)
        out = self._buffer("out", x.shape, x)
        xp.subtract(x, mean, out=out)
        var = self._buffer("var", (m,), x)
        xp.multiply(out, out).sum(axis=0, out=var)
        group.allreduce(var, "sum")
        var /= total
        invstd = self._buffer("invstd", (m,), x)
        xp.reciprocal(xp.sqrt(xp.add(var, self.eps, out=invstd), out=invstd), out=invstd)
        out *= invstd
        out *= gamma
        out += beta
        mom, step = self.momentum, self._buffer("step", (m,), x)
        xp.subtract(mean, rm, out=step); step *= mom; rm += step  # noqa: E702
        var *= total / (total - 1); var -= rv; var *= mom; rv += var  # noqa: E702
        ctx = self._ctx
        ctx.trained, ctx.synced, ctx.total = True, True, total
        ctx.saved = x, mean, invstd
        return out

    def backward(self, grad, need_input_grad=True):
        ctx = self._ctx
        if not ctx.synced:
            return super().backward(grad, need_input_grad)
        from backprop.distributed import current_group

        x, mean, invstd = ctx.saved
        if self.backward_observer is not None:
            self.backward_observer(self, grad)
        m, xp, total = self.num_features, get_array_module(grad), ctx.total
        gamma, _ = self._affine(grad)
        xhat = self._buffer("xhat", x.shape, x)
        xp.multiply(xp.subtract(x, mean, out=xhat), invstd, out=xhat)
        sums = self._buffer("dsums", (2, m), grad)
        grad.sum(axis=0, out=sums[0])           # Σ dA   (this rank): ∂β
        (grad * xhat).sum(axis=0, out=sums[1])  # Σ dA x̂ (this rank): ∂γ
        if self.affine:
            for param, local in ((self.beta, sums[0]), (self.gamma, sums[1])):
                buf, accumulate = param.grad_for_write()
                if accumulate:
                    buf += local
                else:
                    buf[...] = local
        glob = self._buffer("dsums_all", (2, m), grad)
        glob[...] = sums
        current_group().allreduce(glob, "sum")
        # ∂X = γ r / N · (N dA - Σ dA - x̂ Σ dA x̂), the sums over every rank
        xhat *= glob[1]
        grad *= total
        grad -= glob[0]
        grad -= xhat
        grad *= gamma * invstd / total
        return grad if need_input_grad else None

    def config(self) -> dict:
        return {**super().config(), "type": "SyncBatchNorm"}

    def __repr__(self) -> str:
        return f"SyncBatchNorm({self.num_features})"


class Residual(Layer):
    """Skip connection around a block: ``A = X + F(X)``, so ``∂X = dA + (∂F/∂X)ᵀ dA``.

    ``block`` is a layer (or a list of layers, wrapped in a Sequential) that preserves the
    shape of its input.
    """

    preserves_shape = True

    def __init__(self, block):
        super().__init__()
        if isinstance(block, (list, tuple)):
            from backprop.model import Sequential

            block = Sequential(block)
        if not isinstance(block, Layer):
            raise TypeError(
                f"Residual wraps a Layer or a list of layers; got {type(block).__name__}")
        self.block = block
        self.name_parameters()

    @property
    def in_features(self):
        return self.block.in_features

    def forward(self, x):
        h = self.block.forward(x)
        if h.shape != x.shape:
            raise ValueError(f"Residual block {self.block!r} maps shape {tuple(x.shape)} to "
                             f"{tuple(h.shape)}; x + block(x) needs the block to preserve the "
                             "shape (match the last layer's out_features to the input)")
        return get_array_module(x).add(x, h, out=self._buffer("out", x.shape, x))

    def backward(self, grad, need_input_grad=True):
        if not need_input_grad:
            self.block.backward(grad, need_input_grad=False)
            return None
        skip = self._buffer("skip", grad.shape, grad)
        skip[...] = grad  # the block may overwrite grad
        skip += self.block.backward(grad, need_input_grad=True)
        return skip

    def config(self) -> dict:
        return {"type": "Residual", "block": self.block.config()}

    @classmethod
    def from_config(cls, cfg: dict):
        return cls(from_config(cfg["block"]))

    def __repr__(self) -> str:
        return f"Residual({self.block!r})"


class Flatten(Layer):
    """``A = X.reshape(N, -1)`` (a view); ``∂X = dA.reshape(X.shape)``."""

    def forward(self, x):
        self._ctx.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad, need_input_grad=True):
        return grad.reshape(self._ctx.shape) if need_input_grad else None

    def output_shape(self, input_shape):
        rest = input_shape[1:]
        return None if None in rest else (input_shape[0], math.prod(rest))

    def config(self) -> dict:
        return {"type": "Flatten"}
