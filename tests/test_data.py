"""backprop.data: generators, the shipped digits, CSV loading, preprocessing, validation."""
from __future__ import annotations

import numpy as np
import pytest

from backprop import data
from backprop.data import DataError


def test_digits_shape_labels_and_pixels():
    X, y = data.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert sorted(np.unique(y).tolist()) == list(range(10))
    assert np.bincount(y).min() >= 170  # 174..183 images per digit
    assert X.min() == 0 and X.max() == 16 and np.all(X == np.round(X))
    # the first image is a zero: a ring of ink around an empty centre
    img = X[0].reshape(8, 8)
    assert y[0] == 0 and img[3:5, 3:5].sum() == 0 and img[:, 1:3].sum() > 0


def test_xor():
    X, y = data.xor()
    assert X.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert y.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("make, kwargs, classes", [
    (data.two_moons, {"n": 101, "noise": 0.1}, 2),
    (data.spirals, {"n": 100, "classes": 3, "noise": 0.2}, 3),
])
def test_classification_generators(make, kwargs, classes):
    X1, y1 = make(seed=3, **kwargs)
    X2, y2 = make(seed=3, **kwargs)
    X3, _ = make(seed=4, **kwargs)
    assert X1.shape == (kwargs["n"], 2) and X1.dtype == np.float32 and y1.dtype == np.int64
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(X1, X3)
    counts = np.bincount(y1)
    assert len(counts) == classes and counts.max() - counts.min() <= 1


def test_regression_generator():
    X, y = data.regression(n=50, features=3, targets=2, noise=0.0, seed=1)
    assert X.shape == (50, 3) and y.shape == (50, 2)
    Xb, yb = data.regression(n=50, features=3, targets=2, noise=0.0, seed=1)
    np.testing.assert_array_equal(y, yb)
    assert np.std(y) > 0.1


def test_split_partitions_rows_with_given_sizes():
    X = np.arange(100, dtype=np.float32).reshape(50, 2)
    y = np.arange(50)
    parts = data.train_val_test_split(X, y, (0.6, 0.2, 0.2), seed=0)
    assert [len(p[0]) for p in parts] == [30, 10, 10]
    rows = np.concatenate([p[1] for p in parts])
    assert sorted(rows.tolist()) == list(range(50))
    for Xp, yp in parts:  # rows stay paired with their labels
        np.testing.assert_array_equal(Xp[:, 0], 2 * yp)
    again = data.train_val_test_split(X, y, (0.6, 0.2, 0.2), seed=0)
    np.testing.assert_array_equal(again[0][1], parts[0][1])


def test_stratified_split_keeps_class_proportions():
    y = np.repeat([0, 1, 2], [60, 30, 10])
    X = np.zeros((100, 1), np.float32)
    (_, ytr), (_, yva) = data.train_val_test_split(X, y, (0.8, 0.2), seed=1, stratify=True)
    assert np.bincount(ytr).tolist() == [48, 24, 8]
    assert np.bincount(yva).tolist() == [12, 6, 2]


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.0,), (0.5, 0.0, 0.5)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        data.train_val_test_split(np.zeros((10, 1)), np.zeros(10), fractions)


def test_standardize_uses_train_statistics():
    train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    test = np.array([[5.0, 7.0]], np.float32)
    tr, te = data.standardize(train, test)
    np.testing.assert_allclose(tr, [[-1, 0], [1, 0]])  # constant column -> 0, not NaN
    np.testing.assert_allclose(te, [[3, 2]])           # (5-2)/1, (7-5)/1
    assert tr.dtype == np.float32
    s = data.Standardizer().fit(train)
    np.testing.assert_allclose(s.inverse_transform(s.transform(test)), test)


def _write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_load_csv_string_labels(tmp_path):
    path = _write(tmp_path, "a,b,kind\n1,2,cat\n3,4,dog\n5,6,cat\n")
    table = data.load_csv(path, target="kind")
    assert table.task == "classification" and table.classes == ["cat", "dog"]
    assert table.y.tolist() == [0, 1, 0] and table.feature_names == ["a", "b"]
    np.testing.assert_array_equal(table.X, [[1, 2], [3, 4], [5, 6]])


