"""Curvature: exact, CG and LiSSA inverse-Hessian-vector products against dense NumPy oracles.

The Hessian oracle is the closed form of softmax cross-entropy on a Dense head
(`oracles.softmax_head_hessian`); inverses come from `np.linalg.pinv` / `np.linalg.solve`
in float64. The library's Hessian entries are float32 sums, hence `HESS_RTOL`; solves
amplify that by the condition number of the damped Hessian, hence `SOLVE_RTOL`.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, softmax_head_gradients, softmax_head_hessian

from vestigia import BaseInfluenceModel, InfluenceModel
from vestigia.curvature import (
    ConjugateGradientDescentIHVP,
    ExactIHVP,
    IHVPCalculator,
    InverseHessianVectorProduct,
    LissaIHVP,
    conjugate_gradient,
    get,
    lissa,
    mean_hessian,
)
from vestigia.curvature.base import kronecker_hessian_products
from vestigia.errors import InvalidDataError

HESS_RTOL = 1e-5  # float32 Hessian entries vs the float64 closed form
SOLVE_RTOL = 1e-4  # float32 Hessian error (1e-6 relative) times cond(H + damping I) (~1e2 here)
PINV_RTOL = 1e-3  # pseudo-inverse without damping: cond of H on its range is ~1e3 here
ITER_RTOL = 1e-5  # CG / LiSSA run to (near) convergence vs the exact solve
DAMPING = 0.05


@pytest.fixture(scope="module")
def problem() -> dict:
    x, y = make_classification(n=40, d=5, classes=3, seed=20)
    model = make_mlp(d=5, hidden=6, classes=3, seed=20)
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    hidden, head = model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    kernel, bias = head.kernel.numpy(), head.bias.numpy()
    return {
        "x": x,
        "y": y,
        "im": im,
        "ds": batched(x, y, 16),
        "hessian": softmax_head_hessian(features, kernel, bias),
        "grads": softmax_head_gradients(features, kernel, bias, y),
    }


def test_exact_pseudo_inverse_matches_numpy(problem: dict) -> None:
    im, oracle = problem["im"], problem["hessian"]
    ihvp = ExactIHVP(im, problem["ds"])
    assert ihvp.rcond == pytest.approx(10 * np.sqrt(im.nb_params) * np.finfo(np.float32).eps)
    assert ihvp.n_dropped == 7 and ihvp.n_negative == 0
    assert_close(ihvp.hessian, oracle, HESS_RTOL)
    # The pseudo-inverse logic, on the library's own Hessian.
    assert_close(ihvp.inv_hessian, np.linalg.pinv(ihvp.hessian, rcond=ihvp.rcond, hermitian=True), 1e-8)
    # End to end, on gradients (which lie in the range of H): H^+ g with the oracle Hessian.
    grads = problem["grads"]
    expected = grads @ np.linalg.pinv(oracle, rcond=ihvp.rcond, hermitian=True)
    assert_close(ihvp.solve64(grads), expected, PINV_RTOL)
    assert_close(ihvp.solve(grads).numpy(), expected, PINV_RTOL)
    # The softmax Hessian has the exact null space {kron(u, 1)}: (hidden + 1) directions.
    assert int(np.sum(np.abs(ihvp.eigenvalues) <= ihvp.rcond * np.abs(ihvp.eigenvalues).max())) == 7


def test_exact_damped_solve_matches_numpy(problem: dict) -> None:
    im, oracle = problem["im"], problem["hessian"]
    ihvp = ExactIHVP(im, problem["ds"], damping=DAMPING)
    damped = oracle + DAMPING * np.eye(im.nb_params)
    vectors = np.random.default_rng(21).normal(size=(5, im.nb_params))
    expected = np.linalg.solve(damped, vectors.T).T
    assert_close(ihvp.solve64(vectors), expected, SOLVE_RTOL)
    assert_close(ihvp.solve(vectors).numpy(), expected, SOLVE_RTOL)
    assert_close(ihvp.hvp(vectors).numpy(), vectors @ damped, HESS_RTOL)
    assert_close(ihvp.eigenvalues, np.linalg.eigvalsh(damped), HESS_RTOL)
    assert ihvp.inv_hessian.dtype == np.float64 and ihvp.solve(vectors).dtype == tf.float32


def test_batch_size_invariance_at_p_320() -> None:
    """Hessian memory does not grow with the batch: batch 100 at P = 320 (the seed needed 12.8 GB)."""
    x, y = make_classification(n=200, d=20, classes=10, seed=22)
    keras.utils.set_random_seed(22)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(31, activation="tanh"), keras.layers.Dense(10)])
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    assert im.nb_params == 320
    started = time.perf_counter()
    large = mean_hessian(im, batched(x, y, 100))
    elapsed = time.perf_counter() - started
    small = mean_hessian(im, batched(x, y, 7))
    assert_close(large, small, HESS_RTOL)
    hidden, head = model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    assert_close(large, softmax_head_hessian(features, head.kernel.numpy(), head.bias.numpy()), HESS_RTOL)
    print(f"P=320, n=200, batch 100: mean Hessian in {elapsed:.2f} s")


def test_solvers_invariant_to_batching(problem: dict) -> None:
    im, x, y = problem["im"], problem["x"], problem["y"]
    vectors = problem["grads"][:6]
    reference = ExactIHVP(im, batched(x, y, 40), damping=DAMPING).solve64(vectors)
    unknown_cardinality = batched(x, y, 16).unbatch().filter(lambda a, b: True).batch(6)  # seed: all-NaN inverse
    for ds in (batched(x, y, 3), batched(x, y, 16).prefetch(1), unknown_cardinality):
        assert_close(ExactIHVP(im, ds, damping=DAMPING).solve64(vectors), reference, SOLVE_RTOL)
        cg = ConjugateGradientDescentIHVP(im, train_dataset=ds, damping=DAMPING, tol=1e-10)
        assert_close(cg.solve(vectors).numpy(), reference, SOLVE_RTOL)


def test_sample_weights_enter_every_solver(problem: dict) -> None:
    """The seed ignored sample weights in its CG / LiSSA HVPs; here H = mean_i w_i H_i everywhere."""
    im, x, y = problem["im"], problem["x"], problem["y"]
    sw = np.random.default_rng(27).uniform(0.0, 3.0, len(x)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(16)
    hidden, head = im.model.layers
    features = np.tanh(x.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    damped = softmax_head_hessian(features, head.kernel.numpy(), head.bias.numpy(), sw) + DAMPING * np.eye(21)
    vectors = problem["grads"][:5]
    expected = np.linalg.solve(damped, vectors.T).T
    assert_close(ExactIHVP(im, ds, damping=DAMPING).hessian, damped, HESS_RTOL)
    cg = ConjugateGradientDescentIHVP(im, train_dataset=ds, damping=DAMPING, tol=1e-10)
    assert_close(cg.hvp(vectors).numpy(), vectors @ damped, HESS_RTOL)
    assert_close(cg.solve(vectors).numpy(), expected, SOLVE_RTOL)
    lissa_ihvp = LissaIHVP(im, train_dataset=ds, damping=DAMPING, scale=1.1 * np.linalg.eigvalsh(damped).max())
    assert_close(lissa_ihvp.hvp(vectors).numpy(), vectors @ damped, HESS_RTOL)


def test_cg_and_lissa_converge_to_exact(problem: dict) -> None:
    im, ds = problem["im"], problem["ds"]
    exact = ExactIHVP(im, ds, damping=DAMPING)
    vectors = problem["grads"][:8]
    reference = exact.solve64(vectors)
    cg = ConjugateGradientDescentIHVP(im, train_dataset=ds, damping=DAMPING, n_opt_iters=100, tol=1e-10)
    distance_cg = assert_close(cg.solve(vectors).numpy(), reference, ITER_RTOL)
    assert cg.last_iterations <= im.nb_params + 5
    assert_close(cg.hvp(vectors).numpy(), vectors @ exact.hessian, HESS_RTOL)
    # LiSSA: error factor (1 - lambda_min / scale) per iteration; pick enough iterations for 1e-7.
    lam_min, lam_max = exact.eigenvalues.min(), exact.eigenvalues.max()
    scale = 1.1 * lam_max
    iterations = int(np.ceil(np.log(1e-7) / np.log(1.0 - lam_min / scale)))
    lissa_ihvp = LissaIHVP(im, train_dataset=ds, damping=DAMPING, scale=scale, n_opt_iters=iterations)
    distance_lissa = assert_close(lissa_ihvp.solve(vectors).numpy(), reference, ITER_RTOL)
    print(f"CG distance {distance_cg:.2e} ({cg.last_iterations} its), LiSSA {distance_lissa:.2e} ({iterations} its)")


def _spd(p: int, seed: int, low: float = 0.1, high: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    eigenvalues = np.geomspace(low, high, p)
    return (q * eigenvalues) @ q.T, q, eigenvalues


def test_conjugate_gradient_core_many_right_hand_sides() -> None:
    matrix, q, eigenvalues = _spd(40, 23)
    rng = np.random.default_rng(24)
    # Rows converging at different speeds: an eigenvector (1 step), a 3-eigenvector mix (3 steps),
    # random vectors (up to p steps), and a zero row (0 steps).
    rhs = np.stack([q[:, 5], q[:, [1, 20, 39]] @ np.array([1.0, -2.0, 0.5]), *rng.normal(size=(4, 40)), np.zeros(40)])
    expected = np.linalg.solve(matrix, rhs.T).T
    for operator in (matrix, lambda rows: rows @ matrix):
        result = conjugate_gradient(operator, rhs, max_iterations=200, tol=1e-12, atol=1e-14)
        assert_close(result.solution, expected, 1e-9)
        assert result.iterations <= 60
        assert np.all(result.residual_norms <= np.maximum(1e-12 * np.linalg.norm(rhs, axis=1), 1e-14) * 10)
    np.testing.assert_allclose(result.solution[0], q[:, 5] / eigenvalues[5], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(result.solution[-1], 0.0)
    # Stopping by iterations: 3 steps solve the 3-eigenvector row exactly, not the random rows.
    short = conjugate_gradient(matrix, rhs, max_iterations=3, tol=1e-12)
    assert_close(short.solution[1], expected[1], 1e-9)
    assert np.abs(short.solution[2] - expected[2]).max() > 1e-3


def test_lissa_core_against_solve() -> None:
    matrix, _, eigenvalues = _spd(30, 25, low=0.5, high=5.0)
    rhs = np.random.default_rng(26).normal(size=(5, 30))
    expected = np.linalg.solve(matrix, rhs.T).T
    scale = 1.05 * eigenvalues.max()
    iterations = int(np.ceil(np.log(1e-10) / np.log(1 - eigenvalues.min() / scale)))
    assert_close(lissa(matrix, rhs, iterations, scale), expected, 1e-8)
    assert_close(lissa(lambda rows: rows @ matrix, rhs, iterations, scale), expected, 1e-8)
    # Too few iterations leave a visible error: the series is truncated, not exact.
    assert np.abs(lissa(matrix, rhs, 5, scale) - expected).max() > 1e-2


@pytest.mark.parametrize("kind", ["exact", "cg"])
def test_seed_views_return_p_by_b_blocks(problem: dict, kind: str) -> None:
    im, x, y = problem["im"], problem["x"], problem["y"]
    if kind == "exact":
        ihvp: InverseHessianVectorProduct = ExactIHVP(im, problem["ds"], damping=DAMPING)
    else:
        ihvp = ConjugateGradientDescentIHVP(im, train_dataset=problem["ds"], damping=DAMPING, tol=1e-10)
    damped = problem["hessian"] + DAMPING * np.eye(im.nb_params)
    grads = problem["grads"][:10]
    group = batched(x[:10], y[:10], 4)
    blocks = list(ihvp.compute_ihvp(group))
    assert [tuple(b.shape) for b in blocks] == [(21, 4), (21, 4), (21, 2)]
    assert_close(np.concatenate([b.numpy() for b in blocks], axis=1), np.linalg.solve(damped, grads.T), SOLVE_RTOL)
    hvp_blocks = list(ihvp.compute_hvp(group))
    assert_close(np.concatenate([b.numpy() for b in hvp_blocks], axis=1), damped @ grads.T, HESS_RTOL)
    vectors = tf.data.Dataset.from_tensor_slices(grads.astype("float32")).batch(3)
    raw = list(ihvp.compute_ihvp(vectors, use_gradient=False))
    assert [tuple(b.shape) for b in raw] == [(21, 3)] * 3 + [(21, 1)]
    assert_close(np.concatenate([b.numpy() for b in raw], axis=1), np.linalg.solve(damped, grads.T), SOLVE_RTOL)
    raw_hvp = list(ihvp.compute_hvp(vectors, use_gradient=False))
    assert_close(np.concatenate([b.numpy() for b in raw_hvp], axis=1), damped @ grads.T, HESS_RTOL)


def test_train_hessian_path(problem: dict) -> None:
    im, oracle = problem["im"], problem["hessian"]
    given = ExactIHVP(im, train_hessian=oracle, damping=DAMPING)
    np.testing.assert_allclose(given.hessian, oracle + DAMPING * np.eye(21), rtol=1e-12)
    vectors = problem["grads"][:4]
    assert_close(given.solve64(vectors), np.linalg.solve(oracle + DAMPING * np.eye(21), vectors.T).T, 1e-10)
    undamped = ExactIHVP(im, train_hessian=oracle)
    assert_close(undamped.inv_hessian, np.linalg.pinv(oracle, rcond=undamped.rcond, hermitian=True), 1e-8)
    with pytest.raises(InvalidDataError, match=r"`train_hessian` must have shape \(21, 21\)"):
        ExactIHVP(im, train_hessian=np.eye(20))
    with pytest.raises(InvalidDataError, match="needs `train_dataset` or `train_hessian`"):
        ExactIHVP(im)
    with pytest.raises(InvalidDataError, match=r"shape \(m, 21\)"):
        given.solve64(np.ones((2, 5)))


def test_registry_get(problem: dict) -> None:
    im, ds = problem["im"], problem["ds"]
    expected = {
        "exact": ExactIHVP,
        "EXACT": ExactIHVP,
        "cg": ConjugateGradientDescentIHVP,
        "cgd": ConjugateGradientDescentIHVP,
        "lissa": LissaIHVP,
        IHVPCalculator.Exact: ExactIHVP,
        IHVPCalculator.Cgd: ConjugateGradientDescentIHVP,
        IHVPCalculator.Lissa: LissaIHVP,
        ExactIHVP: ExactIHVP,
        ConjugateGradientDescentIHVP: ConjugateGradientDescentIHVP,
        LissaIHVP: LissaIHVP,
    }
    for identifier, cls in expected.items():
        built = get(identifier, im, ds, damping=0.5)
        assert type(built) is cls and built.damping == 0.5, identifier
    instance = ExactIHVP(im, ds)
    assert get(instance, im, ds) is instance
    built = get("cg", im, ds, damping=DAMPING, n_opt_iters=7, tol=1e-3)
    assert built.n_opt_iters == 7 and built.tol == 1e-3
    with pytest.raises(ValueError, match="ihvp_calculator='newton'"):
        get("newton", im, ds)
    with pytest.raises(TypeError, match="Received: int"):
        get(3, im, ds)


def test_bad_arguments_raise(problem: dict) -> None:
    im, ds = problem["im"], problem["ds"]
    with pytest.raises(ValueError, match="damping=-1.0"):
        ExactIHVP(im, ds, damping=-1.0)
    with pytest.raises(ValueError, match="damping=nan"):
        ConjugateGradientDescentIHVP(im, train_dataset=ds, damping=float("nan"))
    with pytest.raises(TypeError, match="damping='a'"):
        LissaIHVP(im, train_dataset=ds, damping="a")
    with pytest.raises(ValueError, match="scale=0"):
        LissaIHVP(im, train_dataset=ds, scale=0)
    with pytest.raises(ValueError, match="n_opt_iters=0"):
        ConjugateGradientDescentIHVP(im, train_dataset=ds, n_opt_iters=0)
    with pytest.raises(InvalidDataError, match="`train_dataset` is required"):
        ConjugateGradientDescentIHVP(im)
    with pytest.raises(TypeError, match="influence_model"):
        ExactIHVP("model", ds)  # type: ignore[arg-type]


@pytest.mark.parametrize("watch_bias", [True, False])
def test_kronecker_hessian_products_equal_autodiff_hvps_and_the_closed_form(watch_bias: bool) -> None:
    """One watched Dense layer: the cached Kronecker factors give the same `H V` as the
    second-order autodiff HVP and as the closed-form softmax cross-entropy Hessian."""
    x, y = make_classification(n=40, d=5, classes=3)
    model = make_mlp()
    watched = model.layers[-1].trainable_variables if watch_bias else [model.layers[-1].kernel]
    influence_model = BaseInfluenceModel(model, watched, logits_loss())
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(4, influence_model.nb_params))
    factors, autodiff = [], 0.0
    for batch in influence_model.feature_batches(batched(x, y, 16)):
        pair = influence_model.differentiator.dense_curvature(batch.features, batch.targets, batch.weights)
        assert pair is not None
        factors.append((tf.cast(pair[0], tf.float32), tf.cast(pair[1], tf.float32)))
        products = influence_model.differentiator.hvp(
            batch.features, batch.targets, batch.weights, tf.constant(vectors, tf.float32)
        )
        autodiff = autodiff + products.numpy()
    kron = kronecker_hessian_products(factors, vectors)
    assert_close(kron, autodiff, HESS_RTOL)
    if watch_bias:
        hidden = np.tanh(x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy())
        closed = softmax_head_hessian(hidden, model.layers[-1].kernel.numpy(), model.layers[-1].bias.numpy())
        assert_close(kron / len(x), vectors @ closed, HESS_RTOL)


def test_large_damped_exact_solver_inverts_directly_and_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `SMALL_MATRIX` parameters a damped `ExactIHVP` inverts without an eigendecomposition;
    the inverse and the lazily computed eigenvalues agree with NumPy."""
    from vestigia.curvature import exact

    monkeypatch.setattr(exact, "SMALL_MATRIX", 4)
    x, y = make_classification(n=40, d=5, classes=3)
    influence_model = InfluenceModel(make_mlp(), start_layer=-1, loss_function=logits_loss())
    rng = np.random.default_rng(2)
    a = rng.normal(size=(influence_model.nb_params, influence_model.nb_params))
    given = a @ a.T / len(a)
    ihvp = ExactIHVP(influence_model, train_hessian=given, damping=DAMPING)
    assert "_eigh" not in vars(ihvp)
    damped = given + DAMPING * np.eye(len(given))
    assert_close(ihvp.inv_hessian, np.linalg.inv(damped), 1e-10)
    assert_close(ihvp.eigenvalues, np.linalg.eigvalsh(damped), 1e-10)
