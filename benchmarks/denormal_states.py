"""How much denormal optimizer states cost Adam, on the digits MLP's hand-written loop.

    python benchmarks/denormal_states.py [--model digits] [--steps 3000] [--rounds 10]

Runs ``--steps`` steps of the hand-written Adam loop of ``frameworks.py`` (the benchmark's
fixed batch; some units never fire, so their gradients are zero and their Adam states decay
geometrically into the denormal range, where every arithmetic operation on them takes a
microcode assist, and stay there: 0.9 times the smallest denormal rounds back to it, and
``m + 0.1 (0 - m)`` adds a product that rounds to zero), counts the denormal values in the
flat Adam states (none since the optimizers store such values as 0:
``reference.flush_denormals``), then times the Adam kernel (numba_cpu, one call on the flat
buffers) on copies of those states against copies with the denormals set to zero,
alternated in one process (the states are restored before every call, so a denormal value
is read by every timed call). Also reports whether ``jax.jit`` flushes denormals to zero on
this CPU (XLA sets flush-to-zero; NumPy and PyTorch keep IEEE denormals), when JAX is
installed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def xla_flushes() -> str:
    try:
        import jax
        import numpy as np
    except ImportError:
        return "JAX not installed"
    # the factor is an argument: XLA would fold a literal x * 1.0 to x
    out = np.asarray(jax.jit(lambda x, y: x * y)(np.array([1e-40], np.float32),
                                                 np.float32(1.0)))
    return "yes (1e-40 * 1 -> 0)" if out[0] == 0 else "no (1e-40 * 1 -> 1e-40)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    import numpy as np

    import frameworks
    import workloads
    from backprop.kernels import numba_cpu

    mlp = workloads.MLPS.get(args.model) or workloads.LARGE_BATCH_MLPS[args.model]
    case = frameworks.backprop_training(frameworks.Spec.of(mlp), "loop")
    step = case["step"]
    for _ in range(args.steps):
        step()
    cells = {name: c.cell_contents for name, c in zip(step.__code__.co_freevars,
                                                       step.__closure__)}
    group = cells["opt"]._groups[0]
    m, v = group.state["exp_avg"], group.state["exp_avg_sq"]
    tiny = np.finfo(m.dtype).tiny
    denormal = {name: int(((a != 0) & (np.abs(a) < tiny)).sum()) for name, a in
                (("exp_avg", m), ("exp_avg_sq", v))}
    kept = [group.data.copy(), group.grad.copy(), m.copy(), v.copy()]
    flushed = [a.copy() for a in kept]
    for a in flushed[2:]:
        a[np.abs(a) < tiny] = 0
    scalars = (1.0, 0.0, 0.1, 0.999, 0.001, 0.001, 1.0, 1e-8)  # an Adam step's, lr 1e-3
    times: dict = {"denormal": [], "flushed": []}
    for r in range(args.rounds):
        for mode in (("denormal", "flushed") if r % 2 else ("flushed", "denormal")):
            source = kept if mode == "denormal" else flushed
            arrays = [a.copy() for a in source]
            numba_cpu._adam(arrays[0].size, *arrays, None, scalars)  # compiled, warm
            start = time.perf_counter()
            for _ in range(args.calls):
                for a, s in zip(arrays[2:], source[2:]):
                    a[...] = s  # the same states every call (untimed would need a copy each)
                numba_cpu._adam(arrays[0].size, *arrays, None, scalars)
            times[mode].append((time.perf_counter() - start) / args.calls * 1e6)
    ratios = [a / b for a, b in zip(times["denormal"], times["flushed"])]
    print(f"model {args.model}, {args.steps} steps: {group.data.size} parameters; denormal "
          f"values: exp_avg {denormal['exp_avg']}, exp_avg_sq {denormal['exp_avg_sq']}")
    print(f"Adam kernel (+ state copy) per call, median of {args.rounds} rounds: with the "
          f"denormals {statistics.median(times['denormal']):.1f} us, flushed "
          f"{statistics.median(times['flushed']):.1f} us, ratio "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    print(f"jax.jit flushes denormals to zero: {xla_flushes()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
