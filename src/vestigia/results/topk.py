"""Streaming top-k: merge score blocks into the best `k` per row, memory `O(rows * k)`."""

from __future__ import annotations

from typing import Any

import numpy as np

from vestigia.results.enums import ORDER


class TopK(tuple):
    """The seed's `(samples, values)` pair, with the training `indices` attached.

    Unpacks as the seed's 2-tuple (`samples, values = result`); `result.indices` gives the
    positions in the training set, `result.values` and `result.samples` name the parts.
    """

    samples: Any
    values: np.ndarray
    indices: np.ndarray

    def __new__(cls, samples: Any, values: np.ndarray, indices: np.ndarray) -> TopK:
        self = super().__new__(cls, (samples, values))
        self.samples, self.values, self.indices = samples, values, indices
        return self


class StreamingTopK:
    """Keep the `k` largest (or smallest) scores per row over column blocks seen in order.

    Args:
        n_rows: number of rows (queries); 1 for a ranking of the training set itself.
        k: how many to keep per row.
        order: DESCENDING keeps the largest values, ASCENDING the smallest.

    Ties keep the earlier training index first.
    """

    def __init__(self, n_rows: int, k: int, order: ORDER = ORDER.DESCENDING) -> None:
        if not isinstance(order, ORDER):
            raise TypeError(f"`order` must be an ORDER. Received: order={order!r}")
        self.k = k
        self.sign = -1.0 if order is ORDER.DESCENDING else 1.0
        self.keys = np.full((n_rows, 0), np.inf)
        self.indices = np.zeros((n_rows, 0), dtype=np.int64)
        self.seen = 0

    def add(self, scores: np.ndarray) -> None:
        """Merge a block `(n_rows, block)` whose columns are the next training indices."""
        scores = np.asarray(scores)
        if scores.dtype not in (np.float32, np.float64):
            scores = scores.astype(np.float64)
        block = scores.shape[1]
        block_keys = self.sign * scores  # float32 blocks stay float32 (exact); selected keys become float64
        columns = np.broadcast_to(np.arange(block), scores.shape)
        if block > self.k:
            columns = self._best_columns(block_keys)
            block_keys = np.take_along_axis(block_keys, columns, axis=1)
        keys = np.concatenate([self.keys, block_keys.astype(np.float64)], axis=1)
        indices = np.concatenate([self.indices, self.seen + columns], axis=1)
        self.seen += block
        if keys.shape[1] > self.k:
            # Sort by (key, index) so that ties at the k-th place keep the lower training index.
            part = np.lexsort((indices, keys), axis=1)[:, : self.k]
            keys = np.take_along_axis(keys, part, axis=1)
            indices = np.take_along_axis(indices, part, axis=1)
        self.keys, self.indices = keys, indices

    def _best_columns(self, keys: np.ndarray) -> np.ndarray:
        """Columns `(n_rows, k)` of the `k` smallest keys of each row, ties to the lower column.

        Linear in the block: the k-th key by partition, then every key below it and the first
        columns equal to it (a stable sort of a boolean mask), instead of sorting the block.
        """
        kth = np.partition(keys, self.k - 1, axis=1)[:, self.k - 1 : self.k]
        below = keys < kth
        tied = keys == kth
        room = self.k - below.sum(axis=1, keepdims=True)
        if np.any(tied.sum(axis=1, keepdims=True) > room):
            tied &= np.cumsum(tied, axis=1) <= room
        take = below | tied
        if take.sum() == take.shape[0] * self.k:
            return np.nonzero(take)[1].reshape(take.shape[0], self.k)
        return np.argsort(~take, axis=1, kind="stable")[:, : self.k]  # NaN keys: fewer than k taken

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """`(values, indices)`, each `(n_rows, k)`, sorted best first (ties: lower index first)."""
        order = np.lexsort((self.indices, self.keys), axis=1)
        keys = np.take_along_axis(self.keys, order, axis=1)
        return (self.sign * keys).astype(np.float32), np.take_along_axis(self.indices, order, axis=1)


def top_k_of_scores(scores: np.ndarray, k: int, order: ORDER = ORDER.DESCENDING) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a full score matrix `(n_rows, n_cols)`, as `StreamingTopK` would give it."""
    stream = StreamingTopK(scores.shape[0], k, order)
    stream.add(scores)
    return stream.result()
