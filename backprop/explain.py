"""Backpropagation on one small batch, with the numbers: the textbook equations of every
layer filled in with the actual matrices, and every gradient checked against central
differences of the loss.

    print(bp.explain(model, X[:4], y[:4], loss="mse"))

For a stack of Dense layers (``W`` is ``(out, in)``, ``X`` is ``(N, in)``)::

    forward      Zˡ = Aˡ⁻¹ Wˡᵀ + bˡ         Aˡ = σ(Zˡ)           (A⁻¹ = X)
    loss         L = loss(Aᴸ, Y)            dAᴸ = ∂L/∂Aᴸ         (the batch mean is in here)
    output       δᴸ = ∂L/∂Zᴸ = dAᴸ ⊙ σ′(Zᴸ)
    backward     δˡ = (δˡ⁺¹ Wˡ⁺¹) ⊙ σ′(Zˡ)
    gradients    ∂Wˡ = δˡᵀ Aˡ⁻¹             ∂bˡ = Σ_rows δˡ

The names are those of :func:`backprop.graph.describe` (``Z0``, ``A0``, ``W0`` for layer 0,
``A2.1`` for node 1 of the Residual block at position 2). The numbers shown are the ones
the layers compute (``δ`` is read from inside ``Dense.backward`` through its
``backward_observer``, ``∂W`` and ``∂b`` are the parameters' ``.grad``, the gradients
passed between layers are what each ``backward`` returns), not a recomputation; ``Z`` is
recomputed as ``X Wᵀ + b`` for display, since Dense writes ``A`` over it.

What is checked, by central differences of ``L`` (each from a full forward pass):

- ``δ`` of each Dense layer, perturbing ``Z`` (the rest of the network then runs from
  ``σ(Z + h eᵢ)``);
- every parameter's gradient, perturbing the parameter;
- every gradient one node passes to the node before it (``dA``), perturbing that node's
  output; the gradient of the loss ``dAᴸ`` likewise. A Residual block's first node passes
  only the part through the block (``dA|F``): it is checked as part of the block's sum.

The criterion is :func:`backprop.gradcheck.gradcheck`'s (its module docstring states it): a
gradient passes (✓) where the part of ``|analytic − numeric|`` that the finite-difference
noise does not explain is at most ``tol`` (1e-6) times the gradient's largest entry; the
lines also show the plain ``max |analytic − numeric|``. A tensor of at most ``max_checks``
entries is checked entirely; a larger one on ``max_checks`` entries drawn at random
(``numpy.random.default_rng(seed)``, so the same ones on every call). Each entry costs two
forward passes (four where the noise has to be measured).

The model itself is never modified: everything runs on a deep copy, moved to the CPU and
cast to float64 (so that finite differences resolve the gradients; the numbers are those of
a float32 model's weights, computed in float64). The copy runs in the model's mode
(``training=None``) or the one given: in training mode Dropout applies the mask the model's
next training forward would draw (``fixed_mask``, so every evaluation sees it) and
BatchNorm1d normalises with the batch's statistics (it needs two rows). Regularizers added
with ``add_regularizer`` are not part of ``L``.
"""
from __future__ import annotations

import copy
import re
import textwrap
import numpy as np

from backprop import checks
from backprop.backend import to_numpy
from backprop.gradcheck import EPS_MACHINE, NOISE_FACTOR, _quotient

__all__ = ["explain", "Explanation", "MAX_BATCH"]

#: the most rows ``explain`` accepts: it shows one small batch, and every checked entry
#: costs full forward passes of it
MAX_BATCH = 256


class Explanation(str):
    """The Markdown text of :func:`explain` (a ``str``: print it, or let a notebook render
    it), with the results of its checks: ``checks`` holds one dict per checked gradient
    (``name``, ``shape``, ``checked`` and ``total`` entries, ``max_abs`` = max
    ``|analytic − numeric|``, ``error`` = the criterion's relative error, ``ok``), and
    ``ok`` is True when every check passed (and vacuously when none ran)."""

    checks: list

    def __new__(cls, text: str, checks_: list):
        obj = super().__new__(cls, text)
        obj.checks = checks_
        return obj

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    @property
    def text(self) -> str:
        return str.__str__(self)

    def _repr_markdown_(self) -> str:  # Jupyter renders the returned value as Markdown
        return self.text


