"""K-FAC / EK-FAC against independent oracles.

Oracles: closed forms in float64 NumPy (the Hessian of a linear layer under squared error),
per-example gradients from one `GradientTape` per example (`oracles.loop_gradients`), explicitly
unfolded convolution patches, dense `numpy.linalg.solve` / `eigh`, and `ExactIHVP`'s dense
Hessian. Float32 gradient sums compared at `RTOL = 1e-4` of the largest entry (factor sums over
a few hundred examples and float32 rotations); approximations by correlation, tolerances named.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import whole_models
from oracles import assert_close, loop_gradients

from vestigia import FirstOrderInfluenceCalculator
from vestigia.curvature import EKFACIHVP, KFACIHVP, ExactIHVP
from vestigia.errors import InvalidDataError, NonFiniteError
from vestigia.gradients.layer_capture import LayerCapture
from vestigia.model.influence_model import BaseInfluenceModel

RTOL = 1e-4


def _logits_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def _data(n: int, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), np.eye(classes, dtype="float32")[rng.integers(0, classes, n)]


def _dataset(x: np.ndarray, y: np.ndarray, batch: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _quiet_model(model: keras.Model, loss: keras.losses.Loss) -> BaseInfluenceModel:
    return BaseInfluenceModel(model, loss_function=loss)


def test_kfac_equals_the_exact_hessian_when_inputs_and_output_gradients_are_independent() -> None:
    """One Dense layer, zero weights, squared error, every (input, target) pair once: `d = -(2/k) y`
    is independent of `a`, `E[d d^T] = (2/k) I`, so the empirical Fisher is exactly
    `E[a~ a~^T] (x) (2/k) I`, the Hessian of the mean loss."""
    k = 3
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(7, 4)).astype("float32")
    targets = np.concatenate([np.eye(k), -np.eye(k)]).astype("float32") * k / np.sqrt(2)
    x = np.repeat(inputs, len(targets), axis=0)
    y = np.tile(targets, (len(inputs), 1))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(k, kernel_initializer="zeros")])
    im = _quiet_model(model, keras.losses.MeanSquaredError(reduction=None))
    solver = KFACIHVP(im, _dataset(x, y), damping=0.0, fisher="empirical")
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    hessian = np.kron(a.T @ a / len(x), 2.0 / k * np.eye(k))
    probe = rng.normal(size=(5, im.nb_params))
    assert_close(solver.hvp(probe).numpy(), probe @ hessian, RTOL)
    grads = loop_gradients(model, im.weights, im.loss_function, x, y)
    assert_close(hessian, grads.T @ grads / len(x), RTOL)  # the design really is independent
    damped = KFACIHVP(im, _dataset(x, y), damping=0.3, fisher="empirical")
    assert_close(damped.solve(probe).numpy(), np.linalg.solve(hessian + 0.3 * np.eye(len(hessian)), probe.T).T, RTOL)


def _ekfac_matrix(solver: EKFACIHVP) -> np.ndarray:
    """The EK-FAC curvature built explicitly: block-diagonal `K diag(vec(Lambda) + lambda) K^T`."""
    blocks = []
    for factors in solver.layers:
        q_in = np.eye(factors.eigenvalues.shape[0]) if factors.q_in is None else factors.q_in
        basis = np.kron(q_in, factors.q_out)
        blocks.append(basis @ np.diag(factors.eigenvalues.reshape(-1) + factors.damping) @ basis.T)
    size = sum(len(b) for b in blocks)
    matrix, start = np.zeros((size, size)), 0
    for b in blocks:
        matrix[start : start + len(b), start : start + len(b)] = b
        start += len(b)
    return matrix


def test_ekfac_eigenvalues_inverse_and_scores_against_dense_numpy() -> None:
    model = whole_models.mlp()
    x, y = _data(48)
    im = _quiet_model(model, _logits_loss())
    solver = EKFACIHVP(im, _dataset(x, y), fisher="empirical")
    grads = loop_gradients(model, im.weights, im.loss_function, x, y)
    # eigenvalues: E_i[(K^T g_i)^2] per layer (the layers' kernel then bias rows are contiguous)
    start = 0
    for factors in solver.layers:
        size = factors.eigenvalues.size
        basis = np.kron(factors.q_in, factors.q_out)
        expected = np.mean((grads[:, start : start + size] @ basis) ** 2, axis=0).reshape(factors.eigenvalues.shape)
        assert_close(factors.eigenvalues, expected, RTOL)
        assert factors.damping == pytest.approx(0.1 * expected.mean(), rel=1e-4)
        start += size
    matrix = _ekfac_matrix(solver)
    probe = np.random.default_rng(1).normal(size=(4, im.nb_params))
    assert_close(solver.solve(probe).numpy(), np.linalg.solve(matrix, probe.T).T, RTOL)
    assert_close(solver.hvp(probe).numpy(), probe @ matrix, RTOL)
    # factored scores and self-influence against dense per-example gradients
    calculator = FirstOrderInfluenceCalculator(im, _dataset(x, y), ihvp_calculator=solver)
    test_x, test_y = _data(7, seed=5)
    test_grads = loop_gradients(model, im.weights, im.loss_function, test_x, test_y)
    dense_scores = test_grads @ np.linalg.solve(matrix, grads.T)
    assert_close(calculator.influence_matrix(_dataset(test_x, test_y, 3), _dataset(x, y)), dense_scores, RTOL)
    dense_self = np.einsum("np,pn->n", grads, np.linalg.solve(matrix, grads.T))
    assert_close(calculator.self_influence(_dataset(x, y)), dense_self, RTOL)


@pytest.mark.parametrize(("fraction", "selected"), [(0.5, [0, 2, 4]), (0.25, [0, 4]), (1 / 3, [0, 3])])
def test_ekfac_refit_on_an_evenly_spaced_share_of_batches(fraction: float, selected: list[int]) -> None:
    """`refit_fraction`: the eigenbasis from every batch (as full EK-FAC), the eigenvalues the mean
    of `(K^T g_i)^2` over the examples of the selected batches only (every `1/f`-th from batch 0)."""
    model = whole_models.mlp()
    x, y = _data(80)  # 5 batches of 16
    im = _quiet_model(model, _logits_loss())
    full = EKFACIHVP(im, _dataset(x, y), fisher="empirical")
    part = EKFACIHVP(im, _dataset(x, y), fisher="empirical", refit_fraction=fraction)
    rows = np.concatenate([np.arange(16 * b, 16 * b + 16) for b in selected])
    grads = loop_gradients(model, im.weights, im.loss_function, x[rows], y[rows])
    start = 0
    for whole, factors in zip(full.layers, part.layers):
        np.testing.assert_array_equal(factors.q_in, whole.q_in)
        size = factors.eigenvalues.size
        expected = np.mean((grads[:, start : start + size] @ np.kron(factors.q_in, factors.q_out)) ** 2, axis=0)
        assert_close(factors.eigenvalues, expected.reshape(factors.eigenvalues.shape), RTOL)
        start += size
    with pytest.raises(ValueError, match="refit_fraction=0"):
        EKFACIHVP(im, _dataset(x, y), refit_fraction=0)


def _patches(x: np.ndarray, size: int, stride: int, dilation: int, padding: str) -> np.ndarray:
    """Explicit loops: `(n, locations, size * size * c)` patches of `x` `(n, h, w, c)`, as TF pads."""
    n, h, w, c = x.shape
    span = dilation * (size - 1) + 1
    if padding == "same":
        out_h = -(-h // stride)
        pad = max((out_h - 1) * stride + span - h, 0)
        x = np.pad(x, [(0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)])
    else:
        out_h = (h - span) // stride + 1
    rows = []
    for i in range(out_h):
        for j in range(out_h):
            cells = [
                x[:, i * stride + u * dilation, j * stride + v * dilation, :] for u in range(size) for v in range(size)
            ]
            rows.append(np.concatenate(cells, axis=1))
    return np.stack(rows, axis=1)


@pytest.mark.parametrize(("stride", "dilation", "padding"), [(2, 1, "same"), (1, 2, "valid"), (1, 1, "same")])
def test_conv_factors_against_unfolded_patches(stride: int, dilation: int, padding: str) -> None:
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(3, 3, strides=stride, dilation_rate=dilation, padding=padding)
    model = keras.Sequential([keras.Input((7, 7, 2)), conv, keras.layers.GlobalAveragePooling2D()])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 7, 7, 2)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 5)]
    capture = LayerCapture(model, _logits_loss())
    a = capture.traced(lambda c: c.inputs[0])(x, y, np.ones(5, "float32")).numpy()
    expected = _patches(x, 3, stride, dilation, padding)
    expected = np.concatenate([expected, np.ones(expected.shape[:2] + (1,))], axis=2)
    assert_close(a, expected, 1e-6)
    im = _quiet_model(model, _logits_loss())
    solver = KFACIHVP(im, _dataset(x, y), fisher="empirical")
    cov_a = np.einsum("nti,ntj->ij", expected, expected) / (len(x) * expected.shape[1])
    alpha = np.linalg.eigvalsh(cov_a)
    factors = solver.layers[0]
    # Lambda = alpha sigma^T: its row sums over sigma give alpha * trace(S), in ascending order
    assert_close(factors.eigenvalues.sum(axis=1) / factors.eigenvalues.sum() * alpha.sum(), alpha, RTOL)


def test_low_rank_queries_match_full_rank_at_full_rank_and_approximate_below() -> None:
    model = whole_models.mlp()
    x, y = _data(40)
    im = _quiet_model(model, _logits_loss())
    train, test = _dataset(x, y), _dataset(*_data(9, seed=3), batch=4)
    solver = EKFACIHVP(im, train, fisher="empirical")
    reference = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=solver).influence_matrix(test, train)
    scores = {}
    for rank in (1, 2, 7):  # 7 >= min(in, out) of every layer: exact
        solver.query_rank = rank
        scores[rank] = FirstOrderInfluenceCalculator(im, train, ihvp_calculator=solver).influence_matrix(test, train)
    assert_close(scores[7], reference, RTOL)
    correlations = [np.corrcoef(scores[r].ravel(), reference.ravel())[0, 1] for r in (1, 2)]
    # rank 2 of matrices of rank <= 3 keeps most of the signal; the fidelity grows with the rank
    assert correlations[1] > 0.95 and correlations[1] >= correlations[0] - 1e-6, correlations


def _gauss_newton(model: keras.Model, variables: list, x: np.ndarray) -> np.ndarray:
    """`mean_i J_i^T (diag p_i - p_i p_i^T) J_i`, `J_i` the logits' Jacobian (plain TF autodiff)."""
    with tf.GradientTape() as tape:
        logits = model(x)
    parts = tape.jacobian(logits, [v.value for v in variables], experimental_use_pfor=True)
    n, k = logits.shape
    jac = np.concatenate([np.reshape(p.numpy(), (n, k, -1)) for p in parts], axis=2).astype(np.float64)
    p = tf.nn.softmax(logits).numpy().astype(np.float64)
    middle = np.einsum("nk,kl->nkl", p, np.eye(k)) - np.einsum("nk,nl->nkl", p, p)
    return np.einsum("nkp,nkl,nlq->pq", jac, middle, jac) / n


