"""Checkpoints: one ``.npz`` file, written atomically, read without pickle.

Layout of the archive, format version 2 (every entry a plain NumPy array, read with
``allow_pickle=False``; the file is a zip archive that ``np.load`` opens)::

    __meta__        UTF-8 JSON as uint8: format name and version, library version, the
                    architecture (``model.config()``), epoch, the names of all entries, the
                    optimizer, scheduler and ``extra`` states with each array replaced by a
                    reference to its entry, and ``feature_names_in`` (the model's
                    ``feature_names_in_``, a list of str; only when it is not None)
    model/<name>    ``model.state_dict()``: parameters, buffers and counters (e.g. "0.W")
    optimizer/<n>   the arrays of ``optimizer.state_dict()`` (moments, buffers...), numbered
    scheduler/<n>   the arrays of ``scheduler.state_dict()``, if any, numbered
    extra/<n>       the arrays and NumPy scalars of ``extra``, numbered

Entries are numbered rather than named after their keys, so that no key can collide with
another (``{"a/b": x}`` beside ``{"a": {"b": y}}``) or with the format's own names. Arrays
are stored as NumPy, so a checkpoint written on the GPU loads on the CPU and back.
Version 1 files (entries named after their key path, no tuples) still load.

What ``extra`` holds (and what the optimizer and scheduler states may hold), nested up to
100 levels deep:

- ``dict`` with ``str`` keys (any str: "", "a/b", "__meta__", non-ASCII), ``list``, ``tuple``;
- ``None``, ``bool``, ``int`` (up to about 3900 digits), ``float`` (nan, ±inf and -0.0
  included), ``complex``, ``str`` (any, non-ASCII included);
- NumPy scalars and NumPy arrays (any shape, 0-d and empty included) of bool, integer,
  floating, complex or unicode dtype; CuPy arrays of those dtypes, stored as NumPy.

:func:`load_checkpoint` returns exactly what was saved, with the same types throughout:
dict key order, list vs tuple, bool vs int vs float, ``np.float32`` vs ``float``, 0-d arrays
as 0-d arrays, array dtypes (byte order included) and shapes. Arrays come back as
C-ordered NumPy arrays, and an object that appears twice comes back as two copies.
Anything else is a ``TypeError`` that names the key path (``extra['a']['b'][2]``): object,
bytes, structured and datetime arrays, ``bytes``, sets, subclasses of dict, list, tuple,
int, float or str (``OrderedDict``, enums), any other object, a dict key that is not a str.
A container that contains itself, nesting deeper than 100 levels, or a longer int is a
``ValueError``. ``extra`` itself may be any mapping (it loads back as a dict) or None.

Saving either succeeds completely or changes nothing. Everything is checked before the
first byte is written: the path (its directory must exist and it must not be a directory;
no directory is created), ``epoch``, ``extra``, and that the optimizer and scheduler can be
rebuilt by :func:`load_checkpoint` (the optimizer is rebuilt on all of the model's
parameters, the scheduler on that optimizer, each by its class name in ``backprop.optim``
and ``backprop.schedules``). Then the file is written to a uniquely named temporary file in
the destination's directory, fsynced, renamed over the destination with ``os.replace``
(atomic on POSIX and Windows), and the directory is fsynced (best effort). An exception
anywhere (a full disk, an interrupt) removes the temporary file and leaves the previous
checkpoint byte-for-byte as it was; only a killed process can leave a ``.<name>.*.tmp``
file behind, beside the untouched previous checkpoint.

The path is used exactly as given, on save and on load: no ``.npz`` is added (unlike
``np.savez``) or required. A symlink is followed, as ``np.save`` would write through it: its
target is replaced and the link stays. A hard link to the old file keeps the old content.

Permissions: a new file gets ``0o666 & ~umask``, as ``np.save`` would give it; a replaced
file keeps its permission bits (as ``np.save``, which rewrites the file in place, would
keep them), but the new file belongs to the user who saved it.

Threads and processes: ``save`` may run concurrently, to different paths or to the same
one: each save writes its own temporary file, the last rename wins, and every rename
installs a complete checkpoint (on Windows, ``os.replace`` fails while another process has
the destination open). ``save`` reads the model, optimizer, scheduler and ``extra``
while it runs and does not lock them: do not change them from another thread meanwhile.
The umask is read from ``/proc/self/status``; where that does not exist (not Linux) it is
read by setting and restoring it, which briefly applies umask 077 to files that other
threads of the process create. ``load`` and ``load_checkpoint`` only read and build new
objects, and are thread-safe.

Every way a file's content can be unreadable (empty, truncated, corrupted, CRC mismatch,
missing entries, malformed metadata, another format or version, an architecture this
version cannot build) raises :class:`CheckpointError`, and a failed load changes no
existing object. Errors opening the file are the usual ``OSError``\\ s
(``FileNotFoundError``, ``IsADirectoryError``, ``PermissionError``).
"""
from __future__ import annotations

