"""Split a Keras model into a frozen trunk and a differentiable head at the first watched layer.

`trunk(inputs) -> features` runs once per batch with no gradient; `head(features) -> outputs`
is what gets differentiated. Three cases, most specific first:

* a chain (Sequential, or a Functional model whose layers each feed the next): the head runs
  layer by layer, and `Dense` layers are computed explicitly so that their input `a` and
  pre-activation output `z` can be tapped for factored per-example gradients;
* another Functional graph: trunk and head are Keras sub-models cut at the layer's input;
* anything else (subclassed models, graphs that cannot be cut): the trunk is the identity and
  the head is the whole model.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from vestigia.gradients.head import Head


def _is_plain_dense(layer: keras.layers.Layer) -> bool:
    return (
        type(layer) is keras.layers.Dense
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
    )


def _symbolic(layer: keras.layers.Layer, attribute: str) -> Any:
    try:
        return getattr(layer, attribute)
    except (AttributeError, ValueError):
        return None


def _is_chain(model: keras.Model, start: int) -> bool:
    """True if layers[start:] each consume exactly the previous layer's output, ending at the output."""
    layers = model.layers
    if len(model.outputs if getattr(model, "outputs", None) else []) != 1:
        return False
    for i in range(start + 1, len(layers)):
        inp, prev = _symbolic(layers[i], "input"), _symbolic(layers[i - 1], "output")
        if inp is None or inp is not prev:
            return False
    return _symbolic(layers[-1], "output") is model.outputs[0]


def split_model(
    model: keras.Model, start: int, watched_layers: list[keras.layers.Layer]
) -> tuple[keras.Model | None, Head]:
    """Return `(trunk, head)`; `trunk` is None when it would be the identity.

    Args:
        model: a built Keras model.
        start: index in `model.layers` of the first watched layer.
        watched_layers: the layers whose trainable weights are watched.
    """
    layers = model.layers
    functional = getattr(model, "outputs", None) is not None and not _is_subclassed(model)
    if not functional:
        return None, Head(layers=None, model=model)
    while start < len(layers) and isinstance(layers[start], keras.layers.InputLayer):
        start += 1
    cut = _symbolic(layers[start], "input")
    inputs = model.inputs
    at_inputs = cut is None or any(cut is t for t in tf.nest.flatten(inputs)) and len(inputs) == 1
    trunk = None
    if not at_inputs:
        try:
            trunk = keras.Model(inputs, cut)
        except Exception:  # noqa: BLE001 - graph cannot be cut here: differentiate the whole model
            return None, Head(layers=None, model=model)
    if _is_chain(model, start) and (trunk is not None or len(inputs) == 1):
        dense = [layer for layer in watched_layers if _is_plain_dense(layer)]
        return trunk, Head(layers=list(layers[start:]), tapped=dense)
    if trunk is None:
        return None, Head(layers=None, model=model)
    try:
        return trunk, Head(
            layers=None,
            model=keras.Model(cut, model.outputs[0] if len(model.outputs) == 1 else model.outputs),
        )
    except Exception:  # noqa: BLE001
        return None, Head(layers=None, model=model)


def _is_subclassed(model: keras.Model) -> bool:
    """True for models whose graph Keras does not expose (subclassed `call`)."""
    from keras.src.models.functional import Functional

    return not isinstance(model, (keras.Sequential, Functional))
