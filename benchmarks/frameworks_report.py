"""Markdown of ``frameworks.py``'s sections (``render(section, data)``), from their JSON.

    python benchmarks/frameworks_report.py DIR    # rewrites DIR/*.md from DIR/*.json
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

GOAL_MODELS = ("tiny", "digits", "mnist", "wide")
TORCH_GOAL_MODELS = ("tiny", "digits")


def _ms(seconds) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _us(seconds) -> str:
    if seconds is None:
        return "–"
    us = seconds * 1e6
    return f"{us:.3g}" if us < 1000 else f"{us:,.0f}"


def _ratio(a, b) -> str:
    return "–" if a is None or b is None or not b else f"{a / b:.2f}×"


def _rate(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


def header(title: str, data: dict) -> list[str]:
    machine = data.get("machine", {})
    before, after = data.get("load_before") or [0, 0, 0], data.get("load_after") or [0, 0, 0]
    lines = [f"# {title}", "", "Command:", "", f"    {data.get('command', '')}", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('usable_cpus', '?')} usable "
             f"CPUs, {machine.get('memory_gib', '?')} GiB; BLAS {machine.get('blas', '?')}; "
             f"Python {machine.get('python', '?')}, NumPy {machine.get('numpy', '?')}, "
             f"Numba {machine.get('numba', '?')}.",
             f"Threads: {data.get('threads')} for every framework; --max-time "
             f"{data.get('max_time')} s, --repeat {data.get('repeat')} (alternating processes, "
             f"best median)"
             f"{'; SMOKE RUN (small shapes): not a measurement' if data.get('smoke') else ''}.",
             f"Load average (1, 5, 15 min) before: {before[0]:.2f} {before[1]:.2f} "
             f"{before[2]:.2f}; after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} (the "
             "'after' figure includes this benchmark's own processes).", ""]
    versions = {}
    for row in data.get("results", []):
        info = row.get("info", {})
        if info.get("version"):
            versions[row["framework"].split("-", 1)[0]] = info["version"]
        if info.get("optax"):
            versions["optax"] = info["optax"]
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
                  ""]
    if before[0] > 1.0:
        lines += [f"**The machine was loaded while this ran (1-minute load {before[0]:.2f} "
                  "before the run, other work sharing its cores): timings are noisy; compare "
                  "ratios within this run only, and rerun on a quiet machine for final "
                  "numbers.**", ""]
    for message in (data.get("skipped") or {}).values():
        lines += [f"Skipped: {message}", ""]
    return lines


# ---------------------------------------------------------------------------------------
def render_train(data: dict) -> str:
    rows = {(r["framework"], r["model"]): r for r in data["results"]}
    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    med = {k: r["median"] for k, r in rows.items()}
    lines = header("Training step: backprop vs jax.jit and PyTorch eager (CPU)", data)
    lines += ["One step: zero_grad, forward, softmax cross-entropy (mean), backward, "
              "Adam(lr=1e-3); float32, relu hidden layers, one fixed batch, the same initial "
              "weights and data in every framework. `backprop-loop`: the loop a user writes "
              "(`opt.zero_grad(); out = model.forward(x); L = loss.forward(out, y); "
              "model.backward(loss.backward()); opt.step()`, library defaults); "
              "`backprop-fit`: the step as `fit` runs it (`workloads.TrainingStep` under "
              "`fit`'s BLAS cap); `torch`: eager, the same loop, the faster of its default "
              "OpenMP wait policy and `active`; `jax`: the whole step as one `jax.jit` "
              "(optax.adam, params and optimizer state donated). Milliseconds per step, "
              "best median of the repeats. Ratios: >1× in the `/jax` columns means backprop "
              "is slower than XLA; >1× in the `torch/` columns means backprop is faster.", "",
              "| model | sizes | batch | backprop-loop | backprop-fit | torch | jax | loop/jax "
              "| fit/jax | torch/loop | torch/fit |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        any_row = next(r for (f, mm), r in rows.items() if mm == m)
        loop, fit = med.get(("backprop-loop", m)), med.get(("backprop-fit", m))
        torch, jax = med.get(("torch", m)), med.get(("jax", m))
        lines.append(f"| {m} | {'-'.join(map(str, any_row['sizes']))} | {any_row['batch']} | "
                     f"{_ms(loop)} | {_ms(fit)} | {_ms(torch)} | {_ms(jax)} | "
                     f"{_ratio(loop, jax)} | {_ratio(fit, jax)} | {_ratio(torch, loop)} | "
                     f"{_ratio(torch, fit)} |")
    mins = {k: r.get("min_over_repeats", r["min"]) for k, r in rows.items()}
    lines += ["", "The same with each variant's fastest single step over all its rounds and "
              "repeats (ms): less sensitive than the median to a time slice lost to other "
              "work on a shared machine, but no measure of the steady speed.", "",
              "| model | backprop-loop | backprop-fit | torch | jax | loop/jax | fit/jax | "
              "torch/loop | torch/fit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        loop, fit = mins.get(("backprop-loop", m)), mins.get(("backprop-fit", m))
        torch, jax = mins.get(("torch", m)), mins.get(("jax", m))
        lines.append(f"| {m} | {_ms(loop)} | {_ms(fit)} | {_ms(torch)} | {_ms(jax)} | "
                     f"{_ratio(loop, jax)} | {_ratio(fit, jax)} | {_ratio(torch, loop)} | "
                     f"{_ratio(torch, fit)} |")
    torch_rows = [r for (f, _), r in rows.items() if f == "torch"]
    if torch_rows:
        lines += ["", "PyTorch's faster wait policy per model: " + ", ".join(
            f"{r['model']} {r['omp_wait_policy']}" for r in torch_rows) + "."]
    lines += ["", "Every repeat's median (ms), to judge the noise:", "",
              "| model | framework | repeats |", "|---|---|---|"]
    for (f, m), r in rows.items():
        lines.append(f"| {m} | {f} | {', '.join(_ms(x) for x in r.get('repeats', []))} |")
    floors = [r for r in data["results"] if "interleaved" in r]
    if floors:
        numpy_floor = {r["model"]: r["interleaved"]["floor"] for r in floors
                       if r["framework"] == "backprop-fit"}
        lines += ["", "## Step against its GEMM floor", "",
                  "Each framework timed its step and the step's matrix products alone (forward "
                  "X·Wᵀ, backward δᵀ·X per layer, δ·W for all but the first: `workloads."
                  "MatmulFloor`'s products) alternately, in its own process: *own floor* is "
                  "its own GEMM library (NumPy/OpenBLAS for backprop, `torch.matmul`, a "
                  "`jax.jit` of the products alone), *NumPy floor* is backprop-fit's "
                  "OpenBLAS floor of the same run.", "",
                  "| model | framework | step (ms) | own floor (ms) | floor library | "
                  "step/own floor | step/NumPy floor |", "|---|---|---:|---:|---|---:|---:|"]
        for r in sorted(floors, key=lambda r: (r["model"], r["framework"])):
            pair = r["interleaved"]
            lines.append(f"| {r['model']} | {r['framework']} | {_ms(pair['step'])} | "
                         f"{_ms(pair['floor'])} | {r.get('floor_library', '')} | "
                         f"{pair['step'] / pair['floor']:.2f}× | "
                         f"{_ratio(pair['step'], numpy_floor.get(r['model']))} |")
    lines += ["", "## Goals (issue 20)", ""] + train_goals(med, models)
    return "\n".join(lines) + "\n"


def train_goals(med: dict, models) -> list[str]:
    out = []

    def verdict(ok):
        return "met" if ok else "NOT met"

    for variant in ("backprop-loop", "backprop-fit"):
        for m in GOAL_MODELS:
            a, b = med.get((variant, m)), med.get(("jax", m))
            if a and b:
                out.append(f"- {variant} at least as fast as jax.jit on {m}: "
                           f"{verdict(a <= b)} ({variant}/jax {a / b:.2f}×)")
    for variant in ("backprop-loop", "backprop-fit"):
        for m in TORCH_GOAL_MODELS:
            a, b = med.get((variant, m)), med.get(("torch", m))
            if a and b:
                out.append(f"- {variant} faster than PyTorch eager on {m}: "
                           f"{verdict(a < b)} (torch/{variant} {b / a:.2f}×)")
    for m in models:
        if m.startswith("b") and m[1:].isdigit():
            a, b = med.get(("backprop-loop", m)), med.get(("torch", m))
            if a and b:
                out.append(f"- backprop-loop at least as fast as PyTorch at batch {m[1:]} "
                           f"(784-256-10): {verdict(a <= b)} (torch/backprop-loop {b / a:.2f}×)")
    return out or ["- (no pair of frameworks to compare in this run)"]


# ---------------------------------------------------------------------------------------
INFERENCE_COLUMNS = (("backprop", "predict", "bp predict(X)"),
                     ("backprop", "call", "bp model(x)"),
                     ("backprop", "forward-eval", "bp forward, eval()"),
                     ("backprop", "forward-inference_mode", "bp forward, inference_mode"),
                     ("torch", "inference_mode", "torch inference_mode"),
                     ("onnxruntime", "session.run", "ONNX Runtime"),
                     ("jax", "jit", "jax.jit"))


def render_inference(data: dict) -> str:
    rows = {(r["framework"], r["variant"], r["model"], r["batch"]): r for r in data["results"]}
    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    batches = data.get("batches") or sorted({r["batch"] for r in data["results"]})
    cols = [c for c in INFERENCE_COLUMNS if any(k[:2] == c[:2] for k in rows)]
    lines = header("Inference: backprop vs ONNX Runtime, PyTorch and jax.jit (CPU)", data)
    lines += ["The digits (64-128-128-10) and mnist (784-256-256-10) MLPs, float32, the same "
              "weights everywhere (outputs checked against a float64 NumPy forward). backprop: "
              "`model.predict(X)` (its default: one pass when the batch fits 32 MiB; "
              "compiled plans up to 64 rows), `model(x)` (the `__call__` "
              "path: converts, checks, copies) and the raw `model.forward(x)` after "
              "`model.eval()` and under `bp.inference_mode()`; PyTorch: `model(x)` inside "
              "`with torch.inference_mode():` (entered per call), on a tensor sharing the "
              "NumPy batch; ONNX Runtime: `session.run` of a Gemm(transB=1)+Relu graph built "
              "with onnx.helper (ORT_ENABLE_ALL, intra-op threads as above, sequential); "
              "JAX: a jitted forward on a device array, `block_until_ready`. Best median of "
              "the repeats.", ""]
    for title, batch_set, fmt in (
            ("Latency (µs per call)", [b for b in batches if b < 1000], "us"),
            ("Throughput (rows/s)", [b for b in batches if b >= 256 and b not in (1, 32)]
             or [], "rate")):
        if not batch_set:
            continue
        lines += [f"## {title}", "", "| model | batch | " + " | ".join(c[2] for c in cols)
                  + " |", "|---|---:|" + "---:|" * len(cols)]
        for m in models:
            for b in batch_set:
                cells = []
                for fw, variant, _ in cols:
                    r = rows.get((fw, variant, m, b))
                    cells.append("–" if r is None else
                                 (_us(r["median"]) if fmt == "us" else _rate(r["rows_per_s"])))
                lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Ratios (other framework's time / backprop's; >1× means backprop is faster)",
              "", "| model | batch | ORT / bp predict | ORT / bp model(x) | ORT / bp forward "
              "| torch / bp predict | torch / bp model(x) | torch / bp forward | jax / bp "
              "forward |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        for b in batches:
            def t(fw, v):
                r = rows.get((fw, v, m, b))
                return r and r["median"]
            ort, tor, jx = t("onnxruntime", "session.run"), t("torch", "inference_mode"), \
                t("jax", "jit")
            pr, ca, fo = t("backprop", "predict"), t("backprop", "call"), \
                t("backprop", "forward-eval")
            lines.append(f"| {m} | {b} | {_ratio(ort, pr)} | {_ratio(ort, ca)} | "
                         f"{_ratio(ort, fo)} | {_ratio(tor, pr)} | {_ratio(tor, ca)} | "
                         f"{_ratio(tor, fo)} | {_ratio(jx, fo)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
def _mib(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _inc(x, y) -> str:
    return "–" if x is None or y is None else f"{y - x:+.1f}"


MEMORY_STAGES = ("after_import", "after_setup", "after_first_step", "after_steps")


def render_memory(data: dict) -> str:
    lines = header("Memory: peak resident memory of a training step", data)
    by_model: dict = {}
    for r in data["results"]:
        by_model.setdefault(r["model"], []).append(r)
    steps = data["results"][0]["steps"] if data["results"] else "?"
    lines += ["Each framework in a fresh process, the training step of the frameworks "
              f"section (float32, Adam): the process's peak resident memory (MiB) after its "
              f"imports, after setup (model, optimizer, data), after the first step and after "
              f"{steps} steps. The first step also loads or compiles code (Numba's cached "
              "kernels, XLA's step), so it is shown apart: *steady* is the growth from the "
              "first step to the last. Peak = *VmHWM* from /proc (the process's own memory); "
              "*ru_maxrss* (`getrusage`) on Linux also counts the parent's RSS at the fork "
              "(the driver, which imports backprop): read its increments, not its levels. "
              "The tiny MLP's figures are the fixed costs (framework, kernels, compiler), "
              "which the wide MLP's figures also hold.", ""]
    for model, rows in by_model.items():
        r0 = rows[0]
        sizes = r0.get("sizes", [])
        params = sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
        lines += [f"## {model} ({'-'.join(map(str, sizes))}, batch {r0.get('batch')}: "
                  f"{params:,} parameters, {params * 4 / 2**20:.1f} MiB; gradients and "
                  f"Adam's two moments {3 * params * 4 / 2**20:.1f} MiB more)", "",
                  "| framework | peak after import | after setup | after step 1 | after step "
                  f"{steps} | step increment (setup → last) | of which step 1 | steady "
                  "| ru_maxrss setup → last (increment) | RSS at the end |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            a, s, f, e = (r.get(k, {}) for k in MEMORY_STAGES)
            hwm = [x.get("vmhwm_mib") for x in (a, s, f, e)]
            lines.append(
                f"| {r['framework']} | " + " | ".join(_mib(v) for v in hwm) +
                f" | {_inc(hwm[1], hwm[3])} | {_inc(hwm[1], hwm[2])} | {_inc(hwm[2], hwm[3])}"
                f" | {_mib(s.get('ru_maxrss_mib'))} → {_mib(e.get('ru_maxrss_mib'))} "
                f"({_inc(s.get('ru_maxrss_mib'), e.get('ru_maxrss_mib'))}) | "
                f"{_mib(e.get('vmrss_mib'))} |")
        lines.append("")
    if "wide" in by_model and "tiny" in by_model:
        tiny = {r["framework"]: r for r in by_model["tiny"]}
        lines += ["## wide minus tiny: the memory that the wide model's size costs", "",
                  "| framework | setup | peak after the steps | of it in the steps |",
                  "|---|---:|---:|---:|"]
        for r in by_model["wide"]:
            t = tiny.get(r["framework"])
            if t is None:
                continue
            w_s, w_e = (r[k].get("vmhwm_mib") for k in ("after_setup", "after_steps"))
            t_s, t_e = (t[k].get("vmhwm_mib") for k in ("after_setup", "after_steps"))
            if None in (w_s, w_e, t_s, t_e):
                continue
            lines.append(f"| {r['framework']} | {w_s - t_s:+.1f} | {w_e - t_e:+.1f} | "
                         f"{(w_e - w_s) - (t_e - t_s):+.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
BP_CATEGORIES = ("gemm", "forward", "backward", "optimizer", "zero_grad + Python/other")


def _backprop_categories(r: dict) -> dict:
    """Seconds per step of backprop's pieces, in XLA's categories."""
    out = collections.Counter()
    instrumented = collections.Counter()
    for op in r["ops"]:
        phase = op["phase"]
        instrumented[phase] += op["median"]
        if op["op"] == "matmul":
            out["gemm"] += op["median"]
        elif phase.startswith(("forward", "loss forward")):
            out["forward"] += op["median"]
        elif phase.startswith(("backward", "loss backward")):
            out["backward"] += op["median"]
        elif phase == "optimizer":
            out["optimizer"] += op["median"]
        else:
            out["zero_grad + Python/other"] += op["median"]
    for phase, t in r["phases"].items():
        if phase.startswith("step"):
            continue
        out["zero_grad + Python/other"] += max(t - instrumented.get(phase, 0.0), 0.0)
    return out


def _xla_categories(r: dict) -> dict:
    out = collections.Counter()
    for op in r["hlo"]["op_table"]:
        if op.get("time") is not None:
            cat = op["category"] if op["category"] in BP_CATEGORIES else \
                "zero_grad + Python/other"
            out[cat] += op["time"]
    return out


def render_profile(data: dict) -> str:
    by_model: dict = {}
    for r in data["results"]:
        by_model.setdefault(r["model"], {})[r["framework"]] = r
    lines = header("Profile: where the mnist and wide training steps spend their time", data)
    lines += ["backprop: the step of `fit` (TrainingStep under `fit`'s BLAS cap), timed "
              "alternately with its GEMM floor (the same products alone, NumPy/OpenBLAS); "
              "then a copy of its loop with `time.perf_counter` around each piece, and every "
              "`np.matmul` and fused-kernel call timed (medians over the steps; the pieces' "
              "medians need not add up to the step's). XLA: the step compiled by `jax.jit` "
              "(HLO in `xla_hlo_<model>.txt`), timed alternately with a `jax.jit` of its "
              "products alone; each op's time from `jax.profiler` events (per step, summed "
              "over the executor threads).", ""]
    for model, fws in by_model.items():
        bp, jx = fws.get("backprop"), fws.get("jax")
        any_r = bp or jx
        lines += [f"## {model} ({'-'.join(map(str, any_r['sizes']))}, batch "
                  f"{any_r['batch']})", "",
                  "| | step (ms) | its GEMM floor (ms) | step/floor |", "|---|---:|---:|---:|"]
        for name, r in (("backprop (fit's step; OpenBLAS floor)", bp),
                        ("jax.jit (XLA floor)", jx)):
            if r:
                p = r["interleaved"]
                lines.append(f"| {name} | {_ms(p['step'])} | {_ms(p['floor'])} | "
                             f"{p['step'] / p['floor']:.2f}× |")
        if bp and jx:
            lines.append(f"| XLA step / backprop's OpenBLAS floor | "
                         f"{_ms(jx['interleaved']['step'])} | {_ms(bp['interleaved']['floor'])} | "
                         f"{jx['interleaved']['step'] / bp['interleaved']['floor']:.2f}× |")
        lines.append("")
        if bp and jx and jx["hlo"]["op_table"] and any(
                o.get("time") is not None for o in jx["hlo"]["op_table"]):
            bc, xc = _backprop_categories(bp), _xla_categories(jx)
            lines += ["### Per category (µs per step)", "",
                      "*forward* / *backward*: everything but the GEMMs (bias, activation, "
                      "loss, bias gradients); XLA's categories come from each op's "
                      "`op_name` (jvp / transpose(jvp) / the rest: the optimizer).", "",
                      "| category | backprop | XLA |", "|---|---:|---:|"]
            for c in BP_CATEGORIES:
                lines.append(f"| {c} | {_us(bc.get(c, 0.0))} | {_us(xc.get(c, 0.0))} |")
            lines.append(f"| sum | {_us(sum(bc.values()))} | {_us(sum(xc.values()))} |")
            lines.append(f"| step, timed alone | {_us(bp['step']['median'])} | "
                         f"{_us(jx['step']['median'])} |")
            lines += ["", "backprop's *Python/other* is the time of each piece outside its "
                      "timed calls, with the timers' own cost (the instrumented copy took "
                      f"{_us(bp['phases'].get('step (sum of the pieces)'))} µs against "
                      f"{_us(bp['step']['median'])} µs for the step alone). XLA's ops add up "
                      f"to {_us(sum(xc.values()))} µs of its {_us(jx['step']['median'])} µs "
                      "step: the rest is dispatch (Python, argument handling, the thunk "
                      "executor), less any overlap of ops run on two threads at once."]
            lines.append("")
        if bp:
            lines += ["### backprop, piece by piece (µs per step)", "",
                      "| piece | time | GEMMs | fused kernels | rest (Python, NumPy, dispatch) |",
                      "|---|---:|---:|---:|---:|"]
            per_phase = collections.defaultdict(lambda: [0.0, 0.0])
            for op in bp["ops"]:
                per_phase[op["phase"]][0 if op["op"] == "matmul" else 1] += op["median"]
            for phase, t in bp["phases"].items():
                g, k = per_phase.get(phase, (0.0, 0.0))
                if phase.startswith("step"):
                    lines.append(f"| **{phase}** | **{_us(t)}** | | | |")
                else:
                    lines.append(f"| {phase} | {_us(t)} | {_us(g)} | {_us(k)} | "
                                 f"{_us(max(t - g - k, 0.0))} |")
            lines += ["", "Calls (µs per step, median):", "",
                      "| piece | op | shape | calls/step | time |", "|---|---|---|---:|---:|"]
            for op in bp["ops"]:
                lines.append(f"| {op['phase']} | {op['op']} | {op['label']} | "
                             f"{op['calls']:.0f} | {_us(op['median'])} |")
            lines.append("")
            xla_gemm = collections.Counter()
            if jx:
                for op in jx["hlo"]["op_table"]:
                    if op["category"] == "gemm" and op.get("time") is not None:
                        for label in op.get("gemm", []):
                            xla_gemm[label] += op["time"] / max(len(op.get("gemm", [])), 1)
            in_step = collections.Counter()
            counts = collections.Counter()
            for op in bp["ops"]:
                if op["op"] == "matmul":
                    in_step[op["label"]] += op["median"]
                    counts[op["label"]] += op["calls"]
            lines += ["### GEMMs: in the step, alone, and in XLA's step (µs per step)", "",
                      "Shape: output m×n and contracted k; a shape that occurs twice (the "
                      "square hidden layer's X·Wᵀ and δ·W) is added up. *NumPy alone*: each "
                      "product timed on its own (median), times its calls per step.", "",
                      "| GEMM | calls | backprop, in the step | NumPy alone × calls | "
                      "XLA, in its step |", "|---|---:|---:|---:|---:|"]
            for label in sorted(in_step, key=lambda s: -in_step[s]):
                alone = bp["gemm_alone"].get(label)
                lines.append(f"| {label} | {counts[label]:.0f} | {_us(in_step[label])} | "
                             f"{_us(alone and alone * counts[label])} | "
                             f"{_us(xla_gemm.get(label))} |")
            lines += [f"| total | | {_us(sum(in_step.values()))} | "
                      f"{_us(sum(bp['gemm_alone'].get(k, 0) * counts[k] for k in in_step))} | "
                      f"{_us(sum(xla_gemm.values()) if xla_gemm else None)} |", ""]
        if jx:
            lines += hlo_summary_lines(jx)
    return "\n".join(lines) + "\n"


def hlo_summary_lines(jx: dict) -> list[str]:
    h = jx["hlo"]
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(h["by_kind"].items(), key=lambda kv: -kv[1]))
    lines = [f"### XLA's compiled step (`{jx.get('hlo_file')}`)", "",
             f"{h['ops']} ops run per step (the entry computation, parameters, constants, "
             f"tuples and bitcasts left out), {h['fusions']} of them fusions: {kinds}.", "",
             "GEMMs and what is fused with them:", "",
             "| op | kind | GEMM(s) | fused with the GEMM | time (µs/step) |",
             "|---|---|---|---|---:|"]
    times = {o["name"]: o.get("time") for o in h["op_table"]}
    for g in h["gemms"]:
        lines.append(f"| {g['name']} | {g['kind']} | {', '.join(g['gemm'])} | "
                     f"{', '.join(g['fused_with_gemm']) or 'nothing (the dot alone)'} | "
                     f"{_us(times.get(g['name']))} |")
    lines += ["", "The other ops, per category (what their fusions hold):", "",
              "| category | ops | fusions | HLO ops inside |", "|---|---:|---:|---|"]
    for cat, c in sorted(h["by_category"].items()):
        if cat == "gemm":
            continue
        lines.append(f"| {cat} | {c['ops']} | {c['fusions']} | {', '.join(c['fused'])} |")
    timed = [o for o in h["op_table"] if o.get("time") is not None]
    if timed:
        lines += ["", f"The ten slowest ops (profiled over {jx['profiled_steps']} steps):", "",
                  "| op | kind | category | shape | ops inside | µs/step |",
                  "|---|---|---|---|---|---:|"]
        for o in sorted(timed, key=lambda o: -o["time"])[:10]:
            lines.append(f"| {o['name']} | {o['kind']} | {o['category']} | {o['shape']} | "
                         f"{', '.join(o['ops'])} | {_us(o['time'])} |")
    elif jx.get("profile_note"):
        lines += ["", jx["profile_note"]]
    lines.append("")
    return lines


def render(section: str, data: dict) -> str:
    return {"train": render_train, "inference": render_inference, "memory": render_memory,
            "profile": render_profile}[section](data)


FILES = {"train": "frameworks", "inference": "inference", "memory": "memory",
         "profile": "profile"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    for section, stem in FILES.items():
        path = folder / f"{stem}.json"
        if path.exists():
            (folder / f"{stem}.md").write_text(render(section, json.loads(path.read_text())))
            print(f"frameworks_report: wrote {folder / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
