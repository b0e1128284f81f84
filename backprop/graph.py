"""The computational graph of a model, printed: the forward pass node by node, then the
backward pass as its reverse traversal, each node with the equation it computes, its output
shape and the tensors it keeps for its backward pass; or drawn, as Graphviz DOT.

    print(bp.graph.describe(model, loss="cross_entropy", input_shape=(64,)))
    open("model.dot", "w").write(bp.graph.to_dot(model, loss="cross_entropy"))
    # then: dot -Tsvg model.dot -o model.svg

Backpropagation is the reverse traversal of this graph: every node receives the gradient of
the loss with respect to its output (``dA``), multiplies it by its local derivatives (the
chain rule) and passes ``∂L/∂input`` to the node before it, while the parameters' gradients
(``∂W``, ``∂b``...) are collected on the way. The equations shown are the ones the layers of
:mod:`backprop.layers` implement (their docstrings state them in full); the shapes are
those of a batch of ``N`` rows (known where the first layer declares its input features, or
from ``input_shape``).

What each node keeps between its forward and its backward pass (the memory a training step
holds per layer; "by reference" means the array of the previous node, not a copy)::

    Dense        X (by reference) and one buffer holding A written over Z, when σ′ can be
                 computed from A (identity, relu, leaky_relu, sigmoid, tanh, softmax);
                 X, Z and A in separate buffers when σ′ needs Z (``K.NEEDS_Z``: elu,
                 softplus, gelu, silu) and for log_softmax
    Dropout      the mask's key only: M is recomputed from a hash in backward
    BatchNorm1d  X (by reference), μ and 1/σ (x̂ is recomputed in backward)
    Residual     nothing of its own (the skip needs no tensor; its block keeps its own)
    Flatten      the input's shape
    activations  X (by reference) and A; softmax and log_softmax A only

The DOT drawing (:func:`to_dot`) has one box per node, one ellipse per parameter and one
for the input (and target and loss when ``loss`` is given). Forward data flow is drawn
with solid edges (a Residual's skip edge labelled ``skip``), the backward pass with dashed
edges in the reverse direction, labelled with the gradient they carry (``dA1``, ``∂W0``).
"""
from __future__ import annotations

__all__ = ["describe", "nodes", "to_dot"]


def _activation_lines(layer, z, a):
    """Forward and backward lines of an activation ``A = σ(Z)`` (elementwise or row)."""
    kernel = getattr(layer, "kernel", "identity")
    if kernel == "identity":
        return [], []
    if kernel == "softmax":
        return ([f"{a} = softmax({z})  (per row)"],
                [f"d{z} = {a} ⊙ (d{a} - Σ_row d{a} ⊙ {a})"])
    if kernel == "log_softmax":
        return ([f"{a} = {z} - log Σ_row e^{z}"],
                [f"d{z} = d{a} - softmax({z}) Σ_row d{a}"])
    return [f"{a} = {kernel}({z})"], [f"d{z} = d{a} ⊙ {kernel}'({z})"]


