"""Ray tasks against the in-process path and closed forms, on a real local 2-worker cluster,
including kill -9 of a worker in the middle of a task.

Run with `pytest -m ray tests/test_distributed_ray.py` (deselected by default).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import logits_loss, make_classification, make_mlp

from vestigia.distributed import (
    DenseKroneckerStatistics,
    featurise_to_store,
    ray_cluster,
    reduce_statistics,
    score_on_ray,
)
from vestigia.results.out_of_core import score_out_of_core
from vestigia.store import ChunkedStore, Fingerprint

pytestmark = pytest.mark.ray

FP = Fingerprint(settings='{"test":"ray"}')


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    with ray_cluster(num_cpus=2, object_store_memory=128 * 2**20) as ray:
        yield ray
    assert not ray.is_initialized()


def _slow_features(rows: slice) -> np.ndarray:
    """Seeded features of rows `rows` (each row from its own index), slowly: 0.2 s per chunk."""
    time.sleep(0.2)
    return np.stack([np.random.default_rng(i).normal(size=24) for i in range(rows.start, rows.stop)]).astype("f4")


def _kill_first_worker_running(task: str, when: Any, killed: list[int]) -> threading.Thread:
    """A thread that waits for `when()` and then SIGKILLs a Ray worker whose title shows `task`."""

    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if when():
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if any(task in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kronecker_statistics_on_ray_equal_the_in_process_sum_and_the_closed_form(cluster: Any) -> None:
    x, y = make_classification(n=96, d=5, classes=3)
    model = make_mlp(d=5, hidden=8, classes=3)
    stats = DenseKroneckerStatistics(model, -1, logits_loss())
    shards = [(x[i : i + 24], y[i : i + 24]) for i in range(0, 96, 24)]
    on_ray = reduce_statistics(shards, stats)
    local = reduce_statistics(shards, stats, local=True)
    for name in ("A", "G", "count"):
        np.testing.assert_array_equal(on_ray[name], local[name])  # same shards, same order: bitwise
    # closed form: a = [tanh(x W1 + b1), 1], d = softmax(z) - y for softmax cross-entropy on logits
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in model.get_weights())
    a = np.tanh(x @ w1 + b1)
    z = a @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    d = p / p.sum(axis=1, keepdims=True) - y
    a1 = np.concatenate([a, np.ones((96, 1))], axis=1)
    # float32 forward pass in the workers against a float64 oracle: relative error ~1e-6
    np.testing.assert_allclose(on_ray["A"], a1.T @ a1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on_ray["G"], d.T @ d, rtol=1e-5, atol=1e-5)
    assert on_ray["count"][0] == 96


def test_featurisation_survives_kill_9_of_a_worker_mid_task(cluster: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    chunk_dir = tmp_path / "s" / "f" / "c"
    killed: list[int] = []
    killer = _kill_first_worker_running(
        "_featurise_task", lambda: chunk_dir.exists() and len(list(chunk_dir.iterdir())) >= 2, killed
    )
    written = featurise_to_store(_slow_features, path, FP, "f", (400, 24), 20, chunks_per_task=5)
    killer.join()
    assert len(killed) == 1  # a worker died in the middle of a task; the call still succeeded: Ray retried it
    stored = ChunkedStore(path, FP).array("f")
    assert stored.missing_chunks() == []  # nothing lost
    assert sorted(set(written)) == sorted(written)  # no chunk written twice (a retry skips finished chunks)
    reference = np.stack([np.random.default_rng(i).normal(size=24) for i in range(400)]).astype("f4")
    np.testing.assert_array_equal(stored.read(), reference)
    assert [p.name for p in (tmp_path / "s").rglob("*.partial")] == []


def test_scoring_on_ray_with_a_killed_worker_equals_the_single_process_path(cluster: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(6000, 32)).astype("float32")
    queries = rng.normal(size=(50, 32)).astype("float32")
    single = ChunkedStore(tmp_path / "single", FP)
    single.array("features", features.shape, 100).fill(lambda i: features[i * 100 : (i + 1) * 100])
    reference = score_out_of_core(queries, single, k=9, group_chunks=6)
    distributed = ChunkedStore(tmp_path / "ray", FP)
    distributed.array("features", features.shape, 100).fill(lambda i: features[i * 100 : (i + 1) * 100])
    killed: list[int] = []
    self_dir = tmp_path / "ray" / "self_influence" / "c"
    killer = _kill_first_worker_running(
        "_score_task", lambda: self_dir.exists() and len(list(self_dir.iterdir())) >= 3, killed
    )
    result = score_on_ray(queries, str(tmp_path / "ray"), FP, k=9, group_chunks=6, query_block=30)
    killer.join()
    assert len(killed) == 1
    np.testing.assert_array_equal(result.proponent_indices, reference.proponent_indices)
    np.testing.assert_array_equal(result.opponent_indices, reference.opponent_indices)
    # the same float32 products per chunk: equal to rounding (atol: 8 ulp at |score| ~ 30)
    np.testing.assert_allclose(result.proponent_values, reference.proponent_values, rtol=0, atol=3e-5)
    np.testing.assert_allclose(result.opponent_values, reference.opponent_values, rtol=0, atol=3e-5)
    np.testing.assert_allclose(result.self_influence, reference.self_influence, rtol=1e-6)
    groups = [n for n in distributed.manifest()["arrays"] if n.endswith("/seen")]
    assert len(groups) == 20  # one partial top-k per (query block, group): none lost or duplicated
