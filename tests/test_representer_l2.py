"""RPS-L2 against an independent solution of the same L2-regularised last-layer problem.

The oracle recomputes the features with a float64 numpy forward pass, solves
`min_W (1/n) sum_i CE(t_i, f_i^T W) + lambda ||W||^2` with scipy's trust-region Newton on a
dense Hessian written as Kronecker products (the library uses matrix-free Newton-CG), and
forms `alpha`, the kernel values and the self-influence in numpy.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification
from oracles import features_of, probs
from scipy.optimize import minimize
from scipy.special import logsumexp

from vestigia.errors import InvalidModelError
from vestigia.methods.representer_l2 import RepresenterPointL2

D_IN, HIDDEN, CLASSES, N_TRAIN, N_TEST = 5, 8, 3, 60, 12
LAMBDA = 0.01
# The library scores in float32 (features, products of d * C entries): relative errors ~1e-6.
VALUE_RTOL = 1e-4
# Both solve to max|grad| <= 1e-10 in float64 (W error <= |grad| / (2 lambda) = 5e-9), but the library's
# features come from the float32 trunk (relative error ~6e-8): W* moves by a few 1e-8 (largest seen 3.3e-8).
KERNEL_ATOL = 1e-6


def make_model(classes: int = CLASSES, seed: int = 0, head_bias: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(classes, use_bias=head_bias, kernel_initializer=keras.initializers.RandomNormal(0, 1)),
        ]
    )


def oracle_surrogate(
    f: np.ndarray, t: np.ndarray, lam: float, start: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """argmin (1/n) sum w_i CE(t_i, f_i W) + lam ||W||^2 by scipy trust-exact, then dense Newton steps."""
    n, d = f.shape
    c = t.shape[1]
    w_i = np.ones(n) if weights is None else weights

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = f @ w.reshape(d, c)
        if c == 1:
            ce = np.logaddexp(0.0, z[:, 0]) - t[:, 0] * z[:, 0]
        else:
            ce = logsumexp(z, axis=1) - (t * z).sum(axis=1)
        grad = f.T @ (w_i[:, None] * (probs(z) - t)) / n + 2 * lam * w.reshape(d, c)
        return np.mean(w_i * ce) + lam * w @ w, grad.ravel()

    def hess(w: np.ndarray) -> np.ndarray:
        p = probs(f @ w.reshape(d, c))
        total = 2 * lam * np.eye(d * c)
        for fi, pi, wi in zip(f, p, w_i):
            curvature = np.diag(pi) - np.outer(pi, pi) if c > 1 else np.array([[pi[0] * (1 - pi[0])]])
            total += wi * np.kron(np.outer(fi, fi), curvature) / n
        return total

    w = minimize(fun, start.ravel(), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-12}).x
    for _ in range(3):  # polish with full Newton steps on the dense Hessian
        w = w - np.linalg.solve(hess(w), fun(w)[1])
    assert np.max(np.abs(fun(w)[1])) < 1e-12
    return w.reshape(d, c)


def oracle_values(
    f_train: np.ndarray, f_test: np.ndarray, alpha: np.ndarray, classes: np.ndarray, signs: np.ndarray
) -> np.ndarray:
    """values[t, i] = sign_t alpha_i[c_t] f_i . f_t, written as a double loop."""
    values = np.zeros((len(f_test), len(f_train)))
    for t in range(len(f_test)):
        for i in range(len(f_train)):
            values[t, i] = signs[t] * alpha[i, classes[t]] * (f_train[i] @ f_test[t])
    return values


@pytest.fixture(scope="module")
def problem() -> dict:
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, CLASSES, seed=1)
    model = make_model()
    f = features_of(model, x)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    targets = probs(f[:N_TRAIN] @ kernel)
    w_star = oracle_surrogate(f[:N_TRAIN], targets, LAMBDA, kernel)
    alpha = -(probs(f[:N_TRAIN] @ w_star) - targets) / (2 * LAMBDA * N_TRAIN)
    classes = np.argmax(f @ kernel, axis=1)
    rps = RepresenterPointL2(model, batched(x[:N_TRAIN], y[:N_TRAIN], 16), logits_loss(), LAMBDA)
    return dict(x=x, y=y, model=model, f=f, kernel=kernel, w_star=w_star, alpha=alpha, classes=classes, rps=rps)


def test_surrogate_is_the_regularised_minimiser(problem: dict) -> None:
    rps = problem["rps"]
    assert rps.fit.converged and rps.fit.gradient_norm <= 1e-10
    np.testing.assert_allclose(rps.surrogate_kernel, problem["w_star"], atol=KERNEL_ATOL, rtol=0)
    np.testing.assert_allclose(
        rps.representer_values(batched(problem["x"][:N_TRAIN], problem["y"][:N_TRAIN])),
        problem["alpha"],
        rtol=VALUE_RTOL,
        atol=1e-7,
    )


def test_pairwise_values_match_numpy_oracle(problem: dict) -> None:
    rps, f, x, y = problem["rps"], problem["f"], problem["x"], problem["y"]
    expected = oracle_values(f[:N_TRAIN], f[N_TRAIN:], problem["alpha"], problem["classes"][N_TRAIN:], np.ones(N_TEST))
    values = rps.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:], 5), batched(x[:N_TRAIN], y[:N_TRAIN], 16))
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())


def test_representer_values_reconstruct_the_surrogate_predictions(problem: dict) -> None:
    """Representer theorem at the stationary point: sum_i alpha_i f_i^T f_t = f_t^T W* for every class."""
    rps, f, x, y = problem["rps"], problem["f"], problem["x"], problem["y"]
    surrogate_logits = f[N_TRAIN:] @ problem["w_star"]
    np.testing.assert_allclose(rps.predict_with_kernel(x[N_TRAIN:]).numpy(), surrogate_logits, rtol=0, atol=1e-5)
    values = rps.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:]), batched(x[:N_TRAIN], y[:N_TRAIN]))
    predicted = surrogate_logits[np.arange(N_TEST), problem["classes"][N_TRAIN:]]
    np.testing.assert_allclose(values.sum(axis=1), predicted, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rps.representer_kernel, rps.surrogate_kernel, rtol=0, atol=1e-9)


def test_self_influence_is_the_absolute_diagonal(problem: dict) -> None:
    rps, f, x, y = problem["rps"], problem["f"], problem["x"], problem["y"]
    train = batched(x[:N_TRAIN], y[:N_TRAIN], 16)
    alpha, classes = problem["alpha"], problem["classes"][:N_TRAIN]
    expected = np.abs(alpha[np.arange(N_TRAIN), classes]) * np.sum(f[:N_TRAIN] ** 2, axis=1)
    values = rps.self_influence(train)
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=1e-7)
    np.testing.assert_allclose(values, np.abs(np.diag(rps.influence_matrix(train, train))), rtol=1e-5, atol=1e-7)
    top = rps.compute_top_k_from_training_dataset(train, 5)
    np.testing.assert_array_equal(np.sort(top.indices), np.sort(np.argsort(-expected)[:5]))


def test_values_do_not_depend_on_batching(problem: dict) -> None:
    rps, x, y = problem["rps"], problem["x"], problem["y"]
    a = rps.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:], 4), batched(x[:N_TRAIN], y[:N_TRAIN], 7))
    b = rps.influence_matrix((x[N_TRAIN:], y[N_TRAIN:]), (x[:N_TRAIN], y[:N_TRAIN]))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    values, indices = rps.top_k_indices(batched(x[N_TRAIN:], y[N_TRAIN:]), batched(x[:N_TRAIN], y[:N_TRAIN]), 3)
    np.testing.assert_array_equal(indices, np.argsort(-b, axis=1)[:, :3])


def test_binary_single_logit_is_signed_by_the_prediction() -> None:
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, 2, seed=2)
    labels = y[:, 1:]
    model = make_model(classes=1, seed=7)
    f = features_of(model, x)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    targets = probs(f[:N_TRAIN] @ kernel)
    w_star = oracle_surrogate(f[:N_TRAIN], targets, LAMBDA, kernel)
    alpha = -(probs(f[:N_TRAIN] @ w_star) - targets) / (2 * LAMBDA * N_TRAIN)
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    rps = RepresenterPointL2(model, batched(x[:N_TRAIN], labels[:N_TRAIN]), loss, LAMBDA)
    logits = f[N_TRAIN:] @ kernel
    signs = np.where(logits[:, 0] >= 0, 1.0, -1.0)
    assert 0 < (signs > 0).sum() < N_TEST  # both predicted classes occur
    expected = oracle_values(f[:N_TRAIN], f[N_TRAIN:], alpha, np.zeros(N_TEST, int), signs)
    values = rps.influence_matrix(batched(x[N_TRAIN:], labels[N_TRAIN:]), batched(x[:N_TRAIN], labels[:N_TRAIN]))
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())
    np.testing.assert_allclose(values.sum(axis=1), signs * (f[N_TRAIN:] @ w_star)[:, 0], rtol=0, atol=1e-5)


def test_squared_error_surrogate_is_ridge_regression_on_logits(problem: dict) -> None:
    x, y, f, kernel = problem["x"], problem["y"], problem["f"], problem["kernel"]
    rps = RepresenterPointL2(
        problem["model"], batched(x[:N_TRAIN], y[:N_TRAIN]), logits_loss(), LAMBDA, surrogate_loss="squared_error"
    )
    f_train, z = f[:N_TRAIN], f[:N_TRAIN] @ kernel
    # (1/n)||F W - Z||^2 + lam ||W||^2 is the least-squares problem [F; sqrt(n lam) I] W = [Z; 0].
    augmented = np.vstack([f_train, np.sqrt(N_TRAIN * LAMBDA) * np.eye(HIDDEN)])
    w_star = np.linalg.lstsq(augmented, np.vstack([z, np.zeros((HIDDEN, CLASSES))]), rcond=None)[0]
    np.testing.assert_allclose(rps.surrogate_kernel, w_star, rtol=0, atol=KERNEL_ATOL)
    alpha = (z - f_train @ w_star) / (LAMBDA * N_TRAIN)
    expected = oracle_values(f_train, f[N_TRAIN:], alpha, problem["classes"][N_TRAIN:], np.ones(N_TEST))
    values = rps.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:]), batched(x[:N_TRAIN], y[:N_TRAIN]))
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())


def test_label_targets_with_integer_labels(problem: dict) -> None:
    x, y, f, kernel = problem["x"], problem["y"], problem["f"], problem["kernel"]
    ids = np.argmax(y, axis=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    rps = RepresenterPointL2(problem["model"], batched(x[:N_TRAIN], ids[:N_TRAIN]), loss, LAMBDA, targets="labels")
    w_star = oracle_surrogate(f[:N_TRAIN], y[:N_TRAIN].astype(np.float64), LAMBDA, kernel)
    np.testing.assert_allclose(rps.surrogate_kernel, w_star, rtol=0, atol=KERNEL_ATOL)
    alpha = -(probs(f[:N_TRAIN] @ w_star) - y[:N_TRAIN]) / (2 * LAMBDA * N_TRAIN)
    expected = oracle_values(f[:N_TRAIN], f[N_TRAIN:], alpha, problem["classes"][N_TRAIN:], np.ones(N_TEST))
    values = rps.influence_matrix(batched(x[N_TRAIN:], ids[N_TRAIN:]), batched(x[:N_TRAIN], ids[:N_TRAIN]))
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())


def test_sample_weights_enter_the_objective_and_alpha(problem: dict) -> None:
    x, y, f, kernel = problem["x"], problem["y"], problem["f"], problem["kernel"]
    weights = np.random.default_rng(0).uniform(0.2, 2.0, N_TRAIN + N_TEST)
    data = tf.data.Dataset.from_tensor_slices((x, y, weights.astype(np.float32)))
    rps = RepresenterPointL2(problem["model"], data.take(N_TRAIN).batch(16), logits_loss(), LAMBDA)
    targets = probs(f[:N_TRAIN] @ kernel)
    w_star = oracle_surrogate(f[:N_TRAIN], targets, LAMBDA, kernel, weights[:N_TRAIN])
    np.testing.assert_allclose(rps.surrogate_kernel, w_star, rtol=0, atol=KERNEL_ATOL)
    alpha = -weights[:N_TRAIN, None] * (probs(f[:N_TRAIN] @ w_star) - targets) / (2 * LAMBDA * N_TRAIN)
    np.testing.assert_allclose(rps.representer_values(data.take(N_TRAIN).batch(16)), alpha, rtol=VALUE_RTOL, atol=1e-7)
    np.testing.assert_array_equal(rps.predicted_classes(data.skip(N_TRAIN).batch(5)), problem["classes"][N_TRAIN:])


def test_regularisation_enters_the_objective(problem: dict) -> None:
    """The seed's surrogate had the same norm for every lambda; here a larger lambda shrinks it."""
    x, y = problem["x"], problem["y"]
    strong = RepresenterPointL2(problem["model"], batched(x[:N_TRAIN], y[:N_TRAIN]), logits_loss(), 1.0)
    assert np.linalg.norm(strong.surrogate_kernel) < 0.5 * np.linalg.norm(problem["rps"].surrogate_kernel)


