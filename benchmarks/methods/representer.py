"""RPS-L2 and RPS-LJE on Influenciae 0.3.0's reference workload: timings and oracle errors.

Synthetic 20-dimensional blobs, 10 classes, MLP 20-32-32-10 (last Dense without bias), softmax
cross-entropy on logits, trained 3 epochs with SGD (seeded, not timed); 2,000 training points
in batches of 100, 100 test points in batches of 50.

Times (seconds): construction (RPS-L2: features + Newton fit of the surrogate; RPS-LJE:
features, ascent step, exact Hessian of the last layer), self-influence of the training set,
and the full test x train matrix, each COLD (first call, tracing included) and WARM (median of
further calls; construction: a second instance). The last table compares the values with an
independent float64 numpy computation (dense Newton on a Kronecker Hessian for the surrogate,
closed-form gradients and Hessian, dense solves).

Run: `python benchmarks/methods/representer.py` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import blobs, head_inputs, logits_loss, machine, print_table, softmax  # noqa: E402

from vestigia import InfluenceModel  # noqa: E402
from vestigia.methods.representer_l2 import RepresenterPointL2  # noqa: E402
from vestigia.methods.representer_lje import RepresenterPointLJE  # noqa: E402

N_TRAIN, N_TEST, D, CLASSES = 2000, 100, 20, 10
TRAIN_BATCH, TEST_BATCH = 100, 50
LAMBDA, ETA, DAMPING = 1e-3, 0.01, 1e-3


def make_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(CLASSES, use_bias=False),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


def cold_and_warm(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Seconds of the first call, median seconds of `repeats` further calls, and the result."""
    start = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm), result


def kron_hessian(f: np.ndarray, p: np.ndarray) -> np.ndarray:
    """`(1/n) sum_i (f_i f_i^T) (x) (diag(p_i) - p_i p_i^T)`, `(d * C, d * C)`."""
    curvature = np.einsum("no,op->nop", p, np.eye(p.shape[1])) - p[:, :, None] * p[:, None, :]
    d, c = f.shape[1], p.shape[1]
    return np.einsum("ni,nj,nop->iojp", f, f, curvature).reshape(d * c, d * c) / len(f)


def oracle_l2(f: np.ndarray, f_test: np.ndarray, kernel: np.ndarray) -> dict[str, np.ndarray]:
    """Surrogate by dense Newton steps, alpha, values, self-influence (float64)."""
    n, d = f.shape
    targets = softmax(f @ kernel)
    w = kernel.copy()
    for _ in range(30):
        grad = f.T @ (softmax(f @ w) - targets) / n + 2 * LAMBDA * w
        if np.abs(grad).max() < 1e-12:
            break
        hessian = kron_hessian(f, softmax(f @ w)) + 2 * LAMBDA * np.eye(d * CLASSES)
        w = w - np.linalg.solve(hessian, grad.ravel()).reshape(d, CLASSES)
    alpha = -(softmax(f @ w) - targets) / (2 * LAMBDA * n)
    c_test, c_train = np.argmax(f_test @ kernel, axis=1), np.argmax(f @ kernel, axis=1)
    values = alpha[:, c_test].T * (f_test @ f.T)
    self_influence = np.abs(alpha[np.arange(n), c_train]) * np.sum(f * f, axis=1)
    return {"test x train": values, "self-influence": self_influence, "surrogate": w}


