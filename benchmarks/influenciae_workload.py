"""Influenciae 0.3.0's reference workload: both libraries timed in the same invocation.

First Influenciae 0.3.0 itself runs (`shared/reference/influenciae-bench/bench.py`, in its own
venv with TensorFlow 2.15, made once by its `setup.sh`): it trains the reference model (MLP
20-32-32-10, bias-free last layer, softmax cross-entropy on logits; 2,000 train and 100 test
points, synthetic, seeded), saves the model, data, TracIn checkpoints and its outputs, and times
its six stages cold. Then Vestigia, in a fresh process, loads the *identical* weights and data
and times the same six stages through the seed's API, cold (first call, tracing included) and
warm (median of the next calls), and compares every value with Influenciae's saved outputs
and with an independent float64 NumPy computation. The ratio per stage and in total is
Influenciae's cold seconds over Vestigia's, both measured in this run.

The exact solver is given the seed's pseudo-inverse cut-off (`rcond = 10 * 320 * eps(float32)`,
what `tf.linalg.pinv` applies) so that both compute the same numbers; Influenciae's ExactIHVP is
fed batches of 5 (its Hessian memory grows with the batch squared), as in its bench.

Run: `python benchmarks/influenciae_workload.py [--runs 3]`; the Influenciae venv is
`$INFLUENCIAE_REFENV` (default `/work/influenciae-ref`), made by
`INFLUENCIAE_REFENV=... bash shared/reference/influenciae-bench/setup.sh` (needs PyPI, ~2 min).
`--influenciae-out DIR` reuses the outputs of an earlier Influenciae run (then the ratio is not
same-run: the script says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from common import (
    cold_and_warm,
    last_kernel_gradients,
    last_kernel_hessian,
    machine,
    pinv_hermitian,
    print_table,
    timed,
)

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, TracIn

N_TRAIN, N_TEST, D, HIDDEN, CLASSES = 2000, 100, 20, 32, 10
TRAIN_BATCH, TEST_BATCH, K = 100, 50, 10
LEARNING_RATE = 0.1
LAYERS = ("dense_1", "dense_2", "logits")
_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [p / "shared" / "reference" / "influenciae-bench" / "bench.py" for p in (_REPO.parent, Path("/work"))]
BENCH = Path(os.environ.get("INFLUENCIAE_BENCH", next((c for c in _CANDIDATES if c.exists()), _CANDIDATES[0])))
# Influenciae's stage names in its timings.json, by ours.
STAGES = {
    "exact IHVP build": "exact_ihvp_build_hessian_pinv",
    "self-influence": "first_order_self_influence",
    "test x train matrix": "first_order_test_train",
    "per-query top-10": "first_order_top_k",
    "TracIn self-influence": "tracin_self_influence",
    "TracIn test x train": "tracin_test_train",
}
# Influenciae's saved outputs, by our stage names.
OUTPUTS = {
    "self-influence": "first_order_self_influence.npy",
    "test x train matrix": "first_order_test_train.npy",
    "per-query top-10": "first_order_topk_values.npy",
    "TracIn self-influence": "tracin_self_influence.npy",
    "TracIn test x train": "tracin_test_train.npy",
}


def logits_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def load_model(weights: dict[str, np.ndarray], prefix: str = "") -> keras.Model:
    """The reference MLP with the weights Influenciae trained (Keras 3, same layer names)."""
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(HIDDEN, activation="relu", name="dense_1"),
            keras.layers.Dense(HIDDEN, activation="relu", name="dense_2"),
            keras.layers.Dense(CLASSES, use_bias=False, name="logits"),
        ]
    )
    for name in LAYERS:
        layer = model.get_layer(name)
        values = [weights[f"{prefix}{name}/kernel"]] + ([weights[f"{prefix}{name}/bias"]] if layer.use_bias else [])
        layer.set_weights(values)
    return model


def run_influenciae(out_dir: str, python: str) -> dict[str, float]:
    """Run Influenciae 0.3.0's bench (cold stages only) into `out_dir`; its cold seconds by stage."""
    command = [python, str(BENCH), out_dir, "--repeats", "1", "--skip-rps"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return read_influenciae(out_dir)


def read_influenciae(out_dir: str) -> dict[str, float]:
    timings = json.loads(Path(out_dir, "timings.json").read_text())["timings"]
    return {ours: float(timings[theirs]["cold_s"]) for ours, theirs in STAGES.items()}


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


def measure(repeats: int, out_dir: str) -> dict[str, Any]:
    """Time every stage on Influenciae's model and data, and check the values; a JSON-able summary."""
    data = np.load(Path(out_dir, "data.npz"))
    x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    model = load_model(dict(np.load(Path(out_dir, "model_weights.npz"))))
    saved = dict(np.load(Path(out_dir, "tracin_checkpoints.npz")))
    checkpoints = [load_model(saved, f"ckpt{j}/") for j in range(3)]
    learning_rates = [float(r) for r in saved["learning_rates"]]
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(TRAIN_BATCH)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(TEST_BATCH)
    seed_rcond = 10 * HIDDEN * CLASSES * float(np.finfo(np.float32).eps)

    # Influenciae's stages run in the process that has just trained its model (TensorFlow's
    # kernels started); ours load the weights in a fresh one, so the model is evaluated once first,
    # as a user's would be after loading (the checkpoints are not: their first calls are timed).
    model(x_test[:TEST_BATCH], training=False)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=logits_loss())
    timings: dict[str, list[float]] = {}
    results: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any]) -> None:
        timing, results[name] = cold_and_warm(fn, repeats)
        timings[name] = list(timing)

    # The seed's views, as an Influenciae user reads them (datasets read back to arrays).
    stage("exact IHVP build", lambda: ExactIHVP(influence_model, train_ds, rcond=seed_rcond))
    ihvp = results["exact IHVP build"]
    calculator = FirstOrderInfluenceCalculator(influence_model, train_ds, ihvp_calculator=ihvp)
    stage("self-influence", lambda: read_self_influence(calculator.compute_influence_values(train_ds)))
    stage(
        "test x train matrix",
        lambda: read_nested(calculator.estimate_influence_values_in_batches(test_ds, train_ds)),
    )
    stage("per-query top-10", lambda: read_top_k(calculator.top_k(test_ds, train_ds, K)))
    models = [InfluenceModel(c, start_layer=-1, loss_function=logits_loss()) for c in checkpoints]
    tracin = TracIn(models, learning_rates)
    stage("TracIn self-influence", lambda: read_self_influence(tracin.compute_influence_values(train_ds)))
    stage("TracIn test x train", lambda: read_nested(tracin.estimate_influence_values_in_batches(test_ds, train_ds)))
    native = {
        "self_influence": lambda: calculator.self_influence(train_ds),
        "influence_matrix": lambda: calculator.influence_matrix(test_ds, train_ds),
        "top_k_indices": lambda: calculator.top_k_indices(test_ds, train_ds, K),
        "TracIn self_influence": lambda: tracin.self_influence(train_ds),
        "TracIn influence_matrix": lambda: tracin.influence_matrix(test_ds, train_ds),
    }
    native_warm = {name: cold_and_warm(fn, max(repeats, 1))[0].warm for name, fn in native.items()}
    floor = floor_seconds(model, x_train, x_test, influence_model.nb_params)

    # -- the same numbers: Influenciae's saved outputs, and an independent float64 computation ---
    g_train, _ = last_kernel_gradients(model, x_train, y_train)
    g_test, _ = last_kernel_gradients(model, x_test, y_test)
    inverse = pinv_hermitian(last_kernel_hessian(model, x_train), seed_rcond)
    oracle_matrix = g_test @ inverse @ g_train.T
    order = np.argsort(-oracle_matrix, axis=1, kind="stable")[:, :K]
    pairs = ((x_train, y_train), (x_test, y_test))
    grads = [[last_kernel_gradients(c, x, y)[0] for x, y in pairs] for c in checkpoints]
    oracles = {
        "self-influence": np.einsum("np,pq,nq->n", g_train, inverse, g_train),
        "test x train matrix": oracle_matrix,
        "per-query top-10": np.take_along_axis(oracle_matrix, order, axis=1),
        "TracIn self-influence": sum(lr * np.sum(tr**2, axis=1) for lr, (tr, _) in zip(learning_rates, grads)),
        "TracIn test x train": sum(lr * te @ tr.T for lr, (tr, te) in zip(learning_rates, grads)),
    }
    errors = {}
    for name, ref in oracles.items():
        theirs = np.load(Path(out_dir, OUTPUTS[name]))
        ours = np.asarray(results[name])
        scale = float(np.max(np.abs(ref)))
        errors[name] = [scale, float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ours - theirs)))]
    return {"timings": timings, "native_warm": native_warm, "floor": floor, "errors": errors}


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


