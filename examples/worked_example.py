"""Backpropagation by hand for a network with ONE hidden neuron, checked against backprop.

Network (float64, so the hand computation and the library agree to the last bits):

    x (2 features) ──Dense(2→1, sigmoid)──> h (the hidden neuron) ──Dense(1→1)──> ŷ
    loss L = mean over the batch of (ŷ - y)²

Every quantity below is printed and then compared with what the library's layers computed:

    forward   Z = X Wᵀ + b          A = σ(Z)
    backward  δ = dA ⊙ σ'(Z)        ∂W = δᵀ X      ∂b = Σ_rows δ      ∂X = δ W

Run: python examples/worked_example.py
"""
import numpy as np

from backprop.backend import use_device
from backprop.layers import Dense
from backprop.losses import MSELoss
from backprop.model import Sequential
from backprop.optim import SGD

np.set_printoptions(precision=6, suppress=True)


def show(name, value, equation=""):
    text = np.array2string(np.asarray(value), prefix=" " * 14)
    print(f"  {name:<10} = {text}" + (f"      ({equation})" if equation else ""))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def main():
    X = np.array([[1.0, 2.0],
                  [-1.0, 0.5]])          # a batch of N = 2 samples, 2 features each
    y = np.array([[1.0], [0.0]])
    W1, b1 = np.array([[0.3, -0.2]]), np.array([0.2])    # hidden neuron: W (1, 2), b (1,)
    W2, b2 = np.array([[1.5]]), np.array([-0.5])         # output neuron: W (1, 1), b (1,)
    lr = 0.1
    N = len(X)

    print("Forward pass")
    Z1 = X @ W1.T + b1
    show("Z1", Z1, "X W1ᵀ + b1")
    A1 = sigmoid(Z1)
    show("A1", A1, "σ(Z1), the hidden neuron")
    Z2 = A1 @ W2.T + b2
    show("ŷ = Z2", Z2, "A1 W2ᵀ + b2, identity output")
    L = np.mean((Z2 - y) ** 2)
    show("L", L, "mean (ŷ - y)²")

    print("\nBackward pass, output layer (σ = identity, so σ' = 1)")
    dZ2 = 2.0 * (Z2 - y) / N
    show("dA2", dZ2, "∂L/∂ŷ = 2 (ŷ - y) / N")
    delta2 = dZ2 * 1.0
    show("δ2", delta2, "dA2 ⊙ σ'(Z2)")
    dW2 = delta2.T @ A1
    show("∂W2", dW2, "δ2ᵀ A1")
    db2 = delta2.sum(axis=0)
    show("∂b2", db2, "Σ_rows δ2")
    dA1 = delta2 @ W2
    show("∂A1", dA1, "δ2 W2, the gradient reaching the hidden neuron")

    print("\nBackward pass, hidden layer (σ = sigmoid, σ'(Z) = A (1 - A))")
    delta1 = dA1 * A1 * (1.0 - A1)
    show("δ1", delta1, "∂A1 ⊙ σ'(Z1)")
    dW1 = delta1.T @ X
    show("∂W1", dW1, "δ1ᵀ X")
    db1 = delta1.sum(axis=0)
    show("∂b1", db1, "Σ_rows δ1")
    dX = delta1 @ W1
    show("∂X", dX, "δ1 W1; a model skips it for its first layer, shown here anyway")

    print(f"\nOne SGD step, θ ← θ - {lr} ∂θ")
    new = {"0.W": W1 - lr * dW1, "0.b": b1 - lr * db1, "1.W": W2 - lr * dW2, "1.b": b2 - lr * db2}
    for name, value in new.items():
        show(name, value)

    print("\nThe same with the library's layers (CPU, float64):")
    with use_device("cpu"):
        model = Sequential([Dense(2, 1, activation="sigmoid", dtype="float64"),
                            Dense(1, 1, dtype="float64")])
        model.load_state_dict({"0.W": W1, "0.b": b1, "1.W": W2, "1.b": b2})
        loss = MSELoss()
        opt = SGD(model.parameters(), lr=lr)
        opt.zero_grad()
        hidden, output = model[0], model[1]        # the layers, driven one at a time
        a1 = hidden.forward(X)
        out = output.forward(a1)
        L_lib = float(loss.forward(out, y))
        checks = [("A1", a1, A1), ("ŷ", out, Z2), ("L", L_lib, L)]
        da1 = output.backward(loss.backward())    # ∂L/∂A1
        checks.append(("∂A1", da1.copy(), dA1))   # copied: the next backward may reuse it
        checks.append(("∂X", hidden.backward(da1, need_input_grad=True), dX))
        grads = {p.name: p.grad.copy() for p in model.parameters()}
        checks += [("∂W1", grads["0.W"], dW1), ("∂b1", grads["0.b"], db1),
                   ("∂W2", grads["1.W"], dW2), ("∂b2", grads["1.b"], db2)]
        opt.step()
        state = model.state_dict()
        checks += [(f"new {k}", state[k], v) for k, v in new.items()]
    width = max(len(name) for name, *_ in checks)
    for name, library, by_hand in checks:
        np.testing.assert_allclose(library, by_hand, rtol=1e-12, atol=1e-15)
        print(f"  {name:<{width}}  library == by hand  (max |diff| "
              f"{np.max(np.abs(np.asarray(library) - by_hand)):.1e})")
    print("\nAll values match.")


if __name__ == "__main__":
    main()
