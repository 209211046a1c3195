"""Second-order group influence (Basu et al. 2020) against independent NumPy oracles.

Oracles: (1) the 2-parameter analytic model of the reference, `x -> W1^T x = h -> h . w2`
with squared error, watched `w2`: `g = 2 (h . w2 - y) h`, `d^2 l = 2 h h^T`; (2) closed-form
softmax cross-entropy gradients and Hessians of a bias-free last Dense kernel; (3) exact
retraining of a linear least-squares model (`numpy.linalg.lstsq`). The formula is recomputed
in NumPy from these: `I2(U) = c1 H^-1 g_U + c2 H^-1 H_U H^-1 g_U`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, make_classification, make_mlp

from vestigia.curvature import ConjugateGradientDescentIHVP
from vestigia.errors import InvalidDataError
from vestigia.methods.first_order import FirstOrderInfluenceCalculator
from vestigia.methods.second_order import SecondOrderInfluenceCalculator, basu_coefficients
from vestigia.model import InfluenceModel

# Gradients and HVPs are float32 (relative round-off ~1e-7 per op, amplified by cond(H) ~ 1e2
# through two solves); 1e-4 relative leaves a wide margin while catching any wrong coefficient
# (a wrong n or |U| changes results by >= 1e-2).
FLOAT32_RTOL = 1e-4


def mse() -> keras.losses.Loss:
    return keras.losses.MeanSquaredError(reduction=None)


def two_param_problem(n: int = 25, seed: int = 0) -> tuple[InfluenceModel, np.ndarray, np.ndarray, np.ndarray]:
    """The reference's analytic model: returns `(influence model, x, y, hidden h = x W1)`."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, use_bias=False), keras.layers.Dense(1, use_bias=False)]
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    hidden = x.astype(np.float64) @ model.layers[0].kernel.numpy().astype(np.float64)
    return InfluenceModel(model, start_layer=-1, loss_function=mse()), x, y, hidden


