"""TRAK's model output: the classification margin `f = log(p / (1 - p))` of the correct class.

For softmax outputs `f = z_y - logsumexp_{c != y} z_c` (logits `z`), for one sigmoid output
`f = (2y - 1) z`; from probabilities, `f = log p_y - log sum_{c != y} p_c`. With
`p = sigmoid(f)` the probability of the correct class, the cross-entropy is
`l = log(1 + exp(-f))`, so `grad l = -(1 - p) grad f`: `Q = 1 - p = sigmoid(-f)` is TRAK's
out-to-loss reweighting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from vestigia.errors import InvalidModelError

OUTPUTS = ("auto", "logits", "probabilities")

_EPSILON = 1e-12


def infer_outputs(model: keras.Model, loss_function: Any) -> str:
    """ "logits" or "probabilities": the loss's `from_logits`, else the last layer's activation."""
    from_logits = getattr(loss_function, "from_logits", None)
    if from_logits is not None:
        return "logits" if from_logits else "probabilities"
    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    name = getattr(activation, "__name__", "")
    return "probabilities" if name in ("softmax", "sigmoid") else "logits"


def _correct_class(y_true: Any, n_classes: int, rank: int) -> tf.Tensor:
    """One-hot `(batch, n_classes)` of the correct class, from one-hot or integer labels."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == rank and y_true.shape[-1] == n_classes:
        index = tf.argmax(y_true, axis=-1)
    else:
        index = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
    return tf.cast(tf.one_hot(index, n_classes), tf.bool)


def margin_function(outputs: str) -> Callable[[Any, Any], tf.Tensor]:
    """`margin(y_true, y_pred) -> (batch,)` for model outputs of the given kind.

    Raises:
        ValueError: an unknown `outputs`.
    """
    if outputs not in OUTPUTS[1:]:
        raise ValueError(f"`outputs` must be one of {OUTPUTS}. Received: outputs={outputs!r}")

    def margin(y_true: Any, y_pred: Any) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.shape.rank != 2:
            raise InvalidModelError(
                "TRAK's margin needs class scores of shape (batch, n_classes). Received model outputs "
                f"of shape {tuple(y_pred.shape)}; pass `margin_function=` for other outputs."
            )
        n_classes = int(y_pred.shape[-1])
        if n_classes == 1:
            score = y_pred[:, 0]
            if outputs == "probabilities":
                score = tf.math.log(score + _EPSILON) - tf.math.log(1.0 - score + _EPSILON)
            sign = 2.0 * tf.cast(tf.reshape(y_true, [-1]), score.dtype) - 1.0
            return sign * score
        correct = _correct_class(y_true, n_classes, y_pred.shape.rank)
        if outputs == "logits":
            own = tf.reduce_sum(tf.where(correct, y_pred, tf.zeros_like(y_pred)), axis=1)
            others = tf.reduce_logsumexp(tf.where(correct, tf.fill(tf.shape(y_pred), -1e30), y_pred), axis=1)
            return own - others
        own = tf.reduce_sum(tf.where(correct, y_pred, tf.zeros_like(y_pred)), axis=1)
        others = tf.reduce_sum(tf.where(correct, tf.zeros_like(y_pred), y_pred), axis=1)
        return tf.math.log(own + _EPSILON) - tf.math.log(others + _EPSILON)

    return margin


def out_to_loss(margins: tf.Tensor) -> tf.Tensor:
    """`Q = 1 - p = sigmoid(-f)`, shape `(batch,)`."""
    return tf.sigmoid(-margins)
