"""What ``fit`` does differently on a process group of several ranks (data parallelism).

The semantics (README, *Distributed*):

- ``batch_size`` is the **global** batch. Every epoch has one global order (the permutation
  of ``(seed, epoch)``, the same on every rank); global batch ``k`` is rows
  ``order[kB:(k+1)B]``, and rank ``r`` takes the contiguous share
  :func:`backprop.distributed.share` of it (shares differ by at most one row).
- Parameters, optimizer state and buffers start equal: rank 0's are broadcast once, so are
  the seed, the hyperparameters and the step count.
- One step on rank ``r`` with ``n_r`` of the batch's ``m`` rows: forward and loss on its
  rows (the mean over them, ``L_r``), backward of ``(n_r/m)·L_r``, then **one allreduce
  (sum) of each flat gradient buffer** of the optimizer, which therefore holds
  ``Σ_r (n_r/m) ∂L_r/∂θ = ∂L/∂θ``, the gradient of the mean loss over the whole global
  batch. The loss ``Σ_r n_r L_r / m`` is summed by a non-blocking allreduce of one number
  started before backward. Regularizer gradients and penalties depend on the parameters
  only, so they are added after the allreduce, once, identically on every rank. Then the
  same optimizer step runs everywhere, and the parameters stay equal without ever being
  sent again.
- A rank whose share of a batch is empty (a batch smaller than the group) contributes zeros.
- Epoch end: the metrics' accumulators are summed over the ranks, the buffers that training
  updates (BatchNorm's running statistics) are broadcast from rank 0 (as DDP's
  ``broadcast_buffers``), the validation rows are split between the ranks and their sums
  reduced, so every rank gets the same global logs; the decision to stop is rank 0's.
- Dropout draws different masks on every rank (``Dropout.stream = rank``; rank 0 draws the
  masks of a one-process run).

Hence, with no dropout and no per-rank BatchNorm, N ranks and one process end with the same
parameters up to rounding (``tests/test_distributed.py`` holds it to 1e-9 in float64).
"""
from __future__ import annotations

import numpy as np

from backprop.backend import get_array_module
from backprop.distributed import ProcessGroup, share
from backprop.parameter import flat_layout

__all__ = ["DataParallel"]


