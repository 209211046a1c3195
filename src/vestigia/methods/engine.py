"""The calculator engine shared by every attribution method.

Most methods are inner products, `value(z_test, z) = sum_c <psi_c(z_test), phi_c(z)>`, with one
component `c` for most methods and one per checkpoint for TracIn. A method defines, per raw
batch, the *seed pairing* (`_influence_vector` = `phi`, the training-side influence vector the
seed returns, and `_preprocess` = `psi`), optionally a cheaper *scoring pairing* with the same
inner products (`_score_train_side` / `_score_test_side`, e.g. `g_z` and `H^-1 g_test`), and
its own self-influence if it can be had with one gradient per example.

The engine does the rest, the same way for every method: one pass over the training set per
call, test-side vectors computed once, scores by matrix products, streaming top-k with memory
`O(n_test * k)`, and the seed's dataset-shaped results.

Memory: the test sides are held in chunks of about `TEST_CHUNK_BYTES` (never concatenated into
one tensor), each paired with a training batch's side; only the small `(n_test, batch)` score
blocks are stacked. For top-k, `TEST_SIDE_BYTES` bounds the test sides held at once (groups of
test batches, one pass over the training set per group).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.blocks import coalesce, parts_of
from vestigia.data.dataset import (
    Batch,
    ProcessBatchFn,
    as_batched_dataset,
    default_process_batch,
    iterate_batches,
    select_samples,
    to_batched_dataset,
)
from vestigia.data.memo import memo_batches, memo_inputs
from vestigia.data.untuned import untuned, untuned_view
from vestigia.errors import InvalidDataError, available_memory, check_positive_int
from vestigia.methods.score_checks import check_finite_result, check_finite_values, checked_blocks, within_memory
from vestigia.progress import bar, known_length, track
from vestigia.results.enums import CACHE, ORDER
from vestigia.results.topk import StreamingTopK, TopK
from vestigia.store.calculator import open_calculator_store, stored_rows

StorePath = str | os.PathLike[str]

TEST_CHUNK_BYTES = 512 * 2**20
"""Test-side vectors are paired with each training side in chunks of about this size (float32:
`n_params = 1.2M` gives ~110 test examples per chunk); merging a chunk holds it twice, briefly."""

TEST_SIDE_BYTES: int | None = None
"""Budget for the test-side vectors held at once by `top_k_indices` / `top_k` (None: half the
memory available when the call starts, `vestigia.errors.available_memory`). Above it the test set
is scored in groups of consecutive test batches, one pass over the training set per group: memory
bounded by the budget, training sides computed once per group."""


def _test_side_budget() -> int:
    """`TEST_SIDE_BYTES`, or half the memory available now."""
    return TEST_SIDE_BYTES if TEST_SIDE_BYTES is not None else available_memory() // 2


def _n_batches(data: Any) -> int | None:
    """Batches of a `tf.data.Dataset` when known (for progress bars); None for arrays."""
    return known_length(data) if isinstance(data, tf.data.Dataset) else None


def _track_blocks(blocks: Iterator[Batch], title: str, data: Any) -> Iterator[Batch]:
    """`track` counting the user's batches of each block (see `vestigia.data.blocks`)."""
    with bar(_n_batches(data), title) as progress:
        for block in blocks:
            yield block
            progress.advance(len(parts_of(block)))


def _device(device: str | None) -> contextlib.AbstractContextManager[Any]:
    return tf.device(device) if device else contextlib.nullcontext()


def _check_k(k: Any, available: int, what: str) -> int:
    k = check_positive_int("k", k)
    if k > available:
        raise InvalidDataError(f"`k` must be at most the number of {what} ({available}). Received: k={k}")
    return k


def _bytes(side: Any) -> int:
    """Bytes of a side: a tensor `(rows, dim)`, or a tuple of them (one per block of columns)."""
    return sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(side))


def _rows(side: Any) -> int:
    return int(tf.nest.flatten(side)[0].shape[0])


def _merged(sides: list[Any]) -> Any:
    """Sides (tensors, or tuples of blocks) stacked along their rows."""
    return sides[0] if len(sides) == 1 else tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *sides)


