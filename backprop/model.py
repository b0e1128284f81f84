"""``Sequential``: layers applied in order, and the model-level API (fit, evaluate, predict,
save, summary) that delegates to :mod:`backprop.training` and :mod:`backprop.io`.

Forward is ``x ← layer.forward(x)`` for each layer; backward is
``g ← layer.backward(g)`` in reverse order, skipping ``∂X`` of the first layer unless asked
for (``need_input_grad=True``: training never needs the gradient of the data).
"""
from __future__ import annotations

import numpy as np

from backprop import blas, gemm
from backprop.concurrency import _MODE
from backprop.layers import Dense, Layer, check_input, from_config

__all__ = ["Sequential"]

_plans = None  # backprop.inference, imported on the first model(x) (it imports Numba)
_training = None  # backprop.training, imported on the first model.predict


def _inference():
    global _plans
    if _plans is None:
        from backprop import inference

        _plans = inference
    return _plans


def _training_module():
    global _training
    if _training is None:
        from backprop import training

        _training = training
    return _training


def _reject_repeated_layers(layers) -> None:
    """Raise when one layer object occurs twice in the tree below ``layers``: a layer keeps
    the tensors its forward pass saves for backward, so a second use would overwrite those
    of the first and give wrong gradients without any error."""
    seen: dict[int, str] = {}
    for i, top in enumerate(layers):
        for path, layer in _walk(top, str(i)):
            if id(layer) in seen:
                raise ValueError(
                    f"layer {path} ({layer!r}) is the same object as layer {seen[id(layer)]}: a "
                    "layer object can appear only once in a model (weight sharing is not "
                    "supported); create a separate layer for each position")
            seen[id(layer)] = path


def _walk(layer, path):
    yield path, layer
    for name, child in layer.children():
        yield from _walk(child, f"{path}.{name}")


