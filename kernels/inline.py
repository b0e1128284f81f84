"""Calls from Numba-compiled code that LLVM always inlines (for the Numba CPU kernels).

A kernel's inner loop vectorises only if every function it calls is inlined into it. Numba's
own ``inline="always"`` splices the callee's Numba IR into the caller and types it again at
every call site; nested as the activations are (GELU → ``ndtr`` → ``exp`` → its range
reduction) that took 8 s of compilation per kernel specialisation. A plain call leaves the
choice to LLVM's cost model, which keeps a large callee (a whole activation) out of line in
some kernels, and their loops then run one element at a time.

:func:`inlined` gives the call itself LLVM's ``alwaysinline`` attribute: the callee is an
ordinary ``njit`` function, compiled once per process and signature, and LLVM inlines it
into each caller before it vectorises the caller's loops.

The caller is also marked to prefer the CPU's widest vectors (:data:`WIDE_VECTORS`). On
cores with AVX-512, LLVM vectorises to 256 bits by default (wide instructions used briefly
in scalar code can lower the clock for longer than they save); the functions inlined here
are the arithmetic of loops that run for the whole kernel, and 512-bit vectors make the
``exp``-heavy ones 1.3 to 1.8 times faster (sigmoid, GELU, softplus; softmax less, whose
loops do little else but load and store). Without AVX-512 the registers' width caps the
preference, and nothing changes.
"""
from __future__ import annotations

import inspect

from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import lower_builtin
from numba.extending import type_callable

WIDE_VECTORS = '"prefer-vector-width"="512"'
"""The LLVM function attribute that the caller of an inlined function gets."""

FLAGS = dict(error_model="numpy", fastmath={"contract"})
"""How the implementations are compiled: division by zero gives inf/NaN as in NumPy (the
Python model tests and branches before every division, which stops vectorisation), and
``a·b + c`` may become one FMA; never ``nnan``/``ninf`` (NaN and inf must propagate)."""


def jit(fn):
    """``fn`` compiled with :data:`FLAGS` (a helper that the implementations call; LLVM
    inlines such small functions by itself)."""
    return njit(**FLAGS)(fn)


def inlined(select):
    """Decorator of a Python function ``stub``. Called from compiled code, ``stub(*args)``
    runs ``select(*numba_types_of_args)`` instead: a Python function (compiled with
    :func:`jit`) or a Numba dispatcher, or None where the stub has no such signature; the
    call is inlined. String-literal arguments only choose the implementation, at compile
    time, and are not passed to it. Called from Python, the stub runs as written."""
    def register(stub):
        results: dict = {}  # argument types -> compile result (select may build a new closure)

        def compiled(argtypes):
            """The compile result of the implementation for ``argtypes`` (None if none)."""
            if argtypes not in results:
                impl = select(*argtypes)
                result = None
                if impl is not None:
                    dispatcher = impl if hasattr(impl, "overloads") else jit(impl)
                    passed = tuple(types.unliteral(t) for t in argtypes
                                   if not isinstance(t, types.StringLiteral))
                    dispatcher.compile(passed)
                    result = dispatcher.overloads[passed]
                results[argtypes] = result
            return results[argtypes]

        @type_callable(stub)
        def type_stub(context):
            def typer(*argtypes):
                result = compiled(argtypes)
                return None if result is None else result.signature.return_type

            typer.__signature__ = inspect.signature(stub)  # arguments bind as the stub's
            return typer

        @lower_builtin(stub, types.VarArg(types.Any))
        def call_inlined(context, builder, sig, args):
            result = compiled(sig.args)
            values = [context.cast(builder, value, t, types.unliteral(t))
                      for value, t in zip(args, sig.args)
                      if not isinstance(t, types.StringLiteral)]
            # a string attribute: llvmlite's attribute set checks names against the
            # enumerated attributes only, hence the plain set method
            set.add(builder.function.attributes, WIDE_VECTORS)
            context.add_linking_libs([result.library])
            callee = context.declare_function(builder.module, result.fndesc)
            status, value = context.call_conv.call_function(
                builder, callee, result.signature.return_type, result.signature.args, values,
                attrs=("alwaysinline",))
            with cgutils.if_unlikely(builder, status.is_error):
                context.call_conv.return_status_propagate(builder, status)
            return value

        return stub

    return register
