"""Each fused op of the kernel registry on each backend, next to its reference.

Group ``kernel:<op>[<variant>]:<shape>`` holds every (device, backend) for one op and shape,
so the table compares fused against reference and CPU against GPU side by side. ``extra_info``
has the minimum bytes moved (inputs read once, outputs written once) and nominal FLOPs. The
ops that the layers call in place are timed in place too (``[..., in place]``; workloads'
``IN_PLACE``), their input restored before each timed call.
"""
from __future__ import annotations

import pytest

from backprop import kernels as K
from workloads import kernel_case, kernel_variants

VARIANTS = kernel_variants()


@pytest.mark.parametrize("size", ["large", "small"])
@pytest.mark.parametrize("op,variant,in_place", VARIANTS, ids=[
    (f"{op}[{v}]" if v else op) + ("-in_place" if in_place else "") for op, v, in_place in VARIANTS])
def test_kernel(measure, target, smoke, op, variant, in_place, size):
    fn = K.implementation(target.backend, op)
    case = kernel_case(op, variant, size, target.xp, smoke=smoke, in_place=in_place)
    fused = target.backend != "reference" and target.backend in K.OPS[op]
    measure(lambda: fn(*case.args), device=target.device, group=case.group(), kind="kernel",
            reset=case.reset, op=op, variant=variant, in_place=in_place,
            backend=target.backend, fused=fused, shape=list(case.shape), bytes=case.bytes,
            flops=case.flops)