def test_load_csv_numeric_targets(tmp_path):
    path = _write(tmp_path, "x,y\n1,0.5\n2,1.25\n3,2.0\n")
    table = data.load_csv(path, target="y")
    assert table.task == "regression" and table.y.shape == (3, 1)
    path = _write(tmp_path, "x,label\n1,3\n2,7\n3,3\n", "c.csv")
    table = data.load_csv(path, target="label")
    assert table.task == "classification" and table.classes == ["3", "7"]
    assert table.y.tolist() == [0, 1, 0]
    features_only = data.load_csv(path)
    assert features_only.y is None and features_only.X.shape == (3, 2)


@pytest.mark.parametrize("text, match", [
    ("a,t\n1,0\n,1\n", r"row 3, column 'a': missing"),
    ("a,t\n1,0\nred,1\n", r"row 3, column 'a': 'red' is not a number"),
    ("a,t\n1,0\n2\n", "row 3 has 1 fields"),
    ("a,t\n1,0\n2,nan\n", r"row 3: the target column 't' holds 'nan', which is not a finite"),
    ("a,t\n1,0\n2,\n", r"row 3: the target column 't' is empty"),
])
def test_load_csv_errors_name_the_cell(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        data.load_csv(_write(tmp_path, text), target="t")


def test_load_csv_unknown_target(tmp_path):
    with pytest.raises(DataError, match="no column 'z'"):
        data.load_csv(_write(tmp_path, "a,b\n1,2\n"), target="z")


@pytest.mark.parametrize("cell", ["inf", "-Infinity", "1e999"])
def test_load_csv_rejects_infinite_values_naming_the_cell(tmp_path, cell):
    # float() accepts these; a model cannot train on them, so they are found at load time
    path = _write(tmp_path, f"a,b,t\n1,2,0\n3,{cell},1\n")
    with pytest.raises(DataError, match=r"row 3, column 'b': .* not a finite number"):
        data.load_csv(path, target="t")


def test_load_csv_non_utf8_names_file_byte_and_encoding(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("name,x,t\ncaf\u00e9,1,0\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        data.load_csv(path, target="t")
    text = str(info.value)
    assert str(path) in text and "UTF-8" in text
    assert "offset 12" in text and "line 2" in text and "0xe9" in text
    assert "latin-1" in text.lower() or "encoding" in text  # says how to read it anyway
    # with the right encoding the file loads (the bad cell is a string feature: DataError)
    with pytest.raises(DataError, match="'café' is not a number"):
        data.load_csv(path, target="t", encoding="latin-1")


def test_load_csv_skips_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfa,t\n1,0\n2,1\n")
    table = data.load_csv(path, target="t")
    assert table.feature_names == ["a"] and data.csv_columns(path) == ["a", "t"]


@pytest.mark.parametrize("text, kwargs, match", [
    ("a,a,t\n1,2,0\n", {"target": "t"}, "column 'a' appears 2 times"),
    ("t\n0\n1\n", {"target": "t"}, "no feature columns"),
    ("", {}, "empty"),
])
def test_load_csv_header_errors(tmp_path, text, kwargs, match):
    with pytest.raises(DataError, match=match):
        data.load_csv(_write(tmp_path, text), **kwargs)


def test_load_csv_value_too_large_for_float32(tmp_path):
    path = _write(tmp_path, "a,t\n1,0\n1e39,1\n")
    with pytest.raises(DataError, match=r"row 3, column 'a': .* too large for float32"):
        data.load_csv(path, target="t")
    assert data.load_csv(path, target="t", dtype="float64").X[1, 0] == 1e39


def test_load_csv_binary_and_utf16_files(tmp_path):
    binary = tmp_path / "model.npz"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="binary file"):
        data.load_csv(binary)
    wide = tmp_path / "wide.csv"
    wide.write_bytes("a,t\n1,0\n2,1\n".encode("utf-16"))  # with a byte order mark
    with pytest.raises(DataError, match="UTF-16"):
        data.load_csv(wide, target="t")
    assert data.load_csv(wide, target="t", encoding="utf-16").X.tolist() == [[1], [2]]


def test_csv_columns_reads_only_the_header(tmp_path):
    path = _write(tmp_path, " a , b,t\n1,2,x\n")
    assert data.csv_columns(path) == ["a", "b", "t"]
    with pytest.raises(DataError, match="empty"):
        data.csv_columns(_write(tmp_path, "", "e.csv"))


# ---------------------------------------------------------------------------------------
def test_validate_accepts_and_canonicalises():
    X = np.ones((4, 3), np.float32)
    _, y = data.validate(X, np.array([0.0, 1.0, 2.0, 1.0]), n_features=3, target="labels",
                         n_outputs=3)
    assert y.dtype == np.int64
    _, y = data.validate(X, np.arange(4.0), target="values", n_outputs=1)
    assert y.shape == (4, 1)


@pytest.mark.parametrize("X, y, kwargs, match", [
    (np.array([[1.0, np.nan]]), np.array([0]), {}, "NaN or inf .first at row 0"),
    (np.ones((3, 2)), np.array([0, 1]), {}, "3 rows but y has 2"),
    (np.ones((3, 2)), np.array([0, 1, 0]), {"n_features": 5}, "expects 5"),
    (np.ones((3, 2)), np.array([0, 1, 3]), {"target": "labels", "n_outputs": 3},
     r"in \[0, 3\) .* got labels in \[0, 3\]"),
    (np.ones((3, 2)), np.array([0, -1, 1]), {"target": "labels", "n_outputs": 3}, "labels"),
    (np.ones((2, 2)), np.array([0.5, 1.0]), {"target": "labels", "n_outputs": 2}, "whole"),
    (np.ones((2, 2)), np.array([0.0, 2.0]), {"target": "binary", "n_outputs": 1}, r"\[0, 1\]"),
    (np.ones((2, 2)), np.ones((2, 3)), {"target": "values", "n_outputs": 2}, r"\(N, 2\)"),
    (np.ones(3), None, {}, "2-D"),
    (np.ones((2, 2)), np.array([np.inf, 0.0]), {"target": "values"}, "y contains NaN or inf"),
])
def test_validate_errors(X, y, kwargs, match):
    with pytest.raises(DataError, match=match):
        data.validate(X, y, **kwargs)


def test_validate_on_device(xp):
    X = xp.asarray(np.ones((3, 2), np.float32))
    y = xp.asarray(np.array([0, 1, 5]))
    with pytest.raises(DataError, match="labels"):
        data.validate(X, y, target="labels", n_outputs=2)
    Xo, yo = data.validate(X, y % 2, target="labels", n_outputs=2)
    assert type(Xo) is type(X) and type(yo) is type(y)  # checked where they live


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_all_finite_row_sums_agree_with_isfinite(dtype, order):
    """The BLAS row-sum check (large matrices) against ``isfinite`` on NaN and ±inf at every
    kind of position (first, last, a lone one in a long row, the tail of a row that vector
    lanes would split), on finite values whose row sums overflow, and on the small and
    strided arrays that take ``isfinite`` directly."""
    rng = np.random.default_rng(3)
    n, k = 300, 257  # 257: a tail beyond any vector width
    assert n * k >= data.PRODUCT_CHECK_MIN_VALUES
    X = np.asarray(rng.standard_normal((n, k)), dtype=dtype, order=order)
    assert data.all_finite(X)
    positions = [(0, 0), (n - 1, k - 1), (n // 2, k - 1), (n - 1, 0), (17, 128)]
    positions += [tuple(p) for p in rng.integers(0, [n, k], size=(20, 2))]
    for bad in (np.nan, np.inf, -np.inf):
        for i, j in positions:
            Y = X.copy(order=order)
            Y[i, j] = bad
            assert not data.all_finite(Y), (bad, i, j)
    both = X.copy(order=order)
    both[5, 7], both[5, 9] = np.inf, -np.inf  # inf - inf: the sum is NaN, still caught
    assert not data.all_finite(both)
    huge = np.full((n, k), np.finfo(dtype).max / 4, dtype=dtype, order=order)
    assert np.isinf(huge @ np.ones(k, dtype)).all() and data.all_finite(huge)
    strided = X[:, ::2]
    assert data.all_finite(strided)
    Y = X.copy(order=order)
    Y[3, 4] = np.nan
    assert not data.all_finite(Y[:, ::2]) and data.all_finite(Y[:, 1::2])
    small = X[:4].copy()
    small[1, 2] = np.nan
    assert not data.all_finite(small)
