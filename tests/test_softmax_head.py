"""The closed form of a Dense head under softmax cross-entropy, against autodiff oracles.

Oracles (independent of Vestigia): `loop_gradients`, one `tf.GradientTape` per example on the
whole Keras model, and `autodiff_mean_hessian`, two nested tapes on the whole model. The closed
form works in float64 from float32 features; the oracles run in float32, so gradients agree to
`GRAD_RTOL` and Hessian sums (float32 accumulation over the data in the oracle) to `HESS_RTOL`,
both relative to the largest entry.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_classification
from oracles import assert_close, autodiff_mean_hessian, loop_gradients

from vestigia import InfluenceModel, TracIn
from vestigia.curvature import mean_hessian
from vestigia.model.influence_model import BaseInfluenceModel

GRAD_RTOL = 1e-5
HESS_RTOL = 1e-5
N, D, CLASSES = 23, 5, 4


def _model(activation: str | None, use_bias: bool, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(CLASSES, activation=activation, use_bias=use_bias),
        ]
    )


def _labels(kind: str, onehot: np.ndarray) -> np.ndarray:
    """One-hot, integer `(n,)`, integer `(n, 1)`, or soft labels that do not sum to 1."""
    if kind == "onehot":
        return onehot
    if kind == "sparse":
        return onehot.argmax(axis=1).astype(np.int32)
    if kind == "sparse_column":
        return onehot.argmax(axis=1).astype(np.int64)[:, None]
    rng = np.random.default_rng(1)
    return (0.7 * rng.dirichlet(np.ones(CLASSES), len(onehot))).astype(np.float32)


def _written_out_loss(y: object, logits: object) -> tf.Tensor:
    """`sum_c y_c * logsumexp(z) - <y, z>`, for logits `z`, in plain TensorFlow ops."""
    y = tf.cast(y, tf.float32)
    return tf.reduce_sum(y, axis=1) * tf.reduce_logsumexp(logits, axis=1) - tf.reduce_sum(y * logits, axis=1)


def _loss(sparse: bool, from_logits: bool) -> keras.losses.Loss:
    cls = keras.losses.SparseCategoricalCrossentropy if sparse else keras.losses.CategoricalCrossentropy
    return cls(from_logits=from_logits, reduction=None)


def _dataset(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, batch: int = 8) -> tf.data.Dataset:
    parts = (x, y) if weights is None else (x, y, weights)
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch)


CASES = [
    # (activation, from_logits, labels, use_bias, watch)
    (None, True, "onehot", True, "layer"),
    (None, True, "onehot", False, "layer"),
    (None, True, "onehot", True, "kernel"),
    ("softmax", False, "onehot", True, "layer"),
    (None, True, "sparse", True, "layer"),
    ("softmax", False, "sparse_column", False, "layer"),
    (None, True, "soft", True, "layer"),
]


def _influence_model(model: keras.Model, loss: keras.losses.Loss, watch: str) -> BaseInfluenceModel:
    if watch == "kernel":
        return BaseInfluenceModel(model, [model.layers[-1].kernel], loss)
    return InfluenceModel(model, start_layer=-1, loss_function=loss)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("activation", "from_logits", "labels", "use_bias", "watch"), CASES)
def test_closed_form_gradients_and_hessian_match_autodiff(
    activation: str | None, from_logits: bool, labels: str, use_bias: bool, watch: str, weighted: bool
) -> None:
    x, onehot = make_classification(n=N, d=D, classes=CLASSES, seed=3)
    y = _labels(labels, onehot)
    weights = np.random.default_rng(2).uniform(0.2, 2.0, N).astype(np.float32) if weighted else None
    model = _model(activation, use_bias)
    loss = _loss(labels.startswith("sparse"), from_logits)
    im = _influence_model(model, loss, watch)
    assert im.differentiator.closed_form is not None

    # TensorFlow's gradient of softmax cross-entropy is `p - y`, exact only for labels summing to
    # 1; for soft labels that do not, the oracle differentiates the loss written out instead.
    oracle_loss = _written_out_loss if labels == "soft" else loss
    expected = loop_gradients(model, im.weights, oracle_loss, x, y, weights)
    rows = [im.example_gradients(b)[1].numpy() for b in _batches(im, x, y, weights)]
    assert_close(np.concatenate(rows), expected, GRAD_RTOL)
    # TracIn self-influence goes through the factored form (a_i, d_i).
    tracin = TracIn([im], [1.0])
    assert_close(tracin.self_influence(_dataset(x, y, weights)), np.sum(expected**2, axis=1), GRAD_RTOL)

    w = np.ones(N, np.float32) if weights is None else weights
    weighted_loss: Callable[[object, object], tf.Tensor] = lambda t, p: oracle_loss(t, p) * w  # noqa: E731
    hessian = autodiff_mean_hessian(model, im.weights, weighted_loss, x, y)
    assert_close(mean_hessian(im, _dataset(x, y, weights)), hessian, HESS_RTOL)
    batch = next(im.feature_batches(_dataset(x, y, weights, batch=N)))
    vectors = np.random.default_rng(4).normal(size=(3, im.nb_params)).astype(np.float32)
    products = im.differentiator.hvp(batch.features, batch.targets, batch.weights, tf.constant(vectors))
    assert_close(products.numpy(), vectors @ (hessian * N), HESS_RTOL)
    summed = im.differentiator.hessian(batch.features, batch.targets, batch.weights).numpy()
    assert_close(summed, hessian * N, HESS_RTOL)


def _batches(im: BaseInfluenceModel, x: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> list:
    from vestigia.data.dataset import iterate_batches

    return list(iterate_batches(_dataset(x, y, weights), im.process_batch_for_loss_fn))


FALLBACKS = {
    "label smoothing": (None, lambda: keras.losses.CategoricalCrossentropy(True, 0.1, reduction=None)),
    "mean squared error": (None, lambda: keras.losses.MeanSquaredError(reduction=None)),
    "probabilities without softmax": (None, lambda: keras.losses.CategoricalCrossentropy(False, reduction=None)),
    "logits after a softmax": ("softmax", lambda: keras.losses.CategoricalCrossentropy(True, reduction=None)),
    "ignored class": (None, lambda: keras.losses.SparseCategoricalCrossentropy(True, ignore_class=0, reduction=None)),
    "another axis": (None, lambda: keras.losses.CategoricalCrossentropy(True, axis=0, reduction=None)),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_other_losses_fall_back_to_autodiff(case: str) -> None:
    """Where the closed form would not be exact, it is not used, and autodiff gives the oracle."""
    activation, make_loss = FALLBACKS[case]
    x, onehot = make_classification(n=N, d=D, classes=CLASSES, seed=5)
    y = onehot.argmax(axis=1).astype(np.int32) if case == "ignored class" else onehot
    model = _model(activation, use_bias=True)
    loss = make_loss()
    im = InfluenceModel(model, start_layer=-1, loss_function=loss)
    assert im.differentiator.closed_form is None and im.block_rows() is None
    if case == "another axis":
        return  # a loss over the batch axis is not per-example; only its detection matters here
    expected = loop_gradients(model, im.weights, loss, x, y)
    rows = [im.example_gradients(b)[1].numpy() for b in _batches(im, x, y, None)]
    assert_close(np.concatenate(rows), expected, GRAD_RTOL)


def test_heads_other_than_one_dense_layer_fall_back() -> None:
    """Two watched layers, a Dense layer followed by more layers, a subclassed loss: autodiff."""
    model = _model(None, use_bias=True)
    two_layers = InfluenceModel(model, start_layer=-2, loss_function=_loss(False, True))
    hidden = InfluenceModel(model, start_layer=-2, last_layer=-2, loss_function=_loss(False, True))

    class MyLoss(keras.losses.CategoricalCrossentropy):
        pass

    subclassed = InfluenceModel(model, start_layer=-1, loss_function=MyLoss(from_logits=True, reduction=None))
    for im in (two_layers, hidden, subclassed):
        assert im.differentiator.closed_form is None


def test_blocks_keep_the_users_batches() -> None:
    """Merged blocks give the seed's views aligned to the user's batches, partial last one included."""
    x, onehot = make_classification(n=N, d=D, classes=CLASSES, seed=6)
    model = _model(None, use_bias=True)
    im = InfluenceModel(model, start_layer=-1, loss_function=_loss(False, True))
    tracin = TracIn([im], [0.5])
    values = tracin.compute_influence_values(_dataset(x, onehot, None, batch=5))
    sizes = [int(v.shape[0]) for _, v in values]
    assert sizes == [5, 5, 5, 5, 3]
    expected = 0.5 * np.sum(loop_gradients(model, im.weights, im.loss_function, x, onehot) ** 2, axis=1)
    assert_close(np.concatenate([v.numpy()[:, 0] for _, v in values]), expected, GRAD_RTOL)
    nested = tracin.estimate_influence_values_in_batches(
        _dataset(x[:7], onehot[:7], None, 4), _dataset(x, onehot, None, 5)
    )
    shapes = [[tuple(v.shape) for _, v in inner] for _, inner in nested]
    assert shapes == [[(4, 5)] * 4 + [(4, 3)], [(3, 5)] * 4 + [(3, 3)]]
