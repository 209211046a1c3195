"""Grad-Dot and Grad-Cos: similarity of per-example loss gradients, optionally projected.

    Grad-Dot:  value(z_test, z) = g_test^T g_z                      (influence with H = I)
    Grad-Cos:  value(z_test, z) = g_test^T g_z / (||g_test|| ||g_z||)

(Charpiat et al. 2019; Pruthi et al. 2020 for the one-checkpoint dot product.) Sign as
everywhere: positive = proponent. Self-influence: `||g_z||^2` for Grad-Dot; Grad-Cos gives 1
for every example with a non-zero gradient (use Grad-Dot to rank suspicious examples). With a
projection `R`, `g` is replaced by `R^T g / sqrt(k)` (see `vestigia.projection`).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model
from vestigia.projection.features import make_projection, projected_gradients


class GradDot(BaseInfluenceCalculator):
    """Grad-Dot, `g_test^T g_z`, on full or projected per-example gradients.

    Args:
        model: the `InfluenceModel`.
        projection: None (default: full gradients), "rademacher", "gaussian", or a projection
            object (e.g. LoGra's factored projection).
        projection_dim: `k` of a named projection; default 2048, none if `n_params <= 2048`.
        seed: seed of a named projection.

    Raises:
        ValueError: `projection_dim` above the number of watched parameters.
    """

    _normalize = False

    def __init__(
        self, model: BaseInfluenceModel, projection: Any = None, projection_dim: int | None = None, seed: int = 0
    ) -> None:
        check_influence_model(model, "model")
        self.model = model
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.projection = make_projection(projection, model.nb_params, projection_dim, seed)

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`g_z` (Grad-Dot) or `g_z / ||g_z||` (Grad-Cos), `(batch, dim)`; zero gradients stay 0."""
        features = tf.cast(projected_gradients(self.model, batch, self.projection)[1], tf.float32)
        if self._normalize:
            features = tf.math.divide_no_nan(features, tf.norm(features, axis=1, keepdims=True))
        return features

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        return self._influence_vector(batch, component)

    def _self_influence(self, batch: Batch) -> Any:
        return tf.reduce_sum(tf.square(self._influence_vector(batch)), axis=1).numpy()


class GradCos(GradDot):
    """Grad-Cos, `g_test^T g_z / (||g_test|| ||g_z||)`; arguments as `GradDot`."""

    _normalize = True