def explain(model, X, y, loss, *, training: bool | None = None, max_rows: int = 4,
            max_cols: int = 6, precision: int = 4, eps: float = 1e-6, tol: float = 1e-6,
            check: bool = True, max_checks: int = 32, seed: int = 0) -> Explanation:
    """Backpropagation on the batch ``(X, y)`` with ``loss``, as Markdown with the numbers.

    ``model`` is a :class:`~backprop.model.Sequential` (any layers: Dense, activations,
    Dropout, BatchNorm1d, Flatten get their equations; a Residual block is shown node by
    node; another layer as ``A = Layer(X)`` with its numbers and checks). ``X`` is
    ``(N, features)`` with ``N <= MAX_BATCH``, ``y`` what ``fit`` takes for ``loss`` (a
    name or a Loss object); both are checked as ``fit`` checks them.

    Matrices show at most ``max_rows`` rows and ``max_cols`` columns (``…`` and ``⋮`` mark
    the rest), values with ``precision`` significant digits. With ``check`` (default)
    every gradient is compared with central differences of ``L`` with step ``eps`` (see
    the module docstring: criterion ``tol``, at most ``max_checks`` entries per tensor,
    drawn with ``seed``). ``training`` (None: the model's mode) chooses training or eval
    behaviour of Dropout and BatchNorm1d.

    Returns an :class:`Explanation` (a ``str``; ``.ok`` tells whether all checks passed).
    The model, its parameters, gradients, buffers, RNG counters and mode are unchanged.
    """
    from backprop.layers import BatchNorm1d, Layer
    from backprop.model import Sequential
    from backprop.training import make_loss

    if not isinstance(model, Sequential):
        hint = (f": wrap it, bp.Sequential([{model!r}])" if isinstance(model, Layer)
                else "")
        raise TypeError(f"explain needs a Sequential model; got {type(model).__name__}{hint}")
    opts = {"max_rows": checks.integer("max_rows", max_rows, minimum=1),
            "max_cols": checks.integer("max_cols", max_cols, minimum=1),
            "precision": checks.integer("precision", precision, minimum=1),
            "max_checks": checks.integer("max_checks", max_checks, minimum=1),
            "eps": checks.positive("eps", eps), "tol": checks.positive("tol", tol),
            "check": checks.flag("check", check), "seed": checks.integer("seed", seed, 0)}
    training = model.training if training is None else checks.flag("training", training)
    loss = copy.deepcopy(make_loss(loss))  # the user's loss object keeps its buffers
    X, y = _batch(model, X, y, loss)
    if training and len(X) < 2 and any(isinstance(m, BatchNorm1d) for m in model.modules()):
        raise ValueError("explain in training mode needs at least 2 rows for BatchNorm1d's "
                         "batch statistics; pass more rows or training=False")
    net = _copy(model, training)
    return _Explainer(net, loss, X, y, training, opts).run()


# -- setting up ------------------------------------------------------------------------------
def _batch(model, X, y, loss):
    """``(X, y)`` validated as ``fit`` validates them, as float64 NumPy arrays (class
    labels as int64)."""
    from backprop import data as bpdata
    from backprop.training import _n_outputs, _target_kind

    kind = _target_kind(loss)
    X, y = bpdata.validate(to_numpy(X) if hasattr(X, "dtype") else X,
                           to_numpy(y) if hasattr(y, "dtype") else y,
                           n_features=model.in_features, target=kind,
                           n_outputs=_n_outputs(model), name="explain's batch")
    if len(X) > MAX_BATCH:
        raise ValueError(f"explain shows one small batch; got {len(X)} rows (at most "
                         f"{MAX_BATCH}): pass a few rows, e.g. X[:4], y[:4]")
    X = np.ascontiguousarray(to_numpy(X), dtype=np.float64)
    y = to_numpy(y)
    labels = kind == "labels" and y.ndim == 1
    y = np.ascontiguousarray(y, dtype=np.int64 if labels else np.float64)
    return X, y


