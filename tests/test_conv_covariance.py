"""Oracles for stride-1 Conv2D: the patch-free covariance equals `sum a a^T` over patches
unfolded by `tf.image.extract_patches`, and so do the shifted-slice patches themselves."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from vestigia.curvature.conv_covariance import applies, patch_covariance
from vestigia.gradients.layer_kinds import _patches, layer_spec

# float32 sums of ~batch * H * W products of O(1) terms, relative to the largest entry
RTOL = 1e-5


@pytest.mark.parametrize(
    ("kernel", "padding", "bias"),
    [
        ((3, 3), "same", True),
        ((3, 3), "valid", True),
        ((2, 3), "same", False),
        ((5, 4), "same", True),
        ((3, 2), "valid", False),
    ],
)
def test_patch_covariance_equals_the_unfolded_patches(kernel: tuple[int, int], padding: str, bias: bool) -> None:
    layer = keras.layers.Conv2D(4, kernel, padding=padding, use_bias=bias)
    layer.build((None, 7, 6, 3))
    spec, _ = layer_spec(layer, {id(v) for v in layer.trainable_variables})
    assert spec is not None and applies(spec)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7, 6, 3)).astype("float32")
    scale = rng.uniform(0.5, 1.5, size=5).astype("float32")
    unfolded = _patches(layer, tf.constant(x)).numpy().astype("float64")  # extract_patches
    if bias:
        unfolded = np.concatenate([unfolded, np.ones(unfolded.shape[:2] + (1,))], axis=2)
    np.testing.assert_array_equal(spec.input_rows(tf.constant(x)).numpy(), unfolded)  # shifted slices: a copy
    patches = unfolded * scale[:, None, None]
    expected = np.einsum("bti,btj->ij", patches, patches)
    matrix, positions = patch_covariance(spec, tf.constant(x), tf.constant(scale))
    assert positions == patches.shape[1]
    np.testing.assert_allclose(matrix.numpy(), expected, rtol=0, atol=RTOL * np.abs(expected).max())


def test_strided_dilated_and_pointwise_convolutions_are_left_to_the_patches() -> None:
    for layer in [
        keras.layers.Conv2D(2, 3, strides=2),
        keras.layers.Conv2D(2, 3, dilation_rate=2),
        keras.layers.Conv2D(2, 1),
    ]:
        layer.build((None, 9, 9, 3))
        spec, _ = layer_spec(layer, {id(v) for v in layer.trainable_variables})
        assert spec is not None and not applies(spec)
