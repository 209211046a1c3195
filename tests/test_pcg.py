"""Preconditioned conjugate gradient against `np.linalg.solve`, with iteration counts.

Oracles: `np.linalg.solve` on a dense SPD matrix (the core, float64) and on the closed-form
softmax Hessian (`oracles.softmax_head_hessian`) of a logistic regression (the solver, whose
HVPs are float32 sums: its answers are good to `HVP_RTOL`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, autodiff_mean_hessian, softmax_head_hessian

from vestigia import InfluenceModel
from vestigia.curvature import ConjugateGradientDescentIHVP, ExactIHVP, conjugate_gradient
from vestigia.curvature.preconditioners import has_class_invariance, nystrom_approximation, nystrom_preconditioner

CORE_RTOL = 1e-9  # float64 CG run to tol 1e-12 on a matrix with cond 1e3
HVP_RTOL = 1e-4  # float32 HVP sums (1e-6 relative) times cond(H + damping I) (~1e2 here)
DAMPING = 1e-2


def test_pcg_core_solves_and_needs_fewer_iterations_with_a_good_preconditioner() -> None:
    """A badly scaled SPD matrix: Jacobi preconditioning removes the scaling, so PCG needs far fewer
    iterations than CG for the same answer."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(60, 60))
    core = basis @ basis.T / 60 + np.eye(60)
    scale = np.logspace(-1.5, 1.5, 60)
    matrix = core * np.outer(scale, scale)
    rhs = rng.normal(size=(5, 60))
    expected = np.linalg.solve(matrix, rhs.T).T
    plain = conjugate_gradient(matrix, rhs, max_iterations=500, tol=1e-12, atol=0.0)
    jacobi = conjugate_gradient(matrix, rhs, 500, 1e-12, 0.0, preconditioner=lambda rows: rows / np.diag(matrix))
    assert_close(plain.solution, expected, CORE_RTOL)
    assert_close(jacobi.solution, expected, CORE_RTOL)
    assert jacobi.converged.all() and plain.converged.all()
    assert jacobi.iterations * 3 <= plain.iterations
    true_residuals = np.linalg.norm(rhs - jacobi.solution @ matrix, axis=1)
    assert_close(jacobi.residual_norms, true_residuals, 1e-2)  # recursive residual of b - A x, not M^-1 r


def test_pcg_core_flags_an_indefinite_preconditioner() -> None:
    rhs = np.ones((2, 4))
    result = conjugate_gradient(np.eye(4) * 2.0, rhs, preconditioner=lambda rows: -rows)
    assert result.negative_curvature.all() and not result.converged.any()


@pytest.fixture(scope="module")
def logistic() -> dict:
    """Softmax regression on inputs of very different scales (an ill-conditioned H)."""
    rng = np.random.default_rng(7)
    n, d, classes = 80, 6, 4
    x = (rng.normal(size=(n, d)) * np.logspace(-1, 1, d)).astype("float32")
    y = np.eye(classes, dtype="float32")[rng.integers(0, classes, n)]
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(classes)])
    model.layers[0].kernel.assign((rng.normal(size=(d, classes)) * 0.3).astype("float32"))
    im = InfluenceModel(model, start_layer=0, loss_function=logits_loss())
    layer = model.layers[0]
    hessian = softmax_head_hessian(x, layer.kernel.numpy(), layer.bias.numpy()) + DAMPING * np.eye(im.nb_params)
    return {"im": im, "ds": batched(x, y, 32), "hessian": hessian}


def test_block_jacobi_pcg_matches_numpy_in_fewer_iterations(logistic: dict) -> None:
    vectors = np.random.default_rng(8).normal(size=(6, logistic["im"].nb_params))
    expected = np.linalg.solve(logistic["hessian"], vectors.T).T
    runs = {}
    for preconditioner in (None, "block-jacobi"):
        for tol in (1e-6, 1e-3):
            cg = ConjugateGradientDescentIHVP(
                logistic["im"],
                train_dataset=logistic["ds"],
                n_opt_iters=500,
                damping=DAMPING,
                tol=tol,
                preconditioner=preconditioner,
            )
            solution = cg.solve(vectors).numpy()
            assert cg.last_residuals.max() <= tol
            runs[preconditioner, tol] = cg.last_iterations
        assert_close(solution, expected, 10 * 1e-3)  # tol 1e-3 on the residual, times cond(H) ~ 10 on it
        # the reported residuals are those of the unpreconditioned system (up to float32 HVP noise)
        true_residuals = np.linalg.norm(solution @ logistic["hessian"] - vectors, axis=1)
        assert_close(cg.last_residuals, true_residuals / np.linalg.norm(vectors, axis=1), 0.02)
    assert runs["block-jacobi", 1e-6] * 3 <= runs[None, 1e-6] * 2, runs  # 26 against 47
    assert runs["block-jacobi", 1e-3] < runs[None, 1e-3], runs
    tight = ConjugateGradientDescentIHVP(
        logistic["im"], train_dataset=logistic["ds"], damping=DAMPING, tol=1e-6, preconditioner="block-jacobi"
    )
    assert_close(tight.solve(vectors).numpy(), expected, HVP_RTOL)


