"""One watched `Dense` layer's Hessian as class blocks minus a low-rank term, inverted by Woodbury.

With `n` training examples, layer inputs `a_i` (`in` entries, a trailing 1 for the bias) and
output curvatures `M_i` `(out, out)` (`vestigia.curvature.hessian`), in the row-major `(in, out)`
parameter order,

    H = S + (1/n) sum_i (a_i a_i^T) (x) M_i,     S = damping + the L2 regularisation (diagonal).

When every `M_i = diag(e_i) - u_i u_i^T` (softmax cross-entropy: `e_i = s_i p_i`,
`u_i = sqrt(s_i) p_i`, `p_i` the probabilities, `s_i` the example's weight), `H = D - Q^T Q` with

* `D` block diagonal over the classes: `D_c = S_c + A^T diag(e_c) A / n` `(in, in)`;
* `Q` `(n, in * out)`: row `i` is `a_i (x) u_i / sqrt(n)`.

With `D_c = R_c^T R_c` (Cholesky) and `B = Q R^-1` (block `c`: `diag(u_c) A R_c^-1 / sqrt(n)`),
Woodbury's identity gives, with the `(n, n)` capacitance `C = I - B B^T = R_C^T R_C`,

    H^-1 v = R^-1 (h + B^T C^-1 B h),     v^T H^-1 v = ||h||^2 + ||R_C^-T B h||^2,     h = R^-T v.

`C` is positive definite exactly when `H` is (given `D` is): the eigenvalues of
`D^-1/2 H D^-1/2` are those of `C` and 1, so `lambda_min(H) >= lambda_min(D) min(1, lambda_min(C))`.
It costs about `n^2 P + n^3 / 3 + 2 n P in` flops (`P = in * out`) against the dense path's
`P^2 n (1 + 1/out) + P^3 / 3` (`woodbury_max_rows`): the cheaper one when `n < P`.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

SPLIT_RTOL = 1e-6  # the split must reproduce M to float32 round-off (autodiff curvatures are float32)


def split_diagonal_minus_rank_one(
    curvature: np.ndarray, rtol: float = SPLIT_RTOL
) -> tuple[np.ndarray, np.ndarray] | None:
    """`(e, u)`, each `(n, out)`, with `M_i = diag(e_i) - u_i u_i^T` for every example, or None.

    The rank-one term is read off the off-diagonal entries `X_ab = -M_ab = u_a u_b`: with `f`,
    `s`, `t` the three largest `|u|` (the largest `|X|` is `X_fs`, then `X_ft` on row `f`),
    `u_f^2 = X_fs X_ft / X_st` and `u_c = X_fc / u_f`; then `e = diag(M) + u^2`. None when
    `out < 3` (the split is not unique), when the signs are inconsistent, or when the split does not
    reproduce `M` to `rtol * max|M|` (the curvature is not of that form).
    """
    m = np.asarray(curvature, dtype=np.float64)
    n, k = m.shape[:2]
    if k < 3 or n == 0:
        return None
    rows, diagonal = np.arange(n), np.arange(k)
    off = -m
    off[:, diagonal, diagonal] = 0.0
    first, second = np.divmod(np.abs(off).reshape(n, k * k).argmax(axis=1), k)
    others = np.abs(off[rows, first])
    others[rows, first] = others[rows, second] = -1.0
    third = others.argmax(axis=1)
    x_fs, x_ft, x_st = off[rows, first, second], off[rows, first, third], off[rows, second, third]
    rank_two = x_st == 0.0  # only two non-zero entries of u: any split of their 2 x 2 block will do
    square = np.where(rank_two, np.abs(x_fs), x_fs * x_ft / np.where(rank_two, 1.0, x_st))
    if not np.all(np.isfinite(square)) or np.any(square < 0.0):
        return None
    lead = np.sqrt(square)
    u = off[rows, first] / np.where(lead > 0.0, lead, 1.0)[:, None]
    u[rows, first] = lead
    e = m[:, diagonal, diagonal] + u * u
    rebuilt = e[:, :, None] * np.eye(k) - u[:, :, None] * u[:, None, :]
    scale = float(np.max(np.abs(m), initial=0.0))
    if np.max(np.abs(rebuilt - m), initial=0.0) > rtol * scale or np.any(e < 0.0):
        return None
    return e, u


def woodbury_max_rows(n_in: int, n_out: int) -> int:
    """The largest number of examples for which the Woodbury path costs fewer flops than the dense
    one (the cost difference, a cubic in `n`, changes sign once)."""
    p = n_in * n_out

    def cheaper(n: int) -> bool:
        woodbury = n * n * p + n**3 / 3 + 2 * n * p * n_in
        return woodbury < p * p * n * (1 + 1 / n_out) + p**3 / 3

    low, high = 0, 4 * p  # cheaper(0) holds, cheaper(4 p) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cheaper(middle) else (low, middle)
    return low


def class_grams(inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`A^T diag(weights_c) A` for each class `c`, `(out, in, in)`, float64; with `weights >= 0` (one
    symmetric rank-k update each) only the upper triangles are filled, which is all that
    `class_block_factors` reads."""
    grams = np.empty((weights.shape[1], inputs.shape[1], inputs.shape[1]))
    for c in range(weights.shape[1]):
        if np.all(weights[:, c] >= 0.0):
            grams[c] = blas.dsyrk(1.0, np.asfortranarray(np.sqrt(weights[:, c])[:, None] * inputs), trans=1)
        else:
            grams[c] = (weights[:, c, None] * inputs).T @ inputs
    return grams


