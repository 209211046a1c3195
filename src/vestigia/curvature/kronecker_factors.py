"""Kronecker factors of the Fisher per layer, their eigenbases, and EK-FAC's eigenvalues.

For a layer with per-example gradient `G_i = sum_t a_it d_it^T` (`T` positions, see
`vestigia.gradients.layer_kinds`), K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions) approximates the layer's block of the Fisher `F = E_i[vec(G_i) vec(G_i)^T]`
(row-major `vec`) by

    F ~ A (x) S,    A = E_i[sum_t a_it a_it^T] / T,    S = E_i[sum_t d_it d_it^T],

exact when `T = 1` and `a`, `d` are independent. With `A = Q_A diag(alpha) Q_A^T` and
`S = Q_S diag(sigma) Q_S^T` (float64 `eigh`), `A (x) S` has eigenvectors `Q_A (x) Q_S` and
eigenvalues `Lambda = alpha sigma^T` `(in, out)`. EK-FAC (George et al. 2018; Grosse et al. 2023)
keeps the eigenbasis and refits the eigenvalues to the second moments of the per-example
gradients in it:

    Lambda_jk = E_i[(Q_A^T G_i Q_S)_jk^2],

computed from `a` and `d` (rotated first, or `G_i` formed per batch when that is cheaper, see
`rotate_first`; each rotation one GEMM over the whole batch), never from `(n, n_params)`
gradients. The input factor of a stride-1 `Conv2D` comes from shifted products of its input
instead of its patches (`vestigia.curvature.conv_covariance`). Weights without a Kronecker form get the diagonal
`E_i[g_i^2]`. All sums are per batch in float32 on the device and accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from vestigia.errors import NonFiniteError


@dataclass
class LayerFactors:
    """One layer's curvature in its Kronecker eigenbasis: `F = (Q_A (x) Q_S) diag(vec Lambda) (...)^T`.

    Attributes:
        name: the layer's path (for messages).
        q_in: `Q_A` `(in, in)` float64, or None for the identity (diagonal input factor).
        q_out: `Q_S` `(out, out)` float64.
        eigenvalues: `Lambda` `(in, out)` float64 (K-FAC: `alpha sigma^T`; EK-FAC: refitted).
        damping: the layer's damping `lambda_L`, added to every eigenvalue.
    """

    name: str
    q_in: np.ndarray | None
    q_out: np.ndarray
    eigenvalues: np.ndarray
    damping: float


def _check_finite(name: str, what: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise NonFiniteError(
            f"The {what} of layer {name!r} holds NaN or Inf ({int((~np.isfinite(array)).sum())} entries): check "
            "the model's outputs on the training data (e.g. log(0) in the loss) and its weights."
        )


def batch_covariances(
    inputs: list[tf.Tensor],
    deltas: list[tf.Tensor],
    diagonal_input: list[bool],
    known_inputs: list[tf.Tensor | None] | None = None,
) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Per layer, `(sum_i sum_t a a^T / T, sum_i sum_t d d^T)` of one batch (traced code).

    A diagonal input factor is returned as its diagonal `(in,)`. `known_inputs` may give a
    layer's input term computed another way (e.g. `conv_covariance`); its `a` is then unused.
    """
    result = []
    known = known_inputs if known_inputs is not None else [None] * len(inputs)
    for a, d, diagonal, cov_known in zip(inputs, deltas, diagonal_input, known):
        flat_d = tf.reshape(d, [-1, d.shape[-1]])
        if cov_known is not None:
            result.append((cov_known, tf.matmul(flat_d, flat_d, transpose_a=True)))
            continue
        positions = tf.cast(tf.shape(a)[1], a.dtype)
        flat_a = tf.reshape(a, [-1, a.shape[-1]])
        if diagonal:
            cov_a = tf.reduce_sum(tf.square(flat_a), axis=0) / positions
        else:
            cov_a = tf.matmul(flat_a, flat_a, transpose_a=True) / positions
        result.append((cov_a, tf.matmul(flat_d, flat_d, transpose_a=True)))
    return result


def eigenbasis(name: str, cov_in: np.ndarray, cov_out: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """`(Q_A or None, Q_S, alpha sigma^T)` of mean factors, float64 (negative rounding clipped to 0)."""
    _check_finite(name, "input covariance factor A", cov_in)
    _check_finite(name, "output-gradient covariance factor S", cov_out)
    if cov_in.ndim == 1:
        q_in, alpha = None, cov_in
    else:
        alpha, q_in = np.linalg.eigh((cov_in + cov_in.T) / 2)
    sigma, q_out = np.linalg.eigh((cov_out + cov_out.T) / 2)
    return q_in, q_out, np.outer(np.maximum(alpha, 0.0), np.maximum(sigma, 0.0))


def rotate_first(positions: int | None, n_in: int, n_out: int) -> bool:
    """The cheaper contraction order for `Q_A^T G_i Q_S` with `G_i = A_i^T D_i` (multiply-adds
    per example): rotating `A_i` `(T, in)` and `D_i` `(T, out)` first and then contracting over
    positions costs `T (in^2 + out^2 + in out)`; forming `G_i` first and rotating it costs
    `T in out + in out (in + out)`. So rotate first when `T` is below about `in` (e.g. a 3 x 3
    convolution on an 8 x 8 map: `T = 64`, `in = 9 c_in + 1`)."""
    if positions is None:
        return False
    return positions * (n_in * n_in + n_out * n_out + n_in * n_out) < positions * n_in * n_out + n_in * n_out * (
        n_in + n_out
    )


def flat_matmul(x: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
    """`x @ q` for `x` `(..., n)` as one `(rows, n) x (n, m)` GEMM over all leading axes (a
    broadcast batched matmul would copy `q` once per example and run many small products)."""
    shape = tf.shape(x)
    product = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), q)
    return tf.reshape(product, tf.concat([shape[:-1], [q.shape[-1]]], axis=0))


