"""Training-step (or inference) ratios between frameworks measured in interleaved time slices.

    python benchmarks/paired_slices.py --out-dir benchmarks/results/<machine>-<date>
        [--frameworks backprop-loop,backprop-fit,backprop-loop@numpy,torch,jax]
        [--models tiny,digits,...]
        [--rounds 20] [--slice 0.25] [--threads N] [--busy-cores N] [--baseline NAME]
        [--smoke]
    python benchmarks/paired_slices.py --inference --out-dir DIR
        [--frameworks backprop,onnxruntime,torch,jax] [--models digits:1,mnist:32,...]

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
``jax.jit``); a backprop one may name the backend of its Dense products after an ``@``
(``backprop-loop@numpy``: ``BACKPROP_GEMM=numpy`` in that worker), to compare backends in
the same rounds, and its thread mode after a ``+`` (``backprop-loop+adaptive``:
``BACKPROP_THREADS=adaptive``, :mod:`backprop.thread_governor`). Ratios are ``framework /
backprop-loop`` step times (>1×: backprop's hand-written loop is faster; ``--baseline``
names another framework to divide by). Writes ``paired_slices.json`` and ``.md``. POSIX
only (signals).

``--busy-cores N``: the whole run shares the machine with ``N`` busy processes (a pure-Python
loop each), pinned to the last ``N`` CPUs the driver may use: the conditions of a laptop or a
shared server where other programs keep some cores busy. A framework whose parallel regions
assign work to fixed threads waits, at the end of every region, for the thread that shares
its core with a busy process, while a work-stealing one (XLA's) lets the other threads take
its share; ``--threads`` sets how many threads every framework uses.

``--inference``: each step is one inference call on a batch of ``model:rows`` (the calls of
``frameworks.py``'s inference section: backprop's ``predict``, ONNX Runtime's
``session.run``, PyTorch's forward under ``inference_mode``, a ``jax.jit`` forward;
``backprop+frozen``: the ``predict`` of ``bp.freeze(model)``, :mod:`backprop.frozen`); ratios
are ``framework / backprop`` (``predict``). Writes ``paired_inference.json`` and ``.md``.
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

from frameworks import (INFERENCE_FRAMEWORKS, TRAIN_FRAMEWORKS, Spec,  # noqa: E402
                        _setup_worker, framework_info, inference_batch, inference_variants,
                        init_params, missing_modules, training_case, worker_env)

BASELINE = "backprop-loop"
INFERENCE_BASELINE = "backprop"  # predict
INFERENCE_CASES = "digits:1,digits:32,mnist:1,mnist:32"
DROP = 2  # steps dropped at the start of each slice: the first after SIGCONT are cold


# ---------------------------------------------------------------------------------------
# The worker: build the step, warm it, then run slices on request
def serve(framework: str, spec: Spec, threads: int, wait_policy: str,
          inference: bool = False) -> int:
    framework, _, mode = framework.partition("+")
    variant = None
    if mode == "frozen":  # inference: the frozen model's predict
        variant = mode
    elif mode:  # the thread mode, read at the first optimizer step, in this process only
        os.environ["BACKPROP_THREADS"] = mode
    framework, _, gemm_backend = framework.partition("@")
    if gemm_backend:  # read at backprop's first product, in this process only
        os.environ["BACKPROP_GEMM"] = gemm_backend
    _setup_worker(framework, threads, wait_policy)
    case = inference_case(framework, spec, threads, variant) if inference else training_case(
        framework, spec)
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


def inference_case(framework: str, spec: Spec, threads: int,
                   variant: str | None = None) -> dict:
    """One inference call of ``framework`` on a batch of ``spec.batch`` rows, as a step:
    ``variant`` of ``frameworks.inference_variants``, else its comparison variant
    (backprop's ``predict``)."""
    import contextlib

    variants, to_input, _ = inference_variants(framework, spec, init_params(spec.sizes),
                                               threads)
    call = variants[variant] if variant else next(iter(variants.values()))
    x = to_input(inference_batch(spec.sizes, spec.batch))
    return {"step": lambda: call(x), "sync": lambda: None,
            "context": contextlib.nullcontext()}


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# The driver
class Worker:
    """One framework's serving process, stopped except during its slices."""

    def __init__(self, framework: str, spec: Spec, threads: int, wait_policy: str,
                 inference: bool = False):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", framework,
               "--spec", json.dumps(spec.as_json()), "--threads", str(threads),
               "--torch-wait-policy", wait_policy] + (["--inference"] if inference else [])
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


