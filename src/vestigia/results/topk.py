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
        scores = np.asarray(scores, dtype=np.float64)
        block = scores.shape[1]
        keys = np.concatenate([self.keys, self.sign * scores], axis=1)
        indices = np.concatenate(
            [self.indices, np.broadcast_to(np.arange(self.seen, self.seen + block), scores.shape)],
            axis=1,
        )
        self.seen += block
        if keys.shape[1] > self.k:
            # Sort by (key, index) so that ties at the k-th place keep the lower training index.
            part = np.lexsort((indices, keys), axis=1)[:, : self.k]
            keys = np.take_along_axis(keys, part, axis=1)
            indices = np.take_along_axis(indices, part, axis=1)
        self.keys, self.indices = keys, indices

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
