"""Numerical hygiene of the solvers (issue 7, item 4): a nearly singular Hessian and an
ill-conditioned damping sweep give finite, documented results, equal to a float64 NumPy oracle,
and no NumPy floating-point warning escapes.

The model is linear least squares, `l_i = (x_i^T w - y_i)^2`, so `H = 2 X^T X / n` exactly. Two
input columns differ by 1e-7 relative noise: the smallest eigenvalue of `H` is ~1e-14 of the
largest, far below the documented cut `rcond = 10 sqrt(n_params) eps(float32)` (~5e-6).

Tolerances: the library's Hessian carries float32 round-off (~1e-7 relative); a solve amplifies
it by the condition number of `H + damping I` among the kept directions, so the tolerance is
`1e-6 * condition`, capped at `CAP_RTOL` (the undamped pseudo-inverse keeps directions down to
`rcond`, where the relative error of the float32 entries reaches ~1e-2 of the inverse's scale).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from oracles import assert_close

from vestigia import InfluenceModel
from vestigia.curvature import ConjugateGradientDescentIHVP, ExactIHVP
from vestigia.errors import SpectrumWarning

CAP_RTOL = 2e-2
DAMPINGS = [0.0, 1e-10, 1e-6, 1e-3, 1.0, 1e3]
NUMPY_WARNINGS = "(invalid value|overflow|divide by zero) encountered"


@pytest.fixture(scope="module")
def collinear() -> dict:
    rng = np.random.default_rng(70)
    n = 64
    x1 = rng.normal(size=n)
    x = np.stack([x1, x1 * (1 + 1e-7 * rng.normal(size=n)), rng.normal(size=n)], axis=1).astype(np.float32)
    y = (x @ np.array([1.0, -0.5, 2.0]) + 0.3 * rng.normal(size=n)).astype(np.float32)[:, None]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.array([[0.4], [0.3], [1.5]], np.float32))
    loss = keras.losses.MeanSquaredError(reduction=None)
    im = InfluenceModel(model, start_layer=0, loss_function=loss)
    x64 = x.astype(np.float64)
    residual = x64 @ np.array([0.4, 0.3, 1.5]) - y[:, 0]
    return {
        "ds": (x, y),
        "im": im,
        "hessian": 2.0 * x64.T @ x64 / n,
        "grads": 2.0 * residual[:, None] * x64,
    }


def _oracle_inverse(hessian: np.ndarray, damping: float, rcond: float) -> tuple[np.ndarray, float]:
    """Pseudo-inverse of `H + damping I` with the library's documented cut, and the condition
    number among the kept directions."""
    values, vectors = np.linalg.eigh(hessian + damping * np.eye(len(hessian)))
    kept = np.abs(values) > rcond * np.abs(values).max()
    inverse = (vectors[:, kept] / values[kept]) @ vectors[:, kept].T
    return inverse, float(np.abs(values[kept]).max() / np.abs(values[kept]).min())


@pytest.mark.parametrize("damping", DAMPINGS)
def test_exact_solver_damping_sweep_is_finite_and_matches_the_oracle(collinear: dict, damping: float) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=NUMPY_WARNINGS, category=RuntimeWarning)
        warnings.simplefilter("ignore", SpectrumWarning)  # the cut is reported; asserted below
        ihvp = ExactIHVP(collinear["im"], collinear["ds"], damping=damping)
        solved = ihvp.solve(collinear["grads"]).numpy()
    assert np.isfinite(solved).all()
    inverse, condition = _oracle_inverse(collinear["hessian"], damping, ihvp.rcond)
    assert_close(solved, collinear["grads"] @ inverse, min(1e-6 * condition, CAP_RTOL))
    # The near-singular direction is dropped, and said so, exactly while damping is below the cut.
    assert ihvp.n_dropped == (1 if damping < ihvp.rcond * np.linalg.eigvalsh(collinear["hessian"]).max() else 0)


def test_undamped_near_singular_hessian_warns_about_the_dropped_direction(collinear: dict) -> None:
    with pytest.warns(SpectrumWarning, match="1 of 3"):
        ExactIHVP(collinear["im"], collinear["ds"], damping=0.0).solve(collinear["grads"][:2])


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_cg_on_ill_conditioned_hessian_is_finite_and_close_to_the_oracle(collinear: dict, damping: float) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=NUMPY_WARNINGS, category=RuntimeWarning)
        ihvp = ConjugateGradientDescentIHVP(collinear["im"], train_dataset=collinear["ds"], damping=damping)
        solved = ihvp.solve(collinear["grads"][:8]).numpy()
    assert np.isfinite(solved).all()
    inverse, condition = _oracle_inverse(collinear["hessian"], damping, 0.0)
    # CG stops at its relative residual tolerance; the error in x is at most condition * tol.
    assert_close(solved, collinear["grads"][:8] @ inverse, min(max(1e-6 * condition, 1e-4), CAP_RTOL))
