"""Where a training step spends its time: backprop's step piece by piece and call by call,
and XLA's compiled step (its optimized HLO, a summary of its fusions, the time of each of
its ops from ``jax.profiler``). Run by ``frameworks.py --sections profile``, one framework
per process; the helpers (:func:`parse_hlo`, :func:`summarize_hlo`, :func:`gemm_label`) are
plain functions of the HLO text.

backprop: the step of ``fit`` (``workloads.TrainingStep`` under ``mlp.blas_threads``) is
timed alternately with its GEMM floor (``workloads.MatmulFloor``: the step's matrix products
alone, NumPy/OpenBLAS, same shapes, the same BLAS cap); then a copy of its loop calls the
layers one by one with ``time.perf_counter`` around each piece (``zero_grad``, each layer's
forward, the loss forward and backward, each layer's backward, ``Adam.step``), while
``np.matmul`` and every kernel of ``backprop.kernels`` are wrapped by a timer, so each piece
splits into its GEMMs, its fused kernels and the rest (Python, NumPy calls, dispatch). Each
GEMM shape is also timed alone.

JAX: ``jax.jit(step).lower(...).compile().as_text()`` is written to ``xla_hlo_<model>.txt``;
the step is timed alternately with a ``jax.jit`` of its matrix products alone, and run
under ``jax.profiler.trace``, whose per-HLO-op events (on the executor threads) give each
op's time per step.
"""
from __future__ import annotations

import collections
import re
import statistics
import tempfile
import time
from pathlib import Path

from frameworks import Spec, interleaved, time_step

# ---------------------------------------------------------------------------------------
# HLO text
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?|\(.*?\)) ([a-z][\w-]*)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"[a-z]\d*\[([\d,]*)\]")
_SKIP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def parse_hlo(text: str) -> dict:
    """``{computation: {"entry": bool, "instructions": [{name, shape, opcode, operands,
    attrs}, ...]}}`` of an HLO module's text."""
    comps: dict = {}
    current = None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = comps[m.group(2)] = {"entry": bool(m.group(1)), "instructions": []}
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            name, shape, opcode, operands, attrs = m.groups()
            current["instructions"].append({
                "name": name, "shape": shape, "opcode": opcode,
                "operands": re.findall(r"%([\w.\-]+)", operands), "attrs": attrs})
    return comps


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"{key}=([^,\s]+)", attrs)
    return m.group(1) if m else None


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    return m.group(1) if m else ""


def gemm_label(m: int, n: int, k: int) -> str:
    """``128x256 k=784``: the output of a matrix product and its contracted dimension."""
    return f"{m}x{n} k={k}"


def _dot_label(inst: dict, shapes: dict) -> str:
    out = _dims(inst["shape"])
    lhs = _dims(shapes.get(inst["operands"][0], "")) if inst["operands"] else []
    contracting = _attr(inst["attrs"], "lhs_contracting_dims")
    k = None
    if lhs and contracting:
        k = 1
        for d in contracting.strip("{}").split(","):
            if d:
                k *= lhs[int(d)]
    if len(out) == 2 and k:
        return gemm_label(out[0], out[1], k)
    return f"{inst['shape']}"


def category(op_name: str, is_gemm: bool) -> str:
    """What part of the step an XLA op belongs to, from its ``op_name`` metadata."""
    if is_gemm:
        return "gemm"
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    if op_name:
        return "optimizer"
    return "other"


