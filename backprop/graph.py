"""The computational graph of a model, printed: the forward pass node by node, then the
backward pass as its reverse traversal, each node with the equation it computes.

    print(bp.graph.describe(model, loss="cross_entropy", input_shape=(64,)))

Backpropagation is the reverse traversal of this graph: every node receives the gradient of
the loss with respect to its output (``dA``), multiplies it by its local derivatives (the
chain rule) and passes ``∂L/∂input`` to the node before it, while the parameters' gradients
(``∂W``, ``∂b``...) are collected on the way. The equations shown are the ones the layers of
:mod:`backprop.layers` implement (their docstrings state them in full); the shapes are
those of a batch of ``N`` rows.
"""
from __future__ import annotations

__all__ = ["describe", "nodes"]


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


def nodes(model, prefix: str = "", source: str = "X", source_grad: str | None = None
          ) -> list[dict]:
    """One record per node of ``model`` in forward order: ``{"name", "layer", "forward",
    "backward", "params", "children"}`` (``children``: the nodes of a Residual block).
    ``source`` names the input (``source_grad`` the name its gradient gets)."""
    from backprop.layers import BatchNorm1d, Dense, Dropout, Flatten, Residual

    out = []
    layers = getattr(model, "layers", [model])
    for i, layer in enumerate(layers):
        tag = f"{prefix}{i}"
        x, a = (f"A{prefix}{i - 1}" if i else source), f"A{tag}"
        dx = f"d{x}" if i or source_grad is None else source_grad
        params = [p.name for p in layer.parameters()]
        node = {"name": tag, "layer": repr(layer), "params": params, "children": []}
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
            inner = nodes(layer.block, prefix=f"{tag}.", source=x, source_grad=through)
            last = f"A{inner[-1]['name']}" if inner else x
            fwd = [f"{a} = {x} + F({x})   with F the block below ({last} = F({x}))"]
            bwd = [f"{dx} = d{a} + {through}   (the skip adds the gradient through F, "
                   f"with d{last} = d{a})"]
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
        if node["children"] and not reverse:
            _render(node["children"], lines, key, indent + "    ", reverse)


def describe(model, loss=None, input_shape=None) -> str:
    """The graph of ``model`` (and ``loss``, a name or object) as text: the forward pass,
    then the backward pass in reverse order. ``input_shape`` (without the batch axis)
    adds the shapes from :meth:`Sequential.summary`."""
    items = nodes(model)
    last = f"A{items[-1]['name']}" if items else "X"
    lines = ["Forward (each node computes its output from the one before):"]
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
