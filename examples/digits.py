"""Handwritten digits (UCI 8x8, shipped with backprop) with the Python API, end to end:
split, standardise, train with early stopping and checkpoints, evaluate, save, reload.

Run: python examples/digits.py   (BACKPROP_DEVICE=cuda to train on a GPU)
"""
import os
import tempfile

import numpy as np

import backprop as bp
from backprop import callbacks, io, metrics, training
from backprop.data import load_digits, standardize, train_val_test_split
from backprop.layers import Dense, Dropout
from backprop.model import Sequential
from backprop.optim import Adam
from backprop.schedules import CosineAnnealingLR


def main():
    X, y = load_digits()
    (Xtr, ytr), (Xva, yva), (Xte, yte) = train_val_test_split(
        X, y, (0.7, 0.15, 0.15), seed=0, stratify=True)
    Xtr, Xva, Xte = standardize(Xtr, Xva, Xte)

    rng = np.random.default_rng(0)
    model = Sequential([
        Dense(64, 128, activation="relu", rng=rng),
        Dropout(0.1, seed=1),
        Dense(128, 64, activation="relu", rng=rng),
        Dense(64, 10, rng=rng),                        # logits
    ])
    print(model.summary())
    opt = Adam(model.parameters(), lr=2e-3)
    epochs = 40
    workdir = tempfile.mkdtemp(prefix="digits-")
    best = os.path.join(workdir, "best.npz")
    history = training.fit(
        model, Xtr, ytr, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=64,
        validation_data=(Xva, yva), seed=0, scheduler=CosineAnnealingLR(opt, T_max=epochs),
        callbacks=[callbacks.EarlyStopping("val_loss", patience=8),
                   callbacks.ModelCheckpoint(best, save_best_only=True)])

    test = training.evaluate(model, Xte, yte, loss="cross_entropy", metrics=["accuracy"])
    print(f"\n{len(history)} epochs; test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}"
          f" on {bp.device_info()['device']} ({bp.device_info()['kernels']} kernels)")
    scores = bp.to_numpy(training.predict(model, Xte))
    print("confusion matrix (rows: true digit, columns: predicted):")
    print(metrics.confusion_matrix(yte, scores, num_classes=10))

    ckpt = io.load_checkpoint(best)                    # the best epoch, with its optimizer
    again = training.evaluate(ckpt.model, Xte, yte, loss="cross_entropy")
    print(f"best checkpoint (epoch {ckpt.epoch}) reloaded from {best}: "
          f"test accuracy {again['accuracy']:.4f}")


if __name__ == "__main__":
    main()
