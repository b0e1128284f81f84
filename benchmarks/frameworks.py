"""backprop against JAX (``jax.jit``), PyTorch (eager) and ONNX Runtime on the CPU: training
steps, inference, memory, and a per-op profile of the step, written as JSON and Markdown.

    python benchmarks/frameworks.py --out-dir benchmarks/results/<machine>-<date>
        [--sections train,inference,memory,profile] [--threads N]
        [--max-time SECONDS] [--repeat R] [--smoke]
        [--frameworks backprop-loop,backprop-fit,torch,jax,onnxruntime]
        [--models tiny,digits,mnist,wide,b1024,b4096,b8192]

Sections (each writes ``<section>.json`` and ``.md`` into ``--out-dir``; the train section
writes ``frameworks.json``/``frameworks.md``):

- ``train``: one training step of each MLP of ``workloads.MLPS`` and of 784-256-10 at 1024,
  4096 and 8192 rows (``workloads.LARGE_BATCH_MLPS``): ``zero_grad``, forward, softmax
  cross-entropy (mean), backward, Adam(lr=1e-3); float32, relu hidden layers, one fixed
  batch, the same initial weights (:func:`init_params`) and data in every framework.
  Variants: ``backprop-loop`` (the loop a user writes, with the library's defaults:
  ``opt.zero_grad(); out = model.forward(x); L = loss.forward(out, y);
  model.backward(loss.backward()); opt.step()``), ``backprop-fit`` (the step as ``fit`` runs
  it: ``workloads.TrainingStep`` under ``mlp.blas_threads``), ``torch`` (eager, the same
  hand-written loop) and ``jax`` (the whole step as one ``jax.jit``: params pytree,
  ``optax.adam``, ``value_and_grad``, params and optimizer state donated). For mnist and wide
  each framework also times its step and its GEMMs alone (the same products as
  ``workloads.MatmulFloor``, in its own GEMM library) alternately: step/floor.
- ``inference``: latency at batch 1 and 32 and throughput at 4096 rows of the digits and
  mnist MLPs: backprop ``model.predict(X)``, ``model(x)`` and ``model.forward(x)`` in eval
  mode; PyTorch ``model(x)`` under ``torch.inference_mode()``; ONNX Runtime on a Gemm+Relu
  graph of the same weights (:func:`onnx_model`); a ``jax.jit`` forward.
- ``memory``: peak resident memory of the wide MLP's training step, each framework in a
  fresh process: after imports, after setup (model, optimizer, data), after the first step
  and after 20 steps; the same for the tiny MLP, whose figures are the fixed costs (the
  framework, its kernels or compiler) that the wide model's figures also hold.
- ``profile``: where backprop's mnist and wide steps spend their time (each piece timed,
  every GEMM and kernel call timed) against the GEMM floor, and XLA's compiled step: its
  optimized HLO (``xla_hlo_<model>.txt``), a summary of its fusions and the time of each of
  its ops from ``jax.profiler`` (``step_profile.py``).

Every framework runs in its own subprocess with the same thread count (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS``, ``torch.set_num_threads``,
ONNX Runtime's ``intra_op_num_threads``, and for JAX a CPU affinity of that many cores when
fewer than the usable ones), the subprocesses alternate ``R`` times in reversed order every
other repeat, and each variant's result is its best median (see ``torch_compare.py``: on a
shared machine whose speed drifts, a slow spell then hits one repeat, not one framework).
PyTorch runs under its default OpenMP wait policy and under ``active`` and keeps the faster;
backprop's processes run under the OpenMP settings that backprop makes at import. A framework that is
not installed is skipped with a message. The 1-minute load average is recorded before and
after each section and at the start of each worker. This file is a script, not collected by
pytest; ``test_bench_tools.py`` runs it in ``--smoke`` mode.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FRAMEWORKS = ("backprop-loop", "backprop-fit", "torch", "jax")
INFERENCE_FRAMEWORKS = ("backprop", "torch", "onnxruntime", "jax")
MEMORY_FRAMEWORKS = ("backprop-loop", "backprop-fit", "torch", "jax")
PROFILE_FRAMEWORKS = ("backprop", "jax")
SECTIONS = ("train", "inference", "memory", "profile")
REQUIRES = {"torch": ("torch",), "jax": ("jax", "optax"), "onnxruntime": ("onnxruntime", "onnx")}
WAIT_POLICIES = {"torch": ("default", "active")}  # every other framework: ("default",)
# the OpenMP settings importing backprop makes (backprop.kernels.OMP_VARIABLES, copied so that
# a worker can clear them before it imports anything; tests/test_bench_tools.py compares them)
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
FLOOR_MODELS = ("mnist", "wide")
INFERENCE_MODELS = ("digits", "mnist")
LATENCY_BATCHES = (1, 32)
THROUGHPUT_BATCH = 4096
MEMORY_MODELS, MEMORY_STEPS = ("wide", "tiny"), 20  # tiny: the fixed costs alone
PROFILE_MODELS = ("mnist", "wide")
SMOKE_MODELS = ("tiny", "mnist", "wide", "b1024")  # --smoke without --models
LR = 1e-3


@dataclass(frozen=True)
class Spec:
    """An MLP workload as the workers see it (they do not import ``workloads``, which imports
    backprop: a PyTorch or JAX process holds that framework alone)."""

    name: str
    sizes: tuple
    batch: int

    @property
    def layers(self):
        return list(zip(self.sizes[:-1], self.sizes[1:]))

    def as_json(self) -> dict:
        return {"name": self.name, "sizes": list(self.sizes), "batch": self.batch}

    @classmethod
    def of(cls, d) -> "Spec":
        if isinstance(d, dict):
            return cls(d["name"], tuple(d["sizes"]), int(d["batch"]))
        return cls(d.name, tuple(d.sizes), int(d.batch))  # a workloads.MLP


# ---------------------------------------------------------------------------------------
# The same weights and data everywhere
def init_params(sizes, seed: int = 0):
    """``[(W (out, in), b (out,)), ...]`` float32: He-normal weights, zero biases."""
    import numpy as np

    rng = np.random.default_rng(seed + 1000)
    return [((rng.standard_normal((o, i), dtype=np.float32) * np.float32(np.sqrt(2.0 / i))),
             np.zeros(o, np.float32)) for i, o in zip(sizes[:-1], sizes[1:])]


def batch_data(spec: Spec, seed: int = 0):
    """``(X, labels)`` as NumPy arrays: the batch of ``workloads.mlp_data`` (same seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((spec.batch, spec.sizes[0]), dtype=np.float32)
    y = rng.integers(0, spec.sizes[-1], size=spec.batch).astype(np.int64)
    return x, y


def gemm_operands(spec: Spec, seed: int = 0):
    """Per layer ``(x (n, in), w (out, in), delta (n, out))``: the operands of the step's
    matrix products (the shapes of ``workloads.MatmulFloor``'s)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i, o in spec.layers:
        x, w = (rng.standard_normal(s, dtype=np.float32) * np.float32(0.1)
                for s in ((spec.batch, i), (o, i)))
        delta = rng.standard_normal((spec.batch, o), dtype=np.float32) * np.float32(0.1)
        out.append((x, w, delta))
    return out


def time_step(step, sync, max_time: float, min_rounds: int = 5, warmup: int = 3) -> dict:
    from torch_compare import time_step as timer

    return timer(step, sync, max_time, min_rounds=min_rounds, warmup=warmup)


def interleaved(first, second, seconds: float, min_pairs: int = 5) -> tuple[float, float]:
    """Median seconds of two callables run alternately for about ``seconds``."""
    times: tuple[list, list] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < min_pairs or time.perf_counter() - start < seconds:
        for fn, out in zip((first, second), times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def _nothing():
    return None


# ---------------------------------------------------------------------------------------
# backprop
def backprop_model(spec: Spec, params=None, device: str = "cpu"):
    """A Sequential of Dense layers (relu hidden, linear output) holding ``params``."""
    import numpy as np
    from backprop.layers import Dense
    from backprop.model import Sequential

    last = len(spec.layers) - 1
    model = Sequential([Dense(i, o, activation="relu" if k < last else None, rng=k,
                              dtype=np.float32) for k, (i, o) in enumerate(spec.layers)])
    set_backprop_params(model, params or init_params(spec.sizes))
    return model.to(device)


def set_backprop_params(model, params) -> None:
    for layer, (w, b) in zip(model.layers, params):
        layer.W.data[...] = w
        layer.b.data[...] = b


def backprop_training(spec: Spec, variant: str) -> dict:
    import numpy as np

    from workloads import MLP, MatmulFloor, TrainingStep

    mlp = MLP(spec.name, tuple(spec.sizes), spec.batch)
    if variant == "fit":  # the step as fit runs it, under fit's BLAS cap
        step = TrainingStep(mlp, "cpu", lr=LR)
        set_backprop_params(step.model, init_params(spec.sizes))
        np.testing.assert_array_equal(step.x, batch_data(spec)[0])
        context = mlp.blas_threads("cpu")
    else:  # the hand-written loop, the library's defaults
        from backprop.losses import SoftmaxCrossEntropyLoss
        from backprop.optim import Adam

        model = backprop_model(spec)
        loss = SoftmaxCrossEntropyLoss()
        opt = Adam(model.parameters(), lr=LR)
        x, y = batch_data(spec)

        def step():
            opt.zero_grad()
            out = model.forward(x)
            value = loss.forward(out, y)
            model.backward(loss.backward())
            opt.step()
            return value

        context = contextlib.nullcontext()
    from backprop import gemm

    return {"step": step, "sync": _nothing, "make_floor": lambda: MatmulFloor(mlp, np),
            "context": context,
            "floor_library": "mkl" if gemm.backend() == "mkl" else "numpy/openblas"}


def _backprop_info() -> dict:
    import numba

    import backprop
    from backprop import kernels as K

    from backprop import gemm

    return {"version": backprop.__version__, "kernels": K.backend_name("cpu"),
            "numba_threads": numba.get_num_threads(), "gemm": gemm.backend()}


# ---------------------------------------------------------------------------------------
# PyTorch
def torch_model(params):
    import torch
    from torch import nn

    layers = []
    for k, (w, b) in enumerate(params):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if k < len(params) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def torch_training(spec: Spec) -> dict:
    import torch
    from torch import nn

    model = torch_model(init_params(spec.sizes))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    x, y = (torch.from_numpy(a) for a in batch_data(spec))

    def step():
        opt.zero_grad()
        out = model(x)
        value = criterion(out, y)
        value.backward()
        opt.step()
        return value

    def make_floor():
        ops = [tuple(torch.from_numpy(a) for a in t) for t in gemm_operands(spec)]
        outs = [(torch.empty(x_.shape[0], w.shape[0]), torch.empty(w.shape),
                 torch.empty(x_.shape)) for x_, w, _ in ops]

        def floor():
            with torch.no_grad():
                for (x_, w, _), (z, _, _) in zip(ops, outs):
                    torch.matmul(x_, w.T, out=z)
                for k in range(len(ops) - 1, -1, -1):
                    x_, w, d = ops[k]
                    torch.matmul(d.T, x_, out=outs[k][1])
                    if k > 0:
                        torch.matmul(d, w, out=outs[k][2])

        return floor

    return {"step": step, "sync": _nothing, "make_floor": make_floor,
            "context": contextlib.nullcontext(), "floor_library": "torch.matmul"}


def _torch_info() -> dict:
    import torch

    return {"version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy_seen": os.environ.get("OMP_WAIT_POLICY", "default")}


# ---------------------------------------------------------------------------------------
# JAX
def jax_loss(params, x, y):
    import jax
    import optax

    h = x
    for k, (w, b) in enumerate(params):
        h = h @ w.T + b
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def jax_step_function(donate: bool = True):
    """``(jitted step(params, opt_state, x, y) -> (params, opt_state, loss), optimizer)``."""
    import jax
    import optax

    opt = optax.adam(LR)

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(jax_loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1) if donate else ()), opt


def jax_training(spec: Spec, donate: bool = True) -> dict:
    import jax
    import jax.numpy as jnp

    fn, opt = jax_step_function(donate)
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in init_params(spec.sizes)]
    state = {"p": params, "s": opt.init(params)}
    x, y = (jnp.asarray(a) for a in batch_data(spec))

    def step():
        state["p"], state["s"], state["loss"] = fn(state["p"], state["s"], x, y)

    def sync():
        jax.block_until_ready((state["p"], state["s"], state.get("loss")))

    @jax.jit
    def gemms(ops):
        out = [x_ @ w.T for x_, w, _ in ops]
        for k in range(len(ops) - 1, -1, -1):
            x_, w, d = ops[k]
            out.append(d.T @ x_)
            if k > 0:
                out.append(d @ w)
        return out

    def make_floor():
        ops = [tuple(jnp.asarray(a) for a in t) for t in gemm_operands(spec)]

        def floor():
            jax.block_until_ready(gemms(ops))

        return floor

    return {"step": step, "sync": sync, "make_floor": make_floor,
            "context": contextlib.nullcontext(), "floor_library": "jax.jit of the products",
            "donate": donate}


def _jax_info() -> dict:
    import jax
    import optax

    return {"version": jax.__version__, "optax": optax.__version__,
            "jax_devices": [str(d) for d in jax.devices()],
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


# ---------------------------------------------------------------------------------------
# ONNX (the graph built here with onnx.helper: Gemm(transB=1) + Relu per layer)
def onnx_model(params, opset: int = 17):
    """An ONNX ``ModelProto`` of the MLP, input ``x`` (N, in) float32, output ``y`` (N, out)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, name = [], [], "x"
    for k, (w, b) in enumerate(params):
        inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"b{k}")]
        out = "y" if k == len(params) - 1 else f"z{k}"
        nodes.append(helper.make_node("Gemm", [name, f"W{k}", f"b{k}"], [out], transB=1))
        if k < len(params) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"a{k}"]))
            out = f"a{k}"
        name = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                     ["N", params[0][0].shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", params[-1][0].shape[0]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_session(params, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_model(params).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------
# Workers (one framework, in a fresh process)
def _setup_worker(framework: str, threads: int, wait_policy: str | None) -> None:
    """Before the framework is imported: its thread settings."""
    if framework.startswith("torch"):  # PyTorch's OpenMP reads the policy at import
        for var in OMP_VARIABLES:
            os.environ.pop(var, None)
        if wait_policy not in (None, "default"):
            os.environ["OMP_WAIT_POLICY"] = wait_policy
    if framework == "jax" and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):  # XLA sizes its thread pool by the usable cores
            os.sched_setaffinity(0, cpus[:threads])
        if threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false").strip()
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)


