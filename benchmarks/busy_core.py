"""A training loop beside a busy core, run without pause: backprop's hand-written loop under
``BACKPROP_THREADS=fixed`` and ``adaptive``, and on one thread, with the cores free and
then beside a busy process pinned to the last CPU.

    python benchmarks/busy_core.py [--models mnist,wide] [--seconds 4] [--repeats 3]
        [--out-dir DIR] [--smoke]

Why. ``paired_slices.py --busy-cores`` compares frameworks in short slices of stopped and
resumed processes, which is fair between frameworks but not what a loop that runs for
minutes meets: a resumed process is favoured by the scheduler for a while. Here one
process runs the loop continuously in phases of ``--seconds``, the three settings taking
turns (in a rotated order, ``--repeats`` times) under each condition, and reports each
phase's median step time over its second half (the adaptive governor's first trial comes
after a second of steps: ``backprop.thread_governor``) and over the whole phase. The
setting changes between phases through ``thread_governor.set_mode``; the one-thread
setting is ``fixed`` with the loop's thread at one Numba thread and OpenBLAS at one thread.
Writes ``busy_core.json`` and ``.md`` where ``--out-dir`` is given. Linux (CPU affinity).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SETTINGS = ("fixed", "adaptive", "one thread")


def make_step(name: str):
    """The hand-written loop of ``frameworks.py`` on the MLP ``name``: a step function."""
    from frameworks import LR, Spec, backprop_model, batch_data, init_params
    from workloads import LARGE_BATCH_MLPS, MLPS

    from backprop.losses import SoftmaxCrossEntropyLoss
    from backprop.optim import Adam

    mlp = {**MLPS, **LARGE_BATCH_MLPS}[name]
    spec = Spec(mlp.name, tuple(mlp.sizes), mlp.batch)
    model = backprop_model(spec, init_params(spec.sizes))
    loss = SoftmaxCrossEntropyLoss()
    opt = Adam(model.parameters(), lr=LR)
    x, y = batch_data(spec)

    def step():
        opt.zero_grad()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()
    return step


def phase(step, setting: str, seconds: float) -> dict:
    """Run ``step`` for ``seconds`` under ``setting``; the median step time (ms) of the
    second half and of the whole phase."""
    import numba

    from backprop import blas
    from backprop import thread_governor as governor

    top = numba.config.NUMBA_NUM_THREADS
    governor.set_mode("adaptive" if setting == "adaptive" else "fixed")
    step()  # (under fixed: the previous phase's governor hands its threads back here)
    if setting == "one thread":
        numba.set_num_threads(1)
        blas.set_ceiling("busy_core.py", 1)
    times = []
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        if setting == "one thread":
            numba.set_num_threads(top)
            blas.set_ceiling("busy_core.py", None)
    half = times[len(times) // 2:]
    return {"second_half_ms": statistics.median(half) * 1e3,
            "whole_ms": statistics.median(times) * 1e3, "steps": len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist,wide")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny, short phases, one repeat")
    args = parser.parse_args(argv)
    if not hasattr(os, "sched_getaffinity"):
        print("busy_core.py needs CPU affinity (Linux)")
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("busy_core.py needs two CPUs: one stays busy")
        return 0
    if args.smoke:
        args.models, args.seconds, args.repeats = "tiny", 0.3, 1
    from paired_slices import busy_process

    results = []
    for name in args.models.split(","):
        step = make_step(name.strip())
        for _ in range(20):
            step()
        rows = {}
        for condition in ("free", "busy"):
            busy = busy_process(cpus[-1]) if condition == "busy" else None
            try:
                if busy is not None:
                    time.sleep(0.2)  # (pinned and spinning before the first phase)
                runs = {s: [] for s in SETTINGS}
                for r in range(args.repeats):
                    order = SETTINGS[r % 3:] + SETTINGS[:r % 3]
                    for setting in order:
                        runs[setting].append(phase(step, setting, args.seconds))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            rows[condition] = runs
        results.append({"model": name.strip(), "conditions": rows})
        print(f"busy_core: {name} done", flush=True)
    lines = ["# A training loop beside a busy core", "", "Command:", "",
             "    python benchmarks/busy_core.py " + " ".join(
                 sys.argv[1:] if argv is None else argv), "",
             f"The hand-written loop run without pause, {args.seconds} s per phase, each "
             f"setting {args.repeats} time(s) per condition in a rotated order; *busy*: "
             "beside a busy process pinned to the last CPU. Median step time (ms) of each "
             "phase's second half, median over the repeats (whole-phase medians in "
             "parentheses).", "",
             "| model | cores | " + " | ".join(SETTINGS) + " |",
             "|---|---|" + "---:|" * len(SETTINGS)]
    for res in results:
        for condition, runs in res["conditions"].items():
            cells = [f"{statistics.median(p['second_half_ms'] for p in runs[s]):.3g} "
                     f"({statistics.median(p['whole_ms'] for p in runs[s]):.3g})"
                     for s in SETTINGS]
            lines.append(f"| {res['model']} | {condition} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "busy_core.json").write_text(json.dumps(
            {"results": results, "seconds": args.seconds, "repeats": args.repeats}, indent=1))
        (args.out_dir / "busy_core.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
