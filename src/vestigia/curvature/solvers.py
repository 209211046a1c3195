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
    """`solution (m, p)`, `iterations` run, final `residual_norms (m,)` (of `b - A x`, unpreconditioned),
    `converged (m,)` (the tolerance was reached) and `negative_curvature (m,)` (`p^T A p <= 0`, or
    `r^T M^-1 r <= 0`, met: `A`, or the preconditioner, is not positive definite on that row's
    Krylov space, which then stopped)."""

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
    preconditioner: Callable[[np.ndarray], np.ndarray] | None = None,
) -> CGResult:
    """Solve `A x = b` for every row `b` of `rhs` by (preconditioned) conjugate gradient, all rows together.

    Row `j` stops updating once `||r_j|| <= max(tol * ||b_j||, atol)`, `r = b - A x` the residual of
    the unpreconditioned system; the loop ends when every row has, or after `max_iterations`
    applications of `A` (which must be symmetric positive definite on the span of `rhs`). Each
    iteration applies `A` (and the preconditioner) to the rows still active only, in one call.

    With `preconditioner` (`M^-1`, mapping rows to rows, symmetric positive definite), the search
    directions are `M^-1`-conjugate (PCG): `z = M^-1 r`, `alpha = r.z / p.Ap`, `beta = r'.z' / r.z`;
    the closer `M` is to `A`, the fewer iterations.

    Returns:
        a `CGResult`.
    """
    apply = as_callable(operator)
    precondition = preconditioner if preconditioner is not None else (lambda rows: rows)
    b = np.asarray(rhs, dtype=np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", r, r))
    threshold = np.maximum(tol * norms, atol)
    active = np.flatnonzero(norms > threshold)
    p = np.zeros_like(b)
    rz = np.zeros(len(b))
    if active.size:
        z = np.asarray(precondition(r[active]), dtype=np.float64)
        p[active] = z
        rz[active] = np.einsum("ij,ij->i", r[active], z)
    negative = np.zeros(len(b), dtype=bool)
    iterations = 0
    with bar(max_iterations, "CG iterations") as progress:
        while active.size and iterations < max_iterations:
            directions = p[active]
            ap = np.asarray(apply(directions), dtype=np.float64)
            iterations += 1
            progress.advance()
            curvature = np.einsum("ij,ij->i", directions, ap)
            safe = (curvature > 0) & (rz[active] > 0)
            negative[active[~safe]] = True
            alpha = np.where(safe, rz[active] / np.where(safe, curvature, 1.0), 0.0)
            x[active] += alpha[:, None] * directions
            residual = r[active] - alpha[:, None] * ap
            r[active] = residual
            norms[active] = np.sqrt(np.einsum("ij,ij->i", residual, residual))
            going = safe & (norms[active] > threshold[active])
            active, residual, directions = active[going], residual[going], directions[going]
            if active.size:
                z = np.asarray(precondition(residual), dtype=np.float64)
                rz_new = np.einsum("ij,ij->i", residual, z)
                p[active] = z + (rz_new / rz[active])[:, None] * directions
                rz[active] = rz_new
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
