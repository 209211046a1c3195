"""Data: batched datasets in, (inputs, targets, sample weights) batches out."""

from vestigia.data.dataset import (
    Batch,
    as_batched_dataset,
    dataset_size,
    default_process_batch,
    is_batched,
    iterate_batches,
    select_samples,
    to_batched_dataset,
)

__all__ = [
    "Batch",
    "as_batched_dataset",
    "dataset_size",
    "default_process_batch",
    "is_batched",
    "iterate_batches",
    "select_samples",
    "to_batched_dataset",
]
