"""Blocks of plain in-memory datasets, read once per dataset object.

A plain pipeline (`vestigia.data.untuned.is_plain`: slices of tensors held in the dataset,
batched, zipped, ...) yields the same elements at every pass: its content is part of the
dataset object. Its blocks (`vestigia.data.blocks`) are therefore kept on the object after the
first full pass, up to `MEMO_BYTES`, and later passes (the curvature, then self-influence, then
scores over the same training set) reuse them instead of reading it again. Any other pipeline is
read at every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.data.untuned import is_plain

MEMO_BYTES = 64 << 20
"""Largest dataset (bytes of its batches' leaves) whose blocks are kept."""
_ATTRIBUTE = "_vestigia_blocks"


def _nbytes(batch: Batch) -> int:
    leaves = tf.nest.flatten((batch.inputs, batch.targets, batch.weights))
    return sum(int(np.asarray(leaf).nbytes) for leaf in leaves if leaf is not None)


def memo_blocks(dataset: tf.data.Dataset, key: Any, read: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    """The blocks `read()` yields for `dataset`, kept on a plain dataset under `key` (e.g. the
    batch function and the block size) after a first full pass, and yielded from there later."""
    memo = getattr(dataset, _ATTRIBUTE, None)
    if memo is not None and key in memo:
        yield from memo[key]
        return
    if not is_plain(dataset):
        yield from read()
        return
    kept: list[Batch] | None = []
    size = 0
    for block in read():
        if kept is not None:
            size += _nbytes(block)
            if size <= MEMO_BYTES:
                kept.append(block)
            else:
                kept = None
        yield block
    if kept is not None:
        memo = memo if memo is not None else {}
        memo[key] = kept
        try:
            object.__setattr__(dataset, _ATTRIBUTE, memo)
        except AttributeError:
            pass


def memo_inputs(dataset: tf.data.Dataset, process_fn: Any) -> Any:
    """The model inputs of all of `dataset`'s examples, as one nest of arrays, if its blocks were
    kept (under a key starting with `process_fn`) and concatenate; else None."""
    memo = getattr(dataset, _ATTRIBUTE, None) or {}
    for key, blocks in memo.items():
        if isinstance(key, tuple) and key and key[0] is process_fn:
            try:
                return tf.nest.map_structure(
                    lambda *leaves: np.concatenate([np.asarray(leaf) for leaf in leaves]), *[b.inputs for b in blocks]
                )
            except (ValueError, TypeError):
                return None
    return None
