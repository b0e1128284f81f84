"""scikit-learn estimators: :class:`MLPClassifier` and :class:`MLPRegressor`, trained by
backprop's ``fit`` and usable wherever scikit-learn takes an estimator (``Pipeline``,
``GridSearchCV``, ``cross_val_score``, ``joblib.dump``)::

    from backprop.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=50, random_state=0)
    clf.fit(X_train, y_train).score(X_test, y_test)

Needs scikit-learn >= 1.6 (``pip install 'backprop[sklearn]'``); ``import backprop`` does not
import this module.

Contract (scikit-learn's conventions)
-------------------------------------
- The constructor stores its arguments and nothing else; ``get_params``/``set_params``/
  ``clone`` work as for any scikit-learn estimator. Arguments are checked in ``fit``
  (``ValueError`` naming the parameter).
- ``fit(X, y)`` trains from scratch (with ``warm_start=True``: from the weights of the
  previous fit, with a fresh optimizer, as scikit-learn does) and returns ``self``.
  ``partial_fit(X, y[, classes])`` runs one epoch and keeps the optimizer's state between
  calls; ``classes`` is required on the first call of a classifier.
- ``X`` is checked and converted by :func:`sklearn.utils.validation.validate_data` (arrays,
  lists, DataFrames; sets ``n_features_in_`` and ``feature_names_in_``). Classifier labels
  may be any sortable values (strings too): binary, multiclass, or multilabel (an indicator
  matrix).
- Fitted attributes, as scikit-learn's: ``classes_``, ``n_features_in_``, ``n_outputs_``,
  ``n_layers_``, ``out_activation_``, ``loss_``, ``loss_curve_``, ``best_loss_``,
  ``validation_scores_``, ``best_validation_score_``, ``t_`` (samples seen), ``n_iter_``
  (epochs of the last ``fit``), ``coefs_`` / ``intercepts_`` (copies in scikit-learn's
  layout: ``coefs_[i]`` is ``(fan_in, fan_out)``); and ``model_``, the trained
  :class:`backprop.Sequential` (``summary()``, ``graph()``, :func:`backprop.save`...).
- ``random_state``: an int makes ``fit`` deterministic (same weights, same predictions). It
  draws what scikit-learn draws, in its order: the initial weights (``_init_coef``: the
  same seed gives scikit-learn's initial weights) and the ``early_stopping`` split (the same
  split); then the seed of the epoch shuffles, which are backprop's permutations of
  ``(seed, epoch)``, not scikit-learn's: with ``shuffle=True`` the batches differ.
- Convergence as scikit-learn: ``n_iter_no_change`` epochs without a training-loss
  decrease (``early_stopping=False``) or validation-score increase (``True``; the best
  weights are restored at the end) of at least ``tol`` stop training (or, for
  ``solver="sgd", learning_rate="adaptive"``, divide the learning rate by 5); reaching
  ``max_iter`` first warns with a ``ConvergenceWarning``.
- dtype: ``dtype=None`` computes as scikit-learn does, in float32 when ``X`` is float32
  and in float64 otherwise; ``dtype="float32"`` (backprop's usual dtype: half the memory,
  faster on GPUs) or ``"float64"`` fixes it. ``device`` (None: :func:`backprop.get_device`
  when fitting; ``"cpu"``, ``"cuda"``, ``"cuda:N"``) is where the network trains and
  predicts; inputs and outputs are NumPy arrays. ``predict_proba`` and the regressor's
  ``predict`` return float64.
- Pickling (``pickle``, ``joblib.dump``) stores the network as its ``config()`` and
  ``state_dict()`` (plain dicts and NumPy arrays) and the optimizer as its ``state_dict()``,
  never layer objects (they hold per-thread state). Unpickling rebuilds both on the device
  the network was on (on the CPU, with a warning, when that device is missing here), so
  predictions round-trip exactly and ``partial_fit`` continues where it stopped. backprop's
  own checkpoints (:func:`backprop.save`) stay pickle-free: pickling is the user's choice.

The objective, term by term (scikit-learn's definition)
-------------------------------------------------------
scikit-learn's stochastic solvers minimise, on a batch of ``B`` rows,

    data loss (mean over the rows)  +  (alpha / (2 B)) · Σ_layers ‖W‖²

(weight matrices only, not intercepts; ``B`` is the batch's own row count, so the last,
smaller batch of an epoch has a larger penalty), and ``loss_curve_`` is the rows-weighted
mean of that over the epoch's batches. The data losses: softmax cross-entropy (multiclass),
binary cross-entropy of one logistic output (binary), summed over the labels (multilabel),
half the squared error, summed over the outputs (regression). Here the network ends in a
linear layer and backprop's losses take its output: ``SoftmaxCrossEntropyLoss`` (integer
labels), ``BCEWithLogitsLoss`` and ``MSELoss(half=True)``, all means over every element.
With ``k`` outputs those are ``1/c`` of scikit-learn's data loss, ``c = k`` for multilabel
and regression and ``c = 1`` otherwise, so this module trains on exactly ``1/c`` ×
scikit-learn's objective and maps every constant accordingly:

- ``alpha``: :class:`backprop.regularizers.L2` on the weight matrices with
  ``l2 = alpha / (2 B c)`` (penalty ``l2·Σθ²``, gradient ``2·l2·θ = alpha·θ / (B c)``), its
  ``B`` set batch by batch when the last batch is smaller.
- ``solver="sgd"``: backprop's SGD (PyTorch's rule: a momentum buffer of gradients, with
  Nesterov's variant) with ``lr = c · learning_rate``; scikit-learn's velocity is ``-lr`` ×
  that buffer, so when a schedule (``invscaling``, ``adaptive``) changes the learning rate
  the buffer is rescaled by ``old/new``. The updates are then scikit-learn's.
- ``solver="adam"``: ``epsilon / c`` (Adam is otherwise invariant to the scale of the
  objective), added where scikit-learn adds it (to ``sqrt(v)``, before the bias correction:
  backprop's Adam, PyTorch's rule, adds it after, so each step ``t`` passes
  ``eps / sqrt(1 - beta_2^t)``).
- ``loss_curve_``, ``loss_``, ``best_loss_`` are ``c`` × backprop's epoch loss: the
  objective scikit-learn minimises.

So with ``dtype="float64"`` (the default for float64 ``X``) and ``shuffle=False`` the
weights, ``loss_curve_``, ``validation_scores_`` and ``n_iter_`` are scikit-learn's to
rounding (``tests/test_sklearn.py`` checks ~1e-12) for both solvers, every learning-rate
schedule, ``early_stopping`` and ``alpha > 0``. One reporting difference: for multi-output
regression, scikit-learn's ``loss_curve_`` averages the half squared error over the outputs
while its gradient is that of their sum; here ``loss_curve_`` reports the sum (the objective
actually descended, larger by up to a factor of ``k``), and ``tol`` acts on that scale.

Not supported: ``solver="lbfgs"`` (``fit`` raises ``ValueError``: backprop trains by
minibatches; use scikit-learn's MLP for L-BFGS), ``sample_weight``, sparse ``X``
(refused by ``validate_data`` with scikit-learn's message), ``MLPRegressor(loss="poisson")``,
``max_fun`` (an L-BFGS parameter).

check_estimator: :func:`sklearn.utils.estimator_checks.check_estimator` passes every check
for both classes (``tests/test_sklearn.py`` runs them all with ``max_iter=50``), except as
:func:`expected_failed_checks` says: with ``dtype="float32"`` the prediction for a row can
differ in the last bit depending on which other rows are predicted with it (BLAS picks its
kernel by matrix shape), which ``check_methods_subset_invariance`` may catch. Like
scikit-learn's own MLPs, ``check_classifiers_train``/``check_regressors_train`` need enough
epochs to reach their score thresholds: both fail at ``max_iter=3``, as scikit-learn's do.
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state, column_or_1d
    from sklearn.utils.multiclass import (check_classification_targets, type_of_target,
                                          unique_labels)
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # validate_data: scikit-learn >= 1.6
    raise ImportError(
        "backprop.sklearn needs scikit-learn >= 1.6 (validate_data, __sklearn_tags__): "
        "pip install 'backprop[sklearn]' (or pip install -U scikit-learn)") from exc

from backprop import training
from backprop.backend import DeviceUnavailableError, get_device, to_numpy, use_device
from backprop.callbacks import Callback
from backprop.layers import Dense
from backprop.losses import BCEWithLogitsLoss, MSELoss, SoftmaxCrossEntropyLoss
from backprop.model import Sequential
from backprop import optim
from backprop.regularizers import L2

__all__ = ["MLPClassifier", "MLPRegressor", "expected_failed_checks"]


def expected_failed_checks(estimator) -> dict[str, str]:
    """The :func:`~sklearn.utils.estimator_checks.check_estimator` checks that
    ``estimator`` may fail, each with the reason: the argument ``expected_failed_checks``
    of ``check_estimator`` and ``parametrize_with_checks``. Empty unless the estimator
    computes in float32 (the default, ``dtype=None``, computes in float64 for float64 data,
    which every check passes)."""
    try:
        float32 = estimator.dtype is not None and np.dtype(estimator.dtype) == np.float32
    except TypeError:
        float32 = False
    if not float32:
        return {}
    return {"check_methods_subset_invariance": (
        "float32: the prediction for a row may differ in the last bit depending on how many "
        "rows are predicted with it (BLAS chooses its kernel by matrix shape), beyond the "
        "check's rtol=1e-7; it passes with dtype=None or 'float64'")}


# scikit-learn's activation names -> backprop's
_ACTIVATIONS = {"identity": None, "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_SOLVERS = ("adam", "sgd")
_LEARNING_RATES = ("constant", "invscaling", "adaptive")
_PREDICT_ROWS = 4096  # rows per forward pass in predict


# ---------------------------------------------------------------------------------------
# Argument checks (in fit, as scikit-learn does; messages name the parameter)
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _bad(name, value, expected):
    return ValueError(f"The {name!r} parameter of {{cls}} must be {expected}. Got {value!r} "
                      "instead.")


def _real_in(name, value, low, high, low_open=False, high_open=False):
    ok = _is_real(value) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and \
            (high is None or (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}" \
                   f"{')' if high_open or high is None else ']'}"
        raise _bad(name, value, f"a float in the range {interval}")


def _hidden_layer_sizes(value) -> list[int]:
    sizes = [value] if not hasattr(value, "__iter__") or isinstance(value, str) else list(value)
    if not all(_is_int(s) and s >= 1 for s in sizes):
        raise _bad("hidden_layer_sizes", value,
                   "an int >= 1 or a sequence of ints >= 1 (one per hidden layer)")
    return [int(s) for s in sizes]


def _float_dtype(dtype, X=None) -> np.dtype:
    """The compute dtype: ``dtype``, or with None that of ``X`` (float32 or float64 after
    validation), as scikit-learn computes."""
    if dtype is None:
        return np.dtype(np.float64) if X is None else X.dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise _bad("dtype", dtype, "None, 'float32' or 'float64'")
    return dt


def _device_of(model) -> str:
    """'cpu' or 'cuda:N': where the model's parameters live."""
    data = model.parameters()[0].data
    return "cpu" if isinstance(data, np.ndarray) else f"cuda:{data.device.id}"


