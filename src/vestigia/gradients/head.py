"""The differentiable head of a split model, and the `Dense` taps it records.

`Head(features, taps)` applies the head; when `taps` is a list, each tapped `Dense` layer is
computed explicitly and its input `a` and pre-activation output `z` are appended, which is what
the factored per-example gradients need. `vestigia.model.split` decides where the head starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf


@dataclass
class DenseTap:
    """A `Dense` layer's input `a` (batch, ..., in) and pre-activation output `z` (batch, ..., out)."""

    layer: keras.layers.Dense
    inputs: tf.Tensor
    preactivation: tf.Tensor


@dataclass
class Head:
    """The differentiable part of a split model.

    Attributes:
        layers: the chain of layers to apply in order, or None when `model` is applied whole.
        model: a Keras model applied whole when `layers` is None.
        tapped: the `Dense` layers whose (input, pre-activation) are recorded on each call.
    """

    layers: list[keras.layers.Layer] | None
    model: Any = None
    tapped: list[keras.layers.Dense] = field(default_factory=list)

    def __call__(self, features: Any, taps: list[DenseTap] | None = None) -> Any:
        if self.layers is None:
            return self.model(features, training=False)
        x = features
        for layer in self.layers:
            if taps is not None and layer in self.tapped:
                z = tf.tensordot(x, layer.kernel.value, axes=[[x.shape.rank - 1], [0]])
                if layer.use_bias:
                    z = z + layer.bias.value
                taps.append(DenseTap(layer, x, z))
                x = layer.activation(z) if layer.activation is not None else z
            else:
                x = layer(x, training=False)
        return x
