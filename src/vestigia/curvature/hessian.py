"""The dense mean training Hessian in float64, built from its structure where it has one.

For one watched `Dense` layer (kernel, then bias if watched) the Hessian is exactly
`sum_i (a_i a_i^T) (x) M_i`, `a_i` the layer input (a trailing 1 for the bias) and `M_i` the
`(out, out)` Hessian of the loss w.r.t. the pre-activation output. In the parameter order
`(input j, class c)` its `(c, c')` class-pair block is `A^T diag(M[:, c, c']) A`: one matrix
product per class, `A^T [M[:, c, c'] * A for c' >= c]`, in float64 (the lower blocks by
symmetry), with the factors of many batches gathered first so that each product is large. Any
other head sums the autodiff Hessian of each batch (HVPs with rows of the identity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from vestigia.errors import NonFiniteError, check_finite
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.progress import known_length, track

SMALL_MATRIX = 1024
ROWS_PER_PRODUCT = 4096
OUTER_BYTES = 2 << 20


def kronecker_hessian_sum(a: np.ndarray, curvature: np.ndarray, total: np.ndarray) -> None:
    """Add `sum_i (a_i a_i^T) (x) M_i` to `total` `(in * out, in * out)`, in place, float64.

    Args:
        a: layer inputs `(n, in)`. curvature: `M`, `(n, out, out)`, symmetric per example.
        total: the running sum, row-major over `(in, out)` on both axes.
    """
    n, n_in = a.shape
    n_out = curvature.shape[1]
    if total.shape[0] <= SMALL_MATRIX:
        # Small: `sum_i vec(a_i a_i^T) vec(M_i)^T`, a product per `OUTER_BYTES` of outer products
        # (NumPy: its first float64 product costs ~20 ms in a fresh process, TensorFlow's ~70-120 ms;
        # small chunks reuse one buffer, where one large one is fresh memory, page-faulted each time
        # in a fresh process).
        step = max(1, OUTER_BYTES // (8 * n_in * n_in))
        summed = np.zeros((n_in * n_in, n_out * n_out))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            outer = (a[rows, :, None] * a[rows, None, :]).reshape(-1, n_in * n_in)
            summed += outer.T @ curvature[rows].reshape(-1, n_out * n_out)
        total += summed.reshape(n_in, n_in, n_out, n_out).transpose(0, 2, 1, 3).reshape(total.shape)
        return
    blocks = total.reshape(n_in, n_out, n_in, n_out)
    a_t = np.ascontiguousarray(a.T)
    for c in range(n_out):
        weighted = (curvature[:, c, c:, None] * a[:, None, :]).reshape(n, -1)  # (n, (out - c) * in)
        row = (a_t @ weighted).reshape(n_in, n_out - c, n_in)  # [j, c', j'] = block (c, c')
        blocks[:, c, :, c:] += row.transpose(0, 2, 1)
        if c + 1 < n_out:
            blocks[:, c + 1 :, :, c] += row[:, 1:, :].transpose(2, 1, 0)


def factors_hessian_sum(a: np.ndarray, curvature: np.ndarray, total: np.ndarray) -> np.ndarray:
    """`kronecker_hessian_sum` over any number of examples, `ROWS_PER_PRODUCT` at a time; returns `total`."""
    for start in range(0, len(a), ROWS_PER_PRODUCT):
        rows = slice(start, start + ROWS_PER_PRODUCT)
        kronecker_hessian_sum(a[rows], curvature[rows], total)
    return total


class DenseFactors(NamedTuple):
    """The Kronecker factors of every training example (see `kronecker_hessian_sum`), float64:
    `inputs` `(n, in)` and `curvature` `(n, out, out)` (weights included); the mean is over `n`."""

    inputs: np.ndarray
    curvature: np.ndarray


def _batch_curvatures(
    model: BaseInfluenceModel, dataset: tf.data.Dataset, name: str
) -> Iterator[tuple[tuple[np.ndarray, np.ndarray] | np.ndarray, int]]:
    """Per batch: its Kronecker factors `(a, M)` (in closed form, NumPy, where the head has one; else
    `dense_curvature`), or its summed autodiff Hessian, and its size.

    Raises:
        NonFiniteError: a batch gives NaN or Inf curvature (the message names its cause).
    """
    differentiator = model.differentiator
    closed = differentiator.closed_form
    for batch in track(model.feature_batches(dataset, name), "Hessian (batches)", known_length(dataset)):
        part: tuple[np.ndarray, np.ndarray] | np.ndarray
        if closed is not None and closed.applies_to(batch.features):  # NumPy float64 already
            part = closed.curvature(batch.features, batch.targets, batch.weights)
        elif (pair := differentiator.dense_curvature(batch.features, batch.targets, batch.weights)) is not None:
            part = (pair[0].numpy(), pair[1].numpy())
        else:
            part = differentiator.hessian(batch.features, batch.targets, batch.weights).numpy()
        if not all(np.isfinite(p).all() for p in (part if isinstance(part, tuple) else (part,))):
            losses = differentiator.losses(batch.features, batch.targets, batch.weights)
            raise NonFiniteError(model.diagnose_non_finite(batch, name, losses))
        yield part, batch.size


def mean_hessian_or_factors(
    model: BaseInfluenceModel,
    dataset: tf.data.Dataset,
    name: str = "train_dataset",
    max_rows: Callable[[int, int], int] | None = None,
) -> np.ndarray | DenseFactors:
    """The mean Hessian `H = (1/n) sum_i w_i d^2 loss_i / d theta^2`, float64 `(n_params, n_params)`;
    or, when every batch has Kronecker factors and there are at most `max_rows(in, out)` examples,
    those factors (`DenseFactors`), with nothing of size `(n_params, n_params)` formed.

    One pass over the data. No per-example Hessian is formed; memory is the Hessian plus
    `ROWS_PER_PRODUCT` examples' factors (or all of them, up to `max_rows`).

    Raises:
        NonFiniteError: a batch gives NaN or Inf curvature (the message names its cause).
    """
    total: np.ndarray | None = None
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    count, limit, generic = 0, None, False

    def summed() -> np.ndarray:
        nonlocal total
        if total is None:
            total = np.zeros((model.nb_params, model.nb_params), dtype=np.float64)
        if pending:
            inputs, curvature = np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])
            factors_hessian_sum(inputs, curvature, total)
            pending.clear()
        return total

    for part, size in _batch_curvatures(model, dataset, name):
        count += size
        if isinstance(part, tuple):
            if limit is None:
                limit = 0 if max_rows is None or generic else max_rows(part[0].shape[1], part[1].shape[1])
            pending.append(part)
            if count > limit and sum(len(p[0]) for p in pending) >= ROWS_PER_PRODUCT:
                summed()
        else:
            generic, limit = True, 0
            if pending:
                summed()
            total = part if total is None else total + part
    if pending and not generic and limit is not None and count <= limit:
        return DenseFactors(np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending]))
    total = summed()
    total /= count
    if generic:  # the Kronecker sum is symmetric by construction; autodiff rows only up to round-off
        total += total.T
        total /= 2.0
    check_finite("the training Hessian", total)
    return total


def mean_hessian(model: BaseInfluenceModel, dataset: tf.data.Dataset, name: str = "train_dataset") -> np.ndarray:
    """`H = (1/n) sum_i w_i d^2 loss_i / d theta^2`, float64 `(n_params, n_params)` (see
    `mean_hessian_or_factors`)."""
    result = mean_hessian_or_factors(model, dataset, name)
    assert isinstance(result, np.ndarray)
    return result


def symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`numpy.linalg.eigh` (ascending eigenvalues, eigenvectors in columns), float64.

    Up to `SMALL_MATRIX` rows it runs in TensorFlow (Eigen, one thread): at that size LAPACK's
    threaded solver spends most of its time starting threads and contending with TensorFlow's
    thread pool on few cores (0.2-0.6 s instead of 10 ms for 320 rows on 2 cores).
    """
    if matrix.shape[0] > SMALL_MATRIX:
        return np.linalg.eigh(matrix)
    eigenvalues, eigenvectors = tf.linalg.eigh(tf.constant(matrix, tf.float64))
    return eigenvalues.numpy(), eigenvectors.numpy()
