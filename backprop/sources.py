"""Data sources larger than memory, read batch by batch, and a background prefetch thread.

The contract of a :class:`DataSource` (what ``fit``'s data-parallel loop relies on):

- ``n_rows`` (int, or None for a source of unknown length), ``n_features`` (int) and
  ``random_access`` (bool).
- ``take(rows)``, random-access sources only: the rows with these int64 indices (any order,
  repeats allowed) as ``(X, y)`` NumPy arrays in exactly that order; ``X`` in the file's dtype
  (the caller casts it), ``y`` as stored, or None for a source without targets.
- ``chunks(chunk_rows)``: ``(X, y)`` chunks of ``chunk_rows`` consecutive rows in file order
  (the last one shorter), for validation passes and streaming.
- ``epoch_batches(batch_size, *, shuffle, seed, epoch, rank=0, world=1, drop_last=False)``:
  for every *global* batch of the epoch, this rank's share ``(X_local, y_local, global_rows)``.
  Random-access sources order the epoch as ``backprop.training.epoch_permutation(seed, epoch,
  n_rows)`` (``arange`` without shuffle), exactly as ``fit`` does in memory; global batch ``k``
  is ``order[k*B:(k+1)*B]``, the last one shorter unless ``drop_last``. Streaming sources read
  consecutive windows of ``shuffle_buffer`` rows and shuffle each window (with the fewer than
  ``B`` rows left over from the previous one) by a generator seeded with ``(seed, epoch)``,
  then cut global batches the same way; without shuffle their batches equal the random-access
  ones. A source holds no state between epochs: any epoch can be read again, in any order.

The share rule (:func:`share`): a global batch of ``m`` rows is split into ``world``
contiguous slices, rank 0 first; rank ``r`` gets ``m // world`` rows plus one when
``r < m % world``. A rank may get 0 rows (a batch smaller than ``world``); it then receives an
empty ``(0, n_features)`` ``X``. Random-access sources read only this rank's rows; streaming
sources read every row on every rank and keep their share (CSV rows cannot be found without
parsing the rows before them).

Threads: ``take``, ``chunks`` and ``epoch_batches`` of :class:`NpySource` and
:class:`ShardedNpySource` may run in any number of threads at once (a prefetch thread reading
batches while the main thread validates): every call opens the file itself and reads at
explicit offsets, so no file position or buffer is shared. Each pass of a
:class:`CSVSource` opens its own reader, so concurrent passes are independent too. A generator
returned by ``chunks``/``epoch_batches`` is, like any generator, for one thread at a time
(:class:`Prefetcher` runs one in its thread). :class:`IterableSource` is as thread-safe as the
iterable it is given. :class:`Prefetcher` has one consumer thread.

Memory: ``.npy`` files are read with ``os.preadv`` into fresh arrays, never memory-mapped: the
pages of a memory map that were read stay in the process's resident set (as RssFile) until
the kernel evicts them, so one shuffled epoch over a mapped file would grow the resident set
towards the file's size. Read pages stay in the OS page cache instead, which is not this
process's memory. A batch costs one read per run of consecutive rows (one per row in a
shuffled epoch) and two batch-sized arrays; an epoch also holds its order, 8 bytes per row.
A CSV pass holds ``chunk_rows`` rows of text and, when shuffling, ``shuffle_buffer`` rows of
numbers. :func:`validate_source` checks one chunk at a time.

Errors: unusable data (a missing file, wrong shapes, row counts that differ, NaN/inf, a
non-numeric CSV cell) raises :class:`backprop.data.DataError` naming the file and, where there
is one, the row; a bad argument raises ``TypeError``/``ValueError`` as everywhere in backprop.
Constructors check their files before returning, so a problem never costs a training run.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import math
import operator
import os
import queue
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backprop import checks
from backprop.distributed import share
from backprop.data import (DataError, _encoding_name, _float, _guess_encoding, _header,
                           _parse_number, validate)

__all__ = ["DataSource", "NpySource", "ShardedNpySource", "CSVSource", "IterableSource",
           "Prefetcher", "DataFileNotFoundError", "as_source", "share", "write_shards",
           "validate_source"]


class DataFileNotFoundError(FileNotFoundError, DataError):
    """A data file or directory that does not exist: a :class:`DataError` for code that
    catches data problems, and a ``FileNotFoundError`` for code that catches ``OSError``."""


# ---------------------------------------------------------------------------------------
# The base class
class DataSource:
    """Rows ``(X, y)`` read from somewhere else than memory; see the module docstring for the
    contract. A random-access subclass sets ``random_access = True`` and implements
    :meth:`take` (``chunks`` and ``epoch_batches`` are built on it); a streaming subclass
    implements :meth:`chunks` (``epoch_batches`` shuffles within ``shuffle_buffer`` rows read
    in chunks of ``chunk_rows``)."""

    n_rows: int | None = None
    n_features: int
    random_access: bool = False
    chunk_rows: int = 65536  # streaming: rows per read
    shuffle_buffer: int = 65536  # streaming: rows shuffled together

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows with indices ``rows`` (any order) as ``(X, y)``, in that order."""
        raise NotImplementedError(
            f"{type(self).__name__} streams its rows in order and cannot take rows by index "
            "(random_access is False); read it with chunks() or epoch_batches()")

    def chunks(self, chunk_rows: int):
        """``(X, y)`` chunks of ``chunk_rows`` consecutive rows in file order."""
        chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
        if not self.random_access:
            raise NotImplementedError(f"{type(self).__name__} must implement chunks()")
        return self._indexed_chunks(chunk_rows)

    def _indexed_chunks(self, chunk_rows):
        for lo in range(0, self.n_rows, chunk_rows):
            yield self.take(np.arange(lo, min(lo + chunk_rows, self.n_rows), dtype=np.int64))

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False) -> int | None:
        """The number of global batches of an epoch (None when ``n_rows`` is unknown)."""
        batch_size = checks.integer("batch_size", batch_size, minimum=1)
        if self.n_rows is None:
            return None
        return self.n_rows // batch_size if drop_last else -(-self.n_rows // batch_size)

    def epoch_batches(self, batch_size: int, *, shuffle: bool, seed: int | None, epoch: int,
                      rank: int = 0, world: int = 1, drop_last: bool = False):
        """For each global batch of ``epoch``, this rank's share ``(X_local, y_local,
        global_rows)`` (see the module docstring for the order and the share rule). The
        arguments are checked here, before the first batch is read."""
        plan = _Plan.check(batch_size, shuffle, seed, epoch, rank, world, drop_last)
        if self.random_access:
            return self._indexed_batches(plan)
        return self._streamed_batches(plan)

    def _indexed_batches(self, plan: _Plan):
        from backprop.training import epoch_permutation  # here: training will import us

        n, B = self.n_rows, plan.batch_size
        order = epoch_permutation(plan.seed, plan.epoch, n) if plan.shuffle else None
        stop = n - n % B if plan.drop_last else n
        for lo in range(0, stop, B):
            rows = order[lo:lo + B] if order is not None else \
                np.arange(lo, min(lo + B, n), dtype=np.int64)
            a, b = share(len(rows), plan.rank, plan.world)
            yield (*self.take(rows[a:b]), len(rows))

    def _streamed_batches(self, plan: _Plan):
        B = plan.batch_size
        rng = np.random.default_rng([plan.seed, plan.epoch]) if plan.shuffle else None
        window = self.shuffle_buffer if plan.shuffle else B
        carry = None
        for X, y in _rechunk(self.chunks(self.chunk_rows), window):
            if carry is not None:
                X, y = _concat([carry, (X, y)])
            if rng is not None:
                perm = rng.permutation(len(X))
                X, y = X[perm], _rows(y, perm)
            full = len(X) - len(X) % B
            for lo in range(0, full, B):
                yield plan.local(X[lo:lo + B], _rows(y, slice(lo, lo + B)))
            carry = (X[full:], _rows(y, slice(full, None))) if full < len(X) else None
        if carry is not None and not plan.drop_last:
            yield plan.local(*carry)


