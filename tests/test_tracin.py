"""TracIn (TracInCP) against a per-checkpoint loop: `sum_c eta_c G_test_c G_train_c^T`.

Gradients of every checkpoint come from one `tf.GradientTape` per example
(`oracles.loop_gradients`); values are float32 dot products, hence `VALUE_RTOL` relative to
the largest value.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients

from vestigia import ORDER, InfluenceModel, InvalidModelError, TracIn

VALUE_RTOL = 1e-5
RATES = [0.1, 0.5, 2.0]


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = VALUE_RTOL) -> float:
    return assert_close(actual, expected, rtol)


@pytest.fixture(scope="module")
def setup() -> dict:
    x, y = make_classification(n=30, d=5, classes=3, seed=50)
    x_train, y_train, x_test, y_test = x[:21], y[:21], x[21:], y[21:]
    # Three checkpoints; the last watches both layers, so the parameter counts differ.
    models = [make_mlp(seed=s) for s in (50, 51, 52)]
    influence_models = [
        InfluenceModel(models[0], start_layer=1, loss_function=logits_loss()),
        InfluenceModel(models[1], start_layer=1, loss_function=logits_loss()),
        InfluenceModel(models[2], start_layer=0, last_layer=1, loss_function=logits_loss()),
    ]
    g_train = [loop_gradients(m.model, m.weights, logits_loss(), x_train, y_train) for m in influence_models]
    g_test = [loop_gradients(m.model, m.weights, logits_loss(), x_test, y_test) for m in influence_models]
    return {
        "models": influence_models,
        "g_train": g_train,
        "g_test": g_test,
        "values": sum(r * gt @ gz.T for r, gt, gz in zip(RATES, g_test, g_train)),
        "self": sum(r * np.sum(gz**2, axis=1) for r, gz in zip(RATES, g_train)),
        "train_ds": batched(x_train, y_train, 8),
        "test_ds": batched(x_test, y_test, 4),
    }


def test_values_match_the_checkpoint_loop(setup: dict) -> None:
    tracin = TracIn(setup["models"], RATES)
    assert [m.nb_params for m in setup["models"]] == [27, 27, 75]
    _close(tracin.influence_matrix(setup["test_ds"], setup["train_ds"]), setup["values"])
    vectors = np.concatenate([v.numpy() for _, v in tracin.compute_influence_vector(setup["train_ds"])])
    expected = np.concatenate([np.sqrt(r) * g for r, g in zip(RATES, setup["g_train"])], axis=1)
    _close(vectors, expected)


def test_each_checkpoint_contributes_its_own_term(setup: dict) -> None:
    total = 0.0
    for model, rate, gt, gz in zip(setup["models"], RATES, setup["g_test"], setup["g_train"]):
        single = TracIn([model], rate).influence_matrix(setup["test_ds"], setup["train_ds"])
        _close(single, rate * gt @ gz.T)
        total = total + single
    _close(total, setup["values"])


def test_self_influence_is_the_diagonal(setup: dict) -> None:
    tracin = TracIn(setup["models"], RATES)
    self_influence = tracin.self_influence(setup["train_ds"])
    _close(self_influence, setup["self"])
    _close(self_influence, np.diag(tracin.influence_matrix(setup["train_ds"], setup["train_ds"])))
    result = tracin.compute_top_k_from_training_dataset(setup["train_ds"], 3)
    np.testing.assert_array_equal(result.indices, np.argsort(-self_influence, kind="stable")[:3])


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k(setup: dict, order: ORDER) -> None:
    tracin = TracIn(setup["models"], RATES)
    matrix = tracin.influence_matrix(setup["test_ds"], setup["train_ds"])
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    values, indices = tracin.top_k_indices(setup["test_ds"], setup["train_ds"], k=5, order=order)
    np.testing.assert_array_equal(indices, np.argsort(sign * matrix, axis=1, kind="stable")[:, :5])
    _close(values, np.take_along_axis(setup["values"], indices, axis=1))


def test_linear_regression_closed_form() -> None:
    """One checkpoint of a linear model with squared error: g = 2 (x^T w + b - y) [x, 1]."""
    rng = np.random.default_rng(53)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    keras.utils.set_random_seed(53)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    w, b = model.layers[0].kernel.numpy()[:, 0].astype(np.float64), float(model.layers[0].bias.numpy()[0])
    grads = 2.0 * (x @ w + b - y[:, 0])[:, None] * np.hstack([x, np.ones((12, 1))])
    tracin = TracIn([im, im], [0.3, 0.7])  # the same checkpoint twice: rates add up to 1
    _close(tracin.influence_matrix(batched(x, y, 5), batched(x, y, 7)), grads @ grads.T)


def test_learning_rate_errors(setup: dict) -> None:
    models = setup["models"]
    with pytest.raises(InvalidModelError, match=r"one rate per checkpoint \(3\). Received 2"):
        TracIn(models, [0.1, 0.2])
    with pytest.raises(InvalidModelError, match="non-empty"):
        TracIn([], 0.1)
    with pytest.raises(ValueError, match="learning_rates=-1"):
        TracIn(models, [0.1, -1, 0.2])
    scalar = TracIn(models, 0.5)
    _close(
        scalar.self_influence(setup["train_ds"]),
        sum(0.5 * np.sum(g**2, axis=1) for g in setup["g_train"]),
    )
