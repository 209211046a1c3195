"""Ray scaling and the cost model of `docs/scale.md`: block scoring on 1 and N local workers.

    PYTHONPATH=src python benchmarks/ray_scaling.py   # calibrate at 50k x 1k, check at 100k x 2k and 200k x 2k
    PYTHONPATH=src python benchmarks/ray_scaling.py --workers 4 --sizes 100000x4000,400000x4000

Ray workers import Vestigia from their own `sys.path`: from a source checkout set
`PYTHONPATH=src` (an installed package needs nothing).

Scoring runs as Ray tasks over tiles (a query block x a group of training chunks). The cost
model is `T(N) = t_task * tasks / (N * efficiency) + t_merge`, with `t_task` (seconds per
tile of `query_block x group_chunks * chunk_rows` scores) measured on 1 worker and the parallel
efficiency on N workers, both at the calibration size; it then predicts the larger sizes,
which are measured too. Worker memory is modelled as the idle worker's RSS plus the tile's
buffers (`query_block * chunk_rows * 4` bytes for scores, plus two boolean masks, a feature
chunk and the query block), and checked against the peak RSS sampled from the worker processes.
Self-influence is off in these timings (it is a row-wise dot product, <1% of a tile).
The machine may be shared: the 1-worker and N-worker runs alternate in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from out_of_core import generated_chunk  # noqa: E402

from vestigia.distributed import ray_cluster, score_on_ray  # noqa: E402
from vestigia.results.out_of_core import groups_of  # noqa: E402
from vestigia.store import ChunkedStore, Fingerprint  # noqa: E402


def worker_rss() -> int:
    """The largest RSS (bytes) among Ray worker processes now."""
    peak = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::") and proc.info["memory_info"] is not None:
            peak = max(peak, proc.info["memory_info"].rss)
    return peak


class WorkerMemory:
    """Samples the RSS of Ray worker processes (`ray::` titles) every 50 ms; keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, worker_rss())
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def make_store(root: Path, n_train: int, dim: int, chunk_rows: int) -> tuple[str, Fingerprint]:
    fp = Fingerprint(settings=f'{{"generated":[{n_train},{dim},{chunk_rows}]}}')
    path = root / f"store_{n_train}"
    stored = ChunkedStore(path, fp).array("features", (n_train, dim), chunk_rows)
    stored.fill(lambda i: generated_chunk(i, stored.rows(i).stop - stored.rows(i).start, dim))
    return str(path), fp


def timed_scoring(path: str, fp: Fingerprint, n_queries: int, dim: int, args: argparse.Namespace, seed: int) -> float:
    queries = generated_chunk(10**9 + seed, n_queries, dim)  # new queries each run: no tile is reused
    start = time.perf_counter()
    score_on_ray(
        queries, path, fp, k=args.k, self_influence=False, group_chunks=args.group_chunks, query_block=args.query_block
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        default="50000x1000,100000x2000,200000x2000",
        help="n_train x n_queries; the first calibrates the model",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--group-chunks", type=int, default=2)
    parser.add_argument("--query-block", type=int, default=1000)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="vestigia_ray_"))
    stores = {n: make_store(root, n, args.dim, args.chunk_rows) for n, _ in sizes}
    times: dict[tuple[int, int, int], float] = {}
    memory: dict[int, int] = {}
    idle: dict[int, int] = {}
    for workers in (1, args.workers):
        with ray_cluster(num_cpus=workers, object_store_memory=256 * 2**20):
            warm_path, warm_fp = stores[sizes[0][0]]
            timed_scoring(warm_path, warm_fp, 64, args.dim, args, seed=-workers)  # start workers, import once
            idle[workers] = worker_rss()
            sampler = WorkerMemory()
            for i, (n_train, n_queries) in enumerate(sizes):
                path, fp = stores[n_train]
                seed = 100 * workers + i  # fresh queries: no tile of an earlier run is resumed
                times[(n_train, n_queries, workers)] = timed_scoring(path, fp, n_queries, args.dim, args, seed=seed)
            memory[workers] = sampler.stop()

    def tasks(n_train: int, n_queries: int) -> int:
        n_chunks = -(-n_train // args.chunk_rows)
        return len(groups_of(n_chunks, args.group_chunks)) * -(-n_queries // args.query_block)

    n0, q0 = sizes[0]
    t_task = times[(n0, q0, 1)] / tasks(n0, q0)
    efficiency = times[(n0, q0, 1)] / (args.workers * times[(n0, q0, args.workers)])
    print(
        f"machine: {os.cpu_count()} cores (shared), dim={args.dim}, k={args.k}, chunk_rows={args.chunk_rows}, "
        f"group_chunks={args.group_chunks}, query_block={args.query_block}"
    )
    print(
        f"calibration at {n0:,} x {q0:,}: t_task = {t_task:.3f} s per tile of "
        f"{args.query_block} x {args.group_chunks * args.chunk_rows} scores; "
        f"efficiency on {args.workers} workers = {efficiency:.2f}"
    )
    print(
        "| n_train x n_queries | tasks | 1 worker (s) | "
        f"{args.workers} workers (s) | speed-up | "
        f"predicted {args.workers} workers (s) | error |"
    )
    print("|---|---|---|---|---|---|---|")
    for n_train, n_queries in sizes:
        t1, tn = times[(n_train, n_queries, 1)], times[(n_train, n_queries, args.workers)]
        predicted = t_task * tasks(n_train, n_queries) / (args.workers * efficiency)
        print(
            f"| {n_train:,} x {n_queries:,} | {tasks(n_train, n_queries)} | {t1:.1f} | {tn:.1f} | {t1 / tn:.2f}x | "
            f"{predicted:.1f} | {100 * (predicted - tn) / tn:+.0f}% |"
        )
    tile_bytes = args.query_block * args.chunk_rows * 4
    buffers = tile_bytes * 1.5 + args.chunk_rows * args.dim * 4 + args.query_block * args.dim * 4
    print(
        f"worker RSS: idle {idle[1] / 2**20:.0f} MiB; peak {memory[1] / 2**20:.0f} MiB (1 worker), "
        f"{memory[args.workers] / 2**20:.0f} MiB ({args.workers} workers); model idle + buffers = "
        f"{(idle[1] + buffers) / 2**20:.0f} MiB"
    )
    big = tasks(1_000_000, 1_000_000)
    for workers in (2, 8, 32, 128):
        hours = t_task * big / (workers * efficiency) / 3600
        print(f"prediction 1,000,000 x 1,000,000 on {workers} workers like these: {big} tasks, {hours:.1f} h")


if __name__ == "__main__":
    main()