def _shape(shape) -> str:
    """``(None, 8)`` as ``(N, 8)``; None (unknown) as ``?``."""
    if shape is None:
        return "?"
    dims = ["N" if d is None else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _out_shape(layer, in_shape):
    if in_shape is None:
        return None
    try:
        return layer.output_shape(in_shape)
    except Exception:  # a custom layer's output_shape may not expect a None batch axis
        return None


def _keeps(layer, x, a, in_shape, out_shape) -> list[str]:
    """What ``layer`` keeps for its backward pass (see the module docstring), with shapes."""
    from backprop import kernels as K
    from backprop.activations import Activation
    from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual
    from backprop.model import Sequential

    xs, outs = _shape(in_shape), _shape(out_shape)
    if isinstance(layer, Dense):
        z = f"Z{a[1:]}"
        act = layer.activation.kernel
        if act in K.NEEDS_Z or act == "log_softmax":
            return [f"{x} {xs} by reference", f"{z} {outs}", f"{a} {outs}"]
        if act == "identity":
            return [f"{x} {xs} by reference", f"{a} = {z} {outs}"]
        return [f"{x} {xs} by reference", f"{a} {outs} (written over {z})"]
    if isinstance(layer, Dropout):
        return ["the mask key (M is recomputed from a hash in backward)"]
    if isinstance(layer, BatchNorm1d):
        m = (layer.num_features,)
        return [f"{x} {xs} by reference", f"μ {_shape(m)}", f"1/σ {_shape(m)}"]
    if isinstance(layer, (Residual, Sequential)):
        return []
    if isinstance(layer, Flatten):
        return [f"the shape of {x}"]
    if isinstance(layer, Activation):
        if layer.kernel in ("softmax", "log_softmax"):
            return [f"{a} {outs}"]
        return [f"{x} {xs} by reference", f"{a} {outs}"]
    return ["unknown (a custom layer)"]


def nodes(model, prefix: str = "", source: str = "X", source_grad: str | None = None,
          input_shape=None) -> list[dict]:
    """One record per node of ``model`` in forward order, with the keys

    - ``name`` (``"2.0"``: node 0 of the block of node 2), ``layer`` (its repr), ``module``
      (the layer object), ``children`` (the nodes of a Residual's block or a nested
      Sequential);
    - ``input``, ``output``, ``input_grad``: the names of the node's input, output and of
      the gradient it returns (``"A1"``, ``"A2"``, ``"dA1"``);
    - ``forward``, ``backward``: the equations, as lines;
    - ``params``: the parameters' full names; ``param_symbols``: ``(symbol, shape)`` of the
      node's own parameters (``("W0", (8, 4))``);
    - ``in_shape``, ``out_shape``: with ``None`` for the batch axis, None where unknown;
    - ``keeps``: what the node keeps for its backward pass, as phrases.

    ``source`` names the input (``source_grad`` the name its gradient gets); ``input_shape``
    is the input's full shape (batch axis included, e.g. ``(None, 4)``).
    """
    from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual
    from backprop.model import Sequential
    from backprop.parameter import Parameter

    out = []
    layers = getattr(model, "layers", [model])
    shape = input_shape
    for i, layer in enumerate(layers):
        tag = f"{prefix}{i}"
        x, a = (f"A{prefix}{i - 1}" if i else source), f"A{tag}"
        dx = f"d{x}" if i or source_grad is None else source_grad
        params = [p.name for p in layer.parameters()]
        in_shape, shape = shape, _out_shape(layer, shape)
        own = [(k, v) for k, v in vars(layer).items()
               if k[0] != "_" and isinstance(v, Parameter)]
        symbols = {"gamma": "γ", "beta": "β"}
        node = {"name": tag, "layer": repr(layer), "module": layer, "params": params,
                "children": [], "input": x, "output": a, "input_grad": dx,
                "in_shape": in_shape, "out_shape": shape,
                "param_symbols": [(symbols.get(k, k) + tag, tuple(v.shape)) for k, v in own],
                "keeps": _keeps(layer, x, a, in_shape, shape)}
        if isinstance(layer, Dense):
            z = f"Z{tag}"
            fwd = [f"{z} = {x} W{tag}ᵀ" + (f" + b{tag}" if layer.b is not None else "")]
            bwd = []
            act_f, act_b = _activation_lines(layer.activation, z, a)
            if act_f:
                fwd += act_f
                bwd += act_b
            else:
                fwd[0] = fwd[0].replace(f"{z} = ", f"{a} = {z} = ")
                bwd.append(f"d{z} = d{a}")
            bwd += [f"∂W{tag} = d{z}ᵀ {x}"] + ([f"∂b{tag} = Σ_rows d{z}"] if layer.b is not None
                                               else [])
            bwd.append(f"{dx} = d{z} W{tag}")
        elif isinstance(layer, Dropout):
            fwd = [f"{a} = {x} ⊙ M{tag} / (1 - {layer.p:g})  (training; M{tag} a Bernoulli mask)"]
            bwd = [f"{dx} = d{a} ⊙ M{tag} / (1 - {layer.p:g})"]
        elif isinstance(layer, BatchNorm1d):
            fwd = [f"{a} = γ{tag} ({x} - μ_B) / sqrt(σ²_B + ε) + β{tag}"]
            bwd = [f"∂γ{tag} = Σ_rows d{a} ⊙ x̂, ∂β{tag} = Σ_rows d{a}",
                   f"{dx} = γ{tag} r / N (N d{a} - ∂β{tag} - x̂ ∂γ{tag})"]
        elif isinstance(layer, Flatten):
            fwd = [f"{a} = reshape({x}, (N, -1))"]
            bwd = [f"{dx} = reshape(d{a}, shape of {x})"]
        elif isinstance(layer, Residual):
            through = f"d{x}|F"
            inner = nodes(layer.block, prefix=f"{tag}.", source=x, source_grad=through,
                          input_shape=in_shape)
            last = f"A{inner[-1]['name']}" if inner else x
            fwd = [f"{a} = {x} + F({x})   with F the block below ({last} = F({x}))"]
            bwd = [f"{dx} = d{a} + {through}   (the skip adds the gradient through F, "
                   f"with d{last} = d{a})"]
            node["children"] = inner
        elif isinstance(layer, Sequential):
            inner = nodes(layer, prefix=f"{tag}.", source=x, source_grad=dx,
                          input_shape=in_shape)
            last = f"A{inner[-1]['name']}"
            fwd = [f"{a} = {last}   (the block below)"]
            bwd = [f"{dx}: from the block, which starts from d{last} = d{a}"]
            node["children"] = inner
        else:
            act_f, act_b = _activation_lines(layer, x, a)
            act_b = [line.replace(f"d{x} = ", f"{dx} = ", 1) for line in act_b]
            fwd, bwd = (act_f or [f"{a} = {type(layer).__name__}({x})"],
                        act_b or [f"{dx} = backward of {type(layer).__name__}(d{a})"])
        node["forward"], node["backward"] = fwd, bwd
        out.append(node)
    return out


def _render(items, lines, key, indent, reverse):
    for node in (reversed(items) if reverse else items):
        head = f"{indent}[{node['name']}] {node['layer']}"
        if node["params"]:
            head += f"   params: {', '.join(node['params'])}"
        lines.append(head)
        if node["children"] and reverse:
            _render(node["children"], lines, key, indent + "    ", reverse)
        lines += [f"{indent}    {eq}" for eq in node[key]]
        if key == "forward":
            if node["out_shape"] is not None:
                lines.append(f"{indent}    shape: {node['output']} {_shape(node['out_shape'])}")
            if node["keeps"]:
                lines.append(f"{indent}    keeps for backward: {', '.join(node['keeps'])}")
        if node["children"] and not reverse:
            _render(node["children"], lines, key, indent + "    ", reverse)


def _input_shape(model, input_shape):
    """The full input shape ``(None, ...)``: from ``input_shape`` (without the batch axis),
    else from the model's ``in_features``; None where unknown."""
    if input_shape is not None:
        return (None, *tuple(input_shape))
    n = getattr(model, "in_features", None)
    return None if n is None else (None, n)


def describe(model, loss=None, input_shape=None) -> str:
    """The graph of ``model`` (and ``loss``, a name or object) as text: the forward pass,
    then the backward pass in reverse order. Each forward node shows its output shape (for
    a batch of ``N`` rows, where known: from ``input_shape``, without the batch axis, or the
    first layer's ``in_features``) and the tensors it keeps for backward. ``input_shape``
    also appends the table of :meth:`Sequential.summary`."""
    items = nodes(model, input_shape=_input_shape(model, input_shape))
    last = f"A{items[-1]['name']}" if items else "X"
    first = _input_shape(model, input_shape)
    lines = ["Forward (each node computes its output from the one before):"]
    if first is not None:
        lines.append(f"  [input] X {_shape(first)}")
    _render(items, lines, "forward", "  ", reverse=False)
    if loss is not None:
        from backprop.training import make_loss

        loss = make_loss(loss)
        lines.append(f"  [loss] {loss!r}")
        lines.append(f"    L = {type(loss).__name__}({last}, Y)")
    lines.append("")
    lines.append("Backward (the reverse traversal: each node turns d(output) into d(input), "
                 "collecting its parameters' gradients):")
    if loss is not None:
        lines.append("  [loss]")
        lines.append(f"    d{last} = ∂L/∂{last}  (loss.backward())")
    _render(items, lines, "backward", "  ", reverse=True)
    if input_shape is not None and hasattr(model, "summary"):
        lines += ["", model.summary(input_shape)]
    return "\n".join(lines)


# -- Graphviz DOT ----------------------------------------------------------------------------
def _q(text: str) -> str:
    """A DOT double-quoted string (``\\n`` in ``text`` stays a DOT line break)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _id(name: str) -> str:
    return "n" + name.replace(".", "_")


def _dot_nodes(items, source_id, lines, indent):
    """Emit the nodes and edges of ``items`` fed by ``source_id``; returns the id of the
    node whose output is the last one (what the next node reads)."""
    prev = source_id
    for node in items:
        nid = _id(node["name"])
        label = [f"[{node['name']}] {node['layer']}", *node["forward"],
                 f"out {_shape(node['out_shape'])}"]
        if node["keeps"]:
            label.append("keeps: " + ", ".join(node["keeps"]))
        if node["children"]:
            # a block: a cluster holding its nodes, then (Residual) the ⊕ node that adds
            # the skip; a nested Sequential's output is its last node's
            lines.append(f"{indent}subgraph cluster_{nid} {{")
            lines.append(f"{indent}  label={_q(node['layer'])}; style=rounded; color=gray60;")
            last = _dot_nodes(node["children"], prev, lines, indent + "  ")
            lines.append(f"{indent}}}")
            from backprop.layers import Residual

            if isinstance(node["module"], Residual):
                x, a = node["input"], node["output"]
                add = f"[{node['name']}] ⊕ skip connection\n{a} = {x} + F({x})\n" \
                      f"out {_shape(node['out_shape'])}"
                lines.append(f"{indent}{nid} [shape=box, style=rounded, label={_q(add)}];")
                lines.append(f"{indent}{last} -> {nid} [label={_q(f'F({x})')}];")
                lines.append(f"{indent}{prev} -> {nid} [label=\"skip\"];")
                # backward: the sum passes d(output) unchanged to both of its inputs
                lines.append(f"{indent}{nid} -> {last} [style=dashed, constraint=false, "
                             f"label={_q('d' + node['children'][-1]['output'])}];")
                lines.append(f"{indent}{nid} -> {prev} [style=dashed, constraint=false, "
                             f"label={_q(f'd{a} (skip)')}];")
                prev = nid
            else:
                prev = last
            continue
        lines.append(f"{indent}{nid} [shape=box, label={_q(chr(10).join(label))}];")
        lines.append(f"{indent}{prev} -> {nid};")
        lines.append(f"{indent}{nid} -> {prev} [style=dashed, constraint=false, "
                     f"label={_q(node['input_grad'])}];")
        for k, (symbol, shape) in enumerate(node["param_symbols"]):
            pid = f"p{nid[1:]}_{k}"
            lines.append(f"{indent}{pid} [shape=ellipse, style=filled, fillcolor=lightyellow, "
                         f"label={_q(f'{symbol} {_shape(shape)}')}];")
            lines.append(f"{indent}{pid} -> {nid};")
            lines.append(f"{indent}{nid} -> {pid} [style=dashed, constraint=false, "
                         f"label={_q('∂' + symbol)}];")
        prev = nid
    return prev


def to_dot(model, loss=None, input_shape=None) -> str:
    """The graph of ``model`` (and ``loss``) as a Graphviz ``digraph`` (render it with
    ``dot -Tsvg``): nodes as boxes with their equations, output shape and kept tensors;
    parameters, input, target and loss as ellipses; forward edges solid, backward
    (gradient) edges dashed and reversed, labelled with the gradient they carry; a
    Residual's block as a cluster with a ⊕ node and a ``skip`` edge."""
    first = _input_shape(model, input_shape)
    items = nodes(model, input_shape=first)
    lines = ["digraph backprop {", "  rankdir=TB;", '  node [fontname="monospace"];',
             '  edge [fontname="monospace"];',
             f"  X [shape=ellipse, label={_q('X ' + _shape(first))}];"]
    last = _dot_nodes(items, "X", lines, "  ")
    out = items[-1]["output"] if items else "X"
    if loss is not None:
        from backprop.training import make_loss

        loss = make_loss(loss)
        lines.append(f"  Y [shape=ellipse, label={_q('Y')}];")
        lines.append(f"  loss [shape=doubleoctagon, label="
                     f"{_q(f'{loss!r}' + chr(10) + f'L = {type(loss).__name__}({out}, Y)')}];")
        lines.append(f"  {last} -> loss;")
        lines.append("  Y -> loss;")
        lines.append(f"  loss -> {last} [style=dashed, constraint=false, "
                     f"label={_q(f'd{out} = ∂L/∂{out}')}];")
    else:
        lines.append(f"  grad [shape=plaintext, label={_q(f'd{out} = ∂L/∂{out} (given)')}];")
        lines.append(f"  {last} -> grad [style=invis];")
        lines.append(f"  grad -> {last} [style=dashed, constraint=false];")
    lines.append("}")
    return "\n".join(lines)