def _copy(model, training):
    """A float64 CPU copy of ``model`` in the given mode, Dropout masks fixed. Observers
    set on the model's layers (a GradientMonitor's) are not copied."""
    from backprop.layers import Dropout

    memo = {}
    for m in model.modules():
        observer = vars(m).get("backward_observer")
        if observer is not None:
            memo[id(observer)] = None  # deepcopy maps it to None instead of copying its owner
    try:
        net = copy.deepcopy(model, memo)
        net.to(device="cpu", dtype="float64")
    except Exception as err:
        raise TypeError(f"explain works on a float64 copy of the model, and this model "
                        f"cannot be copied or cast ({type(err).__name__}: {err}); its layers "
                        "must support copy.deepcopy and .to(dtype='float64')") from err
    net.train(training)
    for m in net.modules():
        if isinstance(m, Dropout):
            m.fixed_mask = True  # every evaluation of L draws the one mask
    net.zero_grad()
    return net


class _Recorder:
    """Wraps ``forward``/``backward`` of every layer of the copy (instance attributes) to
    keep copies of what flows through them; ``override[id(layer)]`` replaces a layer's
    output (a finite-difference evaluation perturbs it)."""

    def __init__(self, net):
        from backprop.layers import Dense

        self.on = True
        self.inputs, self.outputs, self.z, self.delta = {}, {}, {}, {}
        self.grad_in, self.grad_out = {}, {}  # per layer: dA received, d(input) returned
        self.override = {}
        for m in net.modules():
            if m is not net:
                self._wrap(m)
            if isinstance(m, Dense):
                m.backward_observer = self._observe

    def _observe(self, layer, delta):
        if self.on:
            self.delta[id(layer)] = np.array(delta)

    def _wrap(self, m):
        from backprop.layers import Dense

        forward, backward, key = m.forward, m.backward, id(m)

        def recorded_forward(x):
            make = self.override.get(key)
            if make is not None:
                return make()
            out = forward(x)
            if self.on:
                self.inputs[key], self.outputs[key] = np.array(x), np.array(out)
                if isinstance(m, Dense):  # Dense may have written A over Z: recompute Z
                    z = self.inputs[key] @ m.W.data.T
                    self.z[key] = z + m.b.data if m.b is not None else z
            return out

        def recorded_backward(grad, need_input_grad=True):
            if self.on:
                self.grad_in[key] = np.array(grad)  # before backward may overwrite it
            out = backward(grad, need_input_grad=need_input_grad)
            if self.on:
                self.grad_out[key] = None if out is None else np.array(out)
            return out

        m.forward, m.backward = recorded_forward, recorded_backward