@dataclass(frozen=True)
class _Plan:
    """The checked arguments of one ``epoch_batches`` call."""

    batch_size: int
    shuffle: bool
    seed: int | None
    epoch: int
    rank: int
    world: int
    drop_last: bool

    @classmethod
    def check(cls, batch_size, shuffle, seed, epoch, rank, world, drop_last) -> _Plan:
        batch_size = checks.integer("batch_size", batch_size, minimum=1)
        shuffle, drop_last = checks.flag("shuffle", shuffle), checks.flag("drop_last", drop_last)
        if seed is None:
            if shuffle:
                raise ValueError("shuffle=True needs a seed (an integer >= 0): the epoch's "
                                 "order is a function of (seed, epoch)")
        else:
            seed = checks.integer("seed", seed, minimum=0)
        epoch = checks.integer("epoch", epoch, minimum=0)
        share(0, rank, world)  # checks rank and world
        return cls(batch_size, shuffle, seed, epoch, int(rank), int(world), drop_last)

    def local(self, X, y, copy: bool = True):
        """This rank's share of one global batch; ``copy`` so that it does not keep the
        window it was cut from alive."""
        m = len(X)
        a, b = share(m, self.rank, self.world)
        X, y = X[a:b], None if y is None else y[a:b]
        if copy:
            X, y = X.copy(), None if y is None else y.copy()
        return X, y, m


def _rows(y, index):
    return None if y is None else y[index]


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    X = np.concatenate([p[0] for p in parts])
    y = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return X, y


def _rechunk(chunks, size: int):
    """The rows of ``chunks`` regrouped into blocks of exactly ``size`` rows (the last one
    shorter), so that what a pass yields does not depend on how the source reads."""
    parts, have = [], 0
    for X, y in chunks:
        while len(X):
            n = min(size - have, len(X))
            parts.append((X[:n], _rows(y, slice(None, n))))
            X, y, have = X[n:], _rows(y, slice(n, None)), have + n
            if have == size:
                yield _concat(parts)
                parts, have = [], 0
    if parts:
        yield _concat(parts)


def _index_array(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"rows must be integer row indices; got an array of {rows.dtype}")
    if rows.ndim != 1:
        raise ValueError(f"rows must be a 1-D array of row indices; got shape {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        bad = rows[(rows < 0) | (rows >= n)][0]
        raise IndexError(f"row {bad} is out of range for a source of {n} rows (indices are "
                         f"0..{n - 1}; negative indices are not supported)")
    return rows


# ---------------------------------------------------------------------------------------
# .npy files, read with explicit reads
@dataclass(frozen=True)
class _NpyFile:
    """Where the rows of one C-ordered ``.npy`` array lie in its file."""

    path: str
    shape: tuple
    dtype: np.dtype
    offset: int  # bytes before row 0
    size: int  # the file's size when opened: a file rewritten later is refused

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])


