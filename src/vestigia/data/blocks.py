"""Consecutive batches merged into blocks of up to `max_rows` examples.

Work done per call (an eager model call, a NumPy closed form, a matrix product) costs a fixed
overhead that dominates on small batches: merging the user's batches into a few large blocks
pays it once per block. A block is a `Batch` whose `parts` are the batches it holds, so that
results can be cut back to the user's batches (the seed's dataset views are aligned to them) and
errors name the original batch. Blocks never exceed `max_rows` unless one batch alone does;
batches whose leaves cannot be concatenated (ragged or sparse tensors, differing shapes, weights
on some batches only) are yielded as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch

BLOCK_BYTES = 32 << 20
"""Default memory for one block's per-row work (e.g. its gradients and scores), in bytes."""


def rows_within(bytes_per_row: int, budget: int = BLOCK_BYTES) -> int:
    """Rows per block for work of `bytes_per_row` per example: at least 1."""
    return max(1, budget // max(1, int(bytes_per_row)))


def parts_of(batch: Batch) -> tuple[Batch, ...]:
    """The user's batches in `batch`: its `parts`, or the batch itself."""
    return batch.parts or (batch,)


def _dense(leaf: Any) -> bool:
    return isinstance(leaf, (tf.Tensor, np.ndarray)) and not isinstance(leaf, (tf.RaggedTensor, tf.SparseTensor))


def _concat(leaves: list[Any]) -> Any:
    return np.concatenate([np.asarray(leaf) for leaf in leaves], axis=0)


def _mergeable(batches: list[Batch]) -> bool:
    first = batches[0]
    if any((b.weights is None) != (first.weights is None) for b in batches):
        return False
    try:
        for b in batches[1:]:
            tf.nest.assert_same_structure((first.inputs, first.targets), (b.inputs, b.targets))
    except (ValueError, TypeError):
        return False
    for b in batches:
        leaves = tf.nest.flatten((b.inputs, b.targets, b.weights))
        if not all(leaf is None or _dense(leaf) for leaf in leaves):
            return False
    shapes = {tuple(tuple(leaf.shape[1:]) for leaf in tf.nest.flatten((b.inputs, b.targets))) for b in batches}
    return len(shapes) == 1


def merge(batches: list[Batch]) -> list[Batch]:
    """One block holding `batches` (consecutive, of one dataset), or the batches as they are if
    their leaves cannot be concatenated."""
    if len(batches) == 1 or not _mergeable(batches):
        return batches
    first = batches[0]
    inputs = tf.nest.map_structure(lambda *leaves: _concat(list(leaves)), *[b.inputs for b in batches])
    targets = tf.nest.map_structure(lambda *leaves: _concat(list(leaves)), *[b.targets for b in batches])
    weights = None if first.weights is None else _concat([b.weights for b in batches])
    size = sum(b.size for b in batches)
    return [Batch(inputs, targets, weights, size, first.source, first.batch_index, first.offset, tuple(batches))]


def coalesce(batches: Iterable[Batch], max_rows: int | None) -> Iterator[Batch]:
    """Yield blocks of consecutive `batches` of up to `max_rows` examples; `None`: the batches."""
    if max_rows is None:
        yield from batches
        return
    pending: list[Batch] = []
    rows = 0
    for batch in batches:
        if pending and rows + batch.size > max_rows:
            yield from merge(pending)
            pending, rows = [], 0
        pending.append(batch)
        rows += batch.size
    if pending:
        yield from merge(pending)