class DataParallel:
    """The collectives of one data-parallel ``fit`` (made by ``fit``; not a public API)."""

    def __init__(self, group: ProcessGroup, model, optimizer):
        self.group, self.model, self.optimizer = group, model, optimizer
        self.rank, self.size = group.rank, group.size
        self._loss = np.zeros(1, dtype=np.float64)  # the step's Σ n_r L_r, reduced

    # -- the start ---------------------------------------------------------------------
    def start(self, seed: int) -> int:
        """Make every rank start from rank 0's parameters, optimizer state, buffers, hyper-
        parameters, step count and seed; returns the seed."""
        g, opt = self.group, self.optimizer
        seed, hyper, step = g.broadcast_object((seed, dict(opt.hyper),
                                                opt.step_count))
        opt.hyper.update(hyper)
        opt.step_count = step
        covered = set()
        for arrays, params in opt.flat_buffers():
            for a in arrays:
                g.broadcast(a)
            covered.update(id(p) for p in params)
        for p in self.model.parameters():
            if id(p) not in covered:  # a parameter the optimizer does not train
                _broadcast_view(g, p.data)
        self.sync_buffers()
        return seed

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        for _, buf in self.model.named_buffers():
            _broadcast_view(self.group, buf)

    # -- the rows of this rank ---------------------------------------------------------
    def plan(self, n: int, batch_size: int, steps: int) -> list[tuple[int, int, int, int]]:
        """For each step: ``(global_lo, local_lo, local_hi, rows)``: the global batch is
        ``order[global_lo : global_lo + rows]`` and this rank's share is
        ``order[global_lo + local_lo : global_lo + local_hi]``."""
        out = []
        for step in range(steps):
            lo = step * batch_size
            rows = min(batch_size, n - lo)
            a, b = share(rows, self.rank, self.size)
            out.append((lo, a, b, rows))
        return out

    @staticmethod
    def local_index(order: np.ndarray, plan) -> np.ndarray:
        """The positions of this rank's rows, epoch order, batch after batch."""
        parts = [order[lo + a:lo + b] for lo, a, b, _ in plan]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- one step ----------------------------------------------------------------------
    def start_loss(self, local_sum: float):
        """Begin summing ``n_r · L_r`` over the ranks (overlaps with backward)."""
        self._loss[0] = local_sum
        return self.group.iallreduce_host(self._loss)

    def finish_loss(self, request, rows: int) -> float:
        """The global batch's mean loss, once the sum started by :meth:`start_loss` is in."""
        if request is not None:
            request.Wait()
        return float(self._loss[0]) / rows

    def reduce_gradients(self) -> None:
        """Sum every flat gradient buffer of the optimizer over the ranks, in place."""
        for grad in self.optimizer.flat_gradients():
            self.group.allreduce(grad, "sum")

    def backward_and_reduce(self, delta, from_logits: bool = False) -> None:
        """``model.backward(delta, from_logits=from_logits)`` (``delta`` None: this rank has
        no rows in the batch), then the gradient sum.

        With ``group.bucket_bytes`` > 0 (and a Sequential model on the CPU whose parameters
        lie in one flat buffer in layer order) the sum is started in buckets while backward
        runs: once the layers from the last down to layer ``i`` have their gradients and
        these hold at least ``bucket_bytes``, a non-blocking allreduce of that slice of the
        buffer begins (the slices are disjoint, so each element is reduced once); all are
        waited for at the end. The schedule depends on the layout alone, so every rank
        starts the same collectives in the same order, a rank without rows included."""
        plan = self._bucket_plan()
        if plan is None:
            if delta is not None:
                self.model.backward(delta, need_input_grad=False,
                                    **({"from_logits": True} if from_logits else {}))
            self.reduce_gradients()
            return
        flat, starts, owned = plan
        layers, limit = self.model.layers, self.group.bucket_bytes
        end, pending = flat.size, []
        for i in range(len(layers) - 1, -1, -1):
            if delta is not None:
                paired = {"from_logits": True} if from_logits and i == len(layers) - 1 else {}
                delta = layers[i].backward(delta, need_input_grad=i > 0, **paired)
            for p in owned[i]:
                if p._stale:  # no gradient written this step: reading it zeroes it
                    p.grad  # noqa: B018
            if (end - starts[i]) * flat.itemsize >= limit:
                pending.append(self.group.iallreduce_host(flat[starts[i]:end]))
                end = starts[i]
            elif pending:  # let MPI progress the buckets already started
                pending[0].Test()
        if end > 0:
            pending.append(self.group.iallreduce_host(flat[:end]))
        self.group.wait_all(pending)

    def _bucket_plan(self):
        """``(flat gradient, start of each layer's slice, each layer's parameters)``, or
        None when the bucketed sum does not apply (see :meth:`backward_and_reduce`). Made
        once, and again when the optimizer re-homes its parameters."""
        plan = getattr(self, "_plan", None)
        if plan is not None and self.optimizer.layout_intact():
            return plan
        self._plan = None
        layers = getattr(self.model, "layers", None)
        if self.group.bucket_bytes <= 0 or layers is None or self.group.comm is None:
            return None
        flats = self.optimizer.flat_gradients()
        params = self.optimizer.params
        if len(flats) != 1 or get_array_module(flats[0]) is not np or \
                [id(p) for p in params] != [id(p) for p in self.model.parameters()]:
            return None
        first, total = flat_layout(params, flats[0].itemsize, on_cpu=True)
        offsets = {id(p): start for p, start in zip(params, first)}
        owned = [layer.parameters() for layer in layers]
        starts, nxt = [0] * len(layers), total
        for i in range(len(layers) - 1, -1, -1):  # a layer without parameters starts where
            nxt = offsets[id(owned[i][0])] if owned[i] else nxt  # the next one does
            starts[i] = nxt
        self._plan = (flats[0], starts, owned)
        return self._plan

    # -- epoch end ---------------------------------------------------------------------
    def merge_metrics(self, metrics) -> None:
        """Each metric's accumulators become the sums over all ranks."""
        if not metrics:
            return
        states = self.group.allgather_object([m.state() for m in metrics])
        for i, m in enumerate(metrics):
            m.merge([per_rank[i] for per_rank in states])

    def sum_host(self, *values: float) -> list[float]:
        buf = np.array(values, dtype=np.float64)
        return self.group.allreduce_host(buf, "sum").tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (so that every rank stops together)."""
        return bool(self.group.broadcast_object(bool(flag)))


def _broadcast_view(group: ProcessGroup, a) -> None:
    """Broadcast into ``a`` even when it is not contiguous (through a contiguous copy)."""
    if a.flags.c_contiguous and a.flags.writeable:
        group.broadcast(a)
        return
    xp = get_array_module(a)
    tmp = xp.ascontiguousarray(a)
    group.broadcast(tmp)
    a[...] = tmp