@pytest.mark.slow
def test_ekfac_influence_correlates_with_exact_gauss_newton_influence() -> None:
    """All layers of a trained MLP (91 parameters). The oracle is exact influence with the exact
    Gauss-Newton matrix (what the true Fisher estimates; the full Hessian of this non-convex net is
    indefinite) and the same mean damping. EK-FAC differs by the block-diagonal and Kronecker
    structure and one label draw per example. Measured: Pearson 0.73 on pairwise values, Spearman
    0.986 on self-influence; tolerances 0.6 and 0.95."""
    from conftest import make_classification
    from scipy.stats import spearmanr

    x, y = make_classification(140, 6, 3, seed=2)
    model = whole_models.mlp(seed=1)
    model.compile(optimizer=keras.optimizers.Adam(0.03), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(x[:120], y[:120], epochs=10, batch_size=32, verbose=0)
    im = _quiet_model(model, _logits_loss())
    train, test = _dataset(x[:120], y[:120], 40), _dataset(x[120:], y[120:], 10)
    ekfac = FirstOrderInfluenceCalculator(im, train, ihvp_calculator="ekfac")
    damping = np.mean([f.damping for f in ekfac.ihvp_calculator.layers])
    hessian = _gauss_newton(model, im.weights, x[:120]) + damping * np.eye(im.nb_params)
    grads = loop_gradients(model, im.weights, im.loss_function, x[:120], y[:120])
    test_grads = loop_gradients(model, im.weights, im.loss_function, x[120:], y[120:])
    exact = test_grads @ np.linalg.solve(hessian, grads.T)
    exact_self = np.einsum("np,pn->n", grads, np.linalg.solve(hessian, grads.T))
    pearson = np.corrcoef(ekfac.influence_matrix(test, train).ravel(), exact.ravel())[0, 1]
    spearman = spearmanr(ekfac.self_influence(train), exact_self).statistic
    assert pearson > 0.6 and spearman > 0.95, (pearson, spearman)


def test_factors_saved_and_loaded_with_fingerprint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = whole_models.mlp()
    x, y = _data(32)
    im = _quiet_model(model, _logits_loss())
    path = tmp_path / "factors.npz"
    first = EKFACIHVP(im, _dataset(x, y), factors_path=path)
    assert path.exists()
    probe = np.random.default_rng(0).normal(size=(2, im.nb_params))
    loaded = EKFACIHVP(im, _dataset(x, y, batch=5), factors_path=path)  # batch size is not part of the data
    np.testing.assert_array_equal(loaded.solve(probe).numpy(), first.solve(probe).numpy())
    with pytest.raises(InvalidDataError, match="data"):
        EKFACIHVP(im, _dataset(x[:20], y[:20]), factors_path=path)
    with pytest.raises(InvalidDataError, match="settings damping_fraction"):
        EKFACIHVP(im, _dataset(x, y), factors_path=path, damping_fraction=0.5)
    with pytest.raises(InvalidDataError, match="refit_fraction"):
        EKFACIHVP(im, _dataset(x, y), factors_path=path, refit_fraction=0.5)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    with pytest.raises(InvalidDataError, match="model weights"):
        EKFACIHVP(im, _dataset(x, y), factors_path=path)


def test_integer_sample_weights_equal_repeated_examples() -> None:
    """`H` is the weighted mean: weight 2 on an example = the example twice (same n otherwise)."""
    model = whole_models.mlp()
    x, y = _data(12)
    im = _quiet_model(model, _logits_loss())
    weights = np.ones(12, "float32")
    weights[:4] = 2.0
    weighted = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(5)
    repeated = _dataset(np.concatenate([x, x[:4]]), np.concatenate([y, y[:4]]))
    first = EKFACIHVP(im, weighted, fisher="empirical", damping=0.1)
    second = EKFACIHVP(im, repeated, fisher="empirical", damping=0.1)
    probe = np.random.default_rng(0).normal(size=(3, im.nb_params))
    # the means differ by n (12 vs 16): compare the sums
    assert_close(first.hvp(probe).numpy() * 12 - 0.1 * 12 * probe, second.hvp(probe).numpy() * 16 - 1.6 * probe, RTOL)


def test_non_finite_factors_name_the_layer() -> None:
    model = whole_models.mlp()
    x, y = _data(16)
    x[3, 0] = np.inf
    im = _quiet_model(model, _logits_loss())
    with pytest.raises(NonFiniteError, match="layer 'sequential.*dense"):
        KFACIHVP(im, _dataset(x, y), fisher="empirical")


def test_bad_settings_and_unsupported_loss_are_named() -> None:
    model = whole_models.mlp()
    im = _quiet_model(model, _logits_loss())
    data = _dataset(*_data(8))
    with pytest.raises(ValueError, match="fisher='fisherman'"):
        KFACIHVP(im, data, fisher="fisherman")
    with pytest.raises(ValueError, match="query_rank=0"):
        KFACIHVP(im, data, query_rank=0)
    with pytest.raises(ValueError, match="query_dtype='float16'"):
        KFACIHVP(im, data, query_dtype="float16")
    hinge = _quiet_model(model, keras.losses.CategoricalHinge(reduction=None))
    with pytest.warns(UserWarning, match="empirical Fisher"):
        KFACIHVP(hinge, data)


def test_other_weights_get_a_diagonal_factor() -> None:
    """BatchNorm scale/offset: diagonal `E[g^2]` (checked against loop gradients) with a warning."""
    model = whole_models.resnet()
    x, y = whole_models.images(12)
    with pytest.warns(UserWarning, match="diagonal"):
        im = _quiet_model(model, _logits_loss())
        solver = EKFACIHVP(im, _dataset(x, y, 6), fisher="empirical")
    grads = loop_gradients(model, solver.capture.others, im.loss_function, x, y)
    assert_close(np.concatenate([d for d, _ in solver.diagonals]), np.mean(grads**2, axis=0), RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = np.zeros((1, im.nb_params))
        np.testing.assert_array_equal(solver.solve(probe).numpy(), probe)


def test_registry_names_and_exact_agreement_on_a_single_layer() -> None:
    """With one watched Dense softmax layer, the true Fisher is the exact Hessian in expectation:
    K-FAC's curvature vs `ExactIHVP`'s Hessian, relative Frobenius error < 0.35 (sampling noise
    of one label draw per example on 200 examples, and the Kronecker factorisation)."""
    x, y = _data(200, seed=4)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    im = _quiet_model(model, _logits_loss())
    data = _dataset(x, y, 50)
    calculator = FirstOrderInfluenceCalculator(im, data, ihvp_calculator="kfac", damping=0.0)
    assert isinstance(calculator.ihvp_calculator, KFACIHVP)
    kfac = calculator.ihvp_calculator.hvp(np.eye(im.nb_params)).numpy()
    hessian = ExactIHVP(im, data).hessian
    assert np.linalg.norm(kfac - hessian) / np.linalg.norm(hessian) < 0.35


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_the_models_l2_regularizer_enters_the_curvature(solver) -> None:  # type: ignore[no-untyped-def]
    """An L2 `l2` on a bias-free kernel adds `2 l2 I` exactly: the solver with the regularizer
    equals the one without it and `2 l2` more damping (float32 solves: RTOL). With a bias left
    unregularised, the added operator keeps the eigenbasis and its trace is `sum(r)` (the
    diagonal of a rotated `diag(r)` keeps the trace), `2 l2 * n_kernel`, to 1e-4 relative (float32
    HVPs), and it is positive semi-definite."""
    x, y = _data(120, seed=2)
    l2, damping = 0.05, 1e-3
    data = _dataset(x, y, 40)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, use_bias=False, kernel_regularizer=keras.regularizers.L2(l2))]
    )
    im = _quiet_model(model, _logits_loss())
    v = np.random.default_rng(0).normal(size=(4, im.nb_params))
    regularised = solver(im, data, damping=damping).solve(v).numpy()
    shifted = solver(im, data, damping=damping + 2 * l2, regularization=False).solve(v).numpy()
    assert_close(regularised, shifted, RTOL)

    with_bias = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(l2))]
    )
    im = _quiet_model(with_bias, _logits_loss())
    eye = np.eye(im.nb_params)
    added = (
        solver(im, data, damping=damping).hvp(eye).numpy().astype(np.float64)
        - solver(im, data, damping=damping, regularization=False).hvp(eye).numpy()
    )
    assert np.trace(added) == pytest.approx(2 * l2 * 6 * 3, rel=1e-4)
    assert np.linalg.eigvalsh((added + added.T) / 2).min() > -1e-5
