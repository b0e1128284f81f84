"""Finding mislabelled rows with per-sample gradient norms.

The UCI digits' training rows get 2 % of their labels flipped to another digit (seeded).
A small MLP trains on the noisy labels for 20 epochs, then every training row is scored
by the norm of its own loss gradient, ``‖∇_θ ℓᵢ‖`` (``model.per_sample_grad_norms``: one
forward and backward pass per batch, exact, since for a Dense layer ``‖∂Wᵢ‖ = ‖δᵢ‖‖xᵢ‖``).
A row the network cannot fit, as a wrong label is, keeps a large gradient. The top 2 % of
rows by that score are compared with the rows actually flipped (precision: the fraction of
them that are flipped), next to the same ranking by per-sample loss and to a random pick
(whose expected precision is the flip rate, 2 %).

Run: python examples/mislabelled_digits.py   (BACKPROP_DEVICE=cuda to run on a GPU)
"""
import numpy as np

import backprop as bp
from backprop.data import load_digits, standardize, train_val_test_split
from backprop.layers import Dense
from backprop.model import Sequential


def flip_labels(y, fraction, rng, num_classes=10):
    """A copy of ``y`` with ``round(fraction·N)`` labels (rows drawn from ``rng``) changed to
    another class, and the indices of those rows."""
    flipped = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped


def precision_at(scores, flipped, k):
    """The fraction of the ``k`` highest-scoring rows that are among ``flipped``."""
    top = np.argsort(-scores, kind="stable")[:k]
    return float(np.isin(top, flipped).mean())


def per_sample_cross_entropy(model, X, y):
    """``-log softmax(z)[y]`` for each row (eval mode)."""
    z = bp.to_numpy(model.predict(X)).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def main(noise=0.02, epochs=20, seed=0, verbose=True):
    """Train on digits with ``noise`` of the training labels flipped; returns the precision
    of the top ``noise`` fraction of rows by gradient norm, by loss, and at random."""
    X, y = load_digits()
    (Xtr, ytr), (Xte, yte) = train_val_test_split(X, y, (0.8, 0.2), seed=seed, stratify=True)
    Xtr, Xte = standardize(Xtr, Xte)
    rng = np.random.default_rng(seed)
    noisy, flipped = flip_labels(ytr, noise, rng)
    k = len(flipped)

    model = Sequential([Dense(64, 64, activation="relu", rng=rng), Dense(64, 10, rng=rng)])
    # long enough to learn the digits, not so long that the network memorises the wrong
    # labels (then their gradients and losses shrink, and both rankings get worse)
    model.fit(Xtr, noisy, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=epochs,
              batch_size=32, seed=seed, verbose=0)
    test_acc = model.evaluate(Xte, yte, loss="cross_entropy")["accuracy"]

    norms = model.per_sample_grad_norms(Xtr, noisy, loss="cross_entropy")
    losses = per_sample_cross_entropy(model, Xtr, noisy)
    result = {"grad_norm": precision_at(norms, flipped, k),
              "loss": precision_at(losses, flipped, k),
              "random": k / len(noisy)}
    if verbose:
        print(f"{len(noisy)} training rows, {k} labels flipped ({noise:.0%}); {epochs} epochs; "
              f"test accuracy {test_acc:.3f}")
        print(f"precision of the top {k} rows ({noise:.0%}) as mislabelled candidates:")
        print(f"  by per-sample gradient norm  {result['grad_norm']:.3f}")
        print(f"  by per-sample loss           {result['loss']:.3f}")
        print(f"  random pick (expected)       {result['random']:.3f}")
        pred = bp.to_numpy(model.predict(Xtr)).argmax(axis=1)
        print("the 8 largest gradient norms (row, given label, model's digit, ‖∇ℓᵢ‖, flipped):")
        for i in np.argsort(-norms, kind="stable")[:8]:
            print(f"  {i:5d}  {noisy[i]}  {pred[i]}  {norms[i]:7.2f}  "
                  f"{'yes (was ' + str(ytr[i]) + ')' if i in flipped else 'no'}")
    return result


if __name__ == "__main__":
    main()
