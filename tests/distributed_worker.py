"""One process of the data-parallel tests (``tests/test_distributed.py``): run under
``mpiexec -n N`` or, for the one-process reference, alone. Each scenario prints one JSON line
on rank 0 (``RESULT {...}``) or writes an ``.npz`` that the test compares.

Usage: ``python tests/distributed_worker.py SCENARIO [options]``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

import backprop as bp


def report(group, **fields) -> None:
    if group.rank == 0:
        print("RESULT " + json.dumps(fields), flush=True)


# ---------------------------------------------------------------------------------------
def primitives(args) -> None:
    g = bp.distributed.init()
    r, n = g.rank, g.size
    a = np.arange(5, dtype=np.float64) + r
    bp.distributed.allreduce(a, op="sum")
    expect_sum = n * np.arange(5) + n * (n - 1) / 2
    b = np.full(3, float(r), dtype=np.float32)
    bp.distributed.allreduce(b, op="mean")
    c = np.full(4, r, dtype=np.int64) * 7
    bp.distributed.broadcast(c, root=n - 1)
    scalar = bp.distributed.allreduce(r + 1, op="sum")
    gathered = bp.distributed.allgather_object({"rank": r})
    try:
        bp.distributed.allreduce(np.zeros((4, 4))[:, 0])
        strided = "accepted"
    except ValueError as exc:
        strided = str(exc)
    bp.distributed.barrier()
    report(g, size=n, sum_ok=bool(np.array_equal(a, expect_sum)),
           mean_ok=bool(np.allclose(b, (n - 1) / 2)) and b.dtype == np.float32,
           bcast_ok=bool(np.all(c == 7 * (n - 1))), scalar=scalar,
           gathered=[x["rank"] for x in gathered], strided=strided,
           info=bp.distributed.info(), cores=len(os.sched_getaffinity(0)),
           numba_threads=__import__("numba").get_num_threads())


# ---------------------------------------------------------------------------------------
def data(n=37, features=5, classes=3):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, features)) * 2.0 + 0.5
    return X, rng.integers(0, classes, n)


def build(config: str):
    bp.manual_seed(1)
    if config == "mlp":
        model = bp.Sequential([bp.Dense(5, 16, activation="tanh"),
                               bp.Dense(16, 16, activation="relu"), bp.Dense(16, 3)])
        model.add_regularizer(bp.L2(1e-3))
        return model
    if config == "syncbn":
        return bp.Sequential([bp.Dense(5, 16), bp.SyncBatchNorm(16), bp.ReLU(),
                              bp.Dense(16, 3)])
    if config == "batchnorm":
        return bp.Sequential([bp.Dense(5, 16), bp.BatchNorm1d(16), bp.ReLU(),
                              bp.Dense(16, 3)])
    if config == "softmax":  # paired with categorical_crossentropy: δᴸ = A - Y from logits
        return bp.Sequential([bp.Dense(5, 16, activation="tanh"),
                              bp.Dense(16, 3, activation="softmax")])
    if config == "dropout":
        return bp.Sequential([bp.Dense(5, 32, activation="relu"), bp.Dropout(0.5, seed=3),
                              bp.Dense(32, 3)])
    raise SystemExit(f"unknown config {config!r}")


def train(args) -> None:
    g = bp.distributed.init()
    started = [0]
    original = g.iallreduce_host

    def counting(array):  # how many non-blocking sums a step starts
        started[0] += 1
        return original(array)

    g.iallreduce_host = counting
    bp.set_dtype(args.dtype)
    X, y = data()
    if args.config in ("syncbn", "batchnorm"):
        X, y = data(n=40)
    model = build(args.config)
    optimizer = "adam"
    train_X, train_y = X, y
    if args.source:  # the same rows, read from .npy files batch by batch
        from backprop.sources import NpySource

        np.save(os.path.join(args.source, f"X-{g.rank}.npy"), X)
        np.save(os.path.join(args.source, f"y-{g.rank}.npy"), y)
        train_X = NpySource(os.path.join(args.source, f"X-{g.rank}.npy"),
                            os.path.join(args.source, f"y-{g.rank}.npy"))
        train_y = None
    start = 0
    if args.resume:
        ckpt = bp.load_checkpoint(args.resume)
        model = ckpt.model
        if args.config == "mlp":  # (regularizers are not part of a checkpoint)
            model.add_regularizer(bp.L2(1e-3))
        optimizer = ckpt.optimizer
        start = ckpt.epoch
    callbacks = []
    if args.checkpoint:
        callbacks.append(bp.callbacks.ModelCheckpoint(args.checkpoint))
    loss = "categorical_crossentropy" if args.config == "softmax" else "cross_entropy"
    kwargs = dict(loss=loss, optimizer=optimizer, epochs=args.epochs,
                  batch_size=args.batch_size, seed=5, verbose=0, initial_epoch=start,
                  callbacks=callbacks)
    if not args.resume:
        kwargs["lr"] = 0.01
    if args.clip_grad_norm:
        kwargs["clip_grad_norm"] = args.clip_grad_norm
    if args.precision:
        kwargs["precision"] = args.precision
    if args.config == "mlp":
        kwargs["validation_data"] = (X[:11], y[:11])
    if args.config in ("syncbn", "batchnorm"):
        kwargs["drop_last"] = True
    history = model.fit(train_X, train_y, **kwargs)
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    every = g.allgather_object(state)
    spread = max(float(np.max(np.abs(every[0][k] - s[k]))) for s in every for k in s)
    if g.rank == 0:
        np.savez(args.out, **state, **{f"history.{k}": np.asarray(v, dtype=np.float64)
                                       for k, v in history.history.items()
                                       if k not in ("time", "samples_per_s")})
    steps = history.params["steps"] * len(history.epoch)
    report(g, size=g.size, precision=history.params["precision"], spread_between_ranks=spread, epochs=history.epoch,
           nonblocking_per_step=started[0] / steps if g.size > 1 else None,
           params_seed=history.params.get("seed") if hasattr(history, "params") else None)


# ---------------------------------------------------------------------------------------
class Explode(bp.callbacks.Callback):
    """Raise on one rank at the end of one epoch (a callback with a bug, a full disk...)."""

    def __init__(self, rank, epoch):
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, epoch, logs=None):
        if bp.distributed.rank() == self.rank and epoch == self.epoch:
            raise RuntimeError(f"callback failed on purpose at epoch {epoch + 1}")


class Die(bp.callbacks.Callback):
    """Kill this process (SIGKILL: no cleanup at all) on one rank at one step."""

    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_batch_end(self, batch, logs=None):
        if bp.distributed.rank() == self.rank and batch == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fault(args) -> None:
    g = bp.distributed.init()
    X, y = data(n=400)
    model = build("mlp")
    callbacks = [bp.callbacks.ModelCheckpoint(args.checkpoint)] if args.checkpoint else []
    if args.kind == "callback":
        callbacks.append(Explode(rank=1, epoch=1))
    elif args.kind == "kill":
        callbacks.append(Die(rank=1, step=3))
    elif args.kind == "bad-data":
        if g.rank == 1:
            X[123, 2] = np.nan
    elif args.kind == "bad-argument":
        pass
    elif args.kind == "bad-checkpoint":  # checked by rank 0 alone (it writes the files)
        callbacks.append(bp.callbacks.ModelCheckpoint("/nonexistent-dir/ckpt.npz"))
    try:
        model.fit(X, y, loss="cross_entropy", lr=0.01, epochs=args.epochs, batch_size=32,
                  seed=1, verbose=0, callbacks=callbacks,
                  validation_split=1.5 if args.kind == "bad-argument" else 0.0)
    except Exception as exc:  # the scenarios that must not abort: every rank reports
        print(f"RANK {g.rank} RAISED {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print(f"RANK {g.rank} FINISHED", flush=True)


def nonfinite(args) -> None:
    g = bp.distributed.init()
    X, y = data(n=64)
    model = build("mlp")
    try:  # a learning rate that overflows the weights within a few steps
        model.fit(X, y, loss="cross_entropy", optimizer="sgd", lr=1e30, epochs=5,
                  batch_size=16, seed=1, verbose=0)
    except bp.NonFiniteLossError as exc:
        print(f"RANK {g.rank} RAISED NonFiniteLossError: {exc}", flush=True)
        return
    print(f"RANK {g.rank} FINISHED", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    sub.add_parser("primitives")
    t = sub.add_parser("train")
    t.add_argument("--config", default="mlp")
    t.add_argument("--dtype", default="float64")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=12)
    t.add_argument("--out", required=True)
    t.add_argument("--checkpoint")
    t.add_argument("--resume")
    t.add_argument("--source", help="a directory: train from .npy files written there")
    t.add_argument("--clip-grad-norm", type=float, default=None)
    t.add_argument("--precision", default=None)
    f = sub.add_parser("fault")
    f.add_argument("kind", choices=["callback", "kill", "bad-data", "bad-argument",
                                    "bad-checkpoint"])
    f.add_argument("--checkpoint")
    f.add_argument("--epochs", type=int, default=3)
    sub.add_parser("nonfinite")
    args = parser.parse_args()
    {"primitives": primitives, "train": train, "fault": fault,
     "nonfinite": nonfinite}[args.scenario](args)


if __name__ == "__main__":
    main()
