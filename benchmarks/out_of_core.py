"""Out-of-core scoring benchmark: n_train x n_queries scores from features on disk, top-k
proponents and opponents per query and self-influence, with peak RSS and a GEMM reference.

    python benchmarks/out_of_core.py                     # full size: 1,000,000 x 10,000, dim 512
    python benchmarks/out_of_core.py --n-queries 1000    # reduced size for a shared machine

Training features are generated (seeded Gaussian, one chunk at a time) into a `ChunkedStore`;
timing then covers reading every chunk back from disk (checksums verified), the float32
products, the filtered top-k merge on both sides and self-influence. The reference is the plain
GEMM of the same sizes, `queries @ chunk^T` for every chunk into a preallocated block, with the
same BLAS, measured in the same run before and after the scoring (the machine may be shared);
the ratio is to their mean. Peak RSS is the process's high-water mark (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from vestigia.results.out_of_core import score_out_of_core  # noqa: E402
from vestigia.store import ChunkedStore, Fingerprint  # noqa: E402


def generated_chunk(index: int, rows: int, dim: int) -> np.ndarray:
    """Seeded features of one chunk, `(rows, dim)` float32, scaled to unit expected norm."""
    return (np.random.default_rng(index).standard_normal((rows, dim), dtype=np.float32)) / np.float32(np.sqrt(dim))


def reference_gemm(queries: np.ndarray, n_train: int, chunk_rows: int, max_chunks: int | None = None) -> float:
    """Seconds for the plain GEMM `queries @ F^T` of all `n_train` rows, chunk by chunk
    (timed on the first `max_chunks` chunks and scaled linearly when given: every chunk's GEMM
    has the same size)."""
    chunk = generated_chunk(0, chunk_rows, queries.shape[1])
    out = np.empty((queries.shape[0], chunk_rows), np.float32)
    firsts = list(range(0, n_train, chunk_rows))
    timed = firsts if max_chunks is None else firsts[:max_chunks]
    start = time.perf_counter()
    for first in timed:
        rows = min(chunk_rows, n_train - first)
        np.matmul(queries, chunk[:rows].T, out=out[:, :rows])
    return (time.perf_counter() - start) * len(firsts) / len(timed)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--group-chunks", type=int, default=32)
    parser.add_argument(
        "--reference-chunks", type=int, default=None, help="time the reference GEMM on this many chunks, scaled"
    )
    parser.add_argument("--dir", default=None, help="store directory (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vestigia_ooc_"))
    try:
        fp = Fingerprint(settings=f'{{"generated":[{args.n_train},{args.dim},{args.chunk_rows}]}}')
        store = ChunkedStore(root / "store", fp)
        features = store.array("features", (args.n_train, args.dim), args.chunk_rows)
        start = time.perf_counter()
        features.fill(lambda i: generated_chunk(i, features.rows(i).stop - features.rows(i).start, args.dim))
        write_s = time.perf_counter() - start
        queries = generated_chunk(10**9, args.n_queries, args.dim)
        gemm_before = reference_gemm(queries, args.n_train, args.chunk_rows, args.reference_chunks)
        start = time.perf_counter()
        result = score_out_of_core(queries, store, k=args.k, group_chunks=args.group_chunks)
        score_s = time.perf_counter() - start
        gemm_after = reference_gemm(queries, args.n_train, args.chunk_rows, args.reference_chunks)
        gemm_s = (gemm_before + gemm_after) / 2
        n_scores = args.n_train * args.n_queries
        print(
            f"sizes: n_train={args.n_train:,} n_queries={args.n_queries:,} dim={args.dim} k={args.k} "
            f"chunk_rows={args.chunk_rows} ({features.n_chunks} chunks), cpus={os.cpu_count()}"
        )
        print(f"featurise into store: {write_s:.1f} s ({features.n_chunks / write_s:.2f} chunks/s)")
        print(
            f"plain GEMM reference: {gemm_before:.1f} s before, {gemm_after:.1f} s after "
            f"({2 * n_scores * args.dim / gemm_s / 1e9:.1f} GFLOP/s)"
        )
        print(
            f"out-of-core scoring (read+GEMM+top-{args.k} both sides+self-influence): {score_s:.1f} s, "
            f"{n_scores / score_s / 1e6:.1f} M scores/s, {score_s / features.n_chunks:.3f} s per chunk"
        )
        print(f"ratio to plain GEMM: {score_s / gemm_s:.2f}x")
        print(f"peak RSS: {peak_rss_gib():.2f} GiB")
        assert result.self_influence is not None and result.proponent_indices.shape == (args.n_queries, args.k)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