def framework_info(framework: str) -> dict:
    if framework.startswith("backprop"):
        return _backprop_info()
    if framework == "torch":
        return _torch_info()
    if framework == "jax":
        return _jax_info()
    if framework == "onnxruntime":
        import onnxruntime

        return {"version": onnxruntime.__version__}
    return {}


def training_case(framework: str, spec: Spec) -> dict:
    """The training step of one of :data:`TRAIN_FRAMEWORKS` on ``spec`` (``step``,
    ``sync``, ``make_floor``, ``context``, ``floor_library``)."""
    if framework.startswith("backprop"):
        return backprop_training(spec, framework.split("-", 1)[1])
    if framework == "torch":
        return torch_training(spec)
    return jax_training(spec)


def train_worker(framework: str, specs: list[Spec], max_time: float, threads: int,
                 floor_models=FLOOR_MODELS) -> list[dict]:
    results = []
    for spec in specs:
        case = training_case(framework, spec)
        step, sync = case["step"], case["sync"]

        def synced_step():
            step()
            sync()

        with case["context"]:
            row = time_step(step, sync, max_time)
            if spec.name in floor_models:  # its operands are allocated only here
                floor = case["make_floor"]()
                floor()  # warm (JAX compiles here)
                pair = interleaved(synced_step, floor, max_time)
                row["interleaved"] = {"step": pair[0], "floor": pair[1]}
                row["step_over_floor"] = pair[0] / pair[1]
                row["floor_library"] = case["floor_library"]
        results.append(dict(row, model=spec.name, sizes=list(spec.sizes), batch=spec.batch))
    return results


