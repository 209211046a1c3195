"""Closed form of a watched `Dense` layer under softmax cross-entropy: no autodiff, no tracing.

Applies when the head is exactly one plain `Dense` layer applied to rank-2 features `a`, its
kernel (and maybe its bias, after it) watched, and its logits `z = a W (+ b)` go into Keras'
`CategoricalCrossentropy` or `SparseCategoricalCrossentropy`, unreduced, either from logits
with a linear activation, or from probabilities with a softmax activation (Keras then reads the
logits: the same formula, no clipping), with no label smoothing and no ignored class. With
`y_i` the one-hot or soft label, `s_i = sum_c y_ic`, `p_i = softmax(z_i)` and `w_i` the
sample weight:

    l_i = w_i (s_i logsumexp(z_i) - <y_i, z_i>)
    d_i = d l_i / d z_i = w_i (s_i p_i - y_i)       g_i = a_i (x) d_i (kernel), then d_i (bias)
    M_i = d^2 l_i / d z_i^2 = w_i s_i (diag(p_i) - p_i p_i^T)

(TensorFlow's own gradient of this loss is `w_i (p_i - y_i)`, exact only for labels that sum
to 1; here the derivative of the loss value is exact for any labels.) All in float64 NumPy: a
few milliseconds for thousands of rows, where tracing the autodiff of
`vestigia.gradients.autodiff` costs a fraction of a second per model. Any other loss, option,
activation or head makes `SoftmaxDenseHead.detect` return None, and autodiff is used.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

_LOSSES = {
    keras.losses.CategoricalCrossentropy: {"from_logits", "label_smoothing", "axis"},
    keras.losses.SparseCategoricalCrossentropy: {"from_logits", "ignore_class", "axis"},
}


def _closed_form_loss(loss_fn: Any, activation: Any) -> bool:
    """True if `loss_fn(y, activation(z))` is softmax cross-entropy on the logits `z`, exactly."""
    known = _LOSSES.get(type(loss_fn))
    kwargs = getattr(loss_fn, "_fn_kwargs", None)
    if known is None or not isinstance(kwargs, dict) or not set(kwargs) <= known:
        return False
    if kwargs.get("label_smoothing", 0.0) or kwargs.get("ignore_class") is not None:
        return False
    if kwargs.get("axis", -1) not in (-1, 1):
        return False
    if kwargs.get("from_logits", False):
        return activation is keras.activations.linear
    return activation is keras.activations.softmax


def _input_rank(layer: Any) -> int | None:
    """Rank of the layer's (single) symbolic input, or None if it has none or several."""
    try:
        return len(layer.input.shape)
    except (AttributeError, ValueError, TypeError):
        return None


def _read(variable: Any) -> np.ndarray:
    """A Keras variable's value in float64, from one variable read (its `.numpy()` adds an
    `Identity` op, whose first call alone costs milliseconds in a fresh process)."""
    return np.asarray(tf.convert_to_tensor(variable), np.float64)


