"""Arnoldi iteration, distillation and `ArnoldiInfluenceCalculator` against dense NumPy oracles.

Oracles: `numpy.linalg.eigh` of known matrices and of the closed-form Hessian of a least-squares
model (`H = (2/n) X^T X`, per-example gradient `2 (x . w - y) x`), whose spectrum is spread on
purpose so that "top-k" is unambiguous; and exact first-order influence (`ExactIHVP`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, make_classification, make_mlp

from vestigia.curvature.arnoldi import ArnoldiIHVP, arnoldi_iteration, distill
from vestigia.methods.arnoldi import ArnoldiInfluenceCalculator
from vestigia.methods.first_order import FirstOrderInfluenceCalculator
from vestigia.model import InfluenceModel

# Pure float64 linear algebra on explicit matrices: round-off ~ 1e-15 * cond.
FLOAT64_RTOL = 1e-10
# Model HVPs and gradients are float32 (~1e-7 relative); cond(H) = 1e2 in the least-squares
# problem, so values agree to ~1e-5 relative; 1e-4 keeps a margin and still separates
# eigenvalues that differ by >= 20 %.
FLOAT32_RTOL = 1e-4


def spread_matrix(n: int, eigenvalues: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric matrix with the given eigenvalues and a random orthonormal eigenbasis `(n, n)`."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (basis * eigenvalues) @ basis.T, basis


@pytest.mark.parametrize("force_hermitian", [True, False])
def test_full_krylov_space_gives_the_top_k_eigenpairs(force_hermitian: bool) -> None:
    eigenvalues = np.logspace(-1, 3, 30)
    matrix, basis = spread_matrix(30, eigenvalues)
    result = arnoldi_iteration(matrix, 30, 30, seed=1)
    q = result.basis[:30]
    np.testing.assert_allclose(q @ q.T, np.eye(30), atol=FLOAT64_RTOL)
    # The Arnoldi relation, row form: Q_s A = T^T Q.
    np.testing.assert_allclose(q @ matrix, result.hessenberg.T @ result.basis, atol=FLOAT64_RTOL * 1e3)
    top = distill(result, 5, force_hermitian)
    np.testing.assert_allclose(top.eigenvalues, eigenvalues[::-1][:5], rtol=FLOAT64_RTOL)
    v_k = basis[:, ::-1][:, :5]
    expected = v_k @ np.diag(1 / eigenvalues[::-1][:5]) @ v_k.T
    low_rank = top.projections.T @ np.diag(1 / top.eigenvalues) @ top.projections
    np.testing.assert_allclose(low_rank, expected, atol=FLOAT64_RTOL * np.abs(expected).max())


def test_partial_krylov_space_converges_to_the_largest_eigenvalues() -> None:
    eigenvalues = np.logspace(-1, 3, 30)
    matrix, _ = spread_matrix(30, eigenvalues)
    top = distill(arnoldi_iteration(matrix, 30, 15, seed=1), 3)
    # Ritz values of a 15-dim Krylov space on a spectrum with ratio 1.37 between neighbours:
    # the 3 extreme ones converge to round-off (measured ~1e-15; with 10 steps the third is
    # still 2e-7 off); 1e-8 is safe and fails for any other selection.
    np.testing.assert_allclose(top.eigenvalues, eigenvalues[::-1][:3], rtol=1e-8)


def test_largest_magnitude_is_kept_for_an_indefinite_operator() -> None:
    eigenvalues = np.linspace(-5.0, 3.0, 20)
    matrix, _ = spread_matrix(20, eigenvalues)
    for force_hermitian in (True, False):
        top = distill(arnoldi_iteration(matrix, 20, 20), 4, force_hermitian)
        expected = eigenvalues[np.argsort(-np.abs(eigenvalues))[:4]]
        np.testing.assert_allclose(top.eigenvalues, expected, rtol=FLOAT64_RTOL)


def test_breakdown_on_an_invariant_subspace() -> None:
    matrix, _ = spread_matrix(30, np.repeat([1.0, 2.0, 5.0], 10))
    result = arnoldi_iteration(matrix, 30, 30, seed=0)
    assert result.hessenberg.shape == (4, 3)  # three distinct eigenvalues: a 3-dim Krylov space
    np.testing.assert_allclose(distill(result, 3).eigenvalues, [5.0, 2.0, 1.0], rtol=FLOAT64_RTOL)
    with pytest.raises(ValueError, match="k_largest_eig_vals"):
        distill(result, 4)


def test_start_vector_is_seeded() -> None:
    matrix, _ = spread_matrix(12, np.logspace(0, 2, 12))
    a, b = arnoldi_iteration(matrix, 12, 6, seed=3), arnoldi_iteration(matrix, 12, 6, seed=3)
    np.testing.assert_array_equal(a.basis, b.basis)
    np.testing.assert_array_equal(a.hessenberg, b.hessenberg)
    c = arnoldi_iteration(matrix, 12, 6, seed=4)
    assert np.abs(a.basis - c.basis).max() > 1e-2


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="subspace_dim"):
        arnoldi_iteration(np.eye(3), 3, 4)
    with pytest.raises(TypeError, match="subspace_dim"):
        arnoldi_iteration(np.eye(3), 3, 2.5)  # type: ignore[arg-type]


# -- the calculator on a least-squares model with a known, spread spectrum ----------------------


@pytest.fixture(scope="module")
def least_squares() -> dict:
    n, d = 50, 10
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = ((rng.normal(size=(n, d)) * np.logspace(0, 1, d)) @ basis.T).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    keras_model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    model = InfluenceModel(keras_model, start_layer=0, loss_function=keras.losses.MeanSquaredError(reduction=None))
    x64 = x.astype(np.float64)
    w = keras_model.layers[0].kernel.numpy().astype(np.float64)[:, 0]
    grads = 2 * (x64 @ w - y[:, 0])[:, None] * x64
    eigenvalues, eigenvectors = np.linalg.eigh(2 * x64.T @ x64 / n)
    order = np.argsort(-np.abs(eigenvalues))
    return {
        "model": model,
        "train": batched(x, y, 16),
        "test": batched(x[:12], y[:12] + 1.0, 5),
        "train_grads": grads,
        "test_grads": 2 * (x64[:12] @ w - (y[:12, 0] + 1.0))[:, None] * x64[:12],
        "eigenvalues": eigenvalues[order],
        "eigenvectors": eigenvectors[:, order],
    }


def projected_values(problem: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy oracle: `g_t^T V_k diag(1/l_k) V_k^T g_z` and the self-influence on the top-k space."""
    v_k, l_k = problem["eigenvectors"][:, :k], problem["eigenvalues"][:k]
    inverse = v_k @ np.diag(1 / l_k) @ v_k.T
    train = problem["train_grads"]
    return problem["test_grads"] @ inverse @ train.T, np.einsum("ni,ij,nj->n", train, inverse, train)


