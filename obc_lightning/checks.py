"""Argument checks shared by the public entry points.

Each raises ``ValueError("<who>: <name> must be ..., got <value>")`` so that a bad argument is named
with the function or class it was given to, before anything (a model, a Hessian) is touched. ``bool``
is refused where a number is expected: ``True`` is an ``int`` to Python, never a count or a rate here.
"""

from __future__ import annotations

import math


def is_number(x) -> bool:
    """A finite int or float, not a bool."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def check_flags(who: str, **flags) -> None:
    """Every value is a bool."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{who}: {name} must be a bool, got {value!r}")


def check_positive_int(who: str, name: str, value, *, optional: bool = False) -> None:
    """An int >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive integer{_or_none(optional)}, got {value!r}")


def check_int(who: str, name: str, value, minimum: int, *, optional: bool = False) -> None:
    """An int >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}{_or_none(optional)}, got {value!r}")


def check_nonnegative(who: str, name: str, value, *, optional: bool = False) -> None:
    """A finite number >= 0 (or None when ``optional``)."""
    if optional and value is None:
        return
    if not is_number(value) or value < 0:
        raise ValueError(f"{who}: {name} must be a finite number >= 0{_or_none(optional)}, got {value!r}")


def check_positive(who: str, name: str, value, *, optional: bool = False) -> None:
    """A finite number > 0 (or None when ``optional``)."""
    if optional and value is None:
        return
    if not is_number(value) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive number{_or_none(optional)}, got {value!r}")


def check_fraction(who: str, name: str, value) -> None:
    """A number in (0, 1]."""
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{who}: {name} must be in (0, 1], got {value!r}")