# -- the explanation -------------------------------------------------------------------------
class _Explainer:
    def __init__(self, net, loss, X, y, training, opts):
        self.net, self.loss, self.X, self.y = net, loss, X, y
        self.training, self.o = training, opts
        self.rng = np.random.default_rng(opts["seed"])
        self.lines: list[str] = []
        self.checks: list[dict] = []

    # text helpers
    def _num(self, v) -> str:
        if isinstance(v, (np.integer, int)):
            return str(int(v))
        v = float(v)
        if v == 0.0:
            return "0"
        return f"{v:.{self.o['precision']}g}"

    def _matrix(self, title: str, arr) -> list[str]:
        """``title  shape`` and the rows of ``arr`` (truncated), indented by 4."""
        arr = np.asarray(arr)
        shape = tuple(arr.shape)
        if arr.ndim == 0:
            return [f"{title} = {self._num(arr)}"]
        note = ""
        if arr.ndim > 2:
            note = f" (shown as {arr.shape[0]} × {int(np.prod(arr.shape[1:]))})"
            arr = arr.reshape(arr.shape[0], -1)
        rows = arr.reshape(1, -1) if arr.ndim == 1 else arr
        r, c = self.o["max_rows"], self.o["max_cols"]
        cells = [[self._num(v) for v in row[:c]] for row in rows[:r]]
        width = max(len(s) for row in cells for s in row)
        out = [f"{title}   {_shape(shape)}{note}"]
        for row in cells:
            out.append("    " + "  ".join(s.rjust(width) for s in row)
                       + ("  …" if rows.shape[1] > c else ""))
        if rows.shape[0] > r:
            more = rows.shape[0] - r
            out.append(f"    ⋮  ({more} more row{'s' if more > 1 else ''})")
        return out

    def _block(self, lines):
        self.lines += ["```text", *lines, "```", ""]

    def _para(self, text):
        # wrapped for a terminal; Markdown joins the lines of a paragraph again
        self.lines += [textwrap.fill(text, width=96, break_long_words=False,
                                     break_on_hyphens=False), ""]

    # finite differences
    def _value(self):
        v = float(self.loss.forward(self.net.forward(self.X), self.y))
        return v, abs(v)

    def _check(self, name, analytic, arr, how, override=None) -> list[str]:
        """Compare ``analytic`` with central differences of L in the entries of ``arr``
        (perturbed in place and restored; ``override = (layer, make)`` makes the layer's
        output ``make()`` meanwhile). Returns the check line."""
        if not self.o["check"]:
            return []
        if analytic is None:
            return [f"  check –  {name}: not computed"]
        analytic = np.asarray(analytic, dtype=np.float64)
        if override is not None:
            self.rec.override[id(override[0])] = override[1]
        try:
            row = _compare(arr, analytic, self._value, self.o["eps"], self._indices(arr))
        finally:
            if override is not None:
                del self.rec.override[id(override[0])]
        ok = row["error"] <= self.o["tol"] and not row["inconclusive"]
        row.update(name=name, shape=tuple(arr.shape), ok=ok, how=how)
        self.checks.append(row)
        line = (f"  check {_mark(row)} {name} ({how}, {row['checked']}/{row['total']} "
                f"entries): max |analytic − numeric| {row['max_abs']:.1e}, error "
                f"{_e(row['error'])}")
        if row["inconclusive"]:
            line += (f"; inconclusive: finite differences of L are noisy here (±"
                     f"{row['noise']:.1e}), is L a smooth, deterministic function of it?")
        return [line]

    def _indices(self, arr):
        size, k = int(arr.size), self.o["max_checks"]
        if size <= k:
            return list(np.ndindex(*arr.shape))
        flat = np.sort(self.rng.choice(size, size=k, replace=False))
        return list(zip(*np.unravel_index(flat, arr.shape)))

    def _output_check(self, grad_name, analytic, producer):
        """Check ``analytic`` = ∂L/∂(output of ``producer``) by perturbing that output."""
        if producer is None:
            return []
        base = self.rec.outputs.get(id(producer))
        if base is None:
            return []
        base = base.copy()
        out_name = grad_name[1:] if grad_name.startswith("d") else grad_name
        return self._check(grad_name, analytic, base, f"perturbing {out_name}",
                           (producer, lambda: base.copy()))

    # the run
    def run(self) -> Explanation:
        from backprop.graph import nodes

        net, X = self.net, self.X
        self.items = nodes(net, input_shape=(None, *X.shape[1:]))
        if not self.training:
            _eval_equations(self.items)
        self.rec = _Recorder(net)
        out = net.forward(X)
        L = float(self.loss.forward(out, self.y))
        self.loss.validate_labels = False  # checked once: the evaluations skip it
        dA = np.array(self.loss.backward())
        net.zero_grad()
        net.backward(dA.copy(), need_input_grad=False)
        self.rec.on = False
        self.L, self.dA, self.out = L, dA, np.array(out)
        self._header()
        self.lines += ["## Forward pass", ""]
        self._forward(self.items)
        self._loss_forward()
        self.lines += ["## Backward pass", ""]
        self._loss_backward()
        self._backward(self.items, producer=None, partial=False)
        self._summary()
        return Explanation("\n".join(self.lines).rstrip() + "\n", self.checks)

    def _header(self):
        net, X, o = self.net, self.X, self.o
        mode = "training" if self.training else "eval"
        self.lines += [f"# Backpropagation on one batch: `{net!r}`", ""]
        self._para(f"Loss `{self.loss!r}`, batch of N = {len(X)} rows. Computed on a float64 "
                   f"copy of the model in {mode} mode (the model is not changed). Matrices "
                   f"are (rows, columns); at most {o['max_rows']} rows and {o['max_cols']} "
                   "columns are shown (… and ⋮ mark the rest).")
        if o["check"]:
            self._para(
                f"Each gradient is checked against central differences of L (step "
                f"h = {o['eps']:g}): ✓ when |analytic − numeric|, beyond the "
                f"finite-difference noise, is at most {o['tol']:g} × the gradient's largest "
                f"entry; tensors above {o['max_checks']} entries are checked on "
                f"{o['max_checks']} entries drawn at random (seed {o['seed']}).")
        self.lines += ["### Input", ""]
        rows = self._matrix("X", X)
        label = "Y (class labels)" if self.y.dtype.kind in "iu" else "Y"
        self._block(rows + self._matrix(label, self.y))

    # forward ---------------------------------------------------------------------------------
    def _forward(self, items):
        from backprop.layers import Dense, Residual

        for node in items:
            m, key = node["module"], id(node["module"])
            self.lines += [f"### [{node['name']}] {node['layer']}", ""]
            if node["children"]:
                x, a = node["input"], node["output"]
                self._para(f"{a} = {x} + F({x}), where F is {_span(node)} below."
                           if isinstance(m, Residual) else
                           f"{a} is the output of {_span(node)} below.")
                self._forward(node["children"])
                self.lines += [f"### [{node['name']}] {node['layer']}: output", ""]
                self._block([*node["forward"], *self._matrix(node["output"],
                                                            self.rec.outputs.get(key))])
                continue
            if key not in self.rec.outputs:
                self._para("(not run in the forward pass)")
                continue
            if isinstance(m, Dense):
                self._block(self._dense_forward(node, m))
                continue
            rows = list(node["forward"])
            for (symbol, _), p in zip(node["param_symbols"], _own_params(m)):
                rows += self._matrix(symbol, p.data)
            self._block(rows + self._matrix(node["output"], self.rec.outputs[key]))

    def _dense_forward(self, node, m):
        key, tag, x, a = id(m), node["name"], node["input"], node["output"]
        z = f"Z{tag}"
        inp, zval = self.rec.inputs[key], self.rec.z[key]
        bias = m.b is not None
        shapes = (f"{x} {_shape(inp.shape)} · W{tag}ᵀ {_shape(m.W.data.T.shape)}"
                  + (f" + b{tag} {_shape(m.b.data.shape)}" if bias else "")
                  + f" → {_shape(zval.shape)}")
        rows = [f"{z} = {x} W{tag}ᵀ" + (f" + b{tag}" if bias else "") + f"      {shapes}"]
        rows += self._matrix(f"W{tag}", m.W.data)
        if bias:
            rows += self._matrix(f"b{tag}", m.b.data)
        rows += self._matrix(z, zval)
        act = m.activation.kernel
        if act == "identity":
            rows.append(f"{a} = {z}   (no activation)")
        else:
            rows.append(f"{a} = {_sigma(m.activation, z)}")
            rows += self._matrix(a, self.rec.outputs[key])
        return rows

    def _loss_forward(self):
        out = self.items[-1]["output"]
        formula, _ = _loss_formulas(self.loss, out, self.out, self.y)
        self.lines += ["### Loss", ""]
        self._block([f"L = {type(self.loss).__name__}({out}, Y) = {formula}",
                     f"L = {self._num(self.L)}"])

    # backward --------------------------------------------------------------------------------
    def _loss_backward(self):
        out = self.items[-1]["output"]
        _, grad = _loss_formulas(self.loss, out, self.out, self.y)
        self.lines += ["### Loss gradient", ""]
        rows = [f"d{out} = ∂L/∂{out} = {grad}   (loss.backward())"]
        rows += self._matrix(f"d{out}", self.dA)
        rows += self._output_check(f"d{out}", self.dA, self.items[-1]["module"])
        self._block(rows)
        if self.loss.reduction == "mean":
            self._para("The batch mean is in this gradient (the factor s): every gradient "
                       "below, ∂W = δᵀX and ∂b = Σ_rows δ included, is already averaged over "
                       "the batch.")

    def _backward(self, items, producer, partial):
        """The nodes of ``items`` in reverse order. ``producer`` is the layer whose output
        the first node reads (None: the data X); ``partial``: the first node's input
        gradient is checked by the enclosing block (for a Residual, it is only the part
        through the block): ``partial`` is then the note that says so, else False."""
        from backprop.layers import Dense, Residual

        producers = [producer] + [n["module"] for n in items[:-1]]
        for i in range(len(items) - 1, -1, -1):
            node, prev = items[i], producers[i]
            m, key = node["module"], id(node["module"])
            first_partial = partial if i == 0 else False
            self.lines += [f"### [{node['name']}] {node['layer']}", ""]
            if node["children"]:
                self._para(f"The block: {_span(node, reverse=True)}, then "
                           + ("the sum." if isinstance(m, Residual) else "its input gradient."))
                note = ("only the part through the block: checked in the sum below"
                        if isinstance(m, Residual) else
                        "checked below, as the block's input gradient")
                self._backward(node["children"], producer=prev, partial=note)
                self.lines += [f"### [{node['name']}] {node['layer']}: input gradient", ""]
                head = node["backward"] if isinstance(m, Residual) else \
                    [f"{node['input_grad']} = the gradient node {node['name']}.0 returns"]
                self._block([*head, *self._input_grad(node, prev, first_partial)])
                continue
            if key not in self.rec.grad_in:
                self._para("(its backward pass did not run)")
                continue
            nxt = items[i + 1] if i + 1 < len(items) else None
            if isinstance(m, Dense):
                rows = self._dense_backward(node, m, nxt)
            else:
                rows = [*node["backward"]]
                for (symbol, _), p in zip(node["param_symbols"], _own_params(m)):
                    rows += self._matrix(f"∂{symbol}", p.grad)
                    rows += self._check(f"∂{symbol}", p.grad, p.data, f"perturbing {symbol}")
            self._block(rows + self._input_grad(node, prev, first_partial))

    def _input_grad(self, node, prev, partial):
        """The gradient ``node`` returns, and its check."""
        name, key = node["input_grad"], id(node["module"])
        grad = self.rec.grad_out.get(key)
        if grad is None:
            if prev is None:
                return [f"({name} is not computed: X is the data, and Sequential.backward "
                        "skips its gradient)"]
            return [f"({name} is not computed)"]
        rows = self._matrix(f"{name}", grad)
        if partial:
            return rows + [f"  ({partial})"]
        return rows + self._output_check(name, grad, prev)

    def _dense_backward(self, node, m, nxt):
        from backprop.layers import Dense

        key, tag, x, a = id(m), node["name"], node["input"], node["output"]
        z = f"Z{tag}"
        delta = self.rec.delta.get(key)
        act = m.activation
        if act.kernel == "identity":
            eq = f"δ{tag} = ∂L/∂{z} = d{a}   (no activation: σ′ = 1)"
        elif act.kernel == "softmax":
            eq = f"δ{tag} = ∂L/∂{z} = {a} ⊙ (d{a} − Σ_row d{a} ⊙ {a})   (softmax)"
        elif act.kernel == "log_softmax":
            eq = f"δ{tag} = ∂L/∂{z} = d{a} − softmax({z}) Σ_row d{a}   (log_softmax)"
        else:
            slope = _slope(act)
            eq = f"δ{tag} = ∂L/∂{z} = d{a} ⊙ σ′({z})"
            if nxt is not None and isinstance(nxt["module"], Dense):
                eq += f" = (δ{nxt['name']} W{nxt['name']}) ⊙ σ′({z})"
            eq += f"   σ = {act.kernel}, σ′ = {slope}"
        if node is self.items[-1]:
            eq += "   (δᴸ: the output layer)"
        rows = [eq]
        if delta is None:
            rows += ["  (δ not observed: this layer does not call backward_observer)"]
        else:
            rows += self._matrix(f"δ{tag}", delta)
            zval = self.rec.z[key].copy()
            rows += self._check(f"δ{tag}", delta, zval, f"perturbing {z}",
                                (m, lambda: m.activation.forward(zval.copy())))
        inp = self.rec.inputs[key]
        rows += [f"∂W{tag} = δ{tag}ᵀ {x}      δ{tag}ᵀ {_shape(self.rec.z[key].shape[::-1])} · "
                 f"{x} {_shape(inp.shape)} → {_shape(m.W.data.shape)}"]
        rows += self._matrix(f"∂W{tag}", m.W.grad)
        rows += self._check(f"∂W{tag}", m.W.grad, m.W.data, f"perturbing W{tag}")
        if m.b is not None:
            rows += [f"∂b{tag} = Σ_rows δ{tag}"]
            rows += self._matrix(f"∂b{tag}", m.b.grad)
            rows += self._check(f"∂b{tag}", m.b.grad, m.b.data, f"perturbing b{tag}")
        if self.rec.grad_out.get(key) is not None:
            rows += [f"{node['input_grad']} = δ{tag} W{tag}   (passed to the node before)"]
        return rows

    def _summary(self):
        if not self.o["check"]:
            return
        self.lines += ["## Gradient checks", ""]
        self.lines += ["| gradient | shape | entries checked | max abs error | error | |",
                       "|---|---|---|---|---|---|"]
        for c in self.checks:
            self.lines.append(f"| {c['name']} | {_shape(c['shape'])} | {c['checked']}/"
                              f"{c['total']} | {c['max_abs']:.1e} | {_e(c['error'])} | "
                              f"{_mark(c)} |")
        self.lines.append("")
        bad = [c["name"] for c in self.checks if not c["ok"] and not c["inconclusive"]]
        unsure = [c["name"] for c in self.checks if c["inconclusive"]]
        if bad:
            self._para(f"**✗ {len(bad)} of {len(self.checks)} gradients disagree with central "
                       f"differences: {', '.join(bad)}.** The first one in backward order "
                       "points at the layer whose backward is wrong.")
        if unsure:
            self._para(f"**? {len(unsure)} of {len(self.checks)} gradients could not be "
                       f"checked (the finite differences are noise): {', '.join(unsure)}.**")
        if not bad and not unsure:
            self._para(f"**✓ All {len(self.checks)} gradients agree with central "
                       "differences.**")


