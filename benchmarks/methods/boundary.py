"""Boundary-based self-influence on Influenciae 0.3.0's reference workload.

Synthetic 20-dimensional blobs, 10 classes, MLP 20-32-32-10 (last Dense without bias, 2,048
trainable weights), trained 3 epochs with SGD (seeded, not timed); self-influence of the 2,000
training points in batches of 100, `step_nbr=100`. Each calculator is timed COLD (first call,
tracing included) and WARM (median of further calls). For scale, the same search run one
example at a time (batches of 1, as Influenciae's `map_fn(parallel_iterations=1)` does) is
timed on the first 100 points and extrapolated to 2,000.

Run: `python benchmarks/methods/boundary.py [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import blobs, cold_and_warm, machine, print_table, timed, train_with_checkpoints  # noqa: E402
from influenciae_workload import CLASSES, LEARNING_RATE, N_TRAIN, TRAIN_BATCH, D, make_model  # noqa: E402

from vestigia.methods.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator  # noqa: E402

STEP_NBR = 100
N_ONE_BY_ONE = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per calculator (median reported)")
    args = parser.parse_args()

    x_train, y_train = blobs(N_TRAIN, D, CLASSES, seed=0)
    model = make_model(0)
    train_with_checkpoints(model, x_train, y_train, epochs=3, batch_size=TRAIN_BATCH, lr=LEARNING_RATE)
    weights_before = [w.copy() for w in model.get_weights()]
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(TRAIN_BATCH)
    first = tf.data.Dataset.from_tensor_slices((x_train[:N_ONE_BY_ONE], y_train[:N_ONE_BY_ONE]))

    rows, distances = [], []
    for name, calculator_class in (("sample", SampleBoundaryCalculator), ("weights", WeightsBoundaryCalculator)):
        calculator = calculator_class(model, step_nbr=STEP_NBR)
        timing, scores = cold_and_warm(lambda c=calculator: c.self_influence(train_ds), args.repeats)
        one_by_one = calculator_class(model, step_nbr=STEP_NBR)
        one_by_one.self_influence(first.take(2).batch(1))  # trace once
        seconds, single = timed(lambda c=one_by_one: c.self_influence(first.batch(1)))
        np.testing.assert_allclose(single, scores[:N_ONE_BY_ONE], rtol=1e-3, atol=1e-4)
        extrapolated = seconds * N_TRAIN / N_ONE_BY_ONE
        rows.append(
            [f"{name} boundary", timing.cold, timing.cold_cpu, timing.warm, extrapolated, extrapolated / timing.warm]
        )
        distances.append(f"{name}: mean {-np.mean(scores):.3f}, min {-np.max(scores):.3g}, max {-np.min(scores):.3f}")

    for w, w0 in zip(model.get_weights(), weights_before):
        np.testing.assert_array_equal(w, w0)
    print(f"Machine: {machine()}")
    print(f"Workload: MLP {D}-32-32-{CLASSES}, {model.count_params()} weights, {N_TRAIN} train, batch {TRAIN_BATCH}")
    print_table(
        ["self-influence", "cold s", "cold CPU s", "warm s", "one-by-one s (extrap.)", "one-by-one / warm"], rows
    )
    print("Distances to the boundary: " + "; ".join(distances))
    print("Model weights unchanged: yes")


if __name__ == "__main__":
    main()
