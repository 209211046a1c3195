"""Influence scores with Kronecker-factored curvature, without `(n, n_params)` gradients.

For one layer, with the per-example gradient `G = sum_t a_t d_t^T` `(in, out)` and
`P_q = H^-1 G_q = Q_A [(Q_A^T G_q Q_S) / (Lambda + lambda)] Q_S^T` the preconditioned query
gradient, the first-order influence of training example `z` on query `q` is

    value(q, z) = sum_L <P_q, G_z>   (+ sum over diagonal weights of g_q g_z / (D + lambda)).

Both sides are tuples with one tensor per block (per layer, then per other weight), never
concatenated into one `(rows, n_params)` tensor: the training side's temporaries stay the size of
one layer's gradients.

* Test side: `P_q` per layer, flattened (`(n_test, in * out)`), or with `query_rank = r` its
  rank-`r` SVD `U S V^T`, kept as `[U S, V]` `(n_test, r * (in + out))`.
* Training side, per training batch (once, whatever the number of queries): per layer the
  per-example gradient `G_z = A_z^T D_z` flattened (`(batch, in * out)`, the cost of the layer's
  forward pass), then the other weights' gradients; with `query_rank` and one position (`T = 1`,
  a Dense layer on vectors) the factors `[a, d]` (`(batch, in + out)`) instead.
* Pairing, per training batch and chunk of queries: full rank, per layer one GEMM
  `(n_test, in * out) x (in * out, batch)`, summed (`n_test * n_params` multiply-adds per
  training example, the floor of full-rank queries). Low rank, per layer: with `T = 1`,
  `<U S V^T, a d^T> = sum_r (a^T u_r s_r)(d^T v_r)` (no `(in, out)` matrix at all); otherwise the
  queries' `(in, out)` matrices are formed a chunk of queries at a time (at most
  `QUERY_CHUNK_BYTES`) and contracted with `G_z`.
* Self-influence: `g^T H^-1 g = sum_jk (Q_A^T G Q_S)_jk^2 / (Lambda_jk + lambda)`, with one
  position `((a~^2)^T W (d~^2))`, no per-example matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature.kronecker_factors import damped_power, flat_matmul, rotated_gradients, weighted_squares
from vestigia.data.dataset import Batch, iterate_batches
from vestigia.gradients.layer_capture import Captured

QUERY_CHUNK_BYTES = 256 * 2**20
"""Bound on the rank-r queries' full `(in, out)` matrices formed at once per layer (float32)."""

Side = tuple[tf.Tensor, ...]
"""One side of a batch: one tensor `(rows, width)` per block (layer, then other weight)."""