def _column_blocks(matrix: np.ndarray, sizes: list[int]) -> tf.data.Dataset:
    """A dataset of `matrix[:, a:b]` for consecutive column blocks of the given widths (no map)."""
    parts, start = [], 0
    for width, run in itertools.groupby(sizes):
        count = len(list(run))
        chunk = matrix[:, start : start + width * count].reshape(matrix.shape[0], count, width)
        parts.append(tf.data.Dataset.from_tensor_slices(np.ascontiguousarray(chunk.transpose(1, 0, 2))))
        start += width * count
    return functools.reduce(lambda a, b: a.concatenate(b), parts)


class SelfInfluenceCalculator(ABC):
    """Self-influence of each training example, its ranking, and the seed's views of both.

    Subclasses implement `_self_influence(batch) -> (batch,)`. Higher means more influential
    on itself: more suspicious (mislabeled, atypical, memorised).
    """

    process_batch_for_loss_fn: ProcessBatchFn = staticmethod(default_process_batch)  # type: ignore[assignment]

    @abstractmethod
    def _self_influence(self, batch: Batch) -> np.ndarray:
        """Self-influence of each example of a raw batch, shape `(batch,)`."""

    def _checked_values(self, batch: Batch) -> np.ndarray:
        """`_self_influence(batch)`, raising `NonFiniteError` if a value is NaN or Inf (naming the
        user's batch that holds it, in a block)."""
        values = np.asarray(self._self_influence(batch))
        start = 0
        for part in parts_of(batch):
            check_finite_values(values[start : start + part.size], part, "self-influence")
            start += part.size
        return values

    def _batches(self, dataset: Any, name: str) -> Iterator[Batch]:
        return iterate_batches(untuned(as_batched_dataset(dataset, name)), self.process_batch_for_loss_fn, name)

    def _samples(self, train_set: tf.data.Dataset, indices: np.ndarray) -> Any:
        """The model inputs of the training examples at `indices` (any shape), from the blocks kept
        on a plain dataset (`vestigia.data.memo`), else in one pass over it."""
        inputs = memo_inputs(train_set, self.process_batch_for_loss_fn)
        if inputs is None:
            return select_samples(untuned(train_set), indices, self.process_batch_for_loss_fn)
        return tf.nest.map_structure(lambda a: a[np.asarray(indices, np.int64)], inputs)

    def _block_rows(self, extra_width: int = 0) -> int | None:
        """Examples per block when this method merges the user's batches (closed-form heads, see
        `vestigia.data.blocks`), else None. `extra_width`: further float32 values per example
        (e.g. one score per test example)."""
        return None

    def _blocks(self, dataset: Any, name: str, extra_width: int = 0) -> Iterator[Batch]:
        """`_batches`, merged into blocks of `_block_rows(extra_width)` examples where it is not None
        (then kept on a plain in-memory dataset, see `vestigia.data.memo`)."""
        rows = self._block_rows(extra_width)
        if rows is None:
            return self._batches(dataset, name)
        dataset = as_batched_dataset(dataset, name)
        batches = memo_batches(dataset, self.process_batch_for_loss_fn, name, lambda: self._batches(dataset, name))
        return coalesce(batches, rows)

    def self_influence(self, train_set: Any, device: str | None = None, store: StorePath | None = None) -> np.ndarray:
        """Self-influence of every example of `train_set`, shape `(n_train,)`, in dataset order.

        With `store` (a directory), each training batch's values are saved there as they are
        computed, and a rerun after a crash resumes (see `vestigia.store`)."""
        with _device(device):
            if store is not None:
                return self._stored_self_influence(train_set, store)
            batches = _track_blocks(self._blocks(train_set, "train_set"), "self-influence (batches)", train_set)
            values = [np.asarray(self._checked_values(b), np.float32) for b in batches]
        return np.concatenate(values)

    def _stored_self_influence(self, train_set: Any, store: StorePath) -> np.ndarray:
        opened = open_calculator_store(self, train_set, store)
        compute = lambda b: [np.asarray(self._checked_values(b), np.float32)]  # noqa: E731
        rows = stored_rows(opened, ["self_influence"], self._batches(train_set, "train_set"), compute)
        return np.concatenate([r[0] for r in rows])

    def compute_influence_values(self, train_set: Any, device: str | None = None) -> tf.data.Dataset:
        """The seed's view: a dataset of `(train_batch, self_influence (batch, 1))`, in order."""
        train_set = as_batched_dataset(train_set, "train_set")
        with _device(device):
            values, sizes = [], []
            for batch in self._blocks(train_set, "train_set"):
                values.append(np.asarray(self._checked_values(batch), np.float32))
                sizes += [part.size for part in parts_of(batch)]
        view = tf.data.Dataset.zip((train_set, to_batched_dataset(np.concatenate(values)[:, None], sizes)))
        return untuned_view(view, train_set)

    def _compute_influence_values(self, train_set: Any) -> tf.Tensor:
        """Self-influence as a `(n_train, 1)` tensor (the seed's private helper)."""
        return tf.constant(self.self_influence(train_set)[:, None])

    def compute_top_k_from_training_dataset(self, train_set: Any, k: int, order: ORDER = ORDER.DESCENDING) -> TopK:
        """The `k` training examples of highest (DESCENDING) or lowest self-influence.

        Streams over the training set keeping `k` candidates. Returns a `TopK` that unpacks as
        the seed's `(samples (k, ...), values (k,))` and carries `indices (k,)`.
        """
        check_positive_int("k", k)
        train_set = as_batched_dataset(train_set, "train_set")
        stream = StreamingTopK(1, k, order)
        for batch in self._blocks(train_set, "train_set"):
            stream.add(self._checked_values(batch)[None, :])
        _check_k(k, stream.seen, "training examples")
        values, indices = stream.result()
        samples = self._samples(train_set, indices[0])
        return TopK(samples, values[0], indices[0])


