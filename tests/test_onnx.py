"""ONNX export (``backprop.onnx_export``): every layer and every activation through ONNX
Runtime against ``model.predict``, float32 within 1e-5 (and float64), at the default opset,
the first with ``Gelu`` and the oldest supported one, and every supported opset once;
the checker, the dynamic batch dimension, the graph's structure, and the errors (nothing is
written, an existing file is kept).

The activations come from ``backprop.activations.NAMES`` and the kernel records, so a new
activation is tested automatically, and one without an ONNX form fails its test here."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import backprop as bp
from backprop import activations
from backprop import kernels as K
from backprop.kernels.activations import RECORDS

onnx = pytest.importorskip("onnx")
from backprop import onnx_export  # noqa: E402
from backprop.onnx_export import ONNXExportError  # noqa: E402

OPSETS = sorted({onnx_export.MIN_OPSET, onnx_export.DEFAULT_OPSET, onnx_export.GELU_OPSET})
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12)}
# float64 GELU (erf): Erf runs in float32 (ONNX Runtime has no double Erf)
GELU_ERF64 = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


def session(ort, path):
    try:
        return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # an older runtime than the opset: not the exporter's fault
        text = str(exc).lower()
        if ("opset" in text or "ir version" in text) and "support" in text:
            pytest.skip(f"this onnxruntime {ort.__version__} cannot load it: {exc}")
        raise


def run_onnx(ort, path, X, name="input"):
    return session(ort, path).run(None, {name: X})[0]


def inputs(dtype, n=9, features=5, seed=0):
    """Rows with small and large values of both signs (±30: the exp-based activations'
    stable branches), and exact zeros."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)) * 2.0
    X[0, :] = 0.0
    X[1, :] = np.linspace(-30.0, 30.0, features)
    return X.astype(dtype)


def activation_names():
    """Every activation by every name it answers to, and every kernel record (gelu_erf)."""
    return sorted(set(activations.NAMES) | set(RECORDS))


def make_activation(name):
    """The activation layer of ``name`` (a NAMES entry or a record), with a non-default
    alpha where it takes one (so that alpha is exported, not assumed)."""
    if name in activations.NAMES:
        act = activations.get(name)
    else:
        found = [n for n in activations.NAMES if activations.get(n).kernel == name]
        assert found, f"kernel record {name!r} has no activation layer in activations.NAMES"
        act = activations.get(found[0])
    record = RECORDS.get(act.kernel)
    if record is not None and record.alpha is not None:
        act = type(act)(alpha=0.37)
    return act


def test_every_activation_has_an_onnx_form():
    kernels = {make_activation(n).kernel for n in activation_names()}
    assert set(K.ACTIVATIONS) <= kernels and {"softmax", "log_softmax"} <= kernels
    missing = sorted(kernels - set(onnx_export.ACTIVATION_OPS))
    assert not missing, f"activations without an ONNX form: {missing}"


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", activation_names())
def test_activation_matches_predict(ort, tmp_path, name, dtype, opset):
    """Dense(activation=name), then the activation as a layer of its own: ONNX Runtime's
    outputs equal predict's (an activation that cannot be exported fails here)."""
    model = bp.Sequential([bp.Dense(5, 6, activation=make_activation(name), rng=1,
                                    dtype=dtype), bp.Dense(6, 4, rng=2, dtype=dtype),
                           make_activation(name)])
    path = model.export_onnx(tmp_path / "m.onnx", opset=opset)
    X = inputs(dtype)
    tol = GELU_ERF64 if dtype == "float64" and model[0].activation.kernel == "gelu_erf" \
        else TOLERANCE[dtype]
    got = run_onnx(ort, path, X)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, model.predict(X), **tol)


# The ONNX operators that the records' math composes formulas from (no activation's own)
COMPOSED_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Less", "LessOrEqual", "Greater",
                "GreaterOrEqual", "Equal", "Not", "Where", "Abs", "Exp", "Log", "Max", "Tanh",
                "Sigmoid", "Erf", "Cast", "Expand", "Shape"}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", activation_names())
