"""bf16 mixed precision on the CPU: backprop's training step against PyTorch's autocast.

    python benchmarks/mixed_precision.py [--out-dir DIR] [--threads 1,2]
        [--models tiny,digits,mnist,wide] [--max-time SECONDS] [--repeat R]
        [--check-steps N] [--smoke]

For each MLP of ``workloads.MLPS`` (relu hidden layers, float32 master weights) one training
step, ``zero_grad``, forward, softmax cross-entropy (mean), backward, Adam(lr=1e-3), timed in
five variants on one fixed batch, with the same initial weights (``frameworks.init_params``)
and data (``frameworks.batch_data``) everywhere:

- ``bp-f32``: backprop's hand-written loop in float32 (``frameworks.backprop_training``'s
  loop);
- ``bp-bf16``: the same loop under ``bp.autocast(request)`` with one
  :class:`~backprop.precision.PrecisionRequest` for the whole run, as ``fit(...,
  precision="bf16-mixed")`` trains (one region, so the optimizer's pass keeps the bf16
  weight copies current); default per-product thresholds unless
  ``BACKPROP_LOWP_MIN_MACS``/``BACKPROP_LOWP_MIN_INNER`` are set;
- ``bp-bf16-region``: the same with a fresh ``with bp.autocast("bfloat16"):`` around each
  step, the form a hand-written loop is likely to take (each entry is a new generation, so
  the weights' bf16 copies are cast again at their first use in it);
- ``torch-f32``: PyTorch eager, the same loop;
- ``torch-autocast``: the same with forward and loss under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (PyTorch's recipe: float32 parameters and
  Adam, bf16 ``linear``).

The PyTorch variants share one process (PyTorch runs under its default OpenMP wait policy
and under ``active`` and keeps the faster, as in ``frameworks.py``), and so do backprop's on
one thread; on more threads backprop's float32 step runs in a process of its own
(:func:`worker_groups`: OpenBLAS's workers spin after a product, and a float32 step's spin
would slow the bf16 steps after it). Inside a process the variants' steps alternate (order
reversed every round). The processes alternate ``--repeat`` times (reversed every other
repeat), each with the same thread count everywhere (``frameworks.worker_env``); each
variant's figure is its best median over the repeats, and each ratio is also given as the
median over the repeats of the ratio within a repeat (:func:`summarize`).

Before timing, each worker trains fresh copies for ``--check-steps`` steps and records the
losses: the bf16 variants must stay close to float32 (a sanity check, not an accuracy
study: ``bf16_accuracy.py`` is that), and PyTorch's float32 losses must equal backprop's
(same weights and data).

Where bf16 is not fast here (``backprop.bf16.bf16_support()["fast"]`` False: no MKL, or a
CPU without AMX-BF16/AVX512-BF16) the bf16 variants fall back to float32 (the mode's
``PrecisionFallbackWarning``); the run goes on and the Markdown says so. Output:
``mixed_precision.json`` and ``mixed_precision.md`` in ``--out-dir``. ``--smoke`` runs small
shapes for a few steps (``test_bench_mixed_precision.py``). A script, not collected by
pytest; PyTorch is optional (skipped with a message).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from frameworks import (LR, OMP_VARIABLES, Spec, backprop_model, batch_data, init_params,  # noqa: E402
                        torch_model, worker_rows)
from frameworks_report import _ms  # noqa: E402

DEFAULT_OUT = HERE / "results" / "intel-xeon-2c-2026-12-05"
MODELS = ("tiny", "digits", "mnist", "wide")
VARIANTS = {"backprop": ("bp-f32", "bp-bf16", "bp-bf16-region"),
            "torch": ("torch-f32", "torch-autocast")}
WAIT_POLICIES = {"backprop": ("default",), "torch": ("default", "active")}
CHECK_STEPS = 5
# |bf16 loss − float32 loss| after the check steps, relative to the float32 loss; bf16
# operands carry 8 significant bits, so a few steps move the loss by well under 1 %.
LOSS_RTOL = 0.03
# PyTorch's float32 loss against backprop's: the same arithmetic up to summation order.
SAME_RTOL = 1e-4


# ---------------------------------------------------------------------------------------
# Timing
def interleave(steps: dict, seconds: float, min_rounds: int = 5, warmup: int = 3) -> dict:
    """Run the callables of ``steps`` in turn (order reversed every round, so none always
    follows the same one) for about ``seconds``; per name ``{median, min, mean, rounds}``
    in seconds."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < min_rounds or time.perf_counter() - start < seconds:
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        r += 1
    return {name: {"median": statistics.median(t), "min": min(t), "mean": statistics.fmean(t),
                   "rounds": len(t)} for name, t in times.items()}


