"""Checkpoints: one ``.npz`` file, written atomically, read without pickle.

Layout of the archive (every entry a plain NumPy array; ``allow_pickle=False`` on load):

    __meta__               UTF-8 JSON as uint8: format name and version, library version,
                           the architecture (``model.config()``), epoch, and the JSON parts
                           of the optimizer / scheduler / extra states
    model/<name>           ``model.state_dict()``: parameters and buffers (e.g. "0.W")
    optimizer/<key>        array parts of ``optimizer.state_dict()`` (moments, buffers, ...)
    scheduler/<key>        array parts of ``scheduler.state_dict()``, if any
    extra/<key>            array parts of ``extra`` (e.g. standardisation mean and std)

Arrays are stored as NumPy, so a checkpoint written on the GPU loads on the CPU and back.

Writing goes to a temporary file in the destination's directory (opened as a file object,
because ``np.savez`` appends ``.npz`` to names), which is flushed, fsynced, renamed over the
destination with ``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced.
A crash or an exception mid-write therefore leaves the previous checkpoint untouched.

Every way a file can be unreadable (empty, truncated, corrupted, CRC mismatch, missing
entries, another format or version, an architecture this version cannot build) raises
:class:`CheckpointError`, and a failed load changes no existing object.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "CheckpointError", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "backprop-checkpoint"
FORMAT_VERSION = 1
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the cause."""


# ---------------------------------------------------------------------------------------
# Nested states <-> (JSON, arrays)
def _split(obj, prefix: str, arrays: dict):
    """Replace every array in a nested dict/list by ``{"__array__": key}`` and collect the
    arrays under ``prefix/...`` keys; NumPy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        from backprop.backend import to_numpy

        arrays[prefix] = np.asarray(to_numpy(obj), order="C")  # keeps 0-d arrays 0-d
        return {"__array__": prefix}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint: states "
                    "may hold dicts, lists, numbers, strings, None and arrays only")


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------
def save(model, path, optimizer=None, epoch: int | None = None, scheduler=None,
         extra: dict | None = None) -> str:
    """Write ``model`` (architecture and weights) and optionally the optimizer state, the
    number of completed ``epoch``\\ s, the scheduler state and ``extra`` (a dict of JSON
    values and arrays) to ``path`` atomically. Returns the path written."""
    import backprop

    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    weights = model.state_dict()
    for name, value in weights.items():
        arrays[f"model/{name}"] = np.asarray(value, order="C")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": backprop.__version__,
        "model": model.config(),
        "weights": list(weights),
        "epoch": None if epoch is None else int(epoch),
        "optimizer": None if optimizer is None else
        _split(optimizer.state_dict(), "optimizer", arrays),
        "scheduler": None if scheduler is None else
        _split(scheduler.state_dict(), "scheduler", arrays),
        "extra": _split(dict(extra or {}), "extra", arrays),
    }
    meta["arrays"] = sorted(arrays)
    blob = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), dtype=np.uint8)
    _atomic_write(path, {_META: blob, **arrays})
    return path


def _atomic_write(path: str, arrays: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the model; the optimizer rebuilt on the model's
    parameters with its state (None if none was saved); the scheduler rebuilt on that
    optimizer with its state (None if none was saved); the number of completed epochs;
    ``extra``; and ``meta`` (format and library versions, the architecture)."""

    model: object
    optimizer: object = None
    scheduler: object = None
    epoch: int | None = None
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError,
               UnicodeDecodeError, OSError)


def _read(path: str) -> tuple[dict, dict]:
    """``(meta, arrays)`` from ``path``, fully read and checked, or CheckpointError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"PK\x03\x04":  # every .npz is a zip archive
                what = "the file is empty" if not magic else "not an .npz (zip) archive"
                raise CheckpointError(f"{path}: not a backprop checkpoint ({what}); use an "
                                      "earlier checkpoint or save it again")
            f.seek(0)
            archive = np.load(f, allow_pickle=False)
            names = set(archive.files)
            if _META not in names:
                raise CheckpointError(f"{path}: not a backprop checkpoint (no {_META} entry)")
            meta = json.loads(archive[_META].tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else meta
                raise CheckpointError(f"{path}: not a backprop checkpoint (format {found!r})")
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: checkpoint format version {version!r} (written by backprop "
                    f"{meta.get('library_version')}), but this backprop "
                    f"reads version {FORMAT_VERSION}; load it with the version that wrote it")
            missing = [k for k in meta["arrays"] if k not in names]
            if missing:
                raise CheckpointError(f"{path}: entries {missing[:5]} are missing; the file is "
                                      "incomplete")
            arrays = {k: archive[k] for k in meta["arrays"]}  # reads and CRC-checks each one
    except (CheckpointError, FileNotFoundError):
        raise
    except _UNREADABLE as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupted: use an earlier checkpoint or save it again") from exc
    return meta, arrays


def load_checkpoint(path, device=None) -> Checkpoint:
    """Read everything a checkpoint holds (see :class:`Checkpoint`); the model is built on
    ``device`` (default: the current device). Raises :class:`CheckpointError`."""
    from backprop.backend import use_device, get_device

    path = os.fspath(path)
    meta, arrays = _read(path)
    with use_device(device if device is not None else get_device()):
        try:
            model = _build_model(meta, arrays)
            optimizer = scheduler = None
            if meta.get("optimizer") is not None:
                optimizer = _build_optimizer(model, _join(meta["optimizer"], arrays))
            if meta.get("scheduler") is not None and optimizer is not None:
                scheduler = _build_scheduler(optimizer, _join(meta["scheduler"], arrays))
        except CheckpointError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: the checkpoint's content does not fit this version of backprop "
                f"({type(exc).__name__}: {exc})") from exc
    return Checkpoint(model=model, optimizer=optimizer, scheduler=scheduler,
                      epoch=meta.get("epoch"), extra=_join(meta.get("extra") or {}, arrays),
                      meta=meta)


def load(path, device=None):
    """The model stored at ``path`` (see :func:`load_checkpoint` for the full state)."""
    return load_checkpoint(path, device=device).model


def _build_model(meta: dict, arrays: dict):
    from backprop.layers import from_config

    model = from_config(meta["model"])
    weights = {name: arrays[f"model/{name}"] for name in meta["weights"]}
    model.load_state_dict(weights)
    return model


def _build_optimizer(model, state: dict):
    from backprop import optim

    kind = state.get("type")
    cls = getattr(optim, str(kind), None)
    if not isinstance(cls, type):
        raise CheckpointError(f"the checkpoint's optimizer type {kind!r} is unknown to "
                              "backprop.optim")
    optimizer = cls(model.parameters(), **state.get("hyper", {}))
    optimizer.load_state_dict(state)
    return optimizer


def _build_scheduler(optimizer, state: dict):
    from backprop import schedules

    kind = state.get("type")
    cls = getattr(schedules, str(kind), None)
    if not isinstance(cls, type):
        raise CheckpointError(f"the checkpoint's schedule type {kind!r} is unknown to "
                              "backprop.schedules")
    kwargs = dict(state["config"])
    if state.get("after") is not None:  # LinearWarmup's follower, rebuilt first
        kwargs["after"] = _build_scheduler(optimizer, state["after"])
    scheduler = cls(optimizer, **kwargs)
    scheduler.load_state_dict(state)
    return scheduler