def test_every_activation_composed_from_its_formula(ort, tmp_path, monkeypatch, name, opset):
    """float32 without the records' native operators: every activation is built from its
    record's formula alone (the path that float64 always takes), within 1e-5 of predict."""
    monkeypatch.setattr(onnx_export, "_native_op", lambda record, g: None)
    act = make_activation(name)
    model = bp.Sequential([bp.Dense(5, 6, activation=act, rng=1), make_activation(name)])
    path = model.export_onnx(tmp_path / "m.onnx", opset=opset)
    ops = {n.op_type for n in onnx.load(path).graph.node} - {"Gemm"}
    if act.kernel in RECORDS:
        assert ops <= COMPOSED_OPS, f"{name}: {sorted(ops - COMPOSED_OPS)}"
    X = inputs("float32")
    np.testing.assert_allclose(run_onnx(ort, path, X), model.predict(X), **TOLERANCE["float32"])


def test_the_composition_is_accurate_near_zero_and_in_the_tails(ort, tmp_path, monkeypatch):
    """Kahan's expm1 and log1p: ELU near 0 and softplus far below 0 keep their relative
    accuracy (Exp(x) - 1 and Log(1 + x) lose it), float32 and float64."""
    monkeypatch.setattr(onnx_export, "_native_op", lambda record, g: None)
    z = np.concatenate([np.geomspace(-1e-6, -1e-1, 60), np.linspace(-80, -20, 61)])
    for dtype, rtol in (("float32", 1e-6), ("float64", 1e-14)):
        for act in (bp.ELU(0.5), bp.Softplus()):
            model = bp.Sequential([act])
            X = z.reshape(-1, 1).astype(dtype)
            path = model.export_onnx(tmp_path / "m.onnx", input_shape=(1,), dtype=dtype)
            want = RECORDS[act.kernel].check(X.astype(np.float64), 0.5)
            keep = np.abs(want) > np.finfo(dtype).tiny * 1e3
            got = run_onnx(ort, path, X).astype(np.float64)
            np.testing.assert_allclose(got[keep], want[keep], rtol=rtol, atol=0,
                                       err_msg=f"{act!r} {dtype}")


def exported_activation(record_name, dtype, opset, alpha=0.0):
    """An ONNX model of the activation ``record_name`` alone, by the exporter's own emitter
    (no layer class: a record made by a test has none)."""
    from types import SimpleNamespace

    g = onnx_export._Graph(onnx, np.dtype(dtype), opset, ("input", "output"))
    act = SimpleNamespace(kernel=record_name, alpha=alpha)
    out = onnx_export._emit_activation(g, act, "input", "act")
    g.nodes.append(onnx.helper.make_node("Identity", [out], ["output"], name="output"))
    g.prune_constants()
    h = onnx.helper
    graph = h.make_graph(g.nodes, "t", [h.make_tensor_value_info("input", g.elem, ["N", 1])],
                         [h.make_tensor_value_info("output", g.elem, ["N", 1])],
                         initializer=g.initializers)
    opsets = [h.make_opsetid("", opset)]
    proto = h.make_model(graph, opset_imports=opsets,
                         ir_version=h.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _made_up(m):
    """A formula that uses every primitive of the records' math, alpha and every operator."""
    zero, one, two, cast, where = m.K(0.0), m.K(1.0), m.K(2.0), m.cast, m.where

    def f(z, alpha):
        cdf, pdf = m.ndtr_pdf(z)
        a = where(z >= zero, m.tanh(z) + m.sigmoid(-z), m.expm1(where(z < zero, z, zero)))
        b = where(z <= one, m.softplus(z) / two, one - m.exp(-m.abs(z)))
        c = where(z != zero, cdf * pdf, m.ndtr(z))
        return cast(alpha) * a + b * c - one / (two + z * z)
    return f


def _made_up_check(z, alpha):
    from math import erf

    cdf = 0.5 * (1.0 + np.vectorize(erf)(z / np.sqrt(2.0)))
    pdf = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    a = np.where(z >= 0, np.tanh(z) + 1 / (1 + np.exp(z)), np.expm1(np.minimum(z, 0)))
    b = np.where(z <= 1, np.logaddexp(0, z) / 2, 1 - np.exp(-np.abs(z)))
    c = np.where(z != 0, cdf * pdf, cdf)
    return alpha * a + b * c - 1 / (2 + z * z)


@pytest.mark.parametrize("opset", [onnx_export.MIN_OPSET, onnx_export.MAX_OPSET])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_new_record_is_exported_without_a_change_to_the_exporter(ort, monkeypatch, dtype,
                                                                    opset):
    """A record added at test time (its formula, and then a native operator) is exported
    from the record alone, and agrees with its NumPy definition."""
    from backprop.kernels.activations import ActivationDef

    opset = min(opset, max(onnx_export.supported_opsets()))
    record = ActivationDef("made_up", _made_up, _made_up, "made up", "made up",
                           _made_up_check, alpha=0.5)
    monkeypatch.setitem(RECORDS, record.name, record)
    z = np.concatenate([inputs("float64").reshape(-1), np.linspace(-12, 12, 97)])
    X = z.reshape(-1, 1).astype(dtype)
    want = _made_up_check(X.astype(np.float64), 0.37)
    proto = exported_activation(record.name, dtype, opset, alpha=0.37)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else GELU_ERF64  # (Erf: float32)
    np.testing.assert_allclose(sess.run(None, {"input": X})[0], want, **tol)

    # a native operator, named by the record: used in float32 from its opset on
    native = ActivationDef("made_up_elu", RECORDS["elu"].forward, RECORDS["elu"].derivative,
                           "", "", RECORDS["elu"].check, alpha=1.0, onnx_op="Elu",
                           onnx_alpha="alpha", onnx_opset=onnx_export.MIN_OPSET + 1)
    monkeypatch.setitem(RECORDS, native.name, native)
    proto = exported_activation(native.name, dtype, opset, alpha=0.37)
    ops = [n.op_type for n in proto.graph.node]
    assert ("Elu" in ops) == (dtype == "float32" and opset > onnx_export.MIN_OPSET)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": X})[0], native.check(X, 0.37),
                               **TOLERANCE[dtype])