def two_param_grads_hessians(model: InfluenceModel, hidden: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example `g_i (n, 2)` and Hessians `2 h_i h_i^T (n, 2, 2)`, float64."""
    w2 = model.model.layers[1].kernel.numpy().astype(np.float64)[:, 0]
    residual = hidden @ w2 - y[:, 0].astype(np.float64)
    return 2 * residual[:, None] * hidden, 2 * np.einsum("ni,nj->nij", hidden, hidden)


def oracle_terms(
    hessian: np.ndarray, group_grads: np.ndarray, group_hessians: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(c1 H^-1 g_U, c2 H^-1 H_U H^-1 g_U)` computed directly from the paper's formula."""
    m = len(group_grads)
    p = m / n
    first = np.linalg.solve(hessian, group_grads.sum(axis=0))
    pairwise = np.linalg.solve(hessian, group_hessians.sum(axis=0) @ first)
    return (1 - 2 * p) / ((1 - p) ** 2 * n) * first, pairwise / ((1 - p) ** 2 * n**2)


def test_coefficients_closed_form() -> None:
    c1, c2 = basu_coefficients(5, 25)
    np.testing.assert_allclose([c1, c2], [0.6 / (0.64 * 25), 1 / (0.64 * 625)], rtol=1e-15)
    with pytest.raises(InvalidDataError, match="fewer than all 25"):
        basu_coefficients(25, 25)


def test_analytic_oracle_terms_vector_and_values() -> None:
    model, x, y, hidden = two_param_problem()
    grads, hessians = two_param_grads_hessians(model, hidden, y)
    hessian = hessians.mean(axis=0)
    calc = SecondOrderInfluenceCalculator(model, batched(x, y, 5))
    group = slice(0, 5)
    additive, pairwise = oracle_terms(hessian, grads[group], hessians[group], 25)
    terms = calc.compute_influence_terms_group(batched(x[group], y[group], 5))
    assert terms.group_size == 5
    np.testing.assert_allclose(terms.additive[0], additive, rtol=FLOAT32_RTOL)
    np.testing.assert_allclose(terms.pairwise[0], pairwise, rtol=FLOAT32_RTOL)
    vector = calc.compute_influence_vector_group(batched(x[group], y[group], 5)).numpy()
    assert vector.shape == (1, 2)
    np.testing.assert_allclose(vector[0], additive + pairwise, rtol=FLOAT32_RTOL)
    # Self value (T = U) and a cross value with a group T of another size and batching.
    self_value = calc.estimate_influence_values_group(batched(x[group], y[group], 5)).numpy()
    np.testing.assert_allclose(self_value, [[grads[group].sum(0) @ (additive + pairwise)]], rtol=FLOAT32_RTOL)
    cross = calc.estimate_influence_values_group(batched(x[group], y[group], 5), batched(x[10:17], y[10:17], 4))
    np.testing.assert_allclose(cross.numpy(), [[grads[10:17].sum(0) @ (additive + pairwise)]], rtol=FLOAT32_RTOL)


def test_partial_batches_count_true_sizes() -> None:
    """n = 25 batched by 4 and |U| = 10 batched by 3: both partial, both counted exactly."""
    model, x, y, hidden = two_param_problem()
    grads, hessians = two_param_grads_hessians(model, hidden, y)
    calc = SecondOrderInfluenceCalculator(model, batched(x, y, 4))
    assert calc.n_train == 25
    group = slice(3, 13)
    terms = calc.compute_influence_terms_group(batched(x[group], y[group], 3))
    assert terms.group_size == 10
    additive, pairwise = oracle_terms(hessians.mean(axis=0), grads[group], hessians[group], 25)
    np.testing.assert_allclose(terms.additive[0] + terms.pairwise[0], additive + pairwise, rtol=FLOAT32_RTOL)
    rebatched = calc.compute_influence_vector_group((x[group], y[group])).numpy()
    np.testing.assert_allclose(rebatched[0], additive + pairwise, rtol=FLOAT32_RTOL)


def test_n_is_the_training_set_size_when_hessian_is_subsampled() -> None:
    model, x, y, hidden = two_param_problem()
    grads, hessians = two_param_grads_hessians(model, hidden, y)
    calc = SecondOrderInfluenceCalculator(model, batched(x, y, 5), n_samples_for_hessian=10)
    assert calc.n_train == 25
    sub_hessian = calc.ihvp_calculator.hessian  # built on 10 drawn examples; n stays 25
    additive, pairwise = oracle_terms(sub_hessian, grads[:4], hessians[:4], 25)
    vector = calc.compute_influence_vector_group(batched(x[:4], y[:4], 3)).numpy()
    np.testing.assert_allclose(vector[0], additive + pairwise, rtol=FLOAT32_RTOL)


def test_group_of_one_tends_to_first_order_after_rescaling() -> None:
    """`n I2({z}) - H^-1 g_z = O(1/n)`: replicating the training set r times keeps H and g_z and
    divides p = 1/n by r, so the relative gap must shrink about r-fold."""
    model, x, y, _ = two_param_problem()
    first = FirstOrderInfluenceCalculator(model, batched(x, y, 5)).compute_influence_vector_group(
        batched(x[:1], y[:1], 1)
    )
    gaps = []
    for r in (1, 8):
        train = batched(np.tile(x, (r, 1)), np.tile(y, (r, 1)), 25)
        calc = SecondOrderInfluenceCalculator(model, train)
        scaled = calc.compute_influence_vector_group(batched(x[:1], y[:1], 1), first_order_scale=True).numpy()
        gaps.append(np.linalg.norm(scaled - first.numpy()) / np.linalg.norm(first.numpy()))
    # Relative gap at r = 1 is O(p) = O(1/25); at r = 8 it must be ~8 times smaller (allow 6x) and below 1 %.
    assert gaps[1] < gaps[0] / 6, gaps
    assert gaps[1] < 1e-2, gaps


def test_matches_exact_retraining_better_than_first_order_on_least_squares() -> None:
    """Quadratic loss: removing U and refitting exactly (lstsq) is the oracle for the parameter change."""
    n, d = 60, 4
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 1)) + 0.5 * rng.normal(size=(n, 1))).astype("float32")
    keras_model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    theta = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0]
    keras_model.layers[0].kernel.assign(theta.astype("float32"))
    model = InfluenceModel(keras_model, start_layer=0, loss_function=mse())
    group = rng.permutation(n)[:18]  # p = 0.3
    keep = np.setdiff1d(np.arange(n), group)
    theta32 = keras_model.layers[0].kernel.numpy().astype(np.float64)
    exact_change = np.linalg.lstsq(x[keep].astype(np.float64), y[keep].astype(np.float64), rcond=None)[0] - theta32
    second = SecondOrderInfluenceCalculator(model, batched(x, y, 16)).compute_influence_vector_group(
        batched(x[group], y[group], 7)
    )
    first = FirstOrderInfluenceCalculator(model, batched(x, y, 16)).compute_influence_vector_group(
        batched(x[group], y[group], 7)
    )
    err2 = np.linalg.norm(second.numpy()[0] - exact_change[:, 0])
    err1 = np.linalg.norm(first.numpy()[0] / n - exact_change[:, 0])
    # Measured: 2.4 % relative error (second order) vs 33 % (first order); require 4x closer.
    assert err2 < 0.25 * err1, (err2, err1)


