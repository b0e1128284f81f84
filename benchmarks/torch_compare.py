"""Time the four MLP training steps with PyTorch and with backprop, and write JSON.

    python benchmarks/torch_compare.py --out benchmarks/results/torch.json
        [--devices cpu,cuda] [--threads N] [--models tiny,digits,mnist,wide]
        [--max-time SECONDS] [--repeat R] [--smoke]

Each framework runs in its own subprocess, with the same thread count (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS`` and
``torch.set_num_threads``), so their thread pools never compete. The subprocesses alternate
``R`` times (torch, backprop, backprop, torch, ...), and each framework's result for a model
is its best median over the repeats: on a shared machine whose speed drifts, both are then
measured in the same conditions, and a slow spell hits one repeat, not one framework. The step is the same on
both sides: zero_grad, forward, softmax cross-entropy (mean), backward, Adam(lr=1e-3) on one
fixed float32 batch (same data), relu hidden layers; the data needs no gradient.

OpenMP's wait policy decides how fast a small step is: PyTorch's workers under its default
took 1.0 ms for the tiny step on a 2-core VM and 0.27 ms with ``OMP_WAIT_POLICY=active``,
while backprop makes its own OpenMP settings at import (``backprop.kernels.OMP_VARIABLES``).
So each framework runs under each policy of :data:`WAIT_POLICIES`, the
variable unset meaning the framework's own default, and its best counts: PyTorch is
compared at its fastest setting tried, not at backprop's. Rows record the policy.
PyTorch is never a dependency of backprop: without it this script says so and exits 0.
This file is a script, not collected by pytest (its name has no ``test_`` prefix).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAMEWORKS = ("torch", "backprop")
WAIT_POLICIES = {"torch": ("default", "active"), "backprop": ("default",)}  # see the docstring
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # as frameworks.py


def _omp_settings() -> dict:
    """The OpenMP variables of :data:`OMP_VARIABLES` set in this process."""
    return {v: os.environ[v] for v in OMP_VARIABLES if v in os.environ}


def time_step(step, sync, max_time: float, min_rounds: int = 5, warmup: int = 3) -> dict:
    """Median/min/mean seconds of ``step`` (synchronised) over rounds filling ``max_time``."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_rounds or time.perf_counter() - start < max_time:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times),
            "mean": statistics.fmean(times), "rounds": len(times)}


# ---------------------------------------------------------------------------------------
# Workers: one framework, one device, in a fresh process
def torch_worker(device: str, threads: int, mlps, max_time: float) -> list[dict]:
    import numpy as np
    import torch
    from torch import nn

    from workloads import mlp_data

    torch.set_num_threads(threads)
    seen = os.environ.get("OMP_WAIT_POLICY", "default")  # what torch's OpenMP read at import
    settings = _omp_settings()
    if device == "cuda" and not torch.cuda.is_available():
        return [{"skipped": "torch.cuda.is_available() is False"}]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = []
    for mlp in mlps:
        torch.manual_seed(0)
        layers = []
        for k, (fan_in, fan_out) in enumerate(mlp.layers):
            layers.append(nn.Linear(fan_in, fan_out))
            if k < len(mlp.layers) - 1:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = nn.CrossEntropyLoss()
        x, y = (torch.from_numpy(a).to(dev) for a in mlp_data(mlp, np))

        def step():
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()

        results.append(dict(time_step(step, sync, max_time), model=mlp.name,
                            threads=torch.get_num_threads(), version=torch.__version__,
                            omp_wait_policy_seen=seen, omp_settings_seen=settings))
    return results


