"""TRAK (Park et al. 2023): attribution by projected margin gradients and a linear kernel.

For each of `M` models (checkpoints or independently trained models) `m`, with `phi_m(z)` the
projected gradient of the margin `f = log(p / (1 - p))` of the correct class (see
`vestigia.methods.margins`), `Phi_m` the `(n, k)` matrix of the training examples' `phi_m`,
and `Q_m(z) = 1 - p_m(z)` the out-to-loss reweighting,

    value(z_test, z) = S( (1 / M) sum_m Q_m(z) phi_m(z_test)^T (Phi_m^T Phi_m / n + lambda I)^-1 phi_m(z) ),

`S` the optional soft-thresholding `S(t) = sign(t) max(|t| - threshold, 0)`.
Sign as everywhere: positive = proponent (upweighting `z` raises the test margin, lowering
its loss). Scale: with `lambda = 0` and one model this is `n` times the paper's score (whose
kernel is the sum `Phi^T Phi`), which is the scale of `g_test^T H^-1 g_z` with `H` a mean over
the `n` training examples. Averaging: the paper multiplies the model-averaged scores by the
model-averaged `Q`; here each model's score carries its own `Q_m`, so that the ensemble is
exactly the mean of the single-model values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch, as_batched_dataset
from vestigia.errors import InvalidModelError, check_non_negative
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.methods.margins import OUTPUTS, infer_outputs, margin_function, out_to_loss
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.progress import track
from vestigia.projection.features import make_projection, projected_gradients
from vestigia.projection.gram import damped_gram_inverse


def _architecture(model: BaseInfluenceModel) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in v.shape) for v in model.weights]


def check_same_architecture(models: Sequence[BaseInfluenceModel]) -> None:
    """Raise `InvalidModelError` unless every model watches weights of the same shapes."""
    first = _architecture(models[0])
    for i, model in enumerate(models[1:], start=1):
        if _architecture(model) != first:
            raise InvalidModelError(
                "`models` must all have the same architecture (watched weights of the same shapes); "
                f"model 0 watches {first} but model {i} watches {_architecture(model)}."
            )


def checkpoint_models(model: BaseInfluenceModel, checkpoints: Sequence[Sequence[Any]]) -> list[BaseInfluenceModel]:
    """One `BaseInfluenceModel` per checkpoint: a clone of `model.model` holding the checkpoint's
    weights (as `keras.Model.get_weights()` returns them), watching the same weights.

    Raises:
        InvalidModelError: a checkpoint that does not fit the model.
    """
    index = {id(v): i for i, v in enumerate(model.model.trainable_variables)}
    positions = [index[id(v)] for v in model.weights]
    shapes = [tuple(w.shape) for w in model.model.get_weights()]
    clones = []
    for c, weights in enumerate(checkpoints):
        received = [tuple(np.shape(w)) for w in weights]
        if received != shapes:
            raise InvalidModelError(
                f"`checkpoints[{c}]` does not fit the model: it holds weights of shapes {received}, "
                f"the model has {shapes}. Checkpoints must come from the same architecture."
            )
        clone = keras.models.clone_model(model.model)
        clone.set_weights(list(weights))
        watched = [clone.trainable_variables[p] for p in positions]
        clones.append(BaseInfluenceModel(clone, watched, model.loss_function, model.process_batch_for_loss_fn))
    return clones


class TRAK(BaseInfluenceCalculator):
    """TRAK over one or several models, with a seeded random projection.

    Args:
        models: one `InfluenceModel` or a list of them (checkpoints or independently trained
            models of one architecture, the same watched weights).
        train_set: batched training data; defines the kernel `Phi^T Phi / n`.
        projection: "rademacher" (default), "gaussian", None (the full gradients, exact for
            small models), or a projection object (e.g. LoGra's factored projection).
        projection_dim: `k`; default 2048, and no projection (exact) when `n_params <= 2048`. A
            square Gaussian projection (`k = n_params`) is invertible almost surely, so with
            `damping=0` it gives the unprojected values (small square Rademacher matrices are
            singular with a sizeable probability).
        damping: `lambda`, absolute; default `1e-3 * trace(Phi^T Phi / n) / k` per model. Not 0
            for softmax models: their margin gradients sum to zero over the classes of each
            output unit, so `Phi^T Phi` is singular without a projection.
        soft_threshold: threshold of `S` on the averaged values; default none.
        outputs: "logits", "probabilities", or "auto" (the loss's `from_logits`, else the last
            layer's activation) for the margin.
        checkpoints: weights of further checkpoints of `models` (one model), as
            `keras.Model.get_weights()` lists; each replaces `models` in the ensemble.
        seed: seed of the projection (shared by the models).

    Raises:
        InvalidModelError: models of different architectures, or a checkpoint that does not fit.
        ValueError: `projection_dim` above the number of watched parameters, negative damping.
    """

    def __init__(
        self,
        models: BaseInfluenceModel | Sequence[BaseInfluenceModel],
        train_set: Any,
        projection: Any = "rademacher",
        projection_dim: int | None = None,
        damping: float | None = None,
        soft_threshold: float | None = None,
        outputs: str = "auto",
        checkpoints: Sequence[Sequence[Any]] | None = None,
        seed: int = 0,
    ) -> None:
        models = [models] if isinstance(models, BaseInfluenceModel) else list(models)
        if not models or not all(isinstance(m, BaseInfluenceModel) for m in models):
            raise InvalidModelError(
                f"`models` must be an InfluenceModel or a non-empty list of them. Received: {models!r}"
            )
        if checkpoints is not None:
            if len(models) != 1:
                raise InvalidModelError(f"`checkpoints` needs exactly one model. Received {len(models)} models.")
            models = checkpoint_models(models[0], checkpoints)
        check_same_architecture(models)
        if outputs not in OUTPUTS:
            raise ValueError(f"`outputs` must be one of {OUTPUTS}. Received: outputs={outputs!r}")
        self.models = [self._margin_model(m, outputs) for m in models]
        self.n_components = len(models)
        self.process_batch_for_loss_fn = models[0].process_batch_for_loss_fn
        self.projection = make_projection(projection, models[0].nb_params, projection_dim, seed)
        self.soft_threshold = None if soft_threshold is None else check_non_negative("soft_threshold", soft_threshold)
        self.damping = None if damping is None else check_non_negative("damping", damping)
        self.train_set = as_batched_dataset(train_set, "train_set")
        self.kernels, self.dampings, self.n_train = [], [], 0
        for c in range(self.n_components):
            kernel, used, self.n_train = self._kernel(c)
            self.kernels.append(kernel)
            self.dampings.append(used)

    @staticmethod
    def _margin_model(model: BaseInfluenceModel, outputs: str) -> BaseInfluenceModel:
        kind = infer_outputs(model.model, model.loss_function) if outputs == "auto" else outputs
        return BaseInfluenceModel(model.model, model.weights, margin_function(kind), model.process_batch_for_loss_fn)

    def featurize(self, dataset: Any, component: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """TRAK's features of a data set for one model: `(phi (n, k), Q (n,))`, float32, in order.

        `Q` includes the examples' sample weights.
        """
        features, weights = [], []
        for batch in track(self._batches(dataset, "dataset"), "TRAK features (batches)"):
            phi, q = self._features(batch, component)
            features.append(phi.numpy())
            weights.append(q.numpy())
        return np.concatenate(features), np.concatenate(weights)

    def _features(self, batch: Batch, component: int) -> tuple[tf.Tensor, tf.Tensor]:
        """`(phi (batch, k), Q (batch,))`: projected margin gradients and sample-weighted `1 - p`."""
        margins, phi = projected_gradients(self.models[component], batch._replace(weights=None), self.projection)
        q = out_to_loss(margins)
        if batch.weights is not None:
            q = q * tf.cast(tf.reshape(batch.weights, [-1]), q.dtype)
        return tf.cast(phi, tf.float32), tf.cast(q, tf.float32)

    def _kernel(self, component: int) -> tuple[tf.Tensor, float, int]:
        """`(Phi^T Phi / n + lambda I)^-1` in float64, the damping used, and `n`."""
        train = track(self._batches(self.train_set, "train_set"), "TRAK kernel (batches)")
        batches = (self._features(b, component)[0] for b in train)
        return damped_gram_inverse(batches, self.damping, "train_set")

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`Q_m(z) K_m phi_m(z) / M`, `(batch, k)`."""
        phi, q = self._features(batch, component)
        return self._train_side(phi, q, component)

    def _train_side(self, phi: tf.Tensor, q: tf.Tensor, component: int) -> tf.Tensor:
        weighted = tf.matmul(tf.cast(phi, tf.float64), self.kernels[component]) * tf.cast(q, tf.float64)[:, None]
        return tf.cast(weighted / self.n_components, tf.float32)

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`phi_m(z_test)`, `(batch, k)`."""
        return self._features(batch, component)[0]

    def _threshold(self, values: Any) -> np.ndarray:
        values = np.asarray(values)
        if self.soft_threshold is None:
            return values
        return np.sign(values) * np.maximum(np.abs(values) - self.soft_threshold, 0.0)

    def _blocks_against(self, test_sides: list[list[tf.Tensor]], train_set: Any, store: Any = None) -> Any:
        for block in super()._blocks_against(test_sides, train_set, store):
            yield self._threshold(block)

    def _scores_against_saved_vectors(self, dataset_to_evaluate: Any, path: str) -> np.ndarray:
        return self._threshold(super()._scores_against_saved_vectors(dataset_to_evaluate, path))

    def _self_influence(self, batch: Batch) -> np.ndarray:
        total = np.zeros(batch.size)
        for c in range(self.n_components):
            phi, q = self._features(batch, c)
            total += tf.reduce_sum(phi * self._train_side(phi, q, c), axis=1).numpy()
        return self._threshold(total)