def inference_variants(framework: str, spec: Spec, params, threads: int):
    """``(variants, to_input, model)``: the framework's inference calls on ``spec``'s MLP
    holding ``params``
    (``{name: fn(x)}``, the first its comparison variant: backprop's ``predict``), the
    conversion of a NumPy batch into what they take, and backprop's model (else None)."""
    model = None
    to_input = _same
    if framework == "backprop":
        import backprop as bp

        model = backprop_model(spec, params)
        model.eval()
        frozen = bp.freeze(model)
        variants = {"predict": lambda x: model.predict(x),
                    "call": lambda x: model(x),
                    "forward-eval": lambda x: model.forward(x),
                    "frozen": lambda x: frozen.predict(x)}
    elif framework == "torch":
        import torch

        net = torch_model(params).eval()

        def run(x):
            with torch.inference_mode():
                return net(x)

        variants = {"inference_mode": run}
        to_input = torch.from_numpy
    elif framework == "onnxruntime":
        session = onnx_session(params, threads)
        variants = {"session.run": lambda x: session.run(["y"], {"x": x})[0]}
    else:
        import jax
        import jax.numpy as jnp

        jparams = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]

        @jax.jit
        def forward(p, x):
            h = x
            for k, (w, b) in enumerate(p):
                h = h @ w.T + b
                if k < len(p) - 1:
                    h = jax.nn.relu(h)
            return h

        variants = {"jit": lambda x: forward(jparams, x).block_until_ready()}
        to_input = jnp.asarray
    return variants, to_input, model


