"""LoGra's factored projection against explicit per-example gradients, and its calculator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss
from oracles import assert_close, loop_gradients
from whole_models import images, mlp, resnet, text_model, tokens

from vestigia import TRAK, BaseInfluenceModel, DataInf, InvalidModelError, LoGra
from vestigia.data.dataset import Batch
from vestigia.gradients.layer_capture import LayerCapture
from vestigia.projection import FactoredProjection

# float32 captures and projections against float64 per-example loops.
RTOL = 1e-4


def _expected_features(model, projection: FactoredProjection, x, y) -> np.ndarray:
    """`(P_in (x) P_out) vec(G)` per layer from gradients taken one example at a time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning naming BatchNorm's weights is tested below
        capture = LayerCapture(model, logits_loss())
    grads = loop_gradients(model, capture.variables, logits_loss(), x, y)
    parts, start = [], 0
    for spec, p_in, p_out in zip(capture.specs, projection.inputs, projection.outputs):
        kernel_in = spec.n_in - int(spec.has_bias)
        size = kernel_in * spec.n_out
        g = grads[:, start : start + size].reshape(len(x), kernel_in, spec.n_out)
        start += size
        if spec.has_bias:
            g = np.concatenate([g, grads[:, start : start + spec.n_out][:, None, :]], axis=1)
            start += spec.n_out
        p_in = np.eye(spec.n_in) if p_in is None else p_in.numpy().T.astype(np.float64)
        p_out = np.eye(spec.n_out) if p_out is None else p_out.numpy().T.astype(np.float64)
        parts.append(np.einsum("ki,nio,lo->nkl", p_in, g, p_out).reshape(len(x), -1))
    parts.append(grads[:, start:])  # weights without a Kronecker form, unprojected when small
    return np.concatenate(parts, axis=1)


def _features(projection: FactoredProjection, model: BaseInfluenceModel, x, y) -> np.ndarray:
    return projection.project_batch(model, Batch(tf.constant(x), tf.constant(y), None, len(x)))[1].numpy()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_factored_projection_equals_kronecker_projection_of_the_gradient(batch_norm: bool) -> None:
    model = resnet(batch_norm=batch_norm)
    x, y = images(5)
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    if batch_norm:
        with pytest.warns(UserWarning, match="batch_normalization"):
            projection = FactoredProjection(watched, k_in=6, k_out=3, kind="gaussian", seed=2)
    else:
        projection = FactoredProjection(watched, k_in=6, k_out=3, kind="gaussian", seed=2)
    # Conv layers with 28-37 patch rows and 3-5 channels: both sides projected on most layers
    assert projection.output_blocks[:5] == [18, 18, 18, 18, 12]
    assert_close(_features(projection, watched, x, y), _expected_features(model, projection, x, y), RTOL)


def test_logra_without_projection_is_the_empirical_fisher_influence() -> None:
    model = mlp()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 40)]
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    train, test = batched(x[:30], y[:30]), batched(x[30:], y[30:])
    # k_in, k_out at least every layer's width: P_in = P_out = I, features are the full gradients.
    logra = LoGra(watched, train, k_in=8, k_out=8, damping=0.05)
    g = loop_gradients(model, watched.weights, logits_loss(), x, y)
    inverse = np.linalg.inv(g[:30].T @ g[:30] / 30 + 0.05 * np.eye(g.shape[1]))
    assert_close(logra.influence_matrix(test, train), g[30:] @ inverse @ g[:30].T, RTOL)
    assert_close(logra.self_influence(train), np.einsum("ni,ij,nj->n", g[:30], inverse, g[:30]), RTOL)


def test_logra_with_projection_equals_its_closed_form() -> None:
    model = resnet(batch_norm=False)
    x, y = images(30)
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    train, test = batched(x[:24], y[:24], 8), batched(x[24:], y[24:])
    logra = LoGra(watched, train, k_in=4, k_out=2, seed=5)
    phi = _features(logra.projection, watched, x, y).astype(np.float64)
    gram = phi[:24].T @ phi[:24] / 24
    damping = 1e-3 * np.trace(gram) / len(gram)
    expected = phi[24:] @ np.linalg.solve(gram + damping * np.eye(len(gram)), phi[:24].T)
    assert_close(logra.influence_matrix(test, train), expected, 1e-3)


def test_factored_projection_plugs_into_trak_and_datainf() -> None:
    model = mlp()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 40)]
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    train, test = batched(x[:30], y[:30]), batched(x[30:], y[30:])
    identity = FactoredProjection(watched, k_in=8, k_out=8)
    expected = TRAK(watched, train, projection=None, damping=0.01).influence_matrix(test, train)
    assert_close(TRAK(watched, train, projection=identity, damping=0.01).influence_matrix(test, train), expected, RTOL)
    datainf = DataInf(watched, train, projection=FactoredProjection(watched, k_in=3, k_out=2))
    assert [w for _, w in datainf.blocks] == [6, 6, 6]


def test_projection_built_for_another_architecture_is_refused() -> None:
    projection = FactoredProjection(BaseInfluenceModel(mlp(), loss_function=logits_loss()))
    other = BaseInfluenceModel(mlp(hidden=9), loss_function=logits_loss())
    x, y = np.zeros((2, 6), "float32"), np.eye(3, dtype="float32")[[0, 1]]
    with pytest.raises(InvalidModelError, match="built for layers of shapes"):
        _features(projection, other, x, y)


def test_projected_inputs_equal_projected_unfolded_inputs_on_a_text_model() -> None:
    """Embedding (gathered rows of `P_in`), causal Conv1D (a convolution with `P_in` as filters)
    and attention's EinsumDense layers: the features equal `P_in G P_out^T` with `G = sum_t a_t d_t^T`
    formed from the capture's explicit inputs (its unfolded patches, one-hot tokens)."""
    model = text_model()
    x, y = tokens(6)
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNormalization gets no Kronecker factor
        projection = FactoredProjection(watched, k_in=3, k_out=3, kind="gaussian", seed=1)
        capture = LayerCapture(model, logits_loss())
    captured = capture.traced(lambda c: c)(tf.constant(x), tf.constant(y), tf.ones([6]))
    expected = []
    for a, d, p_in, p_out in zip(captured.inputs, captured.deltas, projection.inputs, projection.outputs):
        g = np.einsum("bti,bto->bio", a.numpy().astype(np.float64), d.numpy().astype(np.float64))
        p_in = np.eye(g.shape[1]) if p_in is None else p_in.numpy().astype(np.float64).T
        p_out = np.eye(g.shape[2]) if p_out is None else p_out.numpy().astype(np.float64).T
        expected.append(np.einsum("ki,bio,lo->bkl", p_in, g, p_out).reshape(6, -1))
    expected.append(np.concatenate([o.numpy() for o in captured.others], axis=1))
    kinds = {spec.kind for spec in capture.specs}
    assert {"embedding", "conv", "einsum_dense", "dense"} <= kinds
    assert_close(_features(projection, watched, x, y), np.concatenate(expected, axis=1), RTOL)
