"""Evaluation metrics against hand examples, sklearn / scipy oracles and a retrained logistic regression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from vestigia.errors import InvalidDataError, NonFiniteError
from vestigia.evaluation import (
    average_ranks,
    correct_class_margin,
    detection_curve,
    fraction_found,
    leave_one_out_correlation,
    linear_datamodeling_score,
    mislabel_detection,
    pearson,
    random_subsets,
    roc_auc,
    spearman,
)

# Exact arithmetic on small integers / ranks: only float64 summation round-off can differ.
EXACT = 1e-12


def _scores_from_ranking(ranking: list[int], n: int) -> np.ndarray:
    """Scores whose descending order inspects the (1-based) ids of `ranking` in turn."""
    scores = np.zeros(n)
    scores[np.asarray(ranking) - 1] = np.arange(n, 0, -1)
    return scores


# ---------------------------------------------------------------- mislabel detection


@pytest.mark.parametrize("ties", ["average", "index"])
def test_detection_curve_seed_hand_example(ties):
    # Influenciae's test: inspection order [2,6,3,4,5,1,7,8,9,10], noisy ids [6, 8].
    scores = _scores_from_ranking([2, 6, 3, 4, 5, 1, 7, 8, 9, 10], 10)
    noisy = np.isin(np.arange(1, 11), [6, 8])
    expected = [0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1]
    np.testing.assert_allclose(detection_curve(scores, noisy, ties=ties), expected, atol=EXACT)


def test_perfect_and_reversed_rankings():
    rng = np.random.default_rng(0)
    n, n_noisy = 200, 20
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.choice(n, n_noisy, replace=False)] = True
    perfect = noisy + rng.uniform(0, 0.5, n)  # every noisy score > every clean score
    assert roc_auc(perfect, noisy) == 1.0
    assert roc_auc(-perfect, noisy) == 0.0
    assert fraction_found(perfect, noisy, n_noisy / n) == 1.0  # all found at the noise rate
    assert fraction_found(perfect, noisy, (n_noisy - 1) / n) == (n_noisy - 1) / n_noisy
    assert fraction_found(-perfect, noisy, 1 - n_noisy / n) == 0.0  # clean ones come first
    report = mislabel_detection(perfect, noisy)
    assert report.found == {0.01: 0.1, 0.05: 0.5, 0.1: 1.0, 0.2: 1.0}
    assert report.auc == 1.0


def test_average_ties_equal_mean_over_all_tie_orders():
    # Oracle: index tie-breaking of a uniformly random permutation is a uniformly random
    # tie-breaking; average the "index" curves over all 6! permutations.
    scores = np.array([3.0, 1.0, 3.0, 3.0, 0.5, 1.0])
    noisy = np.array([True, False, False, True, True, False])
    curves = [detection_curve(scores[list(p)], noisy[list(p)], ties="index") for p in itertools.permutations(range(6))]
    np.testing.assert_allclose(detection_curve(scores, noisy, ties="average"), np.mean(curves, axis=0), atol=EXACT)
    # index rule: tied examples inspected by increasing index (0, 2, 3 for the score 3).
    np.testing.assert_allclose(detection_curve(scores, noisy, ties="index"), np.array([1, 1, 2, 2, 2, 3]) / 3)


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    worst = 0.0
    for trial in range(20):
        n = int(rng.integers(5, 300))
        labels = rng.random(n) < rng.uniform(0.05, 0.5)
        labels[:2] = [True, False]
        scores = np.round(rng.normal(size=n) + labels, int(trial % 3))  # 0-2 decimals: many ties
        worst = max(worst, abs(roc_auc(scores, labels) - roc_auc_score(labels, scores)))
    assert worst <= EXACT, worst


def test_area_under_curve_relation_to_auc():
    # mean(curve) = pi / 2 + (1 - pi) AUC + 1 / (2 n), exactly with ties averaged.
    rng = np.random.default_rng(2)
    for decimals in (0, 1, 6):
        n = 150
        labels = rng.random(n) < 0.1
        scores = np.round(rng.normal(size=n) + labels, decimals)
        report = mislabel_detection(scores, labels)
        pi = labels.mean()
        np.testing.assert_allclose(report.area_under_curve, pi / 2 + (1 - pi) * report.auc + 1 / (2 * n), atol=EXACT)


def test_fraction_found_inspects_ceil_fraction_n():
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=100), rng.random(100) < 0.3
    curve = detection_curve(scores, labels)
    assert fraction_found(scores, labels, 0.07) == curve[6]  # 0.07 * 100 is 7.000000000000001 in floats
    assert fraction_found(scores, labels, 0.071) == curve[7]
    assert fraction_found(scores, labels, 0.001) == curve[0]  # at least one inspected
    assert fraction_found(scores, labels, 1.0) == 1.0
    report = mislabel_detection(scores, labels, fractions=(0.07, 0.5))
    assert report.found == {0.07: curve[6], 0.5: curve[49]}
    assert report.to_dict()["found"] == {"0.07": curve[6], "0.5": curve[49]}


def test_mislabel_input_errors():
    with pytest.raises(InvalidDataError, match="no True"):
        detection_curve(np.arange(3.0), np.zeros(3, dtype=bool))
    with pytest.raises(InvalidDataError, match="both"):
        roc_auc(np.arange(3.0), np.ones(3, dtype=bool))
    with pytest.raises(InvalidDataError, match="boolean mask"):
        roc_auc(np.arange(3.0), np.array([0, 2, 1]))
    with pytest.raises(InvalidDataError, match="same length"):
        roc_auc(np.arange(3.0), np.array([True, False]))
    with pytest.raises(NonFiniteError, match="scores"):
        roc_auc(np.array([0.0, np.nan, 1.0]), np.array([True, False, False]))
    with pytest.raises(ValueError, match="fraction"):
        fraction_found(np.arange(3.0), np.array([True, False, False]), 0.0)
    with pytest.raises(ValueError, match="ties"):
        detection_curve(np.arange(3.0), np.array([True, False, False]), ties="random")


# ---------------------------------------------------------------- ranks and correlations


def test_ranks_and_spearman_match_scipy_with_ties():
    rng = np.random.default_rng(4)
    values = rng.integers(0, 5, (12, 40)).astype(float)
    for axis in (0, 1):
        np.testing.assert_array_equal(average_ranks(values, axis=axis), scipy.stats.rankdata(values, axis=axis))
    worst = 0.0
    for a, b in zip(values[:-1], values[1:]):
        worst = max(worst, abs(spearman(a, b) - scipy.stats.spearmanr(a, b).statistic))
        np.testing.assert_allclose(pearson(a, b), np.corrcoef(a, b)[0, 1], atol=EXACT)
    assert worst <= EXACT, worst
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))  # constant input: undefined -> nan
    assert np.isnan(pearson(np.arange(5.0), np.full(5, 2.0)))
    with pytest.raises(InvalidDataError, match="same length"):
        spearman(np.arange(3.0), np.arange(4.0))


# ---------------------------------------------------------------- LDS


def _linear_datamodel(n_test: int, n_train: int = 30, n_subsets: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    attributions = rng.normal(size=(n_test, n_train))
    masks = random_subsets(n_train, n_subsets, 0.5, seed=seed)
    return attributions, masks, masks @ attributions.T  # outputs (n_subsets, n_test)


def test_lds_of_true_linear_datamodel_is_one_and_sign_matters():
    attributions, masks, outputs = _linear_datamodel(n_test=8)
    result = linear_datamodeling_score(attributions, masks, outputs)
    np.testing.assert_allclose(result.per_test, 1.0, atol=EXACT)
    assert result.mean == pytest.approx(1.0, abs=EXACT) and result.n_undefined == 0
    # Any per-test strictly increasing distortion keeps the ranks, hence LDS = 1.
    distorted = np.exp(0.3 * outputs) + outputs**3 + np.arange(8.0)
    np.testing.assert_allclose(linear_datamodeling_score(attributions, masks, distorted).per_test, 1.0, atol=EXACT)
    # predicted = + sum of kept attributions: negated attributions score -1, never |.|.
    assert linear_datamodeling_score(-attributions, masks, outputs).mean == pytest.approx(-1.0, abs=EXACT)


def test_lds_of_random_attributions_is_near_zero():
    attributions, masks, outputs = _linear_datamodel(n_test=200, n_subsets=50)
    random = np.random.default_rng(9).normal(size=attributions.shape)
    result = linear_datamodeling_score(random, masks, outputs)
    # Both columns are linear in the same masks, so a per-test correlation is about the cosine of
    # two independent random 30-vectors (sd ~ 1/sqrt(30) = 0.18); the mean over 200 test points
    # has sd ~ 0.013 and expectation 0 by symmetry (random -> -random): 0.08 is ~6 sd.
    assert abs(result.mean) < 0.08, result
    assert 0.1 < np.std(result.per_test) < 0.3  # the spread is real, only the mean vanishes


def test_lds_interval_contains_mean_and_narrows_with_more_test_points():
    widths = {}
    for n_test in (25, 400):
        attributions, masks, outputs = _linear_datamodel(n_test=n_test, seed=1)
        noisy = outputs + np.random.default_rng(2).normal(0, 2.0, outputs.shape)
        result = linear_datamodeling_score(attributions, masks, noisy, n_bootstrap=500, seed=3)
        assert result.ci_low < result.mean < result.ci_high
        assert 0.2 < result.mean < 0.95  # noise of sd 2 against signal of sd ~2.7: partial agreement
        widths[n_test] = result.ci_high - result.ci_low
    # sd of the mean scales as 1/sqrt(n_test): the width shrinks ~4x; require 2x.
    assert widths[400] < 0.5 * widths[25], widths
    again = linear_datamodeling_score(attributions, masks, noisy, n_bootstrap=500, seed=3)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)  # seeded


def test_lds_excludes_undefined_test_points():
    attributions, masks, outputs = _linear_datamodel(n_test=5)
    outputs[:, 2] = 1.5  # constant measured output: Spearman undefined
    result = linear_datamodeling_score(attributions, masks, outputs)
    assert np.isnan(result.per_test[2]) and result.n_undefined == 1
    assert result.mean == pytest.approx(1.0, abs=EXACT)
    with pytest.raises(InvalidDataError, match="outputs"):
        linear_datamodeling_score(attributions, masks, outputs.T)
    with pytest.raises(InvalidDataError, match="masks"):
        linear_datamodeling_score(attributions, masks[:, :-1], outputs)
    with pytest.raises(InvalidDataError, match="boolean"):
        linear_datamodeling_score(attributions, masks * 2, outputs)


def _fit_logistic(x: np.ndarray, y: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method on mean logistic loss + damping/2 |w|^2; returns (w, Hessian at w)."""
    w = np.zeros(x.shape[1])
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        hessian = (x * (p * (1 - p))[:, None]).T @ x / len(y) + damping * np.eye(x.shape[1])
        w -= np.linalg.solve(hessian, x.T @ (p - y) / len(y) + damping * w)
    return w, hessian


