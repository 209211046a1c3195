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
* `hessian`: `sum_i d^2 l_i / d theta^2`, float64 `(n_params, n_params)`: for one watched
  `Dense` layer, exactly `sum_i (a_i a_i^T) (x) d^2 l_i / d z_i^2` (Kronecker form, `z` the
  pre-activation output); otherwise HVPs with chunks of identity rows. (`GradientTape.jacobian`
  with `parallel_iterations` returns zeros for this nested gradient in TF 2.21: not used.)

Each function is traced once per instance (`reduce_retracing`), so the last, smaller batch
does not trigger a retrace per call. Where the head is a `Dense` layer under softmax
cross-entropy, `vestigia.gradients.softmax_head` computes all of the above in closed form,
eagerly, and nothing is traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.gradients.head import DenseTap, Head
from vestigia.gradients.softmax_head import SoftmaxDenseHead

LossFn = Callable[[Any, Any], tf.Tensor]

HESSIAN_ROWS_PER_CHUNK = 64


class BatchTraced:
    """`tf.function` of one instance's method, traced once per input structure and dtype with
    every leading (batch) dimension unknown, so that no batch size, the last partial batch
    included, traces again. No AutoGraph, as Keras 3 traces its own train and predict steps
    (converting our code costs about a second per instance on 2 CPU cores). Arguments must be
    nests of tensors or arrays; anything else, or code that cannot be traced without a static
    batch size, falls back to a `reduce_retracing` function.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._traced: dict[str, Any] = {}
        self._fallback = tf.function(fn, reduce_retracing=True, autograph=False)

    @staticmethod
    def _spec(t: Any) -> tf.TensorSpec:
        shape = tuple(t.shape)
        return tf.TensorSpec((None,) + shape[1:] if shape else (), tf.as_dtype(t.dtype))

    def __call__(self, *args: Any) -> Any:
        leaves = tf.nest.flatten(args)
        if not all(isinstance(t, (tf.Tensor, np.ndarray)) for t in leaves):
            return self._fallback(*args)
        specs = tf.nest.map_structure(self._spec, args)
        key = repr(specs)
        traced = self._traced.get(key)
        if traced is None:
            traced = tf.function(self._fn, input_signature=specs, autograph=False)
            try:
                traced.get_concrete_function()
            except (ValueError, TypeError):  # e.g. code that needs a static batch size
                traced = self._fallback
            self._traced[key] = traced
        return traced(*args)

    def tracing_count(self) -> int:
        """How many graphs were traced so far (one per input structure, normally 1)."""
        relaxed = sum(1 for traced in self._traced.values() if traced is not self._fallback)
        return relaxed + int(self._fallback.experimental_get_tracing_count())


def trace(fn: Callable[..., Any]) -> BatchTraced:
    """Trace an instance's method once, for every batch size (see `BatchTraced`)."""
    return BatchTraced(fn)


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
        self._traced_losses = trace(self._losses)
        self._traced_gradients = trace(self._gradients)
        self._traced_hvp = trace(self._hvp)
        self._kronecker_layer = self._single_dense_layer()
        self.closed_form: SoftmaxDenseHead | None = SoftmaxDenseHead.detect(
            head.layers, head.tapped, variables, loss_fn
        )
        self._dense_hessian = trace(self._kronecker_hessian)
        self._dense_factors = trace(self._curvature_factors)
        watched_ids = {id(v) for v in variables}
        self.factor_widths = [
            (int(layer.kernel.shape[0]) + int(layer.use_bias and id(layer.bias.value) in watched_ids), int(layer.units))
            for layer in self._factored.values()
        ]

    def _closed(self, features: Any) -> SoftmaxDenseHead | None:
        """The closed form, where it applies to these features (see `vestigia.gradients.softmax_head`)."""
        closed = self.closed_form
        return closed if closed is not None and closed.applies_to(features) else None

    def losses(self, features: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        """Weighted per-example losses `(batch,)`."""
        closed = self._closed(features)
        if closed is not None:
            return tf.constant(closed.losses(features, targets, weights))
        return self._traced_losses(features, targets, weights)

    def gradients(self, features: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`(losses (batch,), per-example gradients (batch, n_params))`."""
        closed = self._closed(features)
        if closed is not None:
            losses, grads = closed.gradients(features, targets, weights)
            return tf.constant(losses), tf.constant(grads)
        return self._traced_gradients(features, targets, weights)

    def hvp(self, features: Any, targets: Any, weights: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
        """`(sum_i d^2 l_i / d theta^2) V^T` as `(m, n_params)`, for `V` `(m, n_params)`."""
        closed = self._closed(features)
        if closed is not None:
            products = closed.hvp(features, targets, weights, vectors)
            return tf.constant(products, tf.as_dtype(vectors.dtype))
        return self._traced_hvp(features, targets, weights, vectors)

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
            jacobians = tape.jacobian(
                losses, self._generic, experimental_use_pfor=True, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            for v, jac in zip(self._generic, jacobians):
                per_variable[id(v)] = tf.zeros_like(jac) if jac is None else jac
            del tape
        grads = [per_variable[id(v)] for v in self.variables]
        return losses, _flatten_rows(grads, batch)

    def factors(self, features: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor] | None:
        """Per-example gradients in factored form, or None if the head does not allow it.

        Allowed when every watched variable is the kernel (or bias) of a `Dense` layer applied
        once to rank-2 inputs. Then `g_i` is, per layer, `a_i (x) d_i`: `a_i` the layer input
        (with a trailing 1 if the bias is watched) and `d_i` the gradient w.r.t. its
        pre-activation output. Untraced: call it inside a traced function.

        Returns:
            `(losses (batch,), packed (batch, sum_L in_L + out_L))`, `[a_1, d_1, a_2, d_2, ...]`
            with the widths of `factor_widths`; see `vestigia.gradients.factored`.
        """
        if self._generic or not self._factored:
            return None
        taps: list[DenseTap] = []
        with tf.GradientTape() as tape:
            losses = self._weighted_losses(features, targets, weights, taps)
            total = tf.reduce_sum(losses)
        used = [tap for tap in taps if id(tap.layer) in self._factored]
        if [id(tap.layer) for tap in used] != list(self._factored) or any(tap.inputs.shape.rank != 2 for tap in used):
            return None
        deltas = tape.gradient(total, [tap.preactivation for tap in used])
        parts = []
        for tap, delta, (width, _) in zip(used, deltas, self.factor_widths):
            a = tap.inputs
            if width > a.shape[1]:
                a = tf.concat([a, tf.ones_like(a[:, :1])], axis=1)
            parts += [a, delta]
        return losses, tf.concat(parts, axis=1)

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

    def hessian(self, features: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor:
        """`sum_i d^2 l_i / d theta^2` over the batch, float64 `(n_params, n_params)`.

        One watched `Dense` layer (kernel, then bias if watched) on rank-2 inputs: exactly
        `sum_i (a_i a_i^T) (x) M_i`, with `a_i` the layer input (a trailing 1 for the bias) and
        `M_i = d^2 l_i / d z_i^2` `(out, out)` the Hessian w.r.t. the pre-activation output
        (`z` is affine in the watched weights, so this is the whole Hessian). Otherwise: HVPs
        with blocks of `HESSIAN_ROWS_PER_CHUNK` rows of the identity.
        """
        closed = self._closed(features)
        if closed is not None:
            return tf.constant(closed.hessian(features, targets, weights))
        if self._kronecker_layer is not None:
            hessian = self._dense_hessian(features, targets, weights)
            if hessian is not None:
                return hessian
        rows = []
        for start in range(0, self.n_params, HESSIAN_ROWS_PER_CHUNK):
            basis = tf.one_hot(tf.range(start, min(start + HESSIAN_ROWS_PER_CHUNK, self.n_params)), self.n_params)
            rows.append(self.hvp(features, targets, weights, tf.cast(basis, self.variables[0].dtype)))
        return tf.cast(tf.concat(rows, axis=0), tf.float64)

    def _single_dense_layer(self) -> Any:
        """The tapped `Dense` layer when the watched variables are its kernel, then maybe its bias."""
        if len(self._factored) != 1 or self._generic:
            return None
        layer = next(iter(self._factored.values()))
        return layer if self.variables[0] is layer.kernel.value else None

    def dense_curvature(self, features: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor] | None:
        """Kronecker factors of the batch Hessian when one `Dense` layer is watched, else None.

        Returns:
            `(a, M)`: `a` the layer inputs `(batch, in)` (with a trailing 1 when the bias is
            watched) and `M` the Hessians w.r.t. the pre-activation outputs `(batch, out, out)`,
            both float64, such that `sum_i d^2 l_i / d theta^2 = sum_i (a_i a_i^T) (x) M_i`.
        """
        if self._kronecker_layer is None:
            return None
        closed = self._closed(features)
        if closed is not None:
            a, curvature = closed.curvature(features, targets, weights)
            return tf.constant(a), tf.constant(curvature)
        return self._dense_factors(features, targets, weights)

    def _curvature_factors(self, features: Any, targets: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor] | None:
        layer = self._kronecker_layer
        taps: list[DenseTap] = []
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = tf.reduce_sum(self._weighted_losses(features, targets, weights, taps))
            mine = [tap for tap in taps if tap.layer is layer]
            if len(mine) != 1 or mine[0].inputs.shape.rank != 2:
                return None
            z = mine[0].preactivation
            delta = inner.gradient(total, z)
        curvature = tf.cast(outer.batch_jacobian(delta, z, experimental_use_pfor=True), tf.float64)
        a = tf.cast(mine[0].inputs, tf.float64)
        if len(self.variables) == 2:
            a = tf.concat([a, tf.ones_like(a[:, :1])], axis=1)
        return a, curvature

    def _kronecker_hessian(self, features: Any, targets: Any, weights: tf.Tensor) -> tf.Tensor | None:
        factors = self._curvature_factors(features, targets, weights)
        if factors is None:
            return None
        a, curvature = factors
        n_in, n_out = a.shape[1], curvature.shape[1]
        outer_a = tf.reshape(a[:, :, None] * a[:, None, :], [-1, n_in * n_in])
        blocks = tf.matmul(outer_a, tf.reshape(curvature, [-1, n_out * n_out]), transpose_a=True)
        blocks = tf.transpose(tf.reshape(blocks, [n_in, n_in, n_out, n_out]), [0, 2, 1, 3])
        return tf.reshape(blocks, [n_in * n_out, n_in * n_out])
