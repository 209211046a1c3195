"""DataInf (Kwon et al. 2024): influence with a closed-form, per-layer inverse Hessian.

Per layer `l` (block of the parameter vector, `d_l` parameters), the damped empirical Fisher's
inverse is replaced by the average of the rank-one inverses (Sherman-Morrison):

    (G_l + lambda_l I)^-1 ~ (1 / (n lambda_l)) sum_i (I - g_il g_il^T / (lambda_l + ||g_il||^2))
                          = (I - (1/n) sum_i g_il g_il^T / (lambda_l + ||g_il||^2)) / lambda_l,

with the paper's layer-wise damping `lambda_l = damping_scale * (1 / (n d_l)) sum_i ||g_il||^2`
(`damping_scale = 0.1` in the paper). Then, block by block,

    value(z_test, z) = sum_l g_test,l^T H_l^-1 g_z,l,        self-influence  g_z^T H^-1 g_z,

positive = proponent (the paper reports the negative, "harmful positive"). The `(d_l, d_l)`
inverse is formed once per layer in float64 from two passes over the training data; layers
wider than `max_block_params` need a projection (each projected block is one "layer").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch, as_batched_dataset
from vestigia.errors import InvalidDataError, InvalidModelError, check_non_negative, check_positive_int
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model
from vestigia.projection.features import make_projection, projected_gradients

PAPER_DAMPING_SCALE = 0.1


def layer_blocks(model: BaseInfluenceModel) -> list[tuple[str, int]]:
    """`(layer name, width)` of each run of consecutive watched variables of one layer."""
    owner = {id(v): layer.name for layer in model.watched_layers for v in layer.trainable_variables}
    blocks: list[tuple[str, int]] = []
    for variable, size in zip(model.weights, model.differentiator.sizes):
        name = owner.get(id(variable), getattr(variable, "path", "?"))
        if blocks and blocks[-1][0] == name:
            blocks[-1] = (name, blocks[-1][1] + size)
        else:
            blocks.append((name, size))
    return blocks


class DataInf(BaseInfluenceCalculator):
    """DataInf: `g_test^T H^-1 g_z` with DataInf's per-layer closed-form `H^-1`.

    Args:
        model: the `InfluenceModel`.
        train_set: batched training data, defining `H`.
        damping_scale: `lambda_l = damping_scale * mean_i ||g_il||^2 / d_l`; default 0.1 (paper).
        projection: None (per-layer blocks of the full gradients), "rademacher", "gaussian"
            (one block of `projection_dim`), or a projection object (its `output_blocks`, e.g.
            one per layer for LoGra).
        projection_dim: `k` of a named projection.
        seed: seed of a named projection.
        max_block_params: refuse blocks wider than this (their inverse is `(d_l, d_l)` float64).

    Raises:
        InvalidModelError: a block wider than `max_block_params`.
        ValueError: `projection_dim` above the number of parameters; negative `damping_scale`.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        train_set: Any,
        damping_scale: float = PAPER_DAMPING_SCALE,
        projection: Any = None,
        projection_dim: int | None = None,
        seed: int = 0,
        max_block_params: int = 4096,
    ) -> None:
        check_influence_model(model, "model")
        self.model = model
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.projection = make_projection(projection, model.nb_params, projection_dim, seed)
        if self.projection is None:
            self.blocks = layer_blocks(model)
        else:
            widths = getattr(self.projection, "output_blocks", None) or [int(self.projection.k)]
            self.blocks = [(f"projected block {i}", int(w)) for i, w in enumerate(widths)]
        limit = check_positive_int("max_block_params", max_block_params)
        for name, width in self.blocks:
            if width > limit:
                raise InvalidModelError(
                    f"DataInf forms a ({width}, {width}) inverse for {name!r}, above max_block_params={limit}: "
                    "pass a projection (e.g. projection='rademacher', projection_dim=1024) or raise the limit."
                )
        self.damping_scale = check_non_negative("damping_scale", damping_scale)
        self.train_set = as_batched_dataset(train_set, "train_set")
        self.dampings, self.inverses = self._fit()

    def _features(self, batch: Batch) -> list[tf.Tensor]:
        """Per-block gradients of one raw batch, float64 `[(batch, d_l), ...]`."""
        features = tf.cast(projected_gradients(self.model, batch, self.projection)[1], tf.float64)
        return tf.split(features, [w for _, w in self.blocks], axis=1)

    def _fit(self) -> tuple[list[float], list[tf.Tensor]]:
        """`lambda_l` (first pass) and `H_l^-1` (second pass), float64."""
        sums, n = np.zeros(len(self.blocks)), 0
        for batch in self._batches(self.train_set, "train_set"):
            sums += [float(tf.reduce_sum(tf.square(g))) for g in self._features(batch)]
            n += batch.size
        if n == 0:
            raise InvalidDataError("`train_set` is empty.")
        dampings = [float(self.damping_scale * s / (n * w)) for s, (_, w) in zip(sums, self.blocks)]
        for (name, _), damping in zip(self.blocks, dampings):
            if damping <= 0:
                raise InvalidDataError(
                    f"DataInf's damping for {name!r} is {damping}: its gradients are all zero or damping_scale=0. "
                    "Pass damping_scale > 0 and watch weights that receive gradients."
                )
        averages = [np.zeros((w, w)) for _, w in self.blocks]
        for batch in self._batches(self.train_set, "train_set"):
            for average, g, damping in zip(averages, self._features(batch), dampings):
                scaled = g / (damping + tf.reduce_sum(tf.square(g), axis=1, keepdims=True))
                average += tf.matmul(scaled, g, transpose_a=True).numpy() / n
        inverses = [tf.constant((np.eye(len(a)) - (a + a.T) / 2) / d) for a, d in zip(averages, dampings)]
        return dampings, inverses

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`H^-1 g_z`, block by block, `(batch, dim)`."""
        parts = [tf.matmul(g, inverse) for g, inverse in zip(self._features(batch), self.inverses)]
        return tf.cast(tf.concat(parts, axis=1), tf.float32)

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`g_test`, `(batch, dim)`."""
        return tf.cast(tf.concat(self._features(batch), axis=1), tf.float32)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        total = np.zeros(batch.size)
        for g, inverse in zip(self._features(batch), self.inverses):
            total += tf.reduce_sum(tf.matmul(g, inverse) * g, axis=1).numpy()
        return total