def trained_batchnorm(dtype, affine=True, cls=bp.BatchNorm1d):
    """A BatchNorm after one training step: running statistics far from (0, 1), and gamma,
    beta not (1, 0)."""
    dense = bp.Dense(5, 4, rng=3, dtype=dtype)
    bn = cls(4, eps=1e-3, momentum=0.5, affine=affine, dtype=dtype)
    model = bp.Sequential([dense, bn, bp.Tanh()])
    model.train()
    model.forward(model.prepare_input(inputs(dtype, n=16, seed=5) * 3 + 2))
    model.eval()
    if affine:
        bn.gamma.data[...] = np.array([0.5, 2.0, -1.0, 1.5], dtype=dtype)
        bn.beta.data[...] = np.array([0.1, -0.2, 0.3, 1.0], dtype=dtype)
    assert np.abs(bn.running_mean).max() > 0.5 and np.abs(bn.running_var - 1).max() > 0.5
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine, cls", [(True, bp.BatchNorm1d), (False, bp.BatchNorm1d),
                                         (True, bp.SyncBatchNorm)])
def test_batchnorm_in_eval_uses_the_running_statistics(ort, tmp_path, dtype, affine, cls):
    model = trained_batchnorm(dtype, affine, cls)
    path = model.export_onnx(tmp_path / "bn.onnx")
    X = inputs(dtype)
    np.testing.assert_allclose(run_onnx(ort, path, X), model.predict(X), **TOLERANCE[dtype])
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops == ["Gemm", "BatchNormalization", "Tanh"]


def mixed_model(dtype="float32"):
    """Every layer type: Dropout (trained, p > 0), BatchNorm (trained statistics), Residual
    around a nested Sequential holding another Residual, activation layers, softmax."""
    bn = bp.BatchNorm1d(6, dtype=dtype)
    model = bp.Sequential([
        bp.Dropout(0.2, seed=1),
        bp.Dense(5, 6, activation="relu", rng=1, dtype=dtype), bn, bp.Dropout(0.5, seed=2),
        bp.Residual(bp.Sequential([
            bp.Dense(6, 6, activation="gelu", rng=2, dtype=dtype), bp.Dropout(0.3, seed=3),
            bp.Residual([bp.Dense(6, 6, rng=3, dtype=dtype), bp.SiLU(), bp.LeakyReLU(0.2)]),
            bp.ELU(0.5)])),
        bp.Dense(6, 3, activation="softmax", rng=4, dtype=dtype)])
    model.train()
    for _ in range(2):
        model.forward(model.prepare_input(inputs(dtype, n=12, seed=7) + 1.0))
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_residual_nested_sequential_dropout_and_batchnorm(ort, tmp_path, dtype):
    model = mixed_model(dtype)  # left in training mode: the export is the inference graph
    path = onnx_export.export_onnx(model, tmp_path / "mixed.onnx")
    X = inputs(dtype)
    tol = GELU_ERF64 if dtype == "float64" else TOLERANCE[dtype]
    np.testing.assert_allclose(run_onnx(ort, path, X), model.predict(X), **tol)
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert "Dropout" not in ops and ops.count("Add") >= 2 and ops[-1] == "Softmax"
    names = {t.name for t in graph.initializer}
    assert {"1.W", "2.running_var", "4.block.0.W", "4.block.2.block.0.b"} <= names


