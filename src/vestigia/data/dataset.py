"""Batched data in, `Batch(inputs, targets, weights)` out, in dataset order.

The seed's contract is a *batched* `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`,
read through a `process_batch_for_loss_fn(batch) -> (inputs, targets, sample_weight)`.
Batching is detected from the element spec (every component shares one leading dimension),
so `.batch().prefetch()`, `.batch().map()`, partial last batches and unknown cardinality all
work. NumPy arrays, or tuples of them, are batched here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from vestigia.data.checks import check_dataset
from vestigia.data.sliced import sliced_batches
from vestigia.errors import InvalidDataError

ProcessBatchFn = Callable[[Any], tuple[Any, Any, Any]]

DEFAULT_BATCH_SIZE = 128


class Batch(NamedTuple):
    """One batch: model inputs (tensor, tuple or dict), targets, per-example weights or None, its size,
    and, for error messages, the name of the argument it came from, its index among the dataset's
    batches and the dataset position of its first example. `parts`: for consecutive batches merged
    into one block (`vestigia.data.blocks`), the batches it holds, in order; else empty."""

    inputs: Any
    targets: Any
    weights: tf.Tensor | None
    size: int
    source: str = "dataset"
    batch_index: int = 0
    offset: int = 0
    parts: tuple[Batch, ...] = ()


def default_process_batch(batch: Any) -> tuple[Any, Any, Any]:
    """Split a dataset element `(x, y)` or `(x, y, sample_weight)` into its three parts."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise InvalidDataError(
            "Each dataset element must be a tuple `(x, y)` or `(x, y, sample_weight)`, or a "
            "`process_batch_for_loss_fn` must split it. Received an element of type "
            f"{type(batch).__name__}" + (f" with {len(batch)} parts" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def _leading_dims(spec: Any) -> list[Any]:
    return [s.shape[0] if s.shape.rank else "scalar" for s in tf.nest.flatten(spec)]


def is_batched(dataset: tf.data.Dataset) -> bool:
    """True if every component of the elements has rank >= 1 and one common leading dimension.

    A `.batch(n)` anywhere upstream (followed by `.map`, `.prefetch`, `.cache`, ...) gives a
    leading dimension that is `None` or, with `drop_remainder=True`, `n` in every component.
    """
    dims = _leading_dims(dataset.element_spec)
    if not dims or "scalar" in dims:
        return False
    return len({str(d) for d in dims}) == 1


def as_batched_dataset(data: Any, name: str = "dataset", batch_size: int = DEFAULT_BATCH_SIZE) -> tf.data.Dataset:
    """Return `data` as a batched `tf.data.Dataset`.

    Args:
        data: a batched `tf.data.Dataset`, or a tuple `(x, y)` / `(x, y, sample_weight)` of
            arrays with one row per example (`x` may itself be a tuple or dict of arrays).
        name: the argument's name, for error messages.
        batch_size: batch size used when `data` holds arrays.

    Raises:
        InvalidDataError: if `data` is an unbatched, infinite or reshuffled dataset (see
            `vestigia.data.checks`), or arrays of unequal length.
    """
    if isinstance(data, tf.data.Dataset):
        if not is_batched(data):
            raise InvalidDataError(
                f"`{name}` must be a batched tf.data.Dataset (call `.batch(batch_size)` on it). "
                f"Received a dataset whose elements have leading dimensions "
                f"{_leading_dims(data.element_spec)} (element_spec={data.element_spec})."
            )
        check_dataset(data, name)
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        lengths = {len(a) for a in tf.nest.flatten(tuple(data)) if a is not None}
        if len(lengths) != 1:
            raise InvalidDataError(
                f"`{name}` arrays must all have one row per example. Received lengths {sorted(lengths)}."
            )
        if lengths == {0}:
            raise InvalidDataError(f"`{name}` is empty. Received arrays of length 0.")
        parts = tuple(p for p in data if p is not None)
        return tf.data.Dataset.from_tensor_slices(parts).batch(batch_size)
    raise InvalidDataError(
        f"`{name}` must be a batched tf.data.Dataset or a tuple `(x, y[, sample_weight])` of "
        f"arrays. Received: {name} of type {type(data).__name__}."
    )


def _leading_dim(t: Any) -> int:
    """Size of the first axis, from the static shape when known (no op, no sync), else `tf.shape`."""
    shape = getattr(t, "shape", None)
    if shape is not None and len(shape) > 0 and shape[0] is not None:
        return int(shape[0])
    return int(tf.shape(t)[0])


def _rank(t: Any) -> int:
    shape = getattr(t, "shape", None)
    return len(shape) if shape is not None and getattr(shape, "rank", 0) is not None else int(tf.rank(t))


def _batch_size_of(inputs: Any, name: str) -> int:
    sizes = {_leading_dim(t) for t in tf.nest.flatten(inputs)}
    if len(sizes) != 1:
        raise InvalidDataError(f"`{name}`: the inputs of one batch have different lengths {sorted(sizes)}.")
    return sizes.pop()


def iterate_batches(
    dataset: tf.data.Dataset,
    process_batch_fn: ProcessBatchFn = default_process_batch,
    name: str = "dataset",
) -> Iterator[Batch]:
    """Yield the dataset's batches as `Batch` tuples, checking that they are consistent.

    Sliced arrays (`vestigia.data.sliced`) are cut in NumPy, without a tf.data iterator: their
    leaves are then NumPy arrays (tensors for a `process_batch_fn` of the user's).

    Raises:
        InvalidDataError: if the dataset is infinite or changes between passes (checked once per
            dataset object), yields no batch, or a batch whose inputs, targets and weights have
            different lengths.
    """
    check_dataset(dataset, name)
    empty, index, offset = True, 0, 0
    sliced = sliced_batches(dataset)
    if sliced is not None and process_batch_fn is not default_process_batch:
        # A user's function gets what tf.data would give it: tensors.
        sliced = (tf.nest.map_structure(tf.constant, element) for element in sliced)
    for element in dataset if sliced is None else sliced:
        inputs, targets, weights = process_batch_fn(element)
        size = _batch_size_of(inputs, name)
        target_sizes = {_leading_dim(t) for t in tf.nest.flatten(targets) if _rank(t) > 0}
        if target_sizes - {size} or not target_sizes:
            raise InvalidDataError(
                f"`{name}`: a batch has {size} inputs but targets of shape "
                f"{[tuple(t.shape) for t in tf.nest.flatten(targets)]}. Targets need one row per input."
            )
        if weights is not None:
            weights = weights.reshape(-1) if isinstance(weights, np.ndarray) else tf.reshape(weights, [-1])
            if _leading_dim(weights) != size:
                raise InvalidDataError(
                    f"`{name}`: a batch has {size} inputs but sample_weight of shape "
                    f"{tuple(weights.shape)}. Give one weight per example."
                )
        if size == 0:
            continue
        empty = False
        yield Batch(inputs, targets, weights, size, name, index, offset)
        index, offset = index + 1, offset + size
    if empty:
        raise InvalidDataError(f"`{name}` is empty: iterating it yielded no examples.")


def dataset_size(dataset: tf.data.Dataset, process_batch_fn: ProcessBatchFn = default_process_batch) -> int:
    """Number of examples in a batched dataset (partial batches counted exactly)."""
    return sum(batch.size for batch in iterate_batches(dataset, process_batch_fn))


def to_batched_dataset(rows: Any, batch_sizes: Sequence[int]) -> tf.data.Dataset:
    """A dataset that yields `rows` (one per example, any nest of arrays) in `batch_sizes` chunks.

    The seed returns results as datasets aligned with the input batches; this builds them from
    arrays computed in one pass.
    """
    sizes = list(batch_sizes)
    if len(sizes) > 0 and all(s == sizes[0] for s in sizes[:-1]) and sizes[-1] <= sizes[0]:
        return tf.data.Dataset.from_tensor_slices(rows).batch(sizes[0])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chunks = [tf.nest.map_structure(lambda r, a=a, b=b: r[a:b], rows) for a, b in zip(offsets[:-1], offsets[1:])]
    dataset = tf.data.Dataset.from_tensors(chunks[0])
    for chunk in chunks[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(chunk))
    return dataset


def select_samples(
    dataset: tf.data.Dataset,
    indices: np.ndarray,
    process_batch_fn: ProcessBatchFn = default_process_batch,
) -> Any:
    """The model inputs of the examples at `indices` (any shape of ints), in one pass.

    Returns the inputs' nest with each leaf of shape `indices.shape + example_shape`.
    """
    indices = np.asarray(indices, dtype=np.int64)
    wanted = np.unique(indices)
    picked: dict[int, Any] = {}
    start = 0
    for batch in iterate_batches(dataset, process_batch_fn):
        stop = start + batch.size
        here = wanted[(wanted >= start) & (wanted < stop)]
        if here.size:
            rows = tf.nest.map_structure(lambda t, h=here - start: np.asarray(t)[h], batch.inputs)
            for j, i in enumerate(here):
                picked[int(i)] = tf.nest.map_structure(lambda r, j=j: r[j], rows)
        start = stop
        if len(picked) == wanted.size:
            break
    missing = [int(i) for i in wanted if int(i) not in picked]
    if missing:
        raise InvalidDataError(f"Indices {missing[:5]} are past the end of the dataset ({start} examples).")
    flat_rows = [picked[int(i)] for i in indices.reshape(-1)]
    stacked = tf.nest.map_structure(lambda *r: np.stack(r), *flat_rows)
    return tf.nest.map_structure(lambda a: a.reshape(indices.shape + a.shape[1:]), stacked)
