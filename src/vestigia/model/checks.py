"""Checks on a model and on the batches it sees, and the diagnosis of a non-finite batch.

At construction (once): every weight of the model finite (trunk and non-trainable ones too,
not only the watched ones), no mixed-precision layer. Per batch, inside the traced gradient
function, one fused flag `all(isfinite(inputs, trunk features, losses, gradients))`; only when
it is False is the batch examined on the host, to say which part first holds NaN or Inf, in
which batch, at which example and position (`diagnose_batch`). Sparse labels are checked
against the number of classes on the host (labels are small).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError

_LOW_PRECISION = ("float16", "bfloat16")
_DATA_PARTS = ("inputs", "labels", "sample weights")


def _all_layers(layer: Any) -> list[Any]:
    nested = getattr(layer, "layers", None) or []
    return [sub for child in nested for sub in [child, *_all_layers(child)]]


def check_model_weights(model: keras.Model, watched: list[Any]) -> None:
    """Raise `NonFiniteError` naming the first weight of `model` holding NaN or Inf.

    One fused reduction over all floating weights; the culprit is searched only on failure.
    """
    floating = [v for v in model.weights if tf.as_dtype(v.dtype).is_floating]
    if not floating or bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v.value)) for v in floating])):
        return
    watched_ids = {id(v) for v in watched}
    for v in floating:
        values = np.asarray(v.numpy())
        bad = np.argwhere(~np.isfinite(values))
        if bad.size:
            role = "watched" if id(v) in watched_ids else "not watched (trunk or frozen)"
            raise NonFiniteError(
                f"`model`: model weight {v.path!r} ({role}) holds {len(bad)} NaN or Inf value(s), first at index "
                f"{tuple(int(i) for i in bad[0])} (value {values[tuple(bad[0])]}). Every score would be "
                "wrong: reload the weights from a checkpoint saved before training diverged."
            )


def check_precision(model: keras.Model) -> None:
    """Raise `InvalidModelError` if a layer computes in float16 / bfloat16 (mixed precision)."""
    low = [layer.name for layer in _all_layers(model) if layer.compute_dtype in _LOW_PRECISION]
    if low:
        policy = next(lyr.dtype_policy.name for lyr in _all_layers(model) if lyr.compute_dtype in _LOW_PRECISION)
        raise InvalidModelError(
            f"`model` computes in low precision (dtype policy {policy!r} in layers {low[:5]}): influence "
            "needs float32 gradients and Hessians. Pass a float32 copy with the same weights: "
            "`vestigia.model.float32_copy(model)`. Received: model with mixed-precision layers."
        )


def float32_copy(model: keras.Model) -> keras.Model:
    """A copy of a Sequential or Functional `model` computing in float32, with the same weights.

    For models trained under a `mixed_float16` / `mixed_bfloat16` policy (their weights are
    float32 already). The copy is independent: later changes to `model` do not reach it.
    """

    def float32_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=float32_layer)
    copy.set_weights(model.get_weights())
    return copy


def sparse_class_count(targets: Any, outputs: Any) -> int | None:
    """Number of classes `C` when `targets` are integer class indices for `outputs (..., C)`, else None."""
    if not isinstance(outputs, tf.Tensor) or not isinstance(targets, (tf.Tensor, np.ndarray)):
        return None
    if not tf.as_dtype(targets.dtype).is_integer or outputs.shape.rank is None or outputs.shape[-1] in (None, 1):
        return None
    rank = len(targets.shape)
    if rank == outputs.shape.rank - 1 or (rank == outputs.shape.rank and targets.shape[-1] == 1):
        return int(outputs.shape[-1])
    return None


def check_label_range(targets: Any, n_classes: int, name: str, index: int, offset: int) -> None:
    """Raise `InvalidDataError` if an integer label is outside `[0, n_classes)`."""
    labels = np.asarray(targets).reshape(len(targets), -1)
    bad = np.argwhere((labels < 0) | (labels >= n_classes))
    if bad.size:
        row = int(bad[0][0])
        raise InvalidDataError(
            f"`{name}`: label value {int(labels[tuple(bad[0])])} at example {offset + row} (batch {index}, "
            f"row {row}) is outside [0, {n_classes}) for a model with {n_classes} classes. Sparse "
            f"labels must be class indices 0..{n_classes - 1}; {len(bad)} label(s) in this batch are not."
        )


def _first_non_finite(value: Any) -> tuple[int, tuple[int, ...], float] | None:
    """(row, position within the row, value) of the first NaN or Inf of a nest, or None."""
    for leaf in tf.nest.flatten(value):
        if leaf is None or not tf.as_dtype(leaf.dtype).is_floating:
            continue
        array = np.asarray(leaf, dtype=np.float64)
        bad = np.argwhere(~np.isfinite(array))
        if bad.size:
            return int(bad[0][0]), tuple(int(i) for i in bad[0][1:]), float(array[tuple(bad[0])])
    return None


def _largest_input(inputs: Any, row: int) -> float:
    leaves = [
        np.abs(np.asarray(t[row], np.float64)) for t in tf.nest.flatten(inputs) if tf.as_dtype(t.dtype).is_floating
    ]
    return max((float(a.max()) for a in leaves if a.size), default=0.0)


def diagnose_batch(parts: dict[str, Any], inputs: Any, name: str, index: int, offset: int, size: int) -> str:
    """Say which part of a batch first holds NaN or Inf, at which example and position.

    Args:
        parts: the batch's tensors in pipeline order, e.g. `{"inputs": ..., "labels": ...,
            "trunk features": ..., "losses": ..., "gradients": ...}`; the first non-finite
            one is reported.
        inputs: the raw inputs, to report their magnitude when they are finite.
        name: the dataset argument; `index`, `offset`, `size`: the batch's position.
    """
    where = f"`{name}`, batch {index} (examples {offset}-{offset + size - 1})"
    for what, value in parts.items():
        found = _first_non_finite(value)
        if found is None:
            continue
        row, position, number = found
        at = f"example {offset + row} (row {row} of the batch{', position ' + str(position) if position else ''})"
        if what in _DATA_PARTS:
            return (
                f"{where}: the {what} hold {number} at {at}. Remove or repair that example before computing influence."
            )
        return (
            f"{where}: the {what} hold {number} at {at} although the data are finite (largest |input| "
            f"of that example: {_largest_input(inputs, row):.3g}). Inputs this large overflow float32 in "
            "the model, or the loss is undefined there (e.g. log(0) on probabilities): rescale the "
            "inputs (e.g. standardise them) or use a loss on logits."
        )
    return f"{where} gives non-finite values (NaN or Inf) although its data are finite."
