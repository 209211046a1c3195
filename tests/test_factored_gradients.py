"""Factored Dense gradients (`<g_i, g_j> = <a_i, a_j><d_i, d_j>`) and TracIn's factored scoring.

Oracle: per-example gradients from one `tf.GradientTape` per example on the whole Keras model
(`oracles.loop_gradients`), multiplied in float64 NumPy. Everything compared is float32:
`RTOL` relative to the largest entry (sums of at most a few hundred float32 products).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients

from vestigia import InfluenceModel, TracIn
from vestigia.data import iterate_batches
from vestigia.gradients.factored import (
    expand_factors,
    factored_inner_products,
    factored_squared_norms,
)

RTOL = 1e-5


def _two_layer_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(7, activation="tanh"),
            keras.layers.Dense(6, activation="relu", use_bias=False),
            keras.layers.Dense(3),
        ]
    )


def _factors(im: InfluenceModel, dataset: tf.data.Dataset) -> np.ndarray:
    parts = []
    for batch in iterate_batches(dataset):
        result = im.example_factors(batch)
        assert result is not None
        parts.append(result[1].numpy())
    return np.concatenate(parts)


def test_expanded_factors_are_the_gradients() -> None:
    """Two watched Dense layers (one without bias), sample weights, a partial last batch."""
    x, y = make_classification(n=23, d=5, classes=3, seed=3)
    w = np.random.default_rng(3).uniform(0.5, 2.0, len(x)).astype("float32")
    model = _two_layer_model(3)
    im = InfluenceModel(model, start_layer=1, last_layer=2, loss_function=logits_loss())
    assert im.differentiator.factor_widths == [(7, 6), (7, 3)]
    factors = _factors(im, tf.data.Dataset.from_tensor_slices((x, y, w)).batch(10))
    expected = loop_gradients(model, im.weights, logits_loss(), x, y, w)
    assert_close(expand_factors(tf.constant(factors), im.differentiator.factor_widths).numpy(), expected, RTOL)


def test_factored_inner_products_and_norms() -> None:
    x, y = make_classification(n=30, d=5, classes=3, seed=4)
    model = _two_layer_model(4)
    im = InfluenceModel(model, start_layer=1, last_layer=2, loss_function=logits_loss())
    widths = im.differentiator.factor_widths
    factors = tf.constant(_factors(im, batched(x, y, 8)))
    grads = loop_gradients(model, im.weights, logits_loss(), x, y)
    products = factored_inner_products(factors[:9], factors[9:], widths).numpy()
    assert_close(products, grads[:9] @ grads[9:].T, RTOL)
    assert_close(factored_squared_norms(factors, widths).numpy(), np.sum(grads**2, axis=1), RTOL)


def test_tracin_factored_scores_match_the_gradient_oracle() -> None:
    x, y = make_classification(n=40, d=5, classes=3, seed=5)
    xt, yt = make_classification(n=9, d=5, classes=3, seed=6)
    checkpoints = [make_mlp(d=5, hidden=8, classes=3, seed=s) for s in (5, 6)]
    models = [InfluenceModel(m, start_layer=-1, loss_function=logits_loss()) for m in checkpoints]
    rates = [0.3, 0.05]
    tracin = TracIn(models, rates)
    matrix = tracin.influence_matrix(batched(xt, yt, 4), batched(x, y, 16))
    self_influence = tracin.self_influence(batched(x, y, 16))
    assert tracin._factored == [True, True]
    grads = [
        [loop_gradients(m, im.weights, logits_loss(), a, b) for a, b in ((x, y), (xt, yt))]
        for m, im in zip(checkpoints, models)
    ]
    expected = sum(r * test @ train.T for r, (train, test) in zip(rates, grads))
    assert_close(matrix, expected, RTOL)
    assert_close(self_influence, sum(r * np.sum(train**2, axis=1) for r, (train, _) in zip(rates, grads)), RTOL)


def test_heads_without_factors_fall_back_to_gradients() -> None:
    """Dense on rank-3 inputs has no two-factor form: factors are None and TracIn multiplies
    the gradients, with the same values as the oracle."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 4, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 12)]
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh"), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    im = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=logits_loss())
    assert im.example_factors(next(iterate_batches(batched(x, y, 5)))) is None
    tracin = TracIn([im], [0.5])
    matrix = tracin.influence_matrix(batched(x[:4], y[:4], 4), batched(x, y, 5))
    assert tracin._factored == [False]
    grads = loop_gradients(model, im.weights, logits_loss(), x, y)
    assert_close(matrix, 0.5 * grads[:4] @ grads.T, RTOL)
