"""Ranks and correlations in plain NumPy: average ranks for ties, Pearson and Spearman.

Undefined correlations follow one rule everywhere: when either input is constant (zero
variance, after ranking for Spearman) the correlation is `nan`, as in `scipy.stats`.
"""

from __future__ import annotations

import numpy as np

from vestigia.errors import InvalidDataError, check_finite


def as_finite_array(name: str, values: object, ndim: int | tuple[int, ...]) -> np.ndarray:
    """`values` as a float64 array of the given number of dimensions, all finite, else raise."""
    array = np.asarray(values, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in allowed:
        raise InvalidDataError(
            f"`{name}` must have {' or '.join(str(d) for d in allowed)} dimension(s). "
            f"Received: {name} with shape {array.shape}"
        )
    check_finite(name, array)
    return array


def average_ranks(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Ranks `1..n` along `axis`, tied values sharing the mean of their ranks.

    The same as `scipy.stats.rankdata(values, method="average", axis=axis)`, vectorised over
    the other axes (one sort, no Python loop).

    Args:
        values: an array of any shape, ranked along `axis`.
        axis: the axis to rank along.

    Returns:
        A float64 array of the shape of `values`.
    """
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    shape = moved.shape
    n = shape[-1]
    if moved.size == 0:
        return np.zeros(np.asarray(values).shape, dtype=np.float64)
    rows = moved.reshape(-1, n)
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, axis=1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_starts = starts.ravel()
    group = np.cumsum(flat_starts) - 1  # every row opens a new group, so ids never span rows
    first = np.tile(np.arange(n), rows.shape[0])[flat_starts]
    group_rank = first + (np.bincount(group) + 1) / 2.0  # mean of the 1-based ranks first+1 .. first+count
    ranks = np.empty(rows.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, group_rank[group].reshape(rows.shape), axis=1)
    return np.moveaxis(ranks.reshape(shape), -1, axis)


def pearson_along(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson correlation of `x` and `y` (same shape) along `axis`; `nan` where either is constant.

    `r = sum(xc * yc) / sqrt(sum(xc^2) * sum(yc^2))` with `xc = x - mean(x)`, clipped to [-1, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    constant = (np.ptp(x, axis=axis) == 0) | (np.ptp(y, axis=axis) == 0)
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    denominator = np.sqrt((xc * xc).sum(axis=axis) * (yc * yc).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=axis) / denominator
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def spearman_along(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman correlation along `axis`: Pearson of the average ranks; `nan` where either is constant."""
    return pearson_along(average_ranks(x, axis=axis), average_ranks(y, axis=axis), axis=axis)


def _paired_vectors(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    x = as_finite_array("a", a, 1)
    y = as_finite_array("b", b, 1)
    if x.shape != y.shape or x.size < 2:
        raise InvalidDataError(
            f"`a` and `b` must be 1-D arrays of the same length >= 2. Received: a with shape {x.shape}, "
            f"b with shape {y.shape}"
        )
    return x, y


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; `nan` when either is constant.

    Raises:
        InvalidDataError: shapes differ, are not 1-D, or hold fewer than 2 values.
        NonFiniteError: an input holds NaN or Inf.
    """
    x, y = _paired_vectors(a, b)
    return float(pearson_along(x, y))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors, tied values receiving their average rank.

    Equal to `scipy.stats.spearmanr(a, b).statistic`. When either input is constant its ranks
    have zero variance and the correlation is undefined: the result is `nan` (no warning).

    Args:
        a: a vector of shape `(n,)`, n >= 2.
        b: a vector of shape `(n,)`.

    Returns:
        The correlation in [-1, 1], or `nan`.

    Raises:
        InvalidDataError: shapes differ, are not 1-D, or hold fewer than 2 values.
        NonFiniteError: an input holds NaN or Inf.
    """
    x, y = _paired_vectors(a, b)
    return float(spearman_along(x, y))