def _expit(z):
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


# ---------------------------------------------------------------------------------------
class _SklearnAdam(optim.Adam):
    """backprop's Adam with scikit-learn's epsilon: PyTorch adds ``eps`` to
    ``sqrt(v) / sqrt(1 - β2ᵗ)``, scikit-learn to ``sqrt(v)``; the step of ``t`` uses
    ``eps / sqrt(1 - β2ᵗ)`` in PyTorch's formula, which is scikit-learn's update exactly."""

    def _update(self, group, lr, step):
        eps = self.hyper["eps"]
        self.hyper["eps"] = eps / math.sqrt(1.0 - self.hyper["betas"][1] ** step)
        try:
            super()._update(group, lr, step)
        finally:
            self.hyper["eps"] = eps


_OPTIMIZERS = {"_SklearnAdam": _SklearnAdam, "SGD": optim.SGD}


class _PenaltyPerBatch(Callback):
    """Sets ``l2 = alpha / (2 B c)`` for each batch of ``B`` rows (scikit-learn divides the
    penalty by the batch's own row count); used only when an epoch ends with a smaller
    batch."""

    def __init__(self, regularizer, half_alpha_over_c):
        self.regularizer, self.scale = regularizer, half_alpha_over_c

    def on_batch_begin(self, batch, logs=None):
        self.regularizer.l2 = self.scale / logs["size"]


