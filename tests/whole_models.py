"""Small whole models of every family the layer capture supports (shared by the K-FAC tests)."""

from __future__ import annotations

import keras
import numpy as np


def mlp(seed: int = 0, d: int = 6, hidden: int = 7, classes: int = 3) -> keras.Model:
    """Sequential `Dense(tanh) -> Dense(relu, no bias) -> Dense` logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(5, activation="relu", use_bias=False),
            keras.layers.Dense(classes),
        ]
    )


def resnet(seed: int = 0, size: int = 8, classes: int = 3, batch_norm: bool = True) -> keras.Model:
    """Functional CNN with a skip connection, a strided `same` conv, a dilated `valid` conv and
    (optionally) BatchNorm."""
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x_in)
    y = keras.layers.Conv2D(4, 3, padding="same")(x)
    if batch_norm:
        y = keras.layers.BatchNormalization()(y)
    x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    x = keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="tanh")(x)
    x = keras.layers.Conv2D(3, 2, dilation_rate=2, padding="valid", use_bias=False, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes)(x)
    return keras.Model(x_in, out)


def text_model(seed: int = 0, vocab: int = 11, length: int = 6, classes: int = 3) -> keras.Model:
    """Functional `Embedding -> Conv1D(causal) -> MultiHeadAttention -> LayerNorm -> Dense` logits."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, 4)(tokens)
    x = keras.layers.Conv1D(4, 2, padding="causal", activation="relu")(x)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(x, x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(classes)(x)
    return keras.Model(tokens, out)


class _Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.conv = keras.layers.Conv1D(3, 3, strides=2, padding="valid", activation="relu")
        self.flat = keras.layers.Flatten()
        self.dense = keras.layers.Dense(4, activation="sigmoid")
        self.out = keras.layers.Dense(2)

    def call(self, x):  # type: ignore[no-untyped-def]
        h = self.dense(self.flat(self.conv(x)))
        return self.out(h) + self.out(h * 0.5)  # `out` is called twice


def subclassed(seed: int = 0) -> keras.Model:
    """A subclassed model with a Conv1D and a Dense layer shared between two calls."""
    keras.utils.set_random_seed(seed)
    model = _Subclassed()
    model(np.zeros((1, 9, 2), "float32"))
    return model


def images(n: int, size: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)).astype("float32"), np.eye(classes, dtype="float32")[
        rng.integers(0, classes, n)
    ]


def tokens(n: int, vocab: int = 11, length: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (n, length)).astype("int32"), np.eye(classes, dtype="float32")[
        rng.integers(0, classes, n)
    ]
