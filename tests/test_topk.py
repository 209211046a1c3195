"""StreamingTopK against a full stable sort of the whole score matrix."""

from __future__ import annotations

import numpy as np
import pytest

from vestigia.results import ORDER, StreamingTopK, TopK, top_k_of_scores


def _reference(scores: np.ndarray, k: int, order: ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Full stable sort: best first, ties broken by the lower column index."""
    keys = -scores if order is ORDER.DESCENDING else scores
    indices = np.argsort(keys, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, indices, axis=1), indices


def _stream(scores: np.ndarray, k: int, order: ORDER, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stream = StreamingTopK(scores.shape[0], k, order)
    for block in np.split(scores, cuts, axis=1):
        if block.shape[1]:
            stream.add(block)
    assert stream.seen == scores.shape[1]
    return stream.result()


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
@pytest.mark.parametrize("ties", [False, True])
def test_streaming_matches_full_sort_for_random_blocks(order: ORDER, ties: bool) -> None:
    rng = np.random.default_rng(1)
    n_rows, n_cols = 6, 83
    for trial in range(20):
        if ties:  # few distinct values: many ties, also across block boundaries
            scores = rng.integers(-3, 4, (n_rows, n_cols)).astype(np.float64)
        else:
            scores = rng.normal(size=(n_rows, n_cols))
        k = int(rng.integers(1, n_cols + 1)) if trial % 4 else 1
        cuts = np.sort(rng.choice(np.arange(1, n_cols), size=int(rng.integers(0, 12)), replace=False))
        values, indices = _stream(scores, k, order, cuts)
        want_values, want_indices = _reference(scores, k, order)
        # Indices must agree exactly (ties: the lower training index first).
        np.testing.assert_array_equal(indices, want_indices, err_msg=f"trial {trial}, k={k}, cuts={cuts}")
        # Values are returned as float32: compare at float32 resolution.
        np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-6)


def test_all_equal_scores_keep_the_first_indices() -> None:
    scores = np.zeros((2, 30))
    for order in ORDER:
        values, indices = _stream(scores, 4, order, np.array([7, 8, 20]))
        np.testing.assert_array_equal(indices, np.tile(np.arange(4), (2, 1)))
        np.testing.assert_array_equal(values, 0.0)


def test_top_k_of_scores_and_topk_tuple() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3, 40))
    values, indices = top_k_of_scores(scores, 5, ORDER.ASCENDING)
    want_values, want_indices = _reference(scores, 5, ORDER.ASCENDING)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(values, want_values, rtol=1e-6)
    assert values.dtype == np.float32

    row_values, row_indices = values[0], indices[0]
    result = TopK("samples", row_values, row_indices)
    samples, vals = result  # unpacks as the seed's (samples, values)
    assert samples == "samples" and result.indices is row_indices and vals is row_values


def test_order_must_be_an_enum() -> None:
    with pytest.raises(TypeError, match="order"):
        StreamingTopK(1, 3, "descending")  # type: ignore[arg-type]