def _open_npy(path, what: str) -> _NpyFile:
    """Read and check the header of the ``.npy`` file holding ``what`` (``X`` or ``y``)."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: no such file; give the path of the .npy file "
                                    f"holding {what} (written by np.save)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an .npy file; use ShardedNpySource for "
                        "a directory of shards") from None
    with f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except ValueError as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc}); write {what} with "
                            "np.save") from None
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
    if dtype.hasobject or dtype.kind not in "fiub":
        raise DataError(f"{path}: {what} has dtype {dtype}; expected numbers (integers, "
                        "floats or booleans) saved with np.save")
    if len(shape) == 0:
        raise DataError(f"{path}: {what} is a scalar; expected one row per sample")
    if fortran and len(shape) > 1:
        raise DataError(f"{path}: {what} is stored in Fortran (column) order, so its rows are "
                        "not contiguous in the file; re-save it with "
                        "np.save(path, np.ascontiguousarray(a))")
    npy = _NpyFile(path, tuple(int(s) for s in shape), dtype, offset, size)
    if npy.rows and npy.row_bytes == 0:
        raise DataError(f"{path}: {what} has shape {shape}, so its rows hold no values")
    if size < offset + npy.rows * npy.row_bytes:
        raise DataError(f"{path}: the file is truncated: its header promises {npy.rows} rows "
                        f"of {npy.row_bytes} bytes but it holds {size - offset} bytes of data; "
                        "write it again")
    return npy


def _check_x(npy: _NpyFile) -> None:
    if len(npy.shape) != 2:
        raise DataError(f"{npy.path}: X must be 2-D (samples, features), got shape "
                        f"{npy.shape}; save X.reshape(len(X), -1)")


def _check_y(xf: _NpyFile, yf: _NpyFile) -> None:
    if yf.rows != xf.rows:
        raise DataError(f"{yf.path}: y has {yf.rows} rows but X ({xf.path}) has {xf.rows}; "
                        "they must match, one target per sample")


_PREADV = hasattr(os, "preadv")


def _read_into(f, view: memoryview, offset: int, npy: _NpyFile) -> None:
    while len(view):
        if _PREADV:  # one system call, no shared file position
            n = os.preadv(f.fileno(), [view], offset)
        else:  # the file object is this call's own, so seeking is safe
            f.seek(offset)
            n = f.readinto(view)
        if not n:
            raise DataError(f"{npy.path}: the file ended early; was it truncated while being "
                            "read?")
        view, offset = view[n:], offset + n


def _read_rows(npy: _NpyFile, rows: np.ndarray, out: np.ndarray) -> None:
    """Read the rows ``rows`` (ascending, in range) of ``npy`` into ``out`` (C-contiguous,
    one row each), one read per run of consecutive rows."""
    if not len(rows):
        return
    try:
        f = open(npy.path, "rb", buffering=0)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{npy.path}: the file was removed after the source was "
                                    "opened") from None
    with f:
        if os.fstat(f.fileno()).st_size != npy.size:
            raise DataError(f"{npy.path}: the file changed size since the source was opened; "
                            "do not rewrite data files while they are read (open a new source)")
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((firsts, [len(rows)])))
        buf, rb, pos = memoryview(out.reshape(-1).view(np.uint8)), npy.row_bytes, 0
        for start, length in zip(rows[firsts].tolist(), lengths.tolist()):
            _read_into(f, buf[pos * rb:(pos + length) * rb], npy.offset + start * rb, npy)
            pos += length


class _NpyShards(DataSource):
    """Rows of one or more ``.npy`` files (shards) concatenated: the random-access reading
    shared by :class:`NpySource` and :class:`ShardedNpySource`."""

    random_access = True

    def _set_shards(self, xs: list[_NpyFile], ys: list[_NpyFile] | None, where) -> None:
        self._xs, self._ys = xs, ys
        self._starts = np.cumsum([0] + [f.rows for f in xs], dtype=np.int64)
        self.n_rows = int(self._starts[-1])
        self.n_features = xs[0].shape[1]
        self.dtype = xs[0].dtype
        if self.n_rows == 0:
            raise DataError(f"{where}: X has no rows; a data set needs at least one sample")

    def take(self, rows):
        rows = _index_array(rows, self.n_rows)
        ascending = bool(np.all(rows[1:] >= rows[:-1]))
        order = None if ascending else np.argsort(rows, kind="stable")
        rows_sorted = rows if ascending else rows[order]
        X = np.empty((len(rows), self.n_features), self.dtype)
        y = None if self._ys is None else \
            np.empty((len(rows), *self._ys[0].shape[1:]), self._ys[0].dtype)
        Xs, ys = (X, y) if ascending else (np.empty_like(X), None if y is None else
                                           np.empty_like(y))
        bounds = np.searchsorted(rows_sorted, self._starts)
        for s in np.flatnonzero(np.diff(bounds)).tolist():
            a, b = int(bounds[s]), int(bounds[s + 1])
            local = rows_sorted[a:b] - self._starts[s]
            _read_rows(self._xs[s], local, Xs[a:b])
            if y is not None:
                _read_rows(self._ys[s], local, ys[a:b])
        if not ascending:
            X[order] = Xs
            if y is not None:
                y[order] = ys
        return X, y


class NpySource(_NpyShards):
    """``X`` (and optionally ``y``) in ``.npy`` files written by ``np.save``, read row by row
    without loading or memory-mapping them (see the module docstring). ``X`` must be 2-D and
    numeric, in C order; ``y`` any numeric array with one row per row of ``X``."""

    def __init__(self, x_path, y_path=None):
        xf = _open_npy(x_path, "X")
        _check_x(xf)
        yf = None
        if y_path is not None:
            yf = _open_npy(y_path, "y")
            _check_y(xf, yf)
        self._set_shards([xf], None if yf is None else [yf], xf.path)

    def __repr__(self):
        return f"NpySource({self._xs[0].path!r}, n_rows={self.n_rows}, " \
               f"n_features={self.n_features})"


_SHARD = re.compile(r"([Xy])-(\d+)\.npy")


class ShardedNpySource(_NpyShards):
    """A directory of shards ``X-00000.npy, X-00001.npy, ...`` and, when there are targets,
    ``y-00000.npy, y-00001.npy, ...`` (one ``y`` shard per ``X`` shard, with as many rows);
    :func:`write_shards` writes one. Shard numbers count from 0 without gaps (write_shards
    writes five digits; any number is read; other files are ignored); the rows are the
    shards' rows in shard order. All ``X`` shards share the dtype and the number of features,
    all ``y`` shards the dtype and row shape. ``take`` reads each shard's requested rows from
    that shard."""

    def __init__(self, directory):
        directory = Path(directory)
        if not directory.exists():
            raise DataFileNotFoundError(f"{directory}: no such directory; give a directory of "
                                        "shards X-00000.npy, y-00000.npy, ... (write_shards "
                                        "writes one)")
        if not directory.is_dir():
            raise DataError(f"{directory}: is a file, not a directory of shards; use "
                            "NpySource for a single .npy file")
        found = {"X": {}, "y": {}}
        for entry in directory.iterdir():
            match = _SHARD.fullmatch(entry.name)
            if match:
                same = found[match[1]].setdefault(int(match[2]), entry)
                if same != entry:
                    raise DataError(f"{directory}: {same.name} and {entry.name} are both shard "
                                    f"{int(match[2])}; keep one")
        xs = [_open_npy(p, "X") for p in _numbered(directory, found["X"], "X")]
        for xf in xs:
            _check_x(xf)
        ys = None
        if found["y"]:
            ys = [_open_npy(p, "y") for p in _numbered(directory, found["y"], "y")]
            if len(ys) != len(xs):
                raise DataError(f"{directory}: {len(xs)} X shards but {len(ys)} y shards; give "
                                "one y shard per X shard, or none")
            for xf, yf in zip(xs, ys):
                _check_y(xf, yf)
        _check_alike(xs, "X", lambda f: (f.dtype, f.shape[1:]))
        if ys is not None:
            _check_alike(ys, "y", lambda f: (f.dtype, f.shape[1:]))
        self.directory = directory
        self._set_shards(xs, ys, directory)

    def __repr__(self):
        return f"ShardedNpySource({str(self.directory)!r}, shards={len(self._xs)}, " \
               f"n_rows={self.n_rows}, n_features={self.n_features})"


def _numbered(directory, shards: dict, what: str) -> list:
    if not shards:
        raise DataError(f"{directory}: no {what} shards ({what}-00000.npy, {what}-00001.npy, "
                        "...); write them with backprop.sources.write_shards")
    missing = sorted(set(range(len(shards))) - set(shards))
    if missing:
        raise DataError(f"{directory}: shard {what}-{missing[0]:05d}.npy is missing (shards "
                        f"are numbered from 0 without gaps; found {len(shards)} {what} shards)")
    return [shards[i] for i in range(len(shards))]


def _check_alike(files: list[_NpyFile], what: str, key) -> None:
    for f in files[1:]:
        if key(f) != key(files[0]):
            raise DataError(f"{f.path}: {what} has dtype {f.dtype} and rows of shape "
                            f"{f.shape[1:]}, but {files[0].path} has {files[0].dtype} and "
                            f"{files[0].shape[1:]}; every {what} shard must match")


def write_shards(directory, X, y=None, rows_per_shard: int = 65536) -> ShardedNpySource:
    """Write ``X`` (and ``y``) as shards ``X-00000.npy``, ``y-00000.npy``, ... of
    ``rows_per_shard`` rows (the last one shorter) into ``directory`` (created if needed; it
    must not hold shards already) and return the :class:`ShardedNpySource` reading them. ``X``
    may be a memory map: it is copied one shard at a time."""
    rows_per_shard = checks.integer("rows_per_shard", rows_per_shard, minimum=1)
    X = X if hasattr(X, "ndim") else np.asarray(X)
    if X.ndim != 2 or X.dtype.kind not in "fiub" or len(X) == 0:
        raise DataError(f"write_shards: X must be a non-empty 2-D numeric array (samples, "
                        f"features), got shape {X.shape} and dtype {X.dtype}")
    if y is not None:
        y = y if hasattr(y, "ndim") else np.asarray(y)
        if len(y) != len(X):
            raise DataError(f"write_shards: X has {len(X)} rows but y has {len(y)}; they must "
                            "match")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(_SHARD.fullmatch(p.name) for p in directory.iterdir()):
        raise DataError(f"{directory}: already holds shards; write into an empty directory "
                        "(mixing two data sets' shards would corrupt both)")
    for i, lo in enumerate(range(0, len(X), rows_per_shard)):
        np.save(directory / f"X-{i:05d}.npy", np.ascontiguousarray(X[lo:lo + rows_per_shard]))
        if y is not None:
            np.save(directory / f"y-{i:05d}.npy",
                    np.ascontiguousarray(y[lo:lo + rows_per_shard]))
    return ShardedNpySource(directory)


# ---------------------------------------------------------------------------------------
# CSV, streamed
class CSVSource(DataSource):
    """A CSV file with a header row, read in chunks of ``chunk_rows`` rows (streaming:
    ``random_access`` is False), with the conventions of :func:`backprop.data.load_csv`:
    ``target`` is a column name or index (None: features only), ``features`` the columns to
    use (default: every other column), features must be numeric and finite, ``encoding`` is
    the file's text encoding (a UTF-8 byte order mark is skipped), rows are numbered as in the
    file (the header is row 1) and blank lines are skipped.

    Targets must already be numbers, since a stream cannot see every class label before
    training: integer class indices ``0..K-1`` or float values. They arrive as
    ``target_dtype`` (default float64, which holds class indices exactly; ``fit``'s
    validation turns whole-number floats into int64 labels); ``target_dtype="int64"``
    refuses a target that is not a whole number. Map class names to indices beforehand, or
    use ``load_csv`` for a file that fits in memory. ``X`` has ``dtype`` (default: backprop's
    float dtype).

    ``n_rows`` is counted once, when the source is made, from the non-blank lines (a fast
    pass over the text); a file with line breaks inside quoted fields holds fewer rows than
    that, and ``n_rows`` is corrected at the end of the first full pass. ``epoch_batches``
    shuffles within windows of ``shuffle_buffer`` rows. The file is read again for every
    pass, by every rank.
    """

    def __init__(self, path, target: str | int | None = None, *, features=None,
                 chunk_rows: int = 8192, shuffle_buffer: int = 65536, delimiter: str = ",",
                 encoding: str = "utf-8", dtype=None, target_dtype="float64"):
        self.chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
        self.shuffle_buffer = checks.integer("shuffle_buffer", shuffle_buffer, minimum=1)
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {delimiter!r}")
        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise ValueError(f"encoding={encoding!r} is not a known text encoding (e.g. "
                             "'utf-8', 'cp1252', 'latin-1')") from None
        self.dtype = _float(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a float dtype for the features, got {self.dtype}")
        self.target_dtype = np.dtype(target_dtype)
        if self.target_dtype.kind not in "iuf":
            raise ValueError(f"target_dtype must be an integer or float dtype, got "
                             f"{self.target_dtype}")
        self.path, self.delimiter, self.encoding = os.fspath(path), delimiter, encoding
        self._check_file()
        header = self._read_header()
        self._width = len(header)
        self.target = self._target_name(header, target)
        self.features = self._feature_names(header, features)
        self._cols = [header.index(c) for c in self.features]
        self._tcol = None if self.target is None else header.index(self.target)
        self.n_features = len(self.features)
        self.n_rows = self._count_rows()
        if self.n_rows == 0:
            raise DataError(f"{self.path}: no data rows after the header")

    def __repr__(self):
        return f"CSVSource({self.path!r}, target={self.target!r}, n_rows={self.n_rows}, " \
               f"n_features={self.n_features})"

    # -- the header, checked by the constructor ------------------------------------------
    def _check_file(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(4096)
        except FileNotFoundError:
            raise DataFileNotFoundError(f"{self.path}: no such file; give the path of a CSV "
                                        "file with a header row") from None
        except IsADirectoryError:
            raise DataError(f"{self.path}: is a directory, not a CSV file") from None
        wide = codecs.lookup(self.encoding).name.startswith(("utf-16", "utf-32"))
        if not wide and b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{self.path}: holds NUL bytes, so it is a binary file, not CSV "
                            "text; give a CSV file with a header row")

    def _open(self):
        return open(self.path, newline="", encoding=self.encoding)

    def _read_header(self) -> list[str]:
        with self._open() as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            with self._errors(lambda: reader.line_num):
                first = next((row for row in reader if row), [])
        if first and first[0].startswith("\ufeff"):
            first[0] = first[0][1:]
        return _header(self.path, [first] if first else [])

    def _target_name(self, header, target):
        if target is None:
            return None
        if isinstance(target, bool) or not isinstance(target, (str, int)):
            raise TypeError(f"target must be a column name or index, got {target!r}")
        if isinstance(target, int):
            if not -len(header) <= target < len(header):
                raise DataError(f"{self.path}: target column index {target} is out of range "
                                f"for {len(header)} columns {header}")
            return header[target]
        if target not in header:
            raise DataError(f"{self.path}: no column {target!r}; columns are {header}")
        return target

    def _feature_names(self, header, features):
        if features is None:
            features = [h for h in header if h != self.target]
        features = list(features)
        if not features:
            raise DataError(f"{self.path}: no feature columns besides the target "
                            f"{self.target!r}; a model needs at least one input column")
        missing = [c for c in features if c not in header]
        if missing:
            raise DataError(f"{self.path}: feature columns {missing} not found; columns are "
                            f"{header}")
        return features

    def _count_rows(self) -> int:
        """Non-blank lines after the header, counted on the decoded text (which also finds
        undecodable text before training)."""
        lines, partial = 0, ""
        with self._open() as f, self._errors(lambda: lines):
            while block := f.read(1 << 20):
                parts = (partial + block).split("\n")
                partial = parts.pop()
                lines += len(parts) - parts.count("") - parts.count("\r")
        lines += 1 if partial.strip("\r") else 0
        return max(lines - 1, 0)

    @contextlib.contextmanager
    def _errors(self, line):
        """Turns a CSV syntax or decoding error into a DataError naming the row
        (``line()``: the number of lines read so far)."""
        try:
            yield
        except csv.Error as exc:
            raise DataError(f"{self.path}: row {line()}: not readable as CSV ({exc}); check "
                            f"the delimiter ({self.delimiter!r}) and quoting") from None
        except UnicodeDecodeError:
            raise self._decoding_error() from None

    def _decoding_error(self) -> DataError:
        """The error for the first byte of the file that ``encoding`` cannot decode, found
        again in the raw bytes (a text stream's error knows only its own buffer)."""
        decoder = codecs.getincrementaldecoder(self.encoding)()
        offset, lines = 0, 1
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                pending = decoder.getstate()[0]
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    data = exc.object
                    at = offset - len(pending) + exc.start
                    line = lines + data.count(b"\n", 0, exc.start)
                    return DataError(
                        f"{self.path}: byte 0x{data[exc.start]:02x} at offset {at} (line "
                        f"{line}) is not valid {_encoding_name(self.encoding)}; "
                        f"{_guess_encoding(block)}: re-save the file as UTF-8, or give its "
                        "encoding (CSVSource(..., encoding=...))")
                offset += len(block)
                lines += block.count(b"\n")
        return DataError(f"{self.path}: the file changed while it was read; do not rewrite "
                         "data files while they are read")

    # -- reading -------------------------------------------------------------------------
    def chunks(self, chunk_rows: int):
        """``(X, y)`` chunks of ``chunk_rows`` rows in file order (``y`` 1-D of
        ``target_dtype``, or None without a target column)."""
        chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
        return self._chunks(chunk_rows)

    def _chunks(self, chunk_rows):
        seen = 0
        with self._open() as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            with self._errors(lambda: reader.line_num):
                next((row for row in reader if row), None)  # the header
                rows, lines = [], []
                for row in reader:
                    if not row:
                        continue
                    if len(row) != self._width:
                        raise DataError(
                            f"{self.path}: row {reader.line_num} has {len(row)} fields but the "
                            f"header has {self._width}; check the delimiter "
                            f"({self.delimiter!r}) and quoting")
                    rows.append(row)
                    lines.append(reader.line_num)
                    if len(rows) == chunk_rows:
                        seen += len(rows)
                        yield self._convert(rows, lines)
                        rows, lines = [], []
                if rows:
                    seen += len(rows)
                    yield self._convert(rows, lines)
        self.n_rows = seen  # exact now, even with line breaks inside quoted fields

    def _convert(self, rows, lines):
        pick = operator.itemgetter(*self._cols)
        cells = [pick(r) for r in rows] if len(self._cols) > 1 else [[pick(r)] for r in rows]
        X = self._features(cells, lines)
        if self._tcol is None:
            return X, None
        return X, self._targets([r[self._tcol].strip() for r in rows], lines)

    def _features(self, cells: list, lines) -> np.ndarray:
        shape = (len(cells), self.n_features)
        try:  # all cells at C speed first; the slow path finds the bad cell and says why
            X64 = np.fromiter(map(float, itertools.chain.from_iterable(cells)), np.float64,
                              count=shape[0] * shape[1]).reshape(shape)
            fast = bool(np.isfinite(X64).all())
        except ValueError:
            fast = False
        if not fast:
            X64 = np.array([[_parse_number(v, self.path, line, name)
                             for v, name in zip(row, self.features)]
                            for row, line in zip(cells, lines)], dtype=np.float64)
        with np.errstate(over="ignore"):  # reported below, with the cell
            X = X64.astype(self.dtype)
        if not np.isfinite(X).all():
            i, j = np.argwhere(~np.isfinite(X))[0]
            raise DataError(f"{self.path}: row {lines[i]}, column {self.features[j]!r}: "
                            f"{float(X64[i, j])!r} is too large for {X.dtype}; rescale the "
                            "column or use dtype=np.float64")
        return X

    def _targets(self, raw: list[str], lines) -> np.ndarray:
        try:
            values = np.fromiter(map(float, raw), np.float64, count=len(raw))
            ok = bool(np.isfinite(values).all())
        except ValueError:
            ok = False
        if not ok:
            values = np.array([self._target_number(v, line) for v, line in zip(raw, lines)])
        if self.target_dtype.kind in "iu":
            whole = values == np.round(values)
            if not whole.all():
                i = int(np.argmin(whole))
                raise DataError(f"{self.path}: row {lines[i]}: the target column "
                                f"{self.target!r} holds {raw[i]!r}, which is not a whole "
                                f"number; target_dtype={self.target_dtype.name!r} reads class "
                                "indices (use a float target_dtype for values)")
        return values.astype(self.target_dtype)

    def _target_number(self, text: str, line: int) -> float:
        where = f"{self.path}: row {line}: the target column {self.target!r}"
        if text == "":
            raise DataError(f"{where} is empty; fill or drop rows without a target")
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where} holds {text!r}, which is not a number; CSVSource reads "
                            "numeric targets only (class indices 0..K-1 or values): map class "
                            "names to indices first, or use load_csv for a file that fits in "
                            "memory") from None
        if not math.isfinite(value):
            raise DataError(f"{where} holds {text!r}, which is not a finite number; fill or "
                            "drop rows without a usable target")
        return value


