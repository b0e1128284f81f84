"""Training-step ratios between frameworks measured in interleaved time slices.

    python benchmarks/paired_slices.py --out-dir benchmarks/results/<machine>-<date>
        [--frameworks backprop-loop,backprop-fit,torch,jax] [--models tiny,digits,...]
        [--rounds 20] [--slice 0.25] [--threads N] [--smoke]

Why. ``frameworks.py`` runs each framework in its own process for a second or more and
alternates the processes; on a shared VM whose speed moves between regimes in steps of a few
seconds (this project's 2-core Intel VM: its GEMM speed between 170 and 275 GFLOP/s), the
repeats of two frameworks land in different regimes, and two runs an hour apart disagreed in
the sign of the mnist ratio. Here every framework's worker process is started once, warmed
up and then *stopped* (``SIGSTOP``: its threads, spinning ones included, take no CPU). The
driver then resumes one worker at a time (``SIGCONT``), lets it run steps for ``--slice``
seconds, stops it again, and goes on to the next, in an order rotated every round. Each
round's slices are a fraction of a second apart, so a ratio taken within a round compares the
frameworks under the same conditions; the result is the median of the ``--rounds`` per-round
ratios (each slice: the median of its steps, the first two dropped), with the interquartile
range of the per-round ratios as the spread.

The step is the one of ``frameworks.py`` (``zero_grad``, forward, softmax cross-entropy,
backward, Adam; the same weights and data): ``backprop-loop``, ``backprop-fit``, ``torch``
(eager, under its default OpenMP wait policy or ``--torch-wait-policy``), ``jax`` (one
``jax.jit``). Ratios are ``framework / backprop-loop`` step times (>1×: backprop's hand-written
loop is faster). Writes ``paired_slices.json`` and ``.md``. POSIX only (signals).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from frameworks import (TRAIN_FRAMEWORKS, Spec, _setup_worker, framework_info,  # noqa: E402
                        missing_modules, training_case, worker_env)

BASELINE = "backprop-loop"
DROP = 2  # steps dropped at the start of each slice: the first after SIGCONT are cold


# ---------------------------------------------------------------------------------------
# The worker: build the step, warm it, then run slices on request
def serve(framework: str, spec: Spec, threads: int, wait_policy: str) -> int:
    _setup_worker(framework, threads, wait_policy)
    case = training_case(framework, spec)
    step, sync = case["step"], case["sync"]
    with case["context"]:
        for _ in range(5):
            step()
        sync()
        _reply({"ready": True, "info": framework_info(framework)})
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            seconds = float(command[1])
            times = []
            start = time.perf_counter()
            while len(times) < DROP + 3 or time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            _reply({"times": times})
    return 0


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# The driver
class Worker:
    """One framework's serving process, stopped except during its slices."""

    def __init__(self, framework: str, spec: Spec, threads: int, wait_policy: str):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", framework,
               "--spec", json.dumps(spec.as_json()), "--threads", str(threads),
               "--torch-wait-policy", wait_policy]
        env = worker_env(threads, wait_policy if framework == "torch" else None)
        self.framework = framework
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hello = self._read()
        self.info = hello.get("info", {})
        self.stop()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.framework} worker exited:\n"
                               f"{self.proc.stderr.read()[-4000:]}")
        return json.loads(line)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def slice(self, seconds: float) -> float:
        """Resume, run steps for ``seconds``, stop; the median step time of the slice."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            self.proc.stdin.write(f"run {seconds}\n")
            self.proc.stdin.flush()
            times = self._read()["times"]
        finally:
            self.stop()
        return statistics.median(times[DROP:])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def measure(spec: Spec, frameworks: list[str], rounds: int, seconds: float, threads: int,
            wait_policy: str) -> dict:
    """Slices of every framework on ``spec``, ``rounds`` rounds; per-round ratios."""
    workers = []
    try:
        for fw in frameworks:
            workers.append(Worker(fw, spec, threads, wait_policy))
        slices = {w.framework: [] for w in workers}
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            for w in order:
                slices[w.framework].append(w.slice(seconds))
        infos = {w.framework: w.info for w in workers}
    finally:
        for w in workers:
            w.close()
    out = {"model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
           "slices_ms": {fw: [t * 1e3 for t in ts] for fw, ts in slices.items()},
           "info": infos, "ratios": {}}
    base = slices.get(BASELINE)
    for fw, ts in slices.items():
        if base is None or fw == BASELINE:
            continue
        per_round = [t / b for t, b in zip(ts, base)]
        q25, _, q75 = statistics.quantiles(per_round, n=4, method="inclusive")
        out["ratios"][fw] = {"median": statistics.median(per_round), "q25": q25, "q75": q75,
                             "faster_rounds": sum(q > 1.0 for q in per_round),
                             "rounds": len(per_round)}
    return out


def write(out_dir: Path, results: list[dict], args, frameworks: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    (out_dir / "paired_slices.json").write_text(json.dumps(
        {"results": results, "rounds": args.rounds, "slice": args.slice,
         "threads": args.threads, "load_after": load}, indent=1))
    others = [fw for fw in frameworks if fw != BASELINE]
    cmd = "python benchmarks/paired_slices.py " + " ".join(sys.argv[1:])
    lines = ["# Training step: ratios from interleaved time slices", "",
             "Command:", "", f"    {cmd}", "",
             f"{args.rounds} rounds; each round resumes every framework's stopped worker "
             f"process once, in a rotated order, for {args.slice} s of steps (the slice's "
             f"median step, the first {DROP} dropped); {args.threads} threads everywhere. "
             f"Ratio = framework's step time / `{BASELINE}`'s in the same round (>1×: "
             f"backprop's hand-written loop is faster); median over rounds, interquartile "
             f"range of the per-round ratios, and in how many rounds `{BASELINE}` was faster. "
             f"1-minute load average after the run: {load[0]:.2f}.", "",
             "| model | batch | " + " | ".join(f"{fw} (ms)" for fw in frameworks) + " | " +
             " | ".join(f"{fw} / loop" for fw in others) + " |",
             "|---|---:|" + "---:|" * len(frameworks) + "---|" * len(others)]
    for res in results:
        cells = [f"{statistics.median(res['slices_ms'][fw]):.4g}" for fw in frameworks]
        for fw in others:
            r = res["ratios"].get(fw)
            cells.append("–" if r is None else
                         f"{r['median']:.2f}× ({r['q25']:.2f}–{r['q75']:.2f}; "
                         f"{r['faster_rounds']}/{r['rounds']})")
        lines.append(f"| {res['model']} | {res['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Step times (ms) are the median of the slices' medians: they move with the "
              "host's regime; the ratios, taken within rounds, are the comparison."]
    path = out_dir / "paired_slices.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--frameworks", default=",".join(TRAIN_FRAMEWORKS))
    parser.add_argument("--models", default="tiny,digits,mnist,wide,b1024,b4096,b8192")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--slice", type=float, default=0.25, help="seconds per slice")
    parser.add_argument("--threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
    parser.add_argument("--torch-wait-policy", default="default",
                        help="PyTorch's OMP_WAIT_POLICY (default: unset)")
    parser.add_argument("--smoke", action="store_true", help="small models, 2 short rounds")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, Spec.of(json.loads(args.spec)), args.threads,
                     args.torch_wait_policy)
    if not hasattr(signal, "SIGSTOP"):
        print("paired_slices.py needs POSIX signals (SIGSTOP/SIGCONT)")
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required")
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in TRAIN_FRAMEWORKS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {TRAIN_FRAMEWORKS}")
    if BASELINE not in frameworks:
        frameworks.insert(0, BASELINE)
    for fw in list(frameworks):
        missing = missing_modules(fw)
        if missing:
            print(f"paired_slices: {fw} skipped ({', '.join(missing)} not installed)")
            frameworks.remove(fw)
    from workloads import LARGE_BATCH_MLPS, MLPS  # imports backprop: the driver only

    mlps = {**MLPS, **LARGE_BATCH_MLPS}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in mlps]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(mlps)}")
    if args.smoke:
        args.rounds, args.slice = 2, 0.05
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the spread needs two per-round ratios)")
    results = []
    for name in models:
        mlp = mlps[name].smoke() if args.smoke else mlps[name]
        spec = Spec(mlp.name, tuple(mlp.sizes), mlp.batch)
        results.append(measure(spec, frameworks, args.rounds, args.slice, args.threads,
                               args.torch_wait_policy))
        print(f"paired_slices: {name} done", flush=True)
    print(f"paired_slices: wrote {write(args.out_dir, results, args, frameworks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
