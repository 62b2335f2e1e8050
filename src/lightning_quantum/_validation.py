"""Argument checks shared by the whole package.

Each check raises with a message that names the argument in backticks, shows the value it got and
says what is valid. Pure functions raise ``ValueError``; callbacks pass
``MisconfigurationException`` as ``error`` so Lightning users see the error type they expect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_choice",
    "check_finite",
    "check_positive",
    "check_positive_int",
    "check_non_negative",
    "check_fraction",
    "check_optional_step",
    "check_name_lists",
]


def check_choice(name: str, value: Any, choices: Iterable[Any], *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it is one of ``choices``; raise ``error`` naming all choices otherwise."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise error(f"`{name}`={value!r} is not valid. Choose one of: {listed}.")
    return value


def _is_finite_number(value: Any) -> bool:
    # NaN compares false with everything, so a range check alone lets it through (`nan < 0` is False)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_finite(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it is a finite number (not NaN, not infinite)."""
    if not _is_finite_number(value):
        raise error(f"`{name}`={value!r} is not valid. It must be a finite number.")
    return value


def check_positive(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it is a finite number greater than zero."""
    if not _is_finite_number(value) or not value > 0:
        raise error(f"`{name}`={value!r} is not valid. It must be a finite number greater than 0.")
    return value


def check_positive_int(name: str, value: Any, *, error: type[Exception] = ValueError) -> int:
    """Return ``value`` when it is an integer (not a bool) of 1 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"`{name}`={value!r} is not valid. It must be a positive integer.")
    return value


def check_non_negative(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it is a finite number greater than or equal to zero."""
    if not _is_finite_number(value) or not value >= 0:
        raise error(f"`{name}`={value!r} is not valid. It must be a finite number greater than or equal to 0.")
    return value


def check_fraction(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it lies in [0, 1)."""
    if not _is_finite_number(value) or not 0 <= value < 1:
        raise error(f"`{name}`={value!r} is not valid. It must lie in [0, 1).")
    return value


def check_optional_step(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` when it is ``None`` or an integer >= 0 (a step or epoch number)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise error(f"`{name}`={value!r} is not valid. It must be an integer >= 0, or None.")
    return value


def check_name_lists(error: type[Exception] = ValueError, **lists: Any) -> None:
    """Raise when any of the given module-name arguments is a single string instead of a list."""
    single = [name for name, value in lists.items() if isinstance(value, str)]
    if single:
        names = " and ".join(f"`{n}`" for n in lists)
        raise error(f"{names} take lists of strings, not a single string (got {single[0]}={lists[single[0]]!r}).")
