"""Whole-model attribution speed and memory: EK-FAC on a small ResNet, as ratios to one epoch.

Model: a ResNet for 32 x 32 x 3 images (stem conv 64, three stages of one residual block with
64 / 128 / 256 channels, strided convs and 1 x 1 projection shortcuts, global pooling, Dense),
1,223,626 parameters, no BatchNorm (so every weight has a Kronecker factor), every layer watched.
Data: generated images (a class-dependent pattern plus noise), 10 classes, generated batch by
batch from a seed on every pass (never held whole, as data read from disk would be), so the peak
memory is the library's and stays flat as `n_train` grows.

Timed in the same process, each as a ratio to one training epoch on the same training set
(Adam, same batch size, measured after a one-batch warm-up):
* `ekfac_factors`: EK-FAC factors (covariance pass, float64 eigendecompositions, eigenvalue
  refit pass, over every batch or with `--refit-fraction f` every `1/f`-th), true Fisher;
* `self_influence`: `g^T H^-1 g` for every training example (factored, one pass);
* `pairwise_topk`: every query against every training example, streamed top-k (k=10), never a
  held `(n_query, n_train)` matrix; queries full rank, or rank-r with `--query-rank`, held in
  float32 or (`--query-dtype bfloat16`) in bfloat16 and paired by bfloat16 GEMMs; it includes
  the queries' preconditioned gradients (a fixed cost, ~4.5 s per 64 full-rank queries on 2 cores, ~2.8 s in bfloat16),
  so compare two `--sizes` for the marginal ratio per training example;
* `trak_featurise`: TRAK's features of the training set for one checkpoint, k >= 2,048 (LoGra
  factored projection, `vestigia.projection.FactoredProjection`).
Both wall-clock and process-CPU ratios are printed (CPU time is less disturbed by other
processes on a shared machine). Then peak RSS (`resource.getrusage`), and with `--sizes` the
same run at several training-set sizes in fresh processes, to show how time and peak memory
grow with `n_train`.

Each stage prints one line, `name: S s = R epochs wall, C epochs CPU (note); peak RSS G GiB`;
`--sizes` ends with a table `n_train | epoch s | stage (epochs wall / CPU) ... | peak RSS GiB`.
The factors include fixed costs that do not grow with `n_train` (float64 eigendecompositions of
the 10 layers' input factors, up to 2,305 x 2,305: ~15 s on 2 cores), so at small `n_train` their
ratio is above the per-example cost; compare sizes for the marginal ratio.

Targets (issue 11): factors <= 3 epochs, self-influence <= 3, pairwise <= 4, TRAK <= 2 per
checkpoint, peak <= 6 GiB, flat in `n_train`. Floors at the training GEMMs' speed (multiply-adds
per example; training step 585M): factors 3.7 epochs (capture passes 2 x 0.67, input covariances
0.83 with `conv_covariance`, the refit's rotations `in^2 min(T, out)` per layer 1.58),
self-influence 2.25, pairwise with 1,000 full-rank float32 queries 3.1 (bfloat16 GEMMs run
about twice as fast). To add a stage, append a function to `STAGES`.

`--query-budget-gib B` holds at most `B` GiB of the queries' preconditioned gradients at once
(`vestigia.methods.engine.TEST_SIDE_BYTES`): above it the queries are scored in groups, one pass
over the training set each (full rank, 1,000 queries hold 4.6 GiB in float32, 2.3 GiB in bfloat16).

`--fidelity-dtype bfloat16` / `--fidelity-rank r` compare such queries with full-rank float32 ones
on a slice (256 training x 32 queries): Pearson, top-10 overlap, largest difference.

`--stages pairwise_topk` times only the named stages (comma-separated); the factors are then fitted
untimed first, or loaded from `--factors-path` (an `.npz` written on the first run, refused if the
model, data or settings differ, see `vestigia.curvature.factor_file`).

Run: `python benchmarks/whole_model.py` (full size: 50,000 train / 1,000 queries: hours on 2
cores), `python benchmarks/whole_model.py --n-train 1000 --n-query 100` (minutes), and
`--sizes 500,1000` for the growth table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from vestigia import TRAK, FirstOrderInfluenceCalculator  # noqa: E402
from vestigia.curvature import EKFACIHVP  # noqa: E402
from vestigia.methods import engine  # noqa: E402
from vestigia.model.influence_model import BaseInfluenceModel  # noqa: E402
from vestigia.projection import FactoredProjection  # noqa: E402


def resnet(classes: int = 10, widths: tuple[int, ...] = (64, 128, 256)) -> keras.Model:
    """The benchmark's ResNet (see the module docstring)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(widths[0], 3, padding="same", activation="relu")(inputs)
    for stage, width in enumerate(widths):
        stride = 1 if stage == 0 else 2
        y = keras.layers.Conv2D(width, 3, strides=stride, padding="same", activation="relu")(x)
        y = keras.layers.Conv2D(width, 3, padding="same")(y)
        shortcut = x if stride == 1 and x.shape[-1] == width else keras.layers.Conv2D(width, 1, strides=stride)(x)
        x = keras.layers.Activation("relu")(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def images(n: int, batch_size: int, classes: int = 10, seed: int = 0) -> tf.data.Dataset:
    """`n` generated 32 x 32 x 3 images (class pattern + noise) and one-hot labels, in batches,
    each generated from `(seed, its first index)` when read: the same on every pass."""
    patterns = tf.constant(np.random.default_rng(123).normal(0, 1, (classes, 32, 32, 3)).astype("float32"))

    def batch(start: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.cast(tf.minimum(tf.constant(batch_size, tf.int64), n - start), tf.int32)
        labels = tf.random.stateless_uniform([size], [seed, start], 0, classes, dtype=tf.int32)
        noise = tf.random.stateless_normal([size, 32, 32, 3], [seed + 1, start])
        return 0.5 * tf.gather(patterns, labels) + noise, tf.one_hot(labels, classes)

    return tf.data.Dataset.range(0, n, batch_size).map(batch)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Context:
    """What the stages share: data sets, model, settings, and results of earlier stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = resnet()
        self.loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        self.train = images(args.n_train, args.batch_size)
        self.queries = images(args.n_query, args.batch_size, seed=2)
        self.influence_model: Any = None
        self.calculator: Any = None


def stage_epoch(ctx: Context) -> str:
    """One training epoch (the reference), after a one-batch warm-up that builds the train step."""
    model = ctx.model
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(ctx.train.take(1), verbose=0, shuffle=False)
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(ctx.train, epochs=1, verbose=0, shuffle=False)
    ctx.epoch_seconds = time.perf_counter() - start
    ctx.epoch_cpu = time.process_time() - cpu
    return f"{model.count_params():,} parameters"


def stage_factors(ctx: Context) -> str:
    ctx.influence_model = BaseInfluenceModel(ctx.model, loss_function=ctx.loss)
    solver = EKFACIHVP(
        ctx.influence_model,
        ctx.train,
        query_rank=ctx.args.query_rank,
        query_dtype=ctx.args.query_dtype,
        factors_path=ctx.args.factors_path,
        refit_fraction=ctx.args.refit_fraction,
    )
    ctx.calculator = FirstOrderInfluenceCalculator(ctx.influence_model, ctx.train, ihvp_calculator=solver)
    return f"{len(solver.layers)} Kronecker-factored layers, {len(solver.diagonals)} diagonal weights"


def stage_self_influence(ctx: Context) -> str:
    values = ctx.calculator.self_influence(ctx.train)
    return f"min {values.min():.3g}, max {values.max():.3g}"


def stage_pairwise(ctx: Context) -> str:
    values, indices = ctx.calculator.top_k_indices(ctx.queries, ctx.train, k=10)
    return f"top-10 of {ctx.args.n_query} x {ctx.args.n_train}; best value {values[:, 0].max():.3g}"


def stage_trak(ctx: Context) -> str:
    """TRAK featurisation of the training set for one checkpoint, k >= 2,048: LoGra's factored
    projection with `k_in = k_out = ceil(sqrt(2048 / n_layers))` per layer (10 layers: 15 x 15, k = 2,250)."""
    n_layers = len(ctx.calculator.ihvp_calculator.layers)
    side = int(np.ceil(np.sqrt(2048 / n_layers)))
    projection = FactoredProjection(ctx.influence_model, k_in=side, k_out=side)
    TRAK(ctx.influence_model, ctx.train, projection=projection)
    return f"k = {projection.k} ({side} x {side} per layer)"


# The timed stages, in order: one `(name, fn)` pair each; `fn(ctx)` returns a short description
# and its time is reported as a ratio to the epoch. Add new stages here.
STAGES: list[tuple[str, Callable[[Context], str]]] = [
    ("ekfac_factors", stage_factors),
    ("self_influence", stage_self_influence),
    ("pairwise_topk", stage_pairwise),
    ("trak_featurise", stage_trak),
]


def selected(names: str | None) -> list[tuple[str, Callable[[Context], str]]]:
    """The stages named in `names` (comma-separated, any order; None: all), in `STAGES` order."""
    if names is None:
        return STAGES
    wanted = set(names.split(","))
    unknown = wanted - {name for name, _ in STAGES}
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {[name for name, _ in STAGES]}")
    return [(name, fn) for name, fn in STAGES if name in wanted]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.query_budget_gib is not None:
        engine.TEST_SIDE_BYTES = int(args.query_budget_gib * 2**30)
    ctx = Context(args)
    results: dict[str, Any] = {"n_train": args.n_train, "n_query": args.n_query, "stages": {}}
    note = stage_epoch(ctx)
    results["epoch_seconds"], results["epoch_cpu"] = ctx.epoch_seconds, ctx.epoch_cpu
    print(
        f"epoch: {ctx.epoch_seconds:.1f} s wall, {ctx.epoch_cpu:.1f} s CPU ({note}); peak RSS {peak_rss_gib():.2f} GiB",
        flush=True,
    )
    stages = selected(args.stages)
    if "ekfac_factors" not in {name for name, _ in stages}:
        note = stage_factors(ctx)
        print(f"ekfac_factors: untimed ({note}); peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    for name, fn in stages:
        start, cpu = time.perf_counter(), time.process_time()
        note = fn(ctx)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        results["stages"][name] = {
            "seconds": seconds,
            "epochs": seconds / ctx.epoch_seconds,
            "cpu_epochs": cpu / ctx.epoch_cpu,
        }
        print(
            f"{name}: {seconds:.1f} s = {seconds / ctx.epoch_seconds:.2f} epochs wall, "
            f"{cpu / ctx.epoch_cpu:.2f} epochs CPU ({note}); peak RSS {peak_rss_gib():.2f} GiB",
            flush=True,
        )
    results["peak_rss_gib"] = peak_rss_gib()
    if args.fidelity_rank:
        results["fidelity_rank"] = query_fidelity(ctx, "query_rank", args.fidelity_rank)
    if args.fidelity_dtype:
        results["fidelity_dtype"] = query_fidelity(ctx, "query_dtype", args.fidelity_dtype)
    return results


def query_fidelity(ctx: Context, setting: str, value: Any, n_train: int = 256, n_query: int = 32) -> dict[str, Any]:
    """Queries with the solver's `setting` (`query_rank` or `query_dtype`) at `value` against full
    rank in float32 on a slice: Pearson of the scores, overlap of the top-10, largest difference
    relative to the largest |score|."""
    solver = ctx.calculator.ihvp_calculator
    train, queries = ctx.train.unbatch().take(n_train).batch(64), ctx.queries.unbatch().take(n_query).batch(64)
    kept = solver.query_rank, solver.query_dtype
    scores = []
    for rank, dtype in ((None, "float32"), (value, kept[1]) if setting == "query_rank" else (kept[0], value)):
        solver.query_rank, solver.query_dtype = rank, dtype
        calculator = FirstOrderInfluenceCalculator(ctx.influence_model, train, ihvp_calculator=solver)
        scores.append(calculator.influence_matrix(queries, train))
    solver.query_rank, solver.query_dtype = kept
    full, other = scores
    top_full, top_other = np.argsort(-full, axis=1)[:, :10], np.argsort(-other, axis=1)[:, :10]
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_full, top_other)]))
    pearson = float(np.corrcoef(full.ravel(), other.ravel())[0, 1])
    error = float(np.abs(other - full).max() / np.abs(full).max())
    print(
        f"{setting}={value} vs full rank float32 ({n_query} x {n_train}): Pearson {pearson:.6f}, "
        f"top-10 overlap {overlap:.3f}, largest difference {error:.2e} of the largest |score|"
    )
    return {"setting": setting, "value": value, "pearson": pearson, "top10_overlap": overlap, "max_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-query", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--query-rank", type=int, default=None, help="low-rank queries (default: full rank)")
    parser.add_argument("--query-dtype", default="float32", help="precision of the held queries (float32, bfloat16)")
    parser.add_argument("--fidelity-rank", type=int, default=None, help="compare rank-r queries with full rank")
    parser.add_argument("--fidelity-dtype", default=None, help="compare queries in this dtype with float32")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated n_train values, one process each")
    parser.add_argument("--refit-fraction", type=float, default=1.0, help="EK-FAC refit on this share of batches")
    parser.add_argument("--stages", type=str, default=None, help="comma-separated stages to time (default: all)")
    parser.add_argument("--factors-path", type=str, default=None, help="EK-FAC factors .npz: loaded, else saved")
    parser.add_argument(
        "--query-budget-gib", type=float, default=None, help="hold at most this much of the queries' sides at once"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line of results at the end")
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores", flush=True)
    if args.sizes is None:
        results = run(args)
        print(f"peak RSS: {results['peak_rss_gib']:.2f} GiB")
        if args.json:
            print("JSON " + json.dumps(results))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, __file__, "--n-train", str(size), "--n-query", str(args.n_query)]
        command += ["--batch-size", str(args.batch_size), "--json"]
        if args.query_rank is not None:
            command += ["--query-rank", str(args.query_rank)]
        command += ["--query-dtype", args.query_dtype]
        if args.stages is not None:
            command += ["--stages", args.stages]
        command += ["--refit-fraction", str(args.refit_fraction)]
        if args.query_budget_gib is not None:
            command += ["--query-budget-gib", str(args.query_budget_gib)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        print(output, flush=True)
        rows.append(json.loads(output.split("JSON ", 1)[1]))
    stages = selected(args.stages)
    print("n_train | epoch s | " + " | ".join(f"{name} (epochs wall / CPU)" for name, _ in stages) + " | peak RSS GiB")
    for row in rows:
        ratios = " | ".join(
            f"{row['stages'][name]['epochs']:.2f} / {row['stages'][name]['cpu_epochs']:.2f}" for name, _ in stages
        )
        print(f"{row['n_train']} | {row['epoch_seconds']:.1f} | {ratios} | {row['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
