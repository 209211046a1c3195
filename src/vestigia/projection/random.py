"""Seeded random projections of per-example vectors, generated block by block.

`project(V) = V R / sqrt(k)` for `V` of shape `(batch, n_params)` and a random `R` of shape
`(n_params, k)` with independent entries, Rademacher (+-1) or standard Gaussian, so that
`E[<project(u), project(v)>] = <u, v>` and the inner products are distorted by about
`sqrt((||u||^2 ||v||^2 + <u, v>^2) / k)` (Johnson-Lindenstrauss).

`R` is never held whole: its rows come in blocks of `block_size` parameters, block `b` drawn by
TensorFlow's stateless generators from the seed pair `(seed, b)`. The projection is therefore a
deterministic function of `(n_params, k, kind, seed, block_size)`: the same for every batching
of the data and every call, on a given device type (TensorFlow does not promise identical
stateless streams across CPU and GPU kernels). Pure TensorFlow, traced once per instance.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from vestigia.errors import check_positive_int
from vestigia.gradients.autodiff import trace

KINDS = ("rademacher", "gaussian")

# Entries of one generated block of `R` (16 MiB in float32): bounds the memory of a projection.
BLOCK_ENTRIES = 1 << 22


def check_projection_dim(k: Any, n_params: int, name: str = "projection_dim") -> int:
    """`k` as an int in `[1, n_params]`, else raise `ValueError` naming the argument."""
    k = check_positive_int(name, k)
    if k > n_params:
        raise ValueError(
            f"`{name}` must be at most the number of projected parameters ({n_params}): a projection "
            f"to more dimensions than it has inputs only adds noise. Received: {name}={k}. "
            f"Use {name}={n_params} or fewer, or no projection (projection=None)."
        )
    return k


class RandomProjection:
    """`V -> V R / sqrt(k)`, `(batch, n_params) -> (batch, k)`, with `R` drawn block by block.

    Args:
        n_params: the width `n_params` of the projected vectors.
        k: the projection dimension, `1 <= k <= n_params`.
        kind: "rademacher" (entries +-1) or "gaussian" (standard normal).
        seed: an integer; the same seed gives the same `R`.
        block_size: rows of `R` generated at once; default `BLOCK_ENTRIES // k` (at most 16 MiB).

    Raises:
        ValueError: `k` above `n_params`, or an unknown `kind`.
    """

    def __init__(
        self, n_params: int, k: int, kind: str = "rademacher", seed: int = 0, block_size: int | None = None
    ) -> None:
        self.n_params = check_positive_int("n_params", n_params)
        self.k = check_projection_dim(k, self.n_params)
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")
        self.kind = kind
        self.seed = int(seed)
        default = max(1, BLOCK_ENTRIES // self.k)
        self.block_size = min(self.n_params, check_positive_int("block_size", block_size or default))
        self.n_blocks = -(-self.n_params // self.block_size)
        self.output_blocks = [self.k]
        self._project = trace(self._projected)

    def block(self, index: int | tf.Tensor) -> tf.Tensor:
        """Rows `[index * block_size, (index + 1) * block_size)` of `R / sqrt(k)`, float32
        `(block_size, k)` (rows past `n_params` exist but only ever multiply zeros)."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(index, tf.int64)])
        shape = [self.block_size, self.k]
        if self.kind == "rademacher":
            bits = tf.random.stateless_uniform(shape, seed, minval=0, maxval=2, dtype=tf.int32)
            entries = tf.cast(2 * bits - 1, tf.float32)
        else:
            entries = tf.random.stateless_normal(shape, seed, dtype=tf.float32)
        return entries * (1.0 / float(self.k) ** 0.5)

    def _projected(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = tf.cast(vectors, tf.float32)
        rows = tf.shape(vectors)[0]
        padded = tf.pad(vectors, [[0, 0], [0, self.n_blocks * self.block_size - self.n_params]])
        blocks = tf.transpose(tf.reshape(padded, [rows, self.n_blocks, self.block_size]), [1, 0, 2])

        def step(b: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return b + 1, total + tf.matmul(blocks[b], self.block(b))

        _, total = tf.while_loop(
            lambda b, _: b < self.n_blocks, step, (tf.constant(0), tf.zeros([rows, self.k], tf.float32))
        )
        return total

    def __call__(self, vectors: Any) -> tf.Tensor:
        """Project `(batch, n_params)` vectors to `(batch, k)` float32.

        Raises:
            ValueError: vectors whose width is not `n_params`.
        """
        vectors = tf.convert_to_tensor(vectors)
        if vectors.shape.rank != 2 or int(vectors.shape[1]) != self.n_params:
            raise ValueError(
                f"`vectors` must have shape (batch, {self.n_params}) for this projection. "
                f"Received shape {tuple(vectors.shape)}"
            )
        return self._project(vectors)

    def matrix(self) -> tf.Tensor:
        """The whole `R / sqrt(k)`, `(n_params, k)`: for tests on small problems only."""
        return tf.concat([self.block(b) for b in range(self.n_blocks)], axis=0)[: self.n_params]