# ---------------------------------------------------------------------------------------
# backprop
def _bp_loop(spec: Spec, params, x, y, precision: str):
    """A hand-written step of a fresh model holding ``params``: ``precision`` "float32",
    "bf16" (one PrecisionRequest held across steps, as fit) or "bf16-region" (a fresh
    ``bp.autocast`` per step). Returns ``(step, model)``."""
    import backprop as bp
    from backprop.losses import SoftmaxCrossEntropyLoss
    from backprop.optim import Adam
    from backprop.precision import PrecisionRequest

    model = backprop_model(spec, params)
    loss = SoftmaxCrossEntropyLoss()
    opt = Adam(model.parameters(), lr=LR)

    def body():
        opt.zero_grad()
        value = loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()  # inside the region: Adam's pass also writes the bf16 weight copy
        return value

    if precision == "float32":
        return body, model
    if precision == "bf16":
        request = PrecisionRequest("bf16-mixed")

        def step():
            with bp.autocast(request):
                return body()

        return step, model

    def step_region():
        with bp.autocast("bfloat16"):
            return body()

    return step_region, model


def bf16_plan(spec: Spec, policy) -> dict:
    """Which of the step's products run in bf16 under ``policy`` (None: none, the mode
    fell back to float32): per layer ``fwd`` (X·Wᵀ), ``dW`` (δᵀ·X) and ``dX`` (δ·W; none
    for the first layer, whose input needs no gradient)."""
    layers, n_bf16, total = [], 0, 0
    for k, (i, o) in enumerate(spec.layers):
        row = {}
        for name, (m, n, kk) in (("fwd", (spec.batch, o, i)), ("dW", (o, i, spec.batch)),
                                 ("dX", (spec.batch, i, o))):
            if name == "dX" and k == 0:
                continue
            row[name] = bool(policy is not None and policy.lowp(m, n, kk))
            n_bf16 += row[name]
            total += 1
        layers.append(row)
    return {"layers": layers, "bf16": n_bf16, "total": total,
            "min_macs": None if policy is None else policy.min_macs,
            "min_inner": None if policy is None else policy.min_inner,
            "gemm": None if policy is None else policy.gemm}


BP_PRECISION = {"bp-f32": "float32", "bp-bf16": "bf16", "bp-bf16-region": "bf16-region"}


def backprop_worker(specs, max_time: float, check_steps: int, variants) -> list[dict]:
    import numpy as np

    from backprop import bf16
    from backprop.precision import PrecisionFallbackWarning, PrecisionRequest

    support = bf16.bf16_support()
    rows = []
    for spec in specs:
        params, (x, y) = init_params(spec.sizes), batch_data(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PrecisionFallbackWarning)
            policy = PrecisionRequest("bf16-mixed").policy(np.empty(1, np.float32))
        # the mode warns once per process: later models get the reason from bf16_support
        fallback = [str(w.message) for w in caught
                    if issubclass(w.category, PrecisionFallbackWarning)] or [support["reason"]]
        losses = {}
        for variant in variants:
            step, _ = _bp_loop(spec, params, x, y, BP_PRECISION[variant])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PrecisionFallbackWarning)
                losses[variant] = [float(step()) for _ in range(check_steps)]
        steps = {v: _bp_loop(spec, params, x, y, BP_PRECISION[v])[0] for v in variants}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionFallbackWarning)
            timing = interleave(steps, max_time)
        rows.append({"model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
                     "timing": timing, "losses": losses, "plan": bf16_plan(spec, policy),
                     "bf16_fast": bool(support["fast"]), "bf16_reason": support["reason"],
                     "fallback": None if policy is not None else fallback[0]})
    return rows


