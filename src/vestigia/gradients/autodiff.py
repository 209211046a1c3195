"""All automatic differentiation of the head lives here.

For a batch of trunk features, targets `y` and per-example weights `w`, with the weighted
per-example loss `l_i = w_i * loss(y_i, head(features_i))` and watched parameters `theta`
flattened to `n_params` entries:

* `gradients`: `l` of shape `(batch,)` and `G[i] = d l_i / d theta`, shape `(batch, n_params)`.
  `Dense` kernels in the head's tapped layers use the factored form
  `d l_i / d W = a_i (x) d_i` (layer input times the gradient w.r.t. the pre-activation
  output); every other variable uses vectorised autodiff (`GradientTape.jacobian`, pfor).
* `hvp`: `(sum_i d^2 l_i / d theta^2) V^T` for `V` of shape `(m, n_params)`, returned as
  `(m, n_params)`: reverse-over-reverse, vectorised over the `m` vectors. No per-example
  Hessian is ever formed.
* `hessian`: `sum_i d^2 l_i / d theta^2`, shape `(n_params, n_params)`, the Jacobian of the
  batch gradient, computed in chunks of rows.

Each function is traced once per instance (`reduce_retracing`), so the last, smaller batch
does not trigger a retrace per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.model.split import DenseTap, Head

LossFn = Callable[[Any, Any], tf.Tensor]

HESSIAN_ROWS_PER_CHUNK = 64


def _flatten_rows(tensors: list[tf.Tensor], rows: tf.Tensor | int) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [rows, -1]) for t in tensors], axis=1)


class HeadDifferentiator:
    """Per-example losses, gradients, HVPs and Hessians of a head's weighted loss.

    Args:
        head: the differentiable part of the model.
        variables: the watched `tf.Variable`s, in the order of the flattened parameter vector.
        loss_fn: `loss_fn(y_true, y_pred) -> (batch,)`, unreduced.
    """

    def __init__(self, head: Head, variables: list[tf.Variable], loss_fn: LossFn) -> None:
        self.head = head
        self.variables = variables
        self.sizes = [int(np.prod(v.shape)) for v in variables]
        self.n_params = int(sum(self.sizes))
        self.loss_fn = loss_fn
        self._factored = {id(layer): layer for layer in head.tapped if any(v is layer.kernel.value for v in variables)}
        factored_ids = set()
        for layer in self._factored.values():
            factored_ids.add(id(layer.kernel.value))
            if layer.use_bias:
                factored_ids.add(id(layer.bias.value))
        self._generic = [v for v in variables if id(v) not in factored_ids]
        self.losses = tf.function(self._losses, reduce_retracing=True)
        self.gradients = tf.function(self._gradients, reduce_retracing=True)
        self.hvp = tf.function(self._hvp, reduce_retracing=True)
        self.hessian = tf.function(self._hessian, reduce_retracing=True)

    def _weighted_losses(self, features: Any, targets: Any, weights: tf.Tensor, taps: list | None) -> tf.Tensor:
        outputs = self.head(features, taps)
        losses = tf.reshape(self.loss_fn(targets, outputs), [-1])
        return losses * tf.cast(weights, losses.dtype)

    def _losses(self, features: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        return self._weighted_losses(features, targets, weights, None)

    def _gradients(self, features: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        taps: list[DenseTap] = []
        with tf.GradientTape(persistent=bool(self._generic)) as tape:
            losses = self._weighted_losses(features, targets, weights, taps)
            total = tf.reduce_sum(losses)
        batch = tf.shape(losses)[0]
        per_variable: dict[int, tf.Tensor] = {}
        used_taps = [tap for tap in taps if id(tap.layer) in self._factored]
        if used_taps:
            deltas = tape.gradient(total, [tap.preactivation for tap in used_taps])
            for tap, delta in zip(used_taps, deltas):
                a = tf.reshape(tap.inputs, [batch, -1, tap.inputs.shape[-1]])
                d = tf.reshape(delta, [batch, -1, delta.shape[-1]])
                per_variable[id(tap.layer.kernel.value)] = tf.einsum("bti,bto->bio", a, d)
                if tap.layer.use_bias:
                    per_variable[id(tap.layer.bias.value)] = tf.reduce_sum(d, axis=1)
        if self._generic:
            jacobians = tape.jacobian(losses, self._generic, experimental_use_pfor=True)
            for v, jac in zip(self._generic, jacobians):
                per_variable[id(v)] = tf.zeros_like(jac) if jac is None else jac
            del tape
        grads = [per_variable[id(v)] for v in self.variables]
        return losses, _flatten_rows(grads, batch)

    def _split(self, vectors: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(vectors, self.sizes, axis=1)
        return [tf.cast(p, v.dtype) for p, v in zip(parts, self.variables)]

    def _batch_gradient(self, features: Any, targets: Any, weights: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as inner:
            total = tf.reduce_sum(self._weighted_losses(features, targets, weights, None))
        return inner.gradient(total, self.variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _hvp(self, features: Any, targets: Any, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        parts = self._split(vectors)
        with tf.GradientTape() as outer:
            grads = self._batch_gradient(features, targets, weights)
            projections = tf.add_n([tf.linalg.matvec(p, tf.reshape(g, [-1])) for p, g in zip(parts, grads)])
        products = outer.jacobian(
            projections,
            self.variables,
            experimental_use_pfor=True,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return _flatten_rows(products, tf.shape(vectors)[0])

    def _hessian(self, features: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as outer:
            grads = self._batch_gradient(features, targets, weights)
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        rows = outer.jacobian(
            flat,
            self.variables,
            experimental_use_pfor=True,
            parallel_iterations=HESSIAN_ROWS_PER_CHUNK,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return _flatten_rows(rows, self.n_params)
