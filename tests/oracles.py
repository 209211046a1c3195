"""Independent oracles shared by the core tests: per-example loops and closed forms.

Nothing here uses Vestigia: gradients come from one `tf.GradientTape` per example on the whole
Keras model, and curvature from hand-derived formulas in float64 NumPy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy.special import logsumexp


def assert_close(actual: Any, expected: Any, rtol: float) -> float:
    """`assert_allclose` with `atol = rtol * max|expected|`; returns the error relative to that scale.

    With `VESTIGIA_ORACLE_LOG=<file>` set, appends `<test> <relative error> <rtol>` to the file,
    which is how the largest error seen against each oracle is reported.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
    error = float(np.abs(actual - expected).max() / scale) if scale > 0 else float(np.abs(actual).max())
    log = os.environ.get("VESTIGIA_ORACLE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as handle:
            handle.write(f"{test} {error:.3e} {rtol:.0e}\n")
    return error


def loop_gradients(
    model: keras.Model,
    variables: Sequence[Any],
    loss_fn: Callable[[Any, Any], tf.Tensor],
    inputs: Any,
    targets: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-example gradients `(n, n_params)` of `w_i * loss(y_i, model(x_i))`, one tape per example.

    `inputs` may be an array, a tuple or a dict of arrays (one row per example). The parameter
    vector is the concatenation of the row-major flattened `variables`, in order.
    """
    tf_vars = [getattr(v, "value", v) for v in variables]
    n = len(targets)
    rows = []
    for i in range(n):
        x_i = tf.nest.map_structure(lambda a, i=i: a[i : i + 1], inputs)
        with tf.GradientTape() as tape:
            loss = tf.reshape(loss_fn(targets[i : i + 1], model(x_i, training=False)), [-1])[0]
            if weights is not None:
                loss = loss * float(weights[i])
        grads = tape.gradient(loss, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append(np.concatenate([np.reshape(tf.convert_to_tensor(g).numpy(), -1) for g in grads]))
    return np.asarray(rows, dtype=np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def softmax_head_gradients(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Closed-form per-example gradients of softmax cross-entropy w.r.t. a Dense head `(kernel, bias)`.

    With `a~ = [a, 1]`, `p = softmax(a W + b)`: `g = kron(a~, p - y)`, which is the row-major
    flattening of `d l / d W = a (p - y)^T` followed by `d l / d b = p - y`.
    """
    a = np.asarray(features, np.float64)
    p = softmax(a @ kernel.astype(np.float64) + bias.astype(np.float64))
    a_tilde = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    r = p - y
    return np.einsum("ni,nc->nic", a_tilde, r).reshape(len(a), -1)


def softmax_head_hessian(
    features: np.ndarray, kernel: np.ndarray, bias: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Closed-form mean Hessian of (weighted) softmax cross-entropy w.r.t. a Dense head.

    `H = (1/n) sum_i w_i kron(a~_i a~_i^T, diag(p_i) - p_i p_i^T)`, with `a~ = [a, 1]`; the kernel
    part is flattened row-major (shape `(in, out)`), then the bias.
    """
    a = np.asarray(features, np.float64)
    n = len(a)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    p = softmax(a @ kernel.astype(np.float64) + bias.astype(np.float64))
    a_tilde = np.concatenate([a, np.ones((n, 1))], axis=1)
    total = np.zeros((a_tilde.shape[1] * p.shape[1],) * 2)
    for i in range(n):
        s = np.diag(p[i]) - np.outer(p[i], p[i])
        total += w[i] * np.kron(np.outer(a_tilde[i], a_tilde[i]), s)
    return total / n


def autodiff_mean_hessian(
    model: keras.Model,
    variables: Sequence[Any],
    loss_fn: Callable[[Any, Any], tf.Tensor],
    inputs: Any,
    targets: np.ndarray,
) -> np.ndarray:
    """`(1/n) d^2 (sum_i loss_i) / d theta^2` by two nested tapes on the whole Keras model, `(P, P)`.

    Independent of Vestigia's trunk / head split: the full model is called once on all the data.
    """
    tf_vars = [getattr(v, "value", v) for v in variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            total = tf.reduce_sum(loss_fn(targets, model(inputs, training=False)))
        grads = inner.gradient(total, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], axis=0)
    blocks = outer.jacobian(flat, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    rows = np.concatenate([np.reshape(b.numpy(), (flat.shape[0], -1)) for b in blocks], axis=1)
    return rows.astype(np.float64) / len(targets)


def features_of(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """float64 `tanh(x W + b)` of a model whose first layer is a tanh `Dense` (the representer tests' trunk)."""
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    return np.tanh(x.astype(np.float64) @ kernel + bias)


def probs(z: np.ndarray) -> np.ndarray:
    """Sigmoid of a single logit column, softmax of several."""
    if z.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-z))
    return np.exp(z - logsumexp(z, axis=1, keepdims=True))
