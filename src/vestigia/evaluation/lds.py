"""Counterfactual evaluation of attributions: LDS, leave-one-out correlation, margin measure.

Sign convention. Vestigia's attribution `value(z_test, z)` is positive for proponents:
upweighting `z` lowers the loss on `z_test`, so keeping `z` *raises* a higher-is-better
output such as the correct-class margin. The additive prediction of that output for a model
trained on subset `S` is therefore

    predicted[s, t] = + sum_{i in S} attributions[t, i]

and a good method has a *positive* LDS. For leave-one-out, compare attributions with the
output *lost* by removing the point, `baseline - output_without_i` (positive for proponents).

References:
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023 (the LDS).
    Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from vestigia.errors import InvalidDataError, check_positive_int
from vestigia.evaluation.stats import as_finite_array, pearson_along, spearman_along

_BOOTSTRAP_CHUNK = 128


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score over test points.

    Attributes:
        mean: mean over test points of the per-test Spearman correlation (undefined ones excluded).
        ci_low: lower end of the percentile-bootstrap confidence interval of `mean`.
        ci_high: upper end.
        per_test: per-test Spearman correlations, shape `(n_test,)`; `nan` where the predicted or
            measured outputs are constant over the subsets.
        n_undefined: how many entries of `per_test` are `nan`.
    """

    mean: float
    ci_low: float
    ci_high: float
    per_test: np.ndarray = field(repr=False)
    n_undefined: int = 0


