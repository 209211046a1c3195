"""Iterate plain in-memory pipelines without tf.data's autotuner.

Each iterator of an autotuned pipeline runs a model thread, and destroying the iterator waits
for it: about 10 ms per pass on 2 CPU cores, more than reading 20 in-memory batches. A pipeline
made only of steps that compute nothing (slices, batches, prefetch, zip, concatenate, take, ...)
has nothing to tune, so Vestigia reads such datasets, and builds its dataset views of results,
with `autotune.enabled = False`. Any other pipeline (a `.map`, an interleave, a generator), or
one whose autotune option the user set, is left exactly as it is.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

_PLAIN_STEPS = {
    "_TensorSliceDataset",
    "_TensorDataset",
    "_BatchDataset",
    "_UnbatchDataset",
    "_PrefetchDataset",
    "_ZipDataset",
    "_ConcatenateDataset",
    "_TakeDataset",
    "_SkipDataset",
    "_OptionsDataset",
    "RangeDataset",
    "_RangeDataset",
}
_ATTRIBUTE = "_vestigia_untuned"
_OFF = tf.data.Options()
_OFF.autotune.enabled = False


def is_plain(dataset: Any, depth: int = 0) -> bool:
    """True if every step of the pipeline is one of `_PLAIN_STEPS` (Python-side graph, no data read)."""
    if type(dataset).__name__ not in _PLAIN_STEPS or depth > 64:
        return False
    try:
        inputs = dataset._inputs()
    except Exception:  # noqa: BLE001 - a private API: without it, leave the dataset as it is
        return False
    return all(is_plain(i, depth + 1) for i in inputs)


def _options(dataset: tf.data.Dataset) -> tf.data.Options:
    """The dataset's options as Python keeps them (no op run), else as TensorFlow reports them."""
    options = getattr(dataset, "_options_attr", None)
    return options if isinstance(options, tf.data.Options) else dataset.options()


def untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with autotuning off if its pipeline is plain and the user left autotune unset,
    else `dataset` itself. Made once per dataset object (kept on it), so that checks made once
    per dataset object (`vestigia.data.checks`) stay once."""
    cached = getattr(dataset, _ATTRIBUTE, None)
    if cached is not None:
        return cached
    result = dataset
    if is_plain(dataset) and _options(dataset).autotune.enabled is None:
        result = dataset.with_options(_OFF)
    try:
        object.__setattr__(dataset, _ATTRIBUTE, result)
    except AttributeError:
        pass
    return result


def untuned_view(view: tf.data.Dataset, *sources: tf.data.Dataset) -> tf.data.Dataset:
    """A dataset view of results built from the user's datasets `sources` (and arrays), untuned
    when it is plain and every source is read untuned, without asking TensorFlow for options."""
    if is_plain(view) and all(untuned(source) is not source for source in sources):
        return view.with_options(_OFF)
    return view