def test_layer_index_conventions_and_errors(problem: dict) -> None:
    model, x, y = problem["model"], problem["x"], problem["y"]
    train = batched(x[:N_TRAIN], y[:N_TRAIN])
    by_dense = RepresenterPointL2(model, train, logits_loss(), LAMBDA, layer_index=-1)
    by_name = RepresenterPointL2(model, train, logits_loss(), LAMBDA, layer_index=model.layers[-1].name)
    np.testing.assert_allclose(by_dense.surrogate_kernel, problem["rps"].surrogate_kernel, atol=1e-12)
    np.testing.assert_allclose(by_name.surrogate_kernel, problem["rps"].surrogate_kernel, atol=1e-12)
    deeper = keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(4), keras.layers.Dense(4), keras.layers.Dense(3, use_bias=False)]
    )
    with pytest.raises(InvalidModelError, match="layer_index"):
        RepresenterPointL2(deeper, train, logits_loss(), LAMBDA, layer_index=0)
    with pytest.raises(ValueError, match="lambda_regularization"):
        RepresenterPointL2(model, train, logits_loss(), 0.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        RepresenterPointL2(model, train, logits_loss(), LAMBDA, scaling_factor=1.5)
    with pytest.raises(InvalidModelError, match="reduction"):
        RepresenterPointL2(model, train, keras.losses.CategoricalCrossentropy(from_logits=True), LAMBDA)


def test_last_layer_with_bias_is_folded_into_the_features() -> None:
    """A biased last Dense: features `[f, 1]`, kernel `[W; b]`; the surrogate, alpha and values equal
    the oracle's on those augmented features (the seed refused the model)."""
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, CLASSES, seed=2)
    model = make_model(head_bias=True, seed=2)
    f = np.concatenate([features_of(model, x), np.ones((len(x), 1))], axis=1)
    kernel, bias = (w.astype(np.float64) for w in model.layers[-1].get_weights())
    augmented = np.vstack([kernel, bias[None, :]])
    targets = probs(f[:N_TRAIN] @ augmented)
    w_star = oracle_surrogate(f[:N_TRAIN], targets, LAMBDA, augmented)
    alpha = -(probs(f[:N_TRAIN] @ w_star) - targets) / (2 * LAMBDA * N_TRAIN)
    classes = np.argmax(f @ augmented, axis=1)
    rps = RepresenterPointL2(model, batched(x[:N_TRAIN], y[:N_TRAIN], 16), logits_loss(), LAMBDA)
    np.testing.assert_allclose(rps.surrogate_kernel, w_star, atol=KERNEL_ATOL, rtol=0)
    expected = oracle_values(f[:N_TRAIN], f[N_TRAIN:], alpha, classes[N_TRAIN:], np.ones(N_TEST))
    values = rps.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:], 5), batched(x[:N_TRAIN], y[:N_TRAIN], 16))
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())
    # The representer expansion reproduces the surrogate's logits, bias included.
    np.testing.assert_allclose(rps.predict_with_kernel(x[N_TRAIN:]).numpy(), f[N_TRAIN:] @ w_star, rtol=0, atol=1e-5)
