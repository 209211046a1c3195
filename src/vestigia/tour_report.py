"""The results of `vestigia tour`: its rows, the Markdown summary and the CSV files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np

from vestigia.demo import FOUND_AT, HIDDEN_UNITS


@dataclass(frozen=True)
class DetectionRow:
    """One method's mislabel detection: ROC-AUC, `found` by fraction, seconds, and the largest
    deviation of its scores from the exact solve at its damping (relative to max |score|)."""

    key: str
    label: str
    settings: str
    auc: float
    found: dict[float, float]
    seconds: float
    deviation: float | None


@dataclass(frozen=True)
class GroupRow:
    """A group's influence on a set of test images, first and second order (both `(sum_T g)^T
    H^-1 g_U` scale), and the second-order change of their mean loss if the group is removed."""

    group: str
    size: int
    evaluated_on: str
    first_order: float
    second_order: float
    mean_loss_change: float

    def explanation(self) -> str:
        side = "support" if self.second_order > 0 else "pull against"
        effect = "raise" if self.second_order > 0 else "lower"
        return (
            f"{'positive' if self.second_order > 0 else 'negative'}: the {self.group} {side} {self.evaluated_on}; "
            f"removing them would {effect} their mean loss by about {abs(self.mean_loss_change):.3g} (predicted)"
        )


@dataclass(frozen=True)
class Explanation:
    """A test image explained by one method: its top proponents and opponents (training indices)."""

    method: str
    test_index: int
    label: int
    predicted: int
    proponents: list[str]
    opponents: list[str]
    path: str


@dataclass
class TourResult:
    """Everything the tour measured, and the files it wrote."""

    dataset: str
    n_train: int
    n_test: int
    n_flipped: int
    epochs: int
    test_accuracy: float
    n_params: int
    lambda_max: float
    rows: list[DetectionRow]
    groups: list[GroupRow]
    explanations: list[Explanation]
    output: str
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The Markdown written to `summary.md` and printed."""
        fractions = list(FOUND_AT)
        head = " | ".join(f"top {f:.0%}" for f in fractions)
        lines = [
            "# Vestigia tour",
            "",
            f"Data: {self.dataset}, {self.n_train} training images with {self.n_flipped} labels flipped "
            f"({self.n_flipped / self.n_train:.0%}), {self.n_test} clean test images. Model: pixels -> "
            f"Dense({HIDDEN_UNITS}, relu) -> Dense(10, no bias), {self.epochs} epochs, test accuracy "
            f"{self.test_accuracy:.3f}. Curvature methods "
            f"watch the last layer ({self.n_params} parameters, lambda_max(H) = {self.lambda_max:.4g}). "
            "Indices: # = position in the training split, test image = position in the test split.",
            "",
            "## Mislabel detection by self-influence",
            "",
            "Share of the flipped labels found when inspecting the top of each ranking (random: 10% and 20%; "
            "ROC-AUC random: 0.5). 'vs exact': largest deviation from the exact solve at the same damping.",
            "",
            f"| method | settings | ROC-AUC | {head} | seconds | vs exact |",
            "|---|---|---|" + "---|" * len(fractions) + "---|---|",
        ]
        for row in self.rows:
            found = " | ".join(f"{row.found[f]:.1%}" for f in fractions)
            deviation = "-" if row.deviation is None else f"{100 * row.deviation:.2g}%"
            lines.append(
                f"| {row.label} | {row.settings} | {row.auc:.3f} | {found} | {row.seconds:.1f} | {deviation} |"
            )
        lines += [
            "",
            "The boundary methods measure the distance to the decision boundary of the predicted class and ignore "
            "the labels: they flag ambiguous images, not flipped labels.",
            "",
            "## Explaining predictions (proponents: highest value, opponents: lowest)",
            "",
        ]
        for e in self.explanations:
            lines.append(
                f"- {e.method}, test image {e.test_index} (label {e.label}, predicted {e.predicted}): "
                f"proponents {', '.join(e.proponents)}; opponents {', '.join(e.opponents)} "
                f"([{os.path.basename(e.path)}]({os.path.basename(e.path)}))"
            )
        lines += [
            "",
            "## Group influence (exact H; second order scaled by n to compare with first order)",
            "",
            "| group | size | on | first order | second order | mean loss change if removed |",
            "|---|---|---|---|---|---|",
        ]
        for g in self.groups:
            lines.append(
                f"| {g.group} | {g.size} | {g.evaluated_on} | {g.first_order:.4g} | {g.second_order:.4g} | "
                f"{g.mean_loss_change:+.3g} |"
            )
        lines += [""] + [f"- {g.explanation()}" for g in self.groups]
        lines += ["", f"Time for the {len(self.seconds)} steps: {sum(self.seconds.values()):.1f} s (after start-up)."]
        return "\n".join(lines) + "\n"


def save_tables(
    output: str, rows: list[DetectionRow], scores: dict[str, np.ndarray], given: np.ndarray, true: np.ndarray
) -> None:
    """Write `detection.csv` (one row per method) and `self_influence.csv` (one row per training
    image: index, given and true label, flipped, then each method's score, exact decimals)."""
    with open(os.path.join(output, "detection.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "roc_auc", *[f"found_top_{f:g}" for f in FOUND_AT], "seconds", "vs_exact"])
        for r in rows:
            found = [repr(r.found[f]) for f in FOUND_AT]
            writer.writerow(
                [r.key, repr(r.auc), *found, f"{r.seconds:.3f}", "" if r.deviation is None else r.deviation]
            )
    with open(os.path.join(output, "self_influence.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "given_label", "true_label", "flipped", *scores])
        for i in range(len(given)):
            values = [repr(float(s[i])) for s in scores.values()]
            writer.writerow([i, int(given[i]), int(true[i]), int(given[i] != true[i]), *values])