def summarize_hlo(text: str) -> dict:
    """The entry computation's ops (what runs: each fusion is one kernel), by kind, what each
    fusion holds, where the GEMMs are and what is fused with them."""
    comps = parse_hlo(text)
    entry = next((c for c in comps.values() if c["entry"]), {"instructions": []})
    shapes = {i["name"]: i["shape"] for c in comps.values() for i in c["instructions"]}
    ops, gemms, kinds = [], [], collections.Counter()
    for inst in entry["instructions"]:
        if inst["opcode"] in _SKIP:
            continue
        called = _attr(inst["attrs"], "calls")
        body = comps.get(called.lstrip("%"), {"instructions": []})["instructions"] \
            if called else []
        body_ops = sorted({i["opcode"] for i in body} - _SKIP)
        kind = _attr(inst["attrs"], "kind") if inst["opcode"] == "fusion" else inst["opcode"]
        if inst["opcode"] == "fusion" and '"__ynn_fusion"' in inst["attrs"]:
            kind = "kCustom(ynn)"
        dots = [i for i in body if i["opcode"] == "dot"] + \
            ([inst] if inst["opcode"] == "dot" else [])
        target = _attr(inst["attrs"], "custom_call_target")
        is_gemm = bool(dots) or (target is not None and "matmul" in target.lower())
        op = {"name": inst["name"], "kind": kind, "shape": inst["shape"], "ops": body_ops,
              "op_name": _op_name(inst["attrs"]),
              "category": category(_op_name(inst["attrs"]), is_gemm)}
        if is_gemm:
            fused = sorted(set(body_ops) - {"dot", "transpose", "copy"})
            op["gemm"] = [_dot_label(d, shapes) for d in dots] or [inst["shape"]]
            op["fused_with_gemm"] = fused
            gemms.append(op)
        kinds[kind] += 1
        ops.append(op)
    by_category: dict = {}
    for op in ops:
        c = by_category.setdefault(op["category"], {"ops": 0, "fusions": 0, "fused": set()})
        c["ops"] += 1
        c["fusions"] += op["kind"] not in ("dot", "copy", "custom-call")
        c["fused"].update(op["ops"])
    for c in by_category.values():
        c["fused"] = sorted(c["fused"])
    return {"ops": len(ops), "fusions": sum(v for k, v in kinds.items() if k.startswith("k")),
            "by_kind": dict(kinds), "gemms": [{k: g[k] for k in ("name", "kind", "gemm",
                                                                  "fused_with_gemm")}
                                              for g in gemms],
            "by_category": by_category, "op_table": ops}


# ---------------------------------------------------------------------------------------
# backprop: the step piece by piece
class _Timers:
    """Wraps ``np.matmul`` and the kernels of ``backprop.kernels``: each call's time is added
    to ``(phase, op, label)`` of the current step."""

    def __init__(self, spec: Spec):
        self.phase = "?"
        self.step: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, op, fn, label=None):
        perf = time.perf_counter

        def timed(*args, **kwargs):
            t0 = perf()
            out = fn(*args, **kwargs)
            key = (self.phase, op, label(args) if label else "")
            self.step[key] += perf() - t0
            self.calls[key] += 1
            return out

        return timed


def _matmul_label(args) -> str:
    a, b = args[0], args[1]
    return gemm_label(a.shape[0], b.shape[1], a.shape[1])


def backprop_profile(spec: Spec, max_time: float) -> dict:
    import numpy as np

    from backprop import kernels as K
    from frameworks import backprop_training

    case = backprop_training(spec, "fit")
    ts, floor = case["step"], case["make_floor"]()
    model, loss, opt, x, y = ts.model, ts.loss, ts.optimizer, ts.x, ts.y
    layers = list(model.layers)
    timers = _Timers(spec)
    perf = time.perf_counter

    def phased(phases):
        t0 = perf()
        timers.phase = "zero_grad"
        opt.zero_grad()
        t1 = perf()
        phases["zero_grad"] += t1 - t0
        h = x
        for k, layer in enumerate(layers):
            timers.phase = f"forward {k}"
            t0 = perf()
            h = layer.forward(h)
            phases[timers.phase] += perf() - t0
        timers.phase = "loss forward"
        t0 = perf()
        loss.forward(h, y)
        phases[timers.phase] += perf() - t0
        timers.phase = "loss backward"
        t0 = perf()
        g = loss.backward()
        phases[timers.phase] += perf() - t0
        for k in range(len(layers) - 1, -1, -1):
            timers.phase = f"backward {k}"
            t0 = perf()
            g = layers[k].backward(g, need_input_grad=k > 0)
            phases[timers.phase] += perf() - t0
        timers.phase = "optimizer"
        t0 = perf()
        opt.step()
        phases[timers.phase] += perf() - t0

    with case["context"]:
        plain = time_step(ts, lambda: None, max_time)
        floor()
        pair = interleaved(ts, floor, max_time)
        # the copy of the loop, with every GEMM and kernel call timed
        originals = {"matmul": np.matmul, **{op: getattr(K, op) for op in K.OPS}}
        steps_phase, steps_ops = [], []
        try:
            np.matmul = timers.wrap("matmul", originals["matmul"], _matmul_label)
            for op in K.OPS:
                setattr(K, op, timers.wrap(op, originals[op]))
            for _ in range(3):
                phased(collections.Counter())
            start = perf()
            while len(steps_phase) < 10 or perf() - start < max_time:
                phases: collections.Counter = collections.Counter()
                timers.step = collections.Counter()
                t0 = perf()
                phased(phases)
                phases["step (sum of the pieces)"] = perf() - t0
                steps_phase.append(phases)
                steps_ops.append(timers.step)
        finally:
            np.matmul = originals["matmul"]
            for op in K.OPS:
                setattr(K, op, originals[op])
        # each GEMM shape alone, as MatmulFloor runs it
        alone = {}
        for key in {k for s in steps_ops for k in s if k[1] == "matmul"}:
            label = key[2]
            if label in alone:
                continue
            m, rest = label.split("x", 1)
            n, k = rest.split(" k=")
            a = np.random.default_rng(0).standard_normal((int(m), int(k)), dtype=np.float32)
            b = np.random.default_rng(1).standard_normal((int(k), int(n)), dtype=np.float32)
            out = np.empty((int(m), int(n)), np.float32)
            alone[label] = time_step(lambda: np.matmul(a, b, out=out), lambda: None,
                                     max_time / 4)["median"]
    rounds = len(steps_phase)
    phase_keys = list(dict.fromkeys(k for s in steps_phase for k in s))
    op_keys = sorted({k for s in steps_ops for k in s})
    calls = {k: timers.calls[k] / (rounds + 3) for k in op_keys}
    return {
        "model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
        "step": plain, "interleaved": {"step": pair[0], "floor": pair[1]},
        "step_over_floor": pair[0] / pair[1], "rounds": rounds,
        "phases": {k: statistics.median(s.get(k, 0.0) for s in steps_phase) for k in phase_keys},
        "ops": [{"phase": k[0], "op": k[1], "label": k[2], "calls": calls[k],
                 "median": statistics.median(s.get(k, 0.0) for s in steps_ops)}
                for k in op_keys],
        "gemm_alone": alone,
    }


