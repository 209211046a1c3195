"""Labels drawn from the model's predictive distribution, for the true Fisher.

With `y ~ p(y | x, theta)` the expected outer product of the loss gradient is the Fisher, which
for the losses below equals the Gauss-Newton part of the Hessian (Martens 2020):
`E_y[g g^T] = J^T (d^2 loss / d f^2) J`. Supported losses and their distributions:

* `CategoricalCrossentropy`: a one-hot class from `softmax(f)` (`from_logits`) or `f`;
* `SparseCategoricalCrossentropy`: a class index, likewise;
* `BinaryCrossentropy`: Bernoulli(`sigmoid(f)` or `f`);
* `MeanSquaredError` (mean over `k` outputs): `y = f + eps`, `eps ~ N(0, k / 2)`, since the
  loss's Hessian w.r.t. `f` is `(2 / k) I`.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

SUPPORTED = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
    keras.losses.MeanSquaredError,
)


FISHERS = ("true", "empirical")  # labels sampled from the model, or the given ones
SEED_STRIDE = 1_000_003


def batch_seed(seed: int, index: int) -> tf.Tensor:
    """The label-sampling seed of training batch `index`: `seed * SEED_STRIDE + index` (int32), so
    that every pass over the data (and every statistic fitted on it) draws the same labels."""
    return tf.constant(int(seed) * SEED_STRIDE + index, tf.int32)


def unweighting(weights: tf.Tensor) -> tf.Tensor:
    """`1 / sqrt(w_i)` where `w_i > 0`, else 0, `(batch,)`: the captured gradients of `w_i l_i`
    times it have second moments that carry `w_i` once, as the weighted mean Fisher does."""
    return tf.math.rsqrt(tf.maximum(weights, 1e-30)) * tf.cast(weights > 0, tf.float32)


def supports_sampling(loss_function: Any) -> bool:
    """True if labels can be sampled for `loss_function` (one of `SUPPORTED`)."""
    return isinstance(loss_function, SUPPORTED)


def _logits(outputs: tf.Tensor, from_logits: bool) -> tf.Tensor:
    return outputs if from_logits else tf.math.log(tf.maximum(outputs, 1e-12))


def sample_targets(loss_function: Any, outputs: tf.Tensor, targets: Any, seed: tf.Tensor) -> Any:
    """Targets drawn from the model's predictive distribution at `outputs`, shaped like `targets`.

    Args:
        loss_function: one of `SUPPORTED` (its `from_logits` is respected).
        outputs: the model's outputs for the batch.
        targets: the given targets (their shape and dtype are kept).
        seed: integer scalar tensor; the draw is a deterministic function of it.
    """
    stateless_seed = tf.stack([tf.cast(seed, tf.int32), tf.constant(1789, tf.int32)])
    outputs = tf.cast(outputs, tf.float32)
    config = loss_function.get_config() if hasattr(loss_function, "get_config") else {}
    from_logits = bool(config.get("from_logits", False))
    if isinstance(loss_function, (keras.losses.CategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy)):
        classes = outputs.shape[-1]
        flat = tf.reshape(_logits(outputs, from_logits), [-1, classes])
        drawn = tf.random.stateless_categorical(flat, 1, stateless_seed)[:, 0]
        if isinstance(loss_function, keras.losses.CategoricalCrossentropy):
            return tf.reshape(tf.one_hot(drawn, classes, dtype=tf.as_dtype(targets.dtype)), tf.shape(outputs))
        return tf.cast(tf.reshape(drawn, tf.shape(targets)), targets.dtype)
    if isinstance(loss_function, keras.losses.BinaryCrossentropy):
        probabilities = tf.sigmoid(outputs) if from_logits else outputs
        uniform = tf.random.stateless_uniform(tf.shape(outputs), stateless_seed)
        return tf.cast(uniform < probabilities, tf.as_dtype(targets.dtype))
    if isinstance(loss_function, keras.losses.MeanSquaredError):
        k = tf.cast(tf.shape(outputs)[-1], tf.float32)
        noise = tf.random.stateless_normal(tf.shape(outputs), stateless_seed) * tf.sqrt(k / 2.0)
        return tf.cast(outputs + noise, tf.as_dtype(targets.dtype))
    raise TypeError(
        f"No label sampling for {type(loss_function).__name__}; supported: {[c.__name__ for c in SUPPORTED]}"
    )