def test_values_equal_the_top_k_projection_and_error_shrinks_with_k(least_squares: dict) -> None:
    problem = least_squares
    assert np.all(np.diff(np.abs(problem["eigenvalues"])) < -0.2 * np.abs(problem["eigenvalues"][1:]))
    full_matrix, full_self = projected_values(problem, 10)
    errors = []
    for k in range(1, 11):
        calc = ArnoldiInfluenceCalculator(problem["model"], problem["train"], 10, True, k)
        # The kept eigenvalues are the k largest in magnitude (the seed kept the k smallest).
        np.testing.assert_allclose(calc.eigenvalues, problem["eigenvalues"][:k], rtol=FLOAT32_RTOL)
        expected_matrix, expected_self = projected_values(problem, k)
        matrix = calc.influence_matrix(problem["test"], problem["train"])
        np.testing.assert_allclose(matrix, expected_matrix, atol=FLOAT32_RTOL * np.abs(full_matrix).max())
        self_influence = calc.self_influence(problem["train"])
        np.testing.assert_allclose(self_influence, expected_self, atol=FLOAT32_RTOL * full_self.max())
        errors.append(np.abs(full_self - self_influence).sum())
    # sum_{j > k} (v_j . g)^2 / l_j can only shrink as k grows (within float32 round-off).
    assert np.all(np.diff(errors) <= FLOAT32_RTOL * errors[0]), errors
    assert errors[-1] < FLOAT32_RTOL * errors[0]


