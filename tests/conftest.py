"""Shared fixtures: seeded small Keras models and data sets, quiet TensorFlow."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)


def make_classification(n: int = 60, d: int = 5, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, float32 inputs `(n, d)` and one-hot float32 labels `(n, classes)`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(0, 2, (classes, d))
    x = (centers[labels] + rng.normal(0, 1, (n, d))).astype("float32")
    return x, np.eye(classes, dtype="float32")[labels]


def make_mlp(d: int = 5, hidden: int = 8, classes: int = 3, seed: int = 0) -> keras.Model:
    """`Input(d) -> Dense(hidden, tanh) -> Dense(classes)` logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(classes)]
    )


def logits_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def batched(x: np.ndarray, y: np.ndarray, batch_size: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