def inference_batch(sizes, batch: int):
    """The NumPy batch every framework predicts on (float32, seeded by its size)."""
    import numpy as np

    return np.random.default_rng(batch).standard_normal((batch, sizes[0]), dtype=np.float32)


def _same(x):
    return x


def inference_worker(framework: str, specs: list[Spec], batches, max_time: float,
                     threads: int) -> list[dict]:
    import numpy as np

    results = []
    for spec in specs:
        params = init_params(spec.sizes)
        variants, to_input, model = inference_variants(framework, spec, params, threads)
        for batch in batches:
            x_np = inference_batch(spec.sizes, batch)
            x = to_input(x_np)
            reference = _reference_forward(params, x_np)
            for name, fn in variants.items():
                np.testing.assert_allclose(np.asarray(fn(x)), reference, rtol=1e-3, atol=1e-3)
                timings = {name: time_step(lambda: fn(x), _nothing, max_time)}
                if name == "forward-eval":  # the same under bp.inference_mode(), untrained flag
                    import backprop as bp

                    model.train()
                    with bp.inference_mode():
                        timings["forward-inference_mode"] = time_step(lambda: fn(x), _nothing,
                                                                      max_time)
                    model.eval()
                for vname, t in timings.items():
                    results.append(dict(t, model=spec.name, sizes=list(spec.sizes), batch=batch,
                                        variant=vname, rows_per_s=batch / t["median"]))
    return results