def bootstrap_mean_interval(values: np.ndarray, confidence: float, n_bootstrap: int, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` `(m,)`: resample with replacement."""
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):  # chunks bound memory to 128 x m
        rows = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        means.append(values[rng.integers(0, values.size, (rows, values.size))].mean(axis=1))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(low), float(high)


def linear_datamodeling_score(
    attributions: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score (LDS) of an attribution matrix against retrained models.

    For each subset `s` and test point `t` the additive prediction is
    `predicted[s, t] = sum_i masks[s, i] * attributions[t, i]`; the per-test score is the
    Spearman correlation over subsets between `predicted[:, t]` and the measured
    `outputs[:, t]`, and the LDS is its mean over test points. Test points where either column
    is constant have an undefined correlation: they are left out of the mean and counted in
    `n_undefined`. The confidence interval is a percentile bootstrap over test points
    (`n_bootstrap` resamples drawn with `numpy.random.default_rng(seed)`), so it reflects the
    spread over test points, not the noise of retraining.

    Args:
        attributions: `(n_test, n_train)`, positive = proponent (see the module docstring).
        masks: `(n_subsets, n_train)` boolean, True = example kept in the subset.
        outputs: `(n_subsets, n_test)` measured outputs (higher = better, e.g. the correct-class
            margin) of the models retrained on each subset.
        confidence: level of the interval, in (0, 1).
        n_bootstrap: number of bootstrap resamples.
        seed: seed of the bootstrap.

    Returns:
        An `LDSResult`.

    Raises:
        InvalidDataError: inconsistent shapes, or fewer than 2 subsets.
        NonFiniteError: an input holds NaN or Inf.
    """
    scores = as_finite_array("attributions", attributions, 2)
    kept = np.asarray(masks)
    measured = as_finite_array("outputs", outputs, 2)
    if kept.dtype != bool and not np.isin(kept, (0, 1)).all():
        raise InvalidDataError(f"`masks` must be boolean (True = kept). Received values {np.unique(kept)[:10]!r}")
    if kept.ndim != 2 or kept.shape[1] != scores.shape[1] or kept.shape[0] < 2:
        raise InvalidDataError(
            f"`masks` must have shape (n_subsets >= 2, n_train={scores.shape[1]}). Received: masks with shape "
            f"{kept.shape}"
        )
    if measured.shape != (kept.shape[0], scores.shape[0]):
        raise InvalidDataError(
            f"`outputs` must have shape (n_subsets={kept.shape[0]}, n_test={scores.shape[0]}). Received: "
            f"outputs with shape {measured.shape}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1). Received: confidence={confidence!r}")
    check_positive_int("n_bootstrap", n_bootstrap)
    predicted = kept.astype(np.float64) @ scores.T
    per_test = spearman_along(predicted, measured, axis=0)
    defined = per_test[np.isfinite(per_test)]
    mean = float(defined.mean()) if defined.size else float("nan")
    low, high = bootstrap_mean_interval(defined, confidence, n_bootstrap, seed)
    return LDSResult(mean, low, high, per_test, n_undefined=int(per_test.size - defined.size))


def leave_one_out_correlation(
    predicted: np.ndarray,
    actual: np.ndarray,
    method: Literal["pearson", "spearman"] = "pearson",
    average: Literal["pooled", "per_test"] = "pooled",
) -> float:
    """Correlation between predicted and actual leave-one-out effects.

    Pass attributions (positive = proponent) as `predicted`, and as `actual` the output lost by
    removing each point, `baseline - output_without_i` (see `leave_one_out_retraining`,
    whose result has it as `.output_drop`, transposed to `(n_test, n_removed)`).

    Args:
        predicted: `(n,)` or `(n_test, n_removed)` predicted effects.
        actual: the same shape, measured effects.
        method: "pearson" or "spearman" (average ranks).
        average: for 2-D inputs, "pooled" correlates all `n_test * n_removed` pairs at once;
            "per_test" averages the per-row correlations (undefined rows left out).

    Returns:
        The correlation; `nan` when undefined (constant input).

    Raises:
        InvalidDataError: shapes differ or fewer than 2 values.
        NonFiniteError: an input holds NaN or Inf.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"`method` must be 'pearson' or 'spearman'. Received: method={method!r}")
    if average not in ("pooled", "per_test"):
        raise ValueError(f"`average` must be 'pooled' or 'per_test'. Received: average={average!r}")
    x = as_finite_array("predicted", predicted, (1, 2))
    y = as_finite_array("actual", actual, (1, 2))
    if x.shape != y.shape or x.shape[-1] < 2:
        raise InvalidDataError(
            "`predicted` and `actual` must have the same shape with at least 2 points per row. Received: "
            f"predicted with shape {x.shape}, actual with shape {y.shape}"
        )
    correlate = pearson_along if method == "pearson" else spearman_along
    if x.ndim == 1 or average == "pooled":
        return float(correlate(x.ravel(), y.ravel(), axis=0))
    rows = correlate(x, y, axis=1)
    rows = rows[np.isfinite(rows)]
    return float(rows.mean()) if rows.size else float("nan")


def _label_indices(labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """Integer class of each example from integer labels `(n,)` / `(n, 1)` or one-hot `(n, n_classes)` (argmax)."""
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == n_classes:
        classes = np.argmax(array, axis=1)
    elif array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        flat = array.reshape(-1)
        classes = flat.astype(np.int64)
        if not np.array_equal(classes, flat):
            raise InvalidDataError(f"`labels` must hold integer classes. Received values {np.unique(flat)[:10]!r}")
    else:
        raise InvalidDataError(
            f"`labels` must have shape ({n},) or ({n}, {n_classes}). Received: labels with shape {array.shape}"
        )
    if classes.shape != (n,) or classes.min(initial=0) < 0 or classes.max(initial=0) >= n_classes:
        raise InvalidDataError(
            f"`labels` must give {n} classes in [0, {n_classes}). Received: labels with shape "
            f"{array.shape} and values in [{classes.min(initial=0)}, {classes.max(initial=0)}]"
        )
    return classes


def correct_class_margin(logits: Any, labels: Any, from_probabilities: bool = False) -> np.ndarray:
    """Margin of the true class: its logit minus the largest other logit.

    `margin[j] = z[j, y_j] - max_{c != y_j} z[j, c]`, positive when the example is classified
    correctly; higher is better. A single logit per example (shape `(n,)` or `(n, 1)`, binary
    sigmoid model) is read as logits `(0, s)`, so the margin is `s` for class 1 and `-s` for
    class 0. For models that output probabilities pass `from_probabilities=True`: the margin is
    then taken on log-probabilities (equal to the logit margin for a softmax output; for a
    sigmoid output the probability is first turned back into its logit).

    Args:
        logits: `(n, n_classes)` logits, or `(n,)` / `(n, 1)` binary logits.
        labels: integer classes `(n,)` (or `(n, 1)`), or one-hot `(n, n_classes)` (argmax taken).
        from_probabilities: the first argument holds probabilities instead of logits.

    Returns:
        A float64 array of shape `(n,)`.

    Raises:
        InvalidDataError: inconsistent shapes or labels out of range.
        NonFiniteError: `logits` holds NaN or Inf.
    """
    z = as_finite_array("logits", logits, (1, 2))
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    tiny = np.finfo(np.float64).tiny
    if z.ndim == 1:
        if from_probabilities:
            z = np.log(np.clip(z, tiny, None)) - np.log(np.clip(1.0 - z, tiny, None))
        classes = _label_indices(labels, z.shape[0], 2)
        return np.where(classes == 1, z, -z)
    if from_probabilities:
        z = np.log(np.clip(z, tiny, None))
    rows = np.arange(z.shape[0])
    classes = _label_indices(labels, z.shape[0], z.shape[1])
    others = z.copy()
    others[rows, classes] = -np.inf
    return z[rows, classes] - others.max(axis=1)
