"""Regression on a smooth nonlinear function: an MLP against a linear least-squares fit,
MSE loss, MAE and R² metrics, and a learning rate that drops when validation stalls.

Run: python examples/regression.py
"""
import numpy as np

import backprop as bp
from backprop import metrics, training
from backprop.data import Standardizer, regression, train_val_test_split
from backprop.layers import Dense
from backprop.model import Sequential
from backprop.optim import Adam
from backprop.schedules import ReduceLROnPlateau


def main():
    X, y = regression(n=2000, features=4, noise=0.05, seed=0)   # y = Xw + 0.5 sin(2 x₁) + ε
    (Xtr, ytr), (Xva, yva), (Xte, yte) = train_val_test_split(X, y, (0.7, 0.15, 0.15), seed=0)
    scaler = Standardizer().fit(Xtr)
    Xtr, Xva, Xte = (scaler.transform(a) for a in (Xtr, Xva, Xte))

    # baseline: ordinary least squares on the same features
    A = np.hstack([Xtr, np.ones((len(Xtr), 1))])
    coef, *_ = np.linalg.lstsq(A.astype(np.float64), ytr.astype(np.float64), rcond=None)
    linear = np.hstack([Xte, np.ones((len(Xte), 1))]) @ coef

    rng = np.random.default_rng(1)
    model = Sequential([Dense(4, 64, activation="tanh", rng=rng),
                        Dense(64, 64, activation="tanh", rng=rng),
                        Dense(64, 1, rng=rng)])
    opt = Adam(model.parameters(), lr=3e-3)
    training.fit(model, Xtr, ytr, loss="mse", optimizer=opt, epochs=60, batch_size=32,
                 validation_data=(Xva, yva), metrics=["mae", "r2"], seed=0, verbose=2,
                 scheduler=ReduceLROnPlateau(opt, factor=0.5, patience=4))
    mlp = bp.to_numpy(training.predict(model, Xte))

    print(f"\n{'test set':<18}{'MSE':>10}{'MAE':>10}{'R²':>10}")
    for name, pred in (("linear regression", linear), ("MLP", mlp)):
        mse, mae = metrics.mean_squared_error(yte, pred), metrics.mean_absolute_error(yte, pred)
        print(f"{name:<18}{mse:>10.5f}{mae:>10.5f}{metrics.r2_score(yte, pred):>10.4f}")
    print(f"(noise variance: {0.05 ** 2:.5f}, the best MSE any model can reach)")


if __name__ == "__main__":
    main()
