"""The damped inverse Gram matrix of projected per-example features, `(Phi^T Phi / n + lambda I)^-1`.

TRAK's kernel and LoGra's inverse (the empirical Fisher in the projected space): one streaming
pass accumulates `Phi^T Phi` in float64, then one `(k, k)` solve.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from vestigia.errors import InvalidDataError

# Default damping: this fraction of the mean eigenvalue `trace(Phi^T Phi / n) / k`.
DEFAULT_RELATIVE_DAMPING = 1e-3


def damped_gram_inverse(
    feature_batches: Iterable[tf.Tensor], damping: float | None, name: str = "train_set"
) -> tuple[tf.Tensor, float, int]:
    """`((Phi^T Phi / n + lambda I)^-1 (k, k) float64, lambda, n)` over batches of features `(batch, k)`.

    Args:
        feature_batches: the rows of `Phi`, batch by batch.
        damping: `lambda`; None for `DEFAULT_RELATIVE_DAMPING * trace(Phi^T Phi / n) / k`.
        name: the data set's argument name, for errors.

    Raises:
        InvalidDataError: no rows, or a singular Gram matrix with `damping=0`.
    """
    gram, n = None, 0
    for features in feature_batches:
        phi = tf.cast(features, tf.float64)
        part = tf.matmul(phi, phi, transpose_a=True)
        gram = part if gram is None else gram + part
        n += int(phi.shape[0])
    if gram is None:
        raise InvalidDataError(f"`{name}` is empty.")
    gram = gram.numpy() / n
    k = gram.shape[0]
    used = DEFAULT_RELATIVE_DAMPING * float(np.trace(gram)) / k if damping is None else float(damping)
    if used == 0.0 and np.linalg.matrix_rank(gram) < k:
        raise InvalidDataError(
            f"The Gram matrix Phi^T Phi / n is singular (rank {np.linalg.matrix_rank(gram)} < k={k}, n={n} "
            f"examples of `{name}`) and damping=0: pass damping > 0 or a smaller projection."
        )
    inverse = np.linalg.solve(gram + used * np.eye(k), np.eye(k))
    return tf.constant((inverse + inverse.T) / 2), used, n