import json
import numbers
import os
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "CheckpointError", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "backprop-checkpoint"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and the cause."""


# ---------------------------------------------------------------------------------------
# Nested states <-> (JSON, arrays). JSON holds dicts, lists, str, int, float, bool and None;
# everything else is a single-key dict whose key is one of these tags. A user's dict that
# has a single key equal to a tag is wrapped in {"__dict__": ...}, so it is never mistaken
# for one.
_TAGS = frozenset({"__array__", "__scalar__", "__tuple__", "__complex__", "__dict__"})
_DTYPE_KINDS = "biufcU"  # bool, signed and unsigned integer, float, complex, unicode
_MAX_DEPTH = 100  # the JSON stays well under the recursion limit of json.loads
_MAX_INT_BITS = 13_000  # about 3900 digits: under Python's int <-> str limit (4300 digits)
_ALLOWED = ("a checkpoint holds dicts with str keys, lists, tuples, None, bool, int, float, "
            "complex, str, and NumPy scalars and arrays of bool, integer, float, complex or "
            "unicode dtype")


class _Encoder:
    """Turns one nested state into JSON; its arrays go to ``arrays`` as ``<section>/<n>``.

    ``where`` is the key path of a value as a linked ``(parent, key)`` pair (the root: a
    str), spelt out only for an error message, so that large states cost no strings."""

    def __init__(self, section: str, arrays: dict):
        self.section, self.arrays, self.count, self.active = section, arrays, 0, set()

    def _add(self, array: np.ndarray, where, what: str) -> str:
        if array.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(_dtype_message(array.dtype, _spell(where), what))
        name = f"{self.section}/{self.count}"
        self.count += 1
        self.arrays[name] = array
        return name

    def __call__(self, obj, where, depth: int = 0):
        kind = type(obj)
        if obj is None or kind is bool or kind is float or kind is str:
            return obj
        if kind is int:
            if obj.bit_length() > _MAX_INT_BITS:
                raise ValueError(f"{_spell(where)} is an int of about "
                                 f"{int(obj.bit_length() * 0.30103)} digits; a checkpoint "
                                 "holds ints of up to about 3900 digits (Python's int/str "
                                 "conversion limit): store str(value)")
            return obj
        if kind is complex:
            return {"__complex__": [obj.real, obj.imag]}
        if kind is dict or kind is list or kind is tuple:
            if depth >= _MAX_DEPTH:
                raise ValueError(f"{_spell(where)} is nested deeper than {_MAX_DEPTH} levels; "
                                 "a checkpoint holds flatter states")
            if id(obj) in self.active:
                raise ValueError(f"{_spell(where)} contains itself (a reference cycle), which "
                                 "a checkpoint cannot hold: store a copy without the cycle")
            self.active.add(id(obj))
            try:
                if kind is not dict:
                    items = [self(v, (where, i), depth + 1) for i, v in enumerate(obj)]
                    return items if kind is list else {"__tuple__": items}
                out = {}
                for k, v in obj.items():
                    if type(k) is not str:
                        raise TypeError(
                            f"cannot store the key {k!r} ({_type_name(k)}) of {_spell(where)} "
                            "in a checkpoint: dict keys must be str; convert the keys with "
                            "str() (they load back as str)")
                    out[k] = self(v, (where, k), depth + 1)
                return {"__dict__": out} if len(out) == 1 and set(out) <= _TAGS else out
            finally:
                self.active.discard(id(obj))
        if isinstance(obj, np.generic):
            return {"__scalar__": self._add(np.asarray(obj), where, "a NumPy scalar")}
        if kind is np.ndarray:
            return {"__array__": self._add(np.array(obj, order="C"), where, "an array")}
        if _is_device_array(obj):
            from backprop.backend import to_numpy

            array = np.array(to_numpy(obj), order="C")
            return {"__array__": self._add(array, where, "an array")}
        raise TypeError(f"cannot store {_type_name(obj)} at {_spell(where)} in a checkpoint: "
                        f"{_ALLOWED}; {_hint(obj)}")


def _spell(where) -> str:
    """``"extra['a']['b'][2]"`` from the linked key path ``((("extra", "a"), "b"), 2)``."""
    keys = []
    while isinstance(where, tuple):
        where, key = where
        keys.append(f"[{key!r}]")
    return where + "".join(reversed(keys))


def _is_device_array(obj) -> bool:
    from backprop.backend import get_array_module

    return get_array_module(obj) is not np and all(
        hasattr(obj, a) for a in ("get", "shape", "dtype"))


def _type_name(obj) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"


def _hint(obj) -> str:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "decode it to str, or store np.frombuffer(value, dtype=np.uint8)"
    if isinstance(obj, (set, frozenset)):
        return "store it as a list, e.g. sorted(value)"
    if isinstance(obj, np.ma.MaskedArray):
        return "store np.ma.getdata(value) and np.ma.getmaskarray(value) as two arrays"
    if isinstance(obj, np.ndarray):
        return "convert it with np.asarray(value)"
    for base in (bool, int, float, complex, str, dict, list, tuple):
        if isinstance(obj, base):
            return f"convert it with {base.__name__}(value) (it loads back as {base.__name__})"
    if isinstance(obj, os.PathLike):
        return "convert it with str(value)"
    return "convert it to one of these"


def _dtype_message(dtype: np.dtype, where: str, what: str) -> str:
    if dtype.kind == "O":
        return (f"cannot store an object array (dtype object) at {where} in a checkpoint: "
                "it would need pickle to load; store a unicode or numeric array instead, "
                "e.g. np.asarray(values).astype(str)")
    hint = {"S": "decode it with value.astype(str)",
            "V": "store each field as an array of its own",
            "M": "store value.astype('int64') or value.astype(str)",
            "m": "store value.astype('int64') or value.astype(str)"}.get(dtype.kind, "")
    return (f"cannot store {what} of dtype {dtype} at {where} in a checkpoint: arrays must "
            f"have a bool, integer, float, complex or unicode dtype" + (f"; {hint}" if hint
                                                                       else ""))


class _Malformed(ValueError):
    """Metadata that this module did not write; turned into a CheckpointError by the caller."""


def _decode(obj, arrays: dict, where: str):
    """The value that ``_Encoder`` turned into ``obj`` (format version 2)."""
    kind = type(obj)
    if kind is list:
        return [_decode(v, arrays, (where, i)) for i, v in enumerate(obj)]
    if kind is dict:
        if len(obj) == 1 and set(obj) <= _TAGS:
            ((tag, value),) = obj.items()
            return _untag(tag, value, arrays, where)
        return {k: _decode(v, arrays, (where, k)) for k, v in obj.items()}
    if obj is None or kind in (bool, int, float, str):
        return obj
    raise _Malformed(f"{_spell(where)} holds a {kind.__name__}")


def _untag(tag: str, value, arrays: dict, where: str):
    if tag == "__dict__" and type(value) is dict:
        return {k: _decode(v, arrays, (where, k)) for k, v in value.items()}
    if tag == "__tuple__" and type(value) is list:
        return tuple(_decode(v, arrays, (where, i)) for i, v in enumerate(value))
    if tag == "__complex__" and type(value) is list and len(value) == 2 and \
            all(type(v) in (int, float) for v in value):
        return complex(*value)
    if tag in ("__array__", "__scalar__") and type(value) is str:
        if value not in arrays:
            raise _Malformed(f"{_spell(where)} refers to an entry {value!r} that is not in "
                             "the file")
        array = arrays[value]
        if tag == "__array__":
            return array
        if array.ndim == 0:
            return array[()]
        raise _Malformed(f"{_spell(where)}: the scalar entry {value!r} has shape "
                         f"{array.shape}")
    raise _Malformed(f"{_spell(where)}: malformed {tag} {value!r}")


def _join_v1(obj, arrays: dict):
    """The value that format version 1 stored as ``obj`` (its arrays named by key path)."""
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            if obj["__array__"] not in arrays:
                raise _Malformed(f"a reference to {obj['__array__']!r}, not in the file")
            return arrays[obj["__array__"]]
        return {k: _join_v1(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_v1(v, arrays) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------
def save(model, path, optimizer=None, epoch: int | None = None, scheduler=None,
         extra: dict | None = None) -> str:
    """Write ``model`` (architecture and weights) and optionally ``optimizer``'s state, the
    number of completed ``epoch``\\ s, ``scheduler``'s state and ``extra`` (a dict: see the
    module docstring for what it may hold) to ``path``, exactly that name. Returns ``path``
    as a str.

    Atomic: everything is checked first, then the file is replaced in one rename; any error
    leaves an existing file as it was. ``TypeError`` / ``ValueError`` for arguments that
    could not be saved or loaded back as given; ``FileNotFoundError`` when the directory
    does not exist; ``IsADirectoryError`` when ``path`` is a directory."""
    import backprop

    path = _fspath(path)
    target, mode = _destination(path)
    epoch = _check_epoch(epoch)
    if extra is None:
        extra = {}
    elif not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict (of what the module docstring of backprop.io "
                        f"lists) or None, got {_type_name(extra)}")
    _check_optimizer(model, optimizer)
    _check_scheduler(optimizer, scheduler)
    names = _feature_names(model)
    arrays: dict[str, np.ndarray] = {}
    weights = model.state_dict()
    for name, value in weights.items():
        arrays[f"model/{name}"] = _model_array(name, value)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": backprop.__version__,
        "model": model.config(),
        "weights": list(weights),
        "epoch": epoch,
        "optimizer": None if optimizer is None else
        _Encoder("optimizer", arrays)(optimizer.state_dict(), "optimizer.state_dict()"),
        "scheduler": None if scheduler is None else
        _Encoder("scheduler", arrays)(scheduler.state_dict(), "scheduler.state_dict()"),
        "extra": _Encoder("extra", arrays)(dict(extra), "extra"),
    }
    if names is not None:
        meta["feature_names_in"] = names
    meta["arrays"] = sorted(arrays)
    blob = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), dtype=np.uint8)
    _atomic_write(target, mode, lambda f: _write_npz(f, {_META: blob, **arrays}))
    return path


def _feature_names(model) -> list[str] | None:
    """``model.feature_names_in_`` as a list of str (None when the model has none)."""
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"model.feature_names_in_ must be None or a list of str (the columns "
                        f"of the DataFrame the model was fitted on), got {names!r}")
    return [str(n) for n in names]


def _fspath(path) -> str:
    if isinstance(path, (str, bytes, os.PathLike)):
        name = os.fsdecode(os.fspath(path))
        if name:
            return name
        raise ValueError("path is empty: give a file name such as 'model.npz'")
    raise TypeError(f"path must be a file name (str or os.PathLike), got {_type_name(path)}: "
                    "checkpoints are written to and read from named files only")


def _check_epoch(epoch):
    if epoch is None:
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"epoch must be an int (the number of completed epochs) or None, got "
                        f"{_type_name(epoch)} {epoch!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (the number of completed epochs), got {epoch}")
    return int(epoch)


def _model_array(name, value) -> np.ndarray:
    from backprop.backend import to_numpy

    array = np.asarray(to_numpy(value), order="C")
    if type(name) is not str or array.dtype.kind not in _DTYPE_KINDS:
        raise TypeError(f"model.state_dict() entry {name!r} ({array.dtype}) cannot be stored: "
                        "names must be str and arrays numeric")
    return array


def _check_optimizer(model, optimizer) -> None:
    """Refuse an optimizer that load_checkpoint could not rebuild as it is."""
    if optimizer is None:
        return
    from backprop import optim

    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be a backprop optimizer (e.g. bp.optim.Adam) or None, "
                        f"got {_type_name(optimizer)}")
    _check_class(optimizer, optim, "optimizer")
    own = {p.name: tuple(p.shape) for p in model.parameters()}
    theirs = {p.name: tuple(p.shape) for p in optimizer.params}
    if own == theirs:
        return
    if theirs.items() <= own.items():
        missing = sorted(set(own) - set(theirs))
        raise ValueError(f"the optimizer updates {len(theirs)} of the model's {len(own)} "
                         f"parameters (not {missing[:5]}), but load_checkpoint rebuilds it on "
                         "all of model.parameters(), so its state could not be restored: save "
                         "without optimizer=, or build the optimizer on model.parameters()")
    diff = sorted(set(own.items()) ^ set(theirs.items()))
    raise ValueError(f"the optimizer's parameters do not match the model's (names and shapes "
                     f"differ: {diff[:5]}): pass the optimizer that trains this model")


def _check_scheduler(optimizer, scheduler) -> None:
    """Refuse a schedule that load_checkpoint would drop or attach to another optimizer."""
    if scheduler is None:
        return
    from backprop import schedules

    if optimizer is None:
        raise ValueError("a scheduler cannot be saved without its optimizer: load_checkpoint "
                         "rebuilds the schedule on the restored optimizer; pass "
                         "optimizer=scheduler.optimizer too")
    while scheduler is not None:  # LinearWarmup's ``after`` is rebuilt the same way
        if not isinstance(scheduler, schedules._Schedule):
            raise TypeError(f"scheduler must be a backprop schedule (e.g. "
                            f"bp.schedules.StepLR) or None, got {_type_name(scheduler)}")
        _check_class(scheduler, schedules, "scheduler")
        if scheduler.optimizer is not optimizer:
            raise ValueError("the scheduler drives another optimizer than the one given as "
                             "optimizer=, but load_checkpoint rebuilds it on that one: pass "
                             "optimizer=scheduler.optimizer")
        scheduler = getattr(scheduler, "after", None)


def _check_class(obj, module, what: str) -> None:
    cls = type(obj)
    if getattr(module, cls.__name__, None) is not cls:
        raise TypeError(f"cannot save a {cls.__qualname__} as {what}=: load_checkpoint "
                        f"rebuilds the {what} by its class name from {module.__name__}, "
                        f"which has no {cls.__name__}; save without {what}=, and store "
                        f"{what}.state_dict() in extra instead")


def _destination(path: str, verb: str = "save", example: str = "model.npz",
                 not_regular: type = ValueError) -> tuple[str, int]:
    """The file to replace (symlinks followed) and the permission bits to give it; the
    errors say ``cannot {verb} to ...`` (also used by :mod:`backprop.onnx_export`)."""
    target = os.path.realpath(path)  # np.save writes through a symlink: so does save
    if os.path.isdir(target) or path.endswith(("/", os.sep)):  # "runs/" names a directory
        raise IsADirectoryError(f"cannot {verb} to {path!r}: it is a directory; give a file "
                                f"name such as {os.path.join(path, example)!r}")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise NotADirectoryError(f"cannot {verb} to {path!r}: {directory!r} is not a "
                                     "directory")
        raise FileNotFoundError(f"cannot {verb} to {path!r}: the directory {directory!r} does "
                                "not exist; create it first (os.makedirs(directory, "
                                "exist_ok=True))")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, 0o666 & ~_umask()
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(f"cannot {verb} to {path!r}: it exists and is not a regular file "
                          f"(a device, pipe or socket), which {verb} would replace")
    return target, stat.S_IMODE(st.st_mode)


_PROC_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask can only be read by setting it, and the umask belongs to the whole process:
    # between setting and restoring it, files that other threads create get the temporary
    # mask. Linux (4.7+) reports it in /proc/self/status, which reads it without a race;
    # elsewhere set-and-restore is the only way. The temporary mask is the strictest, so a
    # file created in that moment by another thread is never more open than intended; the
    # lock keeps concurrent saves from restoring each other's temporary value.
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _atomic_write(target: str, mode: int, write) -> None:
    """Replace ``target`` by a file with permission bits ``mode`` that ``write(f)`` fills
    (``f`` a binary file object): written beside it, flushed to disk, then renamed over it,
    so a failure leaves the previous file whole and no partial one behind."""
    directory, name = os.path.split(target)
    # mkstemp's name is unique (concurrent saves never share one); the target's name is cut
    # so that the temporary name fits the file system's limit whenever the target's does
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp made it 0600; set the mode before the fsync
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):  # Windows: only the read-only flag
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _write_npz(f, arrays: dict) -> None:
    """``np.savez(f, **arrays)``, but refusing to pickle, whatever the NumPy version."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, array in arrays.items():
            with z.open(key + ".npy", mode="w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)


def _fsync_directory(directory: str) -> None:
    # Makes the rename durable. The checkpoint is already in place: a file system that
    # cannot fsync a directory must not turn a completed save into an error.
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the model; the optimizer rebuilt on the model's
    parameters with its state (None if none was saved); the scheduler rebuilt on that
    optimizer with its state (None if none was saved); the number of completed epochs;
    ``extra``, exactly as saved; and ``meta`` (format and library versions, the architecture,
    the stored form of the states)."""

    model: object
    optimizer: object = None
    scheduler: object = None
    epoch: int | None = None
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError,
               UnicodeDecodeError, OSError, RecursionError)


def _read(path: str) -> tuple[dict, dict]:
    """``(meta, arrays)`` from ``path``, fully read and checked, or CheckpointError."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a checkpoint file: give the "
                                f"file's name, e.g. {os.path.join(path, 'model.npz')!r}")
    if not os.path.exists(path):
        hint = f"; there is a {path + '.npz'!r}: the name is used exactly as given" \
            if os.path.isfile(path + ".npz") else ""
        raise FileNotFoundError(f"no checkpoint at {path!r}{hint}")
    with open(path, "rb") as f:  # errors opening it (permissions...) are not about content
        try:
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
            if type(version) is not int or version not in _READABLE_VERSIONS:
                raise CheckpointError(
                    f"{path}: checkpoint format version {version!r} (written by backprop "
                    f"{meta.get('library_version')}), but this backprop reads versions "
                    f"{', '.join(map(str, _READABLE_VERSIONS))}; load it with the version "
                    "that wrote it")
            problem = _meta_problem(meta)
            if problem:
                raise CheckpointError(f"{path}: malformed checkpoint metadata ({problem}); "
                                      "the file was not written by backprop.io.save")
            missing = [k for k in meta["arrays"] if k not in names]
            if missing:
                raise CheckpointError(f"{path}: entries {missing[:5]} are missing; the file is "
                                      "incomplete")
            arrays = {k: archive[k] for k in meta["arrays"]}  # reads and CRC-checks each one
        except CheckpointError:
            raise
        except _UNREADABLE as exc:
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); the file is "
                "truncated or corrupted: use an earlier checkpoint or save it again") from exc
    return meta, arrays


