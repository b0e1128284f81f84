"""``fit`` on data sources (backprop.sources): files read batch by batch by a prefetch thread
train exactly as the same rows in memory, bad rows are reported before the first step, and
the resident memory stays bounded by the batch, not the file."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import backprop as bp
from backprop import sources

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)


def data(n=101, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), rng.integers(0, classes, n)


def train(X, y=None, **kw):
    bp.manual_seed(1)
    model = bp.Sequential([bp.Dense(5, 16, activation="tanh", dtype="float64"),
                           bp.Dense(16, 3, dtype="float64")])
    options = dict(loss="cross_entropy", lr=0.01, epochs=3, batch_size=16, seed=3, verbose=0)
    options.update(kw)
    history = model.fit(X, y, **options)
    return model, history


def params(model):
    return [bp.to_numpy(p.data).copy() for p in model.parameters()]


@pytest.fixture
def files(tmp_path):
    X, y = data()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    return tmp_path, X, y


@pytest.mark.parametrize("kind", ["npy", "shards"])
def test_fit_from_files_equals_fit_in_memory(files, kind, device):
    # on a GPU (ci/gpu.sh) the batches go through the prefetch thread's pinned buffers
    tmp, X, y = files
    source = sources.NpySource(tmp / "X.npy", tmp / "y.npy") if kind == "npy" else \
        sources.write_shards(tmp / "shards", X, y, rows_per_shard=30)
    validation = (X[:20], y[:20])
    ref, href = train(X, y, validation_data=validation)
    got, hgot = train(source, validation_data=validation)
    for a, b in zip(params(ref), params(got)):
        np.testing.assert_array_equal(a, b)
    assert hgot.history["loss"] == href.history["loss"]
    assert hgot.history["val_accuracy"] == href.history["val_accuracy"]


def test_fit_from_a_csv_stream_without_shuffle_equals_the_rows_in_order(tmp_path):
    X, y = data()
    path = tmp_path / "d.csv"
    rows = [",".join(["a", "b", "c", "d", "e", "label"])]
    rows += [",".join([*(repr(float(v)) for v in x), str(int(t))]) for x, t in zip(X, y)]
    path.write_text("\n".join(rows) + "\n")
    ref, _ = train(X, y, shuffle=False)
    got, _ = train(sources.CSVSource(path, target="label", chunk_rows=7, dtype="float64"),
                   shuffle=False)
    for a, b in zip(params(ref), params(got)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_fit_from_an_iterable_trains_its_batches_in_its_order(device):
    X, y = data()

    def batches():
        for lo in range(0, len(X), 16):
            yield X[lo:lo + 16], y[lo:lo + 16]

    ref, _ = train(X, y, shuffle=False)
    got, hist = train(sources.IterableSource(batches))
    for a, b in zip(params(ref), params(got)):
        np.testing.assert_array_equal(a, b)
    assert hist.params["steps"] is None  # a stream of unknown length


def test_a_bad_row_deep_in_a_source_is_reported_before_any_step(files):
    tmp, X, y = files
    X[87, 3] = np.nan
    np.save(tmp / "X.npy", X)
    bp.manual_seed(1)
    model = bp.Sequential([bp.Dense(5, 3, dtype="float64")])
    before = params(model)
    with pytest.raises(bp.DataError, match=r"row 87"):
        model.fit(sources.NpySource(tmp / "X.npy", tmp / "y.npy"), loss="cross_entropy",
                  epochs=1, verbose=0)
    for a, b in zip(before, params(model)):
        np.testing.assert_array_equal(a, b)


def test_a_bad_batch_of_an_iterable_stops_training_with_its_message():
    X, y = data()

    def batches():
        yield X[:16], y[:16]
        yield X[16:32], np.full(16, 7)  # label 7 of a 3-class model

    model = bp.Sequential([bp.Dense(5, 3, dtype="float64")])
    with pytest.raises(bp.DataError, match="a batch read from the source"):
        model.fit(sources.IterableSource(batches), loss="cross_entropy", epochs=1, verbose=0)


def test_a_source_with_y_or_with_validation_split_is_refused(files):
    tmp, X, y = files
    source = sources.NpySource(tmp / "X.npy", tmp / "y.npy")
    model = bp.Sequential([bp.Dense(5, 3, dtype="float64")])
    with pytest.raises(ValueError, match="carries its own targets"):
        model.fit(source, y, loss="cross_entropy", verbose=0)
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(source, loss="cross_entropy", validation_split=0.2, verbose=0)
    with pytest.raises(bp.DataError, match="no targets"):  # a path: X only
        model.fit(str(tmp / "X.npy"), loss="cross_entropy", verbose=0)


def test_a_path_to_a_directory_of_shards_is_a_source(files):
    tmp, X, y = files
    sources.write_shards(tmp / "shards", X, y, rows_per_shard=40)
    ref, _ = train(X, y)
    got, _ = train(str(tmp / "shards"))
    for a, b in zip(params(ref), params(got)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.one_backend
def test_training_from_a_file_keeps_the_resident_set_bounded(tmp_path):
    """One epoch over a 195 MiB float32 file grows the peak resident set by a few MiB."""
    rows, features = 400_000, 128
    rng = np.random.default_rng(0)
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32,
                                  shape=(rows, features))
    for lo in range(0, rows, 50_000):
        X[lo:lo + 50_000] = rng.standard_normal((50_000, features), dtype=np.float32)
    X.flush()
    del X
    np.save(tmp_path / "y.npy", rng.integers(0, 4, rows))
    code = textwrap.dedent(f"""
        import numpy as np, backprop as bp
        from backprop.sources import NpySource

        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

        model = bp.Sequential([bp.Dense({features}, 32, activation="relu"), bp.Dense(32, 4)])
        Xw = np.random.default_rng(1).standard_normal((2048, {features})).astype("float32")
        model.fit(Xw, np.zeros(2048, dtype=int), loss="cross_entropy", epochs=1,
                  batch_size=1024, verbose=0)  # compile the kernels first
        before = peak()
        source = NpySource(r"{tmp_path / 'X.npy'}", r"{tmp_path / 'y.npy'}")
        history = model.fit(source, loss="cross_entropy", epochs=1, batch_size=1024,
                            seed=0, verbose=0)
        print(before, peak(), history.params["steps"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, steps = map(int, out.stdout.split())
    file_bytes = rows * features * 4
    print(f"file {file_bytes / 2**20:.0f} MiB: peak resident set grew by "
          f"{(after - before) / 2**20:.1f} MiB over one epoch of {steps} steps")
    assert steps == rows // 1024 + 1
    assert after - before < file_bytes / 10