# ---------------------------------------------------------------------------------------
# Any iterable of batches
class IterableSource(DataSource):
    """Batches ``(X, y)`` (NumPy arrays, ``y`` may be None) from an iterable: each batch is
    one global batch. Give a callable that returns a fresh iterable (a generator function,
    say) to read more than one epoch; an iterator runs one epoch only, while a re-iterable
    object (a list) runs as many as asked. ``n_features`` is taken from the first batch
    unless given. ``epoch_batches`` yields the batches in the iterable's order (shuffling and
    seeding are the iterable's business); ``drop_last`` skips batches of fewer than
    ``batch_size`` rows; under ``world > 1`` each rank takes its :func:`share` of every
    batch, so every rank's iterable must yield the same batches. ``n_rows`` is None."""

    def __init__(self, make_iterable, *, n_features: int | None = None):
        if callable(make_iterable):
            self._make, self._iterator = make_iterable, None
        elif hasattr(make_iterable, "__iter__"):
            if iter(make_iterable) is make_iterable:  # an iterator: one pass only
                self._make, self._iterator = None, make_iterable
            else:
                self._make, self._iterator = (lambda: make_iterable), None
        else:
            raise TypeError(f"IterableSource needs an iterable of (X, y) batches or a callable "
                            f"returning one, got {type(make_iterable).__name__}")
        self._lock = threading.Lock()
        if n_features is not None:
            n_features = checks.integer("n_features", n_features, minimum=1)
        else:
            first_iter = self._fresh()
            first = next(first_iter, None)
            if first is None:
                raise DataError("IterableSource: the iterable yielded no batches")
            X, _ = _pair(first, 0)
            if X.ndim != 2:
                raise DataError(f"IterableSource: batch 0: X must be 2-D (samples, features), "
                                f"got shape {X.shape}")
            n_features = X.shape[1]
            self._iterator = _chain_first(first, first_iter)  # the first pass reuses it
        self.n_features = n_features

    def _fresh(self):
        with self._lock:
            iterator, self._iterator = self._iterator, None
            if iterator is None and self._make is None:
                raise DataError("IterableSource was given an iterator, which runs one epoch "
                                "only; pass a callable that returns a fresh iterable per "
                                "epoch (e.g. a generator function)")
        return iter(self._make()) if iterator is None else iterator

    def _batches(self):
        for i, batch in enumerate(self._fresh()):
            X, y = _pair(batch, i)
            if X.ndim != 2 or X.shape[1] != self.n_features:
                raise DataError(f"IterableSource: batch {i}: X must have shape (rows, "
                                f"{self.n_features}), got {X.shape}")
            if y is not None and len(y) != len(X):
                raise DataError(f"IterableSource: batch {i}: X has {len(X)} rows but y has "
                                f"{len(y)}; they must match")
            yield X, y

    def chunks(self, chunk_rows: int):
        chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
        return _rechunk(self._batches(), chunk_rows)

    def epoch_batches(self, batch_size: int, *, shuffle: bool, seed: int | None, epoch: int,
                      rank: int = 0, world: int = 1, drop_last: bool = False):
        # checked as for any source, so that callers need not know; the order is the
        # iterable's own
        plan = _Plan.check(batch_size, shuffle, seed, epoch, rank, world, drop_last)
        return (plan.local(X, y, copy=False) for X, y in self._batches()
                if not (plan.drop_last and len(X) < plan.batch_size))


