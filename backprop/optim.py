"""Optimizers with PyTorch's update rules, formula by formula: SGD, RMSprop, Adam, AdamW, Adagrad.

Hyperparameters mean what they mean in ``torch.optim``, so they port unchanged and a
trajectory matches PyTorch's step by step (the formulas are in each class docstring and in
the kernels of ``kernels/reference.py``).

One kernel launch per step. On construction the optimizer re-homes its parameters into one
flat data buffer and one flat gradient buffer (:func:`backprop.parameter.flatten`; one group
per device and dtype, usually a single group) and keeps its state (momentum, moments, ...)
in flat buffers of the same length, allocated once. ``step()`` is then one fused kernel call
per group. Before each step an identity test per parameter checks that every parameter
still lives in its buffer; if ``.data`` was replaced (``model.to(...)``, an assignment) the
optimizer re-flattens, carrying its state along (to the new device or dtype if need be).

Differences from PyTorch, all deliberate

- A parameter whose gradient is stale (``zero_grad`` with no backward since) is updated with
  a zero gradient, so weight decay and momentum still act on it; PyTorch skips parameters
  whose ``.grad`` is None.
- One set of hyperparameters per optimizer (no parameter groups); ``lr`` is an attribute,
  not ``param_groups[0]["lr"]``. Create two optimizers for two sets of hyperparameters.
- The step count is one integer for the optimizer (``state_dict()["step"]``), not one per
  parameter. ``maximize``, ``foreach``, ``fused``, ``capturable`` are not offered.
"""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np

from backprop import checks, thread_governor
from backprop import kernels as K
from backprop.backend import asarray, empty_aligned, get_array_module, to_numpy
from backprop.concurrency import _MODE, ConcurrentTrainingError
from backprop.parameter import Parameter, flat_layout, flatten

