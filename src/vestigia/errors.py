"""Every exception Vestigia raises on bad input, and the checks that raise them.

Messages follow the Keras habit: name the argument, say what was expected, echo what was
received ("`damping` must be >= 0. Received: damping=-1.0").
"""

from __future__ import annotations

from typing import Any

import numpy as np


class InvalidDataError(ValueError):
    """A data set or array argument is unusable (unbatched, empty, wrong shape or dtype)."""


class InvalidModelError(ValueError):
    """A model, layer or loss argument is unusable (missing layer, reduced loss, ...)."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight or input holds NaN or Inf."""


class StoreMismatchError(ValueError):
    """An on-disk store was made with another model, data or settings, or is not a store."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_non_negative(name: str, value: float) -> float:
    """Return `value` as a float if it is a finite number >= 0, else raise `ValueError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number. Received: {name}={_describe(value)}") from None
    if not np.isfinite(number) or number < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
    return number


def check_positive_int(name: str, value: Any) -> int:
    """Return `value` as an int if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= 1. Received: {name}={_describe(value)}")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def check_finite(name: str, array: np.ndarray, what: str = "values") -> None:
    """Raise `NonFiniteError` naming `name` if `array` holds NaN or Inf."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise NonFiniteError(
            f"`{name}` holds {int((~finite).sum())} non-finite {what} (NaN or Inf), first at "
            f"index {tuple(int(i) for i in bad[0])}. Check the inputs, labels and weights."
        )