def oracle_lje(f: np.ndarray, y: np.ndarray, f_test: np.ndarray, kernel: np.ndarray) -> dict[str, np.ndarray]:
    """Ascent step, contributions `(W_0 - H_0^-1 g_i) / n`, values, self-influence (float64)."""
    n, d = f.shape
    w0 = kernel + ETA * f.T @ (softmax(f @ kernel) - y) / n
    p0 = softmax(f @ w0)
    grads = (f[:, :, None] * (p0 - y)[:, None, :]).reshape(n, -1)
    hessian = kron_hessian(f, p0) + DAMPING * np.eye(d * CLASSES)
    contributions = ((w0.ravel()[None, :] - np.linalg.solve(hessian, grads.T).T) / n).reshape(n, d, CLASSES)
    c_test, c_train = np.argmax(f_test @ kernel, axis=1), np.argmax(f @ kernel, axis=1)
    values = np.einsum("td,idt->ti", f_test, contributions[:, :, c_test])
    self_influence = np.abs(np.einsum("id,id->i", f, contributions[np.arange(n), :, c_train]))
    return {"test x train": values, "self-influence": self_influence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per stage (median reported)")
    args = parser.parse_args()
    x_train, y_train = blobs(N_TRAIN, D, CLASSES, seed=0)
    x_test, y_test = blobs(N_TEST, D, CLASSES, seed=1)
    model = make_model(0)
    model.fit(x_train, y_train, batch_size=TRAIN_BATCH, epochs=3, shuffle=True, verbose=0)
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(TRAIN_BATCH)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(TEST_BATCH)

    builders = {
        "RPS-L2": lambda: RepresenterPointL2(model, train_ds, logits_loss(), LAMBDA),
        "RPS-LJE": lambda: RepresenterPointLJE(
            InfluenceModel(model, loss_function=logits_loss()), train_ds, damping=DAMPING, learning_rate=ETA
        ),
    }
    rows, results = [], {}
    for name, build in builders.items():
        build_cold, build_warm, calculator = cold_and_warm(build, 1)
        self_cold, self_warm, self_values = cold_and_warm(lambda c=calculator: c.self_influence(train_ds), args.repeats)
        mat_cold, mat_warm, matrix = cold_and_warm(
            lambda c=calculator: c.influence_matrix(test_ds, train_ds), args.repeats
        )
        rows += [
            [f"{name} construction", build_cold, build_warm],
            [f"{name} self-influence", self_cold, self_warm],
            [f"{name} test x train", mat_cold, mat_warm],
        ]
        results[name] = {"test x train": matrix, "self-influence": self_values, "calculator": calculator}

    f_train, f_test = head_inputs(model, x_train), head_inputs(model, x_test)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    oracles = {
        "RPS-L2": oracle_l2(f_train, f_test, kernel),
        "RPS-LJE": oracle_lje(f_train, y_train.astype(np.float64), f_test, kernel),
    }
    errors = []
    for name, oracle in oracles.items():
        for quantity in ("test x train", "self-influence"):
            ref, got = oracle[quantity], results[name][quantity]
            diff = float(np.max(np.abs(got - ref)))
            errors.append(
                [f"{name} {quantity}", f"{np.abs(ref).max():.4g}", f"{diff:.3g}", f"{diff / np.abs(ref).max():.2e}"]
            )
    surrogate = results["RPS-L2"]["calculator"].surrogate_kernel
    diff = float(np.max(np.abs(surrogate - oracles["RPS-L2"]["surrogate"])))
    errors.append(["RPS-L2 surrogate kernel", f"{np.abs(surrogate).max():.4g}", f"{diff:.3g}", "-"])

    print(f"Machine: {machine()}")
    print(f"Workload: MLP {D}-32-32-{CLASSES} (last Dense without bias), {N_TRAIN} train x {N_TEST} test,")
    print(f"  lambda={LAMBDA} (RPS-L2), learning_rate={ETA}, exact IHVP with damping={DAMPING} (RPS-LJE)")
    fit = results["RPS-L2"]["calculator"].fit
    print(f"RPS-L2 surrogate: {fit.iterations} Newton steps, max |grad| = {fit.gradient_norm:.2e}")
    print_table(["stage", "cold s", "warm s"], rows)
    print("\nCorrectness vs an independent float64 numpy computation:")
    print_table(["quantity", "max |oracle|", "max abs diff", "max rel diff"], errors)


if __name__ == "__main__":
    main()
