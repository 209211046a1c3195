"""Data handling: batching detection, array inputs, weights, multi-input models, helpers.

Oracle for the gradients: one `tf.GradientTape` per example on the whole Keras model
(`oracles.loop_gradients`). Gradients are float32 computed in a different order, so they are
compared with `GRAD_RTOL` relative to the largest entry.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients

from vestigia import FirstOrderInfluenceCalculator, InfluenceModel, InvalidDataError
from vestigia.curvature import ExactIHVP
from vestigia.data import (
    as_batched_dataset,
    dataset_size,
    is_batched,
    iterate_batches,
    select_samples,
    to_batched_dataset,
)

GRAD_RTOL = 1e-5  # float32 per-example gradients, summation order differs from the loop oracle


def _assert_grads_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert_close(actual, expected, GRAD_RTOL)


@pytest.fixture(scope="module")
def setup() -> dict:
    x, y = make_classification(n=23, d=5, classes=3, seed=3)
    model = make_mlp(d=5, hidden=6, classes=3, seed=3)
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    return {"x": x, "y": y, "model": model, "im": im, "expected": expected}


def _variants(x: np.ndarray, y: np.ndarray) -> dict[str, tf.data.Dataset]:
    base = tf.data.Dataset.from_tensor_slices((x, y))
    return {
        "batch": base.batch(5),  # 23 = 4 * 5 + 3: partial last batch
        "batch_drop_none": base.batch(23),
        "prefetch": base.batch(5).prefetch(2),
        "map": base.batch(5).map(lambda a, b: (a * 1.0, b)),
        "cache": base.batch(5).cache(),
        "filter_then_batch": base.filter(lambda a, b: True).batch(4),
        "unbatch_batch": base.batch(6).unbatch().batch(7),
        "from_tensors": tf.data.Dataset.from_tensors((x, y)),
    }


def test_batching_is_detected_for_every_pipeline(setup: dict) -> None:
    x, y = setup["x"], setup["y"]
    for name, ds in _variants(x, y).items():
        assert is_batched(ds), name
        assert dataset_size(ds) == 23, name
    base = tf.data.Dataset.from_tensor_slices((x, y))
    assert not is_batched(base)
    assert not is_batched(base.prefetch(1))
    assert not is_batched(tf.data.Dataset.from_tensor_slices((x, np.arange(23))))  # scalar labels
    assert tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(4).cardinality() < 0


def test_gradients_identical_for_every_pipeline(setup: dict) -> None:
    im, expected = setup["im"], setup["expected"]
    for name, ds in _variants(setup["x"], setup["y"]).items():
        grads = im.batch_jacobian(ds).numpy()
        assert grads.shape == expected.shape, name
        _assert_grads_close(grads, expected)


def test_numpy_tuples_are_batched(setup: dict) -> None:
    x, y, im = setup["x"], setup["y"], setup["im"]
    ds = as_batched_dataset((x, y), "train_set", batch_size=10)
    sizes = [b.size for b in iterate_batches(ds)]
    assert sizes == [10, 10, 3]
    _assert_grads_close(im.batch_jacobian(ds).numpy(), setup["expected"])
    # The calculators accept arrays wherever they accept datasets, with identical results.
    calc_arrays = FirstOrderInfluenceCalculator(im, (x, y), damping=0.1)
    calc_ds = FirstOrderInfluenceCalculator(im, batched(x, y, 4), damping=0.1)
    np.testing.assert_allclose(calc_arrays.self_influence((x, y)), calc_ds.self_influence(batched(x, y, 7)), rtol=1e-5)


def test_sample_weights_elements(setup: dict) -> None:
    x, y, model, im = setup["x"], setup["y"], setup["model"], setup["im"]
    w = np.random.default_rng(0).uniform(0.1, 3.0, len(x)).astype("float32")
    expected = loop_gradients(model, im.weights, logits_loss(), x, y, w)
    np.testing.assert_allclose(expected, setup["expected"] * w[:, None], rtol=1e-5, atol=1e-7)
    for ds in (tf.data.Dataset.from_tensor_slices((x, y, w)).batch(6), as_batched_dataset((x, y, w), "d", 4)):
        batches = list(iterate_batches(ds))
        assert all(b.weights is not None for b in batches)
        _assert_grads_close(im.batch_jacobian(ds).numpy(), expected)
    # A weight of None in an array tuple means "no weights".
    _assert_grads_close(im.batch_jacobian(as_batched_dataset((x, y, None), "d", 8)).numpy(), setup["expected"])


def _two_input_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(4, activation="tanh", name="dense_a")(a)
    joined = keras.layers.Concatenate(name="join")([h, b])
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(joined)
    out = keras.layers.Dense(3, name="out")(hidden)
    return keras.Model([a, b], out)


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize(("start", "last"), [("out", None), ("hidden", "out"), ("dense_a", "out")])
def test_multi_input_models(as_dict: bool, start: str, last: str | None) -> None:
    x, y = make_classification(n=11, d=5, classes=3, seed=7)
    xa, xb = x[:, :3], x[:, 3:]
    inputs = {"a": xa, "b": xb} if as_dict else (xa, xb)
    model = _two_input_model()
    im = InfluenceModel(model, start_layer=start, last_layer=last, loss_function=logits_loss())
    expected = loop_gradients(model, im.weights, logits_loss(), inputs, y)
    ds = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(4)
    _assert_grads_close(im.batch_jacobian(ds).numpy(), expected)
    # Arrays: ((xa, xb), y) or ({"a": .., "b": ..}, y) are batched too.
    _assert_grads_close(im.batch_jacobian(as_batched_dataset((inputs, y), "d", 5)).numpy(), expected)
    # select_samples returns the same nest of inputs.
    picked = select_samples(ds, np.array([[10, 0], [4, 4]]))
    leaves, want = tf.nest.flatten(picked), tf.nest.flatten(inputs)
    for leaf, full in zip(leaves, want):
        np.testing.assert_array_equal(leaf, full[np.array([[10, 0], [4, 4]])])


def test_unbatched_and_empty_datasets_raise_naming_the_argument(setup: dict) -> None:
    x, y, im = setup["x"], setup["y"], setup["im"]
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(InvalidDataError, match="`dataset` must be a batched"):
        FirstOrderInfluenceCalculator(im, unbatched)
    with pytest.raises(InvalidDataError, match="`train_dataset` must be a batched"):
        ExactIHVP(im, unbatched)
    empty = batched(x[:0], y[:0], 4)
    with pytest.raises(InvalidDataError, match="`train_dataset` is empty"):
        ExactIHVP(im, empty)
    calc = FirstOrderInfluenceCalculator(im, batched(x, y, 8), damping=0.1)
    with pytest.raises(InvalidDataError, match="`train_set` must be a batched"):
        calc.self_influence(unbatched)
    with pytest.raises(InvalidDataError, match="`train_set` is empty"):
        calc.self_influence(empty)
    with pytest.raises(InvalidDataError, match="`dataset_to_evaluate` is empty"):
        calc.influence_matrix(empty, batched(x, y))
    with pytest.raises(InvalidDataError, match="`train_set` is empty"):
        as_batched_dataset((x[:0], y[:0]), "train_set")


def test_mismatched_lengths_raise(setup: dict) -> None:
    x, y = setup["x"], setup["y"]
    with pytest.raises(InvalidDataError, match=r"`train_set` arrays .* Received lengths \[22, 23\]"):
        as_batched_dataset((x, y[:-1]), "train_set")
    with pytest.raises(InvalidDataError, match="sample_weight"):
        list(iterate_batches(tf.data.Dataset.from_tensors((x, y, np.ones(5, "float32")))))
    with pytest.raises(InvalidDataError, match="targets"):
        list(iterate_batches(tf.data.Dataset.from_tensors((x, y[:4]))))
    with pytest.raises(InvalidDataError, match="type int"):
        as_batched_dataset(3, "train_set")


def test_select_samples(setup: dict) -> None:
    x, y = setup["x"], setup["y"]
    ds = batched(x, y, 5)
    indices = np.array([[22, 0, 7], [7, 5, 4]])
    np.testing.assert_array_equal(select_samples(ds, indices), x[indices])
    np.testing.assert_array_equal(select_samples(ds, np.array([3])), x[[3]])
    with pytest.raises(InvalidDataError, match=r"\[23\]"):
        select_samples(ds, np.array([1, 23]))


@pytest.mark.parametrize("sizes", [[4, 4, 4, 3], [5], [2, 5, 1, 7], [3, 3, 6]])
def test_to_batched_dataset(sizes: list[int]) -> None:
    n = sum(sizes)
    rows = (np.arange(n * 2, dtype="float32").reshape(n, 2), np.arange(n))
    ds = to_batched_dataset(rows, sizes)
    got = list(ds.as_numpy_iterator())
    assert [len(b[1]) for b in got] == sizes
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), rows[0])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), rows[1])