def test_any_solver_or_callable_preconditions(logistic: dict) -> None:
    exact = ExactIHVP(logistic["im"], logistic["ds"], damping=DAMPING)
    vectors = np.random.default_rng(9).normal(size=(3, logistic["im"].nb_params))
    for preconditioner in (exact, exact.solve64):
        cg = ConjugateGradientDescentIHVP(
            logistic["im"], train_dataset=logistic["ds"], damping=DAMPING, tol=1e-6, preconditioner=preconditioner
        )
        assert_close(cg.solve(vectors).numpy(), exact.solve64(vectors), HVP_RTOL)
        assert cg.last_iterations <= 3  # the exact inverse as preconditioner: done at once (float32 HVPs)


def test_bad_preconditioners_are_refused(logistic: dict) -> None:
    with pytest.raises(ValueError, match="preconditioner"):
        ConjugateGradientDescentIHVP(logistic["im"], train_dataset=logistic["ds"], preconditioner="ilu")
    x, y = make_classification(n=20, d=5, classes=3)
    whole = InfluenceModel(make_mlp(), start_layer=0, last_layer=1, loss_function=logits_loss())
    with pytest.raises(ValueError, match="one watched Dense layer"):
        ConjugateGradientDescentIHVP(whole, train_dataset=batched(x, y), preconditioner="block-jacobi")


# -- preconditioners (vestigia.curvature.preconditioners) -------------------------------------------

SPD_RTOL = 1e-12  # symmetry of a preconditioner assembled from float64 products (round-off only)
SPD_RTOL_FLOAT32 = 1e-6  # the class blocks are applied in float32 (eps 6e-8, sums of a few terms)
FLOAT32_APPLY_RTOL = 1e-5  # float32 blocks and HVP-built factors against a float64 dense inverse (cond ~1e2)


def dense_operator(apply, n: int) -> np.ndarray:
    """The matrix of a rows-to-rows callable, by applying it to the identity."""
    return np.asarray(apply(np.eye(n)), dtype=np.float64).T


def assert_spd(matrix: np.ndarray, rtol: float = SPD_RTOL) -> None:
    assert_close(matrix, matrix.T, rtol)
    assert np.linalg.eigvalsh((matrix + matrix.T) / 2).min() > 0


def test_nystrom_approximation_is_exact_for_a_low_rank_matrix_and_its_preconditioner_flattens_the_top() -> None:
    """A PSD matrix of rank 8 sketched with rank 12: the Nystrom approximation reproduces it (to
    round-off), `lam_l = 0`, and `M^-1 = mu (A + mu I)^-1`: the condition number of `M^-1 (A + mu I)`
    drops from `(lam_1 + mu) / mu` to 1."""
    rng = np.random.default_rng(3)
    factor = rng.normal(size=(40, 8)) * np.logspace(0, 2, 8)
    low_rank, mu = factor @ factor.T, 0.5
    basis, eigenvalues, smallest = nystrom_approximation(lambda rows: rows @ low_rank, 40, 12, seed=1)
    assert_close(basis * eigenvalues @ basis.T, low_rank, 1e-9)  # float64 sketch of an exactly rank-8 matrix
    assert smallest == 0.0 and len(eigenvalues) == 8
    preconditioner = dense_operator(nystrom_preconditioner(basis, eigenvalues, smallest, mu), 40)
    assert_spd(preconditioner)
    spectrum = np.linalg.eigvals(preconditioner @ (low_rank + mu * np.eye(40))).real
    before = np.linalg.eigvalsh(low_rank + mu * np.eye(40))
    assert spectrum.max() / spectrum.min() < 1.0 + 1e-6 < before.max() / before.min()


