"""Per-example gradients of a whole model from one layer-capture pass, for dense projections.

`InfluenceModel.example_gradients` differentiates weights outside its factored `Dense` head by
vectorised autodiff (`pfor` Jacobians), which for convolutions costs about a second and
gigabytes per example batch on 2 CPU cores. When such weights belong to layers that `kfac`'s
`LayerCapture` factors (Conv, EinsumDense, Embedding, Dense anywhere in the graph), the same
gradients come from one forward and backward pass: `G_i = sum_t a_it d_it^T` per layer, the
other watched weights by autodiff, reordered to the model's parameter order. Same values, to
float32 round-off.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.errors import NonFiniteError
from vestigia.gradients.layer_capture import Captured, LayerCapture, per_example_gradients
from vestigia.model.influence_model import BaseInfluenceModel

_RUNS: weakref.WeakKeyDictionary[BaseInfluenceModel, Any] = weakref.WeakKeyDictionary()


def _capture_run(model: BaseInfluenceModel) -> Any:
    """The traced capture pass of `model` if it beats `example_gradients`, else None."""
    if model in _RUNS:
        return _RUNS[model]
    run = None
    if model.differentiator._generic:  # weights outside the factored Dense head
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the K-FAC warning about unfactored weights does not apply
            capture = LayerCapture(model.model, model.loss_function, model.weights)
        if capture.specs:
            offsets = np.cumsum([0] + [int(np.prod(v.shape)) for v in capture.variables])
            start = {id(v): int(o) for v, o in zip(capture.variables, offsets)}
            order = np.concatenate([start[id(v)] + np.arange(int(np.prod(v.shape))) for v in model.weights])

            def reduce(captured: Captured) -> tuple[tf.Tensor, tf.Tensor]:
                grads = tf.gather(per_example_gradients(capture, captured), order, axis=1)
                return captured.losses, grads

            run = capture.traced(reduce)
    _RUNS[model] = run
    return run


def example_gradients(model: BaseInfluenceModel, batch: Batch) -> tuple[tf.Tensor, tf.Tensor]:
    """`(losses (batch,), gradients (batch, n_params))` of a raw batch, in `model.weights` order,
    by the capture pass where it applies, else by `model.example_gradients`.

    Raises:
        NonFiniteError: a loss or gradient is NaN or Inf.
    """
    run = _capture_run(model)
    if run is None:
        return model.example_gradients(batch)
    model.check_inputs(batch.inputs, batch.source)
    dtype = model.weights[0].dtype
    weights = tf.ones([batch.size], dtype) if batch.weights is None else tf.cast(batch.weights, dtype)
    losses, grads = run(batch.inputs, batch.targets, tf.reshape(weights, [-1]))
    if not bool(tf.reduce_all(tf.math.is_finite(losses))) or not bool(tf.reduce_all(tf.math.is_finite(grads))):
        raise NonFiniteError(model.diagnose_non_finite(model.features_of(batch), batch.source, losses))
    return losses, grads
