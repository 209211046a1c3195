"""Plain linear-algebra solvers on a matrix or a matrix-vector callable.

Every function takes `operator`, either a symmetric `(p, p)` array or a callable mapping
`(m, p)` rows to `(m, p)` rows, and right-hand sides `rhs` of shape `(m, p)`, and works in
float64 on all rows at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from vestigia.progress import bar, track

Operator = np.ndarray | Callable[[np.ndarray], np.ndarray]


def as_callable(operator: Operator) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a symmetric matrix as `rows -> rows @ matrix`; return callables unchanged."""
    if callable(operator):
        return operator
    matrix = np.asarray(operator, dtype=np.float64)
    return lambda rows: rows @ matrix.T


class CGResult(NamedTuple):
    """`solution (m, p)`, `iterations` run, final `residual_norms (m,)`, `converged (m,)` (the
    tolerance was reached) and `negative_curvature (m,)` (`p^T A p <= 0` met: `A` is not
    positive definite on that row's Krylov space, which then stopped)."""

    solution: np.ndarray
    iterations: int
    residual_norms: np.ndarray
    converged: np.ndarray
    negative_curvature: np.ndarray


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
        a `CGResult`.
    """
    apply = as_callable(operator)
    b = np.asarray(rhs, dtype=np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = np.einsum("ij,ij->i", r, r)
    threshold = np.maximum(tol * np.sqrt(rs), atol)
    active = np.sqrt(rs) > threshold
    negative = np.zeros(len(b), dtype=bool)
    iterations = 0
    with bar(max_iterations, "CG iterations") as progress:
        while active.any() and iterations < max_iterations:
            ap = apply(p)
            iterations += 1
            progress.advance()
            curvature = np.einsum("ij,ij->i", p, ap)
            safe = active & (curvature > 0)
            negative |= active & ~safe
            alpha = np.where(safe, rs / np.where(safe, curvature, 1.0), 0.0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = np.einsum("ij,ij->i", r, r)
            active = safe & (np.sqrt(rs_new) > threshold)
            beta = np.where(active, rs_new / np.where(rs > 0, rs, 1.0), 0.0)
            p = np.where(active[:, None], r + beta[:, None] * p, 0.0)
            rs = rs_new
    norms = np.sqrt(rs)
    return CGResult(x, iterations, norms, norms <= threshold, negative)


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
    for _ in track(range(iterations), "LiSSA iterations"):
        x = b + x - apply(x) / scale
    return x / scale


def stochastic_lissa(
    sample_operator: Callable[[np.random.Generator], Callable[[np.ndarray], np.ndarray]],
    rhs: np.ndarray,
    depth: int,
    repeats: int,
    scale: float,
    seed: int = 0,
) -> np.ndarray:
    """LiSSA in the stochastic form of its paper (Agarwal et al. 2017, Alg. 1).

    Each of `repeats` runs iterates `x_{j+1} = b + x_j - A_j x_j / scale` `depth` times, where
    `A_j = sample_operator(rng)` is the operator on a freshly drawn mini-batch (an unbiased
    estimate of `A`); the runs' `x / scale` are averaged.
    """
    b = np.asarray(rhs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    total = np.zeros_like(b)
    for _ in track(range(repeats), "LiSSA repeats"):
        x = b.copy()
        for _ in range(depth):
            x = b + x - sample_operator(rng)(x) / scale
        total += x
    return total / (repeats * scale)


def power_iteration(operator: Operator, n: int, iterations: int = 20, seed: int = 0) -> float:
    """Estimate of the largest `|lambda|` of a symmetric operator by power iteration.

    The Rayleigh quotient of the last iterate: a lower bound of `max|lambda|` that converges to
    it at the rate `|lambda_2 / lambda_1|` per step.
    """
    apply = as_callable(operator)
    x = np.random.default_rng(seed).normal(size=(1, n))
    x /= np.linalg.norm(x)
    estimate = 0.0
    for _ in range(iterations):
        y = np.asarray(apply(x), dtype=np.float64)
        estimate = abs(float(np.sum(x * y)))
        norm = float(np.linalg.norm(y))
        if not np.isfinite(norm) or norm == 0.0:
            break
        x = y / norm
    return max(estimate, float(np.linalg.norm(np.asarray(apply(x), dtype=np.float64))))