class _Monitor(Callback):
    """scikit-learn's end-of-epoch bookkeeping (``_fit_stochastic``): the loss curve, the
    no-improvement count on the training loss or the validation score, the learning-rate
    schedule of ``sgd``, and stopping."""

    def __init__(self, estimator, n_train, c, validation):
        self.est, self.n_train, self.c, self.validation = estimator, n_train, c, validation
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        est = self.est
        if not self.epoch_complete:
            return
        loss = float(logs["loss"]) * self.c
        est.n_iter_ += 1
        est.loss_ = loss
        est.t_ += self.n_train
        est.loss_curve_.append(loss)
        if est.verbose:
            print(f"Iteration {est.n_iter_}, loss = {loss:.8f}")
        est._update_no_improvement_count(self.validation)
        sgd = est.solver == "sgd"
        if sgd and est.learning_rate == "invscaling":
            est._set_learning_rate(float(est.learning_rate_init) / (est.t_ + 1) ** est.power_t)
        if est._no_improvement_count > est.n_iter_no_change:
            what = "Validation score" if est.early_stopping else "Training loss"
            msg = (f"{what} did not improve more than tol={est.tol:f} for "
                   f"{est.n_iter_no_change} consecutive epochs.")
            if sgd and est.learning_rate == "adaptive" and est._learning_rate > 1e-6:
                est._set_learning_rate(est._learning_rate / 5.0)
                est._no_improvement_count = 0
                if est.verbose:
                    print(f"{msg} Setting learning rate to {est._learning_rate:f}")
            else:
                if est.verbose:
                    print(msg + (" Learning rate too small." if sgd and est.learning_rate
                                 == "adaptive" else "") + " Stopping.")
                self.stopped = True
                self.model.stop_training = True


