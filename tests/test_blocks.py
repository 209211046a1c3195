"""Blocks of merged batches, the untuned reading of plain pipelines, their memo, and sliced arrays
cut in NumPy.

Oracles: the user's own batches (sizes, order, contents) read directly from the dataset (its
tf.data iterator).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close

from vestigia import InfluenceModel, TracIn
from vestigia.data.blocks import coalesce, parts_of
from vestigia.data.dataset import iterate_batches
from vestigia.data.memo import memo_batches
from vestigia.data.sliced import sliced_batches
from vestigia.data.untuned import is_plain, untuned


def test_coalesce_keeps_order_sizes_and_parts() -> None:
    x, y = make_classification(n=23, seed=1)
    batches = list(iterate_batches(batched(x, y, 5)))
    blocks = list(coalesce(iter(batches), 11))
    assert [b.size for b in blocks] == [10, 10, 3]
    assert [[p.size for p in parts_of(b)] for b in blocks] == [[5, 5], [5, 5], [3]]
    np.testing.assert_array_equal(np.concatenate([np.asarray(b.inputs) for b in blocks]), x)
    assert [b.offset for b in blocks] == [0, 10, 20] and [b.batch_index for b in blocks] == [0, 2, 4]
    assert list(coalesce(iter(batches), None)) == batches


def test_batches_that_cannot_be_concatenated_stay_as_they_are() -> None:
    """Sample weights on some batches only: nothing is merged."""
    x, y = make_classification(n=8, seed=2)
    weighted = list(iterate_batches(tf.data.Dataset.from_tensor_slices((x[:4], y[:4], np.ones(4))).batch(4)))
    plain = list(iterate_batches(batched(x[4:], y[4:], 4)))
    assert [b.size for b in coalesce(iter(weighted + plain), 100)] == [4, 4]


def test_plain_pipelines_only_are_untuned_and_memoised() -> None:
    x, y = make_classification(n=12, seed=3)
    plain = batched(x, y, 4).prefetch(2)
    mapped = batched(x, y, 4).map(lambda a, b: (a * 2.0, b))
    assert is_plain(plain) and not is_plain(mapped)
    assert untuned(plain).options().autotune.enabled is False and untuned(plain) is untuned(plain)
    assert untuned(mapped) is mapped
    options = tf.data.Options()
    options.autotune.enabled = True
    chosen = batched(x, y, 4).with_options(options)  # the user's own setting is kept
    assert is_plain(chosen) and untuned(chosen) is chosen
    reads = []

    def read(dataset: tf.data.Dataset):  # type: ignore[no-untyped-def]
        reads.append(1)
        return iterate_batches(dataset)

    for dataset, expected_reads in ((plain, 1), (mapped, 2)):
        reads.clear()
        for _ in range(2):
            blocks = list(memo_batches(dataset, "key", "dataset", lambda d=dataset: read(d)))
            assert sum(b.size for b in blocks) == 12
        assert len(reads) == expected_reads


def test_results_equal_with_and_without_blocks() -> None:
    """The same TracIn values from a memoised plain dataset and from a mapped one (read each time)."""
    x, y = make_classification(n=30, seed=4)
    im = InfluenceModel(make_mlp(seed=4), start_layer=-1, loss_function=logits_loss())
    tracin = TracIn([im], [0.3])
    plain, mapped = batched(x, y, 7), batched(x, y, 7).map(lambda a, b: (a, b))
    for _ in range(2):
        assert_close(tracin.self_influence(plain), tracin.self_influence(mapped), 1e-6)
        assert_close(tracin.influence_matrix(plain, plain), tracin.influence_matrix(mapped, mapped), 1e-6)


def _elements(dataset: tf.data.Dataset) -> list:
    return [tf.nest.map_structure(np.asarray, e) for e in dataset]


def test_sliced_arrays_are_cut_as_tf_data_yields_them() -> None:
    """Tuples, dicts, weights, int labels, partial or dropped last batch, prefetch and options:
    the same structure, dtypes and values as the tf.data iterator, with NumPy leaves."""
    x, y = make_classification(n=23, seed=5)
    labels, w = np.argmax(y, axis=1).astype(np.int32), np.linspace(0.5, 1.5, 23).astype(np.float32)
    options = tf.data.Options()
    options.autotune.enabled = False
    pipelines = [
        batched(x, y, 5),
        tf.data.Dataset.from_tensor_slices((x, labels, w)).batch(4, drop_remainder=True).prefetch(2),
        tf.data.Dataset.from_tensor_slices(({"b": x, "a": x[:, :2]}, y)).batch(23).with_options(options),
        untuned(batched(x, y, 30)),
    ]
    for dataset in pipelines:
        sliced = sliced_batches(dataset)
        assert sliced is not None
        got, expected = list(sliced), _elements(dataset)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            tf.nest.assert_same_structure(a, b)
            for leaf, reference in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
                assert isinstance(leaf, np.ndarray) and leaf.dtype == reference.dtype
                np.testing.assert_array_equal(leaf, reference)


def test_other_pipelines_are_left_to_tf_data() -> None:
    x, y = make_classification(n=12, seed=6)
    others = [
        batched(x, y, 4).map(lambda a, b: (a * 2.0, b)),
        batched(x, y, 4).take(2),
        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(12, seed=0).batch(4),
        tf.data.Dataset.from_tensor_slices((x, np.array([b"s"] * 12))).batch(4),
        tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1.0], [2.0, 3.0]])).batch(2),
        tf.data.Dataset.from_tensors((x, y)),
    ]
    assert all(sliced_batches(d) is None for d in others)


def test_a_users_batch_function_gets_tensors_from_sliced_arrays() -> None:
    x, y = make_classification(n=10, seed=7)
    seen = []

    def process(element):  # type: ignore[no-untyped-def]
        seen.append(all(isinstance(t, tf.Tensor) for t in element))
        return element[0], element[1], None

    batches = list(iterate_batches(batched(x, y, 4), process))
    assert seen == [True] * 3 and [b.size for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([np.asarray(b.inputs) for b in batches]), x)
