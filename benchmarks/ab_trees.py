"""Before/after timing of two source trees of backprop, in alternating processes.

    python benchmarks/ab_trees.py OLD_TREE NEW_TREE [--rounds 4] [--seconds 1.5]

Each tree is a checkout of this repository (e.g. ``git worktree add /tmp/old HEAD~3``).
Each round starts one process per tree (old then new, then new then old in the next round,
so that neither always runs first), and each process times, single
threaded as a user's loop runs them: the training step of the four benchmark MLPs (as
``fit`` runs it, under ``fit``'s BLAS cap), ``predict`` on 64 rows of the digits MLP, and
one ``fit`` epoch of it on 1,024 rows. It prints the median of each measurement per tree
(the medians of the rounds) and the ratio new/old. Alternating whole processes spreads the
machine's drift over both trees instead of over one of them.

The process imports ``backprop`` from the tree (put first on ``sys.path``, with
``backprop/kernels`` linked to the tree's ``kernels/`` if the link is missing, as an
installed copy would map it) and the workloads from this file's ``benchmarks/`` folder.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

MEASURE = r"""
import json, sys, time
sys.path.insert(0, TREE); sys.path.insert(1, BENCH)
import numpy as np
import backprop
assert backprop.__file__.startswith(TREE), backprop.__file__
import workloads as W
from backprop import blas

def median_time(fn, seconds):
    for _ in range(3):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return float(np.median(times))

out = {}
for name, mlp in W.MLPS.items():
    step = W.TrainingStep(mlp, "cpu")
    with mlp.blas_threads("cpu"):
        out[f"step {name}"] = median_time(step, SECONDS if name != "wide" else 3 * SECONDS)
digits = W.TrainingStep(W.MLPS["digits"], "cpu").model
x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
out["predict digits 64 rows"] = median_time(lambda: digits.predict(x), SECONDS)
X = np.random.default_rng(1).standard_normal((1024, 64)).astype(np.float32)
y = np.random.default_rng(2).integers(0, 10, 1024)
out["fit digits 1 epoch 1024 rows"] = median_time(
    lambda: digits.fit(X, y, loss="cross_entropy", epochs=1, batch_size=64, seed=0,
                       verbose=0), SECONDS)
print(json.dumps(out))
"""


def _link_kernels(tree: Path) -> Path | None:
    """Link ``backprop/kernels`` to ``kernels/`` in ``tree`` if missing; returns the link
    made (removed again after the run), or None."""
    link = tree / "backprop" / "kernels"
    if link.exists() or link.is_symlink():
        return None
    link.symlink_to(Path("..") / "kernels")
    return link


def _measure(tree: Path, seconds: float) -> dict:
    code = f"TREE={str(tree)!r}; BENCH={str(HERE)!r}; SECONDS={seconds!r}\n" + MEASURE
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=tree, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: the measuring process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=1.5)
    args = p.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    links = [_link_kernels(tree) for tree in trees.values()]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for r in range(args.rounds):
            order = list(trees.items())
            for label, tree in order if r % 2 == 0 else order[::-1]:  # old-new, new-old, ...
                runs[label].append(_measure(tree, args.seconds))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for link in links:
            if link is not None:
                link.unlink()
    keys = list(runs["old"][0])
    print(f"| measurement (median of {args.rounds} rounds) | old | new | new/old | "
          "new/old per round (min – max) |")
    print("|---|---|---|---|---|")
    for key in keys:
        old = statistics.median(run[key] for run in runs["old"])
        new = statistics.median(run[key] for run in runs["new"])
        ratios = [n[key] / o[key] for o, n in zip(runs["old"], runs["new"])]
        print(f"| {key} | {old * 1e3:.4g} ms | {new * 1e3:.4g} ms | {new / old:.3f} | "
              f"{min(ratios):.2f} – {max(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
