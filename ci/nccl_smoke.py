"""GPU smoke test of backprop.distributed's NCCL path (run by ci/gpu.sh; needs one GPU).

1. A one-rank group reduces a CuPy array through NCCL (``ProcessGroup.allreduce_device``
   does not short-circuit one rank): the communicator is made from a unique id, the
   reduction runs on the current stream, and the result is checked; a float32 sum and a
   float64 mean.
2. Under ``mpiexec -n N`` with N GPUs (ci/gpu.sh does this when mpi4py and mpiexec exist
   and the machine has 2+ GPUs): ``fit`` on N ranks, one GPU each, and the ranks' parameters
   are compared.
Prints one JSON line; exits 1 when a check fails, 0 otherwise (NCCL missing is a failure:
on a GPU machine the path must work).
"""
import json
import sys

import numpy as np

import backprop as bp
from backprop import distributed


def main() -> int:
    import cupy

    group = distributed.init()
    report = {"size": group.size, "rank": group.rank}
    if group.size == 1:
        a = cupy.arange(1000, dtype=cupy.float32)
        group.allreduce_device(a, "sum")
        b = cupy.full(7, 3.0, dtype=cupy.float64)
        group.allreduce_device(b, "mean")
        cupy.cuda.get_current_stream().synchronize()
        report.update(transport=distributed.info().get("gpu_transport"),
                      nccl_reason=group.nccl_reason,
                      sum_ok=bool((a.get() == np.arange(1000, dtype=np.float32)).all()),
                      mean_ok=bool((b.get() == 3.0).all()))
        ok = report["transport"] == "nccl" and report["sum_ok"] and report["mean_ok"]
    else:
        X, y = bp.data.two_moons(512, seed=0)
        bp.manual_seed(0)
        model = bp.Sequential([bp.Dense(2, 64, activation="relu"), bp.Dense(64, 2)])
        model.fit(X, y, loss="cross_entropy", epochs=3, batch_size=64, seed=0, verbose=0)
        state = {k: bp.to_numpy(v) for k, v in model.state_dict().items()}
        every = group.allgather_object(state)
        spread = max(float(np.abs(every[0][k] - s[k]).max()) for s in every for k in s)
        report.update(device=str(bp.get_device()), spread=spread,
                      transport=distributed.info().get("gpu_transport"))
        ok = spread == 0.0 and report["transport"] == "nccl"
    if group.rank == 0:
        print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