def base_framework(name: str) -> str:
    """The framework of a worker's name, without its ``@backend`` and ``+mode``."""
    return name.partition("+")[0].partition("@")[0]


def busy_process(cpu: int) -> subprocess.Popen:
    """A process that keeps CPU ``cpu`` busy (a pure-Python loop pinned to it) until killed."""
    return subprocess.Popen([sys.executable, "-c",
                             f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


def baseline_of(inference: bool, chosen: str | None = None) -> str:
    """The framework the ratios divide by: ``chosen`` (``--baseline``), else backprop's
    ``predict`` or its hand-written loop."""
    return chosen or (INFERENCE_BASELINE if inference else BASELINE)


def measure(spec: Spec, frameworks: list[str], rounds: int, seconds: float, threads: int,
            wait_policy: str, inference: bool = False, baseline: str | None = None) -> dict:
    """Slices of every framework on ``spec``, ``rounds`` rounds; per-round ratios to the
    baseline's (:func:`baseline_of`)."""
    baseline = baseline_of(inference, baseline)
    workers = []
    try:
        for fw in frameworks:
            workers.append(Worker(fw, spec, threads, wait_policy, inference))
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
    base = slices.get(baseline)
    for fw, ts in slices.items():
        if base is None or fw == baseline:
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
    stem = "paired_inference" if args.inference else "paired_slices"
    baseline = baseline_of(args.inference, args.baseline)
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"results": results, "rounds": args.rounds, "slice": args.slice,
         "threads": args.threads, "inference": args.inference, "load_after": load,
         "busy_cores": args.busy_cores, "baseline": baseline},
        indent=1))
    others = [fw for fw in frameworks if fw != baseline]
    cmd = "python benchmarks/paired_slices.py " + " ".join(sys.argv[1:])
    what, unit, short = (("Inference (`predict`, ONNX Runtime's `session.run`, PyTorch under "
                          "`inference_mode`, one call)", "µs", "predict") if args.inference
                         else ("Training step", "ms", "loop"))
    if args.baseline:
        short = args.baseline
    lines = [f"# {what}: ratios from interleaved time slices", "",
             "Command:", "", f"    {cmd}", "",
             f"{args.rounds} rounds; each round resumes every framework's stopped worker "
             f"process once, in a rotated order, for {args.slice} s of calls (the slice's "
             f"median call, the first {DROP} dropped); {args.threads} threads everywhere. "
             f"Ratio = framework's time / `{baseline}`'s in the same round (>1×: "
             f"`{baseline}` is faster); median over rounds, interquartile "
             f"range of the per-round ratios, and in how many rounds `{baseline}` was faster. "
             f"1-minute load average after the run: {load[0]:.2f}." + (
                 f" Beside {args.busy_cores} busy process(es) pinned to the last "
                 f"{args.busy_cores} CPU(s) (`--busy-cores`)." if args.busy_cores else ""), "",
             "| model | batch | " + " | ".join(f"{fw} ({unit})" for fw in frameworks) + " | " +
             " | ".join(f"{fw} / {short}" for fw in others) + " |",
             "|---|---:|" + "---:|" * len(frameworks) + "---|" * len(others)]
    scale = 1e3 if args.inference else 1.0
    for res in results:
        cells = [f"{statistics.median(res['slices_ms'][fw]) * scale:.4g}" for fw in frameworks]
        for fw in others:
            r = res["ratios"].get(fw)
            cells.append("–" if r is None else
                         f"{r['median']:.2f}× ({r['q25']:.2f}–{r['q75']:.2f}; "
                         f"{r['faster_rounds']}/{r['rounds']})")
        lines.append(f"| {res['model']} | {res['batch']} | " + " | ".join(cells) + " |")
    lines += ["", f"Times ({unit}) are the median of the slices' medians: they move with the "
              "host's regime; the ratios, taken within rounds, are the comparison."]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--frameworks", default=None,
                        help=f"training: subset of {','.join(TRAIN_FRAMEWORKS)} (all); "
                        f"--inference: subset of backprop,onnxruntime,torch,jax "
                        "(backprop,onnxruntime,torch)")
    parser.add_argument("--models", default=None,
                        help="training: MLP names (tiny,digits,mnist,wide,b1024,b4096,b8192); "
                        f"--inference: model:rows cases ({INFERENCE_CASES})")
    parser.add_argument("--inference", action="store_true",
                        help="one inference call per step instead of a training step")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--slice", type=float, default=0.25, help="seconds per slice")
    parser.add_argument("--threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count())
    parser.add_argument("--baseline", default=None,
                        help="the framework the ratios divide by (default: backprop-loop; "
                        "--inference: backprop)")
    parser.add_argument("--busy-cores", type=int, default=0,
                        help="run beside N busy processes pinned to the last N CPUs")
    parser.add_argument("--torch-wait-policy", default="default",
                        help="PyTorch's OMP_WAIT_POLICY (default: unset)")
    parser.add_argument("--smoke", action="store_true", help="small models, 2 short rounds")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, Spec.of(json.loads(args.spec)), args.threads,
                     args.torch_wait_policy, args.inference)
    if not hasattr(signal, "SIGSTOP"):
        print("paired_slices.py needs POSIX signals (SIGSTOP/SIGCONT)")
        return 0
    if args.out_dir is None:
        parser.error("--out-dir is required")
    known = INFERENCE_FRAMEWORKS if args.inference else TRAIN_FRAMEWORKS
    baseline = baseline_of(args.inference, args.baseline)
    chosen = args.frameworks or ("backprop,onnxruntime,torch" if args.inference
                                 else ",".join(TRAIN_FRAMEWORKS))
    frameworks = [f.strip() for f in chosen.split(",") if f.strip()]
    unknown = [f for f in dict.fromkeys(frameworks + [baseline])
               if base_framework(f) not in known or (base_framework(f) != f and not
                                                      f.startswith("backprop")) or
               f.partition("+")[2] not in (("", "frozen") if args.inference
                                           else ("", "fixed", "adaptive"))]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {known} (a backprop one "
                     "may name its products' backend and its thread mode, e.g. "
                     "backprop-loop@numpy, backprop-loop+adaptive; at inference "
                     "backprop+frozen, the frozen model's predict)")
    if baseline not in frameworks:
        frameworks.insert(0, baseline)
    for fw in list(frameworks):
        missing = missing_modules(base_framework(fw))
        if missing:
            print(f"paired_slices: {fw} skipped ({', '.join(missing)} not installed)")
            frameworks.remove(fw)
    from workloads import LARGE_BATCH_MLPS, MLPS  # imports backprop: the driver only

    mlps = {**MLPS, **LARGE_BATCH_MLPS}
    if args.inference:
        cases = []
        for case in (args.models or INFERENCE_CASES).split(","):
            name, _, rows = case.strip().partition(":")
            if name not in mlps or not rows.isdigit() or int(rows) < 1:
                parser.error(f"bad inference case {case!r}: model:rows, a model of "
                             f"{sorted(mlps)}")
            cases.append((name, int(rows)))
    else:
        cases = [(m.strip(), None) for m in (args.models or
                                             "tiny,digits,mnist,wide,b1024,b4096,b8192"
                                             ).split(",") if m.strip()]
        unknown = [m for m, _ in cases if m not in mlps]
        if unknown:
            parser.error(f"unknown models {unknown}; choose from {sorted(mlps)}")
    if args.smoke:
        args.rounds, args.slice = 2, 0.05
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the spread needs two per-round ratios)")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.busy_cores < 0 or (args.busy_cores and args.busy_cores >= len(cpus)):
        parser.error(f"--busy-cores must leave at least one of the {len(cpus)} CPUs free "
                     "(and needs sched_setaffinity)")
    results = []
    busy = [busy_process(cpu) for cpu in cpus[len(cpus) - args.busy_cores:]] \
        if args.busy_cores else []
    try:
        for name, rows in cases:
            mlp = mlps[name].smoke() if args.smoke else mlps[name]
            spec = Spec(mlp.name, tuple(mlp.sizes), rows or mlp.batch)
            results.append(measure(spec, frameworks, args.rounds, args.slice, args.threads,
                                   args.torch_wait_policy, args.inference, baseline))
            print(f"paired_slices: {name} ({spec.batch} rows) done", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    print(f"paired_slices: wrote {write(args.out_dir, results, args, frameworks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