__all__ = ["Optimizer", "SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "parameter_list"]


# ---------------------------------------------------------------------------------------
# Argument checks (PyTorch's, with messages that say what to pass instead)
def parameter_list(params) -> list[Parameter]:
    """``params`` (a Parameter or an iterable of them) as a list without duplicates."""
    if isinstance(params, Parameter):
        return [params]
    if callable(getattr(params, "parameters", None)):
        raise TypeError(f"expected parameters, got a {type(params).__name__}: "
                        "pass model.parameters()")
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(f"expected an iterable of Parameter, got {type(params).__name__}")
    out, seen = [], set()
    for p in params:
        if isinstance(p, dict):
            raise TypeError("parameter groups (dicts) are not supported: use one optimizer "
                            "per set of hyperparameters")
        if not isinstance(p, Parameter):
            raise TypeError(f"expected Parameter objects, got a {type(p).__name__}: "
                            "pass model.parameters()")
        if id(p) in seen:
            raise ValueError(f"parameter {p.name!r} is given twice: pass each parameter once")
        seen.add(id(p))
        out.append(p)
    return out


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    return float(value)


def _at_least_zero(name: str, value) -> float:
    v = _real(name, value)
    if not 0.0 <= v < math.inf:  # also rejects NaN
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number >= 0")
    return v


def _below_one(name: str, value) -> float:
    v = _real(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected 0 <= {name} < 1")
    return v


_flag = checks.flag


# ---------------------------------------------------------------------------------------
def _placement(a) -> tuple:
    """(array module, device, dtype): parameters that share it share one flat buffer."""
    xp = get_array_module(a)
    return xp.__name__, (-1 if xp is np else a.device.id), a.dtype.str


def _assign(dst, src) -> None:
    """``dst[...] = src`` across devices (src may be NumPy while dst is CuPy, or back)."""
    if get_array_module(src) is not get_array_module(dst):
        src = get_array_module(dst).asarray(to_numpy(src))
    dst[...] = src


class _Group:
    """Parameters of one device and dtype, re-homed into flat buffers, with flat state."""

    __slots__ = ("params", "data", "grad", "starts", "data_views", "grad_views", "state", "lp",
                 "lp_kw")

    def __init__(self, params: list[Parameter], state_init: dict[str, float]):
        self.params = params
        self.data, self.grad = flatten(params)
        self.starts = flat_layout(params, self.data.dtype.itemsize,
                                  on_cpu=type(self.data) is np.ndarray)[0]
        self.data_views = [p.data for p in params]
        self.grad_views = [p.grad for p in params]
        self.reset_state(state_init)
        self.lp = None  # flat low-precision copy of data (mixed precision), when in use
        self.lp_kw = {}  # {"data_lp": lp} while the update writes it, else {}

    def bind_lowp(self, dtype):
        """The flat low-precision copy of ``data`` in ``dtype`` (allocated on first use),
        each parameter's ``_lp`` a view of it, as its ``data`` is of ``data``."""
        lp = self.lp
        if lp is None or lp.dtype != dtype:
            lp = self.lp = empty_aligned(get_array_module(self.data), self.data.shape, dtype,
                                         zero=True)
            for p, data, start in zip(self.params, self.data_views, self.starts):
                p._lp, p._lp_for = lp[start:start + data.size].reshape(data.shape), None
        return lp

    def reset_state(self, state_init: dict[str, float]) -> None:
        xp = get_array_module(self.data)
        self.state = {name: xp.full_like(self.data, value) for name, value in state_init.items()}

    def in_place(self) -> bool:
        """True when every parameter still lives in the flat buffers. Reading ``p.grad``
        zeroes a stale gradient (only those), so the flat gradient is right afterwards."""
        for p, data, grad in zip(self.params, self.data_views, self.grad_views):
            if p.data is not data or p.grad is not grad:
                return False
        return True

    def intact(self) -> bool:
        """:meth:`in_place` without reading ``p.grad`` (so stale gradients stay stale)."""
        for p, data, grad in zip(self.params, self.data_views, self.grad_views):
            if p.data is not data or p._grad is not grad:
                return False
        return True

    def state_slices(self):
        """``(param, {state name: view of its slice})`` for each parameter."""
        for p, data, start in zip(self.params, self.data_views, self.starts):
            end = start + data.size
            yield p, {k: buf[start:end].reshape(data.shape) for k, buf in self.state.items()}


class Optimizer:
    """Base class: parameters in flat buffers, hyperparameters, state and step count.

    Subclasses define ``_validate(**hyper)`` (PyTorch's checks; returns the hyperparameters
    as Python scalars), ``_state_init(hyper)`` ({state name: initial value}) and
    ``_update(group, lr, step)`` (one kernel call on the flat buffers of ``group``).

    A state value (momentum buffer, moments, averages) that an update would leave denormal
    is stored as 0 (``backprop.kernels.reference.flush_denormals``): a decaying state
    otherwise settles there, and arithmetic on denormal values is 1.3–2× slower per update.
    The weights come out as PyTorch's; the states differ from PyTorch's only in that range.

    Not thread-safe: one optimizer steps in one thread at a time. While a ``fit`` trains
    with it, a ``step()`` from another thread raises :class:`ConcurrentTrainingError`.
    """

    _trainer = None  # the thread whose fit() steps this optimizer (backprop.concurrency)
    #: True for the built-in optimizers, whose ``_update`` passes ``**group.lp_kw`` to its
    #: kernel (mixed precision: the low-precision weight copy written in the same pass);
    #: a subclass with an ``_update`` of its own leaves it False, and the copies are cast
    #: again after its steps.
    _writes_lowp = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass's own update may not write the low-precision copies, unless it says so
        if "_update" in cls.__dict__ and "_writes_lowp" not in cls.__dict__:
            cls._writes_lowp = False

    def __init__(self, params, **defaults):
        self.params = parameter_list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list: pass model.parameters() "
                             "of a model that has parameters")
        for p in self.params:
            if p.dtype.kind != "f":
                raise TypeError(f"parameter {p.name!r} is {p.dtype}: only floating point "
                                "parameters can be optimized")
        self.hyper = self._validate(**defaults)
        self.step_count = 0
        self.initial_lr = None  # the lr the first schedule started from (schedules.py)
        self._groups = self._group(self.params, self._state_init(self.hyper))

    # -- hyperparameters ----------------------------------------------------------------
    @staticmethod
    def _validate(lr, **hyper) -> dict:
        return {"lr": _at_least_zero("lr", lr), **hyper}

    @staticmethod
    def _state_init(hyper) -> dict[str, float]:
        return {}

    @property
    def lr(self) -> float:
        """The learning rate (a Python float), read at every step; schedules set it."""
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value) -> None:
        self.hyper["lr"] = _at_least_zero("lr", value)

    # -- the update ---------------------------------------------------------------------
    def step(self, closure=None):
        """Update every parameter (one kernel call per device/dtype group). ``closure``,
        as in PyTorch, re-evaluates the model and returns the loss, which is returned."""
        trainer = self._trainer
        if trainer is not None and trainer is not threading.current_thread():
            raise ConcurrentTrainingError(
                f"{type(self).__name__}.step() called from thread "
                f"{threading.current_thread().name!r} while fit() in thread {trainer.name!r} "
                "trains with this optimizer")
        loss = closure() if closure is not None else None
        self._ensure_in_place()
        self.step_count += 1
        lr = self.hyper["lr"]
        request = _MODE.autocast
        for group in self._groups:
            policy = None
            if request is not None and self._writes_lowp and group.data.dtype == np.float32 \
                    and (group.lp is not None or any(p._lp is not None for p in group.params)):
                policy = request.policy(group.data)  # (a product reads a copy: keep them)
            if policy is None:
                group.lp_kw = {}
                self._update(group, lr, self.step_count)
                for p in group.params:  # written without their low-precision copies
                    if p._lp_for is not None:
                        p._lp_for = None
            else:  # the update also writes the weights' low-precision copy, same pass
                group.lp_kw = {"data_lp": group.bind_lowp(policy.lp_dtype)}
                self._update(group, lr, self.step_count)
                generation = request.generation
                for p in group.params:
                    p._lp_for = (p.data, generation)
        if thread_governor.ENGAGED[0] and type(self._groups[0].data) is np.ndarray:
            thread_governor.tick()  # (CPU threads: BACKPROP_THREADS=adaptive)
        return loss

    def _ensure_in_place(self) -> None:
        for group in self._groups:
            if not group.in_place():
                self._regroup()
                return

    def flat_gradients(self) -> list:
        """The flat gradient buffers, one per device/dtype group, each holding every
        parameter's current gradient (stale ones zeroed): what a data-parallel step
        allreduces between backward and :meth:`step`."""
        self._ensure_in_place()
        return [group.grad for group in self._groups]

    def layout_intact(self) -> bool:
        """True while every parameter's ``data`` and gradient still are the views of the
        flat buffers they were given (checked without touching a stale gradient)."""
        return all(group.intact() for group in self._groups)

    def flat_buffers(self) -> list:
        """``[([flat data, state buffers...], params)]`` per group: everything that must be
        equal on every rank of a data-parallel run."""
        self._ensure_in_place()
        return [([group.data, *group.state.values()], group.params) for group in self._groups]

    def _update(self, group: _Group, lr: float, step: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define an update")

    def zero_grad(self) -> None:
        """Forget the gradients of all parameters (no memory pass; see Parameter)."""
        for p in self.params:
            p.zero_grad()

    # -- where the parameters live --------------------------------------------------------
    @staticmethod
    def _group(params, state_init) -> list[_Group]:
        by_place: dict[tuple, list[Parameter]] = {}
        for p in params:
            by_place.setdefault(_placement(p.data), []).append(p)
        return [_Group(ps, state_init) for ps in by_place.values()]

    def _regroup(self) -> None:
        """Re-flatten after some ``.data`` was replaced, carrying the state along."""
        for group in self._groups:
            for p, old in zip(group.params, group.data_views):
                if p.data.shape != old.shape:
                    raise ValueError(
                        f"parameter {p.name!r} changed shape from {old.shape} to "
                        f"{p.data.shape}, so its optimizer state cannot follow: create a "
                        "new optimizer after changing parameter shapes")
        carried = {id(p): slices for g in self._groups for p, slices in g.state_slices()}
        self._groups = self._group(self.params, self._state_init(self.hyper))
        for group in self._groups:
            for p, slices in group.state_slices():
                for key, dst in slices.items():
                    _assign(dst, carried[id(p)][key])

    def to(self, device) -> "Optimizer":
        """Move the parameters (they live in this optimizer's flat buffers), their gradients
        and the optimizer state to ``device``; returns self. After ``model.to(device)`` this
        is not needed: the optimizer follows its parameters at the next step."""
        for p in self.params:
            grad = p.grad
            p.data = asarray(p.data, device=device)
            p.grad = asarray(grad, device=device)
        self._regroup()
        return self

    # -- checkpoints ----------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        names = [p.name for p in self.params]
        bad = sorted({n for n in names if not n or names.count(n) > 1})
        if bad:
            raise ValueError(f"optimizer state is saved by parameter name, but these names are "
                             f"empty or repeated: {bad}; give every parameter a unique name "
                             "(layers inside a Sequential get them)")
        return names

    def state_dict(self) -> dict:
        """``{"type", "hyper" (JSON-able), "step", "state": {"<param>.<key>": ndarray}}``,
        one array per parameter and state buffer (so loading does not depend on order)."""
        self._state_names()
        state = {f"{p.name}.{key}": to_numpy(view).copy()
                 for group in self._groups for p, slices in group.state_slices()
                 for key, view in slices.items()}
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hyper.items()}
        return {"type": type(self).__name__, "hyper": hyper, "step": self.step_count,
                "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters, step count and state saved by :meth:`state_dict`
        (validated first: nothing changes when anything does not fit)."""
        if not isinstance(state_dict, dict) or \
                not {"type", "hyper", "step", "state"} <= set(state_dict):
            raise ValueError("expected a dict with keys 'type', 'hyper', 'step', 'state' "
                             "(from Optimizer.state_dict())")
        kind = state_dict["type"]
        if kind != type(self).__name__:
            raise ValueError(f"this state is from a {kind} optimizer, not {type(self).__name__}:"
                             f" create a {kind} to load it")
        saved = dict(state_dict["hyper"])
        if set(saved) != set(self.hyper):
            raise ValueError(f"{kind} hyperparameters {sorted(saved)} do not match the expected "
                             f"{sorted(self.hyper)}")
        hyper = self._validate(**saved)
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"'step' must be an integer >= 0, got {step!r}")
        names = self._state_names()
        init = self._state_init(hyper)
        state = state_dict["state"]
        expected = {f"{n}.{key}": p.shape for n, p in zip(names, self.params) for key in init}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"optimizer state does not match the parameters: missing "
                             f"{missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(np.shape(state[key])) != tuple(shape):
                raise ValueError(f"optimizer state {key!r} has shape {np.shape(state[key])}, "
                                 f"but the parameter has shape {tuple(shape)}")
        self.hyper, self.step_count = hyper, int(step)
        for group in self._groups:
            group.reset_state(init)
            for p, slices in group.state_slices():
                for key, view in slices.items():
                    _assign(view, np.asarray(state[f"{p.name}.{key}"]))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


# ---------------------------------------------------------------------------------------
class SGD(Optimizer):
    """Stochastic gradient descent with momentum (``torch.optim.SGD``)::

        d = g + λ θ                                   (weight_decay λ: L2 in the gradient)
        b = d  (first step);  b = μ b + (1 − τ) d    (momentum μ ≠ 0, dampening τ)
        d = d + μ b  (nesterov)   or   d = b
        θ = θ − lr · d
    """

    _writes_lowp = True

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay)

    @staticmethod
    def _validate(lr, momentum, dampening, nesterov, weight_decay) -> dict:
        hyper = {"lr": _at_least_zero("lr", lr),
                 "momentum": _at_least_zero("momentum", momentum),
                 "dampening": _real("dampening", dampening),
                 "nesterov": _flag("nesterov", nesterov),
                 "weight_decay": _at_least_zero("weight_decay", weight_decay)}
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening, got "
                             f"momentum={momentum!r}, dampening={dampening!r}")
        return hyper

    @staticmethod
    def _state_init(hyper) -> dict[str, float]:
        return {"momentum_buffer": 0.0} if hyper["momentum"] else {}

    def _update(self, group, lr, step):
        h = self.hyper
        K.sgd_step(group.data, group.grad, group.state.get("momentum_buffer"), lr,
                   h["momentum"], h["dampening"], h["nesterov"], h["weight_decay"], step == 1,
                   **group.lp_kw)


class RMSprop(Optimizer):
    """RMSprop (``torch.optim.RMSprop``)::

        d = g + λ θ
        s = α s + (1 − α) d²
        ḡ = α ḡ + (1 − α) d ;  v = s − ḡ²      (centered)   or   v = s
        a = sqrt(v) + eps                      (eps outside the square root)
        b = μ b + d / a ;  θ = θ − lr · b      (momentum μ > 0)   or   θ = θ − lr · d / a
    """

    _writes_lowp = True

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    @staticmethod
    def _validate(lr, alpha, eps, weight_decay, momentum, centered) -> dict:
        return {"lr": _at_least_zero("lr", lr), "alpha": _at_least_zero("alpha", alpha),
                "eps": _at_least_zero("eps", eps),
                "weight_decay": _at_least_zero("weight_decay", weight_decay),
                "momentum": _at_least_zero("momentum", momentum),
                "centered": _flag("centered", centered)}

    @staticmethod
    def _state_init(hyper) -> dict[str, float]:
        init = {"square_avg": 0.0}
        if hyper["momentum"] > 0:
            init["momentum_buffer"] = 0.0
        if hyper["centered"]:
            init["grad_avg"] = 0.0
        return init

    def _update(self, group, lr, step):
        h, s = self.hyper, group.state
        K.rmsprop_step(group.data, group.grad, s["square_avg"], s.get("momentum_buffer"),
                       s.get("grad_avg"), lr, h["alpha"], h["eps"], h["weight_decay"],
                       h["momentum"], h["centered"], **group.lp_kw)


class Adam(Optimizer):
    """Adam (``torch.optim.Adam``), ``t`` counted from 1::

        d = g + λ θ                                    (weight_decay: L2 in the gradient)
        m = β1 m + (1 − β1) d ;  v = β2 v + (1 − β2) d²
        v̂ = max(v̂, v)  and use v̂ for v below         (amsgrad)
        θ = θ − (lr / (1 − β1ᵗ)) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps)

    eps is added after the bias-corrected square root, as in PyTorch.
    """

    _decoupled = False
    _writes_lowp = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

    @staticmethod
    def _validate(lr, betas, eps, weight_decay, amsgrad) -> dict:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        return {"lr": _at_least_zero("lr", lr),
                "betas": (_below_one("beta1", betas[0]), _below_one("beta2", betas[1])),
                "eps": _at_least_zero("eps", eps),
                "weight_decay": _at_least_zero("weight_decay", weight_decay),
                "amsgrad": _flag("amsgrad", amsgrad)}

    @staticmethod
    def _state_init(hyper) -> dict[str, float]:
        init = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if hyper["amsgrad"]:
            init["max_exp_avg_sq"] = 0.0
        return init

    def _update(self, group, lr, step):
        h, s = self.hyper, group.state
        beta1, beta2 = h["betas"]
        K.adam_step(group.data, group.grad, s["exp_avg"], s["exp_avg_sq"],
                    s.get("max_exp_avg_sq"), lr, beta1, beta2, h["eps"], h["weight_decay"],
                    self._decoupled, step, **group.lp_kw)


class AdamW(Adam):
    """AdamW (``torch.optim.AdamW``): Adam with decoupled weight decay, applied to the
    weights before the Adam update instead of being added to the gradient::

        θ = θ (1 − lr λ) ;  then Adam with d = g
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)