# -- helpers ---------------------------------------------------------------------------------
def _span(node, reverse=False) -> str:
    """``nodes 2.0 … 2.1`` (``node 2.0`` for one) of a block node's children."""
    first, last = node["children"][0]["name"], node["children"][-1]["name"]
    if first == last:
        return f"node {first}"
    return f"nodes {last} … {first} in reverse" if reverse else f"nodes {first} … {last}"


def _mark(row) -> str:
    return "✓" if row["ok"] else "?" if row["inconclusive"] else "✗"


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _shape(shape) -> str:
    shape = tuple(int(d) for d in shape)
    return f"({shape[0]},)" if len(shape) == 1 else str(shape)


def _eval_equations(items):
    """Replace the training-mode equations of Dropout and BatchNorm1d with eval mode's."""
    from backprop.layers import BatchNorm1d, Dropout

    for node in items:
        _eval_equations(node["children"])
        m, tag, x, a, dx = (node["module"], node["name"], node["input"], node["output"],
                            node["input_grad"])
        if isinstance(m, Dropout):
            node["forward"] = [f"{a} = {x}   (eval mode: Dropout passes its input on)"]
            node["backward"] = [f"{dx} = d{a}"]
        elif isinstance(m, BatchNorm1d):
            node["forward"] = [f"{a} = γ{tag} ({x} - μ) / sqrt(σ² + ε) + β{tag}   (eval mode: "
                               "μ, σ² the running statistics)"]
            node["backward"] = [f"∂γ{tag} = Σ_rows d{a} ⊙ x̂, ∂β{tag} = Σ_rows d{a}",
                                f"{dx} = d{a} γ{tag} / sqrt(σ² + ε)"]


