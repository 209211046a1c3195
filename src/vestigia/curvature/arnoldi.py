"""Arnoldi (Schioppa et al. 2022): the top-|lambda| eigenpairs of the Hessian from a Krylov space.

`arnoldi_iteration` builds an orthonormal Krylov basis `Q` of `span(v, A v, ..., A^(s-1) v)`
from a seeded random start `v`, in float64, with the Hessenberg matrix `A Q_s^T = Q^T T`.
`distill` eigendecomposes the square part of `T` and keeps the `k` eigenpairs of LARGEST
magnitude, as in the reference implementation (`jax_influence/arnoldi.py: distill`; the seed
keeps the smallest, a bug). The kept eigenvectors are mapped back to parameter space:
`G = Y^T Q_s` of shape `(k, n_params)`, so that `H ~ G^T diag(lambda) G` and
`H^-1 ~ G^T diag(1/lambda) G` on the dominant subspace.

`ArnoldiIHVP` runs this on the damped mean training Hessian (cached trunk features, batched
HVPs) and solves `H^-1 v ~ G^T diag(1/lambda) G v`: a low-rank solver for any calculator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from vestigia.curvature.base import ALTERNATIVES
from vestigia.curvature.iterative import IterativeIHVP
from vestigia.curvature.solvers import Operator, as_callable
from vestigia.curvature.spectrum import check_indefinite, inverse_eigenvalues, resolve_rcond
from vestigia.errors import check_memory, check_positive_int
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.progress import track


class ArnoldiResult(NamedTuple):
    """`basis (s + 1, n_params)` orthonormal rows, `hessenberg (s + 1, s)`, both float64.

    `s` is `subspace_dim`, or fewer if the Krylov space became invariant (breakdown) earlier.
    """

    basis: np.ndarray
    hessenberg: np.ndarray


class Eigensystem(NamedTuple):
    """`eigenvalues (k,)` sorted by decreasing magnitude and `projections (k, n_params)`, float64."""

    eigenvalues: np.ndarray
    projections: np.ndarray


def _check_dims(n_params: int, subspace_dim: Any) -> int:
    subspace_dim = check_positive_int("subspace_dim", subspace_dim)
    if subspace_dim > n_params:
        raise ValueError(
            f"`subspace_dim` must be at most the number of watched parameters ({n_params}). "
            f"Received: subspace_dim={subspace_dim}"
        )
    return subspace_dim


def arnoldi_iteration(
    operator: Operator,
    n_params: int,
    subspace_dim: int,
    seed: int = 0,
    breakdown_tol: float = 1e-12,
) -> ArnoldiResult:
    """`subspace_dim` Arnoldi steps on `operator` from a seeded Gaussian start vector.

    Each step applies the operator once to the newest basis vector and orthogonalises the
    result against the whole basis with classical Gram-Schmidt done twice (CGS2), which keeps
    the basis orthonormal to round-off. The iteration stops early if the new vector's norm falls
    below `breakdown_tol` times the largest Hessenberg entry seen (an invariant subspace).

    Args:
        operator: a symmetric `(n_params, n_params)` array, or a callable mapping rows
            `(m, n_params)` to rows `(m, n_params)`.
        n_params: dimension of the space.
        subspace_dim: number of steps `s` (at most `n_params`).
        seed: seed of the start vector.
        breakdown_tol: relative norm below which the Krylov space is taken as invariant.

    Returns:
        `ArnoldiResult(basis (s' + 1, n_params), hessenberg (s' + 1, s'))`, `s' <= s`; after a
        breakdown the last basis row is zero.
    """
    n_params = check_positive_int("n_params", n_params)
    subspace_dim = _check_dims(n_params, subspace_dim)
    apply = as_callable(operator)
    check_memory(
        f"Arnoldi: the Krylov basis ({subspace_dim + 1:,} x {n_params:,} float64)",
        8 * (subspace_dim + 1) * n_params,
        "Pass a smaller `subspace_dim`. " + ALTERNATIVES,
    )
    start = np.random.default_rng(seed).normal(size=n_params)
    basis = np.zeros((subspace_dim + 1, n_params))
    basis[0] = start / np.linalg.norm(start)
    hessenberg = np.zeros((subspace_dim + 1, subspace_dim))
    scale = 0.0
    for j in track(range(subspace_dim), "Arnoldi iterations"):
        w = np.asarray(apply(basis[j : j + 1]), dtype=np.float64).reshape(-1)
        for _ in range(2):
            coefficients = basis[: j + 1] @ w
            w = w - coefficients @ basis[: j + 1]
            hessenberg[: j + 1, j] += coefficients
        norm = float(np.linalg.norm(w))
        scale = max(scale, float(np.max(np.abs(hessenberg[: j + 1, j]))), norm)
        hessenberg[j + 1, j] = norm
        if norm <= breakdown_tol * scale:
            hessenberg[j + 1, j] = 0.0
            return ArnoldiResult(basis[: j + 2], hessenberg[: j + 2, : j + 1])
        basis[j + 1] = w / norm
    return ArnoldiResult(basis, hessenberg)


def distill(result: ArnoldiResult, k: int, force_hermitian: bool = True) -> Eigensystem:
    """The `k` eigenpairs of largest `|lambda|` of the Krylov projection, mapped to parameter space.

    With `T_s` the square `(s, s)` part of the Hessenberg matrix and `T_s = Y diag(lambda) Y^T`:

    * `force_hermitian=True`: `T_s` is replaced by the symmetric tridiagonal matrix with its
      diagonal and sub-diagonal (exact for a symmetric operator) and decomposed by `eigh`;
    * `force_hermitian=False`: the full `T_s` goes to the general `eig`; eigenvalues are ranked
      by complex magnitude and the real parts of eigenvalues and eigenvectors are kept. For a
      Hessian `T_s` is symmetric up to round-off, so the imaginary parts are round-off and
      `Y^T` stands for `Y^-1`.

    Args:
        result: the output of `arnoldi_iteration`.
        k: number of eigenpairs kept (at most the Krylov dimension `s'`).
        force_hermitian: use the symmetric tridiagonal path.

    Returns:
        `Eigensystem(eigenvalues (k,), projections G = Y_k^T Q_s (k, n_params))`, by decreasing `|lambda|`.
    """
    s = result.hessenberg.shape[1]
    k = check_positive_int("k_largest_eig_vals", k)
    if k > s:
        raise ValueError(
            f"`k_largest_eig_vals` must be at most the Krylov dimension ({s}, the subspace_dim reached). "
            f"Received: k_largest_eig_vals={k}"
        )
    square = result.hessenberg[:s, :s]
    if force_hermitian:
        off = np.diag(square, -1)
        tridiagonal = np.diag(np.diag(square)) + np.diag(off, -1) + np.diag(off, 1)
        values, vectors = np.linalg.eigh(tridiagonal)
    else:
        values, vectors = np.linalg.eig(square)
    keep = np.argsort(-np.abs(values), kind="stable")[:k]
    eigenvalues, eigenvectors = np.real(values[keep]), np.real(vectors[:, keep])
    return Eigensystem(eigenvalues, eigenvectors.T @ result.basis[:s])


class ArnoldiIHVP(IterativeIHVP):
    """Low-rank `(H + damping I)^-1 v ~ G^T diag(1/lambda) G v` on the top-|lambda| eigenspace.

    `subspace_dim` full-data HVPs (cached trunk features, batched) build the Krylov basis once;
    `solve` then costs two `(m, n_params) x (n_params, k)` products. `hvp` is the exact damped
    Hessian product of `IterativeIHVP`. As in `ExactIHVP` (`vestigia.curvature.spectrum`), only
    singular eigenvalues, `|lambda| <= rcond * max |lambda|`, are dropped (`n_dropped`, with a
    `SpectrumWarning`), and negative ones follow `indefinite`.

    Args:
        influence_model: the model and its watched weights.
        train_dataset: batched training data defining `H`.
        subspace_dim: Arnoldi steps (full-data HVPs), at most `n_params`.
        k_largest_eig_vals: eigenpairs kept, by decreasing `|lambda|` (at most `subspace_dim`).
        force_hermitian: symmetric tridiagonal eigensolver (True) or general `eig` (False).
        damping: added to `H` (>= 0) before the iteration.
        seed: seed of the start vector; equal seeds give equal results.
        rcond: relative cut-off of singular eigenvalues; default `10 sqrt(n_params) eps(float32)`.
        indefinite: "abs" (default: invert `|lambda|`), "signed" or "raise".
        regularization: include the watched weights' L2 regularizers in `H` (default True).

    Attributes:
        eigenvalues: `(k,)` float64, decreasing magnitude. projections: `G`, `(k, n_params)` float64.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any,
        subspace_dim: int,
        k_largest_eig_vals: int,
        force_hermitian: bool = True,
        damping: float = 0.0,
        seed: int = 0,
        rcond: float | None = None,
        indefinite: str = "abs",
        regularization: bool = True,
    ) -> None:
        super().__init__(influence_model, train_dataset, damping, subspace_dim, regularization)
        self.subspace_dim = _check_dims(self.n_params, subspace_dim)
        self.force_hermitian = bool(force_hermitian)
        self.seed = int(seed)
        self.rcond = resolve_rcond(rcond, self.n_params)
        self.indefinite = check_indefinite(indefinite)
        krylov = arnoldi_iteration(self.damped_hvp64, self.n_params, self.subspace_dim, self.seed)
        self.eigenvalues, self.projections = distill(krylov, k_largest_eig_vals, self.force_hermitian)
        self.inverse_eigenvalues, self.spectrum = inverse_eigenvalues(
            self.eigenvalues, self.rcond, self.indefinite, "ArnoldiIHVP"
        )
        self.n_dropped = self.spectrum.n_dropped

    def project(self, vectors: Any) -> np.ndarray:
        """`G v` for each row `v`: coordinates in the kept eigenbasis, float64 `(m, k)`."""
        return self._check_vectors(vectors) @ self.projections.T

    def solve(self, vectors: Any) -> tf.Tensor:
        coordinates = self.project(vectors) * self.inverse_eigenvalues
        return tf.constant(self._checked(coordinates @ self.projections, "solve"), dtype=tf.float32)