def test_flatten_of_3d_input(ort, tmp_path):
    model = bp.Sequential([bp.Flatten(), bp.Dense(12, 4, activation="tanh", rng=0),
                           bp.Softmax()]).eval()
    with pytest.raises(ONNXExportError, match="input_shape"):
        model.export_onnx(tmp_path / "f.onnx")
    with pytest.raises(ONNXExportError, match=r"layer 1 .*\(N, 12\).*\(N, 16\)"):
        model.export_onnx(tmp_path / "f.onnx", input_shape=(4, 4))
    assert not (tmp_path / "f.onnx").exists()
    path = model.export_onnx(tmp_path / "f.onnx", input_shape=(3, 4))
    X = np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(ort, path, X), model(X), **TOLERANCE["float32"])
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, 4]


def test_dynamic_batch_dimension(ort, tmp_path):
    model = trained_batchnorm("float32")
    path = model.export_onnx(tmp_path / "m.onnx")
    sess = session(ort, path)
    for n in (1, 7, 300):
        X = inputs("float32", n=max(n, 2))[:n]
        got = sess.run(None, {"input": X})[0]
        assert got.shape == (n, 4)
        np.testing.assert_allclose(got, model.predict(X), **TOLERANCE["float32"])


def test_every_supported_opset(ort, tmp_path):
    model = mixed_model()
    X = inputs("float32")
    want = model.predict(X)
    for opset in onnx_export.supported_opsets():
        path = model.export_onnx(tmp_path / f"m{opset}.onnx", opset=opset)
        proto = onnx.load(path)
        assert [o.version for o in proto.opset_import] == [opset]
        ops = {n.op_type for n in proto.graph.node}
        assert ("Gelu" in ops) == (opset >= onnx_export.GELU_OPSET)
        np.testing.assert_allclose(run_onnx(ort, path, X), want, **TOLERANCE["float32"])


def test_the_file_passes_the_checker_and_describes_itself(tmp_path):
    model = mixed_model()
    path = model.export_onnx(tmp_path / "m.onnx", input_name="x", output_name="probs",
                             metadata={"owner": "tests"})
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.producer_name == "backprop" and proto.producer_version == bp.__version__
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    assert proto.opset_import[0].version == onnx_export.DEFAULT_OPSET
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "x" and out.name == "probs"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 5]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 3]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["owner"] == "tests" and '"Residual"' in props["backprop.model"]


def test_dtype_casts_the_graph(ort, tmp_path):
    model = mixed_model("float64")
    path = model.export_onnx(tmp_path / "m.onnx", dtype="float32")
    X = inputs("float64")
    got = run_onnx(ort, path, X.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, model.predict(X), **TOLERANCE["float32"])


def test_standardization_and_softmax_are_added_to_the_graph(ort, tmp_path):
    model = bp.Sequential([bp.Dense(3, 2, rng=0)])
    mean, std = np.array([1.0, -2.0, 3.0]), np.array([2.0, 0.5, 4.0])
    X = inputs("float32", features=3)
    path = model.export_onnx(tmp_path / "s.onnx", input_standardization=(mean, std),
                             append_softmax=True)
    z = model.predict(((X - mean) / std).astype(np.float32)).astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(run_onnx(ort, path, X), p / p.sum(axis=1, keepdims=True),
                               **TOLERANCE["float32"])
    ymean, ystd = np.array([10.0, -1.0]), np.array([3.0, 0.25])
    path = model.export_onnx(tmp_path / "r.onnx", output_standardization=(ymean, ystd))
    np.testing.assert_allclose(run_onnx(ort, path, X), model.predict(X) * ystd + ymean,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ONNXExportError, match="3 finite values"):
        onnx_export.to_onnx(model, input_standardization=(mean[:2], std[:2]))
    with pytest.raises(ONNXExportError, match="no std 0"):
        onnx_export.to_onnx(model, input_standardization=(mean, np.zeros(3)))