def _own_params(layer):
    from backprop.parameter import Parameter

    return [v for k, v in vars(layer).items() if k[0] != "_" and isinstance(v, Parameter)]


def _record(kernel):
    from backprop.kernels.activations import RECORDS

    return RECORDS.get(kernel)


def _sigma(activation, z) -> str:
    kernel = activation.kernel
    if kernel == "softmax":
        return f"softmax({z})   (per row: e^{z}ᵢ / Σⱼ e^{z}ⱼ)"
    if kernel == "log_softmax":
        return f"log_softmax({z})   (per row: {z}ᵢ − log Σⱼ e^{z}ⱼ)"
    record = _record(kernel)
    formula = f",  σ(z) = {record.formula}" if record is not None else ""
    alpha = f" (α = {activation.alpha:g})" if record is not None and record.alpha else ""
    return f"σ({z})   σ = {kernel}{formula}{alpha}"


def _slope(activation) -> str:
    record = _record(activation.kernel)
    if record is None:
        return "its derivative"
    slope = record.slope
    if slope == "(from z)":
        return "computed from z"
    return f"{slope} with a = σ(z)" if re.search(r"\ba\b", slope) else slope


def _fraction(n: int) -> str:
    return "1" if n == 1 else f"1/{n}"


def _loss_formulas(loss, out, pred, y):
    """``(L formula, ∂L/∂out formula)`` of the loss, with the scale ``s`` written out."""
    name = type(loss).__name__
    n, size = pred.shape[0], pred.size
    per_row = "CrossEntropy" in name or name == "NLLLoss"
    if loss.reduction == "sum":
        s = "s = 1 (reduction='sum')"
    elif per_row:
        s = f"s = {_fraction(n)} = 1/N"
    else:
        s = f"s = {_fraction(size)} = 1/(N·{size // n})" if size != n else \
            f"s = {_fraction(n)} = 1/N"
    d = f"({out} − Y)"
    if name == "MSELoss":
        if loss.half:
            return f"s ½ Σ {d}²,  {s}", f"s {d}"
        return f"s Σ {d}²,  {s}", f"2 s {d}"
    if name == "L1Loss":
        return f"s Σ |{out} − Y|,  {s}", f"s sign{d}"
    if name == "BCEWithLogitsLoss":
        return (f"s Σ max({out}, 0) − {out} ⊙ Y + log(1 + e^−|{out}|),  {s}",
                f"s (sigmoid({out}) − Y)")
    if name == "BCELoss":
        return (f"−s Σ Y log {out} + (1 − Y) log(1 − {out}),  {s}",
                f"s {d} / ({out} (1 − {out}))")
    if "CrossEntropy" in name:
        smooth = getattr(loss, "label_smoothing", 0.0)
        target = "one-hot rows of the labels" if y.ndim == 1 else "the target rows"
        if smooth:
            target += f", smoothed: (1 − {smooth:g}) Y + {smooth:g}/C"
        return (f"s Σᵢ (log Σₖ e^{out}ᵢₖ − Σₖ Yᵢₖ {out}ᵢₖ),  Y = {target},  {s}",
                f"s (softmax({out}) − Y)")
    if name == "NLLLoss":
        return f"−s Σᵢ {out}[i, yᵢ],  {s}", "−s at each row's label, 0 elsewhere"
    return f"{name}({out}, Y)", "loss.backward()"