# ---------------------------------------------------------------------------------------
class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: see the module docstring."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, device=None,
                 dtype=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.dtype = dtype

    # -- checks ---------------------------------------------------------------------------
    def _check_params(self) -> list[int]:
        """Raise ValueError for a bad parameter; returns the hidden layer sizes."""
        try:
            sizes = _hidden_layer_sizes(self.hidden_layer_sizes)
            if self.solver == "lbfgs":
                raise ValueError(
                    "solver='lbfgs' is not supported by backprop.sklearn.{cls}: backprop "
                    "trains by minibatch backpropagation. Use solver='adam' or 'sgd' (or "
                    "sklearn.neural_network.{cls} for L-BFGS).")
            for name, value, options in (("solver", self.solver, _SOLVERS),
                                         ("activation", self.activation, tuple(_ACTIVATIONS)),
                                         ("learning_rate", self.learning_rate, _LEARNING_RATES)):
                if not isinstance(value, str) or value not in options:
                    raise _bad(name, value, f"a str among {set(options)}")
            if not (self.batch_size == "auto" or (_is_int(self.batch_size)
                                                  and self.batch_size >= 1)):
                raise _bad("batch_size", self.batch_size, "'auto' or an int >= 1")
            if not (_is_int(self.max_iter) and self.max_iter >= 1):
                raise _bad("max_iter", self.max_iter, "an int >= 1")
            nic = self.n_iter_no_change
            if not ((_is_int(nic) and nic >= 1) or (_is_real(nic) and nic == math.inf)):
                raise _bad("n_iter_no_change", nic, "an int >= 1 or numpy.inf")
            _real_in("alpha", self.alpha, 0, None)
            _real_in("learning_rate_init", self.learning_rate_init, 0, None, low_open=True)
            _real_in("power_t", self.power_t, 0, None)
            _real_in("tol", self.tol, 0, None)
            _real_in("momentum", self.momentum, 0, 1)
            _real_in("validation_fraction", self.validation_fraction, 0, 1, high_open=True)
            _real_in("beta_1", self.beta_1, 0, 1, high_open=True)
            _real_in("beta_2", self.beta_2, 0, 1, high_open=True)
            _real_in("epsilon", self.epsilon, 0, None, low_open=True)
            for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
                if not isinstance(getattr(self, name), (bool, np.bool_)):
                    raise _bad(name, getattr(self, name), "an instance of 'bool'")
            if not (isinstance(self.verbose, (bool, np.bool_)) or
                    (_is_int(self.verbose) and self.verbose >= 0)):
                raise _bad("verbose", self.verbose, "a bool or an int >= 0")
            _float_dtype(self.dtype)
        except ValueError as exc:
            raise ValueError(str(exc).replace("{cls}", type(self).__name__)) from None
        return sizes

    # -- the network ----------------------------------------------------------------------
    def _build_model(self, layer_units, rs, dtype, device):
        """Dense layers with scikit-learn's initialisation (``_init_coef``: weights and
        intercepts ~ U(-b, b), b = sqrt(f / (fan_in + fan_out)), f = 2 for logistic and 6
        otherwise, drawn from ``rs`` in its order); linear output layer."""
        factor = 2.0 if self.activation == "logistic" else 6.0
        hidden = _ACTIVATIONS[self.activation]
        last = len(layer_units) - 2
        layers, state = [], {}
        with use_device(device):
            for i, (fan_in, fan_out) in enumerate(zip(layer_units[:-1], layer_units[1:])):
                bound = math.sqrt(factor / (fan_in + fan_out))
                coef = rs.uniform(-bound, bound, (fan_in, fan_out))
                intercept = rs.uniform(-bound, bound, fan_out)
                layers.append(Dense(fan_in, fan_out, activation=None if i == last else hidden,
                                    init="zeros", dtype=dtype))
                state[f"{i}.W"], state[f"{i}.b"] = coef.T, intercept
            model = Sequential(layers)
        model.load_state_dict(state)
        return model

    def _new_optimizer(self, c):
        """scikit-learn's solver on backprop's optimizer (see the module docstring)."""
        params = self.model_.parameters()
        if self.solver == "adam":
            return _SklearnAdam(params, lr=float(self.learning_rate_init),
                              betas=(float(self.beta_1), float(self.beta_2)),
                              eps=float(self.epsilon) / c)
        momentum = float(self.momentum)
        return optim.SGD(params, lr=c * float(self.learning_rate_init), momentum=momentum,
                         nesterov=bool(self.nesterovs_momentum) and momentum > 0)

    def _set_learning_rate(self, lr) -> None:
        """Set the learning rate (``sgd`` schedules), in scikit-learn's units. scikit-learn's
        velocity is ``-lr`` × backprop's momentum buffer (PyTorch's, a sum of gradients), so
        the buffer is scaled by ``old lr / new lr``: the momentum carried over is then
        scikit-learn's."""
        old, self._learning_rate = self._learning_rate, float(lr)
        opt = self._optimizer
        opt.lr = self._c * self._learning_rate
        if opt.hyper.get("momentum") and self._learning_rate != old:
            state = opt.state_dict()
            for value in state["state"].values():
                value *= old / self._learning_rate
            opt.load_state_dict(state)

    def _initialize(self, layer_units, rs, dtype, device) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(layer_units)
        self._layer_units = list(layer_units)
        self.model_ = self._build_model(layer_units, rs, dtype, device)
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None
        self.__dict__.pop("_optimizer", None)
        self.__dict__.pop("_best_state", None)

    def _update_no_improvement_count(self, validation) -> None:
        """scikit-learn's rule (``_update_no_improvement_count``)."""
        if self.early_stopping:
            X_val, y_val = validation
            score = self._validation_score(X_val, y_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_state = self.model_.state_dict()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _outputs(self, X):
        """The network's outputs (logits, or values) for validated ``X``, float64 NumPy."""
        out = training.predict(self.model_, X, batch_size=_PREDICT_ROWS)
        return to_numpy(out).astype(np.float64, copy=False)

    def _validate_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=(np.float64, np.float32))

    # -- training -------------------------------------------------------------------------
    def _fit(self, X, y, incremental, classes=None):
        sizes = self._check_params()
        if incremental and self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        first_pass = not hasattr(self, "model_") or (not self.warm_start and not incremental)
        X, y = validate_data(self, X, y, reset=first_pass, multi_output=True,
                             dtype=(np.float64, np.float32), **self._y_validation)
        y_encoded, n_outputs, loss, c = self._encode_targets(y, incremental, first_pass,
                                                             classes)
        layer_units = [X.shape[1], *sizes, n_outputs]
        rs = check_random_state(self.random_state)
        if first_pass:
            device = str(get_device() if self.device is None else self.device)
            with use_device(device) as dev:  # checks the name, and that the device exists
                device = str(dev)
            self._initialize(layer_units, rs, _float_dtype(self.dtype, X), device)
            self.n_outputs_ = n_outputs
        elif layer_units != self._layer_units:
            raise ValueError(
                f"{'partial_fit' if incremental else 'fit with warm_start=True'} continues "
                f"the fitted network of layer sizes {self._layer_units}, but the data and "
                f"parameters give {layer_units}: keep hidden_layer_sizes (and the number of "
                "outputs), or fit from scratch (warm_start=False)")
        if self.early_stopping and self.validation_scores_ is None:  # warm start, now on
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
        self._c = c
        if not incremental or not hasattr(self, "_optimizer"):
            self._learning_rate = float(self.learning_rate_init)
            self._optimizer = self._new_optimizer(c)

        validation = None
        X_train, y_train = X, y_encoded
        if self.early_stopping:
            stratify = y_encoded if self._stratify else None
            X_train, X_val, y_train, y_val = train_test_split(
                X, y_encoded, random_state=rs, test_size=self.validation_fraction,
                stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            validation = (X_val, y_val)
        n_train = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_train)
        else:
            if self.batch_size > n_train:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped", stacklevel=3)
            batch_size = int(np.clip(self.batch_size, 1, n_train))
        seed = int(rs.randint(np.iinfo(np.int32).max))

        model = self.model_
        monitor = _Monitor(self, n_train, c, validation)
        callbacks = [monitor]
        model.regularizers = []
        if self.alpha > 0:
            scale = float(self.alpha) / (2.0 * c)
            penalty = L2(scale / batch_size)
            model.add_regularizer(penalty)
            if n_train % batch_size:
                callbacks.insert(0, _PenaltyPerBatch(penalty, scale))
        self.n_iter_ = 0
        try:
            model.fit(X_train, y_train, loss=loss, optimizer=self._optimizer,
                      epochs=1 if incremental else int(self.max_iter), batch_size=batch_size,
                      shuffle=bool(self.shuffle), metrics=[], callbacks=callbacks, seed=seed,
                      verbose=0)
        except training.NonFiniteLossError as exc:
            raise ValueError("Solver produced non-finite parameter weights (the loss became "
                             "NaN or inf). The input data may contain large values and need "
                             "to be preprocessed, or the learning rate may be too large."
                             ) from exc
        finally:
            model.regularizers = []
        if not incremental and not monitor.stopped and self.n_iter_ == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                          "and the optimization hasn't converged yet.", ConvergenceWarning,
                          stacklevel=3)
        if self.early_stopping and getattr(self, "_best_state", None) is not None:
            model.load_state_dict(self._best_state)  # the best epoch's weights, as scikit-learn
        return self

    def fit(self, X, y):
        """Fit the network to ``X`` (n_samples, n_features) and ``y``; returns self."""
        return self._fit(X, y, incremental=False)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    # -- fitted views in scikit-learn's layout ----------------------------------------------
    @property
    def coefs_(self) -> list:
        """Copies of the weight matrices, ``coefs_[i]`` of shape ``(fan_in, fan_out)``."""
        return [to_numpy(layer.W.data).T.copy() for layer in self.model_]

    @property
    def intercepts_(self) -> list:
        """Copies of the bias vectors, ``intercepts_[i]`` of shape ``(fan_out,)``."""
        return [to_numpy(layer.b.data).copy() for layer in self.model_]

    # -- pickling ---------------------------------------------------------------------------
    def __getstate__(self):
        """The estimator's ``__dict__`` with the network as ``config()`` + ``state_dict()``
        and the optimizer as its ``state_dict()``: dicts, lists, strings and NumPy arrays."""
        from backprop import __version__

        state = dict(super().__getstate__())
        model = state.pop("model_", None)
        if model is not None:
            state["_model_config"] = model.config()
            state["_model_state"] = model.state_dict()
            state["_model_device"] = _device_of(model)
        opt = state.pop("_optimizer", None)
        if opt is not None:
            state["_optimizer_state"] = opt.state_dict()
        state["_backprop_version"] = __version__
        return state

    def __setstate__(self, state):
        from backprop import __version__

        state = dict(state)
        config = state.pop("_model_config", None)
        arrays = state.pop("_model_state", None)
        device = state.pop("_model_device", "cpu")
        opt_state = state.pop("_optimizer_state", None)
        version = state.pop("_backprop_version", None)
        if version is not None and version != __version__:
            warnings.warn(f"unpickling a {type(self).__name__} pickled with backprop {version} "
                          f"under backprop {__version__}: the network is rebuilt from its "
                          "config and state_dict, which may not be compatible")
        super().__setstate__(state)
        if config is None:
            return
        try:
            with use_device(device):
                model = Sequential.from_config(config)
        except DeviceUnavailableError as exc:
            warnings.warn(f"the pickled network was on {device}, which is not available here "
                          f"({exc}); it is rebuilt on the CPU")
            with use_device("cpu"):
                model = Sequential.from_config(config)
        model.load_state_dict(arrays)
        self.model_ = model
        if opt_state is not None:
            hyper = dict(opt_state["hyper"])
            opt = _OPTIMIZERS[opt_state["type"]](model.parameters(), **hyper)
            opt.load_state_dict(opt_state)
            self._optimizer = opt


