"""Arnoldi influence and second-order group influence on Influenciae 0.3.0's reference workload.

Synthetic 20-dimensional blobs, 10 classes, MLP 20-32-32-10 (last Dense without bias), softmax
cross-entropy on logits, last kernel watched (n_params = 320), 2,000 training and 100 test
points, batches of 100 (train) and 50 (test), trained 3 epochs with SGD (not timed).

Prints seconds (first call, tracing included) for: Arnoldi construction (subspace_dim 100,
k = 50), its self-influence and test x train matrix; second order on a group of 200 batched by
64 (exact IHVP build, group vector, group value). The last line compares Arnoldi with exact
first-order influence (Pearson correlation of the test x train values) and with the exact
projection onto the top-k eigenspace of the dense Hessian (what Arnoldi approximates).

Run: `python benchmarks/methods/second_order_arnoldi.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import blobs, logits_loss, machine, timed, train_with_checkpoints  # noqa: E402

from vestigia import FirstOrderInfluenceCalculator, InfluenceModel  # noqa: E402
from vestigia.methods.arnoldi import ArnoldiInfluenceCalculator  # noqa: E402
from vestigia.methods.second_order import SecondOrderInfluenceCalculator  # noqa: E402

N_TRAIN, N_TEST, D, CLASSES = 2000, 100, 20, 10
TRAIN_BATCH, TEST_BATCH = 100, 50
SUBSPACE_DIM, K = 100, 50
GROUP, GROUP_BATCH = 200, 64


def main() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(CLASSES, use_bias=False),
        ]
    )
    x, y = blobs(N_TRAIN + N_TEST, D, CLASSES, seed=0)
    train_with_checkpoints(model, x[:N_TRAIN], y[:N_TRAIN], epochs=3, batch_size=TRAIN_BATCH, lr=0.1)
    train = tf.data.Dataset.from_tensor_slices((x[:N_TRAIN], y[:N_TRAIN])).batch(TRAIN_BATCH)
    test = tf.data.Dataset.from_tensor_slices((x[N_TRAIN:], y[N_TRAIN:])).batch(TEST_BATCH)
    group = tf.data.Dataset.from_tensor_slices((x[:GROUP], y[:GROUP])).batch(GROUP_BATCH)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=logits_loss())

    print(machine())
    t_build, arnoldi = timed(lambda: ArnoldiInfluenceCalculator(influence_model, train, SUBSPACE_DIM, True, K, seed=0))
    t_self, _ = timed(lambda: arnoldi.self_influence(train))
    t_matrix, values = timed(lambda: arnoldi.influence_matrix(test, train))
    print(f"arnoldi build (subspace_dim={SUBSPACE_DIM}, k={K}) s: {t_build:.3f}")
    print(f"arnoldi self-influence s: {t_self:.3f}")
    print(f"arnoldi test x train s: {t_matrix:.3f}")

    t_so_build, second = timed(lambda: SecondOrderInfluenceCalculator(influence_model, train, "exact", damping=1e-3))
    t_vector, _ = timed(lambda: second.compute_influence_vector_group(group))
    t_value, _ = timed(lambda: second.estimate_influence_values_group(group))
    print(f"second order exact IHVP build s: {t_so_build:.3f}")
    print(f"second order group vector ({GROUP} by {GROUP_BATCH}) s: {t_vector:.3f}")
    print(f"second order group value ({GROUP} by {GROUP_BATCH}) s: {t_value:.3f}")

    first = FirstOrderInfluenceCalculator(influence_model, train, "exact")
    exact = first.influence_matrix(test, train)
    print(f"arnoldi vs exact first order, pearson r: {np.corrcoef(values.ravel(), exact.ravel())[0, 1]:.4f}")
    solver = first.ihvp_calculator
    top = np.argsort(-np.abs(solver.eigenvalues))[:K]
    v_k = solver.eigenvectors[:, top]
    g_test = influence_model.batch_jacobian(test).numpy().astype(np.float64)
    g_train = influence_model.batch_jacobian(train).numpy().astype(np.float64)
    projected = (g_test @ v_k / solver.eigenvalues[top]) @ (v_k.T @ g_train.T)
    error = np.abs(values - projected).max() / np.abs(projected).max()
    print(f"arnoldi vs exact top-{K} eigenspace projection, max abs error / max: {error:.2e}")


if __name__ == "__main__":
    main()
