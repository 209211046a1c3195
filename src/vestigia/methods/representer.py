"""Representer points: what RPS-L2 and RPS-LJE share.

Both methods explain a classifier whose last layer is a `Dense`, mapping the features `f` (its
input, shape `(d,)`) to the logits `Phi = f^T W` (`W` of shape `(d, C)`). A layer with a bias
`b` is handled by folding the bias into the features as a constant input: `f <- [f, 1]`,
`W <- [W; b]` (`d + 1` rows), so that `Phi = f^T W` holds exactly and everything below applies
unchanged (for RPS-L2 the surrogate's bias is then regularised like its kernel rows).
Each writes a last-layer kernel as a sum of one contribution `W_i` per training example,
`W = sum_i W_i`, so that every logit decomposes over the training set:

    Phi(x_t) = f_t^T W = sum_i f_t^T W_i.

The value of training example `i` for test example `t` is its share of the logit of the class
the model predicts for `t`, `value(t, i) = [f_t^T W_i]_{c_t}`: positive means `i` pushes the
predicted logit up (a proponent, excitatory in Yeh et al.'s words), negative that it pushes it
down. `c_t` is the argmax of the model's own logits. With a single logit (binary classifier)
the "predicted class" is the sign of the logit: the value is `s_t f_t^T W_i` with
`s_t = +1` if `Phi(x_t) >= 0`, else `-1`, so that positive values support the prediction here
too (the seed used the raw `f_t^T W_i`).

On the engine the value is one inner product of flattened `(d, C)` matrices: the test side is
`psi_t = f_t (x) e_t` (`e_t` the one-hot of `c_t`, or `[s_t]`), the training side is
`phi_i = vec(W_i)`. RPS-L2 has `W_i = f_i alpha_i^T` (rank one); RPS-LJE has
`W_i = (W_0 - H^-1 g_i) / n`.

Self-influence is `|value(i, i)| = |[f_i^T W_i]_{c_i}|`, the size of the example's own share of
its predicted logit. Both a large self-support (a prediction the example carries alone: an
atypical or memorised example) and a large self-opposition (its target pulls against the
model's prediction) flag an example worth inspecting. For RPS-L2 it is
`|alpha_i[c_i]| ||f_i||^2`: Yeh et al.'s importance `|alpha_ic|` times the kernel
`k(x_i, x_i) = f_i^T f_i`, which makes it the actual size of the contribution, comparable across
examples (the seed used `|alpha_i[c_i]|` alone).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch, ProcessBatchFn, as_batched_dataset, iterate_batches
from vestigia.errors import InvalidDataError, InvalidModelError, check_finite
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.model.influence_model import FeatureBatch, InfluenceModel, _resolve_layer


class FeatureArrays(NamedTuple):
    """A dataset after the trunk, in memory: features `(n, d)` float64, targets (as the data
    hold them, concatenated), weights `(n,)` float64, and the batch sizes."""

    features: np.ndarray
    targets: Any
    weights: np.ndarray
    batch_sizes: list[int]


def resolve_last_dense(model: keras.Model, layer: int | str, name: str) -> int:
    """Index in `model.layers` of the `Dense` whose kernel (and bias) the representer methods use.

    It must be the model's last layer with weights (layers after it, such as an `Activation`,
    hold none) and map `(batch, d)` features to `(batch, C)`. `layer` may designate it, the layer
    just before it (whose output are its features: the seed's `layer_index=-2`) or a weightless
    layer after it (the seed's `target_layer=-1` on a model ending with an activation layer).

    Raises:
        InvalidModelError: `layer` designates another layer, or the layer is not a `Dense` on
            rank-2 features.
    """
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"`model` must be a Keras 3 model. Received: {type(model).__name__}")
    index = _resolve_layer(model, layer, name)
    layers = model.layers
    weighted = [i for i, lyr in enumerate(layers) if lyr.weights]
    if not weighted:
        raise InvalidModelError(f"Model {model.name!r} has no layer with weights: no last Dense layer to explain.")
    last = weighted[-1]
    if index < last - 1:
        raise InvalidModelError(
            f"`{name}` must designate the model's last Dense layer ({layers[last].name!r}, index {last}) or the "
            f"layer feeding it: representer points explain the last layer. Received: {name}={layer!r} "
            f"(layer {layers[index].name!r}, index {index})"
        )
    dense = layers[last]
    if not isinstance(dense, keras.layers.Dense):
        raise InvalidModelError(
            "The model's last layer with weights must be a Dense layer for representer points. "
            f"Received: {type(dense).__name__} {dense.name!r}"
        )
    try:
        shape = tuple(dense.input.shape)
    except (AttributeError, ValueError):  # a layer shared between graphs has no single input
        shape = (None, dense.kernel.shape[0])
    if len(shape) != 2:
        raise InvalidModelError(
            f"The last Dense layer {dense.name!r} must take features of shape (batch, d). Received input shape {shape}"
        )
    return last


def outer_rows(left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
    """Row-wise outer products `left_b (x) right_b` flattened row-major: `(batch, d * C)`."""
    products = left[:, :, None] * right[:, None, :]
    return tf.reshape(products, [tf.shape(left)[0], -1])


def class_selectors(logits: tf.Tensor) -> tf.Tensor:
    """`e_t` for each row of `logits` `(batch, C)`: one-hot of the argmax, or `[sign]` when `C = 1`."""
    if logits.shape[-1] == 1:
        return tf.where(logits >= 0, tf.ones_like(logits), -tf.ones_like(logits))
    return tf.one_hot(tf.argmax(logits, axis=1), int(logits.shape[-1]), dtype=logits.dtype)


class RepresenterPointCalculator(BaseInfluenceCalculator):
    """Base of RPS-L2 and RPS-LJE: the split at the last `Dense`, features, and kernel values.

    Subclasses define `_contributions(feature_batch) = vec(W_i)` `(batch, d * C)`; the test
    side `f_t (x) e_t`, the pairwise values and the self-influence `|value(i, i)|` are defined
    here.

    Args:
        model: a built Keras 3 classifier whose last layer with weights is a `Dense` (with or
            without bias).
        layer: the index or name designating that layer (see `resolve_last_dense`).
        layer_argument: the name of the argument `layer` came from, for error messages.
        loss_function: the model's unreduced loss, `loss(y_true, y_pred) -> (batch,)`.
        process_batch_for_loss_fn: maps a dataset element to `(inputs, y_true, sample_weight)`.

    Attributes:
        kernel: the model's last-layer kernel `W` at construction, float64 `(d, C)`, with the
            bias as a last row `(d + 1, C)` when the layer has one. n_inputs: the layer's input
            width `d`; `n_features` is `d + 1` with a bias.
        split: the `InfluenceModel` watching that layer; its trunk computes the features.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: int | str,
        layer_argument: str,
        loss_function: Any,
        process_batch_for_loss_fn: ProcessBatchFn,
    ) -> None:
        self.target_layer_index = resolve_last_dense(model, layer, layer_argument)
        self.split = InfluenceModel(
            model,
            start_layer=self.target_layer_index,
            loss_function=loss_function,
            process_batch_for_loss_fn=process_batch_for_loss_fn,
        )
        self.model = model
        self.loss_function = self.split.loss_function
        self.process_batch_for_loss_fn = process_batch_for_loss_fn
        self.dense = model.layers[self.target_layer_index]
        self.kernel = np.asarray(self.dense.kernel.numpy(), dtype=np.float64)
        self.n_inputs = self.kernel.shape[0]
        if self.dense.use_bias:
            self.kernel = np.vstack([self.kernel, np.asarray(self.dense.bias.numpy(), np.float64)[None, :]])
        self.n_features, self.n_classes = self.kernel.shape
        self._kernel32 = tf.constant(self.kernel, tf.float32)

    # -- features ------------------------------------------------------------------------------

    def _with_constant(self, features: tf.Tensor) -> tf.Tensor:
        """`[f, 1]` when the layer has a bias (float32 `(batch, n_features)`), else `f`."""
        features = tf.cast(tf.reshape(features, [-1, self.n_inputs]), tf.float32)
        if self.n_features == self.n_inputs:
            return features
        return tf.concat([features, tf.ones_like(features[:, :1])], axis=1)

    def _feature_batch(self, batch: Batch) -> FeatureBatch:
        """The batch after the trunk: features `(batch, n_features)` float32 (the constant 1 last
        when the layer has a bias), targets, weights `(batch,)`."""
        fb = self.split.features_of(batch)
        return FeatureBatch(self._with_constant(fb.features), fb.targets, tf.cast(fb.weights, tf.float32), fb.size)

    def feature_arrays(self, dataset: Any, name: str = "train_set") -> FeatureArrays:
        """Features, targets and weights of a whole dataset, in order (float64 features and weights).

        Raises:
            NonFiniteError: features hold NaN or Inf.
        """
        features, targets, weights, sizes = [], [], [], []
        for batch in iterate_batches(as_batched_dataset(dataset, name), self.process_batch_for_loss_fn, name):
            fb = self._feature_batch(batch)
            features.append(fb.features.numpy())
            targets.append(fb.targets)
            weights.append(fb.weights.numpy())
            sizes.append(fb.size)
        stacked = np.concatenate(features).astype(np.float64)
        check_finite(f"the features of `{name}` (input of layer {self.dense.name!r})", stacked)
        all_targets = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *targets)
        return FeatureArrays(stacked, all_targets, np.concatenate(weights).astype(np.float64), sizes)

    def _features_of_inputs(self, inputs: Any) -> tf.Tensor:
        features = self.split._trunk(inputs) if self.split._trunk_model is not None else inputs
        return self._with_constant(features)

    # -- the kernel values ---------------------------------------------------------------------

    def _selectors(self, features: tf.Tensor) -> tf.Tensor:
        """`e_t` `(batch, C)` from the model's own logits `f_t^T W`."""
        return class_selectors(tf.matmul(features, self._kernel32))

    @abstractmethod
    def _contributions(self, batch: FeatureBatch) -> tf.Tensor:
        """`vec(W_i)` for each example of a batch after the trunk, `(batch, d * C)` float32."""

    def _test_vectors(self, features: tf.Tensor) -> tf.Tensor:
        return outer_rows(features, self._selectors(features))

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`phi_i = vec(W_i)`, the example's contribution to the kernel, `(batch, d * C)`."""
        return self._contributions(self._feature_batch(batch))

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`psi_t = f_t (x) e_t`, `(batch, d * C)`."""
        return self._test_vectors(self._feature_batch(batch).features)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        """`|value(i, i)| = |<f_i (x) e_i, vec(W_i)>|`, `(batch,)`."""
        fb = self._feature_batch(batch)
        products = self._test_vectors(fb.features) * self._contributions(fb)
        return np.abs(tf.reduce_sum(products, axis=1).numpy())

    def predicted_classes(self, dataset: Any) -> np.ndarray:
        """The class `c_t` each value refers to, `(n,)`: the argmax of the model's logits, or for a
        single logit 1 if it is `>= 0` and 0 otherwise."""
        rows = []
        for batch in self._batches(dataset, "dataset"):
            logits = tf.matmul(self._feature_batch(batch).features, self._kernel32)
            rows.append((logits[:, 0] >= 0).numpy().astype(np.int64) if self.n_classes == 1 else np.argmax(logits, 1))
        return np.concatenate(rows)


def label_probabilities(targets: Any, n: int, n_classes: int, name: str) -> np.ndarray:
    """Labels as float64 probabilities `(n, C)`: one-hot (or probability) rows, integer class ids
    (turned one-hot), or for `C = 1` one probability per example.

    Raises:
        InvalidDataError: labels of another shape.
    """
    array = np.asarray(targets)
    if n_classes > 1 and array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        if array.min(initial=0) < 0 or array.max(initial=0) >= n_classes:
            raise InvalidDataError(f"`{name}` holds class ids outside [0, {n_classes}). Received: {np.unique(array)}")
        return np.eye(n_classes)[array]
    array = array.astype(np.float64)
    if array.size != n * n_classes:
        raise InvalidDataError(
            f"`{name}` must hold one target row of {n_classes} values per example (one-hot or probabilities"
            f"{', or integer class ids' if n_classes > 1 else ''}). Received shape {np.shape(targets)} for {n} examples"
        )
    return array.reshape(n, n_classes)
