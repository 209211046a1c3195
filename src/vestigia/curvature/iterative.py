"""Matrix-free solvers on the training Hessian: conjugate gradient and LiSSA.

Both keep the training set's trunk features in memory (computed once), and apply
`H v = (1/n) sum_batches HVP(batch, v) + damping v` to all right-hand sides at once, with the
HVPs vectorised over the batch and over the vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.base import InverseHessianVectorProduct, summed_hessian_products
from vestigia.curvature.solvers import conjugate_gradient, lissa
from vestigia.errors import InvalidDataError, check_non_negative, check_positive_int
from vestigia.model.influence_model import BaseInfluenceModel


class IterativeIHVP(InverseHessianVectorProduct):
    """Base of the matrix-free solvers: the damped mean-Hessian operator on cached features.

    `extractor_layer` and `feature_extractor` are accepted for compatibility with the seed;
    the model is already split at its first watched layer, so the trunk is computed once
    whatever they say.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any,
        damping: float = 0.0,
        n_opt_iters: int = 100,
    ) -> None:
        if train_dataset is None:
            raise InvalidDataError("`train_dataset` is required by matrix-free IHVP solvers. Received: None")
        super().__init__(influence_model, train_dataset, damping)
        self.n_opt_iters = check_positive_int("n_opt_iters", n_opt_iters)
        self._batches = list(influence_model.feature_batches(self.train_dataset, "train_dataset"))
        self.n_train = sum(b.size for b in self._batches)
        self._factors = self._kronecker_factors()

    def _kronecker_factors(self) -> list[tuple[tf.Tensor, tf.Tensor]] | None:
        """Per-batch Kronecker factors of `H` when one `Dense` layer is watched: HVPs then cost
        three small contractions instead of a second-order autodiff pass."""
        factors = []
        for batch in self._batches:
            pair = self.model.differentiator.dense_curvature(batch.features, batch.targets, batch.weights)
            if pair is None:
                return None
            factors.append((tf.cast(pair[0], tf.float32), tf.cast(pair[1], tf.float32)))
        return factors

    def damped_hvp64(self, vectors: np.ndarray) -> np.ndarray:
        """`(H + damping I) v` in float64 for each row of `vectors`."""
        summed = summed_hessian_products(self.model, self._batches, vectors, self._factors)
        return summed / self.n_train + self.damping * vectors

    def hvp(self, vectors: Any) -> tf.Tensor:
        return tf.constant(self.damped_hvp64(self._check_vectors(vectors)), dtype=tf.float32)


class ConjugateGradientDescentIHVP(IterativeIHVP):
    """`(H + damping I)^-1 v` by conjugate gradient, every right-hand side of a call solved together.

    Args:
        influence_model: the model and its watched weights.
        extractor_layer: accepted for the seed's signature (the split is automatic).
        train_dataset: batched training data defining `H`.
        n_opt_iters: maximum number of CG iterations (one full-data HVP each).
        feature_extractor: accepted for the seed's signature; unused.
        damping: added to `H` (>= 0). `H + damping I` must be positive definite on the vectors'
            span; with `damping = 0` on a singular `H`, CG returns the minimum-norm solution
            when started from zero and the vectors lie in the range of `H`.
        tol: relative residual at which a right-hand side stops.
        atol: absolute residual at which a right-hand side stops.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        extractor_layer: int | str | None = None,
        train_dataset: Any = None,
        n_opt_iters: int = 100,
        feature_extractor: Any = None,
        damping: float = 0.0,
        tol: float = 1e-5,
        atol: float = 1e-10,
    ) -> None:
        super().__init__(influence_model, train_dataset, damping, n_opt_iters)
        self.tol = check_non_negative("tol", tol)
        self.atol = check_non_negative("atol", atol)
        self.last_iterations = 0

    def solve(self, vectors: Any) -> tf.Tensor:
        result = conjugate_gradient(
            self.damped_hvp64, self._check_vectors(vectors), self.n_opt_iters, self.tol, self.atol
        )
        self.last_iterations = result.iterations
        return tf.constant(result.solution, dtype=tf.float32)


class LissaIHVP(IterativeIHVP):
    """`(H + damping I)^-1 v` by LiSSA on the full-data Hessian, all right-hand sides together.

    Iterates `x <- v + x - (H + damping I) x / scale` `n_opt_iters` times and returns
    `x / scale`. It converges when `scale > lambda_max(H) + damping` and `H + damping I` is
    positive definite. Unlike the seed, whose fixed point is `(H + damping * scale I)^-1`,
    `damping` here means the same as in every other solver.

    Args:
        influence_model: the model and its watched weights.
        extractor_layer: accepted for the seed's signature (the split is automatic).
        train_dataset: batched training data defining `H`.
        n_opt_iters: number of iterations (one full-data HVP each).
        feature_extractor: accepted for the seed's signature; unused.
        damping: added to `H` (>= 0).
        scale: must exceed the largest eigenvalue of `H + damping I`.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        extractor_layer: int | str | None = None,
        train_dataset: Any = None,
        n_opt_iters: int = 100,
        feature_extractor: Any = None,
        damping: float = 1e-4,
        scale: float = 10.0,
    ) -> None:
        super().__init__(influence_model, train_dataset, damping, n_opt_iters)
        self.scale = check_non_negative("scale", scale)
        if self.scale == 0:
            raise ValueError(f"`scale` must be > 0. Received: scale={scale!r}")

    def solve(self, vectors: Any) -> tf.Tensor:
        solution = lissa(self.damped_hvp64, self._check_vectors(vectors), self.n_opt_iters, self.scale)
        return tf.constant(solution, dtype=tf.float32)
