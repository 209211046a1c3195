"""Checks on a user's `tf.data.Dataset` made once, before any work: finite length, fixed order.

Results are aligned to the dataset order (indices, samples, matrix columns), and every method
reads the training set several times (curvature, then scores). A dataset that is infinite
(`.repeat()`) would never finish, and one whose order or content changes between passes
(`shuffle(..., reshuffle_each_iteration=True)`, the default of `shuffle`, or random
augmentation in a `.map`) would silently scramble the results. Both are refused:

* infinite: `dataset.cardinality()` is `INFINITE` (known without iterating);
* order: the first `FINGERPRINT_BATCHES` batches are read twice, from two fresh iterators,
  and their bytes compared. Costs two reads of those batches (and of a shuffle buffer in
  front of them), once per dataset object.

The documented fix is to shuffle once (`reshuffle_each_iteration=False`) or to shuffle the
arrays before building the dataset; Vestigia does not materialise a copy in a fixed order
(that would hold the whole data set in memory without the user asking).
"""

from __future__ import annotations

import hashlib
import weakref

import numpy as np
import tensorflow as tf

from vestigia.errors import InvalidDataError

FINGERPRINT_BATCHES = 2

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


def check_stable_order(dataset: tf.data.Dataset, name: str) -> None:
    """Raise `InvalidDataError` if two passes over `dataset` give different first batches."""
    first, second = _fingerprint(dataset, FINGERPRINT_BATCHES), _fingerprint(dataset, FINGERPRINT_BATCHES)
    if first != second:
        changed = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        raise InvalidDataError(
            f"`{name}` changes between passes: batch {changed} differs between two iterations, so "
            "the returned indices, samples and score columns would not match the data. This comes "
            "from `shuffle(...)` (whose `reshuffle_each_iteration` defaults to True) or from random "
            "augmentation. Shuffle once, with `shuffle(buffer, seed=..., reshuffle_each_iteration="
            "False)`, or shuffle the arrays before building the dataset."
        )


def check_dataset(dataset: tf.data.Dataset, name: str) -> None:
    """`check_finite_length` and `check_stable_order`, once per dataset object."""
    try:
        if _checked.get(dataset):
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    check_finite_length(dataset, name)
    check_stable_order(dataset, name)
    try:
        _checked[dataset] = True
    except TypeError:
        pass