def _reference_forward(params, x):
    import numpy as np

    h = x.astype(np.float64)
    for k, (w, b) in enumerate(params):
        h = h @ w.T.astype(np.float64) + b
        if k < len(params) - 1:
            h = np.maximum(h, 0)
    return h


def _memory_now() -> dict:
    """ru_maxrss and /proc's VmHWM (peak) and VmRSS (now), MiB. ru_maxrss counts the
    parent's RSS at the fork too (Linux keeps the larger across exec); VmHWM does not."""
    import resource

    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key.lower() + "_mib"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def memory_worker(framework: str, spec: Spec, steps: int, threads: int) -> list[dict]:
    import importlib

    modules = {"torch": ("torch",), "jax": ("jax", "optax")}.get(
        framework, ("backprop", "workloads"))
    for module in ("numpy", *modules):  # the imports first: their memory is apart
        importlib.import_module(module)
    after_import = _memory_now()
    if framework.startswith("backprop"):
        case = backprop_training(spec, framework.split("-", 1)[1])
    elif framework == "torch":
        case = torch_training(spec)
    else:
        case = jax_training(spec)
    after_setup = _memory_now()
    with case["context"]:
        case["step"]()  # the first step also compiles (Numba's kernels, XLA's step)
        case["sync"]()
        after_first = _memory_now()
        for _ in range(steps - 1):
            case["step"]()
        case["sync"]()
    after_steps = _memory_now()
    return [{"model": spec.name, "sizes": list(spec.sizes), "batch": spec.batch,
             "steps": steps, "after_import": after_import, "after_setup": after_setup,
             "after_first_step": after_first, "after_steps": after_steps}]