def softmax_last_kernel(features: np.ndarray, kernel: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form per-example gradients `(n, d*c)` and Hessians `(n, d*c, d*c)` of softmax CE
    w.r.t. a bias-free Dense kernel `(d, c)`, flattened row-major: `kron(a, p - y)`,
    `kron(a a^T, diag(p) - p p^T)`."""
    logits = features @ kernel
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n, d = features.shape
    c = p.shape[1]
    grads = np.einsum("ni,nc->nic", features, p - y).reshape(n, d * c)
    curvature = np.einsum("nc,ce->nce", p, np.eye(c)) - np.einsum("nc,ne->nce", p, p)
    hessians = np.einsum("ni,nj,nce->nicje", features, features, curvature).reshape(n, d * c, d * c)
    return grads, hessians


def last_kernel_problem(n: int, d: int, hidden: int, classes: int) -> tuple[InfluenceModel, np.ndarray, np.ndarray]:
    keras.utils.set_random_seed(1)
    keras_model = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes, use_bias=False),
        ]
    )
    x, y = make_classification(n, d, classes, seed=2)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    return InfluenceModel(keras_model, start_layer=-1, loss_function=loss), x, y


def test_group_of_200_batched_by_64_at_320_params() -> None:
    """The seed runs out of memory here (per-example Hessians); summed HVPs must not."""
    model, x, y = last_kernel_problem(n=600, d=20, hidden=32, classes=10)
    assert model.nb_params == 320
    features = x.astype(np.float64)
    for layer in model.model.layers[:-1]:  # the tanh trunk, recomputed in NumPy
        features = np.tanh(features @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy())
    grads, hessians = softmax_last_kernel(features, model.weights[0].numpy().astype(np.float64), y)
    damping = 1e-2
    hessian = hessians.mean(axis=0) + damping * np.eye(320)
    group = np.arange(100, 300)
    calc = SecondOrderInfluenceCalculator(model, batched(x, y, 100), damping=damping)
    vector = calc.compute_influence_vector_group(batched(x[group], y[group], 64)).numpy()
    additive, pairwise = oracle_terms(hessian, grads[group], hessians[group], 600)
    # cond(H + 1e-2 I) ~ 30 and the pairwise term is ~0.8 of the additive one here, so a wrong
    # coefficient shows at the 1e-1 level; float32 HVPs over 200 examples stay near 1e-6.
    expected = additive + pairwise
    np.testing.assert_allclose(vector[0], expected, atol=FLOAT32_RTOL * np.abs(expected).max())


@pytest.fixture(scope="module")
def mlp_problem() -> tuple[InfluenceModel, tf.data.Dataset, tuple[np.ndarray, np.ndarray]]:
    x, y = make_classification(60, 5, 3, seed=4)
    keras_model = make_mlp(5, 8, 3, seed=4)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    model = InfluenceModel(keras_model, start_layer=-1, loss_function=loss)
    return model, batched(x, y, 16), (x[5:25], y[5:25])


@pytest.mark.parametrize(
    ("solver", "options", "rtol"),
    [
        # CG to a 1e-10 relative residual on a system of condition ~1e2: 1e-4 covers float32 HVPs.
        ("cgd", {"n_opt_iters": 200, "tol": 1e-10}, 1e-4),
        # LiSSA: scale 3 > lambda_max + damping, 400 iterations contract the error by
        # (1 - 0.5/3)^400 ~ 1e-32; float32 HVP round-off remains.
        ("lissa", {"n_opt_iters": 400, "scale": 3.0}, 1e-4),
    ],
)
def test_iterative_solvers_with_damping_match_exact(mlp_problem, solver, options, rtol) -> None:  # type: ignore[no-untyped-def]
    model, train, (gx, gy) = mlp_problem
    damping = 0.5
    exact = SecondOrderInfluenceCalculator(model, train, "exact", damping=damping)
    undamped = SecondOrderInfluenceCalculator(model, train, "exact", damping=0.05)
    assert np.linalg.eigvalsh(exact.ihvp_calculator.hessian).max() < options.get("scale", np.inf)
    iterative = SecondOrderInfluenceCalculator(model, train, solver, damping=damping, **options)
    assert iterative.ihvp_calculator.damping == damping
    group = batched(gx, gy, 6)
    expected = exact.compute_influence_vector_group(group).numpy()
    got = iterative.compute_influence_vector_group(group).numpy()
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    # The damping really reaches the solver: another damping gives a clearly different answer.
    other = undamped.compute_influence_vector_group(group).numpy()
    assert np.abs(other - expected).max() > 100 * rtol * np.abs(expected).max()


def test_solver_instance_is_used_as_is(mlp_problem) -> None:  # type: ignore[no-untyped-def]
    model, train, (gx, gy) = mlp_problem
    solver = ConjugateGradientDescentIHVP(model, train_dataset=train, damping=0.5, tol=1e-10, n_opt_iters=200)
    calc = SecondOrderInfluenceCalculator(model, train, solver)
    assert calc.ihvp_calculator is solver
    exact = SecondOrderInfluenceCalculator(model, train, "exact", damping=0.5)
    np.testing.assert_allclose(
        calc.estimate_influence_values_group(batched(gx, gy, 6)).numpy(),
        exact.estimate_influence_values_group(batched(gx, gy, 6)).numpy(),
        rtol=1e-4,
    )


def test_invalid_arguments() -> None:
    model, x, y, _ = two_param_problem()
    calc = SecondOrderInfluenceCalculator(model, batched(x, y, 5))
    with pytest.raises(InvalidDataError, match="fewer than all 25"):
        calc.compute_influence_vector_group(batched(x, y, 7))
    with pytest.raises(TypeError, match="InfluenceModel"):
        SecondOrderInfluenceCalculator(model.model, batched(x, y, 5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ihvp_calculator"):
        SecondOrderInfluenceCalculator(model, batched(x, y, 5), "newton")
