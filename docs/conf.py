"""Sphinx configuration of the backprop documentation.

Build: ``make docs`` (or ``python -m sphinx -W --keep-going -n -E -b html docs build/docs/html``
with the ``docs`` extra installed). Warnings are errors and references are checked
(``-n``): a docstring that refers to a name that no longer exists fails the build.

The build never needs the network beyond pip: there is no intersphinx, so references to
NumPy, scikit-learn and the standard library stay plain text (``nitpick_ignore_regex``).
Optional dependencies (scikit-learn for :mod:`backprop.sklearn`) are mocked when they are not
installed, so the ``docs`` extra alone builds every page. The code examples of the pages are
run by ``tests/test_docs.py``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import types

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

import backprop

project = "backprop"
author = "the backprop authors"
copyright = "the backprop authors (MIT licence)"
release = version = backprop.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- autodoc -------------------------------------------------------------------------------
# One page per module (docs/api/). Modules define __all__, so :members: documents exactly
# the public names of each module; a name re-exported by another module is documented
# where it is defined (the pages exclude the re-exports).
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_mock_imports = [name for name in ("sklearn",) if importlib.util.find_spec(name) is None]

# -- references (-n) -----------------------------------------------------------------------
nitpick_ignore_regex = [
    # other projects' objects (type hints, base classes): no intersphinx, so no target
    ("py:.*", r"(numpy|np|cupy|sklearn|scipy|onnx|mpi4py|torch|pandas|_thread)(\.[\s\S]*)?"),
    # private names are not part of the reference (a docstring may still mention them)
    ("py:.*", r"(.+\.)?_[A-Za-z][^.]*"),
]

# -- MyST (the Markdown pages, design.md and scaling.md) -----------------------------------
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"backprop {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]


# -- hooks ---------------------------------------------------------------------------------
def _lookup(name: str):
    """The object that the dotted ``name`` denotes (a module, or attributes of one), or
    None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:  # noqa: BLE001 - a module that fails to import names nothing
            return None
        for attr in parts[i:]:
            try:
                obj = inspect.getattr_static(obj, attr)
            except AttributeError:
                return None
        return obj
    return None


def _documented_name(name: str) -> str | None:
    """Where the object that ``name`` denotes is defined: ``backprop.Dense`` ->
    ``backprop.layers.Dense``, ``backprop.Sequential.summary`` ->
    ``backprop.model.Sequential.summary``."""
    obj = _lookup(name)
    if obj is None:
        return None
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    obj = getattr(obj, "__func__", obj)  # staticmethod, classmethod
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}.{qualname}"
    head, _, attr = name.rpartition(".")  # a property or attribute: its owner's name
    owner = _documented_name(head) if head else None
    return f"{owner}.{attr}" if owner else None


def _resolve_reexport(app, env, node, contnode):
    """Resolve a Python reference that Sphinx could not: a name written as it is used rather
    than where it is defined (``backprop.save``, ``DataError`` inside a module that imports
    it, ``Sequential.summary``). The name is looked up in the module of the docstring, then
    in ``backprop``; it resolves only to an object that exists and is documented, so a
    stale name still fails the build."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    modname = node.get("py:module")
    candidates = [target, f"backprop.{target}"]
    if modname:
        candidates.insert(0, f"{modname}.{target}")
        if node.get("py:class"):
            candidates.insert(0, f"{modname}.{node['py:class']}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        full = _documented_name(candidate)
        if full and full in domain.objects:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                       full, node, contnode)
    return None


_LITERAL_SUMMARY = re.compile(r".*\S::$")


def _indent_literal_after_summary(app, what, name, obj, options, lines):
    """A docstring whose summary line introduces a literal block (``Adam (...)::``) has that
    block flush with the summary once Python strips the docstring's common indentation,
    which reStructuredText reads as no literal block at all. Indent it back."""
    if len(lines) > 2 and _LITERAL_SUMMARY.match(lines[0]) and not lines[1].strip() \
            and lines[2][:1] not in ("", " "):
        lines[2:] = ["    " + line if line.strip() else line for line in lines[2:]]


def _skip_sklearn_routing(app, what, name, obj, skip, options):
    """scikit-learn adds ``set_<method>_request`` to every estimator (metadata routing); they
    are scikit-learn's API, documented there, and their docstrings refer to its pages."""
    if re.fullmatch(r"set_\w+_request", name):
        return True
    return None


class CommandOutput(SphinxDirective):
    """``command-output``: run a ``python -m backprop ...`` command when the page is built and
    show it with its output, so that the output on the page is never stale. It runs in the
    build's process (``backprop.cli.main``: no interpreter to start per command); a command
    that fails fails the build."""

    required_arguments = 1
    final_argument_whitespace = True
    has_content = False
    # markdown: the output is Markdown (``explain``): rendered, its headings as bold lines
    option_spec = {"markdown": directives.flag}

    def run(self):
        from backprop import cli

        command = self.arguments[0]
        argv = shlex.split(command)
        if argv[:3] != ["python", "-m", "backprop"]:
            raise self.error(f"command-output runs 'python -m backprop ...' only: {command!r}")
        out = io.StringIO()
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "92"  # argparse wraps its help at $COLUMNS
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = cli.main(argv[3:])
        finally:
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        if status != 0:
            raise self.error(f"{command!r} exited with status {status}:\n{out.getvalue()}")
        caption = nodes.caption("", "", nodes.Text("output of "), nodes.literal(command, command))
        if "markdown" in self.options:
            lines = [re.sub(r"^#{1,6} (.*)$", r"**\1**", line)
                     for line in out.getvalue().rstrip().splitlines()]
            container = nodes.container("", classes=["command-output"])
            container += nodes.paragraph("", "", *caption.children)
            self.state.nested_parse(StringList(lines, source=command), 0, container)
            return [container]
        text = f"$ {command}\n{out.getvalue().rstrip()}"
        block = nodes.literal_block(text, text, language="text")
        container = nodes.container("", literal_block=True, classes=["literal-block-wrapper"])
        container += [caption, block]
        self.set_source_info(container)
        self.set_source_info(block)
        return [container]


def setup(app):
    app.add_directive("command-output", CommandOutput)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-process-docstring", _indent_literal_after_summary)
    app.connect("autodoc-skip-member", _skip_sklearn_routing)
    return {"parallel_read_safe": True}
