"""Checks on a user's `tf.data.Dataset` made once, before any work: finite length, fixed order.

Results are aligned to the dataset order (indices, samples, matrix columns), and every method
reads the training set several times (curvature, then scores). A dataset that is infinite
(`.repeat()`) would never finish, and one whose order or content changes between passes
(`shuffle(..., reshuffle_each_iteration=True)`, the default of `shuffle`, or random
augmentation in a `.map`) would silently scramble the results. Both are refused:

* infinite: `dataset.cardinality()` is `INFINITE` (known without iterating);
* reshuffled: the dataset's graph holds a shuffle with `reshuffle_each_iteration=True`
  (read from its serialized graph, no data read);
* order: when the pipeline holds a step that may compute something new at each pass (a
  `.map`, `.filter`, generator, interleave: anything but the deterministic steps of
  `_DETERMINISTIC`), the first `FINGERPRINT_BATCHES` batches are read twice, from two fresh
  iterators, and their bytes compared (catches random augmentation). Costs two iterator
  creations and reads of those batches (about 25 ms on 2 CPU cores), once per dataset object.
  Skipped when the pipeline holds a `.cache()`, whose partial reads TensorFlow discards with a
  warning.

A plain pipeline (`vestigia.data.untuned.is_plain`: slices, batches, zips, ... of finite
sources) can be neither, and is not asked.

The documented fix is to shuffle once (`reshuffle_each_iteration=False`) or to shuffle the
arrays before building the dataset; Vestigia does not materialise a copy in a fixed order
(that would hold the whole data set in memory without the user asking).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.untuned import is_plain
from vestigia.errors import InvalidDataError

FINGERPRINT_BATCHES = 2

_RESHUFFLING = (
    "ShuffleDataset",
    "ShuffleDatasetV2",
    "ShuffleDatasetV3",
    "ShuffleAndRepeatDataset",
    "ShuffleAndRepeatDatasetV2",
)

_DETERMINISTIC = (
    "TensorDataset",
    "TensorSliceDataset",
    "RangeDataset",
    "BatchDataset",
    "BatchDatasetV2",
    "PaddedBatchDataset",
    "PaddedBatchDatasetV2",
    "UnbatchDataset",
    "PrefetchDataset",
    "TakeDataset",
    "SkipDataset",
    "RepeatDataset",
    "ConcatenateDataset",
    "ZipDataset",
    "OptionsDataset",
    *_RESHUFFLING,  # checked from their attribute
)

_checked: weakref.WeakKeyDictionary[tf.data.Dataset, bool] = weakref.WeakKeyDictionary()


def _fingerprint(dataset: tf.data.Dataset, n_batches: int) -> list[str]:
    """SHA-1 digest of each of the first `n_batches` elements (every component's bytes)."""
    digests = []
    for element in dataset.take(n_batches):
        sha = hashlib.sha1()
        for leaf in tf.nest.flatten(element):
            value = np.asarray(leaf)
            sha.update(repr((value.shape, value.dtype.str)).encode())
            sha.update(repr(value.tolist()).encode() if value.dtype == object else value.tobytes())
        digests.append(sha.hexdigest())
    return digests


def check_finite_length(dataset: tf.data.Dataset, name: str) -> None:
    """Raise `InvalidDataError` if `dataset` is infinite (e.g. `.repeat()` without a count)."""
    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise InvalidDataError(
            f"`{name}` is infinite (its cardinality is INFINITE, e.g. from `.repeat()` without a "
            f"count): iterating it would never end. Pass a finite dataset, e.g. `.repeat(1)`, or "
            f"`.take(n_batches)`. Received: {name}={dataset!r}"
        )


def _pipeline(dataset: tf.data.Dataset) -> list[Any] | None:
    """The nodes of the dataset's graph, or None if TensorFlow cannot serialize it."""
    try:
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString(dataset._as_serialized_graph().numpy())
    except Exception:  # noqa: BLE001 - a private API: without it, the fingerprint alone decides
        return None
    return list(graph.node)


def _refuse_reshuffling(name: str, what: str) -> InvalidDataError:
    return InvalidDataError(
        f"`{name}` changes between passes: {what}, so the returned indices, samples and score columns "
        "would not match the data. Shuffle once, with `shuffle(buffer, seed=..., reshuffle_each_iteration="
        "False)`, or shuffle the arrays before building the dataset; avoid random augmentation."
    )


def check_stable_order(dataset: tf.data.Dataset, name: str) -> None:
    """Raise `InvalidDataError` if `dataset` is reshuffled at every pass, or if two passes give
    different first batches."""
    nodes = _pipeline(dataset)
    for node in nodes or []:
        if node.op in _RESHUFFLING and node.attr["reshuffle_each_iteration"].b:
            raise _refuse_reshuffling(
                name, "it holds `shuffle(...)` with `reshuffle_each_iteration=True` (the default)"
            )
    if nodes is not None:
        steps = {node.op for node in nodes if "Dataset" in node.op}
        if any(op.startswith("CacheDataset") for op in steps) or steps <= set(_DETERMINISTIC):
            return
    first, second = _fingerprint(dataset, FINGERPRINT_BATCHES), _fingerprint(dataset, FINGERPRINT_BATCHES)
    if first != second:
        changed = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        raise _refuse_reshuffling(name, f"batch {changed} differs between two iterations (random augmentation?)")


def check_dataset(dataset: tf.data.Dataset, name: str) -> None:
    """`check_finite_length` and `check_stable_order`, once per dataset object. A plain pipeline
    (`vestigia.data.untuned.is_plain`: finite sources, no shuffle, nothing computed) passes both
    by construction and is not asked (each costs an op, the first of its kind a few ms)."""
    try:
        if _checked.get(dataset):
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    if is_plain(dataset):
        return
    check_finite_length(dataset, name)
    check_stable_order(dataset, name)
    try:
        _checked[dataset] = True
    except TypeError:
        pass