class SoftmaxDenseHead:
    """Losses, per-example gradients (full or factored) and curvature factors in closed form.

    Args:
        layer: the watched `Dense` layer (the whole head).
        with_bias: whether its bias is watched (after the kernel in the parameter vector).
        sparse: integer labels (`SparseCategoricalCrossentropy`) rather than one-hot or soft ones.
    """

    def __init__(self, layer: keras.layers.Dense, with_bias: bool, sparse: bool) -> None:
        self.layer = layer
        self.with_bias = with_bias
        self.sparse = sparse

    @classmethod
    def detect(cls, layers: list[Any] | None, tapped: list[Any], variables: list[Any], loss_fn: Any) -> Any:
        """The closed form of a head (`Head.layers`, its tapped `Dense` layers) whose watched
        `variables` are `[kernel]` or `[kernel, bias]`, or None where it would not be exact."""
        if layers is None or len(layers) != 1 or layers[0] not in tapped:
            return None
        layer = layers[0]
        kernel = [layer.kernel.value]
        with_bias = len(variables) == 2
        expected = kernel + ([layer.bias.value] if with_bias and layer.use_bias else [])
        if len(variables) != len(expected) or any(v is not e for v, e in zip(variables, expected)):
            return None
        if not _closed_form_loss(loss_fn, layer.activation) or _input_rank(layer) != 2:
            return None
        return cls(layer, with_bias, type(loss_fn) is keras.losses.SparseCategoricalCrossentropy)

    @property
    def n_classes(self) -> int:
        return int(self.layer.units)

    def accepts_targets(self, targets: Any, n: int) -> bool:
        """True if `targets` are labels this loss takes for `n` examples without question: integer
        class indices `(n,)` or `(n, 1)` (sparse), or one row per class `(n, n_classes)`; anything
        else is left to the Keras loss itself to accept or refuse."""
        dtype = getattr(targets, "dtype", None)
        if dtype is None:
            return False
        dtype, shape = tf.as_dtype(dtype), tuple(targets.shape)
        if self.sparse:
            return dtype.is_integer and shape in ((n,), (n, 1))
        return (dtype.is_integer or dtype.is_floating) and shape == (n, self.n_classes)

    def applies_to(self, features: Any) -> bool:
        """The closed form needs one rank-2 feature tensor (a `Dense` on sequences sums over
        positions: left to autodiff)."""
        return not isinstance(features, (tuple, list, dict)) and len(getattr(features, "shape", ())) == 2

    def _inputs(self, features: Any) -> np.ndarray:
        return np.asarray(features, dtype=np.float64)

    def _labels(self, targets: Any, n: int, classes: int) -> np.ndarray:
        """One-hot (from integer labels) or the given soft labels, float64 `(n, classes)`."""
        if self.sparse:
            labels = np.zeros((n, classes))
            labels[np.arange(n), np.asarray(targets).reshape(n).astype(np.int64)] = 1.0
            return labels
        return np.asarray(targets, dtype=np.float64).reshape(n, classes)

    def _forward(self, features: Any, targets: Any, weights: Any) -> tuple[np.ndarray, ...]:
        """`(a, y, w, z, p)`: inputs, labels, weights, logits and probabilities, float64."""
        a = self._inputs(features)
        z = a @ _read(self.layer.kernel)
        if self.layer.use_bias:
            z += _read(self.layer.bias)
        shifted = z - z.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        y = self._labels(targets, len(a), z.shape[1])
        w = np.asarray(weights, dtype=np.float64).reshape(len(a))
        return a, y, w, z, p

    def _with_ones(self, a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.ones((len(a), 1))], axis=1) if self.with_bias else a

    def losses_and_deltas(self, features: Any, targets: Any, weights: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(a (n, in), l (n,), d (n, out))`, float64: layer inputs, weighted losses, and `d l / d z`."""
        a, y, w, z, p = self._forward(features, targets, weights)
        s = y.sum(axis=1)
        zmax = z.max(axis=1)
        log_sum = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        losses = w * (s * log_sum - np.einsum("nc,nc->n", y, z))
        deltas = w[:, None] * (s[:, None] * p - y)
        return a, losses, deltas

    def losses(self, features: Any, targets: Any, weights: Any) -> np.ndarray:
        """Weighted per-example losses `(n,)`, float32."""
        return self.losses_and_deltas(features, targets, weights)[1].astype(np.float32)

    def gradients(self, features: Any, targets: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
        """`(losses (n,), G (n, n_params))`, float32: `G[i]` is `a_i (x) d_i` flattened row-major
        (Keras' kernel layout), then `d_i` if the bias is watched."""
        a, losses, d = self.losses_and_deltas(features, targets, weights)
        grads = (a[:, :, None] * d[:, None, :]).reshape(len(a), -1)
        if self.with_bias:
            grads = np.concatenate([grads, d], axis=1)
        return losses.astype(np.float32), grads.astype(np.float32)

    def factors(self, features: Any, targets: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
        """`(losses (n,), packed [a_i (+ 1), d_i] (n, in (+1) + out))`, float32 (the layout of
        `vestigia.gradients.factored`)."""
        a, losses, d = self.losses_and_deltas(features, targets, weights)
        return losses.astype(np.float32), np.concatenate([self._with_ones(a), d], axis=1).astype(np.float32)

    def curvature(self, features: Any, targets: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
        """`(a (n, in (+1)), M (n, out, out))`, float64, with `sum_i d^2 l_i / d theta^2 =
        sum_i (a_i a_i^T) (x) M_i`."""
        a, y, w, _, p = self._forward(features, targets, weights)
        scale = w * y.sum(axis=1)
        curvature = -p[:, :, None] * p[:, None, :]
        curvature[:, np.arange(p.shape[1]), np.arange(p.shape[1])] += p
        curvature *= scale[:, None, None]
        return self._with_ones(a), curvature

    def hessian(self, features: Any, targets: Any, weights: Any) -> np.ndarray:
        """`sum_i (a_i a_i^T) (x) M_i`, float64 `(n_params, n_params)` (kernel rows `(j, c)` in
        row-major order, then the bias)."""
        a, curvature = self.curvature(features, targets, weights)
        n, n_in, n_out = len(a), a.shape[1], curvature.shape[1]
        blocks = (a[:, :, None] * a[:, None, :]).reshape(n, -1).T @ curvature.reshape(n, -1)
        return blocks.reshape(n_in, n_in, n_out, n_out).transpose(0, 2, 1, 3).reshape(n_in * n_out, n_in * n_out)

    def hvp(self, features: Any, targets: Any, weights: Any, vectors: Any) -> np.ndarray:
        """`(sum_i d^2 l_i / d theta^2) V^T` as `(m, n_params)` for `V (m, n_params)`, float64,
        without forming the Hessian: per example `(a_i a_i^T) (x) M_i` applied to `V` seen as
        `(in, out)` matrices is `a_i (x) M_i (V^T a_i)`."""
        a, y, w, _, p = self._forward(features, targets, weights)
        a = self._with_ones(a)
        scale = w * y.sum(axis=1)
        n_in, n_out = a.shape[1], p.shape[1]
        v = np.asarray(vectors, dtype=np.float64).reshape(-1, n_in, n_out)
        u = np.einsum("ni,mio->mno", a, v)  # V^T a_i, per vector
        t = scale[None, :, None] * p[None] * (u - np.einsum("mno,no->mn", u, p)[:, :, None])
        return np.einsum("ni,mno->mio", a, t).reshape(len(v), -1)