def _backprop_info() -> dict:
    import numba

    import backprop
    from backprop import bf16
    from backprop import kernels as K

    return {"version": backprop.__version__, "kernels": K.backend_name("cpu"),
            "numba_threads": numba.get_num_threads(), "bf16": bf16.bf16_support(),
            "lowp_env": {v: os.environ[v] for v in ("BACKPROP_LOWP_MIN_MACS",
                                                     "BACKPROP_LOWP_MIN_INNER",
                                                     "BACKPROP_BF16_GEMM", "BACKPROP_MKL_RT",
                                                     "BACKPROP_KERNELS")
                         if os.environ.get(v)}}


# ---------------------------------------------------------------------------------------
# PyTorch
def _torch_loop(params, x, y, autocast: bool):
    import torch
    from torch import nn

    model = torch_model(params)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        if autocast:  # PyTorch's CPU recipe: forward and loss in the region, the rest out
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value = criterion(model(x), y)
        else:
            value = criterion(model(x), y)
        value.backward()
        opt.step()
        return value

    return step


def torch_worker(specs, max_time: float, check_steps: int, variants) -> list[dict]:
    import torch

    rows = []
    for spec in specs:
        params = init_params(spec.sizes)
        x, y = (torch.from_numpy(a) for a in batch_data(spec))
        losses = {}
        for variant in variants:
            step = _torch_loop(params, x, y, variant != "torch-f32")
            losses[variant] = [float(step()) for _ in range(check_steps)]
        steps = {v: _torch_loop(params, x, y, v != "torch-f32") for v in variants}
        rows.append({"model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
                     "timing": interleave(steps, max_time), "losses": losses})
    return rows


def _torch_info() -> dict:
    import torch

    info = {"version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy_seen": os.environ.get("OMP_WAIT_POLICY", "default"),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older PyTorch: not reported
        pass
    return info


# ---------------------------------------------------------------------------------------
# Workers and driver
def worker_main(args) -> int:
    framework = args.worker
    if framework == "torch":  # PyTorch's OpenMP reads the policy when torch is imported
        for var in OMP_VARIABLES:
            os.environ.pop(var, None)
        if args.wait_policy != "default":
            os.environ["OMP_WAIT_POLICY"] = args.wait_policy
        import torch

        torch.set_num_threads(args.threads)
    specs = [Spec.of(d) for d in json.loads(args.spec)]
    variants = args.variants.split(",") if args.variants else list(VARIANTS[framework])
    load = os.getloadavg()[0]
    if framework == "torch":
        rows = torch_worker(specs, args.max_time, args.check_steps, variants)
        info = _torch_info()
    else:
        rows = backprop_worker(specs, args.max_time, args.check_steps, variants)
        info = _backprop_info()
    info.update(load_at_start=load, threads=args.threads)
    print(json.dumps([dict(r, info=info, variants=variants) for r in rows]))
    return 0


def run_worker(framework: str, specs, threads: int, max_time: float, check_steps: int,
               wait_policy: str = "default", variants=()) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
           "--threads", str(threads), "--max-time", str(max_time),
           "--check-steps", str(check_steps), "--wait-policy", wait_policy,
           "--spec", json.dumps([s.as_json() for s in specs])]
    if variants:
        cmd += ["--variants", ",".join(variants)]
    return worker_rows(cmd, f"the {framework} worker", framework, threads, wait_policy)


def worker_groups(frameworks, threads: int, smoke: bool) -> list[tuple]:
    """``(framework, wait policy, variants)`` of each process of one repeat. On one thread
    backprop's variants share a process (their steps alternate); on more, its float32 step
    runs apart: OpenBLAS's workers keep spinning on the cores after a product, and a
    float32 step's spin would be charged to the bf16 steps that follow it (a bf16 step
    leaves such a spin too, from its own float32 products: that one is part of the mode)."""
    out = []
    for framework in frameworks:
        groups = [VARIANTS[framework]]
        if framework == "backprop" and threads > 1:
            groups = [("bp-f32",), ("bp-bf16", "bp-bf16-region")]
        for policy in (WAIT_POLICIES[framework][:1] if smoke else WAIT_POLICIES[framework]):
            out += [(framework, policy, tuple(group)) for group in groups]
    return out


