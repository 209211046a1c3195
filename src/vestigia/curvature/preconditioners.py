"""Preconditioners `M^-1` for conjugate gradient on `H` (damping and regularisation included).

Each builder returns a callable mapping float64 rows `(m, n_params)` to rows, symmetric positive
definite, for `vestigia.curvature.solvers.conjugate_gradient`.

* `class_block_preconditioner`: one watched `Dense` layer, parameters in the row-major
  `(in, out)` order. Block-Jacobi inverts the class-diagonal blocks `D_c = S_c + A^T diag(M[:, c, c]) A / n`.
  When every output curvature has rows summing to zero, `M_i 1 = 0` (softmax cross-entropy:
  the logits' common shift does not change the probabilities), and the shift `S` (damping plus
  L2 regularisation) is equal across the classes of each input, the "class-mean" directions
  `V = w 1^T` form an invariant subspace of `H`, on which `H = S` exactly, while `D` there holds
  the large class-diagonal curvature: those are the directions that block-Jacobi gets wrong
  (the smallest eigenvalues of `D^-1 H`). The preconditioner then splits them off, with
  `Z` the orthogonal projector onto them (the mean over the classes of each input):

      M^-1 = Z S^-1 Z + (I - Z) D^-1 (I - Z),

  exact on the invariant subspace and block-Jacobi on its complement.
* `nystrom_preconditioner`: any `H`, through its products only (Frangella, Tropp and Udell
  2023): a randomised rank-`l` Nystrom approximation `U diag(lam) U^T` of `H - mu I` (`mu` the
  smallest shift, so that `H - mu I` is positive semi-definite) from one product with `l`
  random vectors, and

      M^-1 = (lam_l + mu) U diag(lam + mu)^-1 U^T + (I - U U^T),

  which maps the top `l` eigenvalues of `H` close to `lam_l + mu` and leaves the rest.

References:
    Frangella, Tropp, Udell, "Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl. 44 (2023).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

Preconditioner = Callable[[np.ndarray], np.ndarray]
ROW_SUM_RTOL = 1e-5  # `M_i 1 = 0` to float32 round-off of the curvature (softmax: ~1e-8 of max|M|)
NYSTROM_FLOOR = 1e-10  # sketch eigenvalues below this fraction of the largest are dropped (round-off)


def has_class_invariance(curvatures: list[np.ndarray], shift: np.ndarray, rtol: float = ROW_SUM_RTOL) -> bool:
    """True if every output curvature `M_i` `(n, out, out)` has rows summing to zero (to `rtol *
    max|M|`) and the shift `S` `(in, out)` is equal across the classes of each input: then the
    class-mean directions `w 1^T` are an invariant subspace of `H`, with `H = S` on it."""
    if shift.shape[1] < 2 or not np.all(shift == shift[:, :1]):
        return False
    scale = max((max(float(m.max(initial=0.0)), -float(m.min(initial=0.0))) for m in curvatures), default=0.0)
    return all(float(np.abs(m.sum(axis=2, dtype=np.float64)).max(initial=0.0)) <= rtol * scale for m in curvatures)


def class_block_preconditioner(inverses: np.ndarray, invariant_shift: np.ndarray | None = None) -> Preconditioner:
    """Block-Jacobi `D^-1` from the inverse class blocks `inverses` `(out, in, in)`; with
    `invariant_shift` (`s` `(in,)`, the class-uniform shift, given only when `has_class_invariance`
    holds), `Z S^-1 Z + (I - Z) D^-1 (I - Z)` as the module docstring says.

    The blocks are applied in float32 (one batched TensorFlow matrix product, ~4x faster than
    float64 on a CPU), the precision of the solvers' HVPs: the preconditioner steers the path,
    while the stopping test stays on the residual of `H` itself.
    """
    n_out, n_in = inverses.shape[:2]
    blocks = tf.constant(inverses, tf.float32)

    def block_apply(rows: np.ndarray) -> np.ndarray:
        by_class = tf.constant(rows.reshape(len(rows), n_in, n_out).transpose(2, 0, 1), tf.float32)  # (out, m, in)
        solved = tf.matmul(by_class, blocks).numpy().astype(np.float64)
        return solved.transpose(1, 2, 0).reshape(rows.shape)

    if invariant_shift is None:
        return block_apply
    inverse_shift = 1.0 / np.asarray(invariant_shift, np.float64)[None, :, None]

    def apply(rows: np.ndarray) -> np.ndarray:
        shaped = rows.reshape(len(rows), n_in, n_out)
        mean = shaped.mean(axis=2, keepdims=True)
        solved = block_apply((shaped - mean).reshape(rows.shape)).reshape(shaped.shape)
        solved -= solved.mean(axis=2, keepdims=True)
        return (solved + mean * inverse_shift).reshape(rows.shape)

    return apply


def nystrom_approximation(
    operator: Preconditioner, n: int, rank: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """`(U (n, r), lam (r,), lam_l)`, `r <= rank`, with `U diag(lam) U^T` the randomised Nystrom
    approximation `Y (Omega^T Y)^+ Y^T`, `Y = A Omega`, of a positive semi-definite `A` (rows to
    rows), `Omega` `(n, rank)` orthonormal Gaussian: one product of `A` with `rank` vectors.

    The core `Omega^T Y` is symmetrised and pseudo-inverted through its eigendecomposition
    (eigenvalues below `NYSTROM_FLOOR` of the largest dropped), which keeps the result positive
    semi-definite when the products carry round-off (float32 HVPs) instead of failing a Cholesky.
    `lam_l` is the sketch's `rank`-th eigenvalue: the smallest of `lam`, or 0 when some were dropped
    (`A` of lower rank than the sketch).
    """
    rank = min(rank, n)
    omega = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, rank)))[0]
    sketch = np.asarray(operator(omega.T), dtype=np.float64).T  # (n, rank)
    core = omega.T @ sketch
    values, vectors = np.linalg.eigh((core + core.T) / 2)
    keep = values > NYSTROM_FLOOR * max(float(values.max(initial=0.0)), 0.0)
    if not keep.any():
        return np.zeros((n, 0)), np.zeros(0), 0.0
    factor = sketch @ (vectors[:, keep] / np.sqrt(values[keep]))
    basis, singular, _ = np.linalg.svd(factor, full_matrices=False)
    eigenvalues = singular**2
    return basis, eigenvalues, float(eigenvalues[-1]) if keep.all() else 0.0


def nystrom_preconditioner(basis: np.ndarray, eigenvalues: np.ndarray, smallest: float, mu: float) -> Preconditioner:
    """`(lam_l + mu) U diag(lam + mu)^-1 U^T + (I - U U^T)` for `A + mu I` with `A ~ U diag(lam) U^T`
    (`lam_l = smallest`, from `nystrom_approximation`); symmetric positive definite when
    `lam_l + mu > 0`.

    Raises:
        ValueError: `lam_l + mu <= 0` (a singular `H` and no damping).
    """
    if not len(eigenvalues):
        return lambda rows: rows
    floor = smallest + mu
    if floor <= 0:
        raise ValueError(
            f"preconditioner='nystrom' needs H positive definite: the smallest sketched eigenvalue plus the shift is "
            f"{floor:g}. Add damping."
        )
    scale = floor / (eigenvalues + mu)

    def apply(rows: np.ndarray) -> np.ndarray:
        coefficients = rows @ basis
        return rows + (coefficients * (scale - 1.0)) @ basis.T

    return apply
