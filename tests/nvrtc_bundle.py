"""Compile many CUDA kernels in one NVRTC program, so that the tests that compile every CuPy
kernel without a GPU parse CuPy's headers once per group, not once per kernel.

Why: an NVRTC program spends most of its time on the headers (CuPy's ``carray.cuh`` and the
CCCL headers it pulls in); one kernel's own code is a small part. Compiled one at a time, the
CuPy backend's elementwise kernels took about a quarter of a second each, over a hundred of
them per dtype; in one program, the whole group about as long as five of them.

How the kernels are kept apart, so that each still compiles as it would alone:

* each kernel's source is wrapped in ``namespace bp_case_<i> { ... }``: its typedefs
  (``typedef float T;``), helper templates and preamble are visible to it alone. Its
  ``extern "C" __global__`` entry keeps its plain name (C linkage ignores the namespace), so
  the cubin and PTX name it as the standalone program would;
* ``#include`` lines cannot go inside a namespace: they are hoisted to the top. Kernels are
  grouped by the set of headers they include (and by their compiler options), so no kernel
  sees a header it did not include itself;
* a group that fails to compile is not reported as a whole: the caller compiles each of its
  kernels alone (:meth:`Bundles.compiled`), so the failure names the broken kernel with
  NVRTC's message for its own source.
"""
from __future__ import annotations

import re
from typing import Callable

_INCLUDE = re.compile(r"^\s*#\s*include\b.*$", re.MULTILINE)


def split_includes(source: str) -> tuple[frozenset, str]:
    """``(include lines, the source without them)``."""
    includes = frozenset(line.strip() for line in _INCLUDE.findall(source))
    return includes, _INCLUDE.sub("", source)


def bundle(sources: list[str]) -> str:
    """One program holding every source of ``sources`` in its own namespace, their
    ``#include`` lines first (each once)."""
    includes: set = set()
    bodies = []
    for i, source in enumerate(sources):
        own, body = split_includes(source)
        includes |= own
        bodies.append(f"namespace bp_case_{i} {{\n{body}\n}}  // bp_case_{i}\n")
    return "\n".join(sorted(includes)) + "\n" + "".join(bodies)


def ptx_of_entry(ptx: str, name: str) -> str:
    """The PTX of the kernel ``name`` alone: from its ``.entry`` to the next entry (the
    helpers it calls are inlined: ``__forceinline__``)."""
    start = re.search(rf"\.entry\s+{re.escape(name)}\s*\(", ptx)
    assert start, f"no .entry {name} in the PTX"
    following = re.search(r"\.entry\s+\w+\s*\(", ptx[start.end():])
    return ptx[start.start():start.end() + following.start() if following else len(ptx)]


class Bundles:
    """The compiled groups of one set of kernels.

    ``sources()`` gives ``{kernel name: (source, options)}`` for every kernel of the set
    (called once, on first use); ``compile(source, options, key)`` compiles one program and
    returns its code (cubin bytes or PTX text) for the compile settings ``key`` (e.g. an
    architecture and an output kind)."""

    def __init__(self, sources: Callable[[], dict], compile: Callable):
        self._sources_fn = sources
        self._compile = compile
        self._sources: dict | None = None
        self._done: dict = {}  # (group, key) -> code, or the exception of the group

    def _group_of(self, name):
        if self._sources is None:
            self._sources = self._sources_fn()
        source, options = self._sources[name]
        group = (split_includes(source)[0], tuple(options))
        members = sorted(n for n, (s, o) in self._sources.items()
                         if (split_includes(s)[0], tuple(o)) == group)
        return group, members

    def compiled(self, name: str, source: str, key=None):
        """The code of the program holding ``name``, whose source must be ``source``
        (compiled once per group and ``key``); where the group's program fails, ``name``
        alone is compiled, so that its own error, if any, is raised."""
        group, members = self._group_of(name)
        assert self._sources[name][0] == source, f"{name}: not the source of the set"
        options = group[1]
        if (group, key) not in self._done:
            program = bundle([self._sources[m][0] for m in members])
            try:
                self._done[(group, key)] = self._compile(program, options, key)
            except Exception as exc:  # a broken kernel somewhere in the group
                self._done[(group, key)] = exc
        code = self._done[(group, key)]
        if isinstance(code, Exception):
            return self._compile(self._sources[name][0], options, key)
        return code