def test_a_model_without_nodes_is_the_identity(ort, tmp_path):
    model = bp.Sequential([bp.Dropout(0.5), bp.Identity()])
    path = model.export_onnx(tmp_path / "id.onnx", input_shape=(3,))
    X = inputs("float32", features=3)
    np.testing.assert_array_equal(run_onnx(ort, path, X), X)


def test_a_model_is_exported_from_its_device(ort, tmp_path, device):
    model = mixed_model()  # on the device under test (CuPy arrays on a GPU)
    path = model.export_onnx(tmp_path / "m.onnx")
    X = inputs("float32")
    np.testing.assert_allclose(run_onnx(ort, path, X), bp.to_numpy(model.predict(X)),
                               **TOLERANCE["float32"])


# ---------------------------------------------------------------------------------------
# Errors: a clear message, nothing written, an existing file kept
class Custom(bp.Layer):
    preserves_shape = True

    def forward(self, x):
        return x


class MyDense(bp.Dense):
    pass


class MyActivation(activations.Activation):
    name = kernel = "relu"


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    return path


def assert_kept(path):
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left


@pytest.mark.parametrize("build, where", [
    (lambda: bp.Sequential([bp.Dense(2, 2), bp.Residual([bp.Dense(2, 2), Custom()])]),
     r"layer 1\.block\.1 \(Custom\(\), class .*Custom\)"),
    (lambda: bp.Sequential([MyDense(2, 2)]), r"layer 0 .*MyDense"),
    (lambda: bp.Sequential([bp.Dense(2, 2, activation=MyActivation())]),
     r"layer 0 .*its activation MyActivation\(\)"),
    (lambda: bp.Sequential([bp.Dense(2, 2), MyActivation()]), r"layer 1 \(MyActivation"),
])
def test_a_layer_without_an_onnx_form_is_named(existing, build, where):
    with pytest.raises(ONNXExportError, match=where):
        build().export_onnx(existing)
    assert_kept(existing)


@pytest.mark.parametrize("kwargs, message", [
    ({"opset": 12}, "from 13 to"),
    ({"opset": onnx_export.MAX_OPSET + 1}, "from 13 to"),
    ({"opset": "17"}, "whole number"),
    ({"opset": True}, "whole number"),
    ({"dtype": "float16"}, "float32 or float64"),
    ({"input_name": ""}, "non-empty"),
    ({"input_name": "x", "output_name": "x"}, "must differ"),
    ({"input_shape": (2, 0)}, "positive whole numbers"),
    ({"input_shape": (3,)}, r"\(N, 2\).*\(N, 3\)"),
    ({"metadata": {"a": 1}}, "str -> str"),
    ({"output_standardization": ([0.0], [1.0])}, "2 finite values"),
])
def test_bad_arguments_are_refused_before_writing(existing, kwargs, message):
    model = bp.Sequential([bp.Dense(2, 2)])
    with pytest.raises(ONNXExportError, match=message):
        onnx_export.export_onnx(model, existing, **kwargs)
    assert_kept(existing)


def test_bad_paths(tmp_path):
    model = bp.Sequential([bp.Dense(2, 2)])
    with pytest.raises(IsADirectoryError, match="directory"):
        model.export_onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.export_onnx(tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="file name"):
        model.export_onnx(3)
    with pytest.raises(ONNXExportError, match="Sequential or a layer"):
        onnx_export.export_onnx("not a model", tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_previous_file(existing, monkeypatch):
    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        bp.Sequential([bp.Dense(2, 2)]).export_onnx(existing)
    assert_kept(existing)


def test_an_existing_file_is_replaced_and_keeps_its_mode(existing):
    os.chmod(existing, 0o640)
    bp.Sequential([bp.Dense(2, 2)]).export_onnx(existing)
    assert onnx.load(existing).graph.node[0].op_type == "Gemm"
    assert os.stat(existing).st_mode & 0o777 == 0o640


def test_without_onnx_the_error_says_how_to_install_it(existing, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'backprop\[onnx\]'"):
        bp.Sequential([bp.Dense(2, 2)]).export_onnx(existing)
    assert_kept(existing)
