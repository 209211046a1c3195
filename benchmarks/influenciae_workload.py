"""Influenciae 0.3.0's reference workload, timed with Vestigia's public API.

Synthetic 20-dimensional blobs, 10 classes, MLP 20-32-32-10 (last Dense without bias),
softmax cross-entropy on logits, only the last kernel watched (n_params = 320); 2,000
training and 100 test points, training batches of 100, test batches of 50. The model is
trained 3 epochs with SGD (seeded, not timed); the three epoch checkpoints feed TracIn.

Each stage is timed COLD (its first call in the process, tracing included) and WARM (median
of 3 further calls), next to Influenciae 0.3.0's cold seconds on the same workload. The
floor is one forward pass over the 2,100 points plus the matrix products that produce the
scores. The last lines compare every value with an independent float64 numpy computation.

Run: `python benchmarks/influenciae_workload.py [--runs 3]` (about 15 s per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from common import (
    blobs,
    cold_and_warm,
    last_kernel_gradients,
    last_kernel_hessian,
    logits_loss,
    machine,
    pinv_hermitian,
    print_table,
    timed,
    train_with_checkpoints,
)

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, TracIn

N_TRAIN, N_TEST, D, CLASSES = 2000, 100, 20, 10
TRAIN_BATCH, TEST_BATCH, K = 100, 50, 10
LEARNING_RATE = 0.1

# Influenciae 0.3.0 (TensorFlow 2.15), cold seconds on this workload.
INFLUENCIAE = {
    "exact IHVP build": 17.4,
    "self-influence": 0.8,
    "test x train matrix": 1.1,
    "per-query top-10": 1.7,
    "TracIn self-influence": 1.5,
    "TracIn test x train": 3.0,
}


def make_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(CLASSES, use_bias=False),
        ]
    )


def floor_seconds(model: keras.Model, x_train: np.ndarray, x_test: np.ndarray, n_params: int) -> float:
    """One forward pass over train and test (a traced model call per batch) plus the score
    products of first-order influence (`H^-1 g_test`, the test x train matrix, the train
    self-influence), in TensorFlow float32; warm, median of 5."""
    forward = tf.function(lambda x: model(x, training=False))
    train_ds = tf.data.Dataset.from_tensor_slices(x_train).batch(TRAIN_BATCH)
    test_ds = tf.data.Dataset.from_tensor_slices(x_test).batch(TEST_BATCH)
    rng = np.random.default_rng(0)
    g_train = tf.constant(rng.normal(size=(N_TRAIN, n_params)), tf.float32)
    g_test = tf.constant(rng.normal(size=(N_TEST, n_params)), tf.float32)
    inverse = tf.constant(rng.normal(size=(n_params, n_params)), tf.float32)

    def run() -> None:
        for batch in train_ds:
            forward(batch).numpy()
        for batch in test_ds:
            forward(batch).numpy()
        tf.matmul(tf.matmul(g_test, inverse), g_train, transpose_b=True).numpy()
        tf.reduce_sum(tf.matmul(g_train, inverse) * g_train, axis=1).numpy()

    run()
    return float(np.median([timed(run)[0] for _ in range(5)]))


def measure(repeats: int) -> dict[str, Any]:
    """Train, time every stage, and check the values; returns a JSON-able summary."""
    x_train, y_train = blobs(N_TRAIN, D, CLASSES, seed=0)
    x_test, y_test = blobs(N_TEST, D, CLASSES, seed=1)
    model = make_model(0)
    checkpoints = train_with_checkpoints(model, x_train, y_train, epochs=3, batch_size=TRAIN_BATCH, lr=LEARNING_RATE)
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(TRAIN_BATCH)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(TEST_BATCH)

    influence_model = InfluenceModel(model, start_layer=-1, loss_function=logits_loss())
    timings: dict[str, list[float]] = {}
    results: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any]) -> None:
        timing, results[name] = cold_and_warm(fn, repeats)
        timings[name] = list(timing)

    # The seed's views, as an Influenciae user reads them (datasets read back to arrays).
    stage("exact IHVP build", lambda: ExactIHVP(influence_model, train_ds))
    ihvp = results["exact IHVP build"]
    calculator = FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)
    stage("self-influence", lambda: read_self_influence(calculator.compute_influence_values(train_ds)))
    stage(
        "test x train matrix",
        lambda: read_nested(calculator.estimate_influence_values_in_batches(test_ds, train_ds)),
    )
    stage("per-query top-10", lambda: read_top_k(calculator.top_k(test_ds, train_ds, K)))
    models = [InfluenceModel(c, start_layer=-1, loss_function=logits_loss()) for c in checkpoints]
    tracin = TracIn(models, [LEARNING_RATE] * 3)
    stage("TracIn self-influence", lambda: read_self_influence(tracin.compute_influence_values(train_ds)))
    stage("TracIn test x train", lambda: read_nested(tracin.estimate_influence_values_in_batches(test_ds, train_ds)))
    # Vestigia's own array API on the same (now traced) objects: warm only.
    native = {
        "self_influence": lambda: calculator.self_influence(train_ds),
        "influence_matrix": lambda: calculator.influence_matrix(test_ds, train_ds),
        "top_k_indices": lambda: calculator.top_k_indices(test_ds, train_ds, K),
        "TracIn self_influence": lambda: tracin.self_influence(train_ds),
        "TracIn influence_matrix": lambda: tracin.influence_matrix(test_ds, train_ds),
    }
    native_warm = {name: cold_and_warm(fn, max(repeats, 1))[0].warm for name, fn in native.items()}
    traced = {
        "trunk": influence_model._trunk,
        "trunk+gradients": influence_model._trunk_and_gradients,
        "Kronecker Hessian": influence_model.differentiator._dense_hessian,
        **{f"TracIn ckpt {i} trunk+factors": m._trunk_and_factors for i, m in enumerate(models)},
    }
    tracing_counts = {name: fn.tracing_count() for name, fn in traced.items()}
    floor = floor_seconds(model, x_train, x_test, influence_model.nb_params)

    # -- correctness against an independent float64 numpy computation -----------------------
    g_train, _ = last_kernel_gradients(model, x_train, y_train)
    g_test, _ = last_kernel_gradients(model, x_test, y_test)
    inverse = pinv_hermitian(last_kernel_hessian(model, x_train), ihvp.rcond)
    oracle_matrix = g_test @ inverse @ g_train.T
    order = np.argsort(-oracle_matrix, axis=1, kind="stable")[:, :K]
    pairs = ((x_train, y_train), (x_test, y_test))
    grads = [[last_kernel_gradients(c, x, y)[0] for x, y in pairs] for c in checkpoints]
    oracles = {
        "self-influence": np.einsum("np,pq,nq->n", g_train, inverse, g_train),
        "test x train matrix": oracle_matrix,
        "per-query top-10": np.take_along_axis(oracle_matrix, order, axis=1),
        "TracIn self-influence": sum(LEARNING_RATE * np.sum(tr**2, axis=1) for tr, _ in grads),
        "TracIn test x train": sum(LEARNING_RATE * te @ tr.T for tr, te in grads),
    }
    errors = {
        name: [float(np.max(np.abs(ref))), float(np.max(np.abs(np.asarray(results[name]) - ref)))]
        for name, ref in oracles.items()
    }
    return {
        "timings": timings,
        "native_warm": native_warm,
        "floor": floor,
        "errors": errors,
        "tracing_counts": tracing_counts,
    }


def read_self_influence(values: tf.data.Dataset) -> np.ndarray:
    """The seed's `(batch, values (batch, 1))` dataset back to `(n_train,)`."""
    return np.concatenate([v.numpy()[:, 0] for _, v in values])


