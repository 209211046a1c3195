"""`InfluenceModel`: a Keras model, its watched weights and an unreduced loss.

The model is split at the first watched layer into a frozen trunk, run once per batch, and a
head that is differentiated (see `vestigia.model.split`). Everything downstream asks this
object for per-example losses, gradients `(n, n_params)` and Hessian-vector products.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from vestigia.data.blocks import coalesce, parts_of, rows_within
from vestigia.data.dataset import (
    Batch,
    ProcessBatchFn,
    default_process_batch,
    iterate_batches,
)
from vestigia.data.memo import memo_batches
from vestigia.data.untuned import untuned
from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError
from vestigia.gradients.autodiff import HeadDifferentiator, LossFn, trace
from vestigia.model.checks import (
    check_label_range,
    check_model_weights,
    check_precision,
    diagnose_batch,
    sparse_class_count,
)
from vestigia.model.split import split_model

_UNREDUCED = (None, "none")
UNKNOWN_DIM = 256
"""Entries assumed for an input dimension of unknown size, when sizing blocks."""


class FeatureBatch(NamedTuple):
    """A batch after the trunk: head inputs, targets, weights `(batch,)`, its size, and its index
    and first example's position in the dataset (for error messages)."""

    features: Any
    targets: Any
    weights: tf.Tensor
    size: int
    batch_index: int = 0
    offset: int = 0


def default_loss() -> keras.losses.Loss:
    """The seed's default: categorical cross-entropy on probabilities, unreduced."""
    return keras.losses.CategoricalCrossentropy(from_logits=False, reduction=None)


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"`model` must be a Keras 3 model. Received: {type(model).__name__}")
    if not model.built:
        raise InvalidModelError(
            "`model` must be built (call it on a batch or give it an Input) before influence "
            f"can be computed. Received an unbuilt model {model.name!r}."
        )


def _check_unreduced(loss_function: Any) -> None:
    if not callable(loss_function):
        raise InvalidModelError(
            f"`loss_function` must be callable as loss(y_true, y_pred). Received: {loss_function!r}"
        )
    reduction = getattr(loss_function, "reduction", None)
    if reduction not in _UNREDUCED:
        raise InvalidModelError(
            "`loss_function` must return one loss per example: create it with `reduction=None` "
            f"(e.g. keras.losses.CategoricalCrossentropy(reduction=None)). Received: "
            f"{type(loss_function).__name__} with reduction={reduction!r}"
        )


