"""Every exception Vestigia raises on bad input, and the checks that raise them.

Messages follow the Keras habit: name the argument, say what was expected, echo what was
received ("`damping` must be >= 0. Received: damping=-1.0").
"""

from __future__ import annotations

import os
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


def check_fraction(name: str, value: Any) -> float:
    """Return `value` as a float if it is a number in (0, 1], else raise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number in (0, 1]. Received: {name}={_describe(value)}") from None
    if not 0.0 < number <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1]. Received: {name}={value!r}")
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


class InsufficientMemoryError(MemoryError):
    """A dense allocation would not fit in the memory available; the message says what to use instead."""


class ConvergenceWarning(RuntimeWarning):
    """An iterative solver stopped before reaching its tolerance; its result is approximate."""


class SpectrumWarning(RuntimeWarning):
    """The curvature is indefinite or singular and was treated as documented (e.g. |lambda|, pinv)."""


def available_memory() -> int:
    """Bytes that a new allocation may use: `VESTIGIA_MEMORY_LIMIT_BYTES` if set, else the
    memory the operating system reports as available."""
    limit = os.environ.get("VESTIGIA_MEMORY_LIMIT_BYTES")
    if limit:
        return int(float(limit))
    try:
        import psutil
    except ImportError:  # psutil is optional: free pages as the operating system counts them
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def check_memory(what: str, n_bytes: int, alternatives: str) -> None:
    """Raise `InsufficientMemoryError` if `n_bytes` exceed the memory available.

    Args:
        what: the allocation, e.g. "the dense Hessian (7850 x 7850 float64)".
        n_bytes: its size.
        alternatives: what to use instead, said in the message.
    """
    available = available_memory()
    if n_bytes > available:
        raise InsufficientMemoryError(
            f"{what} needs {n_bytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB are available. {alternatives}"
        )
