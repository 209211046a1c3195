"""Ray tasks for the three parallel parts of attribution: factor statistics, featurisation into a
store, and block scoring with a top-k merge.

- `reduce_statistics(shards, fn)`: `fn(shard) -> {name: partial sum}` runs as one task per
  shard; the partial sums (float64) are added in shard order, so the result is bitwise the
  in-process `reduce_statistics(..., address=None, local=True)` on the same shards.
- `featurise_to_store(fn, store_path, fingerprint, name, shape, chunk_rows)`: one task per group
  of missing chunks; each task writes its chunks atomically into the store (`fn(rows) -> array`).
  A killed worker's task is retried by Ray; chunks it had written are verified and skipped,
  so nothing is lost or written twice.
- `score_on_ray(queries, store_path, fingerprint, k)`: one task per group of training chunks;
  each saves its partial top-k in the store (resume skips finished groups) and writes
  self-influence chunks; the driver merges the partial top-k exactly.

Every function takes `address` (None: a local cluster; else join it) and `local=True` to run
the same tasks in this process without Ray (the reference path of the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vestigia.distributed.cluster import ray_cluster
from vestigia.errors import check_positive_int
from vestigia.results.out_of_core import (
    ScoreResult,
    check_scoring_inputs,
    groups_of,
    load_group,
    merge_states,
    query_key,
    save_group,
    score_group,
)
from vestigia.store.chunked import ChunkedStore
from vestigia.store.fingerprint import Fingerprint
from vestigia.store.progress import ProgressArg, chunk_progress

Statistics = dict[str, np.ndarray]


def _as_float64(partial: Statistics) -> Statistics:
    return {name: np.asarray(value, dtype=np.float64) for name, value in partial.items()}


def _run(
    tasks: list[tuple[Callable[..., Any], tuple[Any, ...]]],
    local: bool,
    address: str | None,
    num_cpus: int | None,
    max_retries: int,
    progress: ProgressArg,
    stage: str,
) -> list[Any]:
    """Run `fn(*args)` for each task, in this process or as Ray tasks; results in task order."""
    with chunk_progress(stage, len(tasks), progress) as counter:
        if local:
            results = []
            for fn, args in tasks:
                results.append(fn(*args))
                counter.advance()
            return results
        with ray_cluster(address, num_cpus=num_cpus) as ray:
            remote: dict[Any, Any] = {}
            shared: dict[int, Any] = {}  # large arrays go to the object store once, not once per task
            refs = []
            for fn, args in tasks:
                if fn not in remote:
                    remote[fn] = ray.remote(max_retries=max_retries, retry_exceptions=False)(fn)
                args = tuple(
                    shared.setdefault(id(a), ray.put(a)) if isinstance(a, np.ndarray) and a.nbytes > 2**20 else a
                    for a in args
                )
                refs.append(remote[fn].remote(*args))
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                counter.advance(len(ready))
            return list(ray.get(refs))


def reduce_statistics(
    shards: Sequence[Any],
    fn: Callable[[Any], Statistics],
    address: str | None = None,
    local: bool = False,
    num_cpus: int | None = None,
    max_retries: int = 3,
    progress: ProgressArg = False,
) -> Statistics:
    """`sum over shards of fn(shard)`, one task per shard, reduced in shard order in float64.

    Args:
        shards: the data shards (anything `fn` accepts and Ray can pickle).
        fn: `shard -> {name: partial sum}` with the same names and shapes for every shard.
        address: Ray address to join; None starts a local cluster.
        local: run in this process without Ray.
        num_cpus: CPUs of a local cluster.
        max_retries: Ray retries of a task whose worker died.
        progress: True / a stream to show progress.

    Returns:
        `{name: float64 sum}`.
    """
    partials = _run(
        [(_statistics_task, (fn, s)) for s in shards],
        local,
        address,
        num_cpus,
        max_retries,
        progress,
        "factor statistics",
    )
    total: Statistics = {}
    for partial in partials:
        for name, value in partial.items():
            total[name] = value.copy() if name not in total else total[name] + value
    return total


def _statistics_task(fn: Callable[[Any], Statistics], shard: Any) -> Statistics:
    return _as_float64(fn(shard))


def _featurise_task(
    fn: Callable[[slice], np.ndarray], path: str, fingerprint: dict[str, Any], name: str, chunks: list[int]
) -> list[int]:
    stored = ChunkedStore(path, Fingerprint.from_dict(fingerprint), mode="r+").array(name)
    written = []
    for index in chunks:
        if not stored.has_chunk(index):  # a retried task skips what its killed attempt finished
            stored.write_chunk(index, fn(stored.rows(index)))
            written.append(index)
    return written


def featurise_to_store(
    fn: Callable[[slice], np.ndarray],
    store_path: str,
    fingerprint: Fingerprint,
    name: str,
    shape: tuple[int, ...],
    chunk_rows: int,
    dtype: Any = "float32",
    chunks_per_task: int = 4,
    address: str | None = None,
    local: bool = False,
    num_cpus: int | None = None,
    max_retries: int = 3,
    progress: ProgressArg = False,
) -> list[int]:
    """Compute the missing chunks of store array `name` with `fn(rows) -> (len(rows), ...)`.

    Returns:
        The chunk indices computed by this call (chunks already present are skipped).
    """
    store = ChunkedStore(store_path, fingerprint)
    stored = store.array(name, shape, chunk_rows, dtype)
    missing = stored.missing_chunks()
    groups = [missing[i : i + chunks_per_task] for i in range(0, len(missing), chunks_per_task)]
    tasks = [(_featurise_task, (fn, str(store_path), fingerprint.to_dict(), name, g)) for g in groups]
    done = _run(tasks, local, address, num_cpus, max_retries, progress, f"featurising {name}")
    return sorted(i for written in done for i in written)


def _score_task(
    queries: np.ndarray,
    path: str,
    fingerprint: dict[str, Any],
    train: str,
    k: int,
    chunks: range,
    group: int,
    prefix: str,
    self_influence: bool,
    self_side: str | None,
) -> int:
    store = ChunkedStore(path, Fingerprint.from_dict(fingerprint), mode="r+")
    features = store.array(train)
    self_out = store.array("self_influence") if self_influence else None
    side = store.array(self_side) if self_side is not None else None
    state = score_group(queries, features, chunks, k, side, self_out, threads=1)
    save_group(store, prefix, group, state)
    return group


def score_on_ray(
    queries: np.ndarray,
    store_path: str,
    fingerprint: Fingerprint,
    train: str = "features",
    k: int = 100,
    self_influence: bool = True,
    self_side: str | None = None,
    group_chunks: int = 8,
    query_block: int | None = None,
    address: str | None = None,
    local: bool = False,
    num_cpus: int | None = None,
    max_retries: int = 3,
    progress: ProgressArg = False,
) -> ScoreResult:
    """`score_out_of_core` as Ray tasks over (query block x group of training chunks) tiles,
    with an exact top-k merge.

    Each task saves its tile's partial top-k in the store (under `scores/<query block hash>/partial/`),
    so a rerun skips finished tiles; the driver merges the partial states of each query block.
    `query_block` bounds a task's score block to `query_block x chunk_rows` (default: all queries).
    """
    store = ChunkedStore(store_path, fingerprint)
    features = store.array(train)
    queries = check_scoring_inputs(queries, features, k)
    block = queries.shape[0] if query_block is None else check_positive_int("query_block", query_block)
    query_blocks = [queries[a : a + block] for a in range(0, queries.shape[0], block)]
    prefixes = [query_key(q, k) + "/partial" for q in query_blocks]
    self_out = (
        store.array("self_influence", (features.shape[0],), features.chunk_rows, "float32") if self_influence else None
    )
    groups = groups_of(features.n_chunks, group_chunks)
    missing_self = set(self_out.missing_chunks()) if self_out is not None else set()
    args = (str(store_path), fingerprint.to_dict(), train, k)
    tasks = []
    for q, prefix in zip(query_blocks, prefixes):
        for g, chunks in enumerate(groups):
            # self-influence is written by the first query block's tasks only
            writes_self = self_influence and q is query_blocks[0]
            if load_group(store, prefix, g) is None or (writes_self and missing_self & set(chunks)):
                tasks.append((_score_task, (q, *args, chunks, g, prefix, writes_self, self_side)))
    _run(tasks, local, address, num_cpus, max_retries, progress, "scoring")
    parts = []
    for q, prefix in zip(query_blocks, prefixes):
        states = [load_group(store, prefix, g) for g in range(len(groups))]
        parts.append(merge_states([s for s in states if s is not None], q.shape[0], k).result())
    high_values, high_indices, low_values, low_indices = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return ScoreResult(
        high_values, high_indices, low_values, low_indices, self_out.read() if self_out is not None else None
    )