def read_nested(values: tf.data.Dataset) -> np.ndarray:
    """The seed's nested `(test_batch, inner)` dataset back to `(n_test, n_train)`."""
    return np.concatenate([np.concatenate([v.numpy() for _, v in inner], axis=1) for _, inner in values], axis=0)


def read_top_k(found: tf.data.Dataset) -> np.ndarray:
    """The seed's `(test_batch, values, samples)` dataset: values `(n_test, k)` (samples read too)."""
    values = []
    for _, v, samples in found:
        samples.numpy()
        values.append(v.numpy())
    return np.concatenate(values, axis=0)


def report(runs: list[dict[str, Any]]) -> None:
    """Print the medians over runs of every timing, and the first run's errors."""
    names = list(INFLUENCIAE)
    med = {n: [float(np.median([r["timings"][n][i] for r in runs])) for i in range(3)] for n in names}
    rows = [[n, *med[n], INFLUENCIAE[n], INFLUENCIAE[n] / med[n][0]] for n in names]
    total = [sum(med[n][i] for n in names) for i in range(3)]
    influenciae_total = sum(INFLUENCIAE.values())
    rows.append(["total", *total, influenciae_total, influenciae_total / total[0]])
    floor = float(np.median([r["floor"] for r in runs]))
    print(f"Machine: {machine()}")
    print(f"Workload: MLP {D}-32-32-{CLASSES}, last kernel watched (n_params=320), {N_TRAIN} train x {N_TEST} test")
    print(f"Median of {len(runs)} run(s), each in a fresh process.")
    print_table(["stage (seed API)", "cold s", "warm s", "cold CPU s", "Influenciae s", "Influenciae / cold"], rows)
    print(f"target: total cold < {influenciae_total / 20:.3f} s (20x faster than Influenciae 0.3.0)")
    print(f"floor (one forward pass over train+test + the score products, warm): {floor:.4f} s")
    print(f"total warm / floor: {total[1] / floor:.1f}")
    native = {n: float(np.median([r["native_warm"][n] for r in runs])) for n in runs[0]["native_warm"]}
    print("\nVestigia's array API (warm):")
    print_table(["call", "warm s", "warm / floor"], [[n, v, v / floor] for n, v in native.items()])
    counts = ", ".join(f"{n}: {c}" for n, c in runs[0]["tracing_counts"].items())
    print(f"\nTraces per function after all stages (batches of 100 and 50): {counts}")
    print("\nCorrectness vs an independent float64 numpy computation (closed-form gradients, kron Hessian, pinv):")
    print_table(
        ["quantity", "max |oracle|", "max abs diff", "max rel diff"],
        [[n, f"{m:.4g}", f"{e:.3g}", f"{e / m:.2e}"] for n, (m, e) in runs[0]["errors"].items()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per stage (median reported)")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes to run (medians reported)")
    parser.add_argument("--json", action="store_true", help="print one run's raw results as JSON")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.repeats)))
        return
    if args.runs == 1:
        report([measure(args.repeats)])
        return
    runs = []
    for _ in range(args.runs):
        command = [sys.executable, __file__, "--json", "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    report(runs)


if __name__ == "__main__":
    main()
