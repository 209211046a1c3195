"""The Woodbury path of `ExactIHVP` against dense NumPy solves.

Oracles: the dense `H` of the module docstring of `vestigia.curvature.woodbury` built by
`np.kron` per example, `np.linalg.solve` on it, and the closed-form softmax Hessian
(`oracles.softmax_head_hessian`) for the end-to-end solver. Everything is float64, so the
tolerances are round-off times the condition number of the damped Hessian (below 1e4 here).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss
from oracles import assert_close, softmax_head_hessian

from vestigia import InfluenceModel
from vestigia.curvature import ExactIHVP, exact
from vestigia.curvature.woodbury import (
    WoodburyInverse,
    class_block_factors,
    class_block_inverses,
    class_grams,
    split_diagonal_minus_rank_one,
    woodbury_max_rows,
)

FLOAT64_RTOL = 1e-9  # float64 round-off (1e-16) times cond(H) (< 1e4) with room for the n^2-term sums
MODEL_RTOL = 1e-5  # the library's softmax probabilities vs the oracle's, through cond(H) (~1e2)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _problem(n: int = 30, n_in: int = 7, n_out: int = 4, seed: int = 0) -> dict:
    """A softmax-shaped curvature (some examples confident, one weighted 0) and a positive shift."""
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([rng.normal(size=(n, n_in - 1)), np.ones((n, 1))], axis=1)
    p = _softmax(rng.normal(size=(n, n_out)) * np.linspace(0.5, 12.0, n)[:, None])
    weights = rng.uniform(0.5, 2.0, n)
    weights[3] = 0.0
    curvature = weights[:, None, None] * (p[:, :, None] * np.eye(n_out) - p[:, :, None] * p[:, None, :])
    shift = rng.uniform(1e-3, 1e-2, (n_in, n_out))
    dense = sum(np.kron(np.outer(a, a), m) for a, m in zip(inputs, curvature)) / n + np.diag(shift.reshape(-1))
    return {"inputs": inputs, "p": p, "weights": weights, "curvature": curvature, "shift": shift, "dense": dense}


def test_split_recovers_softmax_curvature() -> None:
    problem = _problem()
    split = split_diagonal_minus_rank_one(problem["curvature"])
    assert split is not None
    e, u = split
    assert_close(e, problem["weights"][:, None] * problem["p"], FLOAT64_RTOL)
    assert_close(np.abs(u), np.sqrt(problem["weights"])[:, None] * problem["p"], FLOAT64_RTOL)


def test_split_refuses_other_curvatures() -> None:
    rng = np.random.default_rng(1)
    generic = rng.normal(size=(5, 4, 4))
    assert split_diagonal_minus_rank_one(generic @ generic.transpose(0, 2, 1)) is None
    assert split_diagonal_minus_rank_one(_problem(n_out=2)["curvature"]) is None  # not unique


def test_woodbury_solve_quadratic_form_and_hvp_match_dense() -> None:
    problem = _problem()
    e, u = split_diagonal_minus_rank_one(problem["curvature"])
    woodbury = WoodburyInverse.build(problem["inputs"], e, u, problem["shift"])
    assert woodbury is not None
    dense = problem["dense"]
    vectors = np.random.default_rng(2).normal(size=(6, len(dense)))
    expected = np.linalg.solve(dense, vectors.T).T
    assert_close(woodbury.solve(vectors), expected, FLOAT64_RTOL)
    assert_close(woodbury.quadratic_form(vectors), np.einsum("ij,ij->i", vectors, expected), FLOAT64_RTOL)
    assert_close(woodbury.hvp(vectors), vectors @ dense, FLOAT64_RTOL)
    assert_close(woodbury.diagonal, np.diag(dense), FLOAT64_RTOL)
    # the bound behind `pivot_bound`: lambda_min(H) >= lambda_min(D) min(1, lambda_min(C))
    block_diagonal = dense + problem["inputs"].shape[0] ** -1 * sum(
        np.kron(np.outer(a, a), np.outer(v, v)) for a, v in zip(problem["inputs"], u)
    )
    capacitance = np.eye(len(e)) - woodbury._low_rank @ woodbury._low_rank.T
    bound = np.linalg.eigvalsh(block_diagonal)[0] * min(1.0, np.linalg.eigvalsh(capacitance)[0])
    assert np.linalg.eigvalsh(dense)[0] >= bound * (1 - FLOAT64_RTOL) > 0


def test_class_blocks_solve_their_block_diagonal() -> None:
    problem = _problem()
    n_in, n_out = problem["shift"].shape
    weights = problem["curvature"][:, np.arange(n_out), np.arange(n_out)]
    factors = class_block_factors(class_grams(problem["inputs"], weights), len(weights), problem["shift"])
    assert factors is not None
    mask = np.kron(np.ones((n_in, n_in)), np.eye(n_out))  # the class-diagonal blocks of H
    vectors = np.random.default_rng(3).normal(size=(4, n_in * n_out))
    inverses = class_block_inverses(factors)  # (out, in, in); parameters in row-major (in, out) order
    by_class = np.einsum("cij,mjc->mic", inverses, vectors.reshape(4, n_in, n_out))
    assert_close(
        by_class.reshape(vectors.shape),
        np.linalg.solve(problem["dense"] * mask, vectors.T).T,
        FLOAT64_RTOL,
    )


def test_capacitance_not_positive_definite_is_refused() -> None:
    problem = _problem()
    e, u = split_diagonal_minus_rank_one(problem["curvature"])
    assert WoodburyInverse.build(problem["inputs"], e, 3.0 * u, problem["shift"]) is None  # D - 9 Q^T Q < 0


def test_cost_model_prefers_woodbury_below_about_n_params() -> None:
    rows = woodbury_max_rows(785, 10)
    assert 4000 < rows < 2 * 7850  # the MNIST setting (4,000 examples, 7,850 parameters) takes it


def _logistic_regression(n: int, d: int, classes: int, l2: float) -> tuple[InfluenceModel, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.eye(classes, dtype="float32")[rng.integers(0, classes, n)]
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(classes, kernel_regularizer=keras.regularizers.L2(l2))]
    )
    model.layers[0].kernel.assign(rng.normal(size=(d, classes)).astype("float32"))
    return InfluenceModel(model, start_layer=0, loss_function=logits_loss()), x, y


@pytest.mark.parametrize("damping", [1e-2, 1e-4])
def test_exact_solver_takes_woodbury_and_matches_numpy(monkeypatch: pytest.MonkeyPatch, damping: float) -> None:
    """Above `SMALL_MATRIX` with fewer examples than parameters: no dense Hessian is factored, and
    the solves, self-influence, HVPs and the lazily formed Hessian match the closed form."""
    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    l2 = 1e-3
    im, x, y = _logistic_regression(n=24, d=9, classes=4, l2=l2)
    ihvp = ExactIHVP(im, batched(x, y, 10), damping=damping)
    assert ihvp.factorization == "woodbury"
    assert (ihvp.n_dropped, ihvp.n_negative) == (0, 0)
    layer = im.model.layers[0]
    closed = softmax_head_hessian(x, layer.kernel.numpy(), layer.bias.numpy())
    closed += np.diag(np.concatenate([np.full(9 * 4, 2 * l2), np.zeros(4)]) + damping)
    vectors = np.random.default_rng(5).normal(size=(3, im.nb_params))
    expected = np.linalg.solve(closed, vectors.T).T
    assert_close(ihvp.solve64(vectors), expected, MODEL_RTOL)
    assert_close(ihvp.quadratic_form(vectors), np.einsum("ij,ij->i", vectors, expected), MODEL_RTOL)
    assert_close(ihvp.hvp(vectors).numpy(), vectors @ closed, MODEL_RTOL)
    assert_close(ihvp.hessian, closed, MODEL_RTOL)
    assert_close(ihvp.inv_hessian, np.linalg.inv(closed), MODEL_RTOL)


def test_exact_solver_keeps_the_dense_path_beyond_the_cost_crossover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    monkeypatch.setattr(exact, "woodbury_max_rows", lambda n_in, n_out: 10)
    im, x, y = _logistic_regression(n=24, d=9, classes=4, l2=1e-3)
    with_dense = ExactIHVP(im, batched(x, y, 10), damping=1e-2)
    assert with_dense.factorization == "cholesky"
    monkeypatch.undo()
    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    with_woodbury = ExactIHVP(im, batched(x, y, 10), damping=1e-2)
    vectors = np.random.default_rng(6).normal(size=(3, im.nb_params))
    assert_close(with_woodbury.solve64(vectors), with_dense.solve64(vectors), FLOAT64_RTOL * 1e2)


def test_singular_hessian_falls_back_to_the_spectrum_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undamped and unregularised with an input that is always 0: `D` is singular, so the solver
    falls back to the dense path, which drops (and counts) exactly the singular directions."""
    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    im, x, y = _logistic_regression(n=24, d=9, classes=4, l2=0.0)
    x[:, 0] = 0.0
    with pytest.warns(Warning):
        ihvp = ExactIHVP(im, batched(x, y, 10), damping=0.0)
    assert ihvp.factorization == "eigh"
    assert ihvp.n_dropped >= 4  # the 4 weights of the dead input, and the softmax's null directions
