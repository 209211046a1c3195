"""`vestigia tour`: every method on sklearn's digits, checked against closed forms and sklearn."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vestigia.cli import main
from vestigia.demo import flip_labels, load_digit_images, train_classifier
from vestigia.progress import Progress
from vestigia.tour import (
    DAMPING_SHARE,
    FOUND_AT,
    LISSA_DAMPING_SHARE,
    METHODS,
    N_CHECKPOINTS,
    StepCheckpoints,
    _lissa_contraction,
    group_influence,
    parse_methods,
    prepare_setup,
)

# float32 gradients and float32 solves against a float64 oracle, condition number
# lambda_max / damping = 1 / DAMPING_SHARE = 200: round-off ~ 200 * 6e-8 ~ 1e-5 (measured <= 4e-6).
FLOAT32_RTOL = 1e-4


def _rows(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: np.array([float(row[key]) if row[key] else np.nan for row in rows]) for key in rows[0]}


def test_tour_shows_every_method_and_its_numbers_match_the_saved_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["tour", "--epochs", "10", "--train-size", "600", "--output", tmp_path, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    summary = (tmp_path / "summary.md").read_text()
    assert out == summary

    # The detection table: one row per method, finite AUC, recomputed here from the saved scores
    # with sklearn's ROC-AUC and a plain count over the top ceil(fraction * n) of each ranking.
    scores = _rows(tmp_path / "self_influence.csv")
    flipped = scores["flipped"].astype(bool)
    assert scores["index"].size == 600 and flipped.sum() == 60
    np.testing.assert_array_equal(flipped, scores["given_label"] != scores["true_label"])
    for key, spec in METHODS.items():
        match = re.search(
            rf"^\| {re.escape(spec.label)} \| [^|]+ \| ([0-9.]+) \| ([0-9.]+)% \| ([0-9.]+)% \|", summary, re.M
        )
        assert match, f"no table row for {spec.label}"
        auc = float(match.group(1))
        assert math.isfinite(auc) and 0.0 <= auc <= 1.0
        assert np.all(np.isfinite(scores[key]))
        assert auc == pytest.approx(roc_auc_score(flipped, scores[key]), abs=5e-4)  # printed with 3 decimals
        order = np.argsort(-scores[key], kind="stable")
        for fraction, printed in zip(FOUND_AT, match.groups()[1:]):
            top = flipped[order[: math.ceil(fraction * flipped.size)]]
            # Ties at the cut (boundary scores) may be ordered differently: allow one example.
            assert abs(float(printed) / 100 - top.sum() / flipped.sum()) <= 1 / flipped.sum() + 5e-4
    # Self-influence flags flipped labels far above chance (0.5) for the gradient methods even
    # after 10 epochs on 600 images (test accuracy 0.79); measured 0.90-0.96 (seed 0).
    for key in ("exact", "cg", "lissa", "relatif", "arnoldi", "tracin", "rps-l2"):
        assert roc_auc_score(flipped, scores[key]) > 0.8, key
    # CG solves the same damped system as the exact solver (tol 1e-4): same scores.
    np.testing.assert_allclose(scores["cg"], scores["exact"], rtol=0, atol=1e-3 * np.abs(scores["exact"]).max())
    assert f"{N_CHECKPOINTS} checkpoints" in summary

    pngs = sorted(tmp_path.glob("explain_*.png"))
    assert len(pngs) == 2 * 3  # influence and TracIn, three test images each
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    groups = re.findall(r"^\| ([^|]+) \| (\d+) \| ([^|]+) \| (\S+) \| (\S+) \| (\S+) \|$", summary, re.M)
    assert len(groups) == 3
    values = np.array([[float(v) for v in g[3:]] for g in groups])
    assert np.all(np.isfinite(values))
    flipped_row = values[0]
    assert groups[0][0] == "flipped labels" and int(groups[0][1]) == 60
    assert np.sign(flipped_row[0]) == np.sign(flipped_row[1]) == np.sign(flipped_row[2]) != 0
    # Flipped labels pull against the clean test images (measured -1.8e4 and -2.0e4); retraining
    # without them lowers the test loss (see the README), so a positive value would be a sign bug.
    assert flipped_row[0] < 0
    assert summary.count("removing them would") == 3


def _closed_form(features: np.ndarray, kernel: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example gradients `vec(f (p - y)^T)` `(n, d * C)` and Hessians `(f f^T) (x) (diag p - p p^T)`
    of the cross-entropy on the logits `f^T W`, in float64 (row-major `vec`)."""
    logits = features @ kernel
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grads = (features[:, :, None] * (p - targets)[:, None, :]).reshape(len(features), -1)
    blocks = np.einsum("nc,cd->ncd", p, np.eye(p.shape[1])) - p[:, :, None] * p[:, None, :]
    hessians = np.einsum("ni,nj,nab->niajb", features, features, blocks).reshape(len(features), grads.shape[1], -1)
    return grads, hessians


