"""Out-of-core scoring: top-k proponents and opponents per query, and self-influence, over
training features streamed from a `ChunkedStore`, with memory bounded by a chunk and `k`.

`value(z_test, z_i) = <psi(z_test), phi(z_i)>` for query vectors `psi` `(n_test, dim)` (e.g.
preconditioned query gradients) and training features `phi` `(n_train, dim)` read chunk by chunk;
self-influence is `<psi(z_i), phi(z_i)>` from a second training array, or `||phi(z_i)||^2`
when the pairing is symmetric (features already whitened by the curvature's square root).

Training chunks are processed in *groups*; the running top-k after each group is a score block
saved in the store, so a killed run resumes after the last saved group. On Ray
(`vestigia.distributed`) each group is a task with its own partial top-k, merged exactly.
Peak memory is about one score block `n_test x chunk_rows` in float32 (and its two boolean
filter masks), one feature chunk, the queries, and `4 * n_test * k` kept values and indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np

from vestigia.errors import InvalidDataError, check_positive_int
from vestigia.results.block_topk import BlockTopK
from vestigia.store.chunked import ChunkedStore, StoredArray
from vestigia.store.progress import ProgressArg, chunk_progress

STATE_NAMES = ("high_values", "high_indices", "low_values", "low_indices", "seen")


@dataclasses.dataclass
class ScoreResult:
    """Top-k proponents `(n_test, k)` (largest values first), opponents (smallest first), their
    training indices, and self-influence `(n_train,)` (None if not asked for)."""

    proponent_values: np.ndarray
    proponent_indices: np.ndarray
    opponent_values: np.ndarray
    opponent_indices: np.ndarray
    self_influence: np.ndarray | None


def query_key(queries: np.ndarray, k: int) -> str:
    """Store prefix for the score blocks of these queries and `k` (a content hash)."""
    digest = hashlib.blake2b(np.ascontiguousarray(queries).tobytes(), digest_size=8)
    digest.update(repr((queries.shape, queries.dtype.str, k)).encode())
    return f"scores/{digest.hexdigest()}_k{k}"


def groups_of(n_chunks: int, group_chunks: int) -> list[range]:
    """Consecutive ranges of `group_chunks` chunk indices covering `range(n_chunks)`."""
    return [range(g, min(g + group_chunks, n_chunks)) for g in range(0, n_chunks, group_chunks)]


def score_group(
    queries: np.ndarray,
    train: StoredArray,
    chunks: range,
    k: int,
    self_side: StoredArray | None = None,
    self_out: StoredArray | None = None,
    threads: int = 2,
    on_chunk: Callable[[int], None] | None = None,
    start: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Top-k state of `queries @ train[chunks]^T`, writing self-influence chunks on the way.

    Args:
        queries: `(n_test, dim)` float32 query vectors.
        train: training features `(n_train, dim)`, row-chunked.
        chunks: which training chunks to score.
        k: how many proponents and opponents to keep per query.
        self_side: query-side vectors of the training examples (same chunking) for
            self-influence `<psi(z_i), phi(z_i)>`; None: `||phi(z_i)||^2`.
        self_out: where to write self-influence (chunked like `train`), or None.
        threads: threads for filtering score blocks.
        on_chunk: called with each finished chunk index.
        start: a state to continue from (its thresholds make the first block cheap).

    Returns:
        The `BlockTopK.state()` after this group (including `start`).
    """
    topk = BlockTopK(queries.shape[0], k, threads) if start is None else BlockTopK.from_state(start, threads)
    try:
        for index in chunks:
            features = train.read_chunk(index)
            topk.add(queries @ features.T, offset=train.rows(index).start)
            if self_out is not None and not self_out.has_chunk(index):
                other = features if self_side is None else self_side.read_chunk(index)
                self_out.write_chunk(index, np.einsum("ij,ij->i", other, features))
            if on_chunk is not None:
                on_chunk(index)
        return topk.state()
    finally:
        topk.close()


