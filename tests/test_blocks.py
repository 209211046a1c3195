"""Blocks of merged batches, the untuned reading of plain pipelines, and their memo.

Oracles: the user's own batches (sizes, order, contents) read directly from the dataset.
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
