"""Traced functions are traced once per instance, and the Hessian's fast paths are exact.

Oracles: `oracles.autodiff_mean_hessian` (two nested tapes on the whole Keras model, no
trunk / head split) and per-example loops. Hessians are float32 sums: `HESS_RTOL` relative to
the largest entry.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, autodiff_mean_hessian, loop_gradients

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, TracIn
from vestigia.curvature import mean_hessian
from vestigia.errors import SpectrumWarning
from vestigia.gradients.autodiff import HESSIAN_ROWS_PER_CHUNK

HESS_RTOL = 1e-5


def _smoothed_loss() -> keras.losses.Loss:
    """Softmax cross-entropy with label smoothing: no closed form, autodiff (traced)."""
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)


def _run_every_batch_size(im: InfluenceModel) -> None:
    """Batches of 16, 7 and a partial last batch, train and test sets, first-order and TracIn."""
    x, y = make_classification(n=37, seed=1)
    calculator = FirstOrderInfluenceCalculator(im, batched(x, y, 16), ihvp_calculator="exact")
    for batch_size in (16, 7, 5):
        calculator.self_influence(batched(x, y, batch_size))
        calculator.influence_matrix(batched(x[:9], y[:9], 4), batched(x, y, batch_size))
    tracin = TracIn([im], [0.1])
    for batch_size in (16, 7):
        tracin.self_influence(batched(x, y, batch_size))
        tracin.influence_matrix(batched(x[:9], y[:9], 4), batched(x, y, batch_size))


def test_one_trace_for_every_batch_size() -> None:
    """Without a closed form (label smoothing), each traced function of a model is traced once."""
    im = InfluenceModel(make_mlp(seed=1), start_layer=-1, loss_function=_smoothed_loss())
    assert im.differentiator.closed_form is None
    _run_every_batch_size(im)
    assert im._checked_trunk.tracing_count() == 1  # the trunk with its finiteness flag (Hessian batches)
    assert im._trunk_and_gradients.tracing_count() == 1
    assert im._trunk_and_factors.tracing_count() == 1


def test_closed_form_head_traces_nothing() -> None:
    """Softmax cross-entropy on a Dense head: gradients, factors and curvature in closed form, the
    trunk eager: no function is traced at all (no cold-start tax)."""
    im = InfluenceModel(make_mlp(seed=1), start_layer=-1, loss_function=logits_loss())
    assert im.differentiator.closed_form is not None
    _run_every_batch_size(im)
    differentiator = im.differentiator
    traced = [im._trunk, differentiator._traced_gradients, differentiator._traced_losses, differentiator._traced_hvp]
    assert [fn.tracing_count() for fn in traced] == [0, 0, 0, 0]
    assert differentiator._dense_hessian.tracing_count() == 0 and differentiator._dense_factors.tracing_count() == 0


@pytest.mark.parametrize("use_bias", [True, False])
def test_kronecker_hessian_of_a_hidden_dense_layer(use_bias: bool) -> None:
    """One watched Dense layer followed by an activation and another layer: the Kronecker form
    `sum_i (a_i a_i^T) (x) d^2 l_i / d z_i^2` is the whole Hessian, not only its last-layer case."""
    x, y = make_classification(n=21, d=5, classes=3, seed=2)
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(6, activation="tanh", use_bias=use_bias),
            keras.layers.Dense(3),
        ]
    )
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    assert im.differentiator._kronecker_layer is model.layers[1]
    expected = autodiff_mean_hessian(model, im.weights, logits_loss(), x, y)
    assert_close(mean_hessian(im, batched(x, y, 8)), expected, HESS_RTOL)


def test_generic_hessian_in_several_chunks() -> None:
    """Two watched layers (no Kronecker form), more parameters than one chunk of HVP rows."""
    x, y = make_classification(n=19, d=5, classes=3, seed=3)
    model = make_mlp(d=5, hidden=8, classes=3, seed=3)
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    assert im.differentiator._kronecker_layer is None and im.nb_params > HESSIAN_ROWS_PER_CHUNK
    expected = autodiff_mean_hessian(model, im.weights, logits_loss(), x, y)
    assert_close(mean_hessian(im, batched(x, y, 8)), expected, HESS_RTOL)
    with pytest.warns(SpectrumWarning, match="negative"):  # an untrained two-layer head is indefinite
        ihvp = ExactIHVP(im, batched(x, y, 8), damping=0.1, indefinite="signed")
    vectors = np.random.default_rng(3).normal(size=(2, im.nb_params))
    assert_close(ihvp.solve64(vectors), np.linalg.solve(expected + 0.1 * np.eye(im.nb_params), vectors.T).T, 1e-4)


def test_hessian_is_float64() -> None:
    x, y = make_classification(n=8, seed=4)
    im = InfluenceModel(make_mlp(seed=4), start_layer=-1, loss_function=logits_loss())
    batch = next(im.feature_batches(batched(x, y, 8)))
    assert im.differentiator.hessian(batch.features, batch.targets, batch.weights).dtype == tf.float64


class _StaticBatchReshape(keras.layers.Layer):
    """A layer written for a static batch size (`x.shape[0]` in Python)."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(x, [x.shape[0], -1])


def test_code_needing_a_static_batch_size_still_runs() -> None:
    x, y = make_classification(n=12, seed=5)
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((5,), batch_size=12),
            keras.layers.Dense(4, activation="tanh"),
            _StaticBatchReshape(),
            keras.layers.Dense(3),
        ]
    )
    im = InfluenceModel(model, start_layer=-1, loss_function=_smoothed_loss())  # traced, not closed form
    values = TracIn([im], [1.0]).self_influence(batched(x, y, 12))
    traced = im._trunk_and_factors
    assert [fn is traced._fallback for fn in traced._traced.values()] == [True]
    expected = loop_gradients(model, im.weights, _smoothed_loss(), x, y)
    assert_close(values, np.sum(expected**2, axis=1), HESS_RTOL)
