"""A full training step of four MLPs, and its floor: the step's matrix products alone.

Group ``step:<model>`` holds the step on every (device, kernel backend) and the matmul floor
of each device, so the table shows fused against reference kernels, CPU against GPU, and how
far each step is above the GEMMs it cannot avoid. Each step benchmark also times the step
and its floor alternately (``extra_info["interleaved"]``), from which the report takes the
step/floor ratio: two benchmarks run a minute apart on a shared machine are not comparable. ``extra_info`` has the step's matmul FLOPs
and the minimum bytes of its epilogues/loss (``epilogue_bytes``) and of Adam
(``optimizer_bytes``), from which the report computes the full floor.
"""
from __future__ import annotations

import pytest

from workloads import (DEVICES, MLPS, MatmulFloor, TrainingStep, array_module,
                       device_unavailable_reason, interleaved_medians, synced)


def _info(mlp):
    return dict(model=mlp.name, sizes=list(mlp.sizes), batch=mlp.batch, params=mlp.n_params,
                shape=[mlp.batch, mlp.sizes[0]], flops=mlp.matmul_flops(),
                epilogue_bytes=mlp.epilogue_bytes(), optimizer_bytes=mlp.optimizer_bytes())


@pytest.mark.parametrize("model", list(MLPS))
def test_training_step(measure, target, kernel_choice, smoke, model):
    mlp = MLPS[model].smoke() if smoke else MLPS[model]
    kernel_choice(target.kernel_choice)
    step = TrainingStep(mlp, target.device)
    # the step and its matrix products alone, alternated: the report's step/floor ratio
    floor = MatmulFloor(mlp, array_module(target.device))
    with mlp.blas_threads(target.device):  # as fit trains it
        pair = interleaved_medians(synced(target.device, step), synced(target.device, floor),
                                   seconds=0.05 if smoke else 2.0)
        measure(step, device=target.device, group=f"step:{model}", warmup=3, kind="step",
                backend=target.backend, interleaved={"step": pair[0], "matmul_floor": pair[1]},
                **_info(mlp))


@pytest.mark.parametrize("model", list(MLPS))
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_floor(measure, smoke, device, model):
    reason = device_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    mlp = MLPS[model].smoke() if smoke else MLPS[model]
    floor = MatmulFloor(mlp, array_module(device))
    with mlp.blas_threads(device):
        measure(floor, device=device, group=f"step:{model}", kind="matmul_floor",
                backend="blas" if device == "cpu" else "cublas", **_info(mlp))
