"""Checks on the engine's outputs: finite scores, and dense score matrices that fit in memory.

Gradients are checked where they are computed (`vestigia.model`); a score can still overflow
float32 when finite gradients are huge (inputs scaled by 1e30 give gradients near 1e30 and
products near 1e60), so each block of scores is checked once more, with one vectorised
`isfinite` over the block (a pass over `n_test * batch` values, against the
`n_test * batch * n_params` of the product that made it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.errors import NonFiniteError, check_memory

_OVERFLOW_HINT = (
    "The gradients are finite, so the products overflow float32 (or the solver returned NaN): "
    "rescale the inputs (e.g. standardise them) or check the curvature's damping."
)


def check_finite_values(values: np.ndarray, batch: Batch, what: str) -> np.ndarray:
    """Return `values` `(batch,)` (self-influence of one batch) or raise `NonFiniteError`."""
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argmin(finite))
        raise NonFiniteError(
            f"`{batch.source}`, batch {batch.batch_index}: the {what} of example {batch.offset + row} (row {row}) is "
            f"{values[row]}. {_OVERFLOW_HINT}"
        )
    return values


def check_finite_result(values: Any, what: str) -> Any:
    """Return `values` (an array or tensor of any shape) or raise `NonFiniteError` naming `what`
    (a group's influence, vectors read from disk) and how many entries are NaN or Inf."""
    array = np.asarray(values)
    finite = np.isfinite(array)
    if not finite.all():
        raise NonFiniteError(
            f"{what} holds {int((~finite).sum())} NaN or Inf value(s) of {array.size} (first at index "
            f"{tuple(int(i) for i in np.argwhere(~finite)[0])}). {_OVERFLOW_HINT}"
        )
    return values


def check_finite_block(block: np.ndarray, batch_index: int, offset: int) -> np.ndarray:
    """Return a score block `(n_test, batch)` against the training batch `batch_index`, whose first
    example is `train_set` example `offset`, or raise `NonFiniteError`."""
    finite = np.isfinite(block)
    if not finite.all():
        test, col = (int(i) for i in np.argwhere(~finite)[0])
        raise NonFiniteError(
            f"The score of `dataset_to_evaluate` example {test} against `train_set` example {offset + col} "
            f"(training batch {batch_index}, column {col}) is {block[test, col]}; {int((~finite).sum())} "
            f"score(s) of that block are NaN or Inf. {_OVERFLOW_HINT}"
        )
    return block


def checked_blocks(method: Callable[..., Iterator[np.ndarray]]) -> Callable[..., Iterator[np.ndarray]]:
    """Decorate a method yielding score blocks `(n_test, train_batch)`, one per training batch in
    order, so that each block is checked by `check_finite_block`."""

    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
        offset = 0
        for index, block in enumerate(method(*args, **kwargs)):
            yield check_finite_block(np.asarray(block), index, offset)
            offset += block.shape[1]

    return checked


def _known_rows(dataset: Any, batch_size: int) -> int | None:
    """Examples of a tuple of arrays, an upper bound for a batched dataset from its cardinality,
    or None if unknown."""
    if isinstance(dataset, (tuple, list)):
        return len(tf.nest.flatten(tuple(dataset))[0])
    if not isinstance(dataset, tf.data.Dataset):
        return None
    batches = int(dataset.cardinality())
    return batches * batch_size if batches >= 0 else None


def within_memory(blocks: Iterable[np.ndarray], train_set: Any, what: str) -> Iterator[np.ndarray]:
    """Yield score blocks that will be concatenated into one `(n_test, n_train)` matrix, raising
    `InsufficientMemoryError` as soon as the matrix is known not to fit.

    The full size is estimated at the first block (`n_test` rows; `n_train` from the length of
    arrays, or a dataset's cardinality times the first batch's width). When the length is
    unknown, the blocks held are re-checked each time they double. The estimate counts the
    blocks and their concatenation.
    """
    held, next_check, n_train = 0, 0, None
    for i, block in enumerate(blocks):
        n_test, width = block.shape
        held += block.nbytes
        if i == 0:
            n_train = _known_rows(train_set, width)
        if i == 0 and n_train is not None:
            needed, shape = 2 * n_test * n_train * block.itemsize, f"{n_test} x {n_train}"
        elif n_train is None and held >= next_check:
            needed, shape = 2 * held, f"{n_test} x >= {held // max(1, n_test * block.itemsize)}"
            next_check = 2 * held
        else:
            needed = 0
        if needed:
            check_memory(
                f"{what} ({shape} {block.dtype}, with its blocks)",
                needed,
                "Use `top_k_indices(dataset_to_evaluate, train_set, k)` (streams; memory n_test * k), "
                "`score_blocks(...)` to process one training batch of scores at a time, or fewer test examples.",
            )
        yield block