RATIOS = (("bp-f32", "bp-bf16"), ("bp-f32", "bp-bf16-region"),
          ("torch-f32", "torch-autocast"), ("torch-autocast", "bp-bf16"))


def summarize(runs: list[dict]) -> dict:
    """Per model: each variant's best median over repeats (and wait policies), its
    fastest step and every repeat's median; and per repeat the ratios of :data:`RATIOS`
    (each variant's median in that repeat, the faster wait policy for PyTorch), whose
    median over the repeats is ``per_repeat``: the two sides of each ratio ran in the same
    process or in neighbouring ones, so it follows the machine's drift less than the ratio
    of best medians, and it does not favour the side with more processes per repeat."""
    models: dict = {}
    slots: dict = {}
    for run in runs:
        m = models.setdefault(run["model"], {"sizes": run["sizes"], "batch": run["batch"],
                                             "variants": {}})
        if "plan" in run:
            for key in ("plan", "bf16_fast", "bf16_reason", "fallback"):
                m[key] = run[key]
        slot = slots.setdefault((run["model"], run.get("repeat", 0)), {})
        for name, t in run["timing"].items():
            v = m["variants"].setdefault(name, {"repeats": [], "mins": [], "policies": []})
            v["repeats"].append(t["median"])
            v["mins"].append(t["min"])
            v["policies"].append(run["omp_wait_policy"])
            slot[name] = min(slot.get(name, float("inf")), t["median"])
    for m in models.values():
        for v in m["variants"].values():
            best = min(range(len(v["repeats"])), key=v["repeats"].__getitem__)
            v.update(median=v["repeats"][best], min=min(v["mins"]),
                     wait_policy=v["policies"][best])
        m["per_repeat"] = {}
    for (model, _), slot in sorted(slots.items()):
        for num, den in RATIOS:
            if num in slot and den in slot:
                models[model]["per_repeat"].setdefault(f"{num}/{den}", []).append(
                    slot[num] / slot[den])
    for m in models.values():
        m["per_repeat"] = {k: {"median": statistics.median(r), "repeats": r}
                           for k, r in m["per_repeat"].items()}
    return models


def ratio(models, model, num, den):
    v = models.get(model, {}).get("variants", {})
    if num not in v or den not in v:
        return None
    return v[num]["median"] / v[den]["median"]


def goals(models) -> list[dict]:
    """The issue's speed targets, each met or not (None: not measured in this run), judged
    on the per-repeat ratio (see :func:`summarize`); the ratio of best medians beside it."""
    def entry(goal, model, num, den, target):
        per = models.get(model, {}).get("per_repeat", {}).get(f"{num}/{den}", {})
        value = per.get("median")
        best = ratio(models, model, num, den)
        value = best if value is None else value
        met = None if value is None else (value > 1.0 if target == 1.0 else value >= target)
        return {"goal": goal, "value": value, "best_medians": best, "target": target,
                "met": met}

    out = [entry(f"{m}: backprop bf16 faster than PyTorch autocast", m, "torch-autocast",
                 "bp-bf16", 1.0) for m in MODELS]
    out.append(entry("wide: backprop bf16 at least 1.5× PyTorch autocast", "wide",
                     "torch-autocast", "bp-bf16", 1.5))
    out += [entry(f"{m}: backprop bf16 faster than backprop float32", m, "bp-f32", "bp-bf16",
                  1.0) for m in ("mnist", "wide")]
    # implied by the issue: float32 GEMMs where bf16 does not pay, so no loss there
    out += [entry(f"{m}: backprop bf16 not slower than backprop float32 (implied; within "
                  "3 %)", m, "bp-f32", "bp-bf16", 0.97) for m in ("tiny", "digits")]
    return out