def class_block_factors(grams: np.ndarray, count: int, shift: np.ndarray) -> list[np.ndarray] | None:
    """Upper Cholesky factors `R_c` of `S_c + grams_c / count`, one per class (only the upper
    triangles of `grams` are read), or None if one block is not positive definite.

    Args:
        grams: `(out, in, in)`, e.g. from `class_grams`. count: the mean's denominator.
        shift: `S` as `(in, out)`.
    """
    factors = []
    for c, gram in enumerate(grams):
        block = np.asfortranarray(gram / count)
        block[np.diag_indices_from(block)] += shift[:, c]
        factor, info = lapack.dpotrf(block, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        factors.append(factor)
    return factors


def class_block_inverses(factors: list[np.ndarray]) -> np.ndarray:
    """`D_c^-1 = R_c^-1 R_c^-T` for each block, `(out, in, in)`, symmetric (from the Cholesky factors):
    applying them is one batched matrix product, several times faster than triangular solves."""
    inverses = []
    for factor in factors:
        inverse, info = lapack.dpotri(factor, lower=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"dpotri failed (info={info})")
        upper = np.triu(inverse)
        inverses.append(upper + np.triu(upper, 1).T)
    return np.stack(inverses)


class WoodburyInverse:
    """`H^-1` for `H = D - Q^T Q` as the module docstring says, all right-hand sides at once, float64.

    Build with `WoodburyInverse.build`, which returns None when `D` or `C` is not positive definite.

    Attributes:
        pivot_bound: `min pivot(D) * min(1, min pivot(C))`, the Cholesky pivots' counterpart of the
            bound `lambda_min(H) >= lambda_min(D) min(1, lambda_min(C))` (a pivot is >= the
            smallest eigenvalue, so a small one reveals a nearly singular `H`).
        diagonal: `diag(H)`, `(in * out,)`.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        e: np.ndarray,
        u: np.ndarray,
        shift: np.ndarray,
        blocks: list[np.ndarray],
        low_rank: np.ndarray,
        capacitance: np.ndarray,
    ) -> None:
        self.inputs, self.e, self.u, self.shift = inputs, e, u, shift
        self._blocks, self._low_rank, self._capacitance = blocks, low_rank, capacitance
        n = len(inputs)
        self.n_in, self.n_out = shift.shape
        pivots_d = min(float(np.min(np.diag(r) ** 2)) for r in blocks)
        pivots_c = float(np.min(np.diag(capacitance) ** 2))
        self.pivot_bound = pivots_d * min(1.0, pivots_c)
        self.diagonal = (shift + (inputs * inputs).T @ (e - u * u) / n).reshape(-1)

    @classmethod
    def build(cls, inputs: np.ndarray, e: np.ndarray, u: np.ndarray, shift: np.ndarray) -> WoodburyInverse | None:
        """Factor `D` and `C` from the inputs `A` `(n, in)`, the split `(e, u)` `(n, out)` (mean over
        the `n` rows) and the diagonal shift `S` `(in, out)`; None if either is not positive definite."""
        n, n_in = inputs.shape
        n_out = e.shape[1]
        blocks = class_block_factors(class_grams(inputs, e), n, shift)
        if blocks is None:
            return None
        low_rank = np.empty((n, n_in * n_out), order="F")  # B, class-major columns
        for c, factor in enumerate(blocks):
            columns = slice(c * n_in, (c + 1) * n_in)
            low_rank[:, columns] = (u[:, c] / np.sqrt(n))[:, None] * inputs
            low_rank[:, columns] = blas.dtrsm(1.0, factor, low_rank[:, columns], side=1, overwrite_b=1)
        capacitance = blas.dsyrk(-1.0, low_rank, beta=1.0, c=np.eye(n, order="F"), overwrite_c=1)
        capacitance, info = lapack.dpotrf(capacitance, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        return cls(inputs, e, u, shift, blocks, low_rank, capacitance)

    def _half(self, rows: np.ndarray) -> np.ndarray:
        """`h = R^-T v` for each row, class-major columns `(in * out, m)`, Fortran order."""
        shaped = rows.reshape(len(rows), self.n_in, self.n_out)
        half = np.empty((self.n_in * self.n_out, len(rows)), order="F")
        for c, factor in enumerate(self._blocks):
            block = np.asfortranarray(shaped[:, :, c].T)
            half[c * self.n_in : (c + 1) * self.n_in] = blas.dtrsm(1.0, factor, block, trans_a=1, overwrite_b=1)
        return half

    def solve(self, rows: np.ndarray) -> np.ndarray:
        """`H^-1 v` for each row `v` of `rows` `(m, in * out)`."""
        half = self._half(rows)
        correction = lapack.dpotrs(self._capacitance, self._low_rank @ half, lower=0)[0]
        half += self._low_rank.T @ correction
        result = np.empty((len(rows), self.n_in, self.n_out))
        for c, factor in enumerate(self._blocks):
            block = half[c * self.n_in : (c + 1) * self.n_in]
            result[:, :, c] = blas.dtrsm(1.0, factor, block, overwrite_b=1).T
        return result.reshape(rows.shape)

    def quadratic_form(self, rows: np.ndarray) -> np.ndarray:
        """`v^T H^-1 v` for each row, `(m,)`, >= 0 by construction."""
        half = self._half(rows)
        projected = blas.dtrsm(1.0, self._capacitance, self._low_rank @ half, trans_a=1, overwrite_b=1)
        return np.einsum("ij,ij->j", half, half) + np.einsum("ij,ij->j", projected, projected)

    def hvp(self, rows: np.ndarray) -> np.ndarray:
        """`H v` for each row, from the factors: `S v + (1/n) sum_i a_i (M_i V^T a_i)^T`."""
        m, n = len(rows), len(self.inputs)
        shaped = rows.reshape(m, self.n_in, self.n_out)
        projected = (self.inputs @ shaped.transpose(1, 0, 2).reshape(self.n_in, -1)).reshape(n, m, self.n_out)
        along = np.einsum("imc,ic->im", projected, self.u)
        curved = self.e[:, None, :] * projected - along[:, :, None] * self.u[:, None, :]
        back = (self.inputs.T @ curved.reshape(n, -1)).reshape(self.n_in, m, self.n_out).transpose(1, 0, 2)
        return (back / n + self.shift * shaped).reshape(rows.shape)

    def curvature(self) -> np.ndarray:
        """`M_i = diag(e_i) - u_i u_i^T`, `(n, out, out)`."""
        return self.e[:, :, None] * np.eye(self.n_out) - self.u[:, :, None] * self.u[:, None, :]
