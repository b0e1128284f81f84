"""The printed computational graph (backprop.graph): forward in order, backward as its
reverse traversal, each node with the equations its layer implements."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import backprop as bp


def _model():
    return bp.Sequential([bp.Dense(4, 8, activation="relu"), bp.Dropout(0.25),
                          bp.Residual([bp.Dense(8, 8, activation="tanh"), bp.Dense(8, 8)]),
                          bp.Dense(8, 3), bp.LogSoftmax()])


def test_forward_lists_the_nodes_in_order_and_backward_reverses_them():
    text = _model().graph(loss="nll")
    forward, backward = text.split("Backward")
    order = [forward.index(f"[{i}]") for i in range(5)]
    assert order == sorted(order)
    back = [backward.index(f"[{i}]") for i in range(5)]
    assert back == sorted(back, reverse=True)
    assert "Z0 = X W0ᵀ + b0" in forward and "A0 = relu(Z0)" in forward
    assert "dZ0 = dA0 ⊙ relu'(Z0)" in backward and "∂W0 = dZ0ᵀ X" in backward
    assert "L = NLLLoss(A4, Y)" in forward and "dA4 = ∂L/∂A4" in backward


def test_every_parameter_gets_its_gradient_line():
    model = _model()
    text = model.graph()
    for p in model.parameters():
        # "2.block.1.W" is drawn as W2.1, "0.b" as b0
        parts = p.name.replace("block.", "").split(".")
        symbol = parts[-1] + ".".join(parts[:-1])
        assert f"∂{symbol} = " in text, (p.name, symbol)


def test_the_residual_skip_adds_the_gradient_through_its_block():
    text = _model().graph()
    assert "A2 = A1 + F(A1)" in text
    assert "dA1 = dA2 + dA1|F" in text  # the skip connection in the backward pass
    assert "dA1|F = dZ2.0 W2.0" in text  # the block's own input gradient


def test_the_graph_can_end_with_the_shapes():
    text = bp.Sequential([bp.Dense(3, 2)]).graph(input_shape=(3,))
    assert "Total params: 8" in text


def test_the_text_shows_each_nodes_shape_and_what_it_keeps_for_backward():
    text = _model().graph()
    assert "[input] X (N, 4)" in text and "shape: A0 (N, 8)" in text
    assert "shape: A4 (N, 8)" not in text and "shape: A4 (N, 3)" in text
    assert "keeps for backward: X (N, 4) by reference, A0 (N, 8) (written over Z0)" in text
    assert "the mask key (M is recomputed from a hash in backward)" in text
    # gelu's σ′ needs Z: Z and A in separate buffers
    gelu = bp.Sequential([bp.Dense(2, 3, activation="gelu")]).graph()
    assert "keeps for backward: X (N, 2) by reference, Z0 (N, 3), A0 (N, 3)" in gelu
    bn = bp.Sequential([bp.Dense(2, 3), bp.BatchNorm1d(3), bp.Flatten()]).graph()
    assert "keeps for backward: A0 (N, 3) by reference, μ (3,), 1/σ (3,)" in bn
    assert "keeps for backward: the shape of A1" in bn
    # shapes unknown without in_features: none shown, the rest unchanged
    assert "shape:" not in bp.Sequential([bp.Flatten(), bp.Tanh()]).graph()


def _parse_dot(text):
    """A small structural check of a DOT digraph: returns (declared nodes, edges) after
    checking the header, balanced braces and quotes, and that every statement ends."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings out of the way
    assert '"' not in body.replace('""', "")
    depth = 0
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    declared, edges = {"X"}, []
    for stmt in re.split(r"[;{}\n]", body):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(("digraph", "subgraph", "node [", "edge [")) or \
                re.fullmatch(r"\w+=\S+", stmt):
            continue
        edge = re.fullmatch(r"(\w+) -> (\w+)( \[.*\])?", stmt)
        if edge:
            edges.append((edge[1], edge[2], edge[3] or ""))
            continue
        node = re.fullmatch(r"(\w+) \[.*\]", stmt)
        assert node, f"not a DOT statement: {stmt!r}"
        declared.add(node[1])
    return declared, edges


def test_the_dot_graph_is_a_well_formed_digraph():
    model = _model()
    dot = model.graph(loss="nll", format="dot")
    declared, edges = _parse_dot(dot)
    for a, b, _ in edges:
        assert a in declared and b in declared, (a, b)
    forward = [(a, b) for a, b, attrs in edges if "dashed" not in attrs]
    backward = [(a, b) for a, b, attrs in edges if "dashed" in attrs]
    assert ("X", "n0") in forward and ("n0", "n1") in forward and ("n4", "loss") in forward
    assert ("n1", "n2") in forward  # the skip edge into the ⊕ node of the Residual
    assert ("n2_1", "n2") in forward and ("n1", "n2_0") in forward
    assert ("loss", "n4") in backward and ("n2", "n1") in backward and ("n2", "n2_1") in backward
    for a, b in backward:  # every gradient edge runs against a forward edge
        assert (b, a) in forward, (a, b)
    assert "subgraph cluster_n2 {" in dot and 'label="skip"' in dot
    assert 'label="W0 (8, 4)"' in dot and 'label="∂W0"' in dot  # parameters as nodes
    assert "keeps: X (N, 4) by reference" in dot
    plain = bp.Sequential([bp.Dense(3, 2)]).graph(format="dot")
    assert set(b for _, b, _ in _parse_dot(plain)[1]) <= _parse_dot(plain)[0]


def test_graphviz_renders_the_dot_graph(tmp_path):
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("the Graphviz 'dot' program is not installed (the structure is checked "
                    "by test_the_dot_graph_is_a_well_formed_digraph)")
    source = tmp_path / "model.dot"
    source.write_text(_model().graph(loss="nll", format="dot"), encoding="utf-8")
    result = subprocess.run([dot, "-Tsvg", str(source)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "<svg" in result.stdout


def test_an_unknown_graph_format_is_refused():
    with pytest.raises(ValueError, match="'text' or 'dot'"):
        _model().graph(format="svg")