class Adagrad(Optimizer):
    """Adagrad (``torch.optim.Adagrad``), ``t`` counted from 1::

        d = g + λ θ ;  s = s + d²      (s starts at initial_accumulator_value)
        θ = θ − lr / (1 + (t − 1) η) · d / (sqrt(s) + eps)      (lr_decay η)
    """

    _writes_lowp = True

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                 initial_accumulator_value=0.0):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                         initial_accumulator_value=initial_accumulator_value)

    @staticmethod
    def _validate(lr, lr_decay, weight_decay, eps, initial_accumulator_value) -> dict:
        return {"lr": _at_least_zero("lr", lr), "lr_decay": _at_least_zero("lr_decay", lr_decay),
                "weight_decay": _at_least_zero("weight_decay", weight_decay),
                "eps": _at_least_zero("eps", eps),
                "initial_accumulator_value": _at_least_zero("initial_accumulator_value",
                                                            initial_accumulator_value)}

    @staticmethod
    def _state_init(hyper) -> dict[str, float]:
        return {"sum": hyper["initial_accumulator_value"]}

    def _update(self, group, lr, step):
        h = self.hyper
        K.adagrad_step(group.data, group.grad, group.state["sum"], lr, h["lr_decay"], h["eps"],
                       h["weight_decay"], step, **group.lp_kw)