def test_class_block_preconditioner_is_spd_and_exact_on_the_class_mean_directions(logistic: dict) -> None:
    cg = ConjugateGradientDescentIHVP(
        logistic["im"], train_dataset=logistic["ds"], damping=DAMPING, preconditioner="block-jacobi"
    )
    assert cg.class_invariant  # softmax cross-entropy, uniform damping
    n_params, hessian = logistic["im"].nb_params, logistic["hessian"]
    preconditioner = dense_operator(cg.preconditioner, n_params)
    assert_spd(preconditioner, SPD_RTOL_FLOAT32)
    n_out = 4
    # w 1^T (every class of an input alike) is mapped by H to damping * itself, and back by M^-1
    class_mean = np.repeat(np.random.default_rng(1).normal(size=(n_params // n_out, 1)), n_out, axis=1).reshape(-1)
    assert_close(hessian @ class_mean, DAMPING * class_mean, HVP_RTOL)
    assert_close(preconditioner @ (hessian @ class_mean), class_mean, HVP_RTOL)
    # the dense oracle Z S^-1 Z + (I - Z) D^-1 (I - Z), Z the mean over the classes of each input
    blocks = np.zeros_like(hessian)
    for c in range(n_out):
        index = np.arange(c, n_params, n_out)
        blocks[np.ix_(index, index)] = hessian[np.ix_(index, index)]
    class_mean_projector = np.kron(np.eye(n_params // n_out), np.full((n_out, n_out), 1.0 / n_out))
    complement = np.eye(n_params) - class_mean_projector
    expected = class_mean_projector / DAMPING + complement @ np.linalg.inv(blocks) @ complement
    assert_close(preconditioner, expected, FLOAT32_APPLY_RTOL)
    # a smaller condition number of M^-1 H than with block-Jacobi alone (D^-1 H)
    kappa = [np.ptp(np.log(np.linalg.eigvals(m @ hessian).real)) for m in (preconditioner, np.linalg.inv(blocks))]
    assert kappa[0] < kappa[1], kappa


def test_class_invariance_needs_zero_row_sums_and_a_class_uniform_shift() -> None:
    softmax = np.array([[[0.2, -0.2], [-0.2, 0.2]]])
    assert has_class_invariance([softmax], np.full((3, 2), 0.1))
    assert not has_class_invariance([softmax], np.array([[0.1, 0.2], [0.1, 0.1], [0.1, 0.1]]))
    assert not has_class_invariance([softmax + np.eye(2) * 0.1], np.full((3, 2), 0.1))


@pytest.mark.parametrize("rank", [8, 40])
def test_nystrom_pcg_matches_numpy_in_no_more_iterations_than_cg(logistic: dict, rank: int) -> None:
    vectors = np.random.default_rng(10).normal(size=(6, logistic["im"].nb_params))
    expected = np.linalg.solve(logistic["hessian"], vectors.T).T
    runs = {}
    for preconditioner in (None, "nystrom"):
        cg = ConjugateGradientDescentIHVP(
            logistic["im"],
            train_dataset=logistic["ds"],
            n_opt_iters=500,
            damping=DAMPING,
            tol=1e-6,
            preconditioner=preconditioner,
            preconditioner_rank=rank,
        )
        assert_close(cg.solve(vectors).numpy(), expected, HVP_RTOL)
        runs[preconditioner] = cg.last_iterations
    assert runs["nystrom"] <= runs[None], runs
    if rank == 40:  # n_params = 28: a full-rank sketch is (up to the float32 HVPs) the exact inverse
        assert runs["nystrom"] <= 3, runs


def test_nystrom_preconditions_a_whole_model() -> None:
    """Two watched Dense layers (no class blocks): 'nystrom' needs only HVPs; against the autodiff
    Hessian of the whole model, with damping making it positive definite."""
    x, y = make_classification(n=40, d=5, classes=3, seed=2)
    model = make_mlp()
    im = InfluenceModel(model, start_layer=0, last_layer=1, loss_function=logits_loss())
    hessian = autodiff_mean_hessian(model, im.weights, logits_loss(), x, y)
    damping = max(0.0, -np.linalg.eigvalsh(hessian).min()) + 0.05
    vectors = np.random.default_rng(11).normal(size=(4, im.nb_params))
    expected = np.linalg.solve(hessian + damping * np.eye(im.nb_params), vectors.T).T
    runs = {}
    for preconditioner in (None, "nystrom"):
        cg = ConjugateGradientDescentIHVP(
            im,
            train_dataset=batched(x, y),
            damping=damping,
            tol=1e-7,
            n_opt_iters=500,
            preconditioner=preconditioner,
            preconditioner_rank=20,
        )
        assert_close(cg.solve(vectors).numpy(), expected, HVP_RTOL)
        runs[preconditioner] = cg.last_iterations
    assert runs["nystrom"] < runs[None], runs


def test_nystrom_rank_is_checked(logistic: dict) -> None:
    with pytest.raises(ValueError, match="preconditioner_rank"):
        ConjugateGradientDescentIHVP(
            logistic["im"], train_dataset=logistic["ds"], preconditioner="nystrom", preconditioner_rank=0
        )
