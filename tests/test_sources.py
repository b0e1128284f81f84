"""backprop.sources: every source against the same data in memory (take, chunks, epoch
batches, rank shares), CSV chunking, bad inputs, the prefetch thread, and the resident set of
an epoch over a file much larger than the allowed growth."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from backprop.data import DataError, load_csv
from backprop.sources import (
    CSVSource, DataFileNotFoundError, DataSource, IterableSource, NpySource, Prefetcher,
    ShardedNpySource, as_source, share, validate_source, write_shards,
)
from backprop.training import epoch_permutation

N, F = 103, 5


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, F)).astype(np.float32)
    y = rng.integers(0, 4, N).astype(np.int64)
    return X, y


def write_csv(path, X, y=None, *, line_end="\n", blank_every=0, trailing_newline=True):
    """X (and y as column 'label') as CSV text; float32 values survive the round trip."""
    names = [f"f{j}" for j in range(X.shape[1])] + ([] if y is None else ["label"])
    lines = [",".join(names)]
    for i, row in enumerate(X):
        cells = [repr(float(v)) for v in row] + ([] if y is None else [str(int(y[i]))])
        lines.append(",".join(cells))
        if blank_every and i % blank_every == 0:
            lines.append("")
    text = line_end.join(lines) + (line_end if trailing_newline else "")
    path.write_text(text, newline="")
    return path


def make_source(kind, tmp_path, X, y):
    if kind == "npy":
        np.save(tmp_path / "X.npy", X)
        np.save(tmp_path / "y.npy", y)
        return NpySource(tmp_path / "X.npy", tmp_path / "y.npy")
    if kind == "sharded":  # uneven shards: 17 rows each, the last one 1 row
        return write_shards(tmp_path / "shards", X, y, rows_per_shard=17)
    if kind == "csv":
        return CSVSource(write_csv(tmp_path / "d.csv", X, y), target="label", chunk_rows=10,
                         shuffle_buffer=30, dtype=np.float32, target_dtype="int64")
    if kind == "iterable":
        return IterableSource(lambda: ((X[lo:lo + 10], y[lo:lo + 10])
                                       for lo in range(0, len(X), 10)))
    raise KeyError(kind)


RANDOM_ACCESS = ["npy", "sharded"]
ALL = ["npy", "sharded", "csv", "iterable"]


def epoch(source, batch_size, **kw):
    kw = {"shuffle": False, "seed": 0, "epoch": 0, **kw}
    return list(source.epoch_batches(batch_size, **kw))


def stacked(batches):
    X = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return X, y


# ---------------------------------------------------------------------------------------
# share
@pytest.mark.parametrize("m, world, sizes", [
    (10, 1, [10]), (10, 2, [5, 5]), (10, 3, [4, 3, 3]), (11, 3, [4, 4, 3]),
    (2, 3, [1, 1, 0]), (0, 2, [0, 0]), (1, 4, [1, 0, 0, 0]),
])
def test_share_gives_contiguous_slices_rank0_first_sizes_differing_by_one(m, world, sizes):
    slices = [share(m, r, world) for r in range(world)]
    assert [hi - lo for lo, hi in slices] == sizes
    assert slices[0][0] == 0 and slices[-1][1] == m
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))


@pytest.mark.parametrize("m, rank, world, error", [
    (4, 2, 2, ValueError), (4, -1, 2, ValueError), (4, 0, 0, ValueError),
    (-1, 0, 1, ValueError), (4.0, 0, 1, TypeError),
])
def test_share_refuses_bad_rank_world_or_size(m, rank, world, error):
    with pytest.raises(error):
        share(m, rank, world)


# ---------------------------------------------------------------------------------------
# take, chunks, epochs against memory
@pytest.mark.parametrize("kind", RANDOM_ACCESS)
@pytest.mark.parametrize("rows", [
    [5, 0, 102, 17, 16, 18, 5, 33], list(range(10, 40)), [], [102], list(range(N))[::-1],
], ids=["unsorted-repeats", "run-across-shards", "empty", "last", "reversed"])
def test_take_returns_exactly_the_requested_rows_in_order(kind, rows, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    Xt, yt = source.take(np.array(rows, dtype=np.int64))
    assert Xt.shape == (len(rows), F) and Xt.dtype == X.dtype and yt.dtype == y.dtype
    np.testing.assert_array_equal(Xt, X[rows])
    np.testing.assert_array_equal(yt, y[rows])


@pytest.mark.parametrize("kind", RANDOM_ACCESS)
def test_take_refuses_out_of_range_and_non_integer_rows(kind, tmp_path, data):
    source = make_source(kind, tmp_path, *data)
    with pytest.raises(IndexError, match="row 103 is out of range"):
        source.take(np.array([0, 103]))
    with pytest.raises(IndexError, match="row -1"):
        source.take(np.array([-1]))
    with pytest.raises(TypeError, match="integer row indices"):
        source.take(np.array([0.0, 1.0]))


@pytest.mark.parametrize("kind", ["csv", "iterable"])
def test_streaming_sources_refuse_take(kind, tmp_path, data):
    source = make_source(kind, tmp_path, *data)
    assert source.random_access is False
    with pytest.raises(NotImplementedError, match="cannot take rows by index"):
        source.take(np.array([0]))


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("chunk_rows", [1, 7, N, N + 50])
def test_chunks_are_consecutive_and_cover_the_data(kind, chunk_rows, tmp_path, data):
    X, y = data
    chunks = list(make_source(kind, tmp_path, X, y).chunks(chunk_rows))
    assert [len(c[0]) for c in chunks[:-1]] == [chunk_rows] * (len(chunks) - 1)
    assert 0 < len(chunks[-1][0]) <= chunk_rows
    Xc, yc = stacked(chunks)
    np.testing.assert_array_equal(Xc, X)
    np.testing.assert_array_equal(yc, y)


def expected_batches(X, y, B, *, shuffle, seed, epoch, drop_last=False):
    order = epoch_permutation(seed, epoch, len(X)) if shuffle else np.arange(len(X))
    stop = len(X) - len(X) % B if drop_last else len(X)
    return [(X[order[lo:lo + B]], y[order[lo:lo + B]]) for lo in range(0, stop, B)]


@pytest.mark.parametrize("kind", RANDOM_ACCESS)
@pytest.mark.parametrize("shuffle, drop_last", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("B", [1, 10, N, 500])
def test_random_access_epoch_is_fits_permutation_cut_into_batches(kind, shuffle, drop_last, B,
                                                                  tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    got = epoch(source, B, shuffle=shuffle, seed=3, epoch=2, drop_last=drop_last)
    want = expected_batches(X, y, B, shuffle=shuffle, seed=3, epoch=2, drop_last=drop_last)
    assert len(got) == len(want) == source.steps_per_epoch(B, drop_last)
    for (Xb, yb, rows), (Xw, yw) in zip(got, want):
        assert rows == len(Xw)
        np.testing.assert_array_equal(Xb, Xw)
        np.testing.assert_array_equal(yb, yw)


def test_streaming_epoch_without_shuffle_equals_the_random_access_one(tmp_path, data):
    X, y = data
    csv_batches = epoch(make_source("csv", tmp_path, X, y), 8)
    npy_batches = epoch(make_source("npy", tmp_path, X, y), 8)
    assert len(csv_batches) == len(npy_batches) == 13
    for a, b in zip(csv_batches, npy_batches):
        assert a[2] == b[2]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("B", [2, 10, 32])
def test_rank_shares_put_together_are_the_single_process_batch(kind, world, B, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    kw = {"shuffle": kind != "iterable", "seed": 5, "epoch": 1}
    whole = epoch(source, B, **kw)
    per_rank = [epoch(source, B, rank=r, world=world, **kw) for r in range(world)]
    assert all(len(batches) == len(whole) for batches in per_rank)
    for k, (Xw, yw, rows) in enumerate(whole):
        parts = [batches[k] for batches in per_rank]
        assert [p[2] for p in parts] == [rows] * world
        assert [len(p[0]) for p in parts] == \
            [hi - lo for lo, hi in (share(rows, r, world) for r in range(world))]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), Xw)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), yw)


@pytest.mark.parametrize("kind", ALL)
def test_a_rank_with_no_rows_in_a_batch_gets_empty_arrays(kind, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    B = 10 if kind == "iterable" else 2  # the iterable's batches have 10 rows, the last 3
    batches = epoch(source, B, shuffle=False, rank=3, world=4)
    last = batches[-1]
    assert last[2] == N % B and last[0].shape == (0, F) and last[0].dtype == X.dtype
    assert last[1].shape == (0,)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_skips_only_the_short_last_batch(kind, drop_last, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    batches = epoch(source, 10, shuffle=kind != "iterable", drop_last=drop_last)
    sizes = [b[2] for b in batches]
    assert sizes == [10] * 10 + ([] if drop_last else [3])
    assert source.steps_per_epoch(10, drop_last) == (None if kind == "iterable" else len(sizes))
    assert sum(len(b[0]) for b in batches) == sum(sizes)


@pytest.mark.parametrize("kind", ["npy", "sharded", "csv"])
def test_shuffle_depends_on_seed_and_epoch_only(kind, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)

    def order(seed, ep, shuffle=True):  # the rows' first features, all distinct
        batches = epoch(source, 16, shuffle=shuffle, seed=seed, epoch=ep)
        return np.concatenate([b[0][:, 0] for b in batches])

    first = order(1, 0)
    np.testing.assert_array_equal(first, order(1, 0))
    assert not np.array_equal(first, order(1, 1))
    assert not np.array_equal(first, order(2, 0))
    unshuffled = order(1, 0, shuffle=False)
    assert not np.array_equal(first, unshuffled)
    np.testing.assert_array_equal(np.sort(first), np.sort(unshuffled))  # every row once


@pytest.mark.parametrize("chunk_rows", [3, 30, N, 1000])
def test_csv_epoch_does_not_depend_on_chunk_rows(chunk_rows, tmp_path, data):
    X, y = data
    path = write_csv(tmp_path / "d.csv", X, y)
    reference = CSVSource(path, "label", chunk_rows=10, shuffle_buffer=40, dtype=np.float32)
    source = CSVSource(path, "label", chunk_rows=chunk_rows, shuffle_buffer=40,
                       dtype=np.float32)
    for a, b in zip(epoch(reference, 16, shuffle=True, seed=4),
                    epoch(source, 16, shuffle=True, seed=4), strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_csv_shuffle_mixes_rows_only_within_the_shuffle_buffer(tmp_path):
    X = np.arange(200, dtype=np.float32).reshape(-1, 1)
    source = CSVSource(write_csv(tmp_path / "d.csv", X, np.zeros(200)), "label",
                       shuffle_buffer=50, dtype=np.float32)
    batches = epoch(source, 50, shuffle=True, seed=9)
    for k, (Xb, _, _) in enumerate(batches):  # a window of 50 is exactly one batch of 50
        np.testing.assert_array_equal(np.sort(Xb[:, 0]), np.arange(50 * k, 50 * k + 50))
        assert not np.array_equal(Xb[:, 0], np.arange(50 * k, 50 * k + 50))


# ---------------------------------------------------------------------------------------
# CSV text
@pytest.mark.parametrize("variant", [
    {}, {"line_end": "\r\n"}, {"trailing_newline": False}, {"blank_every": 7},
    {"line_end": "\r\n", "blank_every": 5, "trailing_newline": False},
], ids=["plain", "crlf", "no-final-newline", "blank-lines", "crlf-blank-no-final"])
def test_csv_source_reads_what_load_csv_reads(variant, tmp_path, data):
    X, y = data
    path = write_csv(tmp_path / "d.csv", X, y, **variant)
    source = CSVSource(path, target="label", chunk_rows=8, dtype=np.float32)
    table = load_csv(path, target="label", dtype=np.float32)
    assert source.n_rows == N and source.n_features == F
    assert source.features == table.feature_names
    Xc, yc = stacked(list(source.chunks(8)))
    np.testing.assert_array_equal(Xc, table.X)
    np.testing.assert_array_equal(yc, y)
    assert yc.dtype == np.float64  # the default target_dtype


def test_csv_target_by_index_features_subset_and_no_target(tmp_path, data):
    X, y = data
    path = write_csv(tmp_path / "d.csv", X, y)
    by_index = CSVSource(path, target=-1, features=["f3", "f1"], dtype=np.float32)
    Xc, yc = stacked(list(by_index.chunks(50)))
    assert by_index.target == "label"
    np.testing.assert_array_equal(Xc, X[:, [3, 1]])
    no_target = CSVSource(path, dtype=np.float32)
    assert no_target.n_features == F + 1
    (Xn, yn), = no_target.chunks(1000)
    assert yn is None
    np.testing.assert_array_equal(Xn[:, -1], y)


def test_csv_row_count_is_corrected_by_a_pass_over_quoted_line_breaks(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('a,note,b\n1,"two\nlines",0\n2,plain,1\n', newline="")
    source = CSVSource(path, "b", features=["a"])
    assert source.n_rows == 3  # counted from the lines
    (Xc, yc), = source.chunks(10)
    np.testing.assert_array_equal(yc, [0, 1])
    assert source.n_rows == 2


def test_csv_utf8_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffa,b\n1,2\n".encode("utf-8"))
    assert CSVSource(path, "a").features == ["b"]


# ---------------------------------------------------------------------------------------
# Bad inputs
def npy_case(tmp_path, name):
    X = np.zeros((10, 3), np.float32)
    if name == "missing":
        return lambda: NpySource(tmp_path / "nope.npy")
    if name == "one-d":
        np.save(tmp_path / "X.npy", np.zeros(10))
    elif name == "y-rows":
        np.save(tmp_path / "X.npy", X)
        np.save(tmp_path / "y.npy", np.zeros(9))
        return lambda: NpySource(tmp_path / "X.npy", tmp_path / "y.npy")
    elif name == "fortran":
        np.save(tmp_path / "X.npy", np.asfortranarray(X))
    elif name == "truncated":
        np.save(tmp_path / "X.npy", X)
        raw = (tmp_path / "X.npy").read_bytes()
        (tmp_path / "X.npy").write_bytes(raw[:-5])
    elif name == "not-npy":
        (tmp_path / "X.npy").write_text("a,b\n1,2\n")
    elif name == "strings":
        np.save(tmp_path / "X.npy", np.array([["a", "b"]]))
    elif name == "no-rows":
        np.save(tmp_path / "X.npy", np.zeros((0, 3)))
    return lambda: NpySource(tmp_path / "X.npy")


@pytest.mark.parametrize("name, message", [
    ("missing", "nope.npy: no such file"),
    ("one-d", r"X must be 2-D \(samples, features\), got shape \(10,\)"),
    ("y-rows", "y has 9 rows but X .* has 10; they must match"),
    ("fortran", r"Fortran \(column\) order.*ascontiguousarray"),
    ("truncated", "truncated: its header promises 10 rows of 12 bytes"),
    ("not-npy", "not a readable .npy file"),
    ("strings", "has dtype <U1; expected numbers"),
    ("no-rows", "X has no rows"),
])
def test_npy_source_refuses_unusable_files_with_a_clear_message(name, message, tmp_path):
    with pytest.raises(DataError, match=message):
        npy_case(tmp_path, name)()


def test_missing_file_is_both_a_data_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        NpySource(tmp_path / "nope.npy")
    assert isinstance(info.value, DataError) and isinstance(info.value, DataFileNotFoundError)


def shard_case(tmp_path, name):
    d = tmp_path / "shards"
    X = np.zeros((10, 3), np.float32)
    if name == "missing-dir":
        return d
    d.mkdir()
    if name == "empty":
        return d
    np.save(d / "X-00000.npy", X)
    if name == "gap":
        np.save(d / "X-00002.npy", X)
    elif name == "features":
        np.save(d / "X-00001.npy", np.zeros((4, 2), np.float32))
    elif name == "dtype":
        np.save(d / "X-00001.npy", np.zeros((4, 3), np.float64))
    elif name == "y-count":
        np.save(d / "X-00001.npy", X)
        np.save(d / "y-00000.npy", np.zeros(10))
    elif name == "y-rows":
        np.save(d / "y-00000.npy", np.zeros(11))
    elif name == "twice":
        np.save(d / "X-0.npy", X)
    return d


@pytest.mark.parametrize("name, message", [
    ("missing-dir", "no such directory"),
    ("empty", r"no X shards \(X-00000.npy"),
    ("gap", "shard X-00001.npy is missing"),
    ("features", r"rows of shape \(2,\), but .*X-00000.npy has float32 and \(3,\)"),
    ("dtype", "has dtype float64 .* every X shard must match"),
    ("y-count", "2 X shards but 1 y shards"),
    ("y-rows", "y has 11 rows but X .* has 10"),
    ("twice", "X-00000.npy and X-0.npy are both shard 0|X-0.npy and X-00000.npy are both shard 0"),
])
def test_sharded_source_refuses_inconsistent_directories(name, message, tmp_path):
    with pytest.raises(DataError, match=message):
        ShardedNpySource(shard_case(tmp_path, name))


def test_sharded_source_accepts_x_shards_without_y(tmp_path, data):
    X, _ = data
    source = write_shards(tmp_path / "s", X, rows_per_shard=40)
    Xt, yt = source.take(np.array([80, 3, 41]))
    assert yt is None
    np.testing.assert_array_equal(Xt, X[[80, 3, 41]])


def test_write_shards_refuses_a_directory_that_holds_shards_or_unusable_arrays(tmp_path,
                                                                              data):
    X, y = data
    write_shards(tmp_path / "s", X, y, rows_per_shard=50)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(tmp_path / "s", X, y, rows_per_shard=50)
    with pytest.raises(DataError, match=r"non-empty 2-D numeric array .* got shape \(103,\)"):
        write_shards(tmp_path / "t", y)
    with pytest.raises(DataError, match="X has 103 rows but y has 102"):
        write_shards(tmp_path / "t", X, y[1:])


def test_a_file_rewritten_after_opening_is_refused_at_the_next_read(tmp_path, data):
    X, y = data
    source = make_source("npy", tmp_path, X, y)
    np.save(tmp_path / "X.npy", X[:50])
    with pytest.raises(DataError, match="changed size since the source was opened"):
        source.take(np.array([0]))


# one broken row per case: (row index, its text)
BAD_CSV_ROWS = {
    "late-word": (1400, "1400.5,seven,1"),
    "late-missing": (1200, "1200.5,NA,1"),
    "late-inf": (1300, "1300.5,inf,1"),
    "ragged": (900, "900.5,900"),
    "target-word": (1000, "1000.5,1000,cat"),
    "target-empty": (10, "10.5,10,"),
    "target-fraction": (20, "20.5,20,2.5"),
    "overflow": (30, "30.5,1e300,0"),
    "huge-field": (40, "40.5," + "1" * 200_000 + ",0"),
}


def csv_text(name, data_rows=1500):
    head = "a,b,label\n"
    rows = [f"{i}.5,{i},{i % 3}" for i in range(data_rows)]
    if name in BAD_CSV_ROWS:
        index, text = BAD_CSV_ROWS[name]
        rows[index] = text
    return head + "\n".join(rows) + "\n"


@pytest.mark.parametrize("name, message", [
    ("late-word", r"row 1402, column 'b': 'seven' is not a number"),
    ("late-missing", r"row 1202, column 'b': missing value 'NA'"),
    ("late-inf", r"row 1302, column 'b': 'inf' is not a finite number"),
    ("ragged", r"row 902 has 2 fields but the header has 3"),
    ("target-word", r"row 1002: the target column 'label' holds 'cat', which is not a number"),
    ("target-empty", r"row 12: the target column 'label' is empty"),
    ("target-fraction", r"row 22: .*'2.5', which is not a whole number"),
    ("overflow", r"row 32, column 'b': 1e\+300 is too large for float32"),
    ("huge-field", r"not readable as CSV \(field larger than field limit"),
])
def test_csv_cell_errors_name_the_file_row_and_column(name, message, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(csv_text(name))
    source = CSVSource(path, "label", chunk_rows=100, dtype=np.float32, target_dtype="int64")
    with pytest.raises(DataError, match=message):
        validate_source(source, chunk_rows=100)


@pytest.mark.parametrize("text, kwargs, error, message", [
    (None, {}, DataFileNotFoundError, "no such file"),
    ("", {}, DataError, "the file is empty"),
    ("a,b\n", {"target": "b"}, DataError, "no data rows after the header"),
    ("a,b\n1,2\n", {"target": "c"}, DataError, r"no column 'c'; columns are \['a', 'b'\]"),
    ("a,b\n1,2\n", {"target": 5}, DataError, "target column index 5 is out of range"),
    ("a\n1\n", {"target": "a"}, DataError, "no feature columns besides the target"),
    ("a,a\n1,2\n", {}, DataError, "column 'a' appears 2 times"),
    ("a,b\n1,2\n", {"features": ["z"]}, DataError, r"feature columns \['z'\] not found"),
    ("a,b\n1,2\n", {"chunk_rows": 0}, ValueError, "chunk_rows must be an integer >= 1"),
    ("a,b\n1,2\n", {"delimiter": ";;"}, ValueError, "delimiter must be one character"),
    ("a,b\n1,2\n", {"encoding": "klingon"}, ValueError, "not a known text encoding"),
    ("a,b\n1,2\n", {"target_dtype": "U3"}, ValueError, "integer or float dtype"),
    ("a,b\n1,2\n", {"dtype": np.int32}, ValueError, "dtype must be a float dtype"),
])
def test_csv_source_constructor_refuses_bad_files_and_arguments(text, kwargs, error, message,
                                                               tmp_path):
    path = tmp_path / "t.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=message):
        CSVSource(path, **kwargs)


@pytest.mark.parametrize("raw, message", [
    (b"a,b\n1,2\x00\x00\x00\n", "holds NUL bytes"),
    (b"a,b\n" + b"1,2\n" * 5 + "3,\u00e9\n".encode("cp1252"),
     r"byte 0xe9 at offset 26 \(line 7\) is not valid UTF-8; .*Windows-1252"),
])
def test_csv_source_refuses_binary_or_undecodable_files_before_reading(raw, message, tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        CSVSource(path, "a")


@pytest.mark.parametrize("kind", ["npy", "sharded"])
@pytest.mark.parametrize("what", ["X", "y"])
def test_validate_source_reports_a_late_nan_with_its_global_row(kind, what, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10_000, 4)).astype(np.float32)
    y = rng.standard_normal((10_000, 2)).astype(np.float32)
    (X if what == "X" else y)[9_876, 1] = np.nan
    source = make_source(kind, tmp_path, X, y) if kind == "npy" else \
        write_shards(tmp_path / "s", X, y, rows_per_shard=3000)
    with pytest.raises(DataError, match=rf"training data: {what} contains NaN or inf \(first at "
                                        r"row 9876, counting from 0\)"):
        validate_source(source, n_features=4, target="values", n_outputs=2, chunk_rows=1000)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_features": 6}, "X has 5 features per sample but the model's first layer expects 6"),
    ({"target": "labels", "n_outputs": 3}, r"class labels must be in \[0, 3\)"),
])
def test_validate_source_applies_validate_to_every_chunk(kwargs, message, tmp_path, data):
    source = make_source("sharded", tmp_path, *data)
    with pytest.raises(DataError, match=message):
        validate_source(source, chunk_rows=20, **kwargs)
    assert validate_source(source, target="labels", n_outputs=4, chunk_rows=20) == N


def test_validate_source_refuses_a_source_without_targets_for_a_loss_that_needs_them(tmp_path,
                                                                                     data):
    source = write_shards(tmp_path / "s", data[0], rows_per_shard=50)
    assert validate_source(source) == N
    with pytest.raises(DataError, match=r"the source has no targets \(y\)"):
        validate_source(source, target="values")


@pytest.mark.parametrize("call, error, message", [
    (lambda s: s.epoch_batches(0, shuffle=False, seed=0, epoch=0), ValueError, "batch_size"),
    (lambda s: s.epoch_batches(8, shuffle=True, seed=None, epoch=0), ValueError, "needs a seed"),
    (lambda s: s.epoch_batches(8, shuffle=1, seed=0, epoch=0), TypeError, "shuffle"),
    (lambda s: s.epoch_batches(8, shuffle=False, seed=0, epoch=-1), ValueError, "epoch"),
    (lambda s: s.epoch_batches(8, shuffle=False, seed=0, epoch=0, rank=2, world=2), ValueError,
     r"rank must be in \[0, world=2\)"),
    (lambda s: s.chunks(0), ValueError, "chunk_rows"),
])
@pytest.mark.parametrize("kind", ALL)
def test_bad_arguments_are_refused_before_the_first_batch(call, error, message, kind, tmp_path,
                                                          data):
    with pytest.raises(error, match=message):
        call(make_source(kind, tmp_path, *data))  # not iterated


# ---------------------------------------------------------------------------------------
# IterableSource
def test_iterable_source_callable_runs_many_epochs_an_iterator_one(data):
    X, y = data
    batches = [(X[:40], y[:40]), (X[40:], y[40:])]
    from_callable = IterableSource(lambda: iter(batches))
    from_list = IterableSource(batches)
    from_iterator = IterableSource(iter(batches))
    for source in (from_callable, from_list, from_iterator):
        assert source.n_features == F and source.n_rows is None
        assert [b[2] for b in epoch(source, 1000)] == [40, 63]
    assert [b[2] for b in epoch(from_callable, 1000)] == [40, 63]
    assert [b[2] for b in epoch(from_list, 1000)] == [40, 63]
    with pytest.raises(DataError, match="runs one epoch only"):
        epoch(from_iterator, 1000)


@pytest.mark.parametrize("batches, message", [
    ([], "yielded no batches"),
    ([np.zeros((4, 5))], "batch 0 is a ndarray; expected a pair"),
    ([(np.zeros(4), None)], r"batch 0: X must be 2-D"),
    ([(np.zeros((4, 5)), None), (np.zeros((4, 6)), None)], r"batch 1: X must have shape \(rows, 5"),
    ([(np.zeros((4, 5)), np.zeros(3))], "batch 0: X has 4 rows but y has 3"),
])
def test_iterable_source_refuses_malformed_batches(batches, message):
    with pytest.raises(DataError, match=message):
        epoch(IterableSource(lambda: iter(batches)), 4)


# ---------------------------------------------------------------------------------------
# as_source
def test_as_source_opens_paths_and_passes_sources_and_arrays_through(tmp_path, data):
    X, y = data
    source = make_source("npy", tmp_path, X, y)
    assert as_source(source) is source
    assert as_source(X) is None and as_source([[1.0]]) is None
    from_file = as_source(str(tmp_path / "X.npy"))
    assert isinstance(from_file, NpySource) and from_file.take(np.array([0]))[1] is None
    write_shards(tmp_path / "s", X, y, rows_per_shard=50)
    assert isinstance(as_source(tmp_path / "s"), ShardedNpySource)
    assert isinstance(source, DataSource)


@pytest.mark.parametrize("name, error, message", [
    ("d.csv", DataError, r"needs its target column: pass backprop.sources.CSVSource\("),
    ("missing.npy", DataFileNotFoundError, "no such file"),
    ("missing.bin", DataFileNotFoundError, "no such file or directory"),
    ("notes.md", DataError, "not a data source backprop can open by its name"),
])
def test_as_source_refuses_paths_it_cannot_open_alone(name, error, message, tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(error, match=message):
        as_source(tmp_path / name)


# ---------------------------------------------------------------------------------------
# Threads
@pytest.mark.parametrize("kind", RANDOM_ACCESS)
def test_take_from_many_threads_at_once_returns_each_threads_rows(kind, tmp_path, data):
    X, y = data
    source = make_source(kind, tmp_path, X, y)
    errors, start = [], threading.Barrier(4)

    def worker(seed):
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(200):
            rows = rng.integers(0, N, rng.integers(0, 40))
            Xt, yt = source.take(rows)
            if not (np.array_equal(Xt, X[rows]) and np.array_equal(yt, y[rows])):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_prefetcher_yields_every_item_in_order_with_transfer_applied_in_its_thread():
    seen_threads = set()

    def transfer(item):
        seen_threads.add(threading.current_thread().name)
        return item * 10

    with Prefetcher(iter(range(50)), depth=3, transfer=transfer, name="pf-test") as items:
        assert list(items) == [i * 10 for i in range(50)]
    assert seen_threads == {"pf-test"}
    assert not items.thread.is_alive() and items.thread.daemon


def test_prefetcher_reads_at_most_depth_items_ahead():
    produced = []

    def numbers():
        for i in range(1000):
            produced.append(i)
            yield i

    items = Prefetcher(numbers(), depth=2)
    assert next(items) == 0
    # the thread fills the queue (2) and holds one more, waiting for room
    assert wait_until(lambda: len(produced) == 4)
    time.sleep(0.3)
    assert len(produced) == 4
    items.close(timeout=10)
    assert not items.thread.is_alive()


def test_prefetcher_raises_the_threads_exception_at_its_position():
    def failing():
        yield 1
        yield 2
        raise DataError("row 7 is bad")

    items = Prefetcher(failing())
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(DataError, match="row 7 is bad") as info:
        next(items)
    frames = [entry.name for entry in info.traceback]
    assert "failing" in frames and "_produce" in frames  # the thread's own traceback
    with pytest.raises(StopIteration):
        next(items)
    assert not items.thread.is_alive()


def test_prefetcher_close_stops_the_thread_and_closes_the_generator_early():
    closed = threading.Event()

    def endless():
        try:
            for i in range(10**9):
                yield np.full(1000, i)
        finally:
            closed.set()

    generator = endless()  # still referenced here, so only close() can finish it
    items = Prefetcher(generator, depth=2)
    assert next(items)[0] == 0
    assert items.thread in threading.enumerate()
    items.close(timeout=10)
    assert not items.thread.is_alive() and closed.is_set()
    assert items.thread not in threading.enumerate()
    with pytest.raises(StopIteration):
        next(items)


@pytest.mark.parametrize("kwargs, error", [
    ({"depth": 0}, ValueError), ({"depth": 1.5}, TypeError), ({"transfer": 3}, TypeError),
])
def test_prefetcher_refuses_bad_arguments_without_starting_a_thread(kwargs, error):
    before = set(threading.enumerate())
    with pytest.raises(error):
        Prefetcher(iter([]), **kwargs)
    assert set(threading.enumerate()) - before == set()


def test_an_abandoned_prefetcher_stops_its_thread():
    items = Prefetcher(iter(range(10**9)), depth=1)
    next(items)
    thread = items.thread
    del items
    gc.collect()
    assert wait_until(lambda: not thread.is_alive())


@pytest.mark.parametrize("kind", ALL)
def test_prefetched_epoch_equals_the_direct_one(kind, tmp_path, data):
    source = make_source(kind, tmp_path, *data)
    kw = {"shuffle": kind != "iterable", "seed": 2, "epoch": 3, "rank": 1, "world": 2}
    with Prefetcher(source.epoch_batches(7, **kw)) as items:
        prefetched = list(items)
    direct = list(source.epoch_batches(7, **kw))
    assert len(prefetched) == len(direct) > 0
    for a, b in zip(prefetched, direct):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] == b[2]


# ---------------------------------------------------------------------------------------
# Memory
PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from backprop.sources import NpySource

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    source = NpySource(sys.argv[1])
    before, rows = peak(), 0
    for X, y, m in source.epoch_batches(1024, shuffle=True, seed=0, epoch=0):
        rows += len(X)
    print(rows, before, peak())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_shuffled_epoch_keeps_the_resident_set_far_below_the_file_size(tmp_path):
    n, f = 400_000, 128
    path = tmp_path / "big.npy"
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, f))
    for lo in range(0, n, 50_000):  # written in pieces: this process stays small as well
        X[lo:lo + 50_000] = lo
    X.flush()
    del X
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows, before, after = map(int, out.split())
    growth = after - before
    print(f"file {size / 2**20:.0f} MiB, peak resident set {before / 2**20:.1f} -> "
          f"{after / 2**20:.1f} MiB (growth {growth / 2**20:.1f} MiB, bound "
          f"{size / 5 / 2**20:.0f} MiB)")
    assert rows == n
    assert growth < size / 5
