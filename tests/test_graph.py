"""The printed computational graph (backprop.graph): forward in order, backward as its
reverse traversal, each node with the equations its layer implements."""
from __future__ import annotations

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