def _pair(batch, i: int):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"IterableSource: batch {i} is a {type(batch).__name__}; expected a "
                        "pair (X, y) (y may be None)")
    X, y = batch
    X = X if hasattr(X, "ndim") else np.asarray(X)
    y = y if y is None or hasattr(y, "ndim") else np.asarray(y)
    return X, y


def _chain_first(first, rest):
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------
def as_source(obj) -> DataSource | None:
    """``obj`` as a :class:`DataSource`: a source is returned as is; a path to an ``.npy``
    file becomes an :class:`NpySource` (X only), a directory a :class:`ShardedNpySource`; a
    ``.csv`` path is refused (a CSV source needs its target column: construct
    :class:`CSVSource`). Anything else (arrays) returns None, for the caller to treat as
    data in memory."""
    if isinstance(obj, DataSource):
        return obj
    if not isinstance(obj, (str, os.PathLike)):
        return None
    path = Path(obj)
    if path.is_dir():
        return ShardedNpySource(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpySource(path)
    if suffix in (".csv", ".tsv", ".txt") or path.name.lower().endswith(".csv.gz"):
        raise DataError(f"{path}: a CSV file needs its target column: pass "
                        f"backprop.sources.CSVSource({str(path)!r}, target='COLUMN') (or "
                        "load_csv for a file that fits in memory)")
    if not path.exists():
        raise DataFileNotFoundError(f"{path}: no such file or directory; give an .npy file, "
                                    "a directory of shards or a DataSource")
    raise DataError(f"{path}: not a data source backprop can open by its name; give an .npy "
                    "file, a directory of .npy shards, or construct a DataSource (CSVSource "
                    "for CSV)")


def validate_source(source: DataSource, *, n_features: int | None = None, target: str = "any",
                    n_outputs: int | None = None, name: str = "training data",
                    chunk_rows: int = 65536, rank: int = 0, world: int = 1) -> int:
    """Check every row of ``source`` with :func:`backprop.data.validate` before training,
    one chunk of ``chunk_rows`` rows at a time (bounded memory), and return the number of
    rows. A NaN/inf is reported with its global row number (counting from 0); a problem
    ``validate`` finds otherwise names the rows of its chunk. Raises :class:`DataError`.

    ``rank``/``world``: check only chunks ``rank, rank + world, ...`` of a random-access
    source (each process of a data-parallel run checks its stripe; a streaming source is
    read, and checked, whole)."""
    if not isinstance(source, DataSource):
        raise TypeError(f"validate_source needs a DataSource, got {type(source).__name__}")
    share(0, rank, world)  # checks rank and world
    if source.random_access and world > 1:
        return _validate_stripe(source, n_features, target, n_outputs, name, chunk_rows,
                                rank, world)
    seen = 0
    for X, y in source.chunks(chunk_rows):
        if len(X) == 0:
            continue
        _check_chunk(X, y, seen, n_features, target, n_outputs, name)
        seen += len(X)
    if seen == 0:
        raise DataError(f"{name}: the source has no rows")
    return seen


def _validate_stripe(source, n_features, target, n_outputs, name, chunk_rows, rank, world):
    n = source.n_rows
    for k, lo in enumerate(range(0, n, chunk_rows)):
        if k % world != rank:
            continue
        X, y = source.take(np.arange(lo, min(lo + chunk_rows, n), dtype=np.int64))
        _check_chunk(X, y, lo, n_features, target, n_outputs, name)
    if n == 0:
        raise DataError(f"{name}: the source has no rows")
    return n


def _check_chunk(X, y, seen, n_features, target, n_outputs, name) -> None:
    if y is None and target != "any":
        raise DataError(f"{name}: the source has no targets (y), but training needs one "
                        "per row; give the source its y (a y file, y shards or a target "
                        "column)")
    _check_finite(X, "X", seen, name)
    if y is not None:
        _check_finite(y, "y", seen, name)
    validate(X, y, n_features=n_features, target=target, n_outputs=n_outputs,
             name=f"{name} (rows {seen}..{seen + len(X) - 1})")


def _check_finite(a: np.ndarray, what: str, offset: int, name: str) -> None:
    if a.dtype.kind != "f":
        return
    finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if not finite.all():
        row = offset + int(np.argmin(finite))
        raise DataError(f"{name}: {what} contains NaN or inf (first at row {row}, counting "
                        "from 0); clean or impute the data before training")


# ---------------------------------------------------------------------------------------
# Prefetching
_ITEM, _END, _ERROR = "item", "end", "error"
_POLL_S = 0.1  # how often a producer blocked on a full queue looks for close()
_names = itertools.count(1)


class Prefetcher:
    """Runs ``iterable`` ahead by up to ``depth`` items in a background (daemon) thread and
    yields its items in order: the reading of batch ``k + 1`` overlaps the training on batch
    ``k``. ``transfer`` (optional) is applied to every item in the thread (e.g. a host to
    device copy). An exception raised in the thread is raised again in the consumer at the
    item where it happened, as the same object: its type, message and traceback from the
    thread are kept (the consumer's frames are added). ``close()`` (also on leaving a
    ``with`` block, or when the Prefetcher is garbage collected) stops the thread: it
    returns once the item being produced, if any, is finished, and the iterable's
    ``close()`` has run in the thread (a generator's ``finally`` blocks). One consumer
    thread."""

    def __init__(self, iterable, depth: int = 2, *, transfer=None, name: str | None = None):
        depth = checks.integer("depth", depth, minimum=1)
        if transfer is not None and not callable(transfer):
            raise TypeError(f"transfer must be a callable applied to each item, got "
                            f"{type(transfer).__name__}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # the thread gets no reference to self, so that an abandoned Prefetcher is collected
        # and its finalizer stops the thread
        self.thread = threading.Thread(
            target=_produce, args=(iter(iterable), transfer, self._queue, self._stop),
            name=name or f"backprop-prefetch-{next(_names)}", daemon=True)
        self.thread.start()
        weakref.finalize(self, _release, self._stop, self._queue)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._get()
        if kind == _ITEM:
            return value
        self._done = True
        self.thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a result") from None

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread and drop the items it read ahead; wait up to ``timeout`` seconds
        (None: until the item being produced is finished)."""
        self._done = True
        _release(self._stop, self._queue)
        self.thread.join(timeout)
        _drain(self._queue)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _produce(iterator, transfer, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in iterator:
            if transfer is not None:
                item = transfer(item)
            if not _put(q, stop, (_ITEM, item)) or stop.is_set():
                return  # closed: do not read another item
        _put(q, stop, (_END, None))
    except BaseException as exc:  # everything goes to the consumer, which re-raises it
        _put(q, stop, (_ERROR, exc))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _put(q: queue.Queue, stop: threading.Event, message) -> bool:
    while not stop.is_set():
        try:
            q.put(message, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _release(stop: threading.Event, q: queue.Queue) -> None:
    stop.set()
    _drain(q)  # frees a producer blocked on a full queue at once
