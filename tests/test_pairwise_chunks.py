"""The engine's pairing of test sides in chunks, and the K-FAC/EK-FAC training side.

The engine keeps the test sides in chunks of about `TEST_CHUNK_BYTES` (never one concatenated
tensor) and pairs each chunk with every training side. Oracles: the same computation with all
test examples in one batch and one chunk, and, for EK-FAC, dense per-example gradients
(`oracles.loop_gradients`, one tape per example) paired with the solver's `solve` (float64 NumPy
per layer, independent of the factored pairing).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import whole_models
from oracles import assert_close, loop_gradients

from vestigia import FirstOrderInfluenceCalculator, TracIn
from vestigia.curvature import EKFACIHVP
from vestigia.methods import engine
from vestigia.model.influence_model import BaseInfluenceModel

# Chunked and one-block scores are the same dot products summed by GEMMs of other shapes
# (float32, a few hundred terms of O(1)): round-off only.
CHUNK_RTOL = 1e-5
# Factored against dense: float32 rotations and gradient sums against a float64 solve.
DENSE_RTOL = 1e-4
# bfloat16 queries against float32: both GEMM inputs rounded to 8 significant bits (relative
# 2^-9 each), products summed in float32, each layer's scores rounded to bfloat16 again: a few
# 2^-9 of each layer's partial scores, which can exceed the total (cancellation across layers);
# bounded by 2^-6 of the largest |score| (measured: 2.8e-3), correlation above 0.9999.
BF16_ATOL_FRACTION = 2**-6
BF16_MIN_CORRELATION = 0.9999


def _loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def _batched(x: np.ndarray, y: np.ndarray, batch: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


@pytest.fixture(scope="module")
def setup() -> dict:
    """A small CNN (convs with many positions, a Dense head with one, BatchNorm weights on the
    diagonal) and its fitted EK-FAC."""
    model = whole_models.resnet()
    x, y = whole_models.images(30)
    test_x, test_y = whole_models.images(11, seed=3)
    im = BaseInfluenceModel(model, loss_function=_loss())
    train = _batched(x, y, 8)
    with pytest.warns(UserWarning, match="no Kronecker factor"):  # the BatchNorm weights
        solver = EKFACIHVP(im, train, fisher="empirical")
    return {"im": im, "solver": solver, "train": train, "xy": (x, y), "test_xy": (test_x, test_y)}


def _chunked(calculator: FirstOrderInfluenceCalculator | TracIn, test: tf.data.Dataset) -> int:
    """How many chunks the engine makes of the test sides."""
    sides, _ = calculator._test_sides(test)
    return len(sides[0])


def test_chunks_of_test_sides_equal_one_block(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calculator = FirstOrderInfluenceCalculator(setup["im"], setup["train"], ihvp_calculator=setup["solver"])
    test_x, test_y = setup["test_xy"]
    one_block = calculator.influence_matrix(_batched(test_x, test_y, 11), setup["train"])
    one_values, one_indices = calculator.top_k_indices(_batched(test_x, test_y, 11), setup["train"], k=3)
    row_bytes = 4 * sum(calculator._factored.widths)  # one test example's packed side, float32
    for chunk_rows in (1, 2, 5):  # one test batch per chunk, two per chunk, ...
        monkeypatch.setattr(engine, "TEST_CHUNK_BYTES", chunk_rows * 3 * row_bytes)
        test = _batched(test_x, test_y, 3)
        assert _chunked(calculator, test) == -(-4 // chunk_rows)  # 4 test batches
        assert_close(calculator.influence_matrix(test, setup["train"]), one_block, CHUNK_RTOL)
        values, indices = calculator.top_k_indices(test, setup["train"], k=3)
        np.testing.assert_array_equal(indices, one_indices)
        assert_close(values, one_values, CHUNK_RTOL)


def test_factored_full_rank_scores_equal_dense_gradients_through_the_solver(setup: dict) -> None:
    im, solver = setup["im"], setup["solver"]
    calculator = FirstOrderInfluenceCalculator(im, setup["train"], ihvp_calculator=solver)
    test_x, test_y = setup["test_xy"]
    train_grads = loop_gradients(im.model, im.weights, im.loss_function, *setup["xy"])
    test_grads = loop_gradients(im.model, im.weights, im.loss_function, test_x, test_y)
    dense = solver.solve(test_grads).numpy().astype(np.float64) @ train_grads.T
    assert_close(calculator.influence_matrix(_batched(test_x, test_y, 4), setup["train"]), dense, DENSE_RTOL)


@pytest.mark.parametrize("rank", [None, 2])
def test_factored_training_sides_from_a_store_equal_computed(setup: dict, tmp_path: Path, rank: int | None) -> None:
    """The training side (one tensor per layer) is packed into the array that `store=` caches; a new
    calculator reading every chunk back (low rank: it learns its layout from one probe batch) gives
    the same scores."""
    solver = setup["solver"]
    solver.query_rank = rank
    try:
        test = _batched(*setup["test_xy"], 4)
        plain = FirstOrderInfluenceCalculator(setup["im"], setup["train"], ihvp_calculator=solver)
        expected = plain.influence_matrix(test, setup["train"])
        stored = plain.influence_matrix(test, setup["train"], store=tmp_path / "s")
        np.testing.assert_array_equal(stored, expected)
        again = FirstOrderInfluenceCalculator(setup["im"], setup["train"], ihvp_calculator=solver)
        np.testing.assert_array_equal(again.influence_matrix(test, setup["train"], store=tmp_path / "s"), expected)
    finally:
        solver.query_rank = None


@pytest.mark.parametrize("rank", [None, 2])
def test_bfloat16_queries_are_held_in_bfloat16_and_close_to_float32(setup: dict, rank: int | None) -> None:
    im, solver = setup["im"], setup["solver"]
    test = _batched(*setup["test_xy"], 4)
    solver.query_rank = rank
    try:
        exact = FirstOrderInfluenceCalculator(im, setup["train"], ihvp_calculator=solver)
        expected = exact.influence_matrix(test, setup["train"])
        solver.query_dtype = "bfloat16"
        calculator = FirstOrderInfluenceCalculator(im, setup["train"], ihvp_calculator=solver)
        sides, _ = calculator._test_sides(test)
        assert {block.dtype for chunk in sides[0] for block in chunk} == {tf.bfloat16}
        scores = calculator.influence_matrix(test, setup["train"])
        values, indices = calculator.top_k_indices(test, setup["train"], k=3)
    finally:
        solver.query_rank, solver.query_dtype = None, "float32"
    assert not np.array_equal(scores, expected)  # the rounding is there, and bounded:
    assert np.abs(scores - expected).max() <= BF16_ATOL_FRACTION * np.abs(expected).max()
    assert np.corrcoef(scores.ravel(), expected.ravel())[0, 1] >= BF16_MIN_CORRELATION
    np.testing.assert_array_equal(values, np.take_along_axis(scores, indices, axis=1))


def test_components_in_chunks_equal_one_block(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """TracIn's several components (checkpoints), each chunked, summed per training batch."""
    im = setup["im"]
    tracin = TracIn([im, im], [0.1, 0.3])
    test_x, test_y = setup["test_xy"]
    one_block = tracin.influence_matrix(_batched(test_x, test_y, 11), setup["train"])
    monkeypatch.setattr(engine, "TEST_CHUNK_BYTES", 1)  # every test batch its own chunk
    test = _batched(test_x, test_y, 3)
    assert _chunked(tracin, test) == 4
    assert_close(tracin.influence_matrix(test, setup["train"]), one_block, CHUNK_RTOL)


