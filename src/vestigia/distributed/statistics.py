"""Shard functions for factor statistics: Kronecker covariance sums of a Dense layer.

K-FAC approximates a Dense layer's Fisher / GGN block by `A (x) G` with
`A = sum_i a_i a_i^T` (layer inputs, with a 1 appended for the bias) and
`G = sum_i d_i d_i^T` (gradients of each example's loss w.r.t. the layer's pre-activation
output). Both are sums over examples, so shards are reduced exactly by adding them
(`reduce_statistics`). `DenseKroneckerStatistics` is picklable (the model travels as JSON and
weights) so Ray workers rebuild it once per process.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.errors import InvalidModelError


class DenseKroneckerStatistics:
    """`(x, y) -> {"A": (d_in+1, d_in+1), "G": (d_out, d_out), "count": (1,)}` sums for one Dense layer.

    Args:
        model: a Keras model whose `layers` run in sequence (a `Sequential` or a chain).
        layer: name or index of the Dense layer.
        loss: an unreduced Keras loss `loss(y_true, y_pred) -> (batch,)`.
        bias: append a constant 1 to the inputs (the bias row of `A`).
    """

    def __init__(self, model: keras.Model, layer: str | int, loss: keras.losses.Loss, bias: bool = True) -> None:
        target = model.get_layer(layer) if isinstance(layer, str) else model.layers[layer]
        if not isinstance(target, keras.layers.Dense):
            raise InvalidModelError(
                f"`layer` must name a Dense layer. Received: layer={layer!r} ({type(target).__name__})"
            )
        self.index = model.layers.index(target)
        self.config = model.to_json()
        self.weights = [np.asarray(w) for w in model.get_weights()]
        self.loss_config = keras.losses.serialize(loss)
        self.bias = bias
        self._model, self._loss = model, loss

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_loss")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the model from JSON and weights (once per process, eagerly, not inside a replica)."""
        self.__dict__.update(state)
        self._model = keras.models.model_from_json(self.config)
        self._model.set_weights(self.weights)
        self._loss = keras.losses.deserialize(self.loss_config)

    def _built(self) -> tuple[keras.Model, keras.losses.Loss]:
        return self._model, self._loss

    def factors(self, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-example layer inputs `a` `(batch, d_in [+1])` and output gradients `d` `(batch, d_out)`, float64."""
        model, loss = self._built()
        h = tf.convert_to_tensor(x)
        for layer in model.layers[: self.index]:
            h = layer(h)
        dense = model.layers[self.index]
        a = tf.cast(h, tf.float64)
        with tf.GradientTape() as tape:
            z = tf.matmul(h, dense.kernel) + (dense.bias if dense.use_bias else 0.0)
            tape.watch(z)
            out = dense.activation(z)
            for layer in model.layers[self.index + 1 :]:
                out = layer(out)
            total = tf.reduce_sum(loss(tf.convert_to_tensor(y), out))
        d = tf.cast(tape.gradient(total, z), tf.float64)  # row i: d loss_i / d z_i (examples independent)
        if self.bias:
            a = tf.concat([a, tf.ones_like(a[:, :1])], axis=1)
        return a, d

    def sums(self, x: Any, y: Any) -> dict[str, tf.Tensor]:
        """`{"A": a^T a, "G": d^T d, "count": (1,)}` as float64 tensors (for `tf.distribute`)."""
        a, d = self.factors(x, y)
        count = tf.cast(tf.shape(a)[:1], tf.float64)
        return {"A": tf.matmul(a, a, transpose_a=True), "G": tf.matmul(d, d, transpose_a=True), "count": count}

    def example_gradients(self, x: Any, y: Any) -> tf.Tensor:
        """Per-example kernel (and bias) gradients `vec(a_i d_i^T)`, float32 `(batch, (d_in+1) d_out)`."""
        a, d = self.factors(x, y)
        outer = tf.einsum("bi,bj->bij", a, d)
        return tf.cast(tf.reshape(outer, [tf.shape(outer)[0], -1]), tf.float32)

    def __call__(self, shard: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        x, y = shard
        return {name: value.numpy() for name, value in self.sums(x, y).items()}
