"""`BlockTopK`: the `k` largest and `k` smallest scores per query over blocks in any order.

Out-of-core scoring sees the score matrix `(n_test, n_train)` one column block at a time and
must keep only `O(n_test * k)`. Sorting or partitioning every block costs more than the matrix
product that made it, so each block is first *filtered*: a score can only enter a row's top-k
if it beats the row's current k-th best, and after the first blocks almost none does (about
`k * block / seen` per row). Only those candidates are merged, by a partition over
`k + (most candidates in a row)` columns. Blocks carry their column offset, so partial results
from different workers merge exactly (`merge`): the top-k of a union is the top-k of the
union of top-ks.

Ties at the k-th place keep the value seen first; `result` orders each row best first with
ties by lower training index.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _merge_candidates(
    values: np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray,
    cand_values: np.ndarray,
    cand_indices: np.ndarray,
    largest: bool,
) -> None:
    """Merge candidates (row-sorted) into the `(n_rows, k)` sets `values`/`indices`, in place."""
    if rows.size == 0:
        return
    k = values.shape[1]
    touched, starts, counts = np.unique(rows, return_index=True, return_counts=True)
    width = k + int(counts.max())
    fill = -np.inf if largest else np.inf
    pool_values = np.full((touched.size, width), fill, dtype=values.dtype)
    pool_indices = np.full((touched.size, width), -1, dtype=np.int64)
    pool_values[:, :k] = values[touched]
    pool_indices[:, :k] = indices[touched]
    slot = np.repeat(np.arange(touched.size), counts)
    position = k + np.arange(rows.size) - np.repeat(starts, counts)
    pool_values[slot, position] = cand_values
    pool_indices[slot, position] = cand_indices
    keys = -pool_values if largest else pool_values
    best = np.argpartition(keys, k - 1, axis=1)[:, :k]
    values[touched] = np.take_along_axis(pool_values, best, axis=1)
    indices[touched] = np.take_along_axis(pool_indices, best, axis=1)


class BlockTopK:
    """Keep the `k` largest (proponents) and `k` smallest (opponents) scores of each row.

    Args:
        n_rows: number of queries.
        k: how many to keep on each side.
        threads: threads for the filtering pass over a block (NumPy releases the GIL).

    Attributes:
        high_values, high_indices: `(n_rows, k)` current largest scores and their columns
            (unordered; -inf / -1 until `k` columns were seen).
        low_values, low_indices: the same for the smallest scores.
    """

    def __init__(self, n_rows: int, k: int, threads: int = 2) -> None:
        self.k = int(k)
        self.high_values = np.full((n_rows, self.k), -np.inf, dtype=np.float32)
        self.high_indices = np.full((n_rows, self.k), -1, dtype=np.int64)
        self.low_values = np.full((n_rows, self.k), np.inf, dtype=np.float32)
        self.low_indices = np.full((n_rows, self.k), -1, dtype=np.int64)
        self.seen = 0
        self._pool = ThreadPoolExecutor(max(1, threads)) if threads > 1 else None
        self._threads = max(1, threads)

    def _filter(self, block: np.ndarray, row_start: int, row_stop: int) -> tuple[np.ndarray, ...]:
        part = block[row_start:row_stop]
        width = part.shape[1]
        mask = np.empty(part.shape, dtype=bool)
        out: list[np.ndarray] = []
        for kth, compare in (
            (self.high_values[row_start:row_stop].min(axis=1, keepdims=True), np.greater),
            (self.low_values[row_start:row_stop].max(axis=1, keepdims=True), np.less),
        ):
            compare(part, kth, out=mask)
            flat = np.flatnonzero(mask)  # far cheaper than a 2-D nonzero
            rows, cols = np.divmod(flat, width)
            out += [rows + row_start, cols, part.reshape(-1)[flat]]
        return tuple(out)

    def add(self, block: np.ndarray, offset: int) -> None:
        """Merge a score block `(n_rows, width)` whose column `j` is training index `offset + j`."""
        block = np.asarray(block, dtype=np.float32)
        n_rows = block.shape[0]
        if self.seen < self.k:
            # First block(s): every score is a candidate. Partition only a slice of columns; its
            # k-th best is a safe threshold (a subset's k-th best is never above the block's),
            # so the rest of the block goes through the cheap filter.
            head = min(block.shape[1], max(8 * self.k, 1024))
            self._merge_dense(block[:, :head], offset)
            self.seen += head
            if head < block.shape[1]:
                self.add(block[:, head:], offset + head)
            return
        else:
            bounds = np.linspace(0, n_rows, self._threads + 1).astype(int)
            jobs = list(zip(bounds[:-1], bounds[1:]))
            if self._pool is not None and n_rows >= 2 * self._threads:
                parts = list(self._pool.map(lambda b: self._filter(block, *b), jobs))
            else:
                parts = [self._filter(block, 0, n_rows)]
            hr, hc, hv, lr, lc, lv = (np.concatenate([p[i] for p in parts]) for i in range(6))
            _merge_candidates(self.high_values, self.high_indices, hr, hv, hc + offset, largest=True)
            _merge_candidates(self.low_values, self.low_indices, lr, lv, lc + offset, largest=False)
        self.seen += block.shape[1]

    def _merge_dense(self, block: np.ndarray, offset: int) -> None:
        n_rows, width = block.shape
        columns = np.broadcast_to(np.arange(width, dtype=np.int64) + offset, block.shape)
        for largest in (True, False):
            values = self.high_values if largest else self.low_values
            indices = self.high_indices if largest else self.low_indices
            pool_values = np.concatenate([values, block], axis=1)
            pool_indices = np.concatenate([indices, columns], axis=1)
            keys = -pool_values if largest else pool_values
            best = np.argpartition(keys, self.k - 1, axis=1)[:, : self.k]
            values[...] = np.take_along_axis(pool_values, best, axis=1)
            indices[...] = np.take_along_axis(pool_indices, best, axis=1)

    def merge(self, other: BlockTopK) -> None:
        """Merge the state of another `BlockTopK` over disjoint columns (exact)."""
        for largest in (True, False):
            mine = (self.high_values, self.high_indices) if largest else (self.low_values, self.low_indices)
            theirs = (other.high_values, other.high_indices) if largest else (other.low_values, other.low_indices)
            rows = np.repeat(np.arange(theirs[0].shape[0]), self.k)
            valid = theirs[1].ravel() >= 0
            _merge_candidates(
                mine[0], mine[1], rows[valid], theirs[0].ravel()[valid], theirs[1].ravel()[valid], largest
            )
        self.seen += other.seen

    def state(self) -> dict[str, np.ndarray]:
        """The four `(n_rows, k)` arrays and `seen`, e.g. to save in a store or send between processes."""
        return {
            "high_values": self.high_values,
            "high_indices": self.high_indices,
            "low_values": self.low_values,
            "low_indices": self.low_indices,
            "seen": np.array([self.seen], dtype=np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], threads: int = 2) -> BlockTopK:
        """Inverse of `state`."""
        result = cls(state["high_values"].shape[0], state["high_values"].shape[1], threads)
        for name in ("high_values", "high_indices", "low_values", "low_indices"):
            getattr(result, name)[...] = state[name]
        result.seen = int(np.asarray(state["seen"]).ravel()[0])
        return result

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(proponent_values, proponent_indices, opponent_values, opponent_indices)`, each
        `(n_rows, min(k, seen))`, best first (largest / smallest), ties by lower index."""
        keep = min(self.k, self.seen)
        out: list[np.ndarray] = []
        for values, indices, sign in (
            (self.high_values, self.high_indices, -1.0),
            (self.low_values, self.low_indices, 1.0),
        ):
            order = np.lexsort((indices, sign * values.astype(np.float64)), axis=1)[:, :keep]
            out += [np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)]
        return out[0], out[1], out[2], out[3]

    def close(self) -> None:
        """Stop the filtering threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
