"""Shared pieces of the speed benchmarks: timing, tables, seeded data and models, numpy oracles.

The numpy oracle is independent of Vestigia: it recomputes the forward pass from the Keras
weights and writes the per-example gradient of the last `Dense` layer under softmax
cross-entropy on logits in closed form, `g_i = a_i (x) (softmax(z_i) - y_i)` (flattened
row-major, as Keras stores the kernel; then `softmax(z_i) - y_i` for the bias), and, for a
bias-free layer, the mean Hessian `H = (1/n) sum_i (a_i a_i^T) (x) (diag(p_i) - p_i p_i^T)`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def machine() -> str:
    """CPU model name and core count (from /proc/cpuinfo when available)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, Keras {keras.__version__}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """`(seconds, result)` of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class Timing(NamedTuple):
    """Wall-clock seconds of the first call (tracing included) and median of the next calls,
    and the process CPU seconds of the first call (less sensitive to other processes)."""

    cold: float
    warm: float
    cold_cpu: float


def cold_and_warm(fn: Callable[[], Any], repeats: int = 3) -> tuple[Timing, Any]:
    """Time the first call of `fn` and the median of `repeats` further calls; return its result too."""
    cpu = time.process_time()
    cold, result = timed(fn)
    cold_cpu = time.process_time() - cpu
    warm = statistics.median(timed(fn)[0] for _ in range(repeats)) if repeats > 0 else float("nan")
    return Timing(cold, warm, cold_cpu), result


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[h for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def blobs(n: int, d: int, classes: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: float32 inputs `(n, d)` and one-hot float32 labels `(n, classes)`."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).normal(0.0, spread, (classes, d))
    labels = rng.integers(0, classes, n)
    x = (centers[labels] + rng.normal(0.0, 1.0, (n, d))).astype(np.float32)
    return x, np.eye(classes, dtype=np.float32)[labels]


def logits_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def train_with_checkpoints(
    model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float
) -> list[keras.Model]:
    """Train with SGD and return a clone of the model after each epoch (the last is `model` itself)."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss=keras.losses.CategoricalCrossentropy(True))
    checkpoints = []
    for _ in range(epochs):
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        checkpoints.append(clone)
    return checkpoints


def head_inputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Input of the last layer, float64, recomputed in numpy from the weights of a Dense chain."""
    a = x.astype(np.float64)
    for layer in model.layers[:-1]:
        weights = [w.astype(np.float64) for w in layer.get_weights()]
        a = a @ weights[0] + (weights[1] if len(weights) > 1 else 0.0)
        name = keras.activations.serialize(layer.activation)
        if name == "relu":
            a = np.maximum(a, 0.0)
        elif name == "tanh":
            a = np.tanh(a)
        elif name != "linear":
            raise ValueError(f"oracle: unsupported activation {name!r}")
    return a


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def last_kernel_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example gradients of the last Dense layer's kernel (then bias, if it has one) under
    softmax cross-entropy on logits, float64 `(n, (in [+ 1]) * classes)`, and the probabilities."""
    a = head_inputs(model, x)
    weights = [w.astype(np.float64) for w in model.layers[-1].get_weights()]
    p = softmax(a @ weights[0] + (weights[1] if len(weights) > 1 else 0.0))
    d = p - y.astype(np.float64)
    grads = (a[:, :, None] * d[:, None, :]).reshape(len(x), -1)
    return (np.concatenate([grads, d], axis=1) if len(weights) > 1 else grads), p


def last_kernel_hessian(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Mean Hessian of softmax cross-entropy w.r.t. a bias-free last Dense kernel, float64."""
    a = head_inputs(model, x)
    p = softmax(a @ model.layers[-1].get_weights()[0].astype(np.float64))
    n, d_in = a.shape
    classes = p.shape[1]
    curv = np.einsum("no,op->nop", p, np.eye(classes)) - p[:, :, None] * p[:, None, :]
    hessian = np.einsum("ni,nj,nop->iojp", a, a, curv) / n
    return hessian.reshape(d_in * classes, d_in * classes)


def pinv_hermitian(matrix: np.ndarray, rcond: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix with a relative eigenvalue cut-off."""
    return np.linalg.pinv(matrix, rtol=rcond, hermitian=True)