def sanity(runs: list[dict]) -> list[dict]:
    """Per model, from the first repeat's workers: each variant's losses over the check
    steps, the bf16 ones against float32 (LOSS_RTOL) and PyTorch's float32 against
    backprop's (SAME_RTOL)."""
    out = {}
    for run in runs:
        row = out.setdefault(run["model"], {"model": run["model"], "losses": {}})
        for name, values in run["losses"].items():
            row["losses"].setdefault(name, values)
    for row in out.values():
        L = row["losses"]
        checks = {}
        for name, ref, tol in (("bp-bf16", "bp-f32", LOSS_RTOL),
                               ("bp-bf16-region", "bp-f32", LOSS_RTOL),
                               ("torch-autocast", "torch-f32", LOSS_RTOL),
                               ("torch-f32", "bp-f32", SAME_RTOL)):
            if name in L and ref in L:
                i = 0 if name == "torch-f32" else -1  # same weights: the first loss agrees
                rel = abs(L[name][i] - L[ref][i]) / max(abs(L[ref][i]), 1e-12)
                checks[f"{name} vs {ref}"] = {"step": len(L[ref]) if i else 1, "rel": rel,
                                              "tol": tol, "ok": rel <= tol}
        row["checks"] = checks
        row["ok"] = all(c["ok"] for c in checks.values())
    return list(out.values())


