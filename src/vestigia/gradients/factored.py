"""Inner products of per-example gradients of `Dense` layers, without forming them.

For a `Dense` layer applied to rank-2 inputs, the per-example gradient of its kernel (and
bias) is the outer product `g_i = a_i (x) d_i` of the layer input `a_i` (`in` entries, plus a
trailing 1 when the bias is watched) and the gradient `d_i` of the loss w.r.t. the layer's
pre-activation output (`out` entries). Hence, summed over the watched layers `L`,

    <g_i, g_j> = sum_L <a_i, a_j> <d_i, d_j>,        ||g_i||^2 = sum_L ||a_i||^2 ||d_i||^2,

which costs `in + out` instead of `in * out` per pair. The factors of a batch are packed in one
tensor `(batch, sum_L in_L + out_L)` laid out `[a_1, d_1, a_2, d_2, ...]` (see
`HeadDifferentiator.factors`), so that they can be batched and concatenated like gradients.
"""

from __future__ import annotations

import tensorflow as tf


def split_factors(packed: tf.Tensor, widths: list[tuple[int, int]]) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """`[(a_L (n, in_L), d_L (n, out_L)), ...]` from packed factors `(n, sum_L in_L + out_L)`."""
    sizes = [w for pair in widths for w in pair]
    parts = tf.split(packed, sizes, axis=1)
    return list(zip(parts[0::2], parts[1::2]))


def factored_inner_products(left: tf.Tensor, right: tf.Tensor, widths: list[tuple[int, int]]) -> tf.Tensor:
    """`<g_i, g_j>` for every row `i` of `left` and `j` of `right`, shape `(n_left, n_right)`."""
    total = None
    for (a_left, d_left), (a_right, d_right) in zip(split_factors(left, widths), split_factors(right, widths)):
        term = tf.matmul(a_left, a_right, transpose_b=True) * tf.matmul(d_left, d_right, transpose_b=True)
        total = term if total is None else total + term
    return total


def factored_squared_norms(packed: tf.Tensor, widths: list[tuple[int, int]]) -> tf.Tensor:
    """`||g_i||^2` for every row of packed factors, shape `(n,)`."""
    total = None
    for a, d in split_factors(packed, widths):
        term = tf.reduce_sum(tf.square(a), axis=1) * tf.reduce_sum(tf.square(d), axis=1)
        total = term if total is None else total + term
    return total


def expand_factors(packed: tf.Tensor, widths: list[tuple[int, int]]) -> tf.Tensor:
    """The full per-example gradients `(n, sum_L in_L * out_L)`, each layer's kernel block
    flattened row-major followed by its bias (the order of `Dense` variables)."""
    blocks = []
    for a, d in split_factors(packed, widths):
        blocks.append(tf.reshape(a[:, :, None] * d[:, None, :], [tf.shape(a)[0], -1]))
    return tf.concat(blocks, axis=1)
