"""Whole-model layer capture against a per-example `GradientTape` loop.

Oracle: `oracles.loop_gradients` (one tape per example on the whole model, no Vestigia code).
The capture's `sum_t a_t d_t^T` per layer, plus its autodiff gradients of the other weights,
must equal it. Float32 sums of at most a few hundred products: `RTOL = 2e-5` of the largest
entry.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import whole_models
from oracles import assert_close, loop_gradients

from vestigia.gradients.layer_capture import LayerCapture, per_example_gradients

RTOL = 2e-5


def _loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def _check(model: keras.Model, x: np.ndarray, y: np.ndarray, capture: LayerCapture) -> None:
    weights = np.linspace(0.5, 1.5, len(y)).astype("float32")
    run = capture.traced(lambda c: (c.losses, per_example_gradients(capture, c)))
    losses, grads = run(x, y, weights)
    expected = loop_gradients(model, capture.variables, _loss(), x, y, weights)
    assert_close(grads.numpy(), expected, RTOL)
    expected_losses = _loss()(y, model(x, training=False)).numpy() * weights
    assert_close(losses.numpy(), expected_losses, RTOL)


def test_sequential_mlp_fused_activations() -> None:
    model = whole_models.mlp()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 9)]
    capture = LayerCapture(model, _loss())
    assert [s.kind for s in capture.specs] == ["dense"] * 3 and not capture.others
    _check(model, x, y, capture)


def test_functional_resnet_convs_and_batch_norm_warning() -> None:
    model = whole_models.resnet()
    x, y = whole_models.images(7)
    with pytest.warns(UserWarning, match="batch_normalization.*gamma"):
        capture = LayerCapture(model, _loss())
    assert [s.kind for s in capture.specs] == ["conv"] * 4 + ["dense"]
    assert len(capture.others) == 2  # BatchNorm gamma and beta
    _check(model, x, y, capture)


def test_text_model_embedding_conv1d_attention_layer_norm() -> None:
    model = whole_models.text_model()
    x, y = whole_models.tokens(5)
    with pytest.warns(UserWarning, match="layer_normalization"):
        capture = LayerCapture(model, _loss())
    kinds = [s.kind for s in capture.specs]
    assert kinds.count("einsum_dense") == 4 and "embedding" in kinds and "conv" in kinds
    _check(model, x, y, capture)


def test_subclassed_model_with_a_shared_layer() -> None:
    model = whole_models.subclassed()
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 9, 2)).astype("float32"), np.eye(2, dtype="float32")[rng.integers(0, 2, 6)]
    capture = LayerCapture(model, _loss())
    run = capture.traced(lambda c: [d.shape[1] for d in c.deltas])
    assert run(x, y, np.ones(6, "float32"))[-1] == 2  # the shared Dense: two calls, two positions
    _check(model, x, y, capture)


def test_partly_watched_layers_and_restored_calls() -> None:
    model = whole_models.mlp()
    variables = [model.layers[0].kernel, model.layers[2].bias]
    with pytest.warns(UserWarning, match="bias"):
        capture = LayerCapture(model, _loss(), variables)
    assert [s.has_bias for s in capture.specs] == [False] and len(capture.others) == 1
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 4)]
    _check(model, x, y, capture)
    assert "call" not in vars(model.layers[0])  # the recording call is removed after the pass


def test_sampled_labels_are_seeded_one_hot_draws() -> None:
    model = whole_models.mlp()
    capture = LayerCapture(model, _loss())
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(400, 6)).astype("float32"), np.eye(3, dtype="float32")[np.zeros(400, int)]
    run = capture.traced(lambda c: c.losses, sampled=True)
    first, again = (
        run(x, y, np.ones(400, "float32"), tf.constant(3)),
        run(x, y, np.ones(400, "float32"), tf.constant(3)),
    )
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    probabilities = tf.nn.softmax(model(x)).numpy()
    # sampled label c has loss -log p_c: the mean loss estimates the entropy (4 standard errors)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=1)
    sampled = first.numpy()
    assert abs(sampled.mean() - entropy.mean()) < 4 * sampled.std() / np.sqrt(400)


def test_unsupported_layers_are_named_with_the_fallback() -> None:
    keras.utils.set_random_seed(0)
    x_in = keras.Input((4, 4, 4))
    x = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(x_in)
    x = keras.layers.DepthwiseConv2D(2, name="depthwise")(x)
    model = keras.Model(x_in, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.warns(UserWarning, match="(?s)diagonal.*grouped.*groups=1.*DepthwiseConv2D 'depthwise'"):
        capture = LayerCapture(model, _loss())
    assert [s.kind for s in capture.specs] == ["dense"] and len(capture.others) == 4
