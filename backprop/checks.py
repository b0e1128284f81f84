"""Argument checks shared by the public entry points: each returns the value in canonical
form or raises ``TypeError`` (wrong kind of value) / ``ValueError`` (right kind, bad value)
with a message that names the argument, what was given and what is expected."""
from __future__ import annotations

import math
import numbers
import os

import numpy as np

__all__ = ["integer", "flag", "fraction", "non_negative", "env_choice"]


def integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int: an integral number (NumPy integers included; bools, floats,
    strings are refused, since ``int()`` would silently truncate or reinterpret them), at
    least ``minimum`` when given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def flag(name: str, value) -> bool:
    """``value`` as a bool: only True/False (and NumPy bools) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return bool(value)


def fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a float in ``[low, high)``: a real number, not a bool, not NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (low <= value < high) or math.isnan(value):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}); got {value!r}")
    return value


def _finite_bound(name: str, value, strict: bool) -> float:
    """``value`` as a finite float ``> 0`` (strict) or ``>= 0``: a real number, not a bool,
    not NaN or inf."""
    bound = "> 0" if strict else ">= 0"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bound}; got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return value


def non_negative(name: str, value) -> float:
    """``value`` as a finite float >= 0: a real number, not a bool, not NaN or inf."""
    return _finite_bound(name, value, strict=False)


def positive(name: str, value) -> float:
    """``value`` as a finite float > 0: a real number, not a bool, not NaN or inf."""
    return _finite_bound(name, value, strict=True)


def env_choice(variable: str, choices, default: str) -> str:
    """The environment variable ``variable`` as one of ``choices`` (case and surrounding
    spaces ignored; unset or empty: ``default``), or ``ValueError`` naming the variable, the
    choices and what it holds."""
    wanted = os.environ.get(variable, default).strip().lower() or default
    if wanted not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}; got {wanted!r}")
    return wanted
