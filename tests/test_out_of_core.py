"""Out-of-core scoring and the block top-k against a dense NumPy oracle (full matrix, argsort)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from vestigia.errors import InvalidDataError
from vestigia.results.block_topk import BlockTopK
from vestigia.results.out_of_core import score_out_of_core
from vestigia.store import ChunkedStore, Fingerprint

FP = Fingerprint(settings='{"features":"test"}')


def _oracle(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    high = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    low = np.argsort(scores, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return take(scores, high, axis=1), high, take(scores, low, axis=1), low


@pytest.mark.parametrize("threads", [1, 2])
def test_block_topk_in_any_block_order_and_merged_equals_a_full_sort(threads: int) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(37, 1000)).astype("float32")
    k = 15
    expected = _oracle(scores, k)
    bounds = [0, 7, 100, 350, 351, 700, 1000]  # first block narrower than k; a block of one column
    blocks = list(zip(bounds[:-1], bounds[1:]))
    streamed = BlockTopK(37, k, threads)
    for a, b in [blocks[i] for i in rng.permutation(len(blocks))]:
        streamed.add(scores[:, a:b], offset=a)
    left, right = BlockTopK(37, k, threads), BlockTopK(37, k, threads)
    for a, b in blocks[:3]:
        left.add(scores[:, a:b], offset=a)
    for a, b in blocks[3:]:
        right.add(scores[:, a:b], offset=a)
    left.merge(BlockTopK.from_state(right.state()))
    for topk in (streamed, left):
        for got, want in zip(topk.result(), expected):
            np.testing.assert_array_equal(got, want)
        topk.close()
    right.close()


def test_block_topk_with_fewer_columns_than_k_returns_what_it_saw() -> None:
    scores = np.array([[3.0, 1.0, 2.0]], dtype="float32")
    topk = BlockTopK(1, 5, threads=1)
    topk.add(scores, offset=0)
    high_values, high_indices, low_values, low_indices = topk.result()
    np.testing.assert_array_equal(high_indices, [[0, 2, 1]])
    np.testing.assert_array_equal(low_values, [[1.0, 2.0, 3.0]])


def _feature_store(path: Path, n: int, dim: int, chunk_rows: int, seed: int = 0) -> tuple[ChunkedStore, np.ndarray]:
    features = np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")
    store = ChunkedStore(path, FP)
    stored = store.array("features", features.shape, chunk_rows)
    stored.fill(lambda i: features[stored.rows(i)])
    return store, features


def test_out_of_core_scores_equal_the_dense_oracle(tmp_path: Path) -> None:
    store, features = _feature_store(tmp_path / "s", 1003, 16, 64)
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(29, 16)).astype("float32")
    side = rng.normal(size=features.shape).astype("float32")
    store.array("query_side", side.shape, 64).fill(lambda i: side[i * 64 : (i + 1) * 64])
    result = score_out_of_core(queries, store, k=10, self_side="query_side", group_chunks=3)
    scores = queries.astype(np.float64) @ features.T.astype(np.float64)
    values_high, high, values_low, low = _oracle(scores, 10)
    np.testing.assert_array_equal(result.proponent_indices, high)
    np.testing.assert_array_equal(result.opponent_indices, low)
    # float32 GEMM against a float64 oracle: |error| <= 16 * eps32 * sum|q||f| ~ 1e-5 here
    np.testing.assert_allclose(result.proponent_values, values_high, rtol=0, atol=2e-5)
    np.testing.assert_allclose(result.opponent_values, values_low, rtol=0, atol=2e-5)
    assert result.self_influence is not None
    np.testing.assert_allclose(result.self_influence, np.einsum("ij,ij->i", side, features), rtol=1e-5, atol=1e-5)


def test_out_of_core_resumes_after_kill_9_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    store, features = _feature_store(tmp_path / "s", 4000, 32, 50)
    queries = np.random.default_rng(2).normal(size=(40, 32)).astype("float32")
    uninterrupted = score_out_of_core(queries, ChunkedStore(tmp_path / "s", FP), k=7, group_chunks=4)
    other, _ = _feature_store(tmp_path / "t", 4000, 32, 50)
    pid = os.fork()
    if pid == 0:  # the child scores (NumPy and zarr only); it is killed mid-way
        try:
            score_out_of_core(queries, other, k=7, group_chunks=4)
        finally:
            os._exit(0)
    manifest = tmp_path / "t" / "manifest.json"
    deadline = time.monotonic() + 60
    while manifest.read_text().count("/seen") < 2 and time.monotonic() < deadline:
        time.sleep(0.005)  # kill once two score blocks are saved, somewhere inside the third
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    resumed_store = ChunkedStore(tmp_path / "t", FP)
    saved = [n for n in resumed_store.manifest()["arrays"] if n.endswith("/seen")]
    resumed = score_out_of_core(queries, resumed_store, k=7, group_chunks=4)
    for name in ("proponent_values", "proponent_indices", "opponent_values", "opponent_indices", "self_influence"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(uninterrupted, name), err_msg=name)
    assert 2 <= len(saved) < 20  # it was killed after two score blocks and before the end


def test_out_of_core_refuses_queries_of_the_wrong_width(tmp_path: Path) -> None:
    store, _ = _feature_store(tmp_path / "s", 100, 8, 10)
    with pytest.raises(InvalidDataError, match=r"queries.*Received: queries of shape \(3, 5\)"):
        score_out_of_core(np.zeros((3, 5)), store, k=2)
    with pytest.raises(InvalidDataError, match="k=101"):
        score_out_of_core(np.zeros((3, 8)), store, k=101)