class Sequential(Layer):
    """A stack of layers. Parameters are named ``"{index}.{name}"`` (``"0.W"``, ``"0.b"``,
    ``"2.block.0.W"`` for a Residual block), the names used by ``state_dict``, optimizers
    and checkpoints.

    ``model(x)`` converts ``x`` (array-like, any device), checks it and returns a fresh
    array; ``model.forward(x)`` is the training hot path and returns a reused buffer.

    On the CPU, ``forward`` and ``backward`` each cap OpenBLAS's threads for their own
    duration to what the pass's largest matrix product pays for (:mod:`backprop.blas`, as
    ``fit`` does for a whole run), so a hand-written training loop is as fast as ``fit``
    and the caller's code in between keeps every thread.
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential layer {i} is a {type(layer).__name__}, not a Layer "
                                "(e.g. Dense(2, 16, activation='relu'))")
        _reject_repeated_layers(self.layers)
        self.regularizers = []
        self.name_parameters()
        params = self.parameters()
        self._first_param = params[0] if params else None  # its dtype and device: the model's
        self._expected_features = self.in_features
        # multiply-adds per row of the largest matrix product: sizes the BLAS thread cap
        self._widest = blas.largest_product(self, 1)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def in_features(self):
        """Input features, from the first layer that declares them (None if unknown)."""
        for layer in self.layers:
            if layer.in_features is not None:
                return layer.in_features
            if not layer.preserves_shape:
                return None
        return None

    def add_regularizer(self, regularizer) -> None:
        """Add a penalty (``backprop.regularizers``) applied to the parameters during ``fit``."""
        self.regularizers.append(regularizer)

    def forward(self, x):
        if self._first_param is not None:
            check_input(x, "the model", self._expected_features, self._first_param.data)
        cap = self._blas_cap(x)
        try:
            request = _MODE.autocast
            if request is None:
                for layer in self.layers:
                    x = layer.forward(x)
            else:
                x = self._forward_lowp(x, request)
        finally:
            blas.release(cap)
        return x

    def _forward_lowp(self, x, request):
        """``forward`` in mixed precision (:mod:`backprop.precision`): a Dense layer
        followed by a Dense layer that reads its input in low precision writes that copy in
        its epilogue and hands it over, so the conversion costs no pass of its own. A Dense
        layer none of whose products pays in low precision runs its float32 pass."""
        ctx = self._ctx
        plans = getattr(ctx, "_lowp_plans", None)
        if plans is None:
            plans = ctx._lowp_plans = {}
        key = (x.shape[0], request)
        plan = plans.get(key)
        if plan is None:
            plan = self._plan_lowp(x.shape[0], request)
            if len(plans) >= 8:
                plans.clear()
            plans[key] = plan
        x_lp = None
        for route, layer, policy, emit in plan:
            if route == 2:
                x, x_lp = layer.forward_lowp(x, x_lp, policy, request, emit)
            elif route == 1:
                x, x_lp = layer._forward_f32(x), None
            else:
                x, x_lp = layer.forward(x), None
        return x

    def _plan_lowp(self, rows: int, request) -> list:
        """Per layer ``(route, layer, policy, emit)``: route 2 runs ``forward_lowp`` (and
        ``emit``: writes the low-precision output the next layer reads), 1 a Dense
        layer's float32 pass, 0 the layer's own ``forward``."""
        layers = self.layers
        routes = []
        for layer in layers:
            policy = layer._lowp_policy(request) if isinstance(layer, Dense) else None
            if policy is None:
                routes.append((0, layer, None))
            elif layer.lowp_products(rows, policy) == (False, False, False):
                routes.append((1, layer, None))
            else:
                routes.append((2, layer, policy))
        plan = []
        for i, (route, layer, policy) in enumerate(routes):
            after = routes[i + 1] if i + 1 < len(routes) else None
            emit = route == 2 and after is not None and after[0] == 2 and \
                after[2] is policy and after[1].takes_lowp_input(rows, policy)
            plan.append((route, layer, policy, emit))
        return plan

    def __call__(self, x):
        """``forward`` on any array-like (:meth:`~backprop.layers.Layer.prepare_input`),
        returned as a fresh array. In eval mode (``model.eval()`` or inside
        :func:`~backprop.concurrency.inference_mode`) a NumPy batch runs through the model's
        compiled inference plan (:mod:`backprop.inference`) when one covers its layers and
        the batch's size (``backprop.inference.MAX_ROWS``): the same outputs up to
        rounding, without saving tensors for ``backward`` (call ``forward`` for a pass to
        differentiate). Thread-safe, as ``predict``."""
        if self._training and not _MODE.eval:
            return self.forward(self.prepare_input(x)).copy()
        plans = _plans or _inference()
        out = plans.run(self, x) if type(x) is np.ndarray else None
        if out is None:
            x = self.prepare_input(x)
            out = plans.run(self, x) if type(x) is np.ndarray else None
            if out is None:
                out = self.forward(x).copy()
        return out

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_inference_plan", None)  # compiled code and per-thread buffers: rebuilt
        return state

    def _blas_cap(self, batch):
        """On the CPU, cap OpenBLAS's threads for this pass's products (:mod:`backprop.blas`:
        small products run faster on fewer threads); the token for ``blas.release``."""
        if not self._widest or type(batch) is not np.ndarray:
            return None
        largest = batch.shape[0] * self._widest
        if largest <= blas.SINGLE_THREADED_MACS:
            return None  # OpenBLAS runs these products on one thread by itself
        if gemm.runs(batch.dtype):
            return None  # MKL runs the Dense layers' products: OpenBLAS has none to run
        request = _MODE.autocast
        if request is not None and request.policy(batch) is not None:
            # mixed precision: the large products run on MKL; the float32 ones left are
            # small, and a second OpenBLAS thread spinning after them took the core from
            # MKL's and Numba's threads for the rest of the step
            return blas.acquire(blas.SINGLE_THREADED_MACS + 1)
        return blas.acquire(largest)

    def backward(self, grad, need_input_grad=False, from_logits=False):
        """Backward through every layer, last first, adding into each parameter's ``.grad``.

        ``∂L/∂X`` of the model's input is one more matrix product in the first layer, which
        training never needs (PyTorch computes it only for an input that requires a
        gradient): it is computed and returned only with ``need_input_grad=True`` (a model
        used as a block inside another, e.g. by ``Residual``, is asked for it); otherwise
        the result is None. ``from_logits=True``: ``grad`` is the gradient at the
        logits of a softmax output layer (what a loss paired with it computes, see
        :func:`backprop.losses.paired_output`), not at its output."""
        last = len(self.layers) - 1
        cap = self._blas_cap(grad)
        try:
            if from_logits:
                grad = self.layers[last].backward(
                    grad, need_input_grad=need_input_grad or last > 0, from_logits=True)
                last -= 1
            for i in range(last, -1, -1):
                grad = self.layers[i].backward(grad, need_input_grad=need_input_grad or i > 0)
        finally:
            blas.release(cap)
        return grad

    def output_shape(self, input_shape):
        for layer in self.layers:
            if input_shape is None:
                return None
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def summary(self, input_shape=None) -> str:
        """A table: layer, output shape and parameter count per layer, and the totals.

        ``input_shape`` (without the batch axis) defaults to ``(in_features,)``."""
        if input_shape is None and self.in_features is not None:
            input_shape = (self.in_features,)
        shape = None if input_shape is None else (None, *input_shape)
        rows = [("#", "Layer", "Output shape", "Params")]
        for i, layer in enumerate(self.layers):
            shape = None if shape is None else layer.output_shape(shape)
            name = repr(layer) if len(repr(layer)) <= 60 else repr(layer)[:59] + "…"
            rows.append((str(i), name, "?" if shape is None else str(shape),
                         f"{layer.num_parameters():,}"))
        w = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "-" * (sum(w) + 6)

        def fmt(r):
            return f"{r[0]:>{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}"
        buffers = sum(int(b.size) for _, b in self.named_buffers())
        params = self.parameters()
        dtype = params[0].dtype if params else "-"
        lines = [fmt(rows[0]), line, *map(fmt, rows[1:]), line,
                 f"Total params: {self.num_parameters():,} ({dtype})"
                 + (f"; non-trainable buffers: {buffers:,}" if buffers else "")]
        return "\n".join(lines)

    def graph(self, loss=None, input_shape=None, format: str = "text") -> str:
        """The computational graph: forward data flow node by node and the backward pass as
        its reverse traversal, each node with its equations, output shape (where known) and
        the tensors it keeps for backward. ``format="text"`` (default) returns the printable
        text of :func:`backprop.graph.describe`; ``format="dot"`` a Graphviz ``digraph``
        (:func:`backprop.graph.to_dot`: forward edges solid, gradient edges dashed;
        render with ``dot -Tsvg``). ``loss`` is a loss name or object; ``input_shape`` the
        input's shape without the batch axis (default: ``(in_features,)``)."""
        from backprop.graph import describe, to_dot

        if format == "text":
            return describe(self, loss=loss, input_shape=input_shape)
        if format == "dot":
            return to_dot(self, loss=loss, input_shape=input_shape)
        raise ValueError(f"graph format must be 'text' or 'dot'; got {format!r}")

    def per_sample_grad_norms(self, *args, **kwargs):
        """The L2 norm of each sample's own loss gradient over all parameters: see
        :func:`backprop.per_sample.per_sample_grad_norms`."""
        from backprop.per_sample import per_sample_grad_norms

        return per_sample_grad_norms(self, *args, **kwargs)

    def config(self) -> dict:
        return {"type": "Sequential", "layers": [layer.config() for layer in self.layers]}

    @classmethod
    def from_config(cls, cfg: dict):
        return cls([from_config(c) for c in cfg["layers"]])

    def __repr__(self) -> str:
        return f"Sequential([{', '.join(map(repr, self.layers))}])"

    # -- the Keras-style workflow, implemented in backprop.training and backprop.io ------------
    def fit(self, *args, **kwargs):
        """Train the model: see :func:`backprop.training.fit`."""
        from backprop import training

        return training.fit(self, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """Loss and metrics on a data set: see :func:`backprop.training.evaluate`."""
        from backprop import training

        return training.evaluate(self, *args, **kwargs)

    def predict(self, X, batch_size=None):
        """Outputs for a data set, batch by batch: see :func:`backprop.training.predict`."""
        return (_training or _training_module()).predict(self, X, batch_size)

    def save(self, path, *args, **kwargs):
        """Write a checkpoint: see :func:`backprop.io.save`."""
        from backprop import io

        return io.save(self, path, *args, **kwargs)

    def export_onnx(self, path, opset=None, **kwargs):
        """Write the inference graph as ONNX (``opset`` None: the default, 17): see
        :func:`backprop.onnx_export.export_onnx` (needs ``pip install 'backprop[onnx]'``)."""
        from backprop import onnx_export

        if opset is None:
            opset = onnx_export.DEFAULT_OPSET
        return onnx_export.export_onnx(self, path, opset, **kwargs)
