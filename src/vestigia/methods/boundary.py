"""Boundary-based self-influence: how far each example sits from the decision boundary.

A DeepFool search (Moosavi-Dezfooli et al. 2016) moves a point `p` (the input `x`, or the
model's trainable weights `w`) towards the closest class boundary of the model's *predicted*
class `c` (labels are not used). At each step, with `f` the logits at `p`,

    k* = argmin_{k != c} |f_k - f_c| / ||grad(f_k - f_c)||_2,
    r  = |f_k* - f_c| / ||grad(f_k* - f_c)||_2^2 * grad(f_k* - f_c),      p <- p + r,

which lands exactly on the boundary of a linear model (no DeepFool overshoot). An example stops
when its predicted class changes, when its top-2 logits are within `eps`, when no other class is
reachable (all gradient differences are zero), or after `step_nbr` steps; it then keeps the
distance travelled so far. Self-influence is minus the distance,

    SampleBoundaryCalculator:  -||x - x_adv||_2,       WeightsBoundaryCalculator:  -||w - w_adv||_p,

so higher (closer to the boundary) means more suspicious, as for every self-influence. Like
Influenciae 0.3.0 the distance is a norm, not its square (the seed's docs say squared).

Both searches run for a whole batch at once in one traced `tf.while_loop`, with a per-example
active mask. The weight-space search keeps one copy of the weights per example, `(batch,
n_params)`, and evaluates the model functionally (`stateless_call` under `tf.vectorized_map`),
so the model's variables are never written (Influenciae 0.3.0 assigned them in place).

References:
    Moosavi-Dezfooli, Fawzi, Frossard. DeepFool: a simple and accurate method to fool deep
    neural networks. CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch, ProcessBatchFn
from vestigia.errors import InvalidDataError, InvalidModelError, check_finite, check_non_negative, check_positive_int
from vestigia.methods.engine import SelfInfluenceCalculator
from vestigia.model.influence_model import BaseInfluenceModel

LogitsAndJacobian = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def deepfool_search(
    start: tf.Tensor, logits_and_jacobian: LogitsAndJacobian, step_nbr: int, eps: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """DeepFool for a batch of independent points, in one `tf.while_loop`.

    Args:
        start: points, a float tensor of shape `(batch, dim)`.
        logits_and_jacobian: `points (batch, dim) -> (logits (batch, classes), jacobian
            (batch, classes, dim))`, where row `i` depends on point `i` only.
        step_nbr: most steps per point.
        eps: a point whose top-2 logits are within `eps` is on the boundary.

    Returns:
        `(end, steps)`: the points where the search stopped `(batch, dim)` and the number of
        steps each one took `(batch,)`. The class is the prediction at `start`.
    """
    batch = tf.shape(start)[0]

    def step(i: tf.Tensor, point: tf.Tensor, label: tf.Tensor, active: tf.Tensor, steps: tf.Tensor) -> tuple:
        logits, jacobian = logits_and_jacobian(point)
        predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
        label = tf.where(i == 0, predicted, label)
        top2 = tf.math.top_k(logits, k=2).values
        active = active & tf.equal(predicted, label) & (top2[:, 0] - top2[:, 1] > eps)
        gaps = tf.abs(logits - tf.gather(logits, label, batch_dims=1)[:, None])  # (batch, classes)
        directions = jacobian - tf.gather(jacobian, label, batch_dims=1)[:, None, :]  # (batch, classes, dim)
        squared = tf.reduce_sum(tf.square(directions), axis=2)
        candidate = tf.logical_not(tf.one_hot(label, tf.shape(logits)[1], on_value=True, off_value=False))
        candidate &= squared > 0
        ratio = tf.where(candidate, gaps / tf.sqrt(tf.where(candidate, squared, 1.0)), np.inf)
        closest = tf.argmin(ratio, axis=1, output_type=tf.int32)
        active &= tf.math.is_finite(tf.reduce_min(ratio, axis=1))
        scale = tf.where(
            active,
            tf.gather(gaps, closest, batch_dims=1) / tf.where(active, tf.gather(squared, closest, batch_dims=1), 1.0),
            0.0,
        )
        point = point + scale[:, None] * tf.gather(directions, closest, batch_dims=1)
        return i + 1, point, label, active, steps + tf.cast(active, tf.int32)

    _, end, _, _, steps = tf.while_loop(
        lambda i, point, label, active, steps: (i < step_nbr) & tf.reduce_any(active),
        step,
        (
            tf.constant(0),
            start,
            tf.zeros([batch], tf.int32),
            tf.ones([batch], tf.bool),
            tf.zeros([batch], tf.int32),
        ),
    )
    return end, steps


def _keras_model(model: Any) -> tuple[keras.Model, ProcessBatchFn | None]:
    if isinstance(model, BaseInfluenceModel):
        return model.model, model.process_batch_for_loss_fn
    if not isinstance(model, keras.Model):
        raise InvalidModelError(
            f"`model` must be a Keras 3 classifier or an InfluenceModel. Received: {type(model).__name__}"
        )
    if not model.built:
        raise InvalidModelError(f"`model` must be built (give it an Input). Received an unbuilt model {model.name!r}.")
    return model, None


def _check_logits(logits: tf.Tensor) -> None:
    if logits.shape.rank != 2 or (logits.shape[1] is not None and logits.shape[1] < 2):
        raise InvalidModelError(
            "Boundary-based influence needs a classifier whose output is `(batch, classes)` with at "
            f"least 2 classes. Received an output of shape {tuple(logits.shape)}."
        )


def _input_spec(inputs: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype), inputs)


class _TracedPerSignature:
    """One traced function per input signature (batch dimension left free), built on first use."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.traced: dict[str, Any] = {}

    def __call__(self, inputs: Any) -> Any:
        spec = _input_spec(inputs)
        key = repr(spec)
        if key not in self.traced:
            self.traced[key] = tf.function(self.fn, input_signature=[spec], autograph=False)
        return self.traced[key](inputs)