def test_groups_of_queries_under_a_budget_equal_one_group(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`TEST_SIDE_BYTES` below the test sides: one pass over the training set per group of test
    batches, the same top-k (and the test examples' order) as one group."""
    calculator = FirstOrderInfluenceCalculator(setup["im"], setup["train"], ihvp_calculator=setup["solver"])
    test = _batched(*setup["test_xy"], 3)
    one_values, one_indices = calculator.top_k_indices(test, setup["train"], k=4)
    row_bytes = 4 * sum(calculator._factored.widths)
    monkeypatch.setattr(engine, "TEST_SIDE_BYTES", 2 * 3 * row_bytes)  # two test batches per group
    groups = [sizes for _, sizes in calculator._test_side_groups(test, engine.TEST_SIDE_BYTES)]
    assert groups == [[3, 3], [3, 2]]
    values, indices = calculator.top_k_indices(test, setup["train"], k=4)
    np.testing.assert_array_equal(indices, one_indices)
    assert_close(values, one_values, CHUNK_RTOL)


def test_default_query_budget_is_half_the_available_memory(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`TEST_SIDE_BYTES = None`: the budget is half of `available_memory()` (here capped by
    `VESTIGIA_MEMORY_LIMIT_BYTES`), so queries that would not fit are grouped, same answer."""
    calculator = FirstOrderInfluenceCalculator(setup["im"], setup["train"], ihvp_calculator=setup["solver"])
    test = _batched(*setup["test_xy"], 3)
    one_values, one_indices = calculator.top_k_indices(test, setup["train"], k=4)
    row_bytes = 4 * sum(calculator._factored.widths)
    monkeypatch.setenv("VESTIGIA_MEMORY_LIMIT_BYTES", str(2 * 2 * 3 * row_bytes))
    assert engine._test_side_budget() == 2 * 3 * row_bytes
    assert [sizes for _, sizes in calculator._test_side_groups(test, engine._test_side_budget())] == [[3, 3], [3, 2]]
    values, indices = calculator.top_k_indices(test, setup["train"], k=4)
    np.testing.assert_array_equal(indices, one_indices)
    assert_close(values, one_values, CHUNK_RTOL)
