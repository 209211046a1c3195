"""Curvature that would give a silent wrong answer: indefinite Hessians, solvers that stop short,
LiSSA past its radius, dense allocations that cannot fit, non-finite solver outputs, dropped
directions. Each case asserts the error type and a phrase of its message, or the value against
an oracle (dense float64 NumPy on an independent Hessian).

Tolerances: `HESS_RTOL` is the float32 round-off of the library's Hessian entries; a solve
amplifies it by the condition number of the damped Hessian (~1e2 here), hence `SOLVE_RTOL`.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, autodiff_mean_hessian, softmax_head_gradients, softmax_head_hessian

from vestigia import FirstOrderInfluenceCalculator, InfluenceModel
from vestigia.curvature import ConjugateGradientDescentIHVP, ExactIHVP, LissaIHVP
from vestigia.curvature.arnoldi import ArnoldiIHVP
from vestigia.errors import (
    ConvergenceWarning,
    InsufficientMemoryError,
    InvalidModelError,
    NonFiniteError,
    SpectrumWarning,
)

HESS_RTOL = 1e-5
SOLVE_RTOL = 1e-4
# The saddle's damped Hessian has |lambda| down to ~1e-3 of its largest: float32 entries (1e-6
# relative) give inverse entries good to ~1e-3 (measured: 1e-5).
INDEFINITE_RTOL = 1e-3
DAMPING = 0.05


@pytest.fixture(scope="module")
def head() -> dict:
    """Softmax cross-entropy on a watched Dense head (kernel + bias), with closed-form oracles."""
    x, y = make_classification(n=40, d=5, classes=3, seed=30)
    model = make_mlp(d=5, hidden=6, classes=3, seed=30)
    hidden, last = model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    return {
        "x": x,
        "y": y,
        "ds": batched(x, y, 16),
        "im": InfluenceModel(model, start_layer=1, loss_function=logits_loss()),
        "hessian": softmax_head_hessian(features, last.kernel.numpy(), last.bias.numpy()),
        "grads": softmax_head_gradients(features, last.kernel.numpy(), last.bias.numpy(), y),
    }


@pytest.fixture(scope="module")
def saddle() -> dict:
    """Both layers of an untrained tanh MLP watched: the Hessian has negative eigenvalues."""
    x, y = make_classification(n=40, d=4, classes=3, seed=31)
    model = make_mlp(d=4, hidden=5, classes=3, seed=31)
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    hessian = autodiff_mean_hessian(model, im.weights, logits_loss(), x, y)
    return {"x": x, "y": y, "ds": batched(x, y, 16), "im": im, "hessian": (hessian + hessian.T) / 2}


# -- indefinite curvature -----------------------------------------------------------------------


def test_indefinite_hessian_is_counted_and_inverted_by_absolute_eigenvalues(saddle: dict) -> None:
    damped = saddle["hessian"] + 1e-3 * np.eye(len(saddle["hessian"]))
    values, vectors = np.linalg.eigh(damped)
    n_negative = int(np.sum(values < -1e-6 * np.abs(values).max()))
    assert n_negative >= 1  # the oracle itself is indefinite
    with pytest.warns(SpectrumWarning, match=f"{n_negative} of 43 eigenvalues .* are negative"):
        ihvp = ExactIHVP(saddle["im"], saddle["ds"], damping=1e-3)
    assert ihvp.n_negative == n_negative
    assert_close(ihvp.inv_hessian, (vectors / np.abs(values)) @ vectors.T, INDEFINITE_RTOL)
    # Self-influence, through the calculator, never negative and equal to g^T |H|^-1 g.
    calc = FirstOrderInfluenceCalculator(saddle["im"], saddle["ds"], ihvp_calculator=ihvp)
    values_si = calc.self_influence(saddle["ds"])
    grads = saddle["im"].batch_jacobian(saddle["ds"]).numpy().astype(np.float64)
    assert values_si.min() >= 0.0
    assert_close(
        values_si, np.einsum("np,pq,nq->n", grads, (vectors / np.abs(values)) @ vectors.T, grads), INDEFINITE_RTOL
    )


def test_indefinite_hessian_signed_and_raise_choices(saddle: dict) -> None:
    damped = saddle["hessian"] + 1e-3 * np.eye(len(saddle["hessian"]))
    with pytest.warns(SpectrumWarning, match="indefinite='signed'"):
        signed = ExactIHVP(saddle["im"], saddle["ds"], damping=1e-3, indefinite="signed")
    assert_close(signed.inv_hessian, np.linalg.inv(damped), INDEFINITE_RTOL)
    with pytest.raises(InvalidModelError, match="are negative .* Received: indefinite='raise'"):
        ExactIHVP(saddle["im"], saddle["ds"], damping=1e-3, indefinite="raise")
    with pytest.raises(ValueError, match="indefinite='clip'"):
        ExactIHVP(saddle["im"], saddle["ds"], damping=1e-3, indefinite="clip")


def test_cg_reports_negative_curvature(saddle: dict) -> None:
    cg = ConjugateGradientDescentIHVP(saddle["im"], train_dataset=saddle["ds"], damping=1e-3, tol=1e-10)
    vectors = np.random.default_rng(32).normal(size=(6, saddle["im"].nb_params))
    with pytest.warns(SpectrumWarning, match="met negative curvature on .* not positive definite"):
        cg.solve(vectors)


def test_arnoldi_uses_the_same_indefinite_policy(saddle: dict) -> None:
    p = saddle["im"].nb_params
    with pytest.warns(SpectrumWarning, match="are negative"):
        arnoldi = ArnoldiIHVP(saddle["im"], saddle["ds"], subspace_dim=p, k_largest_eig_vals=p, damping=1e-3)
    values, vectors = np.linalg.eigh(saddle["hessian"] + 1e-3 * np.eye(p))
    vectors_in = np.random.default_rng(33).normal(size=(3, p))
    expected = vectors_in @ ((vectors / np.abs(values)) @ vectors.T)
    assert_close(arnoldi.solve(vectors_in).numpy(), expected, INDEFINITE_RTOL)


# -- dropped directions ------------------------------------------------------------------------


def test_undamped_exact_solver_reports_what_it_drops(head: dict) -> None:
    with pytest.warns(SpectrumWarning, match="7 of 21 eigenvalues .* singular .* treated as zero"):
        ihvp = ExactIHVP(head["im"], head["ds"])
    # The softmax Hessian's exact null space {kron(u, 1)}: hidden + 1 = 7 directions, no more.
    assert ihvp.n_dropped == 7
    expected = head["grads"] @ np.linalg.pinv(head["hessian"], rtol=ihvp.rcond, hermitian=True)
    assert_close(ihvp.solve64(head["grads"]), expected, 1e-3)


def test_damped_arnoldi_drops_nothing_and_exposes_rcond(head: dict) -> None:
    from vestigia import ArnoldiInfluenceCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectrumWarning)
        calc = ArnoldiInfluenceCalculator(
            head["im"], head["ds"], subspace_dim=21, force_hermitian=True, k_largest_eig_vals=21, damping=1e-4
        )
    assert calc.n_dropped == 0
    damped = head["hessian"] + 1e-4 * np.eye(21)
    values = calc.self_influence(head["ds"])
    assert_close(values, np.einsum("np,nq,pq->n", head["grads"], head["grads"], np.linalg.inv(damped)), SOLVE_RTOL)
    with pytest.warns(SpectrumWarning, match="singular"):
        strict = ArnoldiInfluenceCalculator(
            head["im"], head["ds"], subspace_dim=21, force_hermitian=True, k_largest_eig_vals=21, rcond=0.5
        )
    assert strict.n_dropped > 0


# -- iterative solvers that stop short --------------------------------------------------------


def test_cg_stopped_by_its_iteration_limit_warns_with_the_residual(head: dict) -> None:
    cg = ConjugateGradientDescentIHVP(head["im"], train_dataset=head["ds"], damping=1e-3, n_opt_iters=2, tol=1e-8)
    vectors = head["grads"][:5]
    with pytest.warns(ConvergenceWarning, match="stopped at n_opt_iters=2 with 5 of 5 vectors above tol"):
        solution = cg.solve(vectors).numpy().astype(np.float64)
    damped = head["hessian"] + 1e-3 * np.eye(21)
    oracle = np.linalg.norm(solution @ damped - vectors, axis=1) / np.linalg.norm(vectors, axis=1)
    assert_close(cg.last_residuals, oracle, 1e-3)
    assert cg.last_residuals.min() > 1e-3


def test_lissa_stopped_short_warns_with_the_residual(head: dict) -> None:
    lissa = LissaIHVP(head["im"], train_dataset=head["ds"], damping=DAMPING, scale=5.0, n_opt_iters=3)
    vectors = head["grads"][:4]
    with pytest.warns(ConvergenceWarning, match="n_opt_iters=3 iterations with 4 of 4 vectors above"):
        solution = lissa.solve(vectors).numpy().astype(np.float64)
    damped = head["hessian"] + DAMPING * np.eye(21)
    oracle = np.linalg.norm(solution @ damped - vectors, axis=1) / np.linalg.norm(vectors, axis=1)
    assert_close(lissa.last_residuals, oracle, 1e-3)


def test_lissa_scale_below_the_largest_eigenvalue_is_refused(head: dict) -> None:
    lam_max = np.linalg.eigvalsh(head["hessian"] + DAMPING * np.eye(21)).max()
    with pytest.raises(ValueError, match=r"`scale` must exceed the largest eigenvalue .* Received: scale=0.1"):
        LissaIHVP(head["im"], train_dataset=head["ds"], damping=DAMPING, scale=0.1)
    assert 0.1 < lam_max / 2  # the series would diverge
    # Without the estimate, the divergence itself is caught instead of returning NaN.
    unchecked = LissaIHVP(
        head["im"], train_dataset=head["ds"], damping=DAMPING, scale=0.1, power_iterations=0, n_opt_iters=2000
    )
    with pytest.raises(NonFiniteError, match="LissaIHVP diverged"):
        unchecked.solve(head["grads"][:2])


def test_stochastic_lissa_converges_to_the_exact_solve(head: dict) -> None:
    damped = head["hessian"] + DAMPING * np.eye(21)
    lam = np.linalg.eigvalsh(damped)
    vectors = head["grads"][:4]
    expected = np.linalg.solve(damped, vectors.T).T
    lissa = LissaIHVP(
        head["im"],
        train_dataset=batched(head["x"], head["y"], 8),
        damping=DAMPING,
        scale=2 * lam.max(),
        depth=400,
        repeats=4,
        tol=0.2,
    )
    found = lissa.solve(vectors).numpy()
    # Mini-batch noise: each step uses one batch of 8 of 40; averaged over 4 repeats the result
    # is within 10% of the exact solve (measured 3-5%), where 20 full-batch steps are not.
    rel = np.linalg.norm(found - expected) / np.linalg.norm(expected)
    assert rel < 0.1, rel


# -- memory -----------------------------------------------------------------------------------


def test_exact_solver_on_200k_parameters_is_refused_before_allocating() -> None:
    keras.utils.set_random_seed(34)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    im = InfluenceModel(model, start_layer=0, loss_function=logits_loss())
    assert im.nb_params == 200_960
    x = np.zeros((4, 784), np.float32)
    y = np.eye(10, dtype=np.float32)[:4]
    with pytest.raises(InsufficientMemoryError, match=r"needs \d+\.\d+ GiB .*'cg'.*'lissa'.*Arnoldi.*'ekfac'"):
        ExactIHVP(im, batched(x, y, 4))


def test_arnoldi_basis_checked_against_the_memory_limit(head: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESTIGIA_MEMORY_LIMIT_BYTES", "1000")
    with pytest.raises(InsufficientMemoryError, match=r"Krylov basis \(21 x 21 float64\) needs"):
        ArnoldiIHVP(head["im"], head["ds"], subspace_dim=20, k_largest_eig_vals=5, damping=DAMPING)


# -- non-finite values ------------------------------------------------------------------------


def test_non_finite_vectors_are_named_by_each_solver(head: dict) -> None:
    vectors = head["grads"][:3].copy()
    vectors[1, 4] = np.nan
    exact = ExactIHVP(head["im"], head["ds"], damping=DAMPING)
    with pytest.raises(
        NonFiniteError, match=r"ExactIHVP.solve returned NaN or Inf for 1 of 3 vectors \(first: row 1\)"
    ):
        exact.solve(vectors)
    cg = ConjugateGradientDescentIHVP(head["im"], train_dataset=head["ds"], damping=DAMPING)
    with pytest.raises(NonFiniteError, match="`vectors` given to ConjugateGradientDescentIHVP.solve hold NaN"):
        cg.solve(vectors)


def test_non_finite_given_hessian_is_named(head: dict) -> None:
    hessian = head["hessian"].copy()
    hessian[2, 3] = np.inf
    with pytest.raises(NonFiniteError, match="`train_hessian` holds 1 non-finite"):
        ExactIHVP(head["im"], train_hessian=hessian, damping=DAMPING)


# -- the Cholesky path above SMALL_MATRIX -----------------------------------------------------


def test_cholesky_path_matches_numpy_and_falls_back_when_singular(head: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from vestigia.curvature import exact

    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    damped = head["hessian"] + DAMPING * np.eye(21)
    ihvp = ExactIHVP(head["im"], head["ds"], damping=DAMPING)
    assert ihvp._cholesky is not None and ihvp.n_dropped == 0 and ihvp.n_negative == 0
    grads = head["grads"]
    assert_close(ihvp.solve64(grads), np.linalg.solve(damped, grads.T).T, SOLVE_RTOL)
    assert_close(ihvp.quadratic_form(grads), np.einsum("np,nq,pq->n", grads, grads, np.linalg.inv(damped)), SOLVE_RTOL)
    assert_close(ihvp.hvp(grads).numpy(), grads @ damped, HESS_RTOL)
    # Undamped, the softmax null space makes Cholesky fail or pivot below the cut: pseudo-inverse.
    with pytest.warns(SpectrumWarning, match="7 of 21"):
        undamped = ExactIHVP(head["im"], head["ds"])
    assert undamped._cholesky is None and undamped.n_dropped == 7