class KroneckerScoring:
    """The factored scoring pairing of a fitted `KroneckerIHVP` (see the module docstring).

    Args:
        solver: a fitted `KFACIHVP` or `EKFACIHVP`.
    """

    def __init__(self, solver: Any) -> None:
        self.capture = solver.capture
        self.rank = solver.query_rank
        self.dtype = tf.as_dtype(solver.query_dtype)
        self._q_in = [None if f.q_in is None else tf.constant(f.q_in, tf.float32) for f in solver.layers]
        self._q_out = [tf.constant(f.q_out, tf.float32) for f in solver.layers]
        self._inverse = [tf.constant(damped_power(f.eigenvalues, f.damping, -1.0), tf.float32) for f in solver.layers]
        self._other_inverse = [tf.constant(damped_power(d, lam, -1.0), tf.float32) for d, lam in solver.diagonals]
        self._ranks = [None if self.rank is None else min(self.rank, s.n_in, s.n_out) for s in self.capture.specs]
        self.widths = [
            s.n_in * s.n_out if r is None else r * (s.n_in + s.n_out) for s, r in zip(self.capture.specs, self._ranks)
        ] + [int(np.prod(v.shape)) for v in self.capture.others]
        # low rank: which layers have one position (static shape), known once a training side is traced
        self._one_position: list[bool] | None = None
        self._probe_data = (solver.train_dataset, solver.model.process_batch_for_loss_fn)
        self._test = self.capture.traced(self._test_reducer)
        self._train = self.capture.traced(self._train_reducer)
        self._self = self.capture.traced(self._self_reducer)
        test_spec = tuple(tf.TensorSpec([None, None], self.dtype) for _ in self.widths)
        train_spec = tuple(tf.TensorSpec([None, None], tf.float32) for _ in self.widths)
        self._low_rank_pairs = tf.function(self._low_rank_pair, input_signature=[test_spec, train_spec])

    @staticmethod
    def _args(batch: Batch) -> list[Any]:
        weights = tf.ones([batch.size], tf.float32) if batch.weights is None else tf.cast(batch.weights, tf.float32)
        return [batch.inputs, batch.targets, weights]

    def test_side(self, batch: Batch) -> Side:
        """Preconditioned query gradients of a raw batch, one `(batch, widths[j])` per block (in
        `dtype`)."""
        return tuple(self._test(*self._args(batch)))

    def train_side(self, batch: Batch) -> Side:
        """Training gradients of a raw batch, one tensor per block: per layer `G_z` flattened
        `(batch, in * out)`, or `[a, d]` for a layer with one position and low-rank queries;
        then the other weights' `(batch, size)`."""
        return tuple(self._train(*self._args(batch)))

    def pack(self, side: Side) -> np.ndarray:
        """A training side as one array `(batch, width)` (for `store=`)."""
        return np.concatenate([np.asarray(block) for block in side], axis=1)

    def unpack(self, packed: np.ndarray) -> Side:
        """The inverse of `pack`."""
        return tuple(tf.split(tf.constant(packed), self._train_widths(), axis=1))

    def pair(self, test_sides: list[Side], train_side: Side) -> np.ndarray:
        """Scores `(n_test, batch)` of chunks of test sides (stacked) against a training side.
        Full rank: layer by layer, the layer's training gradients are transposed once and every
        chunk's `(rows, in * out) x (in * out, batch)` GEMM runs on contiguous rows of both
        (faster on CPU than a `transpose_b` product); one layer's transpose exists at a time."""
        if self.rank is None:
            scores: list[Any] = [0.0] * len(test_sides)
            for j, block in enumerate(train_side):
                columns = tf.transpose(tf.cast(block, self.dtype))
                scores = [
                    total + tf.cast(tf.matmul(side[j], columns), tf.float32) for total, side in zip(scores, test_sides)
                ]
            return np.concatenate([np.asarray(total) for total in scores], axis=0)
        self._train_widths()
        return np.concatenate([self._low_rank_pairs(side, train_side).numpy() for side in test_sides], axis=0)

    def _train_widths(self) -> list[int]:
        """Width of each block of a training side (low rank: traces one batch if none was)."""
        if self._one_position is None:
            if self.rank is None:
                self._one_position = [False] * len(self.capture.specs)
            else:  # training sides read from a store: trace one batch
                dataset, process = self._probe_data
                self.train_side(next(iterate_batches(dataset.take(1), process)))
        assert self._one_position is not None
        return [
            s.n_in + s.n_out if one else s.n_in * s.n_out for s, one in zip(self.capture.specs, self._one_position)
        ] + self.widths[len(self.capture.specs) :]

    def self_influence(self, batch: Batch) -> np.ndarray:
        """`g^T H^-1 g` per example of a raw batch, `(batch,)`."""
        return self._self(*self._args(batch)).numpy()

    # -- traced code ---------------------------------------------------------------------------

    def _preconditioned(self, i: int, a: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
        """`Q_A [(Q_A^T G Q_S) / (Lambda + lambda)] Q_S^T` per example, `(batch, in, out)`, by large GEMMs."""
        rotated = rotated_gradients(a, d, self._q_in[i], self._q_out[i]) * self._inverse[i]
        back = flat_matmul(rotated, tf.transpose(self._q_out[i]))
        if self._q_in[i] is None:
            return back
        return tf.transpose(flat_matmul(tf.transpose(back, [0, 2, 1]), tf.transpose(self._q_in[i])), [0, 2, 1])

    def _test_reducer(self, captured: Captured) -> list[tf.Tensor]:
        batch = tf.shape(captured.losses)[0]
        parts = []
        for i, (a, d) in enumerate(zip(captured.inputs, captured.deltas)):
            matrix = self._preconditioned(i, a, d)
            rank = self._ranks[i]
            if rank is None:
                parts.append(tf.reshape(matrix, [batch, -1]))
                continue
            singular, left, right = tf.linalg.svd(matrix)
            scaled_left = tf.reshape(left[:, :, :rank] * singular[:, None, :rank], [batch, -1])
            parts.append(tf.concat([scaled_left, tf.reshape(right[:, :, :rank], [batch, -1])], axis=1))
        parts += [g * inverse for g, inverse in zip(captured.others, self._other_inverse)]
        return [tf.cast(part, self.dtype) for part in parts]

    def _train_reducer(self, captured: Captured) -> list[tf.Tensor]:
        batch = tf.shape(captured.losses)[0]
        self._one_position = [self.rank is not None and a.shape[1] == 1 for a in captured.inputs]
        parts = [
            tf.concat([a[:, 0], d[:, 0]], axis=1)
            if factors
            else tf.reshape(tf.matmul(a, d, transpose_a=True), [batch, -1])
            for factors, a, d in zip(self._one_position, captured.inputs, captured.deltas)
        ]
        return parts + list(captured.others)

    def _low_rank_pair(self, columns: Side, rows: Side) -> tf.Tensor:
        assert self._one_position is not None
        specs = self.capture.specs
        columns = tuple(tf.cast(column, tf.float32) for column in columns)
        n_test = tf.shape(columns[0])[0]
        scores = tf.zeros([n_test, tf.shape(rows[0])[0]], tf.float32)
        for i, (spec, rank, one) in enumerate(zip(specs, self._ranks, self._one_position)):
            if rank is None:
                scores += tf.matmul(columns[i], rows[i], transpose_b=True)
                continue
            left, right = tf.split(columns[i], [rank * spec.n_in, rank * spec.n_out], axis=1)
            left = tf.reshape(left, [n_test, spec.n_in, rank])
            right = tf.reshape(right, [n_test, spec.n_out, rank])
            if one:
                a, d = tf.split(rows[i], [spec.n_in, spec.n_out], axis=1)
                projected_a = tf.einsum("bi,qir->qbr", a, left)
                projected_d = tf.einsum("bo,qor->qbr", d, right)
                scores += tf.reduce_sum(projected_a * projected_d, axis=2)
            else:
                scores += self._low_rank_scores(left, right, rows[i], spec.n_in * spec.n_out)
        for j in range(len(specs), len(self.widths)):
            scores += tf.matmul(columns[j], rows[j], transpose_b=True)
        return scores

    def _low_rank_scores(self, left: tf.Tensor, right: tf.Tensor, gradient: tf.Tensor, width: int) -> tf.Tensor:
        """`<U_q S_q V_q^T, G_z>` `(n_test, batch)` for rank-r queries `left` `(n_test, in, r)`,
        `right` `(n_test, out, r)` and training gradients `(batch, in * out)`: the queries' full
        matrices are formed `chunk` at a time, so at most `QUERY_CHUNK_BYTES` of them exist."""
        chunk = max(1, QUERY_CHUNK_BYTES // (4 * width))
        n_test = tf.shape(left)[0]

        def block(index: tf.Tensor, blocks: tf.TensorArray) -> tuple[tf.Tensor, tf.TensorArray]:
            start = index * chunk
            stop = tf.minimum(start + chunk, n_test)
            query = tf.matmul(left[start:stop], right[start:stop], transpose_b=True)
            scores = tf.matmul(tf.reshape(query, [stop - start, width]), gradient, transpose_b=True)
            return index + 1, blocks.write(index, scores)

        count = (n_test + chunk - 1) // chunk
        blocks = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=[None, None])
        _, blocks = tf.while_loop(lambda index, _: index < count, block, [tf.constant(0), blocks])
        return tf.reshape(blocks.concat(), [n_test, tf.shape(gradient)[0]])

    def _self_reducer(self, captured: Captured) -> tf.Tensor:
        total = tf.zeros_like(captured.losses)
        for i, (a, d) in enumerate(zip(captured.inputs, captured.deltas)):
            total += weighted_squares(a, d, self._q_in[i], self._q_out[i], self._inverse[i])
        for g, inverse in zip(captured.others, self._other_inverse):
            total += tf.reduce_sum(tf.square(g) * inverse, axis=1)
        return total