# ---------------------------------------------------------------------------------------
# Markdown
def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render(data: dict) -> str:
    machine = data.get("machine", {})
    lines = ["# bf16 mixed precision: training step, backprop vs PyTorch autocast (CPU)", "",
             "Command:", "", f"    {data['command']}", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('usable_cpus', '?')} usable "
             f"CPUs; BLAS {machine.get('blas', '?')}; NumPy {machine.get('numpy', '?')}, "
             f"Numba {machine.get('numba', '?')}.",
             f"--max-time {data['max_time']} s per model and process, --repeat "
             f"{data['repeat']} (alternating processes), --check-steps {data['check_steps']}"
             f"{'; SMOKE RUN (small shapes): not a measurement' if data['smoke'] else ''}.",
             ""]
    versions = data.get("versions", {})
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
                  + ".", ""]
    bf = data.get("bf16") or {}
    if bf:
        if bf.get("fast"):
            lines += [f"bf16 here: {bf.get('reason')} (MKL threading layer "
                      f"{bf.get('threading_layer')}).", ""]
        else:
            lines += [f"**bf16 is not fast here ({bf.get('reason')}): backprop's bf16-mixed "
                      "mode fell back to float32, so its bf16 columns time float32 steps.**",
                      ""]
    if data.get("lowp_env"):
        lines += ["Thresholds from the environment: " + ", ".join(
            f"`{k}={v}`" for k, v in data["lowp_env"].items()) + ".", ""]
    for message in data.get("skipped", []):
        lines += [f"Skipped: {message}", ""]
    lines += [
        "One step: zero_grad, forward, softmax cross-entropy (mean), backward, Adam(lr=1e-3); "
        "relu hidden layers, float32 master weights, one fixed batch, the same initial weights "
        "and data everywhere. `bp-f32`: backprop's hand-written loop; `bp-bf16`: the same "
        "under `bp.autocast` with one `PrecisionRequest` held across steps (as "
        "`fit(precision=\"bf16-mixed\")` trains), the mode's per-product thresholds "
        "(the defaults unless the environment sets them, as said above); "
        "`bp-bf16-region`: a fresh `with bp.autocast(\"bfloat16\"):` around each step; "
        "`torch-f32`: PyTorch eager; `torch-autocast`: forward and loss under "
        "`torch.autocast(\"cpu\", dtype=torch.bfloat16)`. Milliseconds per step, best "
        "median of the repeats (PyTorch: also the faster of its default OpenMP wait policy "
        "and `active`). Ratios are speed-ups (>1×: the second-named is faster): "
        "`ac/bf16` = torch-autocast / bp-bf16, `f32/bf16` = bp-f32 / bp-bf16, "
        "`tf32/ac` = torch-f32 / torch-autocast. *bf16 GEMMs*: the step's products that "
        "run in bf16 (of all of them).", ""]
    for threads, section in data["sections"].items():
        models = section["models"]
        lb, la = section["load_before"], section["load_after"]
        lines += [f"## {threads} thread{'s' if int(threads) > 1 else ''}", "",
                  f"Load average (1, 5, 15 min) before: {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}; "
                  f"after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
                  f"{' (loaded machine: noisy, compare ratios only)' if lb[0] > 1 else ''}.",
                  "",
                  "| model | sizes | batch | bf16 GEMMs | bp-f32 | bp-bf16 | bp-bf16-region | "
                  "torch-f32 | torch-autocast | ac/bf16 | f32/bf16 | tf32/ac |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in models.items():
            v = {k: x["median"] for k, x in m["variants"].items()}
            plan = m.get("plan") or {}
            gemms = f"{plan.get('bf16', '?')}/{plan.get('total', '?')}" if plan else "–"
            if m.get("fallback"):
                gemms = "0 (fallback)"
            lines.append(
                f"| {name} | {'-'.join(map(str, m['sizes']))} | {m['batch']} | {gemms} | "
                f"{_ms(v.get('bp-f32'))} | {_ms(v.get('bp-bf16'))} | "
                f"{_ms(v.get('bp-bf16-region'))} | {_ms(v.get('torch-f32'))} | "
                f"{_ms(v.get('torch-autocast'))} | "
                f"{_x(ratio(models, name, 'torch-autocast', 'bp-bf16'))} | "
                f"{_x(ratio(models, name, 'bp-f32', 'bp-bf16'))} | "
                f"{_x(ratio(models, name, 'torch-f32', 'torch-autocast'))} |")
        lines += ["", "Per-repeat ratios (speed-ups, median over the repeats of each repeat's "
                  "ratio; the two sides ran in one process"
                  + (" (backprop's float32 step in a process of its own)" if int(threads) > 1
                     else "") + " or in neighbouring ones): less exposed to the machine's "
                  "drift than the ratios of best medians above.", "",
                  "| model | " + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |",
                  "|---|" + "---:|" * len(RATIOS)]
        for name, m in models.items():
            cells = [_x(m["per_repeat"].get(f"{a}/{b}", {}).get("median")) for a, b in RATIOS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Goals (issue; judged on the per-repeat ratio):", ""]
        for g in section["goals"]:
            mark = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT met")
            lines.append(f"- {g['goal']}: {_x(g['value'])} per repeat, "
                         f"{_x(g['best_medians'])} best medians ({mark})")
        lines += ["", "Fastest single step (ms) and every repeat's median:", "",
                  "| model | variant | fastest | repeats (wait policy) |", "|---|---|---:|---|"]
        for name, m in models.items():
            for variant, x in m["variants"].items():
                reps = ", ".join(f"{_ms(r)} ({p})" for r, p in zip(x["repeats"], x["policies"]))
                lines.append(f"| {name} | {variant} | {_ms(x['min'])} | {reps} |")
        planned = [(n, m["plan"]) for n, m in models.items() if m.get("plan")]
        if planned:
            lines += ["", "Products in bf16 per layer (fwd X·Wᵀ, dW δᵀ·X, dX δ·W; "
                      f"thresholds min_macs={planned[0][1]['min_macs']}, "
                      f"min_inner={planned[0][1]['min_inner']}):", ""]
            for n, plan in planned:
                layers = "; ".join(
                    f"L{k + 1} " + " ".join(f"{p}:{'bf16' if on else 'f32'}"
                                            for p, on in layer.items())
                    for k, layer in enumerate(plan["layers"]))
                lines.append(f"- {n}: {layers}")
        lines.append("")
    lines += ["## Sanity: losses over the check steps (first repeat)", "",
              "| model | variant | losses | check |", "|---|---|---|---|"]
    for row in data["sanity"]:
        for variant, values in row["losses"].items():
            check = next((f"{k}: rel {c['rel']:.1e} at step {c['step']} (tol {c['tol']:g}) "
                          f"{'ok' if c['ok'] else 'FAILED'}"
                          for k, c in row["checks"].items() if k.startswith(variant + " ")),
                         "")
            lines.append(f"| {row['model']} | {variant} | "
                         f"{', '.join(f'{v:.5f}' for v in values)} | {check} |")
    lines.append("")
    return "\n".join(lines)


def slim(data: dict) -> dict:
    """Keep each framework's worker description once (``worker_info``) instead of in every
    run, and of each run its timings and load at its start (the product plan is in
    ``models``, the first repeat's losses in ``sanity``): the JSON stays small."""
    info = data.setdefault("worker_info", {})
    for section in data["sections"].values():
        for run in section["runs"]:
            for key in ("sizes", "batch", "plan", "bf16_reason", "losses"):
                run.pop(key, None)
            if "info" in run:
                worker = run.pop("info")
                run["load_at_start"] = worker.get("load_at_start")
                info.setdefault(run["framework"], {k: v for k, v in worker.items()
                                                   if k != "load_at_start"})
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help="folder for mixed_precision.json/.md (default %(default)s)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    parser.add_argument("--threads", default=str(usable),
                        help="thread counts, comma-separated (default: the usable CPUs)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {MODELS}")
    parser.add_argument("--max-time", type=float, default=2.0,
                        help="seconds of alternating steps per model and process")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating runs of the processes; the best median counts")
    parser.add_argument("--check-steps", type=int, default=CHECK_STEPS,
                        help="steps of the loss sanity check")
    parser.add_argument("--frameworks", default="backprop,torch", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="small widths and batches, a few steps: checks the script runs")
    parser.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--wait-policy", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return worker_main(args)

    from workloads import MLPS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MLPS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected a subset of {list(MLPS)}")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.smoke:
        args.max_time, args.repeat, args.check_steps = min(args.max_time, 0.05), 1, 3
    if args.repeat < 1 or args.check_steps < 1 or not threads or min(threads) < 1:
        parser.error("--repeat, --check-steps and --threads must be at least 1")
    specs = [Spec.of(MLPS[m].smoke() if args.smoke else MLPS[m]) for m in models]
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    skipped = []
    if "torch" in frameworks and importlib.util.find_spec("torch") is None:
        skipped.append("torch not installed: the PyTorch variants skipped "
                       "(pip install torch to run them)")
        frameworks.remove("torch")
    for message in skipped:
        print(f"mixed_precision: {message}")

    from report import describe_machine

    command = "python benchmarks/mixed_precision.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    data = {"command": command.strip(), "machine": describe_machine(), "smoke": args.smoke,
            "max_time": args.max_time, "repeat": args.repeat, "check_steps": args.check_steps,
            "threads": threads, "skipped": skipped, "sections": {}, "versions": {}}
    all_runs = []
    for n in threads:
        start, load_before = time.time(), os.getloadavg()
        runs = []
        processes = worker_groups(frameworks, n, args.smoke)
        for r in range(args.repeat):
            for framework, policy, group in (processes if r % 2 == 0 else processes[::-1]):
                rows = run_worker(framework, specs, n, args.max_time, args.check_steps, policy,
                                  group)
                for row in rows:
                    row["repeat"] = r
                runs += rows
        models_ = summarize(runs)
        data["sections"][str(n)] = {"models": models_, "goals": goals(models_),
                                    "load_before": list(load_before),
                                    "load_after": list(os.getloadavg()),
                                    "seconds": time.time() - start, "runs": runs}
        all_runs += runs
        print(f"mixed_precision: {n} thread(s) done ({time.time() - start:.0f} s)")
    for run in all_runs:
        data["versions"][run["framework"]] = run["info"]["version"]
        if run["framework"] == "backprop":
            data["bf16"] = run["info"]["bf16"]
            data["lowp_env"] = run["info"]["lowp_env"]
    data["sanity"] = sanity([r for r in all_runs if r["repeat"] == 0])
    slim(data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "mixed_precision.json").write_text(json.dumps(data, indent=1))
    (args.out_dir / "mixed_precision.md").write_text(render(data))
    print(f"mixed_precision: wrote {args.out_dir / 'mixed_precision.md'}")
    if data.get("bf16") and not data["bf16"].get("fast"):
        print(f"mixed_precision: bf16 is not fast here ({data['bf16']['reason']}); the bf16 "
              "variants of backprop ran in float32")
    bad = [row["model"] for row in data["sanity"] if not row["ok"]]
    if bad:
        print(f"mixed_precision: loss sanity check FAILED for {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
