"""Grad-Dot, Grad-Cos and DataInf against per-example loops and closed forms in NumPy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients
from whole_models import images, resnet

from vestigia import BaseInfluenceModel, DataInf, GradCos, GradDot, InfluenceModel, InvalidModelError
from vestigia.projection import RandomProjection
from vestigia.projection.captured import _capture_run

# float32 per-example gradients against float64 loops.
RTOL = 1e-4


@pytest.fixture(scope="module")
def problem():
    keras.utils.set_random_seed(0)
    model = make_mlp(d=5, hidden=6, classes=3)
    x, y = make_classification(50, 5, 3)
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=logits_loss())
    grads = loop_gradients(model, influence_model.weights, logits_loss(), x, y)
    return influence_model, x, y, grads


def test_grad_dot_and_grad_cos_equal_the_per_example_loop(problem) -> None:
    influence_model, x, y, grads = problem
    train, test = batched(x[:40], y[:40]), batched(x[40:], y[40:], 4)
    g_train, g_test = grads[:40], grads[40:]
    assert_close(GradDot(influence_model).influence_matrix(test, train), g_test @ g_train.T, RTOL)
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    assert_close(GradCos(influence_model).influence_matrix(test, train), unit[40:] @ unit[:40].T, RTOL)
    assert_close(GradDot(influence_model).self_influence(train), (g_train**2).sum(1), RTOL)
    assert_close(GradCos(influence_model).self_influence(train), np.ones(40), RTOL)


def test_projected_grad_dot_equals_the_loop_through_the_projection_matrix(problem) -> None:
    influence_model, x, y, grads = problem
    n_params = grads.shape[1]
    calculator = GradDot(influence_model, projection="gaussian", projection_dim=20, seed=4)
    matrix = RandomProjection(n_params, 20, kind="gaussian", seed=4).matrix().numpy().astype(np.float64)
    projected = grads @ matrix
    values = calculator.influence_matrix(batched(x[40:], y[40:]), batched(x[:40], y[:40]))
    assert_close(values, projected[40:] @ projected[:40].T, RTOL)


def _datainf_closed_form(blocks: list[np.ndarray], scale: float) -> tuple[np.ndarray, list[float]]:
    """DataInf's inverse, literally: per block `(1/(n lambda)) sum_i (I - g_i g_i^T / (lambda + ||g_i||^2))`."""
    inverses, dampings = [], []
    for g in blocks:
        n, d = g.shape
        damping = scale * float((g**2).sum()) / (n * d)
        total = sum(np.eye(d) - np.outer(gi, gi) / (damping + gi @ gi) for gi in g)
        inverses.append(total / (n * damping))
        dampings.append(damping)
    size = sum(len(h) for h in inverses)
    inverse, start = np.zeros((size, size)), 0
    for h in inverses:
        inverse[start : start + len(h), start : start + len(h)] = h
        start += len(h)
    return inverse, dampings


def test_datainf_equals_its_closed_form_per_layer(problem) -> None:
    influence_model, x, y, grads = problem
    train, test = batched(x[:40], y[:40], 16), batched(x[40:], y[40:])
    calculator = DataInf(influence_model, train)
    # layers: Dense(5 -> 6) kernel and bias = 36 parameters, Dense(6 -> 3) = 21
    assert [w for _, w in calculator.blocks] == [36, 21]
    g_train, g_test = grads[:40], grads[40:]
    inverse, dampings = _datainf_closed_form([g_train[:, :36], g_train[:, 36:]], 0.1)
    np.testing.assert_allclose(calculator.dampings, dampings, rtol=RTOL)
    assert_close(calculator.influence_matrix(test, train), g_test @ inverse @ g_train.T, RTOL)
    assert_close(calculator.self_influence(train), np.einsum("ni,ij,nj->n", g_train, inverse, g_train), RTOL)


def test_datainf_on_projected_gradients_is_one_block(problem) -> None:
    influence_model, x, y, grads = problem
    train = batched(x[:40], y[:40])
    calculator = DataInf(influence_model, train, projection="rademacher", projection_dim=12, damping_scale=0.5)
    matrix = RandomProjection(grads.shape[1], 12, seed=0).matrix().numpy().astype(np.float64)
    projected = grads[:40] @ matrix
    inverse, _ = _datainf_closed_form([projected], 0.5)
    assert_close(calculator.self_influence(train), np.einsum("ni,ij,nj->n", projected, inverse, projected), RTOL)


def test_bad_input_is_refused(problem) -> None:
    influence_model, x, y, _ = problem
    train = batched(x[:40], y[:40])
    with pytest.raises(InvalidModelError, match=r"\(36, 36\).*max_block_params=30"):
        DataInf(influence_model, train, max_block_params=30)
    with pytest.raises(ValueError, match=r"projection_dim.*at most.*\(57\)"):
        GradCos(influence_model, projection="rademacher", projection_dim=58)
    with pytest.raises(ValueError, match="damping_scale"):
        DataInf(influence_model, train, damping_scale=-1.0)


def test_whole_cnn_gradients_come_from_the_capture_pass_and_equal_the_loop() -> None:
    """Conv and BatchNorm weights (outside a factored Dense head): the capture pass's gradients,
    reordered to the model's parameter order, equal one tape per example."""
    model = resnet(batch_norm=True)
    x, y = images(10)
    watched = BaseInfluenceModel(model, loss_function=logits_loss())
    assert _capture_run(watched) is not None
    grads = loop_gradients(model, watched.weights, logits_loss(), x, y)
    values = GradDot(watched).influence_matrix(batched(x[6:], y[6:]), batched(x[:6], y[:6], 4))
    assert_close(values, grads[6:] @ grads[:6].T, RTOL)
