"""backprop.sklearn: scikit-learn's estimator checks, its conventions (pipelines, grid search,
pickling, labels, warm starts, partial_fit), and agreement with scikit-learn's own MLPs."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

import joblib  # noqa: E402  (a dependency of scikit-learn)
from sklearn import neural_network  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, load_iris, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.metrics import accuracy_score  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import backprop as bp  # noqa: E402
from backprop.sklearn import MLPClassifier, MLPRegressor, expected_failed_checks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:400] / 16.0, y[:400]


@pytest.fixture(scope="module")
def regression():
    X, y = make_regression(n_samples=150, n_features=5, noise=1.0, random_state=0)
    return X, y / 100.0


# ---------------------------------------------------------------------------------------
# scikit-learn's estimator checks (sklearn.utils.estimator_checks), every one of them. At
# max_iter=50 the checks that need a trained model (check_classifiers_train,
# check_regressors_train) pass; scikit-learn's own MLPs, like these, fail them at max_iter=3.
@parametrize_with_checks(
    [MLPClassifier(max_iter=50, random_state=0), MLPRegressor(max_iter=50, random_state=0),
     MLPClassifier(max_iter=50, random_state=0, dtype="float32"),
     MLPRegressor(max_iter=50, random_state=0, dtype="float32")],
    expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failed_checks_are_float32_only():
    assert expected_failed_checks(MLPClassifier()) == {}
    assert expected_failed_checks(MLPRegressor(dtype="float64")) == {}
    assert set(expected_failed_checks(MLPRegressor(dtype="float32"))) == \
        {"check_methods_subset_invariance"}


# ---------------------------------------------------------------------------------------
# The same objective and updates as scikit-learn: in float64, without shuffling, the
# weights and loss curves agree to rounding (initial weights, alpha's penalty with its
# per-batch divisor, both solvers, the learning-rate schedules, early stopping, tol).
def _parity_data(kind):
    X, y = load_iris(return_X_y=True)
    if kind == "multiclass":
        return neural_network.MLPClassifier, MLPClassifier, X, y
    if kind == "binary":
        return neural_network.MLPClassifier, MLPClassifier, X, y == 1
    if kind == "multilabel":
        Y = np.stack([y == 0, y == 2, X[:, 0] > 5.8], axis=1).astype(int)
        return neural_network.MLPClassifier, MLPClassifier, X, Y
    Xr, yr = make_regression(n_samples=150, n_features=5, n_targets=1 if kind == "regression"
                             else 3, noise=1.0, random_state=0)
    return neural_network.MLPRegressor, MLPRegressor, Xr, yr / 100.0


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression",
                                  "regression3"])
@pytest.mark.parametrize("solver,extra", [
    ("adam", {}),
    ("sgd", {}),
    ("sgd", {"learning_rate": "invscaling", "learning_rate_init": 0.2}),
    ("sgd", {"learning_rate": "adaptive", "nesterovs_momentum": False, "tol": 0.05,
             "n_iter_no_change": 1}),
])
def test_same_weights_and_loss_curve_as_scikit_learn(kind, solver, extra):
    if kind == "regression3" and extra.get("learning_rate") == "adaptive":
        pytest.skip("tol acts on loss_curve_, which scikit-learn reports as the mean over the "
                    "outputs and backprop.sklearn as their sum (see the module docstring)")
    theirs_cls, ours_cls, X, y = _parity_data(kind)
    params = dict(hidden_layer_sizes=(8, 6), solver=solver, alpha=0.05, batch_size=40,
                  learning_rate_init=0.01, max_iter=12, shuffle=False, random_state=3, tol=0.0)
    params.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = theirs_cls(**params).fit(X, y)
        ours = ours_cls(**params).fit(X, y)
    assert ours.model_[0].W.dtype == np.float64  # float64 X: float64, as scikit-learn
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    if kind != "regression3":  # scikit-learn reports the mean over outputs (module docstring)
        np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-12)
        assert ours.best_loss_ == pytest.approx(theirs.best_loss_, rel=1e-12)
    if kind.startswith("regression"):
        np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-10)
    else:
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-12)


@pytest.mark.parametrize("binary", [False, True])
def test_early_stopping_as_scikit_learn(digits, binary):
    X, y = digits
    y = y % 2 if binary else y
    params = dict(hidden_layer_sizes=(16,), early_stopping=True, n_iter_no_change=3,
                  max_iter=100, shuffle=False, random_state=1, alpha=0.01)
    theirs = neural_network.MLPClassifier(**params).fit(X, y)
    ours = MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 100
    assert ours.best_loss_ is None
    assert len(ours.validation_scores_) == ours.n_iter_
    np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_, atol=1e-12)
    assert ours.best_validation_score_ == max(ours.validation_scores_)
    # the weights of the best epoch are restored
    for a, b in zip(ours.coefs_, theirs.coefs_):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_tol_stops_training_without_a_warning(iris):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(8,), tol=1e-2, n_iter_no_change=2,
                            max_iter=500, random_state=0).fit(X, y)
    assert clf.n_iter_ < 500
    assert len(clf.loss_curve_) == clf.n_iter_ and clf.loss_ == clf.loss_curve_[-1]
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(3\)"):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)


# ---------------------------------------------------------------------------------------
# scikit-learn's tools
def test_pipeline_and_grid_search(iris):
    X, y = iris
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,),
                                                         learning_rate_init=0.01,
                                                         max_iter=100, random_state=0))
    assert pipe.fit(X, y).score(X, y) > 0.9
    grid = GridSearchCV(MLPClassifier(max_iter=60, learning_rate_init=0.01, random_state=0),
                        {"hidden_layer_sizes": [(4,), (16,)], "alpha": [1e-4, 1.0]}, cv=3)
    grid.fit(X, y)
    assert grid.best_params_["hidden_layer_sizes"] in [(4,), (16,)]
    assert grid.best_score_ > 0.85
    assert len(grid.cv_results_["mean_test_score"]) == 4
    assert isinstance(grid.best_estimator_, MLPClassifier)
    assert grid.score(X, y) > 0.85


def test_get_params_set_params_and_clone():
    clf = MLPClassifier(hidden_layer_sizes=(7, 3), alpha=0.5, solver="sgd", device="cpu",
                        dtype="float32")
    params = clf.get_params()
    assert params["hidden_layer_sizes"] == (7, 3) and params["alpha"] == 0.5
    assert params["dtype"] == "float32" and params["device"] == "cpu"
    assert set(params) >= {"hidden_layer_sizes", "activation", "solver", "alpha", "batch_size",
                           "learning_rate", "learning_rate_init", "power_t", "max_iter",
                           "shuffle", "random_state", "tol", "verbose", "warm_start",
                           "momentum", "nesterovs_momentum", "early_stopping",
                           "validation_fraction", "beta_1", "beta_2", "epsilon",
                           "n_iter_no_change"}
    assert clone(clf).get_params() == params
    assert clf.set_params(alpha=0.25, max_iter=9) is clf
    assert clf.get_params()["alpha"] == 0.25 and clf.max_iter == 9
    # names and defaults of scikit-learn's MLPClassifier, where they mean the same
    theirs = neural_network.MLPClassifier().get_params()
    ours = MLPClassifier().get_params()
    shared = set(theirs) & set(ours)
    assert set(theirs) - shared == {"max_fun"}  # an L-BFGS parameter
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_fitted_attributes(iris):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(5, 4), max_iter=5, random_state=0).fit(X, y)
    assert clf.n_features_in_ == 4 and clf.n_outputs_ == 3 and clf.n_layers_ == 4
    assert clf.out_activation_ == "softmax"
    assert [c.shape for c in clf.coefs_] == [(4, 5), (5, 4), (4, 3)]
    assert [b.shape for b in clf.intercepts_] == [(5,), (4,), (3,)]
    assert clf.n_iter_ == 5 and len(clf.loss_curve_) == 5 and clf.t_ == 5 * len(X)
    assert isinstance(clf.model_, bp.Sequential)
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])


# ---------------------------------------------------------------------------------------
# Labels and probabilities
def test_string_labels_binary_and_multiclass(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=80,
                        random_state=0).fit(X, names)
    np.testing.assert_array_equal(clf.classes_, ["setosa", "versicolor", "virginica"])
    pred = clf.predict(X)
    assert pred.dtype.kind == "U" and set(pred) <= set(clf.classes_)
    assert clf.score(X, names) == accuracy_score(names, pred) > 0.9
    binary = np.where(y == 0, "yes", "no")
    clf2 = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(X, binary)
    np.testing.assert_array_equal(clf2.classes_, ["no", "yes"])
    assert clf2.n_outputs_ == 1 and clf2.out_activation_ == "logistic"
    proba = clf2.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_array_equal(clf2.classes_[proba.argmax(axis=1)], clf2.predict(X))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_predict_proba_rows_sum_to_one(iris, n_classes):
    X, y = iris
    y = y if n_classes == 3 else (y == 2).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), n_classes) and proba.dtype == np.float64
    assert (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X))
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))
    assert clf.score(X, y) == accuracy_score(y, clf.predict(X))


def test_multilabel(iris):
    X, y = iris
    Y = np.stack([y == 0, y == 2, X[:, 0] > 0], axis=1).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=100,
                        random_state=0).fit(X, Y)
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    assert clf.predict(X).shape == Y.shape and clf.predict_proba(X).shape == Y.shape
    assert clf.score(X, Y) > 0.8  # subset accuracy


def test_multi_output_regression(regression):
    X, y = regression
    Y = np.column_stack([y, -2 * y])
    reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=200,
                       random_state=0).fit(X, Y)
    assert reg.n_outputs_ == 2 and reg.predict(X).shape == (len(X), 2)
    assert reg.score(X, Y) > 0.9
    single = MLPRegressor(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    assert single.predict(X).shape == (len(X),) and single.predict(X).dtype == np.float64


# ---------------------------------------------------------------------------------------
# Pickling
@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_pickle_and_joblib_round_trip(cls, iris, regression, tmp_path):
    X, y = iris if cls is MLPClassifier else regression
    est = cls(hidden_layer_sizes=(8,), max_iter=10, random_state=0).fit(X, y)
    data = pickle.dumps(est)
    # the network travels as config + state_dict: no layer, model or optimizer objects
    assert b"backprop.layers" not in data and b"backprop.model" not in data
    assert b"backprop.optim" not in data
    back = pickle.loads(data)
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    if cls is MLPClassifier:
        np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))
    assert back.get_params() == est.get_params() and back.loss_curve_ == est.loss_curve_
    joblib.dump(est, tmp_path / "est.joblib")
    loaded = joblib.load(tmp_path / "est.joblib")
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
    # the optimizer's state travels too: partial_fit continues identically
    est.partial_fit(X, y)
    loaded.partial_fit(X, y)
    for a, b in zip(loaded.coefs_ + loaded.intercepts_, est.coefs_ + est.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert loaded.t_ == est.t_ and loaded.loss_curve_ == est.loss_curve_
    # pickling does not disturb the original
    assert isinstance(est.model_, bp.Sequential)
    unfitted = pickle.loads(pickle.dumps(cls(alpha=0.3)))
    assert unfitted.alpha == 0.3 and not hasattr(unfitted, "model_")


def test_fit_predict_pickle_on_device(device, iris):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0,
                        device=str(device), dtype="float32").fit(X, y)
    assert isinstance(clf.predict_proba(X), np.ndarray)
    assert bp.get_array_module(clf.model_[0].W.data) is device.xp
    back = pickle.loads(pickle.dumps(clf))
    assert bp.get_array_module(back.model_[0].W.data) is device.xp
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))


def test_unpickling_without_the_device_rebuilds_on_the_cpu(iris):
    from backprop.backend import cuda_status

    if cuda_status()["available"]:
        pytest.skip("CUDA is available here: a network pickled on cuda:0 would load there")
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, y)
    state = clf.__getstate__()
    state["_model_device"] = "cuda:0"  # as if pickled on a GPU machine
    back = MLPClassifier.__new__(MLPClassifier)
    with pytest.warns(UserWarning, match="rebuilt on the CPU"):
        back.__setstate__(state)
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))


# ---------------------------------------------------------------------------------------
# Reproducibility, warm starts, partial_fit
def test_random_state_reproducibility(digits):
    X, y = digits
    a = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=7).fit(X, y)
    b = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=7).fit(X, y)
    c = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=8).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.loss_curve_ == b.loss_curve_ and a.loss_curve_ != c.loss_curve_
    # refitting the same estimator gives the same model again
    np.testing.assert_array_equal(a.fit(X, y).predict_proba(X), b.predict_proba(X))


def test_warm_start_continues(iris):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=10, warm_start=True,
                        random_state=0).fit(X, y)
    first = list(clf.loss_curve_)
    before = clf.coefs_[0].copy()
    clf.fit(X, y)
    assert clf.loss_curve_[:10] == first and len(clf.loss_curve_) == 20
    assert clf.n_iter_ == 10 and clf.t_ == 20 * len(X)
    assert clf.loss_curve_[10] < first[0]  # started from the trained weights
    assert not np.array_equal(clf.coefs_[0], before)
    with pytest.raises(ValueError, match="warm_start can only be used"):
        clf.fit(X[y < 2], y[y < 2])
    cold = MLPClassifier(hidden_layer_sizes=(8,), max_iter=10, random_state=0).fit(X, y)
    cold.fit(X, y)
    assert cold.loss_curve_ == first  # without warm_start, fit starts over


def test_partial_fit(iris):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(8,), learning_rate_init=0.01, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        clf.partial_fit(X, y)
    clf.partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])  # y needn't hold every class
    assert clf.n_outputs_ == 3 and clf.n_iter_ == 1
    for _ in range(30):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 1 and clf.t_ == 100 + 30 * len(X) and len(clf.loss_curve_) == 31
    assert clf.loss_curve_[-1] < clf.loss_curve_[1] and clf.score(X, y) > 0.8
    with pytest.raises(ValueError, match="not in `self.classes_`"):
        clf.partial_fit(X[:3], np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="is not the same as on last call"):
        clf.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="early_stopping"):
        MLPRegressor(early_stopping=True).partial_fit(X, y.astype(float))
    reg = MLPRegressor(hidden_layer_sizes=(8,), random_state=0)
    for _ in range(3):
        reg.partial_fit(X, y.astype(float))
    assert reg.n_iter_ == 1 and len(reg.loss_curve_) == 3


# ---------------------------------------------------------------------------------------
# Errors
def test_lbfgs_and_bad_parameters_raise_clear_errors(iris):
    X, y = iris
    with pytest.raises(ValueError, match="solver='lbfgs' is not supported.*'adam' or 'sgd'"):
        MLPClassifier(solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="solver='lbfgs' is not supported"):
        MLPRegressor(solver="lbfgs").fit(X, y.astype(float))
    for bad, match in [({"activation": "gelu"}, "'activation' parameter of MLPClassifier"),
                       ({"hidden_layer_sizes": (4, 0)}, "hidden_layer_sizes"),
                       ({"alpha": -1.0}, "'alpha'"), ({"batch_size": 0}, "'batch_size'"),
                       ({"max_iter": 0}, "'max_iter'"), ({"momentum": 1.5}, "'momentum'"),
                       ({"dtype": "int32"}, "'dtype'"), ({"shuffle": "yes"}, "'shuffle'"),
                       ({"learning_rate": "cosine"}, "'learning_rate'")]:
        with pytest.raises(ValueError, match=match):
            MLPClassifier(**bad).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes.*1 class"):
        MLPClassifier().fit(X, np.zeros(len(X)))


def test_sparse_input_is_refused(iris):
    sparse = pytest.importorskip("scipy.sparse")
    X, y = iris
    with pytest.raises(TypeError, match="dense data is required"):
        MLPClassifier(max_iter=2).fit(sparse.csr_matrix(X), y)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_diverging_training_raises_value_error(regression):
    X, y = regression
    with pytest.raises(ValueError, match="non-finite"):
        MLPRegressor(solver="sgd", learning_rate_init=1e6, max_iter=50,
                     random_state=0).fit(X * 1e3, y * 1e3)
