"""Whole-model layer capture: per watched layer, its inputs `a` and pre-activation gradients `d`.

One forward and one backward pass of the *whole* model per batch (Sequential, Functional with
any graph, subclassed) return, for each watched layer of a kind in
`vestigia.gradients.layer_kinds` (`Dense`, `EinsumDense`, `Conv1D`, `Conv2D`, `Embedding`):

* `a`, shape `(batch, T, n_in)`: the layer input at each of its `T` positions (Conv: the
  unfolded patches; a trailing 1 when the bias is watched; a layer called several times
  contributes all its calls as positions);
* `d = d l_i / d z`, shape `(batch, T, n_out)`: the gradient of each example's weighted loss
  `l_i = w_i loss(y_i, model(x_i))` w.r.t. the layer's output *before* its activation,

so that the per-example gradient of the layer's kernel and bias is `G_i = sum_t a_it d_it^T`,
never formed here. Every other watched variable (LayerNorm / BatchNorm scale and offset, layers
of other kinds) gets plain per-example gradients `(batch, size)` by vectorised autodiff, with a
warning that names it. The per-example losses come with them.

How: for the duration of the traced pass, each captured layer's `call` is replaced (on the
instance, restored afterwards) by one that computes `z` explicitly, records `(input, z)` and
applies the activation, so nothing about the model's graph needs to be known. The model runs
with `training=False`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from vestigia.errors import InvalidModelError
from vestigia.gradients.autodiff import BatchTraced, LossFn, trace
from vestigia.gradients.fisher_labels import sample_targets
from vestigia.gradients.layer_kinds import LayerSpec, layer_spec


class Captured(NamedTuple):
    """One batch's capture.

    Attributes:
        losses: weighted per-example losses `(batch,)` (with the labels used for `d`).
        inputs: per captured layer, `a` `(batch, T, n_in)`.
        deltas: per captured layer, `d` `(batch, T, n_out)`.
        others: per other watched variable, per-example gradients `(batch, size)`.
        layer_inputs: per captured layer, its raw input tensor of each call (for reducers that
            need no patches, e.g. `vestigia.curvature.conv_covariance`; in a traced reducer the
            patches of `inputs` are only computed if used).
    """

    losses: tf.Tensor
    inputs: list[tf.Tensor]
    deltas: list[tf.Tensor]
    others: list[tf.Tensor]
    layer_inputs: list[list[tf.Tensor]] = []


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)]
    return [layer for layer in layers if not list(layer._flatten_layers(include_self=False, recursive=False))]


class LayerCapture:
    """Capture `a` and `d` of every watched factorable layer of a Keras model in one pass.

    Args:
        model: a built Keras 3 model.
        loss_function: unreduced loss `loss(y_true, y_pred) -> (batch,)`.
        variables: the watched variables (default: all trainable variables of the model).

    Attributes:
        specs: the captured layers, in model order. others: the other watched variables.

    Raises:
        InvalidModelError: a watched variable that belongs to no layer of the model.

    Warns:
        UserWarning: naming each watched variable that gets no Kronecker factor, and why.
    """

    def __init__(self, model: keras.Model, loss_function: LossFn, variables: list[Any] | None = None) -> None:
        self.model = model
        self.loss_function = loss_function
        watched = list(model.trainable_variables if variables is None else variables)
        watched_ids = {id(v) for v in watched}
        self.specs: list[LayerSpec] = []
        reasons: dict[int, str] = {}
        for layer in _leaf_layers(model):
            spec, reason = layer_spec(layer, watched_ids)
            if spec is not None:
                self.specs.append(spec)
            else:
                for v in layer.trainable_variables:
                    reasons.setdefault(id(v), f"{type(layer).__name__} {layer.name!r}: {reason}")
        claimed = {id(v) for spec in self.specs for v in spec.variables}
        self.others = [v for v in watched if id(v) not in claimed]
        if self.others:
            names = [
                f"{v.path} ({reasons.get(id(v), 'not a kernel or bias of a supported layer')})" for v in self.others
            ]
            warnings.warn(
                "These watched weights get no Kronecker factor; a diagonal curvature factor from their "
                f"per-example gradients is used instead: {names}",
                UserWarning,
                stacklevel=2,
            )
        self._records: dict[int, list[tuple[tf.Tensor, tf.Tensor]]] = {}

    @property
    def variables(self) -> list[Any]:
        """Captured layers' variables (kernel, bias) in order, then the other watched variables."""
        return [v for spec in self.specs for v in spec.variables] + list(self.others)

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        for spec in self.specs:
            object.__setattr__(spec.layer, "call", self._recording_call(spec))
        try:
            yield
        finally:
            for spec in self.specs:
                object.__delattr__(spec.layer, "call")

    def _recording_call(self, spec: LayerSpec) -> Callable[..., tf.Tensor]:
        def call(inputs: Any, *args: Any, **kwargs: Any) -> tf.Tensor:
            z = spec.preactivation(inputs)
            self._records.setdefault(id(spec.layer), []).append((inputs, z))
            return spec.activation(z)

        return call

    def capture(self, inputs: Any, targets: Any, weights: tf.Tensor, seed: tf.Tensor | None = None) -> Captured:
        """Capture one batch (untraced: call it inside a traced function, or use `traced`).

        Args:
            inputs, targets: the batch, as the model and the loss take them.
            weights: per-example weights `(batch,)`.
            seed: if given, `d` and the losses use labels sampled from the model's predictive
                distribution (true Fisher, see `vestigia.gradients.fisher_labels`), drawn with
                this integer seed; else the given `targets` (empirical Fisher, gradients).
        """
        self._records = {}
        with tf.GradientTape(persistent=bool(self.others)) as tape:
            with self._patched():
                outputs = self.model(inputs, training=False)
            if seed is not None:
                targets = sample_targets(self.loss_function, tf.stop_gradient(outputs), targets, seed)
            losses = tf.reshape(self.loss_function(targets, outputs), [-1])
            losses = losses * tf.cast(weights, losses.dtype)
            total = tf.reduce_sum(losses)
        records = []
        for spec in self.specs:
            calls = self._records.get(id(spec.layer), [])
            if not calls:
                raise InvalidModelError(
                    f"The watched layer {spec.name!r} was not called when the model ran: watch only "
                    "layers on the path from the inputs to the outputs."
                )
            records.append((spec, calls))
        zs = [z for _, calls in records for _, z in calls]
        grads = iter(tape.gradient(total, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        a_list, d_list = [], []
        for spec, calls in records:
            a_parts, d_parts = [], []
            for x, _ in calls:
                a_parts.append(spec.input_rows(x))
                d_parts.append(spec.output_rows(next(grads)))
            a_list.append(a_parts[0] if len(a_parts) == 1 else tf.concat(a_parts, axis=1))
            d_list.append(d_parts[0] if len(d_parts) == 1 else tf.concat(d_parts, axis=1))
        others = []
        if self.others:
            jacobians = tape.jacobian(
                losses,
                [v.value for v in self.others],
                experimental_use_pfor=True,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            batch = tf.shape(losses)[0]
            others = [tf.reshape(j, [batch, -1]) for j in jacobians]
            del tape
        self._records = {}
        return Captured(losses, a_list, d_list, others, [[x for x, _ in calls] for _, calls in records])

    def traced(self, reducer: Callable[..., Any], sampled: bool = False) -> BatchTraced:
        """`fn(inputs, targets, weights[, seed], *extra) -> reducer(captured, *extra)`, traced once.

        The reducer runs in the same graph, so large `a` (Conv patches) live only inside it.
        With `sampled=True` the fourth argument is the integer seed of the sampled labels.
        """
        if sampled:

            def run_sampled(inputs: Any, targets: Any, weights: Any, seed: Any, *extra: Any) -> Any:
                return reducer(self.capture(inputs, targets, weights, seed), *extra)

            return trace(run_sampled)

        def run(inputs: Any, targets: Any, weights: Any, *extra: Any) -> Any:
            return reducer(self.capture(inputs, targets, weights), *extra)

        return trace(run)


def per_example_gradients(capture: LayerCapture, captured: Captured) -> tf.Tensor:
    """The full per-example gradients `(batch, n_params)` in `capture.variables` order (tests and
    small models only: this forms what the factored paths avoid)."""
    parts = []
    for spec, a, d in zip(capture.specs, captured.inputs, captured.deltas):
        parts += spec.kernel_gradient(tf.einsum("bti,bto->bio", a, d))
    parts += captured.others
    return tf.concat(parts, axis=1)
