"""Data-parallel overhead: time per training step and the allreduce's share of it, on 1 and
2 MPI ranks, for the mnist and wide MLPs (``workloads.MLPS``), with ``fit`` itself; the
same with the allreduce in buckets during backward (``--bucket-mb``); and one process
reading its batches from an ``.npy`` file (``backprop.sources.NpySource``) instead of
memory.

Each rank trains its share of the global batch (``batch_size`` keeps its one-process
meaning), so on a 2-core machine two ranks divide the cores between them: this measures the
overhead of data parallelism (the allreduce, the extra synchronisation), not a speed-up.

    python benchmarks/distributed_step.py [--repeats 3] [--epochs 3] [--bucket-mb 1]
                                          [--out results.json]

The driver starts ``mpiexec -n R python benchmarks/distributed_step.py --worker ...`` for
each configuration in turn (``--repeats`` rounds, so that the machine's noise hits all
alike), and prints a table of medians: ms per step, ms per step spent in the gradient sum
(timed inside ``fit`` around ``DataParallel.backward_and_reduce``, so with buckets it is
backward *and* the sum: compare the step times), and the bytes each rank sends per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(args) -> None:
    import backprop as bp
    from backprop.data_parallel import DataParallel
    from workloads import MLPS

    group = bp.distributed.init()
    spent = [0.0]
    original = DataParallel.reduce_gradients

    def timed(self):
        t = time.perf_counter()
        original(self)
        spent[0] += time.perf_counter() - t

    DataParallel.reduce_gradients = timed
    if group.bucket_bytes:  # backward and the sum are one call then
        original_b = DataParallel.backward_and_reduce

        def timed_b(self, delta):
            t = time.perf_counter()
            original_b(self, delta)
            spent[0] += time.perf_counter() - t

        DataParallel.backward_and_reduce = timed_b
    mlp = MLPS[args.mlp]
    rng = np.random.default_rng(0)
    n = mlp.batch * args.steps
    X = rng.standard_normal((n, mlp.sizes[0]), dtype=np.float32)
    y = rng.integers(0, mlp.sizes[-1], n)
    bp.manual_seed(0)
    layers = [bp.Dense(i, o, activation="relu") for i, o in mlp.layers[:-1]]
    model = bp.Sequential([*layers, bp.Dense(*mlp.layers[-1])])
    opt = bp.Adam(model.parameters(), lr=1e-3)
    data = (X, y)
    if args.source:
        from backprop.sources import NpySource

        np.save(os.path.join(args.source, f"X-{group.rank}.npy"), X)
        np.save(os.path.join(args.source, f"y-{group.rank}.npy"), y)
        data = (NpySource(os.path.join(args.source, f"X-{group.rank}.npy"),
                          os.path.join(args.source, f"y-{group.rank}.npy")), None)
    model.fit(*data, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=mlp.batch,
              seed=0, verbose=0, metrics=[])  # warm-up: compilation, buffers
    spent[0] = 0.0
    t = time.perf_counter()
    model.fit(*data, loss="cross_entropy", optimizer=opt, epochs=args.epochs,
              batch_size=mlp.batch, seed=0, verbose=0, metrics=[])
    wall = time.perf_counter() - t
    steps = args.steps * args.epochs
    grad_bytes = sum(p.size for p in model.parameters()) * 4
    times = group.allgather_object((wall / steps, spent[0] / steps))
    if group.rank == 0:
        print("RESULT " + json.dumps({
            "mlp": mlp.name, "ranks": group.size, "bucket_mb": group.bucket_bytes / 2**20,
            "source": bool(args.source),
            "step_ms": 1e3 * max(w for w, _ in times),
            "allreduce_ms": 1e3 * max(a for _, a in times),
            # ring allreduce: each rank sends 2(p-1)/p of the buffer
            "bytes_sent_per_rank": int(2 * (group.size - 1) / group.size * grad_bytes),
            "gradient_bytes": grad_bytes}), flush=True)


def driver(args) -> None:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "HYDRA_"))}
    import tempfile

    configs = [(1, 0.0, False), (2, 0.0, False), (2, args.bucket_mb, False), (1, 0.0, True)]
    runs: dict[tuple, list[dict]] = {}
    scratch = tempfile.mkdtemp(prefix="backprop-bench-")
    for _ in range(args.repeats):
        for mlp in args.mlps:
            for ranks, bucket_mb, source in configs:
                cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker",
                       "--mlp", mlp, "--epochs", str(args.epochs), "--steps", str(args.steps)]
                if source:
                    cmd += ["--source", scratch]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                     env={**env, "BACKPROP_BUCKET_MB": str(bucket_mb)})
                if out.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
                line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
                runs.setdefault((mlp, ranks, bucket_mb, source), []).append(
                    json.loads(line[7:]))
    rows = []
    print("| MLP | ranks | data | buckets | ms/step | sum ms/step | sum share | "
          "bytes sent/rank/step |")
    print("|---|---|---|---|---|---|---|---|")
    for (mlp, ranks, bucket_mb, source), results in runs.items():
        step = statistics.median(r["step_ms"] for r in results)
        red = statistics.median(r["allreduce_ms"] for r in results)
        row = {"mlp": mlp, "ranks": ranks, "bucket_mb": bucket_mb, "source": source,
               "step_ms": step, "allreduce_ms": red,
               "share": red / step, "bytes_sent_per_rank": results[0]["bytes_sent_per_rank"],
               "runs": results}
        rows.append(row)
        where = ".npy file" if source else "memory"
        buckets = f"{bucket_mb:g} MB" if bucket_mb else "-"
        print(f"| {mlp} | {ranks} | {where} | {buckets} | {step:.3f} | {red:.3f} | "
              f"{100 * red / step:.1f} % | {row['bytes_sent_per_rank']:,} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mlp", default="mnist")
    p.add_argument("--mlps", nargs="+", default=["mnist", "wide"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="bucket size of the overlapped configuration (MB)")
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
