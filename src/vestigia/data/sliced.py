"""Batches of `from_tensor_slices(arrays).batch(n)` pipelines, cut in NumPy.

The commonest dataset, and the one `vestigia.data.dataset.as_batched_dataset` builds from
arrays, holds its data in the dataset object: `Dataset.from_tensor_slices(arrays)`, then
`.batch(n)` (with or without `drop_remainder`), maybe `.prefetch()` or `.with_options()`. Its
batches are rows `[i n, (i + 1) n)` of those arrays. Reading them through a tf.data iterator
costs an iterator, one op per batch, and, in a fresh process, the first-call set-up of each of
these ops (milliseconds each, more than cutting the arrays); slicing the held arrays gives the
same elements, with NumPy leaves. Any other pipeline (a `.map`, a shuffle, a `.take`, ragged or
string components, a batch size or remainder flag not known statically) returns None here and
is read by tf.data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

_PASS_THROUGH = ("_PrefetchDataset", "_OptionsDataset")


def _numeric(spec: Any) -> bool:
    return type(spec) is tf.TensorSpec and (spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool)


def sliced_batches(dataset: tf.data.Dataset) -> Iterator[Any] | None:
    """The elements of `dataset`, as its tf.data iterator would yield them but with NumPy leaves,
    if its pipeline is tensor slices of numeric dense arrays then one `.batch`, with only
    `.prefetch` / `.with_options` after; else None (nothing read).

    Private attributes of TensorFlow's dataset classes are read; if they are missing or differ,
    the pipeline is not recognised and None is returned.
    """
    node = dataset
    try:
        while type(node).__name__ in _PASS_THROUGH:
            node = node._input_dataset
        if type(node).__name__ != "_BatchDataset":
            return None
        source = node._input_dataset
        if type(source).__name__ != "_TensorSliceDataset":
            return None
        batch_size = tf.get_static_value(node._batch_size)
        drop_remainder = tf.get_static_value(node._drop_remainder)
        specs = tf.nest.flatten(dataset.element_spec)
        tensors = list(source._tensors)
    except AttributeError:
        return None
    if batch_size is None or drop_remainder is None or int(batch_size) < 1:
        return None
    if not specs or len(specs) != len(tensors) or not all(_numeric(s) for s in specs):
        return None
    if not tf.executing_eagerly() or any(t.dtype != s.dtype for t, s in zip(tensors, specs)):
        return None
    try:
        leaves = [t.numpy() for t in tensors]
    except (AttributeError, NotImplementedError):
        return None
    return _cut(dataset.element_spec, leaves, int(batch_size), bool(drop_remainder))


def _cut(structure: Any, leaves: list[np.ndarray], batch_size: int, drop_remainder: bool) -> Iterator[Any]:
    """Rows `[start, start + batch_size)` of every leaf, packed as `structure`, in order."""
    n = len(leaves[0])
    flat = type(structure) is tuple and all(isinstance(s, tf.TensorSpec) for s in structure)  # (x, y[, w])
    for start in range(0, n, batch_size):
        if drop_remainder and start + batch_size > n:
            return
        rows = [leaf[start : start + batch_size] for leaf in leaves]
        yield tuple(rows) if flat else tf.nest.pack_sequence_as(structure, rows)