class BaseInfluenceCalculator(SelfInfluenceCalculator):
    """Inner-product methods: pairwise values, influence vectors, top-k, on one engine."""

    n_components: int = 1

    @abstractmethod
    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`phi(z)` for each training example of a raw batch, `(batch, dim)`."""

    @abstractmethod
    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`psi(z_test)` for each test example of a raw batch, `(batch, dim)`."""

    def _score_train_side(self, batch: Batch, component: int) -> tf.Tensor:
        return self._influence_vector(batch, component)

    def _score_test_side(self, batch: Batch, component: int) -> tf.Tensor:
        return self._preprocess(batch, component)

    def _pair(self, test_side: tf.Tensor, train_side: tf.Tensor, component: int) -> tf.Tensor:
        """Scores `(n_test, batch)` of the scoring pairing; `test_side @ train_side^T` by default."""
        return tf.matmul(test_side, train_side, transpose_b=True)

    def _packed_side(self, train_side: Any, component: int) -> np.ndarray:
        """A training side as one array `(batch, width)`, as `store=` keeps it (override with
        `_unpacked_side` for sides that are not one tensor)."""
        return np.asarray(train_side)

    def _unpacked_side(self, packed: np.ndarray, component: int) -> Any:
        return packed

    def _self_influence(self, batch: Batch) -> np.ndarray:
        total = 0.0
        for c in range(self.n_components):
            products = self._preprocess(batch, c) * self._influence_vector(batch, c)
            total = total + tf.reduce_sum(products, axis=1).numpy()
        return np.asarray(total)

    # -- the engine ----------------------------------------------------------------------------

    def _test_side_groups(
        self, dataset: Any, budget: int | None = None
    ) -> Iterator[tuple[list[list[tf.Tensor]], list[int]]]:
        """Per group of consecutive test batches: per component, the test-side vectors in chunks
        `(rows, dim)` (or tuples of such blocks of columns, as the method's side is), and the
        sizes of the user's test batches in the group.

        Batches are merged into chunks of about `TEST_CHUNK_BYTES` (a GEMM per chunk runs faster
        than one per small batch), never into one tensor (that would hold every test side twice
        at once); `_blocks_against` pairs each chunk with a training side. A group closes when
        its chunks reach `budget` bytes (None: one group); the next is computed when the caller
        asks for it, so drop the previous one first.
        """
        chunks: list[list[tf.Tensor]] = [[] for _ in range(self.n_components)]
        pending: list[list[tf.Tensor]] = [[] for _ in range(self.n_components)]
        sizes: list[int] = []
        held = 0
        for batch in self._blocks(dataset, "dataset_to_evaluate"):
            for c in range(self.n_components):
                side = self._score_test_side(batch, c)
                pending[c].append(side)
                held += _bytes(side)
                if sum(_bytes(side) for side in pending[c]) >= TEST_CHUNK_BYTES:
                    chunks[c].append(_merged(pending[c]))
                    pending[c] = []
            sizes += [part.size for part in parts_of(batch)]
            if budget is not None and held >= budget:
                yield [c + ([_merged(p)] if p else []) for c, p in zip(chunks, pending)], sizes
                chunks, pending = [[] for _ in range(self.n_components)], [[] for _ in range(self.n_components)]
                sizes, held = [], 0
        if sizes:
            yield [c + ([_merged(p)] if p else []) for c, p in zip(chunks, pending)], sizes

    def _test_sides(self, dataset: Any) -> tuple[list[list[tf.Tensor]], list[int]]:
        """Every test side in one group (see `_test_side_groups`)."""
        return next(self._test_side_groups(dataset), ([[] for _ in range(self.n_components)], []))

    def score_blocks(
        self, dataset_to_evaluate: Any, train_set: Any, store: StorePath | None = None
    ) -> Iterator[np.ndarray]:
        """Yield score blocks `(n_test, train_batch)`, one per training batch, in order (every test
        side held at once: `TEST_SIDE_BYTES` applies to top-k only)."""
        test_sides, _ = self._test_sides(dataset_to_evaluate)
        yield from self._blocks_against(test_sides, train_set, store)

    def _train_sides(
        self, train_set: Any, store: StorePath | None, n_test: int = 0
    ) -> Iterator[tuple[list[int] | None, list[Any]]]:
        """Training-side vectors of each batch (or block, then with the sizes of the user's
        batches it holds; else None), one per component; cached per batch in `store`."""
        compute = lambda b: [self._score_train_side(b, c) for c in range(self.n_components)]  # noqa: E731
        if store is None:
            blocks = self._blocks(train_set, "train_set", n_test)
            blocks = _track_blocks(blocks, "scoring (training batches)", train_set)
            return (([p.size for p in parts_of(b)] if b.parts else None, compute(b)) for b in blocks)
        batches = track(self._batches(train_set, "train_set"), "scoring (training batches)", _n_batches(train_set))
        names = [f"train_side_{c}" for c in range(self.n_components)]
        packed = lambda b: [self._packed_side(side, c) for c, side in enumerate(compute(b))]  # noqa: E731
        rows = stored_rows(open_calculator_store(self, train_set, store), names, batches, packed)
        return ((None, [self._unpacked_side(side, c) for c, side in enumerate(row)]) for row in rows)

    def _paired_blocks(self, test_blocks: list[tf.Tensor], train_side: Any, component: int) -> np.ndarray:
        """`_pair` of each chunk of test sides with one training side, stacked: `(n_test, batch)`."""
        return np.concatenate([np.asarray(self._pair(side, train_side, component)) for side in test_blocks], axis=0)

    @checked_blocks
    def _blocks_against(
        self, test_sides: list[list[tf.Tensor]], train_set: Any, store: StorePath | None = None
    ) -> Iterator[np.ndarray]:
        """Score blocks `(n_test, train_batch)`: each training side paired with every block of test
        sides, the small `(test_batch, train_batch)` results stacked, components summed."""
        n_test = sum(_rows(side) for side in test_sides[0]) if test_sides else 0
        for sizes, train_side in self._train_sides(train_set, store, n_test):
            block = self._paired_blocks(test_sides[0], train_side[0], 0)
            for c in range(1, len(test_sides)):
                block += self._paired_blocks(test_sides[c], train_side[c], c)
            if sizes is None:
                yield block
            else:  # one block per user's batch
                yield from np.split(block, np.cumsum(sizes)[:-1], axis=1)

    def influence_matrix(
        self, dataset_to_evaluate: Any, train_set: Any, device: str | None = None, store: StorePath | None = None
    ) -> np.ndarray:
        """All pairwise values `(n_test, n_train)`: `values[t, i]` is the influence of training
        example `i` on test example `t` (positive: proponent). `store`: a directory caching the
        training-side vectors per batch (resumable, see `vestigia.store`)."""
        with _device(device):
            blocks = within_memory(
                self.score_blocks(dataset_to_evaluate, train_set, store), train_set, "influence_matrix"
            )
            return np.concatenate(list(blocks), axis=1)

    def top_k_indices(
        self,
        dataset_to_evaluate: Any,
        train_set: Any,
        k: int = 5,
        order: ORDER = ORDER.DESCENDING,
        device: str | None = None,
        store: StorePath | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` most influential training examples for each test example, streamed.

        `store`: a directory caching the training-side vectors per batch (resumable).

        Returns:
            `(values, indices)`, each `(n_test, k)`, best first; memory `O(n_test * k)`.
        """
        values, indices, _ = self._top_k_with_sizes(dataset_to_evaluate, train_set, k, order, device, store)
        return values, indices

    def _top_k_with_sizes(
        self,
        dataset_to_evaluate: Any,
        train_set: Any,
        k: int,
        order: ORDER,
        device: str | None,
        store: StorePath | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """`top_k_indices`, and the test batch sizes: one pass over the test set, and one over the
        training set per group of test sides (one group unless they exceed `_test_side_budget()`)."""
        check_positive_int("k", k)
        values, indices, test_sizes = [], [], []
        with _device(device):
            for test_sides, sizes in self._test_side_groups(dataset_to_evaluate, _test_side_budget()):
                stream = StreamingTopK(sum(sizes), k, order)
                for block in self._blocks_against(test_sides, train_set, store):
                    stream.add(block)
                del test_sides  # before the next group is computed
                _check_k(k, stream.seen, "training examples")
                group_values, group_indices = stream.result()
                values.append(group_values)
                indices.append(group_indices)
                test_sizes += sizes
        if not test_sizes:
            raise InvalidDataError("`dataset_to_evaluate` holds no examples.")
        return np.concatenate(values), np.concatenate(indices), test_sizes

    # -- the seed's API ------------------------------------------------------------------------

    def _compute_influence_vector(self, train_batch: Any) -> tf.Tensor:
        """The seed's private hook: influence vectors of one dataset element."""
        batch = next(iterate_batches(tf.data.Dataset.from_tensors(train_batch), self.process_batch_for_loss_fn))
        return self._influence_vector(batch, 0)

    def _preprocess_samples(self, test_batch: Any) -> tf.Tensor:
        """The seed's private hook: preprocessed test vectors of one dataset element."""
        batch = next(iterate_batches(tf.data.Dataset.from_tensors(test_batch), self.process_batch_for_loss_fn))
        return self._preprocess(batch, 0)

    def _estimate_individual_influence_values_from_batch(self, train_batch: Any, test_batch: Any) -> tf.Tensor:
        """Pairwise values `(test_batch, train_batch)` of two dataset elements."""
        values = self.influence_matrix(
            tf.data.Dataset.from_tensors(test_batch), tf.data.Dataset.from_tensors(train_batch)
        )
        return tf.constant(values)

    def _influence_vectors(self, train_set: tf.data.Dataset) -> tuple[tf.Tensor, list[int]]:
        vectors, sizes = [], []
        for batch in self._blocks(train_set, "train_set"):
            vectors.append(tf.concat([self._influence_vector(batch, c) for c in range(self.n_components)], axis=1))
            sizes += [part.size for part in parts_of(batch)]
        return tf.concat(vectors, axis=0), sizes

    def compute_influence_vector(
        self,
        train_set: Any,
        save_influence_vector_ds_path: str | None = None,
        device: str | None = None,
    ) -> tf.data.Dataset:
        """A dataset of `(train_batch, influence_vectors (batch, dim))`, saved if a path is given."""
        train_set = as_batched_dataset(train_set, "train_set")
        with _device(device):
            vectors, sizes = self._influence_vectors(train_set)
        result = untuned_view(tf.data.Dataset.zip((train_set, to_batched_dataset(vectors, sizes))), train_set)
        if save_influence_vector_ds_path is not None:
            result.save(save_influence_vector_ds_path)
        return result

    def _scores_against_saved_vectors(self, dataset_to_evaluate: Any, path: str) -> np.ndarray:
        saved = tf.data.Dataset.load(path)
        phi = check_finite_result(
            tf.concat([vectors for _, vectors in saved], axis=0), f"The influence vectors saved at {path!r}"
        )
        psi = [
            tf.concat([self._preprocess(b, c) for c in range(self.n_components)], axis=1)
            for b in self._batches(dataset_to_evaluate, "dataset_to_evaluate")
        ]
        return tf.matmul(tf.concat(psi, axis=0), phi, transpose_b=True).numpy()

    def estimate_influence_values_in_batches(
        self,
        dataset_to_evaluate: Any,
        train_set: Any,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_path: str | None = None,
        save_influence_vector_path: str | None = None,
        save_influence_value_path: str | None = None,
        device: str | None = None,
    ) -> tf.data.Dataset:
        """The seed's nested view of the pairwise values.

        Returns a dataset of `(test_batch, inner)` where `inner` is a dataset of
        `(train_batch, values (test_batch, train_batch))`. Training-side vectors are computed
        once per call whatever `influence_vector_in_cache` says (all test vectors are scored
        in one pass over the training set); `load_influence_vector_path` reads vectors saved by
        `compute_influence_vector` instead, `save_influence_vector_path` saves them, and
        `save_influence_value_path` saves each inner dataset under `{path}/batch_{i:06d}`.
        """
        if not isinstance(influence_vector_in_cache, CACHE):
            raise TypeError(f"`influence_vector_in_cache` must be a CACHE. Received: {influence_vector_in_cache!r}")
        test_set = as_batched_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        train_set = as_batched_dataset(train_set, "train_set")
        with _device(device):
            if save_influence_vector_path is not None:
                self.compute_influence_vector(train_set, save_influence_vector_path)
            if load_influence_vector_path is not None:
                values = self._scores_against_saved_vectors(test_set, load_influence_vector_path)
                train_sizes = [b.size for b in self._batches(train_set, "train_set")]
                test_sizes = [b.size for b in self._batches(test_set, "dataset_to_evaluate")]
            else:
                test_sides, test_sizes = self._test_sides(test_set)
                blocks = list(within_memory(self._blocks_against(test_sides, train_set), train_set, "the values"))
                values, train_sizes = np.concatenate(blocks, axis=1), [b.shape[1] for b in blocks]
        offsets = np.concatenate([[0], np.cumsum(test_sizes)])
        outer = None
        for i, (test_batch, start, stop) in enumerate(zip(untuned(test_set), offsets[:-1], offsets[1:])):
            inner = untuned_view(
                tf.data.Dataset.zip((train_set, _column_blocks(values[start:stop], train_sizes))), train_set
            )
            if save_influence_value_path is not None:
                inner.save(f"{save_influence_value_path}/batch_{i:06d}")
            element = tf.data.Dataset.from_tensors((test_batch, inner))
            outer = element if outer is None else outer.concatenate(element)
        assert outer is not None
        return untuned_view(outer, test_set)

    def top_k(
        self,
        dataset_to_evaluate: Any,
        train_set: Any,
        k: int = 5,
        order: ORDER | Any = ORDER.DESCENDING,
        nearest_neighbors: Any = None,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_ds_path: str | None = None,
        save_influence_vector_ds_path: str | None = None,
        save_top_k_ds_path: str | None = None,
        d_type: tf.DType = tf.float32,
        device: str | None = None,
    ) -> tf.data.Dataset:
        """The seed's view of per-query top-k: a dataset of
        `(test_batch, values (batch, k), train_samples (batch, k, ...))`.

        Works for any query batch size. The seed's README passes `ORDER` as the fourth
        positional argument, which is `order` here; a nearest-neighbour object passed there (the
        seed's fourth parameter) is accepted and ignored: the scan is exact. Use
        `top_k_indices` for the training indices.
        """
        if not isinstance(order, ORDER):
            order, nearest_neighbors = (
                (nearest_neighbors if isinstance(nearest_neighbors, ORDER) else ORDER.DESCENDING),
                order,
            )
        test_set = as_batched_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        train_set = as_batched_dataset(train_set, "train_set")
        if save_influence_vector_ds_path is not None:
            self.compute_influence_vector(train_set, save_influence_vector_ds_path)
        values, indices, test_sizes = self._top_k_with_sizes(test_set, train_set, k, order, device)
        samples = self._samples(train_set, indices)
        view = tf.data.Dataset.zip(
            (
                test_set,
                to_batched_dataset(tf.cast(values, d_type), test_sizes),
                to_batched_dataset(samples, test_sizes),
            )
        )
        result = untuned_view(view, test_set)
        if save_top_k_ds_path is not None:
            result.save(save_top_k_ds_path)
        return result