def report(runs: list[dict[str, Any]], influenciae: list[dict[str, float]], same_run: bool) -> None:
    """Print the medians over runs: seconds, cold / warm, and Influenciae's cold seconds over ours."""
    names = list(STAGES)
    med = {n: [float(np.median([r["timings"][n][i] for r in runs])) for i in range(3)] for n in names}
    theirs = {n: float(np.median([t[n] for t in influenciae])) for n in names}
    rows = [[n, *med[n][:2], med[n][0] / med[n][1], theirs[n], theirs[n] / med[n][0]] for n in names]
    total = [sum(med[n][i] for n in names) for i in range(2)]
    their_total = sum(theirs.values())
    rows.append(["total", *total, total[0] / total[1], their_total, their_total / total[0]])
    floor = float(np.median([r["floor"] for r in runs]))
    print(f"Machine: {machine()}; shared with other jobs: the ratios count, the seconds swing.")
    print(
        f"Workload: Influenciae's bench (MLP {D}-{HIDDEN}-{HIDDEN}-{CLASSES}, last kernel, 320 params), "
        f"{N_TRAIN} x {N_TEST}"
    )
    print(
        f"Median of {len(runs)} run(s), each: Influenciae 0.3.0 (TF 2.15) then Vestigia, in fresh processes"
        + ("" if same_run else " (Influenciae's seconds REUSED from --influenciae-out: not same-run)")
    )
    print_table(
        ["stage (seed API)", "cold s", "warm s", "cold / warm", "Influenciae cold s", "Influenciae / Vestigia"], rows
    )
    print("target: total >= 30x, every stage >= 10x, cold")
    print(f"floor (one forward pass over train+test + the score products, warm): {floor:.4f} s")
    native = {n: float(np.median([r["native_warm"][n] for r in runs])) for n in runs[0]["native_warm"]}
    print("\nVestigia's array API (warm):")
    print_table(["call", "warm s", "warm / floor"], [[n, v, v / floor] for n, v in native.items()])
    print("\nSame numbers: Vestigia vs Influenciae's saved outputs, and vs a float64 NumPy oracle (first run):")
    print_table(
        ["quantity", "max |oracle|", "rel diff vs oracle", "rel diff vs Influenciae"],
        [[n, f"{m:.4g}", f"{e / m:.2e}", f"{i / m:.2e}"] for n, (m, e, i) in runs[0]["errors"].items()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per stage (median reported)")
    parser.add_argument("--runs", type=int, default=1, help="runs (Influenciae + Vestigia) to take medians over")
    parser.add_argument(
        "--influenciae-python",
        default=os.path.join(os.environ.get("INFLUENCIAE_REFENV", "/work/influenciae-ref"), "bin", "python"),
    )
    parser.add_argument("--influenciae-out", help="reuse an earlier Influenciae output folder (not same-run)")
    parser.add_argument("--json-from", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_from:  # the Vestigia half, in a fresh process
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(measure(args.repeats, args.json_from)))
        return
    runs, influenciae = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            out_dir = args.influenciae_out or scratch
            if args.influenciae_out:
                influenciae.append(read_influenciae(out_dir))
            else:
                influenciae.append(run_influenciae(out_dir, args.influenciae_python))
            command = [sys.executable, __file__, "--json-from", out_dir, "--repeats", str(args.repeats)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
    report(runs, influenciae, same_run=not args.influenciae_out)


if __name__ == "__main__":
    main()
