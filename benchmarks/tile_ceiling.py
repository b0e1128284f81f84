"""How close the compiled tiles run to this CPU's multiply-add ceiling, and where a small
batch's inference time goes.

    python benchmarks/tile_ceiling.py [--out-dir DIR] [--repeats 5] [--smoke]

1. Ceiling: the 8×2 register tile (``backprop.kernels.matmul.make_tile``) on operands that
   stay in L1 (a 32×64 ``A``, a 64×32 ``B``), called in a compiled loop, on one thread and
   on two Python threads at once (each its own arrays; the GIL released): GFLOP/s per
   repeat. On a VM whose two vCPUs share a core's multiply-add units, or whose second vCPU
   is busy elsewhere, the two-thread figure falls toward the one-thread one.
2. The mnist MLP's (784-256-256-10) products at inference shapes on one thread:
   ``inference._tiles`` (the plans' product) at 16 rows (one vector of lanes: the 16×1
   tile) and 32 rows (8×2), GFLOP/s; and the ops of ``predict``'s lanes program at 16 rows
   on one thread (transposition in, each Dense kernel, transposition out) against the
   whole ``predict`` call, µs.

Writes ``tile_ceiling.json`` and ``.md`` where ``--out-dir`` is given. Figures are medians
of short timed loops: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _median_us(fn, seconds: float) -> float:
    """``inference_paths.median_us`` after 20 warm-up calls."""
    from inference_paths import median_us

    for _ in range(20):
        fn()
    return median_us(fn, seconds)


def ceiling(repeats: int, reps: int) -> list[dict]:
    """GFLOP/s of the 8×2 tile on L1-resident operands: one thread, two threads at once."""
    from numba import njit

    from backprop.kernels import matmul

    tile = matmul.make_tile(8, 2, True)

    @njit(nogil=True)
    def spin(b, a, c, reps):
        k = a.shape[1]
        for _ in range(reps):
            for j in range(0, a.shape[0], 8):
                tile(b, a, c, j, 0, k, 1, False, 32)

    rng = np.random.default_rng(0)
    k = 64
    operands = [(rng.standard_normal((k, 32)).astype(np.float32),
                 rng.standard_normal((32, k)).astype(np.float32),
                 np.empty((32, 32), np.float32)) for _ in range(2)]
    spin(*operands[0], 2)
    flops = 2 * reps * 32 * k * 32
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        spin(*operands[0], reps)
        one = flops / (time.perf_counter() - t0) / 1e9
        workers = [threading.Thread(target=spin, args=(*operands[i], reps)) for i in range(2)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        two = 2 * flops / (time.perf_counter() - t0) / 1e9
        rows.append({"one_thread_gflops": one, "two_threads_gflops": two})
    return rows


def inference_split(seconds: float) -> dict:
    """The mnist MLP's inference products on one thread, and predict's ops at 16 rows."""
    import numba

    import backprop as bp
    from backprop import inference
    from backprop.layers import Dense

    sizes = (784, 256, 256, 10)
    rng = np.random.default_rng(0)
    out = {"products": []}
    for m, k in ((256, 784), (256, 256)):
        w = rng.standard_normal((m, k)).astype(np.float32)
        for rows in (16, 32):
            xt = rng.standard_normal((k, rows)).astype(np.float32)
            zt = np.empty((m, rows), np.float32)
            us = _median_us(lambda: inference._tiles(xt, w, zt), seconds)
            out["products"].append({"shape": f"{m}x{k}", "rows": rows, "us": us,
                                    "gflops": 2 * m * k * rows / us / 1e3})
    model = bp.Sequential([Dense(i, o, activation="relu" if n < len(sizes) - 2 else None,
                                 rng=n) for n, (i, o) in enumerate(zip(sizes, sizes[1:]))])
    x = rng.standard_normal((16, sizes[0])).astype(np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        model.predict(x)
        plan = model.__dict__["_inference_plan"]
        regs = [x, *plan._local.buffers[16], np.empty((16, sizes[-1]), np.float32)]
        names = ["transpose in"] + [f"dense {i}->{o}" for i, o in zip(sizes, sizes[1:])] + \
            ["transpose out"]
        ops = plan.lanes.ops
        out["ops"] = [{"op": names[i] if len(ops) == len(names) else f"op {i}",
                       "us": _median_us(lambda op=op: op(regs, 16), seconds)}
                      for i, op in enumerate(ops)]
        out["predict_us"] = _median_us(lambda: model.predict(x), seconds)
    finally:
        numba.set_num_threads(before)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one short repeat")
    args = parser.parse_args(argv)
    repeats, reps, seconds = (1, 200, 0.02) if args.smoke else (args.repeats, 20000, 0.3)
    ceil = ceiling(repeats, reps)
    split = inference_split(seconds)
    lines = ["# Tile ceiling and the mnist MLP's inference split", "",
             "Command:", "", "    python benchmarks/tile_ceiling.py " + " ".join(
                 sys.argv[1:] if argv is None else argv), "",
             "The 8×2 tile on L1-resident operands (GFLOP/s per repeat):", "",
             "| repeat | one thread | two threads | two / one |", "|---:|---:|---:|---:|"]
    for i, row in enumerate(ceil, 1):
        lines.append(f"| {i} | {row['one_thread_gflops']:.0f} | {row['two_threads_gflops']:.0f}"
                     f" | {row['two_threads_gflops'] / row['one_thread_gflops']:.2f}× |")
    lines += ["", "The plans' products on one thread (`inference._tiles`):", "",
              "| W | rows | µs | GFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {p['shape']} | {p['rows']} | {p['us']:.1f} | {p['gflops']:.0f} |"
              for p in split["products"]]
    lines += ["", "`predict` on 16 rows, one thread: its lanes program's ops (µs):", "",
              "| op | µs |", "|---|---:|"]
    lines += [f"| {o['op']} | {o['us']:.2f} |" for o in split["ops"]]
    lines += [f"| sum of the ops | {sum(o['us'] for o in split['ops']):.1f} |",
              f"| whole `predict` call | {split['predict_us']:.1f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "tile_ceiling.json").write_text(json.dumps(
            {"ceiling": ceil, **split}, indent=1))
        (args.out_dir / "tile_ceiling.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
