"""`ExactIHVP`: the mean Hessian, built from its structure, factored once in float64.

Factorisation (all right-hand sides of a call solved together; `factorization` says which):

* up to `SMALL_MATRIX` parameters: `H = Q diag(lambda) Q^T` (cheap at that size), the spectrum
  treated as `vestigia.curvature.spectrum` documents, and the inverse kept ("eigh");
* above, for one watched `Dense` layer under softmax cross-entropy with fewer training examples
  than `woodbury_max_rows` (about `n < P`): the class blocks and the `(n, n)` capacitance of
  `vestigia.curvature.woodbury`, Cholesky-factored, without forming `H` ("woodbury");
* above, otherwise (or when the capacitance is not positive definite with its pivots above the
  singular cut): Cholesky of the dense `H` when positive definite with every pivot above the
  singular cut ("cholesky"), else the same eigendecomposition ("eigh").
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import scipy.linalg
import tensorflow as tf

from vestigia.curvature.base import ALTERNATIVES, InverseHessianVectorProduct
from vestigia.curvature.hessian import (
    SMALL_MATRIX,
    DenseFactors,
    factors_hessian_sum,
    mean_hessian,
    mean_hessian_or_factors,
    symmetric_eigh,
)
from vestigia.curvature.spectrum import SpectrumReport, check_indefinite, inverse_eigenvalues, resolve_rcond
from vestigia.curvature.woodbury import WoodburyInverse, split_diagonal_minus_rank_one, woodbury_max_rows
from vestigia.errors import InvalidDataError, check_finite, check_memory
from vestigia.model.influence_model import BaseInfluenceModel

__all__ = ["SMALL_MATRIX", "ExactIHVP", "mean_hessian", "symmetric_eigh"]


class ExactIHVP(InverseHessianVectorProduct):
    """Exact inverse-Hessian-vector products from the dense `(n_params, n_params)` Hessian.

    `H` (the mean Hessian of the training loss, plus the model's own L2 regularisation and
    `damping * I`) is built once and factored in float64. Directions with
    `|lambda| <= rcond * max|lambda|` are singular and dropped (pseudo-inverse), negative
    eigenvalues follow `indefinite`; both are counted (`n_dropped`, `n_negative`) and warned
    about (see `vestigia.curvature.spectrum`). A Hessian too large for the memory available is
    refused before anything is allocated, with the alternatives.

    Args:
        influence_model: the model and its watched weights.
        train_dataset: batched training data defining `H` (optional if `train_hessian` is given).
        train_hessian: a precomputed `(n_params, n_params)` data Hessian, used instead of the data
            (regularisation and damping are added to it).
        damping: added to every eigenvalue (>= 0).
        rcond: relative cut-off of singular directions; default `10 sqrt(n_params) eps(float32)`.
            The seed's `tf.linalg.pinv` used `10 * n_params * eps(float32)`.
        indefinite: "abs" (default: invert `|lambda|`, self-influence >= 0), "signed" or "raise".
        regularization: include the watched weights' L2 regularizers in `H` (default True).

    Attributes:
        hessian: `H + damping I`, float64. inv_hessian: its (pseudo-)inverse, float64 (both computed
        on first use above `SMALL_MATRIX`). spectrum: a `SpectrumReport` (`n_negative`, `n_dropped`).
        factorization: "eigh", "cholesky" or "woodbury" (see the module docstring).
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any | None = None,
        train_hessian: Any | None = None,
        damping: float = 0.0,
        rcond: float | None = None,
        indefinite: str = "abs",
        regularization: bool = True,
    ) -> None:
        super().__init__(influence_model, train_dataset, damping, regularization)
        self.rcond = resolve_rcond(rcond, self.n_params)
        self.indefinite = check_indefinite(indefinite)
        p = self.n_params
        check_memory(
            f"ExactIHVP: the dense Hessian of {p:,} watched parameters and its factor ({p:,} x {p:,} float64, twice)",
            2 * 8 * p * p,
            ALTERNATIVES,
        )
        self.factorization: str
        self.spectrum: SpectrumReport
        self._woodbury: WoodburyInverse | None = None
        self._cholesky: np.ndarray | None = None
        self._inv32: np.ndarray | None = None
        self._h32: np.ndarray | None = None
        hessian: np.ndarray | DenseFactors
        if train_hessian is not None:
            hessian = np.array(train_hessian, dtype=np.float64)
            if hessian.shape != (p, p):
                raise InvalidDataError(f"`train_hessian` must have shape ({p}, {p}). Received shape {hessian.shape}")
            check_finite("train_hessian", hessian)
            hessian = (hessian + hessian.T) / 2.0
        elif self.train_dataset is not None:
            max_rows = woodbury_max_rows if p > SMALL_MATRIX else None
            hessian = mean_hessian_or_factors(influence_model, self.train_dataset, max_rows=max_rows)
        else:
            raise InvalidDataError("ExactIHVP needs `train_dataset` or `train_hessian`. Received neither.")
        if isinstance(hessian, DenseFactors):
            self._woodbury = self._try_woodbury(hessian)
            if self._woodbury is None:
                hessian = factors_hessian_sum(hessian.inputs, hessian.curvature, np.zeros((p, p))) / len(hessian.inputs)
        if self._woodbury is not None:
            self.factorization = "woodbury"
            self.spectrum = SpectrumReport(0, 0, p, float("nan"), float("nan"))
            return
        assert isinstance(hessian, np.ndarray)
        self._factor_dense(hessian)

    def _factor_dense(self, hessian: np.ndarray) -> None:
        """Cholesky of the dense `H` (its data part in `hessian`, overwritten), else its eigendecomposition."""
        p = self.n_params
        hessian[np.diag_indices(p)] += self._shift()
        self._diagonal = np.diag(hessian).copy()
        self._cholesky = self._try_cholesky(hessian) if p > SMALL_MATRIX else None
        if self._cholesky is not None:
            self.factorization = "cholesky"
            self.spectrum = SpectrumReport(0, 0, p, float("nan"), float("nan"))
        else:
            self.factorization = "eigh"
            self.hessian = self._restore(hessian)
            eigenvalues, eigenvectors = self._eigh
            inverse, self.spectrum = inverse_eigenvalues(eigenvalues, self.rcond, self.indefinite, "ExactIHVP")
            # NumPy: its float64 product is set up by the Hessian's own; TensorFlow's costs a first call.
            self.__dict__["inv_hessian"] = (eigenvectors * inverse) @ eigenvectors.T
            self._inv32 = self.inv_hessian.astype(np.float32)
            self._h32 = self.hessian.astype(np.float32)

    def _try_woodbury(self, factors: DenseFactors) -> WoodburyInverse | None:
        """The Woodbury factors when the curvature splits as `diag(e) - u u^T`, `D` and `C` are positive
        definite and the pivot bound is above the singular cut (as `_try_cholesky`); else None."""
        split = split_diagonal_minus_rank_one(factors.curvature)
        if split is None:
            return None
        n_in, n_out = factors.inputs.shape[1], factors.curvature.shape[1]
        shift = np.broadcast_to(np.asarray(self._shift(), np.float64), (self.n_params,)).reshape(n_in, n_out)
        woodbury = WoodburyInverse.build(factors.inputs, *split, shift)
        if woodbury is None or woodbury.pivot_bound <= self.rcond * float(np.max(np.abs(woodbury.diagonal))):
            return None
        return woodbury

    def _try_cholesky(self, hessian: np.ndarray) -> np.ndarray | None:
        """Factor `hessian` in place (its upper triangle, as `L^T`), and return the factor (a
        Fortran-ordered view holding `L` in its lower triangle) if `H` is positive definite with
        every pivot above the singular cut (then no eigenvalue is negative and none is dropped);
        else None, with the strict lower triangle of `hessian` intact (see `_restore`)."""
        try:
            factor, _ = scipy.linalg.cho_factor(hessian.T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            return None
        pivots = np.diag(factor) ** 2
        # Every pivot is >= lambda_min, and max|diag| <= max|lambda|: a pivot under the cut
        # measured on the diagonal means a direction at least that close to singular.
        if not np.all(np.isfinite(pivots)) or pivots.min() <= self.rcond * float(np.max(np.abs(self._diagonal))):
            return None
        return factor

    def _restore(self, partial: np.ndarray) -> np.ndarray:
        """`H` from a matrix whose strict lower triangle (C order) and saved diagonal are intact."""
        lower = np.tril(partial, -1)
        restored = lower + lower.T
        restored[np.diag_indices_from(restored)] = self._diagonal
        return restored

    @functools.cached_property
    def hessian(self) -> np.ndarray:
        """`H + damping I` (regularisation included), float64 `(n_params, n_params)`."""
        if self._woodbury is not None:
            p, woodbury = self.n_params, self._woodbury
            hessian = factors_hessian_sum(woodbury.inputs, woodbury.curvature(), np.zeros((p, p)))
            hessian /= len(woodbury.inputs)
            hessian[np.diag_indices(p)] += woodbury.shift.reshape(-1)
            return hessian
        assert self._cholesky is not None
        return self._restore(self._cholesky.T)

    @functools.cached_property
    def _eigh(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.n_params
        check_memory(f"ExactIHVP: the eigenvectors of the {p:,} x {p:,} Hessian", 2 * 8 * p * p, ALTERNATIVES)
        return symmetric_eigh(self.hessian)

    @functools.cached_property
    def inv_hessian(self) -> np.ndarray:
        """`(H + damping I)^-1` (pseudo-inverse as documented), float64 `(n_params, n_params)`."""
        if self._woodbury is not None:
            return self._woodbury.solve(np.eye(self.n_params))
        assert self._cholesky is not None
        return scipy.linalg.cho_solve((self._cholesky, True), np.eye(self.n_params), check_finite=False)

    @property
    def n_negative(self) -> int:
        """Eigenvalues of the damped Hessian below `-rcond * max|lambda|` (0 when Cholesky succeeded)."""
        return self.spectrum.n_negative

    @property
    def n_dropped(self) -> int:
        """Singular directions set to zero in the inverse."""
        return self.spectrum.n_dropped

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of `H + damping I`, ascending (computed on first use above `SMALL_MATRIX`)."""
        return self._eigh[0]

    @property
    def eigenvectors(self) -> np.ndarray:
        """Eigenvectors of `H`, in columns, in the order of `eigenvalues`."""
        return self._eigh[1]

    def solve(self, vectors: Any) -> tf.Tensor:
        if self._inv32 is None:
            return tf.constant(self.solve64(vectors), tf.float32)
        # NumPy: at these sizes (<= SMALL_MATRIX columns) its product costs the same as TensorFlow's,
        # without the first-call set-up of each eager op (a few ms each in a fresh process).
        result = np.asarray(vectors, dtype=np.float32) @ self._inv32
        return tf.constant(self._checked(result, "solve"))

    def hvp(self, vectors: Any) -> tf.Tensor:
        if self._woodbury is not None:
            return tf.constant(self._woodbury.hvp(self._check_vectors(vectors)), tf.float32)
        if self._h32 is None:  # H v = L (L^T v), on the factor's triangle
            columns = np.asfortranarray(self._check_vectors(vectors).T)
            half = scipy.linalg.blas.dtrmm(1.0, self._cholesky, columns, lower=1, trans_a=1)
            return tf.constant(scipy.linalg.blas.dtrmm(1.0, self._cholesky, half, lower=1).T, tf.float32)
        return tf.constant(np.asarray(vectors, dtype=np.float32) @ self._h32)

    def solve64(self, vectors: Any) -> np.ndarray:
        """`solve` in float64: all rows at once (Woodbury or Cholesky solves, or the kept inverse)."""
        array = self._check_vectors(vectors)
        if self._woodbury is not None:
            return self._checked(self._woodbury.solve(array), "solve")
        if self._cholesky is None:
            return self._checked(array @ self.inv_hessian, "solve")
        solved = scipy.linalg.cho_solve((self._cholesky, True), array.T, check_finite=False).T
        return self._checked(solved, "solve")

    def quadratic_form(self, vectors: Any) -> np.ndarray:
        """`v^T H^-1 v` for each row, float64 `(m,)`; with Cholesky `||L^-1 v||^2` (one triangular
        solve, and >= 0 by construction)."""
        array = self._check_vectors(vectors)
        if self._woodbury is not None:
            return self._checked(self._woodbury.quadratic_form(array), "quadratic_form")
        if self._cholesky is None:
            return np.einsum("ij,ij->i", array @ self.inv_hessian, array)
        half = scipy.linalg.solve_triangular(self._cholesky, array.T, lower=True, check_finite=False)
        return self._checked(np.einsum("ij,ij->j", half, half), "quadratic_form")