def worker_main(args) -> int:
    framework, threads = args.framework, args.threads
    _setup_worker(framework, threads, args.wait_policy)
    sys.path.insert(0, str(HERE))
    specs = [Spec.of(d) for d in json.loads(args.spec)]
    load = os.getloadavg()[0]
    if args.worker == "train":
        rows = train_worker(framework, specs, args.max_time, threads)
    elif args.worker == "inference":
        rows = inference_worker(framework, specs, json.loads(args.batches), args.max_time,
                                threads)
    elif args.worker == "memory":
        rows = memory_worker(framework, specs[0], args.steps, threads)
    else:
        import step_profile

        rows = step_profile.profile_worker(framework, specs, args.max_time, threads,
                                           Path(args.hlo_dir) if args.hlo_dir else None)
    info = dict(framework_info(framework), load_at_start=load, threads=threads)
    print(json.dumps([dict(r, info=info) for r in rows]))
    return 0


# ---------------------------------------------------------------------------------------
# The driver
def worker_env(threads: int, wait_policy: str | None) -> dict:
    """This environment with ``threads`` threads for every pool, and the OpenMP settings
    backprop makes (:data:`OMP_VARIABLES`) unset (each framework's default; a backprop
    worker sets its own at import) or ``OMP_WAIT_POLICY=wait_policy``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    for var in OMP_VARIABLES:
        env.pop(var, None)
    if wait_policy not in (None, "default"):
        env["OMP_WAIT_POLICY"] = wait_policy
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HERE), env.get("PYTHONPATH"))))
    return env


def run_worker(section: str, framework: str, specs, threads: int, max_time: float,
               wait_policy: str = "default", **extra) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", section,
           "--framework", framework, "--threads", str(threads), "--max-time", str(max_time),
           "--spec", json.dumps([Spec.of(s).as_json() for s in specs]),
           "--wait-policy", wait_policy]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return worker_rows(cmd, f"the {section} worker of {framework}", framework, threads,
                       wait_policy)


def worker_rows(cmd, label: str, framework: str, threads: int, wait_policy: str) -> list[dict]:
    """Run a worker process (``cmd``) under :func:`worker_env`; its last stdout line is a JSON
    list of rows, returned tagged with the framework and the wait policy."""
    proc = subprocess.run(cmd, env=worker_env(threads, wait_policy), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [dict(r, framework=framework, omp_wait_policy=wait_policy) for r in rows]


def missing_modules(framework: str, pretend_missing=()) -> list[str]:
    base = framework.split("-", 1)[0]
    if base in pretend_missing:
        return list(REQUIRES.get(base, (base,)))
    return [m for m in REQUIRES.get(base, ()) if importlib.util.find_spec(m) is None]


def alternate(variants, repeat: int, run) -> list[dict]:
    """``run(variant)`` for each variant, ``repeat`` times, in reversed order every other
    repeat; the rows of every run."""
    rows = []
    for r in range(repeat):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            rows += run(variant)
    return rows


def best_of(rows: list[dict], key) -> list[dict]:
    """Per ``key(row)``, the row with the smallest median, with every repeat's median and
    the best per wait policy."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = []
    for group in groups.values():
        best = min(group, key=lambda r: r["median"])
        extra = {"min_over_repeats": min(r["min"] for r in group)}
        by_policy = {p: min(r["median"] for r in group if r["omp_wait_policy"] == p)
                     for p in dict.fromkeys(r["omp_wait_policy"] for r in group)}
        if any("interleaved" in r for r in group):  # the best pair by its step/floor
            pairs = [r for r in group if "interleaved" in r]
            extra["step_over_floor_repeats"] = [r["step_over_floor"] for r in pairs]
        out.append(dict(best, repeats=[r["median"] for r in group],
                        median_by_wait_policy=by_policy, **extra))
    return out


