"""The inverse-Hessian-vector-product interface shared by every curvature solver.

`H` is the mean Hessian of the (weighted) training loss over the `n` training examples,
plus `damping * I`. Vectors are rows: `solve(V)` takes `V` of shape `(m, n_params)` and
returns `H^-1 V` row by row, `hvp(V)` returns `H V`. The seed's `compute_ihvp` /
`compute_hvp` are thin views that return one `(n_params, batch)` block per batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.regularization import regularization_diagonal
from vestigia.data.dataset import as_batched_dataset, to_batched_dataset
from vestigia.errors import InvalidDataError, NonFiniteError, check_non_negative
from vestigia.model.influence_model import BaseInfluenceModel, FeatureBatch, check_influence_model

ALTERNATIVES = (
    "Use a matrix-free or low-rank solver instead: ihvp_calculator='cg' (ConjugateGradientDescentIHVP), "
    "'lissa' (LissaIHVP), ArnoldiIHVP / ArnoldiInfluenceCalculator, or a factored curvature (K-FAC / EK-FAC, "
    "'ekfac'); or watch fewer weights (start_layer, weights_to_watch)."
)


class InverseHessianVectorProduct(ABC):
    """Base class: `solve(V) = (H + damping I)^-1 V`, `hvp(V) = (H + damping I) V`.

    Args:
        influence_model: the model and its watched weights.
        train_dataset: batched training data that defines `H`.
        damping: `damping * I` is added to `H` (>= 0).
        regularization: add the Hessian of the watched weights' own L2 regularizers
            (`vestigia.curvature.regularization`) to `H`.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any | None,
        damping: float = 0.0,
        regularization: bool = True,
    ) -> None:
        check_influence_model(influence_model, "influence_model")
        self.model = influence_model
        self.train_dataset = None if train_dataset is None else as_batched_dataset(train_dataset, "train_dataset")
        self.damping = check_non_negative("damping", damping)
        self.n_params = influence_model.nb_params
        self.regularization = bool(regularization)
        self.regularization_diagonal = regularization_diagonal(influence_model) if self.regularization else None

    def _shift(self) -> np.ndarray | float:
        """What is added to the data Hessian: `damping` plus the regularizers' diagonal."""
        if self.regularization_diagonal is None:
            return self.damping
        return self.damping + self.regularization_diagonal

    def _checked(self, result: np.ndarray, what: str) -> np.ndarray:
        """`result` if finite, else `NonFiniteError` naming the solver and the vectors."""
        finite = np.isfinite(result).all(axis=1) if result.ndim == 2 else np.isfinite(result)
        if not np.all(finite):
            raise NonFiniteError(
                f"{type(self).__name__}.{what} returned NaN or Inf for {int((~finite).sum())} of {len(finite)} "
                f"vectors (first: row {int(np.argmin(finite))}). Check that the vectors are finite; a solver "
                "diverges when H + damping I is singular or indefinite (add damping)."
            )
        return result

    @abstractmethod
    def solve(self, vectors: Any) -> tf.Tensor:
        """`(H + damping I)^-1 v` for each row `v` of `vectors` `(m, n_params)`; float32 `(m, n_params)`."""

    @abstractmethod
    def hvp(self, vectors: Any) -> tf.Tensor:
        """`(H + damping I) v` for each row `v` of `vectors` `(m, n_params)`; float32 `(m, n_params)`."""

    def _check_vectors(self, vectors: Any, name: str = "vectors") -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float64)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.n_params:
            raise InvalidDataError(
                f"`{name}` must have shape (m, {self.n_params}) (one vector of the watched parameters "
                f"per row). Received shape {np.shape(vectors)}"
            )
        return array

    # -- the seed's API ------------------------------------------------------------------------

    def compute_ihvp(self, group: Any, use_gradient: bool = True) -> tf.data.Dataset:
        """`H^-1 g` for each example of `group`, one `(n_params, batch)` block per batch.

        Args:
            group: batched data (`use_gradient=True`), or a batched dataset of vectors
                `(batch, n_params)` (`use_gradient=False`).
        """
        return self._per_batch(group, use_gradient, self.solve)

    def compute_hvp(self, group: Any, use_gradient: bool = True) -> tf.data.Dataset:
        """`H g` for each example of `group`, one `(n_params, batch)` block per batch."""
        return self._per_batch(group, use_gradient, self.hvp)

    def _per_batch(self, group: Any, use_gradient: bool, apply: Any) -> tf.data.Dataset:
        blocks, sizes = [], []
        if use_gradient:
            for batch in self.model.feature_batches(as_batched_dataset(group, "group"), "group"):
                blocks.append(apply(self.model.batch_losses_and_gradients(batch, "group")[1]))
                sizes.append(batch.size)
        else:
            for vectors in group:
                blocks.append(apply(vectors))
                sizes.append(int(vectors.shape[0]))
        if not blocks:
            raise InvalidDataError("`group` is empty: iterating it yielded no examples.")
        return to_batched_dataset(tf.concat(blocks, axis=0), sizes).map(tf.transpose)


def kronecker_hessian_products(factors: Sequence[tuple[tf.Tensor, tf.Tensor]], vectors: np.ndarray) -> np.ndarray:
    """`sum_i ((a_i a_i^T) (x) M_i) v` over the batches' factors, for each row `v` of `vectors`.

    With `V` the row reshaped to `(in, out)` (the kernel's row-major order, bias last), each
    example contributes `a_i (M_i V^T a_i)^T`: with the `m` rows side by side as `(in, m * out)`,
    two matrix products with the inputs `(batch, in)` around a batched `(out, out)` one, in float32
    (the precision of the autodiff HVP), no `(n_params, n_params)` matrix. Returns float64 `(m, in * out)`.
    """
    n_in, n_out = int(factors[0][0].shape[1]), int(factors[0][1].shape[1])
    m = vectors.shape[0]
    side_by_side = tf.constant(vectors.reshape(m, n_in, n_out).transpose(1, 0, 2).reshape(n_in, m * n_out), tf.float32)
    total = tf.zeros((n_in, m * n_out), tf.float32)
    for a, curvature in factors:
        projected = tf.reshape(tf.matmul(a, side_by_side), (-1, m, n_out))  # a_i^T V, (batch, m, out)
        curved = tf.matmul(projected, curvature, transpose_b=True)  # M_i V^T a_i
        total += tf.matmul(a, tf.reshape(curved, (-1, m * n_out)), transpose_a=True)
    return total.numpy().astype(np.float64).reshape(n_in, m, n_out).transpose(1, 0, 2).reshape(vectors.shape)


def summed_hessian_products(
    model: BaseInfluenceModel,
    batches: Iterable[FeatureBatch],
    vectors: np.ndarray,
    factors: Sequence[tuple[tf.Tensor, tf.Tensor]] | None = None,
) -> np.ndarray:
    """`sum_i (d^2 l_i / d theta^2) v` over all examples of `batches`, for each row of `vectors`.

    `factors`, one `dense_curvature` pair per batch, replace the autodiff HVPs when given.
    """
    if factors is not None:
        return kronecker_hessian_products(factors, vectors)
    tensor = tf.constant(vectors, dtype=model.weights[0].dtype)
    total = np.zeros(vectors.shape, dtype=np.float64)
    for batch in batches:
        total += model.differentiator.hvp(batch.features, batch.targets, batch.weights, tensor).numpy()
    return total