def backprop_worker(device: str, threads: int, mlps, max_time: float) -> list[dict]:
    import backprop
    from backprop import kernels as K
    from workloads import TrainingStep, device_unavailable_reason, synced

    reason = device_unavailable_reason(device)
    if reason is not None:
        return [{"skipped": reason}]
    results = []
    for mlp in mlps:
        step = TrainingStep(mlp, device)
        with mlp.blas_threads(device):  # as fit trains it
            timing = time_step(step, synced(device, lambda: None), max_time)
        results.append(dict(timing, model=mlp.name, threads=_numba_threads(),
                            kernels=K.backend_name(device), version=backprop.__version__,
                            omp_wait_policy_seen=os.environ.get("OMP_WAIT_POLICY", "default"),
                            omp_settings_seen=_omp_settings()))
    return results


def _numba_threads():
    import numba

    return numba.get_num_threads()


def run_worker(framework: str, device: str, threads: int, models: list[str], max_time: float,
               smoke: bool, wait_policy: str = "default") -> list[dict]:
    """Run one framework on one device in a subprocess with ``threads`` threads everywhere
    and ``OMP_WAIT_POLICY`` set to ``wait_policy`` ("default": unset, whatever this process
    has, since importing backprop here sets it)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    for var in OMP_VARIABLES:
        env.pop(var, None)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
           "--devices", device, "--threads", str(threads), "--models", ",".join(models),
           "--max-time", str(max_time)] + (["--smoke"] if smoke else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {framework} worker on {device} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [dict(r, framework=framework, device=device, omp_wait_policy=wait_policy)
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    wait_policy = os.environ.get("OMP_WAIT_POLICY")  # as run_worker set it, before ...
    from workloads import MLPS  # ... this imports backprop, which sets it for Numba

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file to write (default: print)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu,cuda")
    parser.add_argument("--threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="threads for both frameworks")
    parser.add_argument("--models", default=",".join(MLPS), help=f"subset of {list(MLPS)}")
    parser.add_argument("--max-time", type=float, default=1.0,
                        help="seconds of timed steps per model (at least 5 steps)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating runs of each framework; the best median counts")
    parser.add_argument("--smoke", action="store_true",
                        help="small widths and batches, a few steps: checks the script runs")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MLPS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected a subset of {list(MLPS)}")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.smoke:
        args.max_time, args.repeat = min(args.max_time, 0.05), 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    if args.worker:
        if args.worker == "torch":  # PyTorch's OpenMP reads the policy when torch is imported
            for var in OMP_VARIABLES:
                os.environ.pop(var, None)
            if wait_policy is not None:
                os.environ["OMP_WAIT_POLICY"] = wait_policy
        mlps = [MLPS[m].smoke() if args.smoke else MLPS[m] for m in models]
        worker = torch_worker if args.worker == "torch" else backprop_worker
        print(json.dumps(worker(devices[0], args.threads, mlps, args.max_time)))
        return 0

    if importlib.util.find_spec("torch") is None:
        print("torch_compare: PyTorch is not installed, skipping the comparison "
              "(pip install torch to run it)")
        return 0
    results, skipped = [], []
    for device in devices:
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeat):
            order = FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]
            for framework in order:
                for policy in WAIT_POLICIES[framework]:
                    for row in run_worker(framework, device, args.threads, models,
                                          args.max_time, args.smoke, policy):
                        if "skipped" in row:
                            skipped.append(f"{framework} on {device}: {row['skipped']}")
                        else:
                            runs.setdefault((framework, row["model"]), []).append(row)
        for rows in runs.values():
            best = min(rows, key=lambda r: r["median"])
            by_policy = {p: min(r["median"] for r in rows if r["omp_wait_policy"] == p)
                         for p in dict.fromkeys(r["omp_wait_policy"] for r in rows)}
            results.append(dict(best, repeats=[r["median"] for r in rows],
                                median_by_wait_policy=by_policy))
        skipped = sorted(set(skipped))
    from report import describe_machine

    report = {"threads": args.threads, "smoke": args.smoke, "max_time": args.max_time,
              "repeat": args.repeat,
              "machine": describe_machine(), "skipped": skipped, "results": results}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"torch_compare: wrote {args.out} ({len(results)} results"
              + (f"; skipped: {'; '.join(skipped)}" if skipped else "") + ")")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