# ---------------------------------------------------------------------------------------
# JAX: the compiled step, and its ops' times
def jax_profile(spec: Spec, max_time: float, hlo_dir: Path | None) -> dict:
    import jax

    from frameworks import jax_step_function, jax_training

    case = jax_training(spec)
    step, sync, floor = case["step"], case["sync"], case["make_floor"]()
    fn, _ = jax_step_function(donate=True)
    import jax.numpy as jnp
    import optax

    from frameworks import batch_data, init_params

    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in init_params(spec.sizes)]
    x, y = (jnp.asarray(a) for a in batch_data(spec))
    text = fn.lower(params, optax.adam(1e-3).init(params), x, y).compile().as_text()
    hlo_file = None
    if hlo_dir is not None:
        hlo_file = Path(hlo_dir) / f"xla_hlo_{spec.name}.txt"
        hlo_file.write_text(text)
    summary = summarize_hlo(text)

    def synced():
        step()
        sync()

    plain = time_step(step, sync, max_time)
    floor()
    pair = interleaved(synced, floor, max_time)
    per_op, profiled_steps, note = {}, 0, None
    try:
        from jax.profiler import ProfileData

        names = {op["name"] for op in summary["op_table"]}
        with tempfile.TemporaryDirectory(dir=hlo_dir) as trace_dir:
            profiled_steps = max(20, min(200, int(max_time / max(plain["median"], 1e-6))))
            with jax.profiler.trace(trace_dir):
                for _ in range(profiled_steps):
                    synced()
            files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
            data = ProfileData.from_file(str(files[-1]))
            totals: collections.Counter = collections.Counter()
            for plane in data.planes:
                for line in plane.lines:
                    for event in line.events:
                        if event.name in names:
                            totals[event.name] += event.duration_ns
        per_op = {name: ns / 1e9 / profiled_steps for name, ns in totals.items()}
    except Exception as exc:  # no profiler in this JAX: the summary alone
        note = f"no per-op profile: {type(exc).__name__}: {exc}"
    for op in summary["op_table"]:
        op["time"] = per_op.get(op["name"])
    return {"model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
            "step": plain, "interleaved": {"step": pair[0], "floor": pair[1]},
            "step_over_floor": pair[0] / pair[1], "hlo_file": hlo_file and hlo_file.name,
            "hlo": summary, "profiled_steps": profiled_steps, "profile_note": note}


def profile_worker(framework: str, specs, max_time: float, threads: int,
                   hlo_dir: Path | None) -> list[dict]:
    if framework == "jax":
        return [jax_profile(spec, max_time, hlo_dir) for spec in specs]
    return [backprop_profile(spec, max_time) for spec in specs]
