"""Arnoldi influence (Schioppa et al. 2022): influence functions on the top-|lambda| eigenspace.

With the `k` eigenpairs of largest magnitude `(lambda_j, G_j)` of the mean training Hessian,
found by Arnoldi iteration (`vestigia.curvature.arnoldi`):

    value(z_test, z) = g_test^T G^T diag(1/lambda) G g_z,
    self-influence(z) = sum_j (G g_z)_j^2 / lambda_j.

This is `FirstOrderInfluenceCalculator`'s value with `H^-1` replaced by its restriction to the
dominant eigenspace, same sign and scale (positive: proponent). Everything lives in the
`k`-dimensional projected space: the influence vector is `(G g_z) / lambda`, the preprocessed
test vector `G g_test`. With `k = subspace_dim = n_params` it equals exact first-order influence.

Differences from the seed: the `k` LARGEST-magnitude eigenvalues are kept (the seed keeps the
smallest), the start vector is seeded, the Krylov basis is float64, the HVPs run on cached
trunk features in batches, and eigenvalues below the pseudo-inverse cut-off give zero instead
of an infinite `1/lambda`; only singular eigenvalues are cut (`rcond`, reported in `n_dropped`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.arnoldi import ArnoldiIHVP
from vestigia.data.dataset import Batch, as_batched_dataset
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.methods.first_order import example_gradients
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model


class ArnoldiInfluenceCalculator(BaseInfluenceCalculator):
    """Influence functions through the `k` top-|lambda| eigenpairs of the Hessian (Arnoldi).

    Args:
        model: the `InfluenceModel`.
        train_dataset: batched training data defining `H` (all of it is used).
        subspace_dim: Arnoldi steps, one full-data HVP each (at most `n_params`).
        force_hermitian: symmetric tridiagonal eigensolver (True, recommended for a Hessian) or
            the general `eig` keeping real parts (False).
        k_largest_eig_vals: eigenpairs kept, by decreasing `|lambda|` (at most `subspace_dim`).
        dtype: float dtype of the projections and of the returned vectors.
        seed: seed of the Arnoldi start vector; equal seeds give equal results.
        damping: added to `H` before the iteration (>= 0; default 0 as in the seed).
        rcond: relative cut-off of singular eigenvalues (`|lambda| <= rcond * max|lambda|` are
            dropped and counted in `n_dropped`); default `10 sqrt(n_params) eps(float32)`.
        indefinite: negative eigenvalues: "abs" (default, invert `|lambda|`), "signed", "raise".
        regularization: include the watched weights' L2 regularizers in `H` (default True).

    Attributes:
        ihvp_calculator: the `ArnoldiIHVP` (usable as a low-rank solver elsewhere).
        eigenvalues: `(k,)` float64, decreasing magnitude. projections: `G`, `(k, n_params)` float64.
        n_dropped: eigenpairs dropped as singular.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        train_dataset: Any,
        subspace_dim: int,
        force_hermitian: bool,
        k_largest_eig_vals: int,
        dtype: tf.DType = tf.float32,
        seed: int = 0,
        damping: float = 0.0,
        rcond: float | None = None,
        indefinite: str = "abs",
        regularization: bool = True,
    ) -> None:
        check_influence_model(model, "model")
        dtype = tf.as_dtype(dtype)
        if not dtype.is_floating:
            raise TypeError(f"`dtype` must be a floating dtype (tf.float32 or tf.float64). Received: dtype={dtype!r}")
        self.model = model
        self.dtype = dtype
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.train_set = as_batched_dataset(train_dataset, "train_dataset")
        self.ihvp_calculator = ArnoldiIHVP(
            model,
            self.train_set,
            subspace_dim,
            k_largest_eig_vals,
            force_hermitian=force_hermitian,
            damping=damping,
            seed=seed,
            rcond=rcond,
            indefinite=indefinite,
            regularization=regularization,
        )
        self.n_dropped = self.ihvp_calculator.n_dropped
        self.eigenvalues = self.ihvp_calculator.eigenvalues
        self.projections = self.ihvp_calculator.projections
        self._projection_t = tf.constant(self.projections.T, dtype=dtype)
        self._inverse = tf.constant(self.ihvp_calculator.inverse_eigenvalues, dtype=dtype)

    def _projected(self, batch: Batch) -> tf.Tensor:
        """`G g` for each example, `(batch, k)`."""
        return tf.matmul(tf.cast(example_gradients(self.model, batch), self.dtype), self._projection_t)

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`(G g_z) / lambda`, `(batch, k)`."""
        return self._projected(batch) * self._inverse

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`G g_test`, `(batch, k)`."""
        return self._projected(batch)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        """`sum_j (G g_z)_j^2 / lambda_j`, `(batch,)`."""
        return tf.reduce_sum(tf.square(self._projected(batch)) * self._inverse, axis=1).numpy()