def save_group(store: ChunkedStore, prefix: str, group: int, state: dict[str, np.ndarray]) -> None:
    """Save a group's top-k state; `seen` is written last and marks the group complete."""
    for name in STATE_NAMES:
        store.put(f"{prefix}/group_{group:06d}/{name}", state[name])


def load_group(store: ChunkedStore, prefix: str, group: int) -> dict[str, np.ndarray] | None:
    """A saved group state, or None if the group is not complete (or a chunk fails its checksum)."""
    state = {}
    for name in reversed(STATE_NAMES):
        value = store.get(f"{prefix}/group_{group:06d}/{name}")
        if value is None:
            return None
        state[name] = value
    return state


def check_scoring_inputs(queries: np.ndarray, train: StoredArray, k: int) -> np.ndarray:
    """Validate `queries` against the training features and `k`; return queries as float32."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or len(train.shape) != 2 or queries.shape[1] != train.shape[1]:
        raise InvalidDataError(
            f"`queries` must have shape (n_test, {train.shape[1] if len(train.shape) == 2 else '?'}) to match "
            f"the training features {train.shape}. Received: queries of shape {queries.shape}"
        )
    k = check_positive_int("k", k)
    if k > train.shape[0]:
        raise InvalidDataError(f"`k` must be at most n_train ({train.shape[0]}). Received: k={k}")
    return queries


def merge_states(states: list[dict[str, np.ndarray]], n_rows: int, k: int) -> BlockTopK:
    """One `BlockTopK` holding the exact merge of group states over disjoint columns."""
    total = BlockTopK(n_rows, k, threads=1)
    for state in states:
        total.merge(BlockTopK.from_state(state, threads=1))
    return total


def score_out_of_core(
    queries: np.ndarray,
    store: ChunkedStore,
    train: str = "features",
    k: int = 100,
    self_influence: bool = True,
    self_side: str | None = None,
    group_chunks: int = 8,
    threads: int = 2,
    progress: ProgressArg = False,
) -> ScoreResult:
    """Top-k proponents / opponents of every query and self-influence, streamed from `store`.

    Resumable: the running top-k after each group of `group_chunks` training chunks, and every
    self-influence chunk, are saved in `store`; a rerun continues after the last saved group.

    Args:
        queries: `(n_test, dim)` query vectors `psi(z_test)`.
        store: the store holding the training features.
        train: name of the training feature array `(n_train, dim)` in `store`.
        k: proponents and opponents kept per query.
        self_influence: also compute self-influence (array "self_influence" in the store).
        self_side: name of the training examples' query-side vectors for self-influence, or
            None for `||phi||^2`.
        group_chunks: training chunks per saved score block (and per Ray task).
        threads: threads for filtering score blocks.
        progress: True / a stream to show progress, False to stay silent.

    Returns:
        A `ScoreResult`.
    """
    features = store.array(train)
    queries = check_scoring_inputs(queries, features, k)
    prefix = query_key(queries, k)
    self_out = (
        store.array("self_influence", (features.shape[0],), features.chunk_rows, "float32") if self_influence else None
    )
    side = store.array(self_side) if self_side is not None else None
    groups = groups_of(features.n_chunks, group_chunks)
    # Score blocks are cumulative: group g's state covers groups 0..g. Resume after the last one saved.
    done, state = -1, None
    for g in reversed(range(len(groups))):
        state = load_group(store, prefix, g)
        if state is not None:
            done = g
            break
    missing = set(self_out.missing_chunks()) if self_out is not None else set()
    redo = [g for g in range(done + 1) if missing & set(groups[g])]  # self-influence chunks lost after a save
    todo = list(range(done + 1, len(groups)))
    with chunk_progress("scoring", sum(len(groups[g]) for g in redo + todo), progress) as counter:
        for g in redo:
            score_group(queries, features, groups[g], k, side, self_out, threads, lambda _: counter.advance())
        for g in todo:
            state = score_group(
                queries, features, groups[g], k, side, self_out, threads, lambda _: counter.advance(), start=state
            )
            save_group(store, prefix, g, state)
    assert state is not None
    result = BlockTopK.from_state(state, threads=1).result()
    return ScoreResult(*result, self_influence=self_out.read() if self_out is not None else None)