def _check_inputs(inputs: Any) -> Any:
    inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
    for t in tf.nest.flatten(inputs):
        if t.dtype.is_floating:
            check_finite("train_set inputs", t.numpy(), "inputs")
    return inputs


class SampleBoundaryCalculator(SelfInfluenceCalculator):
    """Self-influence `-||x - x_adv||_2`: minus the distance of the input to the boundary.

    `x_adv` is found by DeepFool in input space (see the module docstring), for a whole batch
    at once: the logits of example `i` depend on `x_i` only, so one batched jacobian gives
    every example's input gradients. The model must take one floating (or integer, cast to
    float32) input tensor and return `(batch, classes)` logits or scores.

    Args:
        model: a Keras 3 classifier, or an `InfluenceModel` (its Keras model and
            `process_batch_for_loss_fn` are used; its loss and watched weights are not).
        step_nbr: most DeepFool steps per example.
        eps: top-2 logits within `eps` count as on the boundary.
        process_batch_for_loss_fn: splits a dataset element into `(inputs, targets, weights)`;
            default: the InfluenceModel's, else `(x, y[, w])`. Targets and weights are unused.

    Raises:
        InvalidModelError: not a built Keras model, or an output that is not `(batch, classes >= 2)`.
    """

    def __init__(
        self,
        model: Any,
        step_nbr: int = 100,
        eps: float = 1e-6,
        process_batch_for_loss_fn: ProcessBatchFn | None = None,
    ) -> None:
        self.model, model_process_fn = _keras_model(model)
        self.step_nbr = check_positive_int("step_nbr", step_nbr)
        self.eps = check_non_negative("eps", eps)
        process_fn = process_batch_for_loss_fn or model_process_fn
        if process_fn is not None:
            self.process_batch_for_loss_fn = process_fn
        self._search = _TracedPerSignature(self._search_graph)

    def _search_graph(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(inputs)
        start = tf.reshape(inputs, [shape[0], -1])

        def logits_and_jacobian(point: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(point)
                logits = tf.cast(self.model(tf.reshape(point, shape), training=False), point.dtype)
            _check_logits(logits)
            return logits, tape.batch_jacobian(logits, point)

        end, _ = deepfool_search(start, logits_and_jacobian, self.step_nbr, self.eps)
        return tf.reshape(end, shape), tf.norm(end - start, axis=1)

    def _float_inputs(self, inputs: Any) -> tf.Tensor:
        if isinstance(inputs, (tuple, list, dict)):
            raise InvalidDataError(
                "SampleBoundaryCalculator moves one input tensor; the model inputs must be a single "
                f"tensor. Received a {type(inputs).__name__} of {len(inputs)} inputs."
            )
        inputs = _check_inputs(inputs)
        return inputs if inputs.dtype.is_floating else tf.cast(inputs, tf.float32)

    def boundary_points(self, inputs: Any) -> np.ndarray:
        """`x_adv` for a batch of inputs `(batch, ...)`: where each search stopped, same shape."""
        return self._search(self._float_inputs(inputs))[0].numpy()

    def _self_influence(self, batch: Batch) -> np.ndarray:
        return -self._search(self._float_inputs(batch.inputs))[1].numpy()


class WeightsBoundaryCalculator(SelfInfluenceCalculator):
    """Self-influence `-||w - w_adv||_p`: minus the distance of the weights to the boundary.

    For each example, DeepFool (see the module docstring) moves a private copy of all the
    model's trainable weights, flattened to `n_params` values, until the example's predicted
    class changes; the steps are Euclidean and `norm_type` only sets the norm of the final
    displacement, as in Influenciae 0.3.0. The batch runs at once: weights `(batch, n_params)`,
    the model evaluated per example by `stateless_call` under `tf.vectorized_map`, and one
    batched jacobian `(batch, classes, n_params)` per step, so memory grows as
    `batch * classes * n_params`: lower the batch size for large models. Non-trainable
    variables (e.g. BatchNorm statistics) stay fixed; the model's variables are never written.

    Args:
        model: a Keras 3 classifier, or an `InfluenceModel` (its Keras model and
            `process_batch_for_loss_fn` are used; all trainable weights move, not only the
            watched ones).
        step_nbr: most DeepFool steps per example.
        norm_type: `p >= 1` of the score's norm, or `np.inf`.
        eps: top-2 logits within `eps` count as on the boundary.
        process_batch_for_loss_fn: as for `SampleBoundaryCalculator`.

    Raises:
        InvalidModelError: not a built Keras model, no trainable weight, or an output that is
            not `(batch, classes >= 2)`.
        ValueError: `norm_type` below 1.
    """

    def __init__(
        self,
        model: Any,
        step_nbr: int = 100,
        norm_type: float = 2,
        eps: float = 1e-6,
        process_batch_for_loss_fn: ProcessBatchFn | None = None,
    ) -> None:
        self.model, model_process_fn = _keras_model(model)
        self.step_nbr = check_positive_int("step_nbr", step_nbr)
        self.eps = check_non_negative("eps", eps)
        norm = float(check_non_negative("norm_type", norm_type)) if norm_type != np.inf else np.inf
        if norm < 1:
            raise ValueError(f"`norm_type` must be >= 1 (or np.inf). Received: norm_type={norm_type!r}")
        self.norm_type = norm
        self._trainable = list(self.model.trainable_variables)
        if not self._trainable:
            raise InvalidModelError(f"`model` {self.model.name!r} has no trainable weight to move.")
        self._shapes = [tuple(v.shape) for v in self._trainable]
        self._sizes = [int(np.prod(s)) for s in self._shapes]
        process_fn = process_batch_for_loss_fn or model_process_fn
        if process_fn is not None:
            self.process_batch_for_loss_fn = process_fn
        self._search = _TracedPerSignature(self._search_graph)

    def _flat_weights(self) -> tf.Tensor:
        return tf.concat([tf.reshape(tf.convert_to_tensor(v.value), [-1]) for v in self._trainable], axis=0)

    def _per_example_logits_and_jacobian(self, weights: tf.Tensor, inputs: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Logits `(batch, classes)` of example `i` under its own weights `weights[i]`, and their
        jacobian `(batch, classes, n_params)` with respect to those weights."""
        non_trainable = [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]

        def one(args: tuple[tf.Tensor, Any]) -> tuple[tf.Tensor, tf.Tensor]:
            flat, example = args
            with tf.GradientTape() as tape:
                tape.watch(flat)
                values = [tf.reshape(part, s) for part, s in zip(tf.split(flat, self._sizes), self._shapes)]
                example = tf.nest.map_structure(lambda t: t[None], example)
                logits, _ = self.model.stateless_call(values, non_trainable, example, training=False)
                _check_logits(logits)
                logits = tf.cast(logits[0], flat.dtype)
            return logits, tape.jacobian(logits, flat)

        return tf.vectorized_map(one, (weights, inputs))

    def _search_graph(self, inputs: Any) -> tuple[tf.Tensor, tf.Tensor]:
        flat = self._flat_weights()
        batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
        start = tf.tile(flat[None, :], [batch, 1])

        def logits_and_jacobian(point: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return self._per_example_logits_and_jacobian(point, inputs)

        end, _ = deepfool_search(start, logits_and_jacobian, self.step_nbr, self.eps)
        moved = tf.abs(end - start)
        if self.norm_type == np.inf:
            distance = tf.reduce_max(moved, axis=1)
        else:
            distance = tf.reduce_sum(moved**self.norm_type, axis=1) ** (1.0 / self.norm_type)
        return end, distance

    def boundary_points(self, inputs: Any) -> np.ndarray:
        """`w_adv` for a batch of inputs: each example's flattened boundary weights `(batch, n_params)`,
        in the order of `model.trainable_variables`."""
        return self._search(_check_inputs(inputs))[0].numpy()

    def _self_influence(self, batch: Batch) -> np.ndarray:
        return -self._search(_check_inputs(batch.inputs))[1].numpy()
