"""LoGra with the K-FAC inverse in the projected space (`curvature="kfac"`) against its oracles:
the dense NumPy inverse of explicitly projected Kronecker factors, and the full K-FAC solver."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, softmax
from whole_models import images, resnet

from vestigia import BaseInfluenceModel, FirstOrderInfluenceCalculator, LoGra
from vestigia.projection import FactoredProjection

# float32 features and captures (relative rounding ~1e-7) against float64 oracles; the damped
# inverse amplifies it by at most cond(F~ + lambda), ~10-100 here. Largest error seen: 3.7e-7.
RTOL = 1e-5


def _dense_layer_problem(seed: int = 0):
    x, y = make_classification(n=40, d=6, classes=5, seed=seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])
    return model, BaseInfluenceModel(model, loss_function=logits_loss()), x, y


def _projected_kfac_oracle(model, projection, x_train, y_train, x_test, y_test, damping):
    """Scores `phi_test (A~ (x) S~ + lambda I)^-1 phi_train^T` and self-influence from explicitly
    projected inputs and output gradients of a single `Dense` layer (empirical Fisher)."""
    kernel, bias = (np.asarray(w, np.float64) for w in model.layers[0].weights)
    p_in = projection.inputs[0].numpy().astype(np.float64)  # (n_in + 1, k_in): P_in^T
    p_out = projection.outputs[0].numpy().astype(np.float64)  # (n_out, k_out): P_out^T

    def projected(x, y):
        a = np.concatenate([x, np.ones((len(x), 1))], axis=1) @ p_in
        d = (softmax(x @ kernel + bias) - y) @ p_out  # d loss / d logits of the cross-entropy
        return a, d

    a, d = projected(x_train.astype(np.float64), y_train)
    factor_in, factor_out = a.T @ a / len(a), d.T @ d / len(d)
    curvature = np.kron(factor_in, factor_out)
    if damping is None:  # 0.1 x the mean eigenvalue of A~ (x) S~
        damping = 0.1 * np.trace(curvature) / len(curvature)
    inverse = np.linalg.inv(curvature + damping * np.eye(len(curvature)))
    phi_train = np.einsum("ni,no->nio", a, d).reshape(len(a), -1)  # row-major vec(a~ d~^T) = a~ (x) d~
    a_test, d_test = projected(x_test.astype(np.float64), y_test)
    phi_test = np.einsum("ni,no->nio", a_test, d_test).reshape(len(a_test), -1)
    return phi_test @ inverse @ phi_train.T, np.einsum("ni,ij,nj->n", phi_train, inverse, phi_train)


@pytest.mark.parametrize("damping", [None, 1e-2])
def test_projected_kfac_equals_the_dense_inverse_of_projected_kronecker_factors(damping) -> None:
    model, watched, x, y = _dense_layer_problem()
    projection = FactoredProjection(watched, k_in=3, k_out=2, kind="gaussian", seed=1)
    assert projection.output_blocks == [6]  # both sides projected: 7 -> 3 inputs (bias row included), 5 -> 2
    train, test = batched(x, y, 16), batched(x[:7], y[:7], 7)
    logra = LoGra(watched, train, projection=projection, curvature="kfac", fisher="empirical", damping=damping)
    scores, self_influence = _projected_kfac_oracle(model, projection, x, y, x[:7], y[:7], damping)
    assert_close(logra.influence_matrix(test, train), scores, RTOL)
    assert_close(logra.self_influence(train), self_influence, RTOL)
    assert (logra.self_influence(train) > 0).all()


@pytest.mark.parametrize("damping", [None, 3e-3])
@pytest.mark.parametrize("weighted", [False, True])
def test_projected_kfac_with_identity_projections_is_the_full_kfac_influence(damping, weighted) -> None:
    """`k >= n` on both sides of every layer: the projection is the identity and the projected
    factors are K-FAC's own (true Fisher, the same seeded labels), so the scores must match."""
    x, y = make_classification(n=48, d=5, classes=3)
    model = make_mlp()
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    projection = FactoredProjection(watched, k_in=100, k_out=100, seed=4)
    assert projection.inputs == [None, None] and projection.outputs == [None, None]
    if weighted:
        weights = np.random.default_rng(1).uniform(0.2, 2.0, len(x)).astype(np.float32)
        train = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(16)
    else:
        train = batched(x, y, 16)
    test = batched(x[:9], y[:9], 9)
    logra = LoGra(watched, train, projection=projection, curvature="kfac", seed=7, damping=damping)
    kfac = FirstOrderInfluenceCalculator(watched, train, "kfac", seed=7, damping=damping)
    assert_close(logra.influence_matrix(test, train), kfac.influence_matrix(test, train), RTOL)
    assert_close(logra.self_influence(train), kfac.self_influence(train), RTOL)


def test_projected_kfac_with_identity_projections_on_a_cnn_with_batch_norm_is_the_full_kfac_influence() -> None:
    """Conv layers (projected patches) and BatchNorm's scale and offset (the diagonal block of the
    weights without a Kronecker form) against `"kfac"` over the same model. An absolute damping:
    with the default fraction, `"kfac"` damps each such weight by its own mean, LoGra the block."""
    x, y = images(24)
    with pytest.warns(UserWarning, match="batch_normalization"):
        watched = BaseInfluenceModel(resnet(batch_norm=True), loss_function=logits_loss())
        projection = FactoredProjection(watched, k_in=1000, k_out=1000, seed=4)
    assert all(p is None for p in projection.inputs + projection.outputs) and projection.others is None
    train, test = batched(x, y, 8), batched(x[:5], y[:5], 5)
    logra = LoGra(watched, train, projection=projection, curvature="kfac", seed=2, damping=1e-2)
    with pytest.warns(UserWarning, match="batch_normalization"):
        kfac = FirstOrderInfluenceCalculator(watched, train, "kfac", seed=2, damping=1e-2)
    assert_close(logra.influence_matrix(test, train), kfac.influence_matrix(test, train), RTOL)
    assert_close(logra.self_influence(train), kfac.self_influence(train), RTOL)


def test_projected_kfac_is_not_the_gram_inverse_and_both_rank_alike() -> None:
    """Two curvatures of the same projected gradients: different values, strongly related rankings."""
    x, y = make_classification(n=60, d=5, classes=3)
    watched = BaseInfluenceModel(make_mlp(), loss_function=logits_loss())
    projection = FactoredProjection(watched, k_in=3, k_out=2, seed=0)
    train = batched(x, y, 20)
    gram = LoGra(watched, train, projection=projection).self_influence(train)
    kfac = LoGra(watched, train, projection=projection, curvature="kfac").self_influence(train)
    assert not np.allclose(gram, kfac, rtol=1e-2)
    assert np.corrcoef(np.argsort(np.argsort(gram)), np.argsort(np.argsort(kfac)))[0, 1] > 0.5


def test_bad_curvature_and_fisher_are_refused() -> None:
    x, y = make_classification(n=20, d=5, classes=3)
    watched = BaseInfluenceModel(make_mlp(), loss_function=logits_loss())
    with pytest.raises(ValueError, match="curvature"):
        LoGra(watched, batched(x, y, 10), curvature="newton")
    with pytest.raises(ValueError, match="fisher"):
        LoGra(watched, batched(x, y, 10), curvature="kfac", fisher="observed")
    with pytest.raises(ValueError, match="damping_fraction"):
        LoGra(watched, batched(x, y, 10), curvature="kfac", damping_fraction=-1.0)
