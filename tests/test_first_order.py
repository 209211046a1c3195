"""First-order influence (Koh & Liang), RelatIF and groups against NumPy and retraining oracles.

Oracle for the values: `g_t^T (H + damping I)^-1 g_z` in float64, with gradients from a
per-example `tf.GradientTape` loop and `H` from the softmax cross-entropy closed form. The
library's gradients and Hessian are float32 and its solve is a float32 product with the
float64 inverse, hence `VALUE_RTOL` (relative to the largest value). The leave-one-out test
retrains an L2-regularised logistic regression to machine precision for every left-out point.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients, softmax_head_hessian

from vestigia import CACHE, ORDER, ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, InvalidDataError
from vestigia.methods.first_order import hessian_dataset

DAMPING = 0.05
VALUE_RTOL = 1e-4  # float32 gradients (1e-6) amplified by cond(H + damping I) (~1e2)
PINV_RTOL = 1e-3  # undamped pseudo-inverse: cond of H on its range is ~1e3
N_TRAIN, N_TEST = 41, 12
OUTLIER = 23  # index of the appended outlier in the training set


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = VALUE_RTOL) -> float:
    return assert_close(actual, expected, rtol)


@pytest.fixture(scope="module")
def setup() -> dict:
    x, y = make_classification(n=N_TRAIN - 1 + N_TEST, d=5, classes=3, seed=30)
    x_train, y_train = x[: N_TRAIN - 1], y[: N_TRAIN - 1]
    # A mislabeled outlier (label 1 is its least likely class). It has the largest self-influence
    # (checked below), so by Cauchy-Schwarz in the H^-1 inner product it is its own top proponent.
    outlier_x = np.array([[4.0, -4.0, 4.0, -4.0, 4.0]], "float32")
    outlier_y = np.eye(3, dtype="float32")[[1]]
    x_train = np.insert(x_train, OUTLIER, outlier_x, axis=0)
    y_train = np.insert(y_train, OUTLIER, outlier_y, axis=0)
    x_test, y_test = x[N_TRAIN - 1 :], y[N_TRAIN - 1 :]
    x_test[7], y_test[7] = outlier_x[0], outlier_y[0]  # the outlier duplicated as a query
    model = make_mlp(d=5, hidden=6, classes=3, seed=30)
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    hidden, head = model.layers
    features = np.tanh(x_train.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    hessian = softmax_head_hessian(features, head.kernel.numpy(), head.bias.numpy())
    g_train = loop_gradients(model, im.weights, logits_loss(), x_train, y_train)
    g_test = loop_gradients(model, im.weights, logits_loss(), x_test, y_test)
    damped = hessian + DAMPING * np.eye(im.nb_params)
    ihvp_train = np.linalg.solve(damped, g_train.T).T  # H^-1 g_z, (n_train, P)
    train_ds, test_ds = batched(x_train, y_train, 8), batched(x_test, y_test, 5)
    calc = FirstOrderInfluenceCalculator(im, train_ds, damping=DAMPING)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "im": im,
        "hessian": hessian,
        "g_train": g_train,
        "g_test": g_test,
        "ihvp_train": ihvp_train,
        "values": g_test @ ihvp_train.T,  # (n_test, n_train)
        "self": np.einsum("ij,ij->i", g_train, ihvp_train),
        "train_ds": train_ds,
        "test_ds": test_ds,
        "calc": calc,
    }


def test_pairwise_values_match_numpy(setup: dict) -> None:
    calc = setup["calc"]
    matrix = calc.influence_matrix(setup["test_ds"], setup["train_ds"])
    _close(matrix, setup["values"])
    # The seed's per-batch hooks give the same numbers.
    x_tr, y_tr, x_te, y_te = setup["x_train"], setup["y_train"], setup["x_test"], setup["y_test"]
    block = calc._estimate_individual_influence_values_from_batch((x_tr[:6], y_tr[:6]), (x_te[:4], y_te[:4]))
    _close(block.numpy(), setup["values"][:4, :6])
    _close(calc._compute_influence_vector((x_tr[:6], y_tr[:6])).numpy(), setup["ihvp_train"][:6])
    _close(calc._preprocess_samples((x_te[:4], y_te[:4])).numpy(), setup["g_test"][:4])


def test_self_influence_is_the_diagonal(setup: dict) -> None:
    calc, train_ds = setup["calc"], setup["train_ds"]
    self_influence = calc.self_influence(train_ds)
    _close(self_influence, setup["self"])
    square = calc.influence_matrix(train_ds, train_ds)
    _close(self_influence, np.diag(square), 1e-5)
    seed_view = np.concatenate([v.numpy()[:, 0] for _, v in calc.compute_influence_values(train_ds)])
    np.testing.assert_allclose(seed_view, self_influence, rtol=1e-6)
    assert np.all(self_influence > 0)


def test_invariance_to_batching_and_prefetch(setup: dict) -> None:
    x_tr, y_tr, x_te, y_te = setup["x_train"], setup["y_train"], setup["x_test"], setup["y_test"]
    reference = setup["calc"].influence_matrix(setup["test_ds"], setup["train_ds"])
    other = FirstOrderInfluenceCalculator(setup["im"], batched(x_tr, y_tr, 41).prefetch(1), damping=DAMPING)
    for test_ds, train_ds in [
        (batched(x_te, y_te, 12), batched(x_tr, y_tr, 3)),
        (batched(x_te, y_te, 1).prefetch(2), batched(x_tr, y_tr, 40).prefetch(2)),
    ]:
        _close(other.influence_matrix(test_ds, train_ds), reference, 1e-5)
        _close(other.self_influence(train_ds), setup["calc"].self_influence(setup["train_ds"]), 1e-5)


def test_duplicated_outlier_is_its_own_top_proponent(setup: dict) -> None:
    calc = setup["calc"]
    self_influence = calc.self_influence(setup["train_ds"])
    # Precondition, on the float64 oracle: the outlier's self-influence is the strict maximum, by
    # more than the float32 error (VALUE_RTOL). Then <g*, g_z>_{H^-1} <= ||g*|| ||g_z|| < ||g*||^2.
    others = np.delete(setup["self"], OUTLIER)
    assert setup["self"][OUTLIER] > (1 + 10 * VALUE_RTOL) * others.max()
    assert np.argmax(self_influence) == OUTLIER
    values, indices = calc.top_k_indices(setup["test_ds"], setup["train_ds"], k=3)
    assert indices[7, 0] == OUTLIER
    np.testing.assert_allclose(values[7, 0], self_influence[OUTLIER], rtol=1e-5)


def test_group_influence_is_the_sum_of_pairwise_values(setup: dict) -> None:
    calc = setup["calc"]
    x_tr, y_tr, x_te, y_te = setup["x_train"], setup["y_train"], setup["x_test"], setup["y_test"]
    group_train = batched(x_tr[3:10], y_tr[3:10], 3)  # 7 examples in batches 3, 3, 1
    group_test = batched(x_te[:5], y_te[:5], 2)  # 5 examples in batches 2, 2, 1
    value = calc.estimate_influence_values_group(group_train, group_test)
    assert tuple(value.shape) == (1, 1)
    _close(value.numpy()[0, 0], setup["values"][:5, 3:10].sum())
    square = setup["g_train"][3:10] @ setup["ihvp_train"][3:10].T
    _close(calc.estimate_influence_values_group(group_train).numpy()[0, 0], square.sum())
    vector = calc.compute_influence_vector_group(group_train)
    _close(vector.numpy(), setup["ihvp_train"][3:10].sum(0, keepdims=True))
    # A group of one is the single point.
    single = calc.estimate_influence_values_group(batched(x_tr[4:5], y_tr[4:5]), batched(x_te[2:3], y_te[2:3]))
    _close(single.numpy()[0, 0], setup["values"][2, 4])


def test_relatif_matches_numpy(setup: dict) -> None:
    relatif = FirstOrderInfluenceCalculator(setup["im"], setup["train_ds"], normalize=True, damping=DAMPING)
    norms = np.linalg.norm(setup["ihvp_train"], axis=1)
    _close(relatif.influence_matrix(setup["test_ds"], setup["train_ds"]), setup["values"] / norms[None, :])
    _close(relatif.self_influence(setup["train_ds"]), setup["self"] / norms)
    x_tr, y_tr = setup["x_train"], setup["y_train"]
    summed = setup["ihvp_train"][:5].sum(0, keepdims=True)
    group_vector = relatif.compute_influence_vector_group(batched(x_tr[:5], y_tr[:5], 2))
    _close(group_vector.numpy(), summed / np.linalg.norm(summed))


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_matches_argsort(setup: dict, order: ORDER) -> None:
    calc, train_ds, test_ds = setup["calc"], setup["train_ds"], setup["test_ds"]
    matrix = calc.influence_matrix(test_ds, train_ds)
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    want = np.argsort(sign * matrix, axis=1, kind="stable")[:, :4]
    values, indices = calc.top_k_indices(test_ds, train_ds, k=4, order=order)
    np.testing.assert_array_equal(indices, want)
    _close(values, np.take_along_axis(setup["values"], want, axis=1))
    # The seed's dataset view: 12 queries batched by 5 (the seed crashed on the last batch of 2).
    rows = list(calc.top_k(test_ds, train_ds, 4, order))
    assert [tuple(r[1].shape) for r in rows] == [(5, 4), (5, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([r[0][0].numpy() for r in rows]), setup["x_test"])
    np.testing.assert_allclose(np.concatenate([r[1].numpy() for r in rows]), values, rtol=1e-6)
    samples = np.concatenate([r[2].numpy() for r in rows])
    np.testing.assert_array_equal(samples, setup["x_train"][want])


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_of_the_training_set(setup: dict, order: ORDER) -> None:
    calc, train_ds = setup["calc"], setup["train_ds"]
    self_influence = calc.self_influence(train_ds)
    want = np.argsort((-1.0 if order is ORDER.DESCENDING else 1.0) * self_influence, kind="stable")[:6]
    result = calc.compute_top_k_from_training_dataset(train_ds, 6, order)
    samples, values = result
    np.testing.assert_array_equal(result.indices, want)
    np.testing.assert_array_equal(samples, setup["x_train"][want])
    np.testing.assert_allclose(values, self_influence[want], rtol=1e-6)
    _close(values, setup["self"][want])


def test_readme_calls_as_written(setup: dict) -> None:
    model, loss_function = setup["im"].model, logits_loss()
    train_dataset, samples_to_explain, target_layer, k_samples = setup["train_ds"], setup["test_ds"], -1, 3
    influence_model = InfluenceModel(model, start_layer=target_layer, loss_function=loss_function)
    ihvp_calculator = ExactIHVP(influence_model, train_dataset)
    influence_calculator = FirstOrderInfluenceCalculator(influence_model, train_dataset, ihvp_calculator)
    data_and_influence_dataset = influence_calculator.compute_influence_values(train_dataset)
    top_train = influence_calculator.compute_top_k_from_training_dataset(train_dataset, k_samples, ORDER.DESCENDING)
    nested = influence_calculator.estimate_influence_values_in_batches(samples_to_explain, train_dataset)
    top_test = influence_calculator.top_k(samples_to_explain, train_dataset, k_samples, ORDER.DESCENDING)
    group_value = influence_calculator.estimate_influence_values_group(train_dataset.take(2), samples_to_explain)

    # Undamped: the pseudo-inverse of the closed-form Hessian, with the documented cut-off.
    pinv = np.linalg.pinv(setup["hessian"], rcond=ihvp_calculator.rcond, hermitian=True)
    values = setup["g_test"] @ pinv @ setup["g_train"].T
    self_values = np.einsum("ij,jk,ik->i", setup["g_train"], pinv, setup["g_train"])
    seed_self = np.concatenate([v.numpy()[:, 0] for _, v in data_and_influence_dataset])
    _close(seed_self, self_values, PINV_RTOL)
    np.testing.assert_array_equal(top_train.indices, np.argsort(-seed_self, kind="stable")[:3])
    _close(_flatten_nested(nested), values, PINV_RTOL)
    top_values = np.concatenate([v.numpy() for _, v, _ in top_test])
    _close(top_values, -np.sort(-values, axis=1)[:, :3], PINV_RTOL)
    _close(group_value.numpy()[0, 0], values[:, :16].sum(), PINV_RTOL)


def _flatten_nested(nested: tf.data.Dataset) -> np.ndarray:
    rows = []
    for _, inner in nested:
        rows.append(np.concatenate([v.numpy() for _, v in inner], axis=1))
    return np.concatenate(rows, axis=0)


def test_caching_and_saving_paths(setup: dict, tmp_path) -> None:
    calc, train_ds, test_ds = setup["calc"], setup["train_ds"], setup["test_ds"]
    reference = calc.influence_matrix(test_ds, train_ds)
    _close(reference, setup["values"])
    vectors_path = str(tmp_path / "vectors")
    saved = calc.compute_influence_vector(train_ds, save_influence_vector_ds_path=vectors_path)
    _close(np.concatenate([v.numpy() for _, v in saved]), setup["ihvp_train"])
    loaded = calc.estimate_influence_values_in_batches(test_ds, train_ds, load_influence_vector_path=vectors_path)
    np.testing.assert_allclose(_flatten_nested(loaded), reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
    for cache in CACHE:
        nested = calc.estimate_influence_values_in_batches(
            test_ds,
            train_ds,
            influence_vector_in_cache=cache,
            save_influence_vector_path=str(tmp_path / f"v_{cache.name}"),
            save_influence_value_path=str(tmp_path / f"values_{cache.name}"),
        )
        np.testing.assert_allclose(_flatten_nested(nested), reference, rtol=1e-6)
    second = tf.data.Dataset.load(str(tmp_path / "values_DISK" / "batch_000001"))
    np.testing.assert_allclose(np.concatenate([v.numpy() for _, v in second], axis=1), reference[5:10], rtol=1e-6)
    top_path = str(tmp_path / "top")
    calc.top_k(test_ds, train_ds, k=2, save_top_k_ds_path=top_path, save_influence_vector_ds_path=str(tmp_path / "t"))
    reloaded = np.concatenate([v.numpy() for _, v, _ in tf.data.Dataset.load(top_path)])
    np.testing.assert_allclose(reloaded, -np.sort(-reference, axis=1)[:, :2], rtol=1e-6)


def test_n_samples_for_hessian(setup: dict) -> None:
    im, train_ds = setup["im"], setup["train_ds"]
    x_tr = setup["x_train"]
    model = im.model
    hidden, head = model.layers

    def oracle(rows: np.ndarray) -> np.ndarray:
        features = np.tanh(x_tr[rows].astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
        return softmax_head_hessian(features, head.kernel.numpy(), head.bias.numpy())

    # All the examples, shuffled: the same mean Hessian.
    everything = FirstOrderInfluenceCalculator(im, train_ds, n_samples_for_hessian=N_TRAIN, damping=DAMPING)
    _close(everything.ihvp_calculator.hessian, setup["hessian"] + DAMPING * np.eye(21), 1e-5)
    # A buffer of 1 does not shuffle: the first 15 examples.
    first = FirstOrderInfluenceCalculator(im, train_ds, n_samples_for_hessian=15, shuffle_buffer_size=1, damping=0.1)
    _close(first.ihvp_calculator.hessian, oracle(np.arange(15)) + 0.1 * np.eye(21), 1e-5)
    # A shuffled draw of 15 distinct training examples, the Hessian being theirs.
    drawn = FirstOrderInfluenceCalculator(im, train_ds, n_samples_for_hessian=15, damping=0.1)
    picked = np.concatenate([b[0].numpy() for b in hessian_dataset(train_ds, 15, 10000)])
    rows = np.array([int(np.flatnonzero((x_tr == row).all(axis=1))[0]) for row in picked])
    assert len(set(rows.tolist())) == 15 and not np.array_equal(rows, np.arange(15))
    _close(drawn.ihvp_calculator.hessian, oracle(rows) + 0.1 * np.eye(21), 1e-5)
    with pytest.raises(ValueError, match="n_samples_for_hessian=0"):
        FirstOrderInfluenceCalculator(im, train_ds, n_samples_for_hessian=0)


def test_k_larger_than_the_data_raises(setup: dict) -> None:
    calc, train_ds, test_ds = setup["calc"], setup["train_ds"], setup["test_ds"]
    with pytest.raises(InvalidDataError, match=r"at most the number of training examples \(41\). Received: k=42"):
        calc.top_k_indices(test_ds, train_ds, k=42)
    with pytest.raises(InvalidDataError, match="k=42"):
        calc.compute_top_k_from_training_dataset(train_ds, 42)
    with pytest.raises(InvalidDataError, match="k=50"):
        list(calc.top_k(test_ds, train_ds, 50))
    with pytest.raises(ValueError, match="k=0"):
        calc.top_k_indices(test_ds, train_ds, k=0)


# -- leave-one-out retraining ----------------------------------------------------------------------

# L2 strength: objective = mean_i loss_i + (lambda / 2) ||theta||^2, so H = mean Hessian + lambda I and
# `damping = lambda`. At this strength removing one point stays in the linear regime: a pure NumPy
# computation of the same predictions gives Pearson 0.9997 and slope 1.04 (at lambda = 0.01 the
# most influential points are high-leverage and the slope grows to 1.15, for the oracle as well).
LOO_LAMBDA = 0.1
LOO_PEARSON = 0.999
LOO_SLOPE = (0.9, 1.1)  # actual change / predicted change, least squares through the origin


def _fit_logistic(x: np.ndarray, y: np.ndarray, n: int, theta: np.ndarray) -> np.ndarray:
    """Minimise `(1/n) sum_i l_i + (lam/2)||theta||^2` (the sum over the given rows) by Newton's method.

    `x` has a column of ones for the bias; `n` is kept at the full training size so that
    removing a point is upweighting it by `-1/n`, exactly what influence functions linearise.
    """
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (p - y) / n + LOO_LAMBDA * theta
        if np.abs(grad).max() < 1e-14:
            break
        hess = (x * (p * (1 - p))[:, None]).T @ x / n + LOO_LAMBDA * np.eye(len(theta))
        theta = theta - np.linalg.solve(hess, grad)
    return theta


def _logistic_loss(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    z = x @ theta
    return np.logaddexp(0.0, z) - y * z


def test_leave_one_out_retraining() -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng(40)
    order = rng.permutation(len(data.target))
    x_all = data.data[order]
    x_all = (x_all - x_all[:450].mean(0)) / x_all[:450].std(0)
    y_all = data.target[order].astype(np.float64)
    x_train, y_train, x_test, y_test = x_all[:450], y_all[:450], x_all[450:], y_all[450:]
    n = len(x_train)
    ones = np.ones((n, 1))
    xt_train = np.hstack([x_train, ones])
    xt_test = np.hstack([x_test, np.ones((len(x_test), 1))])
    theta = _fit_logistic(xt_train, y_train, n, np.zeros(31))

    keras.utils.set_random_seed(40)
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(theta[:30, None].astype("float32"))
    model.layers[0].bias.assign(theta[30:].astype("float32"))
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    im = InfluenceModel(model, loss_function=loss)
    train_ds = batched(x_train.astype("float32"), y_train[:, None].astype("float32"), 64)
    calc = FirstOrderInfluenceCalculator(im, train_ds, damping=LOO_LAMBDA)
    # The test point the model finds hardest: the one with the largest loss.
    losses_test = _logistic_loss(xt_test, y_test, theta)
    t = int(np.argmax(losses_test))
    test_ds = batched(x_test[t : t + 1].astype("float32"), y_test[t : t + 1, None].astype("float32"))
    values = calc.influence_matrix(test_ds, train_ds)[0].astype(np.float64)
    removed = np.argsort(-np.abs(values))[:20]  # the 20 most influential points, of either sign
    predicted = values[removed] / n  # removing z changes the test loss by about +value / n
    actual = np.empty(len(removed))
    for j, z in enumerate(removed):
        keep = np.arange(n) != z
        theta_z = _fit_logistic(xt_train[keep], y_train[keep], n, theta)
        actual[j] = _logistic_loss(xt_test[t : t + 1], y_test[t : t + 1], theta_z)[0] - losses_test[t]
    pearson = float(np.corrcoef(predicted, actual)[0, 1])
    slope = float(predicted @ actual / (predicted @ predicted))
    print(f"LOO: pearson {pearson:.5f}, slope actual/predicted {slope:.3f}, max |actual| {np.abs(actual).max():.2e}")
    assert np.all(np.sign(predicted) == np.sign(actual))
    assert pearson > LOO_PEARSON
    assert LOO_SLOPE[0] < slope < LOO_SLOPE[1]