def _compare(arr, analytic, value, eps, indices) -> dict:
    """:func:`backprop.gradcheck`'s comparison (its module docstring) on the entries
    ``indices`` of ``arr``: ``checked``, ``total``, ``max_abs`` (max ``|gᵢ − Dᵢ|``),
    ``error`` (beyond the noise, relative to the largest gradient), ``noise`` (the largest
    tolerance ``atolᵢ``), ``noisy`` (the entries whose measured noise exceeds a tenth of the
    gradient's scale), ``inconclusive`` (more than half of them are)."""
    g = np.array([analytic[i] for i in indices], dtype=np.float64)
    fine = np.empty(len(indices))
    mag = np.empty(len(indices))
    for k, idx in enumerate(indices):
        fine[k], mag[k] = _quotient(arr, idx, eps, value)
    with np.errstate(invalid="ignore", over="ignore"):
        rounding = NOISE_FACTOR * EPS_MACHINE * mag / eps
        diff = np.abs(g - fine)
        measured = ~(diff <= rounding)
        delta = np.zeros(len(indices))
        for k in np.nonzero(measured)[0]:
            delta[k] = abs(_quotient(arr, indices[k], 2.0 * eps, value)[0] - fine[k])
        floor = float(np.median(delta[measured])) if measured.any() else 0.0
        atol = rounding + NOISE_FACTOR * np.where(measured, delta + floor, 0.0)
        scale = max(float(np.abs(analytic).max(initial=0.0)),
                    float(np.abs(fine).max(initial=0.0)))
        excess = float(np.maximum(diff - atol, 0.0).max(initial=0.0))
        # the measured noise covers a nondeterministic or non-smooth L as well: where it is
        # a tenth of the gradient's scale on most entries, nothing was really compared
        noisy = int(np.count_nonzero(measured & ~(atol <= 0.1 * scale)))
    if not (np.isfinite(diff).all() and np.isfinite(atol).all()):
        err = float("inf")
    else:
        err = excess / scale if excess > 0.0 else 0.0
    return {"checked": len(indices), "total": int(arr.size),
            "max_abs": float(diff.max(initial=0.0)), "error": err,
            "noise": float(atol.max(initial=0.0)), "noisy": noisy,
            "inconclusive": err != float("inf") and 2 * noisy > len(indices)}
