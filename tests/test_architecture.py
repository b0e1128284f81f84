"""The architecture rule of the activations (issue 18): each activation is one record in
``kernels/activations.py``, and no other module dispatches on its name.

Measured: the non-docstring string literals of the library's code (``backprop/`` and
``kernels/``, every ``.py`` but the records module itself) that *equal* an activation's name
or alias. Each name may appear in at most one such file (so in at most two library source
files, the records included), apart from:

- ``identity``: the "no activation" value that the layers, the graph and the fusion logic
  test for, not an activation's logic;
- ``EXTERNAL``: names that are another library's vocabulary (scikit-learn's ``activation``
  values, PyTorch's ``GELU(approximate="tanh")``), which happen to equal a record's name.

Docstrings and comments are free to name activations; a message string is not (word it
from the records instead)."""
from __future__ import annotations

import ast
from pathlib import Path

from backprop.kernels.activations import RECORDS

ROOT = Path(__file__).resolve().parent.parent
RECORDS_MODULE = ROOT / "kernels" / "activations.py"
EXEMPT = {"identity"}
EXTERNAL = {
    ("backprop/sklearn.py", "relu"),      # scikit-learn's activation='relu' | 'tanh' |
    ("backprop/sklearn.py", "tanh"),      # 'logistic' (mapped to 'sigmoid') | 'identity'
    ("backprop/sklearn.py", "sigmoid"),
    ("backprop/activations.py", "tanh"),  # GELU(approximate="none" | "tanh"), as PyTorch's
}
LIMIT = 1  # files besides the records module


def library_files():
    files = [p for d in ("backprop", "kernels") for p in sorted((ROOT / d).rglob("*.py"))
             if p != RECORDS_MODULE and "__pycache__" not in p.parts]
    assert len(files) > 20
    return files


def string_literals(path: Path) -> set:
    """The string constants of ``path``'s code, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docstrings}


def activation_names() -> set:
    return {n for r in RECORDS.values() for n in (r.name, *r.aliases)}


def files_naming() -> dict:
    """activation name -> the library files (relative paths) whose code has it as a string."""
    literals = {p.relative_to(ROOT).as_posix(): string_literals(p) for p in library_files()}
    return {name: sorted(f for f, strings in literals.items() if name in strings)
            for name in sorted(activation_names())}


def test_no_activation_name_is_spread_over_the_library():
    found = files_naming()
    too_many = {name: files for name, files in found.items() if name not in EXEMPT
                and len([f for f in files if (f, name) not in EXTERNAL]) > LIMIT}
    assert not too_many, (
        f"activation names in the code of more than {LIMIT} library file(s) besides "
        f"kernels/activations.py: {too_many}; derive the logic from the records (a flag or "
        "field of ActivationDef) instead of naming the activations")
    stale = sorted(pair for pair in EXTERNAL if pair[0] not in found[pair[1]])
    assert not stale, f"EXTERNAL entries that no longer occur (remove them): {stale}"


def test_the_exporter_and_the_gradient_monitor_name_no_activation():
    """The ONNX exporter builds every activation from its record, the gradient monitor reads
    the records' flags: neither names an activation (the row operations softmax and
    log_softmax are not records)."""
    found = files_naming()
    for module in ("backprop/onnx_export.py", "backprop/gradient_health.py"):
        named = sorted(name for name, files in found.items() if module in files)
        assert not named, f"{module} names the activations {named}"


def test_the_flags_come_from_the_records():
    from backprop import init, onnx_export
    from backprop.gradient_health import SATURATING

    assert SATURATING == {n for n, r in RECORDS.items() if r.saturating} != set()
    assert init.RELU_LIKE == {n for n, r in RECORDS.items() if r.relu_like}
    assert set(onnx_export.ACTIVATION_OPS) == set(RECORDS) | {"softmax", "log_softmax"}
