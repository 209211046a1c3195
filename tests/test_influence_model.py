"""InfluenceModel: per-example gradients, Hessians and HVPs against independent oracles.

Oracles: a per-example `tf.GradientTape` loop on the whole model (`oracles.loop_gradients`),
and float64 closed forms for linear regression with squared error and for a softmax
cross-entropy Dense head. Gradients are float32: `GRAD_RTOL` relative to the largest entry.
Hessians are float32 sums of `n` terms: `HESS_RTOL` relative to the largest entry.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import (
    assert_close,
    autodiff_mean_hessian,
    loop_gradients,
    softmax_head_gradients,
    softmax_head_hessian,
)

from vestigia import InfluenceModel, InvalidModelError, NonFiniteError
from vestigia.curvature import mean_hessian
from vestigia.model import BaseInfluenceModel

GRAD_RTOL = 1e-5
HESS_RTOL = 1e-5


# -- per-example gradients against the per-example loop --------------------------------------------


def test_dense_only_head_uses_the_factored_path() -> None:
    x, y = make_classification(n=19, seed=1)
    model = make_mlp(seed=1)
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    assert im.differentiator._generic == [] and len(im.differentiator._factored) == 2
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    assert_close(im.batch_jacobian(batched(x, y, 8)).numpy(), expected, GRAD_RTOL)


def test_dense_on_rank3_inputs() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(13, 4, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 13)]
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    im = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=logits_loss())
    assert im.differentiator._generic == [] and len(im.differentiator._factored) == 3
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    assert_close(im.batch_jacobian(batched(x, y, 5)).numpy(), expected, GRAD_RTOL)
    # Hessians: all layers, and the rank-3 Dense alone, against nested tapes on the whole model.
    for watched in (im, InfluenceModel(model, start_layer=0, loss_function=logits_loss())):
        hessian = autodiff_mean_hessian(model, watched.weights, logits_loss(), x, y)
        assert_close(mean_hessian(watched, batched(x, y, 5)), hessian, HESS_RTOL)


def _conv_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="tanh", name="fc"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    bn = model.get_layer("bn")
    rng = np.random.default_rng(3)  # non-trivial statistics, so inference mode matters
    bn.moving_mean.assign(rng.normal(0, 0.5, 3).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 3).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 1.5, 3).astype("float32"))
    return model


@pytest.mark.parametrize(("start", "last", "generic"), [("conv", "bn", 4), ("conv", "logits", 4), ("fc", "logits", 0)])
def test_generic_and_mixed_paths(start: str, last: str, generic: int) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 6, 6, 2)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 9)]
    model = _conv_model()
    im = InfluenceModel(model, start_layer=start, last_layer=last, loss_function=logits_loss())
    assert len(im.differentiator._generic) == generic
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    assert_close(im.batch_jacobian(batched(x, y, 4)).numpy(), expected, GRAD_RTOL)
    # Hessian and HVP of the split model against nested tapes on the whole model.
    hessian = autodiff_mean_hessian(model, im.weights, logits_loss(), x, y)
    assert_close(mean_hessian(im, batched(x, y, 4)), hessian, HESS_RTOL)
    vectors = np.random.default_rng(41).normal(size=(3, im.nb_params))
    batch = next(im.feature_batches(batched(x, y, 9)))
    products = im.differentiator.hvp(batch.features, batch.targets, batch.weights, tf.constant(vectors, tf.float32))
    assert_close(products.numpy(), vectors @ hessian * len(x), HESS_RTOL)


def test_embedding_generic_path() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 12, (10, 5)).astype("int32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 10)]
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(12, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    im = InfluenceModel(model, start_layer=0, last_layer=2, loss_function=logits_loss())
    assert len(im.differentiator._generic) == 1
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    assert_close(im.batch_jacobian(batched(x, y, 4)).numpy(), expected, GRAD_RTOL)


def test_factored_and_generic_paths_agree() -> None:
    """The same weights seen through a subclassed wrapper (whole model, generic autodiff)."""

    class Wrapper(keras.Model):
        def __init__(self, inner: keras.Model) -> None:
            super().__init__()
            self.inner = inner

        def call(self, inputs: tf.Tensor) -> tf.Tensor:
            return self.inner(inputs)

    x, y = make_classification(n=12, seed=6)
    inner = make_mlp(seed=6)
    wrapped = Wrapper(inner)
    wrapped(x[:1])
    factored = InfluenceModel(inner, start_layer=0, last_layer=1, loss_function=logits_loss())
    generic = BaseInfluenceModel(wrapped, inner.trainable_variables, loss_function=logits_loss())
    assert generic.differentiator.head.layers is None and len(generic.differentiator._generic) == 4
    ds = batched(x, y, 5)
    assert_close(generic.batch_jacobian(ds).numpy(), factored.batch_jacobian(ds).numpy(), GRAD_RTOL)


def test_seed_gradient_views() -> None:
    x, y = make_classification(n=10, seed=7)
    model = make_mlp(seed=7)
    im = InfluenceModel(model, loss_function=logits_loss())
    expected = loop_gradients(model, im.weights, logits_loss(), x, y)
    ds = batched(x, y, 4)
    assert_close(im.batch_jacobian_tensor((x[:4], y[:4])).numpy(), expected[:4], GRAD_RTOL)
    assert_close(im.batch_gradient_tensor((x[:4], y[:4])).numpy(), expected[:4].sum(0), GRAD_RTOL)
    sums = np.stack([expected[0:4].sum(0), expected[4:8].sum(0), expected[8:].sum(0)])
    assert_close(im.batch_gradient(ds).numpy(), sums, GRAD_RTOL)
    want_losses = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)(y, model(x)).numpy()
    assert_close(im.batch_loss(ds).numpy(), want_losses, GRAD_RTOL)


# -- closed forms ------------------------------------------------------------------------------------


def _linear_regression() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(31, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(0, 0.3, 31)).astype("float32")[:, None]
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(rng.normal(size=(4, 1)).astype("float32"))
    model.layers[0].bias.assign(np.array([0.3], "float32"))
    return model, x, y


def test_linear_regression_closed_form() -> None:
    model, x, y = _linear_regression()
    im = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    assert im.start_layer == 0 and im.nb_params == 5
    w = model.layers[0].kernel.numpy().astype(np.float64)[:, 0]
    b = float(model.layers[0].bias.numpy()[0])
    x_tilde = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    residual = x.astype(np.float64) @ w + b - y[:, 0]
    grads = 2.0 * residual[:, None] * x_tilde  # d (x^T w + b - y)^2 / d (w, b)
    hessian = 2.0 * x_tilde.T @ x_tilde / len(x)
    ds = batched(x, y, 8)
    assert_close(im.batch_jacobian(ds).numpy(), grads, GRAD_RTOL)
    assert_close(mean_hessian(im, ds), hessian, HESS_RTOL)
    # Sample weights: w_i g_i and mean_i w_i H_i.
    sw = np.random.default_rng(9).uniform(0.0, 2.0, len(x)).astype("float32")
    weighted = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(6)
    assert_close(im.batch_jacobian(weighted).numpy(), sw[:, None] * grads, GRAD_RTOL)
    assert_close(mean_hessian(im, weighted), 2.0 * (x_tilde * sw[:, None]).T @ x_tilde / len(x), HESS_RTOL)


@pytest.fixture(scope="module")
def softmax_head() -> dict:
    x, y = make_classification(n=27, d=5, classes=3, seed=10)
    model = make_mlp(d=5, hidden=6, classes=3, seed=10)
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    hidden, head = model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    return {
        "x": x,
        "y": y,
        "im": im,
        "features": features,
        "kernel": head.kernel.numpy(),
        "bias": head.bias.numpy(),
    }


def test_softmax_head_gradients_and_hessian(softmax_head: dict) -> None:
    s = softmax_head
    im, x, y = s["im"], s["x"], s["y"]
    assert im.nb_params == 6 * 3 + 3
    grads = softmax_head_gradients(s["features"], s["kernel"], s["bias"], y)
    hessian = softmax_head_hessian(s["features"], s["kernel"], s["bias"])
    assert_close(im.batch_jacobian(batched(x, y, 10)).numpy(), grads, GRAD_RTOL)
    assert_close(mean_hessian(im, batched(x, y, 10)), hessian, HESS_RTOL)
    # Weighted Hessian.
    sw = np.random.default_rng(11).uniform(0.0, 3.0, len(x)).astype("float32")
    weighted = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(7)
    assert_close(mean_hessian(im, weighted), softmax_head_hessian(s["features"], s["kernel"], s["bias"], sw), HESS_RTOL)
    assert_close(im.batch_jacobian(weighted).numpy(), sw[:, None] * grads, GRAD_RTOL)


def test_kernel_only_head_hessian() -> None:
    """A Dense head without bias: the kernel block of the closed form."""
    x, y = make_classification(n=17, d=5, classes=3, seed=16)
    keras.utils.set_random_seed(16)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3, use_bias=False)]
    )
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    hidden, head = model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    full = softmax_head_hessian(features, head.kernel.numpy(), np.zeros(3))
    assert_close(mean_hessian(im, batched(x, y, 6)), full[:18, :18], HESS_RTOL)


def test_hvp_equals_hessian_times_vectors(softmax_head: dict) -> None:
    s = softmax_head
    im, x, y = s["im"], s["x"], s["y"]
    sw = np.random.default_rng(12).uniform(0.0, 3.0, len(x)).astype("float32")
    vectors = np.random.default_rng(13).normal(size=(4, im.nb_params))
    batch = im.features_of(next(iter(_batches(im, x, y, sw))))
    products = im.differentiator.hvp(batch.features, batch.targets, batch.weights, tf.constant(vectors, tf.float32))
    summed_hessian = softmax_head_hessian(s["features"], s["kernel"], s["bias"], sw) * len(x)
    assert_close(products.numpy(), vectors @ summed_hessian, HESS_RTOL)
    hessian = im.differentiator.hessian(batch.features, batch.targets, batch.weights)
    assert_close(hessian.numpy(), summed_hessian, HESS_RTOL)


def _batches(im: InfluenceModel, x: np.ndarray, y: np.ndarray, sw: np.ndarray):  # one batch of everything
    from vestigia.data import iterate_batches

    return iterate_batches(tf.data.Dataset.from_tensors((x, y, sw)))


# -- layer selection -------------------------------------------------------------------------------


def _selection_model() -> keras.Model:
    keras.utils.set_random_seed(14)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="d0"),
            keras.layers.Activation("tanh", name="act"),
            keras.layers.Dense(4, name="d2"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(3, name="d4"),
            keras.layers.Activation("softmax", name="probs"),
        ]
    )


def _watched(im: InfluenceModel) -> list[str]:
    return [v.path for v in im.weights]


@pytest.mark.parametrize(
    ("start", "last", "layers"),
    [
        (None, None, ["d4"]),  # seed default: last layer with weights from layers[-2] backwards
        (0, None, ["d0"]),
        ("d2", "d4", ["d2", "d4"]),
        (-2, -2, ["d4"]),
        (0, -1, ["d0", "d2", "d4"]),
        ("d0", 3, ["d0", "d2"]),
    ],
)
def test_start_and_last_layer(start: object, last: object, layers: list[str]) -> None:
    model = _selection_model()
    im = InfluenceModel(model, start_layer=start, last_layer=last)
    want = [v.path for name in layers for v in model.get_layer(name).trainable_variables]
    assert _watched(im) == want


def test_default_start_layer_skips_the_last_layer() -> None:
    model = make_mlp()  # [Dense, Dense]: the seed watches layers[-2], not the output layer
    assert _watched(InfluenceModel(model, loss_function=logits_loss())) == [
        v.path for v in model.layers[0].trainable_variables
    ]
    keras.utils.set_random_seed(0)
    only_last = keras.Sequential([keras.Input((2, 2)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert _watched(InfluenceModel(only_last, loss_function=logits_loss())) == [
        v.path for v in only_last.layers[1].trainable_variables
    ]


def test_layer_errors() -> None:
    model = _selection_model()
    with pytest.raises(InvalidModelError, match=r"out of range .* start_layer=7"):
        InfluenceModel(model, start_layer=7)
    with pytest.raises(InvalidModelError, match=r"out of range .* last_layer=-8"):
        InfluenceModel(model, start_layer=0, last_layer=-8)
    with pytest.raises(InvalidModelError, match="start_layer='nope'"):
        InfluenceModel(model, start_layer="nope")
    with pytest.raises(InvalidModelError, match="no trainable weights"):
        InfluenceModel(model, start_layer="act")
    with pytest.raises(InvalidModelError, match="must not come before"):
        InfluenceModel(model, start_layer="d4", last_layer="d2")
    with pytest.raises(InvalidModelError, match="built"):
        InfluenceModel(keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(2)]))
    with pytest.raises(InvalidModelError, match="Keras 3 model"):
        InfluenceModel("model")  # type: ignore[arg-type]


def test_loss_errors() -> None:
    x, y = make_classification(n=8, seed=15)
    model = make_mlp(seed=15)
    with pytest.raises(InvalidModelError, match="reduction='sum_over_batch_size'"):
        InfluenceModel(model, loss_function=keras.losses.CategoricalCrossentropy(from_logits=True))
    wrong_shape = InfluenceModel(model, loss_function=lambda t, p: tf.reduce_sum(logits_loss()(t, p), keepdims=True))
    with pytest.raises(InvalidModelError, match=r"shape \(1,\) for a batch of 4"):
        wrong_shape.batch_jacobian(batched(x, y, 4))
    per_class = InfluenceModel(model, loss_function=lambda t, p: tf.square(t - p))  # (batch, classes)
    with pytest.raises(InvalidModelError, match=r"shape \(4, 3\)"):
        per_class.batch_jacobian(batched(x, y, 4))


def test_non_finite_inputs_and_weights() -> None:
    x, y = make_classification(n=8, seed=16)
    model = make_mlp(seed=16)
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"`train_set`, batch 1 \(examples 4-7\): the inputs hold nan at"):
        for batch in im.feature_batches(batched(bad, y, 4), "train_set"):
            im.batch_losses_and_gradients(batch, "train_set")
    trunk = InfluenceModel(model, start_layer=1, loss_function=logits_loss())  # NaN goes through the trunk
    with pytest.raises(NonFiniteError, match="inputs"):
        trunk.batch_jacobian(batched(bad, y, 4))
    model.layers[1].kernel.assign(np.full((8, 3), np.nan, "float32"))
    with pytest.raises(NonFiniteError, match="model weight"):
        InfluenceModel(model, start_layer=1, loss_function=logits_loss())
