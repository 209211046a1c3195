"""Plain linear-algebra solvers on a matrix or a matrix-vector callable.

Every function takes `operator`, either a symmetric `(p, p)` array or a callable mapping
`(m, p)` rows to `(m, p)` rows, and right-hand sides `rhs` of shape `(m, p)`, and works in
float64 on all rows at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Operator = np.ndarray | Callable[[np.ndarray], np.ndarray]


def as_callable(operator: Operator) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a symmetric matrix as `rows -> rows @ matrix`; return callables unchanged."""
    if callable(operator):
        return operator
    matrix = np.asarray(operator, dtype=np.float64)
    return lambda rows: rows @ matrix.T


class CGResult(NamedTuple):
    solution: np.ndarray
    iterations: int
    residual_norms: np.ndarray


def conjugate_gradient(
    operator: Operator,
    rhs: np.ndarray,
    max_iterations: int = 100,
    tol: float = 1e-5,
    atol: float = 1e-10,
) -> CGResult:
    """Solve `A x = b` for every row `b` of `rhs` by conjugate gradient, all rows together.

    Row `j` stops updating once `||r_j|| <= max(tol * ||b_j||, atol)`; the loop ends when every
    row has, or after `max_iterations` applications of `A` (which must be symmetric positive
    definite on the span of `rhs`).

    Returns:
        `CGResult(solution (m, p), iterations, residual_norms (m,))`.
    """
    apply = as_callable(operator)
    b = np.asarray(rhs, dtype=np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = np.einsum("ij,ij->i", r, r)
    threshold = np.maximum(tol * np.sqrt(rs), atol)
    active = np.sqrt(rs) > threshold
    iterations = 0
    while active.any() and iterations < max_iterations:
        ap = apply(p)
        iterations += 1
        curvature = np.einsum("ij,ij->i", p, ap)
        safe = active & (curvature > 0)
        alpha = np.where(safe, rs / np.where(safe, curvature, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_new = np.einsum("ij,ij->i", r, r)
        active = safe & (np.sqrt(rs_new) > threshold)
        beta = np.where(active, rs_new / np.where(rs > 0, rs, 1.0), 0.0)
        p = np.where(active[:, None], r + beta[:, None] * p, 0.0)
        rs = rs_new
    return CGResult(x, iterations, np.sqrt(rs))


def lissa(
    operator: Operator,
    rhs: np.ndarray,
    iterations: int = 100,
    scale: float = 10.0,
) -> np.ndarray:
    """LiSSA (Agarwal et al. 2017) on the full operator: `A^-1 b` as a truncated Neumann series.

    `x_{j+1} = b + x_j - A x_j / scale`, returning `x / scale`; it converges to `A^-1 b` when
    `scale > lambda_max(A)` and `A` is positive definite. Put damping into `A`.
    """
    apply = as_callable(operator)
    b = np.asarray(rhs, dtype=np.float64)
    x = b.copy()
    for _ in range(iterations):
        x = b + x - apply(x) / scale
    return x / scale