# ---------------------------------------------------------------------------------------
class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier with scikit-learn's interface and objective,
    trained by backprop (see the module docstring for the contract and the math).

    Parameters (scikit-learn's names and meanings, :class:`sklearn.neural_network.
    MLPClassifier`): ``hidden_layer_sizes``, ``activation`` ('identity', 'logistic', 'tanh',
    'relu'), ``solver`` ('adam', 'sgd'; 'lbfgs' is refused), ``alpha`` (L2 penalty),
    ``batch_size`` ('auto' = min(200, n_samples)), ``learning_rate`` ('constant',
    'invscaling', 'adaptive'; sgd only), ``learning_rate_init``, ``power_t``, ``max_iter``
    (epochs), ``shuffle``, ``random_state``, ``tol``, ``verbose``, ``warm_start``,
    ``momentum``, ``nesterovs_momentum``, ``early_stopping``, ``validation_fraction``,
    ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``. backprop's own: ``device``
    (None: :func:`backprop.get_device` at fit; 'cpu', 'cuda', 'cuda:N') and ``dtype`` (None:
    float32 for float32 ``X``, else float64, as scikit-learn computes; 'float32', 'float64').

    The output layer is linear: one logit for two classes (``predict_proba`` is then
    ``[1 - σ(z), σ(z)]``, shape ``(n, 2)``), one per class with a softmax for more, one per
    label with independent sigmoids for a multilabel indicator ``y``. ``predict`` returns
    labels from ``classes_`` (any sortable values, strings included).

    check_estimator: every check passes (at ``max_iter=50`` and more); with
    ``dtype="float32"``, ``check_methods_subset_invariance`` may fail by one bit
    (:func:`expected_failed_checks`). ``check_classifiers_train`` needs enough epochs to
    reach its accuracy threshold: like scikit-learn's own MLPClassifier, it fails at
    ``max_iter=3``.
    """

    _y_validation: dict = {}
    _stratify = False

    def _encode_targets(self, y, incremental, first_pass, classes):
        """``(targets for backprop's loss, number of outputs, loss, c)``; sets ``classes_``
        on a first pass (from ``y``, or from ``classes`` in ``partial_fit``) and checks ``y``
        against it otherwise."""
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        multilabel = type_of_target(y).startswith("multilabel")
        if first_pass:
            if incremental:
                if classes is None:
                    raise ValueError("classes must be passed on the first call to "
                                     "partial_fit.")
                self.classes_ = unique_labels(classes)
            else:
                self.classes_ = np.arange(y.shape[1]) if multilabel else unique_labels(y)
            self._multilabel = multilabel
        elif incremental and classes is not None and \
                not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"`classes={classes!r}` is not the same as on last call to "
                             f"partial_fit, was: {self.classes_!r}")
        if multilabel != self._multilabel:
            fitted = "a multilabel indicator" if self._multilabel else "class labels"
            raise ValueError(f"the network was fitted on {fitted}; got a {type_of_target(y)} y")
        if multilabel:
            k = len(self.classes_)
            if y.shape[1] != k:
                raise ValueError(f"y has {y.shape[1]} labels (columns), but the network was "
                                 f"fitted on {k}")
            self.out_activation_ = "logistic"
            self._stratify = False
            return y.astype(np.float64), k, BCEWithLogitsLoss(), float(k)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes in "
                             f"the data, but the data contains only 1 class: "
                             f"{self.classes_[0]!r}")
        if not first_pass:
            present = unique_labels(y)
            if self.warm_start and not incremental:
                if set(present) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the "
                        f"previous call to fit. Previously got {self.classes_}, `y` has "
                        f"{present}")
            elif len(np.setdiff1d(present, self.classes_)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {present}.")
        index = np.searchsorted(self.classes_, y)
        self._stratify = n_classes == 2  # as scikit-learn: the early-stopping split of binary
        if n_classes == 2:
            self.out_activation_ = "logistic"
            return (index == 1).astype(np.float64).reshape(-1, 1), 1, BCEWithLogitsLoss(), 1.0
        self.out_activation_ = "softmax"
        return index.astype(np.int64), n_classes, SoftmaxCrossEntropyLoss(), 1.0

    def _validation_score(self, X, y_encoded) -> float:
        pred = self._predict_encoded(self._outputs(X))
        if self._multilabel:
            return float(accuracy_score(y_encoded.astype(int), pred))
        if pred.ndim == 1 and y_encoded.ndim == 2:
            y_encoded = y_encoded[:, 0]
        return float(accuracy_score(y_encoded.astype(np.int64), pred))

    def _predict_encoded(self, z):
        """Class indices (or the indicator matrix) from the network's outputs."""
        if self._multilabel:
            return (z > 0).astype(int)
        if z.shape[1] == 1:
            return (z[:, 0] > 0).astype(np.int64)
        return np.argmax(z, axis=1)

    def partial_fit(self, X, y, classes=None):
        """One epoch over ``(X, y)``, continuing from the current weights and optimizer
        state. ``classes`` (all labels that will ever occur) is required on the first call;
        ``y`` need not contain all of them. Returns self."""
        return self._fit(X, y, incremental=True, classes=classes)

    def predict(self, X):
        """Class labels (from ``classes_``), or the indicator matrix for multilabel."""
        z = self._outputs(self._validate_X(X))
        index = self._predict_encoded(z)
        return index if self._multilabel else self.classes_[index]

    def predict_proba(self, X):
        """Class probabilities ``(n_samples, n_classes)`` in the order of ``classes_``
        (float64; rows sum to 1 except for multilabel, whose columns are independent)."""
        z = self._outputs(self._validate_X(X))
        if self._multilabel:
            return _expit(z)
        if z.shape[1] == 1:
            p = _expit(z[:, 0])
            return np.column_stack([1.0 - p, p])
        return _softmax(z)

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        p = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(p, out=p)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor with scikit-learn's interface and objective
    (half the squared error, plus the L2 penalty), trained by backprop; see the module
    docstring for the contract and the math, and :class:`MLPClassifier` for the
    parameters (the same, with the same defaults).

    The output layer is linear, one unit per target; ``predict`` returns float64, of shape
    ``(n_samples,)`` when ``y`` had one column (scikit-learn's convention), else
    ``(n_samples, n_outputs)``.

    check_estimator: every check passes (at ``max_iter=50`` and more); with
    ``dtype="float32"``, ``check_methods_subset_invariance`` may fail by one bit
    (:func:`expected_failed_checks`). ``check_regressors_train`` needs enough epochs to
    reach its R² threshold: like scikit-learn's own MLPRegressor, it fails at
    ``max_iter=3``.
    """

    _y_validation: dict = {"y_numeric": True}
    _stratify = False

    def _encode_targets(self, y, incremental, first_pass, classes):
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        self.out_activation_ = "identity"
        k = y.shape[1]
        return y, k, MSELoss(half=True), float(k)

    def _validation_score(self, X, y) -> float:
        pred = self._outputs(X)
        if not np.isfinite(pred).all():
            return float("nan")
        return float(r2_score(y, pred))

    def partial_fit(self, X, y):
        """One epoch over ``(X, y)``, continuing from the current weights and optimizer
        state. Returns self."""
        return self._fit(X, y, incremental=True)

    def predict(self, X):
        """Predicted values, float64: ``(n_samples,)`` for one target, else
        ``(n_samples, n_outputs)``."""
        out = self._outputs(self._validate_X(X))
        return out.ravel() if out.shape[1] == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