def _meta_problem(meta: dict) -> str | None:
    def str_list(value):
        return type(value) is list and all(type(v) is str for v in value)

    if not str_list(meta.get("arrays")) or not str_list(meta.get("weights")):
        return "'arrays' and 'weights' must be lists of names"
    epoch = meta.get("epoch")
    if epoch is not None and (type(epoch) is not int or epoch < 0):
        return f"epoch {epoch!r} is not a number of epochs"
    if type(meta.get("model")) is not dict:
        return "no model architecture"
    if type(meta.get("extra", {})) not in (dict, type(None)):
        return "'extra' is not a dict"
    names = meta.get("feature_names_in")
    if names is not None and not str_list(names):
        return "'feature_names_in' is not a list of names"
    return None


def load_checkpoint(path, device=None) -> Checkpoint:
    """Read everything a checkpoint holds (see :class:`Checkpoint`); the model is built on
    ``device`` (default: the current device). ``path`` is used exactly as given. Raises
    :class:`CheckpointError` for content that cannot be read, ``OSError`` for a file that
    cannot be opened."""
    from backprop.backend import use_device, get_device

    path = _fspath(path)
    meta, arrays = _read(path)
    try:
        if meta["format_version"] == 1:
            optimizer_state, scheduler_state, extra = (
                _join_v1(meta.get(k), arrays) for k in ("optimizer", "scheduler", "extra"))
        else:
            optimizer_state, scheduler_state, extra = (
                _decode(meta.get(k), arrays, k) for k in ("optimizer", "scheduler", "extra"))
        extra = {} if extra is None else extra
        if type(extra) is not dict:
            raise _Malformed("'extra' is not a dict")
    except (_Malformed, RecursionError, TypeError) as exc:  # TypeError: an unhashable name
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({exc}); the file was "
                              "not written by backprop.io.save") from exc
    with use_device(device if device is not None else get_device()):
        try:
            model = _build_model(meta, arrays)
            if meta.get("feature_names_in") is not None:
                model.feature_names_in_ = list(meta["feature_names_in"])
            optimizer = scheduler = None
            if optimizer_state is not None:
                optimizer = _build_optimizer(model, optimizer_state)
            if scheduler_state is not None and optimizer is not None:
                scheduler = _build_scheduler(optimizer, scheduler_state)
        except CheckpointError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: the checkpoint's content does not fit this version of backprop "
                f"({type(exc).__name__}: {exc})") from exc
    return Checkpoint(model=model, optimizer=optimizer, scheduler=scheduler,
                      epoch=meta.get("epoch"), extra=extra, meta=meta)


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