def test_full_rank_equals_exact_first_order(least_squares: dict) -> None:
    problem = least_squares
    exact = FirstOrderInfluenceCalculator(problem["model"], problem["train"], "exact")
    expected = exact.influence_matrix(problem["test"], problem["train"])
    scale = np.abs(expected).max()
    for force_hermitian, dtype in ((True, tf.float32), (False, tf.float64)):
        calc = ArnoldiInfluenceCalculator(problem["model"], problem["train"], 10, force_hermitian, 10, dtype=dtype)
        np.testing.assert_allclose(
            calc.influence_matrix(problem["test"], problem["train"]), expected, atol=FLOAT32_RTOL * scale
        )
        np.testing.assert_allclose(
            calc.self_influence(problem["train"]),
            exact.self_influence(problem["train"]),
            rtol=FLOAT32_RTOL,
        )
    vectors = next(iter(calc.compute_influence_vector(problem["train"])))[1]
    assert vectors.dtype == tf.float64 and vectors.shape == (16, 10)


def test_nonlinear_model_full_rank_with_damping_equals_exact() -> None:
    """Softmax head with bias (a singular Hessian): with the same damping, Arnoldi at full rank
    must reproduce exact first-order influence."""
    x, y = make_classification(60, 5, 3, seed=1)
    model = InfluenceModel(
        make_mlp(5, 8, 3, seed=1),
        start_layer=-1,
        loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None),
    )
    train, test = batched(x, y, 16), batched(x[:10], y[::-1][:10], 4)
    p = model.nb_params
    arnoldi = ArnoldiInfluenceCalculator(model, train, p, True, p, damping=1e-2)
    exact = FirstOrderInfluenceCalculator(model, train, "exact", damping=1e-2)
    expected = exact.influence_matrix(test, train)
    # cond(H + 1e-2 I) ~ 1.4e2 (measured): float32 HVP noise stays near 1e-6 of the largest value.
    np.testing.assert_allclose(
        arnoldi.influence_matrix(test, train), expected, atol=FLOAT32_RTOL * np.abs(expected).max()
    )
    np.testing.assert_allclose(arnoldi.self_influence(train), exact.self_influence(train), rtol=FLOAT32_RTOL)


def test_arnoldi_solver_inside_other_calculators(least_squares: dict) -> None:
    problem = least_squares
    options = {"subspace_dim": 8, "k_largest_eig_vals": 4, "seed": 5}
    solver_based = FirstOrderInfluenceCalculator(problem["model"], problem["train"], ArnoldiIHVP, **options)
    calc = ArnoldiInfluenceCalculator(problem["model"], problem["train"], 8, True, 4, seed=5)
    expected = calc.influence_matrix(problem["test"], problem["train"])
    np.testing.assert_allclose(
        solver_based.influence_matrix(problem["test"], problem["train"]),
        expected,
        atol=1e-5 * np.abs(expected).max(),
    )
    # Same seed, same answer (bitwise: the whole pipeline is deterministic on CPU).
    again = ArnoldiInfluenceCalculator(problem["model"], problem["train"], 8, True, 4, seed=5)
    np.testing.assert_array_equal(again.projections, calc.projections)


def test_calculator_arguments_are_checked(least_squares: dict) -> None:
    problem = least_squares
    with pytest.raises(ValueError, match="k_largest_eig_vals"):
        ArnoldiInfluenceCalculator(problem["model"], problem["train"], 4, True, 5)
    with pytest.raises(ValueError, match="subspace_dim"):
        ArnoldiInfluenceCalculator(problem["model"], problem["train"], 11, True, 5)
    with pytest.raises(TypeError, match="dtype"):
        ArnoldiInfluenceCalculator(problem["model"], problem["train"], 4, True, 2, dtype=tf.int32)
    with pytest.raises(TypeError, match="InfluenceModel"):
        ArnoldiInfluenceCalculator(problem["model"].model, problem["train"], 4, True, 2)  # type: ignore[arg-type]