def test_sign_convention_against_retrained_logistic_regression():
    # Oracle: retraining. Attributions g_test^T H^-1 g_z (positive = proponent) against the
    # correct-class margin of models refit on each subset must give a clearly positive LDS.
    rng = np.random.default_rng(5)
    n, n_test, damping = 80, 30, 1e-2
    x = np.hstack([rng.normal(size=(n + n_test, 3)), np.ones((n + n_test, 1))])
    y = (x @ np.array([2.0, -1.0, 0.5, 0.0]) + rng.normal(0, 1, n + n_test) > 0).astype(float)
    flip = rng.random(n) < 0.1  # label noise: a few strong opponents
    y[:n][flip] = 1 - y[:n][flip]
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]
    w, hessian = _fit_logistic(x_train, y_train, damping)
    train_grads = (1 / (1 + np.exp(-x_train @ w)) - y_train)[:, None] * x_train
    test_grads = (1 / (1 + np.exp(-x_test @ w)) - y_test)[:, None] * x_test
    attributions = test_grads @ np.linalg.solve(hessian, train_grads.T)
    masks = random_subsets(n, 60, 0.5, seed=1)
    margins = np.stack(
        [correct_class_margin(x_test @ _fit_logistic(x_train[m], y_train[m], damping)[0], y_test) for m in masks]
    )
    result = linear_datamodeling_score(attributions, masks, margins)
    assert result.mean > 0.8, result  # measured 0.97 with this seed
    assert linear_datamodeling_score(-attributions, masks, margins).mean < -0.8


