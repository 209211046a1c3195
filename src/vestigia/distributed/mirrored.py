"""Several accelerators on one machine: factor statistics and featurisation under
`tf.distribute.MirroredStrategy`.

Each global batch is split across the replicas (replica `r` gets the `r`-th consecutive slice);
statistics are per-replica sums reduced with `ReduceOp.SUM` (float64), and features are gathered
from the replicas in replica order, which is the dataset order, then written chunk by chunk
into a store. With one visible device the same code runs on it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.store.chunked import StoredArray
from vestigia.store.progress import ProgressArg, chunk_progress


def default_strategy() -> tf.distribute.Strategy:
    """`MirroredStrategy` over the GPUs (or, without GPUs, the logical CPUs) when more than one
    is visible; else the default (single-device) strategy."""
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def _distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> Any:
    if strategy.num_replicas_in_sync == 1:
        return dataset
    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return strategy.experimental_distribute_dataset(dataset, options)


def mirrored_statistics(
    fn: Callable[..., dict[str, tf.Tensor]],
    dataset: tf.data.Dataset,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, np.ndarray]:
    """`sum over batches of fn(*batch)` with the batches split across the strategy's replicas.

    Args:
        fn: `(x, y) -> {name: partial sum}` (TensorFlow ops), e.g. `DenseKroneckerStatistics.sums`.
        dataset: a batched dataset of `(x, y)`; each global batch is split across replicas.
        strategy: default: `default_strategy()`.

    Returns:
        `{name: float64 array}`.
    """
    strategy = strategy or default_strategy()
    total: dict[str, np.ndarray] = {}
    with strategy.scope():
        for batch in _distribute(strategy, dataset):
            per_replica = strategy.run(fn, args=tuple(batch))
            for name, value in per_replica.items():
                reduced = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                summed = np.asarray(reduced.numpy(), dtype=np.float64)
                total[name] = summed if name not in total else total[name] + summed
    return total


def mirrored_featurise(
    fn: Callable[..., tf.Tensor],
    dataset: tf.data.Dataset,
    stored: StoredArray,
    strategy: tf.distribute.Strategy | None = None,
    progress: ProgressArg = False,
) -> list[int]:
    """Write `fn(*batch)` `(batch, dim)` for each missing chunk of `stored`, replicas in parallel.

    The dataset's batches must be the store's chunks (`batch size == stored.chunk_rows`).
    Chunks already present and verified are skipped.

    Returns:
        The chunk indices written.
    """
    strategy = strategy or default_strategy()
    missing = set(stored.missing_chunks())
    written = []
    with chunk_progress("featurising", len(missing), progress) as counter, strategy.scope():
        for index, batch in enumerate(_distribute(strategy, dataset)):
            if index not in missing:
                continue
            per_replica = strategy.run(fn, args=tuple(batch))
            parts = strategy.experimental_local_results(per_replica)
            stored.write_chunk(index, np.concatenate([np.asarray(p) for p in parts], axis=0))
            written.append(index)
            counter.advance()
    return written
