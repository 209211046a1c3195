"""Batches of plain in-memory datasets, read once per dataset object.

A plain pipeline (`vestigia.data.untuned.is_plain`: slices of tensors held in the dataset,
batched, zipped, ...) yields the same elements at every pass: its content is part of the
dataset object. Its batches, as NumPy arrays, are therefore kept on the object after the first
full pass, up to `MEMO_BYTES`, and later passes (the curvature, then self-influence, then scores
over the same training set) reuse them instead of reading it again. Any other pipeline is read
at every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.data.untuned import is_plain

MEMO_BYTES = 64 << 20
"""Largest dataset (bytes of its batches' leaves) whose batches are kept."""
_ATTRIBUTE = "_vestigia_batches"


def _as_arrays(batch: Batch) -> Batch:
    """The batch with its dense tensor leaves as NumPy arrays (others kept as they are)."""
    convert = lambda t: t.numpy() if isinstance(t, tf.Tensor) and not isinstance(t, tf.RaggedTensor) else t  # noqa: E731
    return batch._replace(
        inputs=tf.nest.map_structure(convert, batch.inputs),
        targets=tf.nest.map_structure(convert, batch.targets),
        weights=None if batch.weights is None else convert(batch.weights),
    )


def _nbytes(batch: Batch) -> int:
    leaves = tf.nest.flatten((batch.inputs, batch.targets, batch.weights))
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in leaves if leaf is not None)


def memo_batches(
    dataset: tf.data.Dataset, process_fn: Any, name: str, read: Callable[[], Iterator[Batch]]
) -> Iterator[Batch]:
    """The batches `read()` yields for `dataset` (split by `process_fn`), kept on a plain dataset
    after a first full pass and yielded from there later (named `name` in error messages)."""
    memo = getattr(dataset, _ATTRIBUTE, None)
    if memo is not None and process_fn in memo:
        for batch in memo[process_fn]:
            yield batch if batch.source == name else batch._replace(source=name)
        return
    if not is_plain(dataset):
        yield from read()
        return
    kept: list[Batch] | None = []
    size = 0
    for batch in read():
        if kept is not None:
            batch = _as_arrays(batch)
            size += _nbytes(batch)
            if size <= MEMO_BYTES:
                kept.append(batch)
            else:
                kept = None
        yield batch
    if kept is not None:
        memo = memo if memo is not None else {}
        memo[process_fn] = kept
        try:
            object.__setattr__(dataset, _ATTRIBUTE, memo)
        except AttributeError:
            pass


def memo_inputs(dataset: tf.data.Dataset, process_fn: Any) -> Any:
    """The model inputs of all of `dataset`'s examples, as one nest of arrays, if its batches were
    kept (split by `process_fn`) and concatenate; else None."""
    batches = (getattr(dataset, _ATTRIBUTE, None) or {}).get(process_fn)
    if batches is None:
        return None
    try:
        return tf.nest.map_structure(lambda *leaves: np.concatenate(leaves), *[b.inputs for b in batches])
    except (ValueError, TypeError):
        return None