# ---------------------------------------------------------------- leave-one-out and margin


def test_leave_one_out_correlation_matches_numpy_and_scipy():
    rng = np.random.default_rng(6)
    predicted = rng.normal(size=(4, 15))
    actual = predicted + rng.normal(0, 0.5, predicted.shape)
    pooled = leave_one_out_correlation(predicted, actual)
    np.testing.assert_allclose(pooled, np.corrcoef(predicted.ravel(), actual.ravel())[0, 1], atol=EXACT)
    rank = leave_one_out_correlation(predicted[0], actual[0], method="spearman")
    np.testing.assert_allclose(rank, scipy.stats.spearmanr(predicted[0], actual[0]).statistic, atol=EXACT)
    per_test = leave_one_out_correlation(predicted, actual, average="per_test")
    rows = [np.corrcoef(p, a)[0, 1] for p, a in zip(predicted, actual)]
    np.testing.assert_allclose(per_test, np.mean(rows), atol=EXACT)
    with pytest.raises(InvalidDataError, match="same shape"):
        leave_one_out_correlation(predicted, actual.T)
    with pytest.raises(ValueError, match="method"):
        leave_one_out_correlation(predicted, actual, method="kendall")


def test_correct_class_margin_hand_cases():
    logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    labels = np.array([0, 2, 1])
    expected = np.array([1.0, -2.0, 0.0])  # 2-1, 1-3, 1-1
    np.testing.assert_allclose(correct_class_margin(logits, labels), expected, atol=EXACT)
    np.testing.assert_allclose(correct_class_margin(logits, np.eye(3)[labels]), expected, atol=EXACT)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # log-softmax differs from the logits by a per-row constant: same margin (float64 round-off).
    np.testing.assert_allclose(
        correct_class_margin(probabilities, labels, from_probabilities=True), expected, atol=1e-12
    )
    # single binary logit s: logits (0, s)
    s = np.array([1.5, -0.5, 2.0])
    binary = np.array([1, 1, 0])
    np.testing.assert_allclose(correct_class_margin(s[:, None], binary), [1.5, -0.5, -2.0], atol=EXACT)
    np.testing.assert_allclose(
        correct_class_margin(1 / (1 + np.exp(-s)), binary, from_probabilities=True), [1.5, -0.5, -2.0], atol=1e-12
    )
    with pytest.raises(InvalidDataError, match="labels"):
        correct_class_margin(logits, np.array([0, 3, 1]))
    with pytest.raises(InvalidDataError, match="labels"):
        correct_class_margin(logits, np.array([0.5, 1, 1]))
