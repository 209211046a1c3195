"""LoGra (Choe et al. 2024): influence functions in a factored random projection of the gradients.

With `phi(z) = (P_in (x) P_out) g_z` layer by layer (`vestigia.projection.factored`, never
forming `g_z`), and the damped empirical Fisher of the projected gradients,

    value(z_test, z) = phi(z_test)^T (Phi^T Phi / n + lambda I)^-1 phi(z),

the influence function `g_test^T H^-1 g_z` with `H` the Gauss-Newton (empirical Fisher)
curvature seen through the projection. Sign and scale as everywhere: positive = proponent,
`H` a mean over the `n` training examples plus `lambda I`; self-influence `phi^T K phi >= 0`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch, as_batched_dataset
from vestigia.errors import check_non_negative
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model
from vestigia.projection.factored import DEFAULT_FACTOR_DIM, FactoredProjection
from vestigia.projection.features import projected_gradients
from vestigia.projection.gram import damped_gram_inverse


class LoGra(BaseInfluenceCalculator):
    """LoGra: projected-gradient influence with a damped Gram (empirical Fisher) inverse.

    Args:
        model: the `InfluenceModel` (for the whole model: watch every layer, e.g.
            `BaseInfluenceModel(model, loss_function=...)`).
        train_set: batched training data, defining `H`.
        k_in, k_out: per-layer projection sizes of inputs and output gradients (default 16 each:
            256 features per layer); ignored when `projection` is given.
        damping: `lambda`; default `1e-3 * trace(Phi^T Phi / n) / k`.
        projection: a `FactoredProjection` to use instead of building one.
        kind, seed: entries and seed of the projection built here.

    Raises:
        ValueError: negative damping, `k_in` / `k_out` below 1.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        train_set: Any,
        k_in: int = DEFAULT_FACTOR_DIM,
        k_out: int = DEFAULT_FACTOR_DIM,
        damping: float | None = None,
        projection: FactoredProjection | None = None,
        kind: str = "rademacher",
        seed: int = 0,
    ) -> None:
        check_influence_model(model, "model")
        self.model = model
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.projection = projection or FactoredProjection(model, k_in, k_out, kind=kind, seed=seed)
        self.train_set = as_batched_dataset(train_set, "train_set")
        damping = None if damping is None else check_non_negative("damping", damping)
        batches = (self._preprocess(b) for b in self._batches(self.train_set, "train_set"))
        self.inverse, self.damping, self.n_train = damped_gram_inverse(batches, damping, "train_set")

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`phi(z_test)`, the projected loss gradients `(batch, k)`."""
        return tf.cast(projected_gradients(self.model, batch, self.projection)[1], tf.float32)

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`K phi(z)`, `(batch, k)`."""
        return self._inverse_times(self._preprocess(batch))

    def _inverse_times(self, phi: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.matmul(tf.cast(phi, tf.float64), self.inverse), tf.float32)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        phi = self._preprocess(batch)
        return tf.reduce_sum(phi * self._inverse_times(phi), axis=1).numpy()