def _policies(framework: str, smoke: bool):
    policies = WAIT_POLICIES.get(framework, ("default",))
    return policies[:1] if smoke else policies


def section_train(args, specs, frameworks, log) -> dict:
    variants = [(f, p) for f in frameworks for p in _policies(f, args.smoke)]
    rows = alternate(variants, args.repeat, lambda v: run_worker(
        "train", v[0], specs, args.threads, args.max_time, v[1]))
    return {"results": best_of(rows, lambda r: (r["framework"], r["model"]))}


def section_inference(args, specs, frameworks, log) -> dict:
    batches = [1, 32, 256] if args.smoke else [*LATENCY_BATCHES, THROUGHPUT_BATCH]
    variants = [(f, p) for f in frameworks for p in _policies(f, args.smoke)]
    rows = alternate(variants, args.repeat, lambda v: run_worker(
        "inference", v[0], specs, args.threads, args.max_time, v[1],
        batches=json.dumps(batches)))
    return {"batches": batches, "results": best_of(
        rows, lambda r: (r["framework"], r["variant"], r["model"], r["batch"]))}


def section_memory(args, specs, frameworks, log) -> dict:
    steps = 3 if args.smoke else MEMORY_STEPS
    rows = []
    for spec in specs:
        for framework in frameworks:  # one fresh process each; the policy does not matter
            rows += run_worker("memory", framework, [spec], args.threads, args.max_time,
                               steps=steps)
    return {"results": rows}