class BaseInfluenceModel:
    """A model whose `weights_to_watch` are differentiated through an unreduced loss.

    Args:
        model: a built Keras 3 model.
        weights_to_watch: the trainable variables to differentiate; default: every trainable
            variable of the model.
        loss_function: `loss(y_true, y_pred) -> (batch,)`, unreduced (`reduction=None`).
        process_batch_for_loss_fn: maps a dataset element to `(inputs, y_true, sample_weight)`.
        weights_processed: accepted for compatibility with the seed; unused.

    Raises:
        InvalidModelError: unbuilt model, no watched weight, non-trainable or foreign weights,
            or a reduced loss.
        NonFiniteError: watched weights hold NaN or Inf.
    """

    def __init__(
        self,
        model: keras.Model,
        weights_to_watch: list[Any] | None = None,
        loss_function: LossFn | None = None,
        process_batch_for_loss_fn: ProcessBatchFn = default_process_batch,
        weights_processed: bool = False,
    ) -> None:
        _check_model(model)
        check_precision(model)
        loss_function = default_loss() if loss_function is None else loss_function
        _check_unreduced(loss_function)
        watched = list(model.trainable_variables if weights_to_watch is None else weights_to_watch)
        if not watched:
            raise InvalidModelError(f"`weights_to_watch` is empty for model {model.name!r}: nothing to differentiate.")
        trainable_ids = {id(v) for v in model.trainable_variables}
        for v in watched:
            if id(v) not in trainable_ids:
                raise InvalidModelError(
                    f"`weights_to_watch` must hold trainable variables of `model`. Received: {getattr(v, 'path', v)!r}"
                )
        check_model_weights(model, watched)
        self.model = model
        self.weights = watched
        self.loss_function = loss_function
        self.process_batch_for_loss_fn = process_batch_for_loss_fn
        watched_ids = {id(v) for v in watched}
        self.watched_layers = [
            layer for layer in model.layers if any(id(v) in watched_ids for v in layer.trainable_variables)
        ]
        start = min(model.layers.index(layer) for layer in self.watched_layers) if self.watched_layers else 0
        self._trunk_model, head = split_model(model, start, self.watched_layers)
        self.differentiator = HeadDifferentiator(head, [v.value for v in watched], loss_function)
        self._trunk = trace(self._run_trunk)
        self._checked_trunk: Any = trace(self._run_checked_trunk)
        self._trunk_and_gradients: Any = trace(functools.partial(self._run_trunk_and, self.differentiator._gradients))
        self._trunk_and_factors: Any = trace(functools.partial(self._run_trunk_and, self.differentiator.factors))
        closed = self.differentiator.closed_form
        if closed is not None:  # nothing to trace: the trunk runs eagerly, on blocks of batches
            self._checked_trunk = self._eager_checked_trunk
            self._trunk_and_gradients = functools.partial(self._eager_trunk_and, closed.gradients)
            self._trunk_and_factors = functools.partial(self._eager_trunk_and, closed.factors)
        self._factorable: bool | None = None
        self._loss_checked = False
        self._n_classes: int | None = None

    @property
    def nb_params(self) -> int:
        """Number of watched scalar parameters `n_params`."""
        return self.differentiator.n_params

    def block_rows(self) -> int | None:
        """Examples per block when batches are merged before the trunk and head (closed-form
        heads, computed eagerly: the fixed cost of a call is paid per block), else None (the
        user's batches, through traced functions). Bounded by `vestigia.data.blocks.BLOCK_BYTES`
        of float64 work per example: inputs, features, gradients and output curvature."""
        closed = self.differentiator.closed_form
        if closed is None:
            return None
        n_in, n_out = closed.layer.kernel.shape
        width = _row_width(getattr(self.model, "inputs", None) or []) + int(n_in) + self.nb_params + int(n_out) ** 2
        return rows_within(8 * width)

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return self.model.layers

    def __call__(self, inputs: Any) -> Any:
        return self.model(inputs, training=False)

    def _run_trunk(self, inputs: Any) -> Any:
        inputs = tf.nest.map_structure(self._autocast, inputs)
        if self._trunk_model is None:
            return inputs
        return self._trunk_model(inputs, training=False)

    def _autocast(self, tensor: Any) -> Any:
        """Floating inputs in the model's compute dtype, as Keras layers cast them (float64 NumPy
        data must not reach a head computed explicitly)."""
        dtype = tf.as_dtype(self.model.compute_dtype)
        return tf.cast(tensor, dtype) if tf.as_dtype(tensor.dtype).is_floating and tensor.dtype != dtype else tensor

    def _run_checked_trunk(self, inputs: Any) -> tuple[Any, tf.Tensor]:
        """Trunk features and one flag: are the floating inputs and the features all finite."""
        features = self._run_trunk(inputs)
        return features, _all_finite(inputs, features)

    def _eager_checked_trunk(self, inputs: Any) -> tuple[Any, bool]:
        """`_run_checked_trunk`, eagerly, the features as NumPy."""
        features = np.asarray(self._run_trunk(inputs))
        return features, _all_finite_arrays(inputs, features)

    def _eager_trunk_and(self, head_fn: Any, inputs: Any, targets: Any, weights: Any = None) -> Any:
        """`_run_trunk_and` for a closed-form `head_fn` on NumPy features, eagerly."""
        features, finite = self._eager_checked_trunk(inputs)
        if weights is None:
            weights = np.ones(len(features), np.float32)
        losses, values = head_fn(features, targets, weights)
        finite = finite and _all_finite_arrays(losses, values)
        return tf.constant(losses), tf.constant(values), finite

    def _check_loss_output(self, batch: FeatureBatch | Batch, name: str) -> None:
        """Check once that the loss gives one value per example and that sparse labels fit the
        model (by calling it on the model's outputs, or, for a closed-form head, from the shapes)."""
        closed = self.differentiator.closed_form
        if closed is not None and closed.accepts_targets(batch.targets, batch.size):
            self._n_classes = closed.n_classes if closed.sparse else None
            self._check_labels(batch, name)
            self._loss_checked = True
            return
        outputs = self.differentiator.head(batch.features) if isinstance(batch, FeatureBatch) else self(batch.inputs)
        n_outputs = len(getattr(self.model, "outputs", None) or [outputs])
        self._n_classes = sparse_class_count(batch.targets, outputs)
        self._check_labels(batch, name)
        try:
            losses = self.loss_function(batch.targets, outputs)
        except (ValueError, TypeError) as error:
            if n_outputs < 2:
                raise
            raise InvalidModelError(
                f"`loss_function` failed on the model's {n_outputs} outputs "
                f"{getattr(self.model, 'output_names', '')}: it receives them all, as a list "
                "`y_pred`. Pass a loss that takes them all and returns one loss per example, e.g. "
                "`lambda y_true, y_pred: keras.losses.categorical_crossentropy(y_true, y_pred[0])`, or a "
                "single-output model `keras.Model(model.inputs, model.outputs[0])` (targets may be a tuple "
                f"built by `process_batch_for_loss_fn`). Received: {type(error).__name__}: {error}"
            ) from error
        if losses.shape.rank != 1 or int(losses.shape[0]) != batch.size:
            raise InvalidModelError(
                "`loss_function` must return one loss per example, shape (batch,). Received "
                f"shape {tuple(losses.shape)} for a batch of {batch.size}: is the loss reduced?"
            )
        self._loss_checked = True

    def feature_batches(self, dataset: tf.data.Dataset, name: str = "dataset") -> Iterator[FeatureBatch]:
        """Yield the dataset's batches with the trunk applied, in dataset order (where the head has
        a closed form, the trunk runs once per block of `block_rows()` examples)."""
        rows = self.block_rows()
        fn = self.process_batch_for_loss_fn
        batches = iterate_batches(untuned(dataset), fn, name)
        if rows is not None:
            batches = memo_batches(dataset, fn, name, lambda: iterate_batches(untuned(dataset), fn, name))
        blocks = coalesce(batches, rows)
        for block in blocks:
            features = self.features_of(block, name)
            if not block.parts:
                yield features
                continue
            start = 0
            for part in block.parts:
                rows = _rows(features.features, start, start + part.size)
                weights = _rows(features.weights, start, start + part.size)
                yield FeatureBatch(rows, part.targets, weights, part.size, part.batch_index, part.offset)
                start += part.size

    def check_inputs(self, inputs: Any, name: str = "dataset") -> None:
        """Raise `InvalidDataError` if a batch's inputs do not fit the model's inputs.

        Checks the number of inputs, the shape of each example and that floating inputs of the
        model get floating data (tuple or single inputs; dict inputs are left to Keras).
        """
        specs = getattr(self.model, "inputs", None)
        if not specs or isinstance(inputs, dict):
            return
        given, expected = tf.nest.flatten(inputs), list(specs)
        if len(given) != len(expected):
            raise InvalidDataError(
                f"`{name}`: the model takes {len(expected)} input(s) but a batch gives {len(given)}. "
                f"Received inputs of shapes {[tuple(t.shape) for t in given]}"
            )
        for tensor, spec in zip(given, expected):
            shape, wanted = tuple(tensor.shape)[1:], tuple(spec.shape)[1:]
            fits = len(shape) == len(wanted) and all(a is None or b is None or a == b for a, b in zip(shape, wanted))
            if not fits:
                raise InvalidDataError(
                    f"`{name}`: the model's input {spec.name!r} takes examples of shape {wanted}. "
                    f"Received a batch of shape {tuple(tensor.shape)}"
                )
            if tf.as_dtype(spec.dtype).is_floating and not tf.as_dtype(tensor.dtype).is_floating:
                raise InvalidDataError(
                    f"`{name}`: the model's input {spec.name!r} is {spec.dtype}; cast the data to it "
                    f"(e.g. x.astype('float32')). Received inputs of dtype {tf.as_dtype(tensor.dtype).name}"
                )

    def features_of(self, batch: Batch, name: str | None = None) -> FeatureBatch:
        """Apply the trunk to one batch; missing sample weights become ones.

        Raises:
            NonFiniteError: the inputs or the trunk features hold NaN or Inf.
        """
        name = name or batch.source
        self.check_inputs(batch.inputs, name)
        features, finite = self._checked_trunk(batch.inputs)
        dtype = self.weights[0].dtype
        weights = tf.ones([batch.size], dtype) if batch.weights is None else tf.cast(batch.weights, dtype)
        feature_batch = FeatureBatch(features, batch.targets, weights, batch.size, batch.batch_index, batch.offset)
        if not bool(finite):
            for part in batch.parts:  # name the user's batch: each raises if it is the culprit
                self.features_of(part, name)
            raise NonFiniteError(self._diagnose(batch, name, features))
        if not self._loss_checked:
            self._check_loss_output(feature_batch, name)
        self._check_labels(batch, name)
        return feature_batch

    def _check_labels(self, batch: Batch | FeatureBatch, name: str) -> None:
        """Sparse labels within `[0, n_classes)` (known after the first batch's loss check), per
        raw batch of a block."""
        if self._n_classes is not None:
            for part in parts_of(batch) if isinstance(batch, Batch) else (batch,):
                check_label_range(part.targets, self._n_classes, name, part.batch_index, part.offset)

    def batch_losses_and_gradients(self, batch: FeatureBatch, name: str = "dataset") -> tuple[tf.Tensor, tf.Tensor]:
        """Weighted losses `(batch,)` and per-example gradients `(batch, n_params)` of one batch.

        Raises:
            NonFiniteError: a loss or gradient is NaN or Inf.
        """
        losses, grads = self.differentiator.gradients(batch.features, batch.targets, batch.weights)
        if not bool(tf.reduce_all(tf.math.is_finite(losses))) or not bool(tf.reduce_all(tf.math.is_finite(grads))):
            raise NonFiniteError(self.diagnose_non_finite(batch, name, losses, grads))
        return losses, grads

    def example_gradients(self, batch: Batch, name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """`batch_losses_and_gradients(features_of(batch))` of a raw batch, in one traced call
        (trunk, head gradients and finiteness check fused: one call and one sync per batch).

        Raises:
            NonFiniteError: a loss or gradient is NaN or Inf.
        """
        result = self._checked_call(self._trunk_and_gradients, batch, name)
        assert result is not None
        return result

    def example_factors(self, batch: Batch, name: str | None = None) -> tuple[tf.Tensor, tf.Tensor] | None:
        """Per-example gradients of a raw batch in factored form, `(losses, packed factors)`, or
        None if the watched weights do not allow it (see `HeadDifferentiator.factors`); the
        widths are `differentiator.factor_widths`.

        Raises:
            NonFiniteError: a loss or factor is NaN or Inf.
        """
        if self._factorable is False:
            return None
        result = self._checked_call(self._trunk_and_factors, batch, name)
        self._factorable = result is not None
        return result

    def _checked_call(self, fn: Any, batch: Batch, name: str | None) -> tuple[tf.Tensor, tf.Tensor] | None:
        name = name or batch.source
        self.check_inputs(batch.inputs, name)
        if not self._loss_checked:
            self._check_loss_output(parts_of(batch)[0], name)
        self._check_labels(batch, name)
        args = (batch.inputs, batch.targets) if batch.weights is None else (batch.inputs, batch.targets, batch.weights)
        result = fn(*args)
        if result is None:
            return None
        losses, values, finite = result
        if not bool(finite):
            for part in batch.parts:  # name the user's batch: each raises if it is the culprit
                self._checked_call(fn, part, name)
            raise NonFiniteError(self._diagnose(batch, name, self._run_trunk(batch.inputs), losses, values))
        return losses, values

    def _run_trunk_and(self, head_fn: Any, inputs: Any, targets: Any, weights: Any = None) -> Any:
        """`head_fn(trunk(inputs), targets, weights) -> (losses, values)` and a finiteness flag."""
        features = self._run_trunk(inputs)
        dtype = self.weights[0].dtype
        if weights is None:
            weights = tf.ones(tf.shape(tf.nest.flatten(inputs)[0])[:1], dtype)
        result = head_fn(features, targets, tf.cast(weights, dtype))
        if result is None:
            return None
        losses, values = result
        return losses, values, _all_finite(inputs, features, losses, values)

    def _diagnose(self, batch: Batch, name: str, features: Any, losses: Any = None, values: Any = None) -> str:
        parts = {"inputs": batch.inputs, "labels": batch.targets, "sample weights": batch.weights}
        if self._trunk_model is not None:
            parts["trunk features"] = features
        parts.update({"losses": losses, "gradients": values})
        return diagnose_batch(parts, batch.inputs, name, batch.batch_index, batch.offset, batch.size)

    def diagnose_non_finite(self, batch: FeatureBatch, name: str, losses: tf.Tensor, values: Any = None) -> str:
        """Say where a batch's NaN or Inf comes from: its labels, weights, features, losses or gradients."""
        parts = {"labels": batch.targets, "sample weights": batch.weights}
        parts["trunk features" if self._trunk_model is not None else "inputs"] = batch.features
        parts.update({"losses": losses, "gradients": values})
        return diagnose_batch(parts, batch.features, name, batch.batch_index, batch.offset, batch.size)

    # -- the seed's API ------------------------------------------------------------------------

    def batch_loss(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Weighted per-example losses of the whole dataset, shape `(n,)`."""
        losses = [self.differentiator.losses(b.features, b.targets, b.weights) for b in self.feature_batches(dataset)]
        return tf.concat(losses, axis=0)

    def batch_jacobian_tensor(self, batch: Any) -> tf.Tensor:
        """Per-example gradients of one dataset element, shape `(batch, n_params)`."""
        return tf.concat(list(self._gradient_rows(tf.data.Dataset.from_tensors(batch))), axis=0)

    def batch_jacobian(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-example gradients of the whole dataset, shape `(n, n_params)`."""
        return tf.concat(list(self._gradient_rows(dataset)), axis=0)

    def batch_gradient_tensor(self, batch: Any) -> tf.Tensor:
        """Gradient of one element's summed loss, shape `(n_params,)`."""
        return tf.reduce_sum(self.batch_jacobian_tensor(batch), axis=0)

    def batch_gradient(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """One summed gradient per batch, shape `(n_batches, n_params)`."""
        return tf.stack([tf.reduce_sum(g, axis=0) for g in self._gradient_rows(dataset)])

    def _gradient_rows(self, dataset: tf.data.Dataset) -> Iterator[tf.Tensor]:
        for batch in iterate_batches(dataset, self.process_batch_for_loss_fn, "dataset"):
            yield self.example_gradients(batch)[1]


def _rows(nest: Any, start: int, stop: int) -> Any:
    """Rows `start:stop` of every leaf of a nest (None kept)."""
    return tf.nest.map_structure(lambda t: None if t is None else np.asarray(t)[start:stop], nest)


def _row_width(tensors: list[Any]) -> int:
    """Entries per example of symbolic tensors; unknown dimensions count as `UNKNOWN_DIM`."""
    return sum(int(np.prod([UNKNOWN_DIM if d is None else d for d in t.shape[1:]])) for t in tensors)


def _all_finite_arrays(*nests: Any) -> bool:
    """`_all_finite` in NumPy, eagerly."""
    leaves = [np.asarray(t) for t in tf.nest.flatten(nests) if t is not None]
    return all(np.isfinite(a).all() for a in leaves if a.dtype.kind == "f")


def _all_finite(*nests: Any) -> tf.Tensor:
    """One fused flag: every floating tensor of the nests holds only finite values."""
    leaves = [t for t in tf.nest.flatten(nests) if t is not None and tf.as_dtype(t.dtype).is_floating]
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in leaves]) if leaves else tf.constant(True)


def _resolve_layer(model: keras.Model, layer: int | str, name: str) -> int:
    layers = model.layers
    if isinstance(layer, str):
        names = [lyr.name for lyr in layers]
        if layer not in names:
            raise InvalidModelError(
                f"`{name}` names no layer of the model. Received: {name}={layer!r}; layers: {names}"
            )
        return names.index(layer)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise InvalidModelError(f"`{name}` must be a layer index or name. Received: {name}={layer!r}")
    if not -len(layers) <= layer < len(layers):
        raise InvalidModelError(
            f"`{name}` is out of range for a model with {len(layers)} layers. Received: {name}={layer}"
        )
    return int(layer) % len(layers)


def _default_start_layer(model: keras.Model) -> int:
    """The seed's default: the last layer with weights, searching backwards from `layers[-2]`."""
    layers = model.layers
    for i in range(len(layers) - 2, -1, -1):
        if layers[i].trainable_variables:
            return i
    if layers and layers[-1].trainable_variables:
        return len(layers) - 1
    raise InvalidModelError(f"Model {model.name!r} has no layer with trainable weights to watch.")


class InfluenceModel(BaseInfluenceModel):
    """Watch the trainable weights of `model.layers[start_layer : last_layer + 1]`.

    Args:
        model: a built Keras 3 model.
        start_layer: index (negative allowed) or name of the first watched layer. Default, as in
            the seed: the last layer with weights, searching backwards from `layers[-2]` (or the
            last layer if no earlier one has weights).
        last_layer: index or name of the last watched layer; default: `start_layer` only.
        loss_function: unreduced loss `loss(y_true, y_pred) -> (batch,)`; default
            `CategoricalCrossentropy(from_logits=False, reduction=None)`.
        process_batch_for_loss_fn: maps a dataset element to `(inputs, y_true, sample_weight)`.

    Raises:
        InvalidModelError: a layer that does not exist or has no trainable weights, a
            `last_layer` before `start_layer`, or a reduced loss.
    """

    def __init__(
        self,
        model: keras.Model,
        start_layer: int | str | None = None,
        last_layer: int | str | None = None,
        loss_function: LossFn | None = None,
        process_batch_for_loss_fn: ProcessBatchFn = default_process_batch,
    ) -> None:
        _check_model(model)
        start = (
            _default_start_layer(model) if start_layer is None else _resolve_layer(model, start_layer, "start_layer")
        )
        last = start if last_layer is None else _resolve_layer(model, last_layer, "last_layer")
        if last < start:
            raise InvalidModelError(
                f"`last_layer` must not come before `start_layer`. Received: start_layer={start_layer!r} "
                f"(index {start}), last_layer={last_layer!r} (index {last})"
            )
        watched = [v for layer in model.layers[start : last + 1] for v in layer.trainable_variables]
        if not watched:
            names = [model.layers[i].name for i in range(start, last + 1)]
            raise InvalidModelError(
                f"The watched layers {names} have no trainable weights. Received: "
                f"start_layer={start_layer!r}, last_layer={last_layer!r}"
            )
        self.start_layer = start
        self.last_layer = last
        super().__init__(model, watched, loss_function, process_batch_for_loss_fn)


def check_influence_model(value: Any, name: str = "model") -> BaseInfluenceModel:
    """Return `value` if it is an `InfluenceModel`; otherwise raise a `TypeError` naming `name`."""
    if not isinstance(value, BaseInfluenceModel):
        raise TypeError(f"`{name}` must be an InfluenceModel. Received: {type(value).__name__}")
    return value
