"""Time one training step (zero_grad, forward, loss, backward, optimizer step) of the same
MLP on every device this machine has, and say plainly when there is no GPU.

Run: python examples/cpu_vs_gpu.py [--batch 512] [--hidden 1024] [--steps 50]
"""
import argparse
import time

import numpy as np

from backprop import kernels as K
from backprop.backend import asarray, cuda_status, use_device
from backprop.layers import Dense
from backprop.losses import SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop.optim import Adam


def step_time(device: str, batch: int, hidden: int, steps: int) -> float:
    """Median seconds per training step on ``device`` (after warm-up, GPU synchronised)."""
    with use_device(device) as dev:
        rng = np.random.default_rng(0)
        model = Sequential([Dense(784, hidden, activation="relu", rng=rng),
                            Dense(hidden, hidden, activation="relu", rng=rng),
                            Dense(hidden, 10, rng=rng)])
        X = asarray(rng.normal(size=(batch, 784)), dtype=np.float32)
        y = asarray(rng.integers(0, 10, batch))
        loss, opt = SoftmaxCrossEntropyLoss(), Adam(model.parameters(), lr=1e-3)
        loss.validate_labels = False
        sync = dev.xp.cuda.Device().synchronize if dev.kind == "cuda" else (lambda: None)

        def step():
            opt.zero_grad()
            loss.forward(model.forward(X), y)
            model.backward(loss.backward())
            opt.step()

        for _ in range(3):  # compiles the kernels (Numba JIT / CuPy NVRTC) and warms caches
            step()
        sync()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, batch {args.batch}, Adam, float32; "
          f"median of {args.steps} steps")
    devices = ["cpu"]
    status = cuda_status()
    if status["available"]:
        devices.append("cuda")
    results = {}
    for device in devices:
        results[device] = step_time(device, args.batch, args.hidden, args.steps)
        kind = "cpu" if device == "cpu" else "cuda"
        print(f"  {device:<5} {results[device] * 1e3:9.3f} ms/step   "
              f"{args.batch / results[device]:12,.0f} samples/s   kernels {K.backend_name(kind)}")
    if "cuda" in results:
        print(f"GPU speed-up over the CPU: {results['cpu'] / results['cuda']:.1f}x "
              f"({status['names'][0]})")
    else:
        print(f"No GPU here, so only the CPU was timed. Reason: {status['reason']}")


if __name__ == "__main__":
    main()
