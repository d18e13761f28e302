"""Argument checks shared by the ops and the runtime helpers: a clear TypeError naming the argument."""

from __future__ import annotations

import operator


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int: ints and numpy integers pass, bools and floats do not."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def as_flag(value: object, name: str) -> bool:
    """``value`` as a bool: Python and numpy bools pass; 0, 1, strings and None do not."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