def section_profile(args, specs, frameworks, log) -> dict:
    rows = []
    for framework in frameworks:
        rows += run_worker("profile", framework, specs, args.threads, args.max_time,
                           hlo_dir=str(args.out_dir.resolve()))
    return {"results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, help="folder for the JSON and Markdown files")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    parser.add_argument("--frameworks", default=None,
                        help="subset of backprop-loop,backprop-fit,torch,jax,onnxruntime "
                             "(default: all; backprop-* stand for backprop in inference)")
    parser.add_argument("--models", default=None,
                        help="train models (default: tiny,digits,mnist,wide,b1024,b4096,b8192)")
    parser.add_argument("--threads", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="threads for every framework")
    parser.add_argument("--max-time", type=float, default=1.0,
                        help="seconds of timed calls per case and run (at least 5 calls)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating runs of each variant; the best median counts")
    parser.add_argument("--smoke", action="store_true",
                        help="small widths and batches, a few steps: checks the script runs")
    parser.add_argument("--pretend-missing", default="", help=argparse.SUPPRESS)
    # worker options
    parser.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--wait-policy", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=MEMORY_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--hlo-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)

    sys.path.insert(0, str(HERE))
    from workloads import LARGE_BATCH_MLPS, MLPS

    import frameworks_report

    if args.out_dir is None:
        parser.error("--out-dir is required")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected a subset of {list(SECTIONS)}")
    all_models = {**MLPS, **LARGE_BATCH_MLPS}
    default_models = SMOKE_MODELS if args.smoke else tuple(all_models)
    models = [m.strip() for m in (args.models or ",".join(default_models)).split(",")
              if m.strip()]
    unknown = sorted(set(models) - set(all_models))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected a subset of {list(all_models)}")
    known = set(TRAIN_FRAMEWORKS) | set(INFERENCE_FRAMEWORKS) | {"backprop"}
    wanted = [f.strip() for f in (args.frameworks or ",".join(
        TRAIN_FRAMEWORKS + ("onnxruntime",))).split(",") if f.strip()]
    unknown = sorted(set(wanted) - known)
    if unknown:
        parser.error(f"unknown framework(s) {unknown}; expected a subset of {sorted(known)}")
    if args.smoke:
        args.max_time, args.repeat = min(args.max_time, 0.05), 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    pretend = {p.strip() for p in args.pretend_missing.split(",") if p.strip()}
    skipped = {}
    for framework in wanted:
        missing = missing_modules(framework, pretend)
        if missing:
            skipped[framework.split("-", 1)[0]] = (
                f"{', '.join(missing)} not installed: {framework} skipped "
                f"(pip install {' '.join(missing)} to run it)")
    for message in dict.fromkeys(skipped.values()):
        print(f"frameworks: {message}")
    usable = [f for f in wanted if f.split("-", 1)[0] not in skipped]

    def shrink(mlp):
        return mlp.smoke() if args.smoke else mlp

    def pick(allowed):
        return [f for f in allowed if f in usable or (f == "backprop" and any(
            u.startswith("backprop") for u in usable))]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/frameworks.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    common = {"command": command, "threads": args.threads, "smoke": args.smoke,
              "max_time": args.max_time, "repeat": args.repeat, "skipped": skipped}
    from report import describe_machine

    machine = describe_machine()
    for section in sections:
        start, load_before = time.time(), os.getloadavg()
        frameworks = pick({"train": TRAIN_FRAMEWORKS, "inference": INFERENCE_FRAMEWORKS,
                           "memory": MEMORY_FRAMEWORKS, "profile": PROFILE_FRAMEWORKS}[section])
        if section == "train":
            specs = [shrink(all_models[m]) for m in models]
            data = section_train(args, specs, frameworks, print)
        elif section == "inference":
            data = section_inference(args, [shrink(MLPS[m]) for m in INFERENCE_MODELS],
                                     frameworks, print)
        elif section == "memory":
            data = section_memory(args, [shrink(MLPS[m]) for m in MEMORY_MODELS], frameworks,
                                  print)
        else:
            data = section_profile(args, [shrink(MLPS[m]) for m in PROFILE_MODELS],
                                   frameworks, print)
        data = dict(common, section=section, frameworks=frameworks, machine=machine,
                    load_before=list(load_before), load_after=list(os.getloadavg()),
                    seconds=time.time() - start, **data)
        stem = "frameworks" if section == "train" else section
        (args.out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
        (args.out_dir / f"{stem}.md").write_text(frameworks_report.render(section, data))
        print(f"frameworks: {section}: wrote {args.out_dir / (stem + '.md')} "
              f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
