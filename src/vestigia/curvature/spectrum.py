"""What a solver does with the spectrum of `H + damping I`: the singular cut and indefinite Hessians.

With eigenvalues `lambda_j` of the damped Hessian (regularisation included) and
`tol = rcond * max_j |lambda_j|`:

* **singular** directions, `|lambda_j| <= tol`, are dropped (Moore-Penrose pseudo-inverse):
  their `1 / lambda_j` is set to 0. Only these are cut, and how many is reported (a
  `SpectrumWarning` and the solver's `n_dropped`). The default `rcond` is
  `10 * sqrt(n_params) * eps(float32)`: a Hessian whose entries carry float32 round-off of
  relative size `eps` has eigenvalues uncertain by about `sqrt(n_params) * eps * max|lambda|`,
  so anything below is indistinguishable from 0.
* **negative** directions, `lambda_j < -tol`, mean that the model is not at a minimum of its
  training loss or that the head is not convex. `indefinite` says what to do:

  - `"abs"` (default): use `|lambda_j|`, i.e. `H^-1 -> Q diag(1 / |lambda|) Q^T`, the inverse of
    the positive definite matrix closest to `H` in every eigendirection (as a saddle-free Newton
    step). Influence keeps its sign convention and self-influence `g^T H^-1 g >= 0`;
  - `"signed"`: the plain (pseudo-)inverse; self-influence can then be negative;
  - `"raise"`: refuse with `InvalidModelError`.

  Every choice but `"raise"` warns with the number of negative eigenvalues and the smallest.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from vestigia.errors import InvalidModelError, SpectrumWarning, check_non_negative

INDEFINITE_CHOICES = ("abs", "signed", "raise")


def default_rcond(n_params: int) -> float:
    """`10 * sqrt(n_params) * eps(float32)`: the round-off level of a float32-summed Hessian's spectrum."""
    return float(10.0 * np.sqrt(n_params) * np.finfo(np.float32).eps)


def resolve_rcond(rcond: float | None, n_params: int) -> float:
    """`rcond` checked (>= 0), or the default for `n_params`."""
    return default_rcond(n_params) if rcond is None else check_non_negative("rcond", rcond)


def check_indefinite(indefinite: str) -> str:
    """Return `indefinite` if it is one of `INDEFINITE_CHOICES`, else raise `ValueError`."""
    if indefinite not in INDEFINITE_CHOICES:
        raise ValueError(f"`indefinite` must be one of {INDEFINITE_CHOICES}. Received: indefinite={indefinite!r}")
    return indefinite


class SpectrumReport(NamedTuple):
    """How a solver treated the spectrum: `n_negative` eigenvalues below `-tol`, `n_dropped`
    with `|lambda| <= tol` (set to 0), out of `n_total`; `min_eigenvalue`, `tol`."""

    n_negative: int
    n_dropped: int
    n_total: int
    min_eigenvalue: float
    tol: float


def inverse_eigenvalues(
    eigenvalues: np.ndarray, rcond: float, indefinite: str, solver: str
) -> tuple[np.ndarray, SpectrumReport]:
    """`1 / lambda` as the module docstring says (cut, sign policy), with the report.

    Args:
        eigenvalues: eigenvalues of the damped Hessian, float64 `(k,)`.
        rcond: relative cut-off of singular directions.
        indefinite: "abs", "signed" or "raise".
        solver: the solver's name, for messages.

    Raises:
        InvalidModelError: negative eigenvalues with `indefinite="raise"`.
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    tol = rcond * float(np.max(np.abs(values), initial=0.0))
    negative = values < -tol
    singular = np.abs(values) <= tol
    report = SpectrumReport(
        int(negative.sum()), int(singular.sum()), len(values), float(np.min(values, initial=np.inf)), tol
    )
    if report.n_negative:
        text = (
            f"{solver}: {report.n_negative} of {len(values)} eigenvalues of the damped Hessian are negative "
            f"(smallest {report.min_eigenvalue:.3g}): the model is not at a minimum of its training loss, or the "
            "head is not convex."
        )
        if indefinite == "raise":
            raise InvalidModelError(
                f"{text} Received: indefinite='raise'. Train to convergence, add damping above "
                f"{-report.min_eigenvalue:.3g}, or pass indefinite='abs' (invert |lambda|, self-influence >= 0)."
            )
        how = (
            "Inverting |lambda| (indefinite='abs'), so self-influence stays >= 0."
            if indefinite == "abs"
            else "Inverting the signed eigenvalues (indefinite='signed'): self-influence can be negative."
        )
        warnings.warn(f"{text} {how}", SpectrumWarning, stacklevel=3)
        if indefinite == "abs":
            values = np.abs(values)
    if report.n_dropped:
        warnings.warn(
            f"{solver}: {report.n_dropped} of {len(values)} eigenvalues of the damped Hessian are singular "
            f"(|lambda| <= rcond * max|lambda| = {tol:.3g}) and are treated as zero (pseudo-inverse). Pass a "
            "smaller `rcond` to keep more, or damping > 0 to make every direction invertible.",
            SpectrumWarning,
            stacklevel=3,
        )
    inverse = np.where(singular, 0.0, 1.0 / np.where(singular, 1.0, values))
    return inverse, report
