"""A larger workload: TracIn on a ~18k-parameter head, timed against the floor.

Synthetic 20-dimensional blobs, 35 classes, `Input(20) -> Dense(512, relu) -> Dense(35)`
logits, softmax cross-entropy; the last layer is watched (kernel and bias: 512 * 35 + 35 =
17,955 parameters). Defaults: 50,000 training and 1,000 test points, batches of 500, TracIn
over 3 checkpoints (one per training epoch, not timed).

Why TracIn: first-order influence needs `H^-1` over 17,955 parameters. The exact solver holds
the dense Hessian (17,955^2 float64 = 2.6 GB) and eigendecomposes it (hours on 2 cores);
conjugate gradient needs, per iteration, Hessian-vector products over the Hessian's data for
all 1,000 test vectors (~10^12 flops per iteration). Neither is a cheap curvature at this
size on 2 cores: that is the job of factored curvatures (K-FAC / EK-FAC), not timed here.

Timed (cold = first call, tracing included; warm = median of the next calls):
* TracIn self-influence `(n_train,)` and the full test x train matrix `(n_test, n_train)`,
  and a streamed top-10 per test point;
* the floor: per checkpoint, one forward pass over train + test and the matrix products that
  produce the scores. For a `Dense` head the cheapest products are the factored ones,
  `<g_i, g_j> = <a_i, a_j><d_i, d_j>` (Vestigia's path), so the floor uses them; the products
  of the full `(n, 17,955)` gradients (what a generic implementation multiplies) are reported
  too, timed on a slice of the training set and scaled linearly.

Run: `python benchmarks/large_workload.py` (full size, a few minutes on 2 CPU cores), or
`python benchmarks/large_workload.py --n-train 10000 --n-test 500` (about a minute).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from common import (
    blobs,
    cold_and_warm,
    last_kernel_gradients,
    logits_loss,
    machine,
    print_table,
    timed,
    train_with_checkpoints,
)

from vestigia import InfluenceModel, TracIn

LEARNING_RATE = 0.05


def make_model(d: int, hidden: int, classes: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(classes)]
    )


def floor_seconds(
    checkpoints: list[keras.Model], train_ds: tf.data.Dataset, test_ds: tf.data.Dataset, hidden: int, classes: int
) -> tuple[float, float]:
    """Warm seconds of (forward passes + factored score products, forward passes + full-gradient
    score products) over all checkpoints; the full products are timed on 1/10 of the training
    set (at least one batch) and scaled."""
    forwards = [tf.function(lambda x, m=m: m(x, training=False)) for m in checkpoints]
    n_train = sum(int(x.shape[0]) for x, _ in train_ds)
    n_test = sum(int(x.shape[0]) for x, _ in test_ds)
    rng = np.random.default_rng(0)
    a_test = tf.constant(rng.normal(size=(n_test, hidden + 1)), tf.float32)
    d_test = tf.constant(rng.normal(size=(n_test, classes)), tf.float32)
    batch = int(next(iter(train_ds))[0].shape[0])
    a_train = tf.constant(rng.normal(size=(batch, hidden + 1)), tf.float32)
    d_train = tf.constant(rng.normal(size=(batch, classes)), tf.float32)
    n_params = (hidden + 1) * classes
    g_test = tf.constant(rng.normal(size=(n_test, n_params)), tf.float32)
    g_slice = tf.constant(rng.normal(size=(max(batch, n_train // 10), n_params)), tf.float32)

    def forward_all() -> None:
        for forward in forwards:
            for x, _ in train_ds:
                forward(x).numpy()
            for x, _ in test_ds:
                forward(x).numpy()

    def factored_products() -> None:
        for _ in checkpoints:
            for _ in range(n_train // batch):
                scores = tf.matmul(a_test, a_train, transpose_b=True) * tf.matmul(d_test, d_train, transpose_b=True)
                scores.numpy()

    def full_products() -> None:
        tf.matmul(g_test, g_slice, transpose_b=True).numpy()

    forward_all()
    factored_products()
    full_products()
    forward = float(np.median([timed(forward_all)[0] for _ in range(3)]))
    factored = float(np.median([timed(factored_products)[0] for _ in range(3)]))
    full = timed(full_products)[0] * len(checkpoints) * n_train / int(g_slice.shape[0])
    return forward + factored, forward + full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-test", type=int, default=1_000)
    parser.add_argument("--hidden", type=int, default=512, help="input width of the watched Dense layer")
    parser.add_argument("--classes", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="warm calls per stage (median reported)")
    parser.add_argument("--check", type=int, default=200, help="training points checked against numpy")
    args = parser.parse_args()

    x_train, y_train = blobs(args.n_train, 20, args.classes, seed=0, spread=1.0)
    x_test, y_test = blobs(args.n_test, 20, args.classes, seed=1, spread=1.0)
    model = make_model(20, args.hidden, args.classes)
    start = time.perf_counter()
    checkpoints = train_with_checkpoints(model, x_train, y_train, args.checkpoints, args.batch_size, LEARNING_RATE)
    train_seconds = time.perf_counter() - start
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(args.batch_size)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(args.batch_size)

    models = [InfluenceModel(c, start_layer=-1, loss_function=logits_loss()) for c in checkpoints]
    tracin = TracIn(models, [LEARNING_RATE] * len(models))
    results: dict[str, Any] = {}
    timings = {}
    stages = {
        "TracIn self-influence": lambda: tracin.self_influence(train_ds),
        "TracIn test x train matrix": lambda: tracin.influence_matrix(test_ds, train_ds),
        "TracIn top-10 per test point": lambda: tracin.top_k_indices(test_ds, train_ds, 10),
    }
    for name, fn in stages.items():
        timings[name], results[name] = cold_and_warm(fn, args.repeats)
    floor, floor_full = floor_seconds(checkpoints, train_ds, test_ds, args.hidden, args.classes)

    print(f"Machine: {machine()}")
    print(
        f"Workload: Input(20) -> Dense({args.hidden}, relu) -> watched Dense({args.classes}), "
        f"n_params={models[0].nb_params}, {args.n_train} train x {args.n_test} test, batch {args.batch_size}, "
        f"TracIn over {len(models)} checkpoints (training, not timed: {train_seconds:.1f} s)"
    )
    rows = [[n, t.cold, t.warm, t.cold_cpu, t.cold / floor, t.warm / floor] for n, t in timings.items()]
    print_table(["stage", "cold s", "warm s", "cold CPU s", "cold / floor", "warm / floor"], rows)
    print(f"floor (forward passes + factored score products, warm): {floor:.3f} s")
    print(f"floor with full-gradient products (what a generic implementation multiplies): {floor_full:.3f} s")

    # -- correctness on a slice against an independent float64 numpy computation -----------
    check = min(args.check, args.n_train)
    grads = [
        [last_kernel_gradients(c, x, y)[0] for x, y in ((x_train[:check], y_train[:check]), (x_test, y_test))]
        for c in checkpoints
    ]
    oracle_self = sum(LEARNING_RATE * np.sum(tr**2, axis=1) for tr, _ in grads)
    oracle_matrix = sum(LEARNING_RATE * te @ tr.T for tr, te in grads)
    errors = [
        ["TracIn self-influence", oracle_self, results["TracIn self-influence"][:check]],
        ["TracIn test x train matrix", oracle_matrix, results["TracIn test x train matrix"][:, :check]],
    ]
    top_values, top_indices = results["TracIn top-10 per test point"]
    matrix = results["TracIn test x train matrix"]
    top_gap = np.max(np.abs(np.take_along_axis(matrix, top_indices, axis=1) - top_values))
    print(f"\nCorrectness on the first {check} training points vs float64 numpy (closed-form gradients):")
    print_table(
        ["quantity", "max |oracle|", "max abs diff", "max rel diff"],
        [
            [n, f"{np.max(np.abs(ref)):.4g}", f"{np.max(np.abs(got - ref)):.3g}", f"{_rel(got, ref):.2e}"]
            for n, ref, got in errors
        ],
    )
    print(f"top-10 values vs the matrix at the returned indices: max abs diff {top_gap:.3g}")


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


if __name__ == "__main__":
    main()
