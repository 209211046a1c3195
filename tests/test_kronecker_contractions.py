"""Oracle tests for the contraction orders of the Kronecker-factored hot paths.

`Q_A^T G_i Q_S` (with `G_i = A_i^T D_i`), its squares summed over the batch (EK-FAC refit) and
its weighted squares per example (self-influence) are computed either by rotating `A_i`, `D_i`
first or by forming `G_i` first (`rotate_first` picks by cost). Both orders must equal an
explicit float64 per-example gradient to float32 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vestigia.curvature.kronecker_factors import (
    rotate_first,
    rotated_gradients,
    summed_squares,
    weighted_squares,
)

# float32 sums of ~T * in products of O(1) terms, compared relative to the largest entry
RTOL = 2e-5


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def _close(actual: tf.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=RTOL * np.abs(expected).max())


# (T, in, out): T below in (rotate first), T above in (form G first), one position
@pytest.mark.parametrize(("positions", "n_in", "n_out", "first"), [(4, 37, 6, True), (50, 9, 5, False)])
@pytest.mark.parametrize("identity_in", [False, True])
def test_both_contraction_orders_match_explicit_per_example_gradients(
    positions: int, n_in: int, n_out: int, first: bool, identity_in: bool
) -> None:
    assert rotate_first(positions, n_in, n_out) is first
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, positions, n_in))
    d = rng.normal(size=(3, positions, n_out))
    q_in = np.eye(n_in) if identity_in else _orthogonal(n_in, rng)
    q_out = _orthogonal(n_out, rng)
    weights = rng.uniform(0.5, 2.0, size=(n_in, n_out))
    expected = np.einsum("ij,bti,bto,ok->bjk", q_in, a, d, q_out)  # Q_A^T (A_i^T D_i) Q_S

    def f32(x: np.ndarray) -> tf.Tensor:
        return tf.constant(x, tf.float32)

    tq_in = None if identity_in else f32(q_in)
    _close(rotated_gradients(f32(a), f32(d), tq_in, f32(q_out)), expected)
    _close(summed_squares(f32(a), f32(d), tq_in, f32(q_out)), (expected**2).sum(axis=0))
    _close(weighted_squares(f32(a), f32(d), tq_in, f32(q_out), f32(weights)), (expected**2 * weights).sum(axis=(1, 2)))


def test_low_rank_conv_queries_in_chunks_equal_full_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank-r queries of a conv layer (T > 1), formed a few queries at a time: at full rank they
    give the full-rank scores; one query per chunk gives the same as one chunk for all."""
    import keras

    from vestigia import FirstOrderInfluenceCalculator
    from vestigia.curvature import EKFACIHVP, kronecker_scoring
    from vestigia.model.influence_model import BaseInfluenceModel

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 6, 6, 2)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 12)]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    im = BaseInfluenceModel(model, loss_function=loss)
    solver = EKFACIHVP(im, data, fisher="empirical")
    reference = FirstOrderInfluenceCalculator(im, data, ihvp_calculator=solver).influence_matrix(data, data)
    solver.query_rank = 19  # min(in, out) = min(19, 3) for the conv: full rank
    monkeypatch.setattr(kronecker_scoring, "QUERY_CHUNK_BYTES", 4 * 19 * 3 * 2)  # two queries per chunk
    chunked = FirstOrderInfluenceCalculator(im, data, ihvp_calculator=solver).influence_matrix(data, data)
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
