"""K-FAC in the space of LoGra's factored projection: a Kronecker inverse of projected gradients.

For a layer with per-example gradient `G_i = sum_t a_it d_it^T` and the projection's `P_in`
(`k_in x n_in`) and `P_out` (`k_out x n_out`) (see `vestigia.projection.factored`), the projected
gradient is `G~_i = P_in G_i P_out^T = sum_t a~_it d~_it^T` with `a~ = P_in a`, `d~ = P_out d`.
Its Fisher block is approximated as K-FAC approximates the full one
(`vestigia.curvature.kronecker_factors`), with the *projected* factors

    F~ ~ A~ (x) S~,   A~ = P_in A P_in^T = E_i[sum_t a~ a~^T] / T,   S~ = P_out S P_out^T = E_i[sum_t d~ d~^T],

`k_in x k_in` and `k_out x k_out`, accumulated in one pass over the training data from the
projected `a~`, `d~` (the full `A`, `S` are never formed). The Fisher is the true Fisher (labels
sampled from the model, seeded as `KFACIHVP` samples them) or the empirical one (the given
labels). With `A~ = Q_A diag(alpha) Q_A^T` and `S~ = Q_S diag(sigma) Q_S^T` (float64 `eigh`),

    (F~ + lambda_l I)^-1 vec(G~) = vec(Q_A [(Q_A^T G~ Q_S) / (alpha sigma^T + lambda_l)] Q_S^T),

block-diagonal over layers, where `lambda_l = damping` if given, else
`damping_fraction * mean(alpha sigma^T)` (the layer's mean eigenvalue; default fraction 0.1, as
`KFACIHVP`). The other watched weights' block (projected together, see `FactoredProjection`)
gets the diagonal `E_i[phi_i^2] + lambda` (with the default damping, one `lambda` for the block,
where `KFACIHVP` damps each such weight by its own mean). With identity projections (`k >= n` on
both sides) this is exactly `KFACIHVP`'s inverse (for the other weights, with an absolute damping).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.kfac import batch_weights
from vestigia.curvature.kronecker_factors import (
    LayerFactors,
    batch_covariances,
    damped_power,
    eigenbasis,
    layer_damping,
    precondition,
)
from vestigia.data.dataset import Batch
from vestigia.errors import InvalidDataError, check_non_negative
from vestigia.gradients.fisher_labels import FISHERS, batch_seed, unweighting
from vestigia.model.influence_model import BaseInfluenceModel


class ProjectedKFAC:
    """The damped inverse of K-FAC's curvature in a `FactoredProjection`'s feature space.

    Args:
        projection: the `FactoredProjection` whose features `phi (batch, k)` are preconditioned.
        model: the `InfluenceModel` (its loss defines the Fisher).
        batches: the training data as `Batch`es (one pass).
        fisher: "true" (labels sampled from the model with `seed`) or "empirical" (given labels).
        seed: seed of the sampled labels.
        damping: one absolute `lambda` for every block, or None for `damping_fraction` times each
            block's mean eigenvalue.
        damping_fraction: see `damping` (default 0.1).

    Attributes:
        layers: per captured layer, its `LayerFactors` (`(k_in, k_out)` eigenvalues).
        others: `(E[phi^2] (width,), lambda)` of the other weights' block, or None.
        n: the number of training examples.

    Raises:
        ValueError: an unknown `fisher`, or a negative damping.
        InvalidDataError: no training examples. NonFiniteError: NaN / Inf in a factor (named).
    """

    def __init__(
        self,
        projection: Any,
        model: BaseInfluenceModel,
        batches: Iterable[Batch],
        fisher: str = "true",
        seed: int = 0,
        damping: float | None = None,
        damping_fraction: float = 0.1,
    ) -> None:
        if fisher not in FISHERS:
            raise ValueError(f"`fisher` must be one of {FISHERS}. Received: fisher={fisher!r}")
        damping = None if damping is None else check_non_negative("damping", damping)
        damping_fraction = check_non_negative("damping_fraction", damping_fraction)
        self.projection = projection
        sampled = fisher == "true"
        run = projection.traced_capture(model, _statistics, sampled=sampled)
        n_layers = len(projection.layer_names)
        sums_in: list[Any] = [0.0] * n_layers
        sums_out: list[Any] = [0.0] * n_layers
        sum_other: Any = 0.0
        n, total_weight = 0, 0.0
        for index, batch in enumerate(batches):
            model.check_inputs(batch.inputs, batch.source)
            weights = tf.reshape(batch_weights(batch), [-1])
            args = [batch.inputs, batch.targets, weights]
            if sampled:
                args.append(batch_seed(seed, index))
            covariances, squares, weight = run(*args, weights)
            for i, (cov_in, cov_out) in enumerate(covariances):
                sums_in[i] = sums_in[i] + cov_in.numpy().astype(np.float64)
                sums_out[i] = sums_out[i] + cov_out.numpy().astype(np.float64)
            if squares:
                sum_other = sum_other + squares[0].numpy().astype(np.float64)
            n += batch.size
            total_weight += float(weight)
        if n == 0:
            raise InvalidDataError("`train_set` is empty: the projected Kronecker factors need training examples.")
        self.n = n
        self.layers = []
        for name, cov_in, cov_out in zip(projection.layer_names, sums_in, sums_out):
            q_in, q_out, eigenvalues = eigenbasis(name, cov_in / total_weight, cov_out / n)
            self.layers.append(
                LayerFactors(name, q_in, q_out, eigenvalues, layer_damping(eigenvalues, damping, damping_fraction))
            )
        self.others = None
        if len(projection.output_blocks) > n_layers:
            diagonal = np.asarray(sum_other, np.float64) / n
            if not np.isfinite(diagonal).all():
                eigenbasis("the weights without a Kronecker form", diagonal, np.zeros((1, 1)))  # raises, named
            self.others = (diagonal, layer_damping(diagonal, damping, damping_fraction))

    def inverse_times(self, features: Any) -> np.ndarray:
        """`(F~ + lambda)^-1 phi` per row of `features` `(m, k)`, block by block; float64 `(m, k)`."""
        phi = np.asarray(features, np.float64)
        out = np.empty_like(phi)
        start = 0
        for factors in self.layers:
            shape = (factors.q_out.shape[0] if factors.q_in is None else factors.q_in.shape[0], factors.q_out.shape[0])
            stop = start + shape[0] * shape[1]
            block = phi[:, start:stop].reshape(-1, *shape)
            out[:, start:stop] = precondition(factors, block, -1.0).reshape(len(phi), -1)
            start = stop
        if self.others is not None:
            diagonal, damping = self.others
            out[:, start:] = phi[:, start:] * damped_power(diagonal, damping, -1.0)
        return out


def _statistics(captured: Any, weights: tf.Tensor) -> Any:
    """One batch's projected factor sums (traced code), weighted like `KroneckerIHVP`'s:
    `sum_i w_i a~ a~^T / T` and `sum_i w_i d~0 d~0^T` (`d~0` the gradient of the unweighted loss),
    the other block's `sum_i w_i phi0^2`, and `sum_i w_i`."""
    root = tf.sqrt(weights)
    unweight = unweighting(weights)
    inputs = [a * root[:, None, None] for a in captured.inputs]
    deltas = [d * unweight[:, None, None] for d in captured.deltas]
    covariances = batch_covariances(inputs, deltas, [False] * len(inputs))
    squares = [tf.reduce_sum(tf.square(g * unweight[:, None]), axis=0) for g in captured.others]
    return covariances, squares, tf.reduce_sum(weights)