def _rotated(a: tf.Tensor, d: tf.Tensor, q_in: tf.Tensor | None, q_out: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """`Q_A^T G_i Q_S` per example, in the cheaper order (`rotate_first`), every rotation one
    large GEMM over the whole batch. Returns `(rotated, transposed)`: `(batch, in, out)`, or
    `(batch, out, in)` when `transposed` (saves a transpose of the result)."""
    if rotate_first(a.shape[1], a.shape[-1], d.shape[-1]):
        rotated_a = a if q_in is None else flat_matmul(a, q_in)
        return tf.matmul(rotated_a, flat_matmul(d, q_out), transpose_a=True), False
    gradient = tf.matmul(a, d, transpose_a=True)  # (batch, in, out)
    rotated = flat_matmul(gradient, q_out)  # G Q_S
    if q_in is None:
        return rotated, False
    return flat_matmul(tf.transpose(rotated, [0, 2, 1]), q_in), True  # (Q_A^T G Q_S)^T


def rotated_gradients(a: tf.Tensor, d: tf.Tensor, q_in: tf.Tensor | None, q_out: tf.Tensor) -> tf.Tensor:
    """`Q_A^T G_i Q_S` for each example, `(batch, in, out)` (traced code)."""
    rotated, transposed = _rotated(a, d, q_in, q_out)
    return tf.transpose(rotated, [0, 2, 1]) if transposed else rotated


def weighted_squares(
    a: tf.Tensor, d: tf.Tensor, q_in: tf.Tensor | None, q_out: tf.Tensor, weights: tf.Tensor
) -> tf.Tensor:
    """`sum_jk W_jk (Q_A^T G_i Q_S)_jk^2` per example `(batch,)`; with one position this is
    `((a~^2)^T W (d~^2))` and no `(in, out)` matrix per example is formed (traced code)."""
    if a.shape[1] == 1:
        rotated_a = a[:, 0] if q_in is None else tf.matmul(a[:, 0], q_in)
        rotated_d = tf.matmul(d[:, 0], q_out)
        return tf.reduce_sum(tf.matmul(tf.square(rotated_a), weights) * tf.square(rotated_d), axis=1)
    rotated, transposed = _rotated(a, d, q_in, q_out)
    flat_weights = tf.reshape(tf.transpose(weights) if transposed else weights, [-1, 1])
    squares = tf.reshape(tf.square(rotated), [tf.shape(rotated)[0], -1])
    return tf.reshape(tf.matmul(squares, flat_weights), [-1])


def summed_squares(a: tf.Tensor, d: tf.Tensor, q_in: tf.Tensor | None, q_out: tf.Tensor) -> tf.Tensor:
    """`sum_i (Q_A^T G_i Q_S)^2` over the batch, `(in, out)`: EK-FAC's eigenvalue sums (traced code)."""
    if a.shape[1] == 1:
        rotated_a = a[:, 0] if q_in is None else tf.matmul(a[:, 0], q_in)
        rotated_d = tf.matmul(d[:, 0], q_out)
        return tf.matmul(tf.square(rotated_a), tf.square(rotated_d), transpose_a=True)
    rotated, transposed = _rotated(a, d, q_in, q_out)
    total = tf.reduce_sum(tf.square(rotated), axis=0)
    return tf.transpose(total) if transposed else total


def layer_damping(eigenvalues: np.ndarray, damping: float | None, damping_fraction: float) -> float:
    """`damping` if given, else `damping_fraction * mean(Lambda)` (the layer's mean eigenvalue)."""
    if damping is not None:
        return float(damping)
    return float(damping_fraction * eigenvalues.mean())


def damped_power(values: np.ndarray, damping: float, power: float) -> np.ndarray:
    """`(values + damping)^power`; with `power < 0`, zero where `values + damping == 0` (pseudo-inverse)."""
    total = values + damping
    if power >= 0:
        return total**power
    with np.errstate(divide="ignore"):
        return np.where(total > 0, np.abs(total) ** power, 0.0)


def precondition(factors: LayerFactors, matrices: np.ndarray, power: float = -1.0) -> np.ndarray:
    """`Q_A [(Q_A^T M Q_S) * (Lambda + lambda)^power] Q_S^T` for each `M` of `matrices` `(m, in, out)`.

    `power=-1` applies the damped inverse, `power=1` the damped curvature itself. Float64.
    """
    rotated = matrices if factors.q_in is None else np.einsum("ij,mio->mjo", factors.q_in, matrices)
    rotated = rotated @ factors.q_out
    rotated = rotated * damped_power(factors.eigenvalues, factors.damping, power)
    back = rotated @ factors.q_out.T
    return back if factors.q_in is None else np.einsum("ij,mjo->mio", factors.q_in, back)
