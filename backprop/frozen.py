"""Frozen models: an inference snapshot of a model, for serving.

``frozen = bp.freeze(model)`` copies the model (its structure, weights and running
statistics, on its device) in eval mode; ``frozen.predict(X)`` and ``frozen(x)`` compute what
``model.predict`` and ``model(x)`` computed at the moment of the freeze, whatever happens to
``model`` afterwards (training, ``load_state_dict``, ``model.to``). This is the contract of an
ONNX Runtime session or ``torch.jit.freeze``: the weights are fixed, so the inference plans
need not check them. A plan of a live model compares its packed weight panels with the
weights at every call (:mod:`backprop.inference`, the packed form: a read of the weights per
call, to see an in-place update); a frozen model's panels are packed once, on its first
large batch, and never checked again; and the route a batch size takes on a thread is chosen
and bound once, so that a later batch of that size runs on the checks of the input alone
(:func:`backprop.inference.run_frozen`).

Thread-safe, as ``predict``: any number of threads may call a frozen model at once (each
keeps its own buffers and panels). Its copy of the model is private: changing it (through
``frozen._model``) is outside the contract, and the packed form would not see the change.
Pickling a frozen model pickles its copy, frozen as it was.
"""
from __future__ import annotations

import copy

import numpy as np

from backprop import training

__all__ = ["FrozenModel", "freeze"]

FLAG = "_inference_frozen"
"""The attribute that marks a model as a frozen copy (read when its inference plan is
built, :class:`backprop.inference.Plan`)."""


class FrozenModel:
    """An inference snapshot of a model (see the module docstring); made by :func:`freeze`.

    ``predict(X, batch_size=None)``: :func:`backprop.training.predict` on the snapshot
    (``X`` checked for shape and NaN/inf before any work, a fresh array on the model's device);
    ``frozen(x)``: the snapshot's eval-mode call (no NaN check, as ``model(x)``)."""

    def __init__(self, model):
        self._model = _frozen_copy(model)

    def predict(self, X, batch_size=None):
        if batch_size is None and type(X) is np.ndarray:
            # the bound call of a batch size seen before (backprop.inference.run_frozen)
            out = (training._plans or training._inference()).run_frozen(self._model, X)
            if out is not None:
                return out
        return training.predict(self._model, X, batch_size)

    def __call__(self, x):
        return self._model(x)

    @property
    def in_features(self):
        """The snapshot's input features (``model.in_features``)."""
        return self._model.in_features

    def __repr__(self) -> str:
        return f"FrozenModel({self._model!r})"


def _frozen_copy(model):
    from backprop.layers import Layer

    if not isinstance(model, Layer):
        raise TypeError(f"freeze takes a backprop model (a Layer), not {type(model).__name__}")
    snapshot = copy.deepcopy(model)
    snapshot.eval()
    setattr(snapshot, FLAG, True)
    return snapshot


def freeze(model) -> FrozenModel:
    """An inference snapshot of ``model`` (see :mod:`backprop.frozen`): a private copy in
    eval mode, whose compiled inference plan never checks its weights for changes."""
    return FrozenModel(model)
