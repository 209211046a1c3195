"""LoGra (Choe et al. 2024): influence functions in a factored random projection of the gradients.

With `phi(z) = (P_in (x) P_out) g_z` layer by layer (`vestigia.projection.factored`, never
forming `g_z`),

    value(z_test, z) = phi(z_test)^T K phi(z),

the influence function `g_test^T H^-1 g_z` with `H` seen through the projection, where `K` is
either (`curvature=`)

* "gram" (default): the damped empirical Fisher of the projected gradients,
  `K = (Phi^T Phi / n + lambda I)^-1`, one `(k, k)` solve; or
* "kfac": K-FAC's Kronecker inverse in the projected space, block-diagonal over layers,
  `K = diag_l (P_in A P_in^T (x) P_out S P_out^T + lambda_l I)^-1` from projected factors
  (`k_in x k_in`, `k_out x k_out`) accumulated in one pass, true Fisher by default (see
  `vestigia.curvature.projected_kronecker`); with identity projections it is `"kfac"`'s
  influence exactly.

Sign and scale as everywhere: positive = proponent, `H` a mean over the `n` training examples
plus `lambda I`; self-influence `phi^T K phi >= 0`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.projected_kronecker import ProjectedKFAC
from vestigia.data.dataset import Batch, as_batched_dataset
from vestigia.errors import check_non_negative
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model
from vestigia.projection.factored import DEFAULT_FACTOR_DIM, FactoredProjection
from vestigia.projection.features import projected_gradients
from vestigia.projection.gram import damped_gram_inverse

CURVATURES = ("gram", "kfac")


class LoGra(BaseInfluenceCalculator):
    """LoGra: projected-gradient influence with a damped Gram (empirical Fisher) or K-FAC inverse.

    Args:
        model: the `InfluenceModel` (for the whole model: watch every layer, e.g.
            `BaseInfluenceModel(model, loss_function=...)`).
        train_set: batched training data, defining `H`.
        k_in, k_out: per-layer projection sizes of inputs and output gradients (default 16 each:
            256 features per layer); ignored when `projection` is given.
        damping: `lambda`; default for "gram" `1e-3 * trace(Phi^T Phi / n) / k`, for "kfac"
            `damping_fraction` times each layer's mean eigenvalue.
        projection: a `FactoredProjection` to use instead of building one.
        kind, seed: entries and seed of the projection built here; `seed` also seeds the labels
            sampled for the true Fisher ("kfac").
        curvature: "gram" or "kfac" (see the module docstring).
        fisher: "kfac" only: "true" (labels sampled from the model) or "empirical" (given labels).
        damping_fraction: "kfac" only, with `damping=None` (default 0.1, as `KFACIHVP`).

    Raises:
        ValueError: an unknown `curvature` or `fisher`, negative damping, `k_in` / `k_out` below 1.
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
        curvature: str = "gram",
        fisher: str = "true",
        damping_fraction: float = 0.1,
    ) -> None:
        check_influence_model(model, "model")
        if curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}. Received: curvature={curvature!r}")
        self.model = model
        self.curvature = curvature
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.projection = projection or FactoredProjection(model, k_in, k_out, kind=kind, seed=seed)
        self.train_set = as_batched_dataset(train_set, "train_set")
        damping = None if damping is None else check_non_negative("damping", damping)
        self.kronecker: ProjectedKFAC | None = None
        if curvature == "kfac":
            batches = self._batches(self.train_set, "train_set")
            self.kronecker = ProjectedKFAC(self.projection, model, batches, fisher, seed, damping, damping_fraction)
            self.n_train, self.damping = self.kronecker.n, damping  # None: per layer, see `kronecker.layers`
            return
        batches = (self._preprocess(b) for b in self._batches(self.train_set, "train_set"))
        self.inverse, self.damping, self.n_train = damped_gram_inverse(batches, damping, "train_set")

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`phi(z_test)`, the projected loss gradients `(batch, k)`."""
        return tf.cast(projected_gradients(self.model, batch, self.projection)[1], tf.float32)

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`K phi(z)`, `(batch, k)`."""
        return self._inverse_times(self._preprocess(batch))

    def _inverse_times(self, phi: tf.Tensor) -> tf.Tensor:
        if self.kronecker is not None:
            return tf.constant(self.kronecker.inverse_times(phi.numpy()), tf.float32)
        return tf.cast(tf.matmul(tf.cast(phi, tf.float64), self.inverse), tf.float32)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        phi = self._preprocess(batch)
        return tf.reduce_sum(phi * self._inverse_times(phi), axis=1).numpy()