def test_tour_setup_self_influence_and_groups_match_numpy_closed_forms() -> None:
    data = load_digit_images("digits")
    x = data.images.reshape(len(data.images), -1)
    train_x, train_true, test_x, test_y = x[:200], data.labels[:200], x[1500:1560], data.labels[1500:1560]
    given, is_flipped = flip_labels(train_true, 0.1, 10, seed=0)
    saver = StepCheckpoints(total_steps=2 * 4, n=N_CHECKPOINTS)  # 200 images, batches of 64: 4 steps per epoch
    trained = train_classifier(train_x, given, 10, 2, 0, Progress(1, None), False, [saver])
    assert saver.at == [3, 5, 8] and len(saver.checkpoints) == N_CHECKPOINTS
    for saved, final in zip(saver.checkpoints[-1], trained.model.get_weights()):
        np.testing.assert_array_equal(saved, final)
    setup = prepare_setup(trained, saver.at, saver.checkpoints)

    hidden_w, hidden_b, kernel = (w.astype(np.float64) for w in trained.model.get_weights())
    features = np.maximum(train_x @ hidden_w + hidden_b, 0.0)
    grads, hessians = _closed_form(features, kernel, trained.targets.astype(np.float64))
    hessian = hessians.mean(axis=0)
    lambda_max = np.linalg.eigvalsh(hessian)[-1]
    np.testing.assert_allclose(setup.lambda_max, lambda_max, rtol=1e-5)  # float32 features, float64 sums
    damped = hessian + DAMPING_SHARE * lambda_max * np.eye(len(hessian))

    # Self-influence g^T (H + d I)^-1 g: the exact row, and LiSSA at its own damping within its
    # contraction bound (plus float32 round-off).
    exact = np.einsum("ni,ni->n", grads, np.linalg.solve(damped, grads.T).T)
    got = METHODS["exact"].build(setup).self_influence(setup.train_set)
    np.testing.assert_allclose(got, exact, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * exact.max())
    lissa_damped = hessian + LISSA_DAMPING_SHARE * lambda_max * np.eye(len(hessian))
    lissa_exact = np.einsum("ni,ni->n", grads, np.linalg.solve(lissa_damped, grads.T).T)
    lissa = METHODS["lissa"].build(setup).self_influence(setup.train_set)
    bound = _lissa_contraction(setup) + FLOAT32_RTOL
    assert np.max(np.abs(lissa - lissa_exact)) <= bound * lissa_exact.max()

    # Groups: first order (sum_T g)^T (H + d I)^-1 g_U; second order (Basu et al.) scaled by n.
    test_features = np.maximum(test_x @ hidden_w + hidden_b, 0.0)
    test_grads, _ = _closed_form(test_features, kernel, np.eye(10)[test_y])
    rows = group_influence(setup, is_flipped, given, test_x, test_y)
    n = len(train_x)
    members = [is_flipped, given == 0, given == 0]
    evaluated = [np.ones(len(test_y), bool), np.ones(len(test_y), bool), test_y == 0]
    for row, u, t in zip(rows, members, evaluated):
        g_u, g_t = grads[u].sum(axis=0), test_grads[t].sum(axis=0)
        first = g_t @ np.linalg.solve(damped, g_u)
        p = u.sum() / n
        c1, c2 = (1 - 2 * p) / ((1 - p) ** 2 * n), 1 / ((1 - p) ** 2 * n**2)
        inner = np.linalg.solve(damped, g_u)
        second = n * g_t @ (c1 * inner + c2 * np.linalg.solve(damped, hessians[u].sum(axis=0) @ inner))
        assert row.size == u.sum()
        np.testing.assert_allclose([row.first_order, row.second_order], [first, second], rtol=FLOAT32_RTOL)
        np.testing.assert_allclose(row.mean_loss_change, second / (n * t.sum()), rtol=FLOAT32_RTOL)
        assert ("negative" if second < 0 else "positive") in row.explanation()


def test_parse_methods_keeps_order_drops_repeats_and_rejects_unknown_names() -> None:
    assert parse_methods("tracin, exact,tracin") == ["tracin", "exact"]
    assert parse_methods("all") == list(METHODS)
    for text in ("", " , ", "exact,nope"):
        with pytest.raises(ValueError, match="methods"):
            parse_methods(text)


@pytest.mark.parametrize(
    "argv",
    [["tour", "--methods", "nope"], ["tour", "--dataset", "cifar10"], ["tour", "--epochs", "0"]],
)
def test_tour_bad_arguments_exit_with_code_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: vestigia tour" in capsys.readouterr().err
