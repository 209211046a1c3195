"""Mislabel detection metrics: detection curve, fraction found, ROC-AUC.

An auditor inspects the training set in order of decreasing score (e.g. self-influence,
higher = more suspicious). The *detection curve* is the fraction of all mislabeled examples
found after inspecting the top `i + 1` examples; Influenciae's benchmark reported its mean as
"roc". With `n` examples of which a fraction `pi` are mislabeled,

    mean(curve) = pi / 2 + (1 - pi) * AUC + 1 / (2 n)

exactly (AUC with ties counted one half, curve with ties averaged), so it is close to, but not,
the ROC-AUC when `pi` is small.

Ties: `ties="average"` (the default) gives the expected curve over a uniformly random order of
the tied examples (linear within a block of equal scores), which depends on the scores only;
`ties="index"` inspects tied examples in increasing index order (a stable sort), as a plain
`np.argsort(-scores, kind="stable")` would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from vestigia.errors import InvalidDataError, check_fraction
from vestigia.evaluation.stats import as_finite_array, average_ranks

Ties = Literal["average", "index"]
DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.2)


def _scores_and_labels(scores: Any, is_mislabeled: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return `scores` (float64) and `is_mislabeled` (bool), both `(n,)`."""
    values = as_finite_array("scores", scores, 1)
    labels = np.asarray(is_mislabeled)
    if labels.shape != values.shape or values.size == 0:
        raise InvalidDataError(
            "`scores` and `is_mislabeled` must be non-empty 1-D arrays of the same length. Received: "
            f"scores with shape {values.shape}, is_mislabeled with shape {labels.shape}"
        )
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise InvalidDataError(
                "`is_mislabeled` must be a boolean mask (or 0/1) of shape (n,); to pass indices of the "
                "mislabeled examples use `np.isin(np.arange(n), indices)`. Received values "
                f"{np.unique(labels)[:10]!r}"
            )
        labels = labels.astype(bool)
    return values, labels


def _check_ties(ties: str) -> None:
    if ties not in ("average", "index"):
        raise ValueError(f"`ties` must be 'average' or 'index'. Received: ties={ties!r}")


def detection_curve(scores: np.ndarray, is_mislabeled: np.ndarray, ties: Ties = "average") -> np.ndarray:
    """Fraction of all mislabeled examples found among the `i + 1` highest-scored examples.

    Args:
        scores: suspicion scores of shape `(n,)`, higher = inspected first.
        is_mislabeled: boolean mask of shape `(n,)` (0/1 accepted), at least one True.
        ties: "average" (expected curve over a random order of tied examples) or "index"
            (tied examples inspected by increasing index).

    Returns:
        A float64 array of shape `(n,)`, non-decreasing, ending at 1.

    Raises:
        InvalidDataError: shapes differ, labels are not boolean, or nothing is mislabeled.
        NonFiniteError: `scores` holds NaN or Inf.
    """
    _check_ties(ties)
    values, labels = _scores_and_labels(scores, is_mislabeled)
    n_mislabeled = int(labels.sum())
    if n_mislabeled == 0:
        raise InvalidDataError("`is_mislabeled` has no True entry: the detection curve is undefined.")
    order = np.argsort(-values, kind="stable")
    found_sorted = labels[order].astype(np.float64)
    found = np.cumsum(found_sorted)
    if ties == "average":
        ordered = values[order]
        starts = np.ones(values.shape, dtype=bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        size = np.bincount(group)
        positives = np.bincount(group, weights=found_sorted)
        before = found[first] - found_sorted[first]
        inspected_in_group = np.arange(values.size) - first[group] + 1
        # (k * positives) / size is exact at the end of a block (k == size), so the curve reaches 1 exactly.
        found = before[group] + (inspected_in_group * positives[group]) / size[group]
    return found / n_mislabeled


def _found_at(curve: np.ndarray, fraction: float) -> float:
    """Curve value after inspecting the top `ceil(fraction * n)` examples."""
    value = check_fraction("fraction", fraction)
    k = max(1, math.ceil(round(value * curve.size, 9)))  # round: 0.07 * 100 must give 7, not 8
    return float(curve[k - 1])


def fraction_found(scores: np.ndarray, is_mislabeled: np.ndarray, fraction: float, ties: Ties = "average") -> float:
    """Fraction of mislabeled examples found after inspecting the top `ceil(fraction * n)` examples.

    A perfect ranking gives 1 at `fraction` = the noise rate; a random one gives about `fraction`.

    Args:
        scores: suspicion scores of shape `(n,)`, higher = inspected first.
        is_mislabeled: boolean mask of shape `(n,)`, at least one True.
        fraction: the share of the data inspected, in (0, 1].
        ties: see `detection_curve`.

    Returns:
        The recall in [0, 1].
    """
    return _found_at(detection_curve(scores, is_mislabeled, ties=ties), fraction)


def roc_auc(scores: np.ndarray, is_mislabeled: np.ndarray) -> float:
    """ROC-AUC of `scores` for separating mislabeled (positive) from clean examples.

    The Mann-Whitney statistic with average ranks: `AUC = (R+ - P (P + 1) / 2) / (P N)` where
    `R+` is the sum of the ranks of the `P` positives among all `n = P + N` scores. It is the
    probability that a random mislabeled example outscores a random clean one, ties counting
    one half (equal to `sklearn.metrics.roc_auc_score`).

    Raises:
        InvalidDataError: shapes differ, or only one class is present.
        NonFiniteError: `scores` holds NaN or Inf.
    """
    values, labels = _scores_and_labels(scores, is_mislabeled)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InvalidDataError(
            "`is_mislabeled` must contain both mislabeled and clean examples for a ROC-AUC. "
            f"Received: {n_pos} mislabeled, {n_neg} clean"
        )
    rank_sum = float(average_ranks(values)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass(frozen=True)
class MislabelReport:
    """Mislabel detection summary of one score vector.

    Attributes:
        auc: ROC-AUC (ties count one half).
        found: `{fraction: recall after inspecting that share of the data}`.
        area_under_curve: mean of the detection curve, Influenciae's benchmark "roc";
            equals `pi / 2 + (1 - pi) * auc + 1 / (2 n)` for a noise rate `pi`.
        curve: the detection curve, shape `(n,)`.
    """

    auc: float
    found: dict[float, float]
    area_under_curve: float
    curve: np.ndarray = field(repr=False)

    def to_dict(self, include_curve: bool = False) -> dict[str, Any]:
        """Plain JSON-serialisable dict (the curve as a list only if asked)."""
        out: dict[str, Any] = {
            "auc": self.auc,
            "found": {str(k): v for k, v in self.found.items()},
            "area_under_curve": self.area_under_curve,
        }
        if include_curve:
            out["curve"] = self.curve.tolist()
        return out


def mislabel_detection(
    scores: np.ndarray,
    is_mislabeled: np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ties: Ties = "average",
) -> MislabelReport:
    """All mislabel detection metrics of `scores` at once (curve computed once).

    Args:
        scores: suspicion scores of shape `(n,)`, higher = more suspicious.
        is_mislabeled: boolean mask of shape `(n,)`, with both classes present.
        fractions: shares of the data inspected for `found`.
        ties: see `detection_curve`.

    Returns:
        A `MislabelReport`.
    """
    curve = detection_curve(scores, is_mislabeled, ties=ties)
    found = {float(f): _found_at(curve, f) for f in fractions}
    return MislabelReport(
        auc=roc_auc(scores, is_mislabeled), found=found, area_under_curve=float(curve.mean()), curve=curve
    )
