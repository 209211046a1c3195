"""K-FAC and EK-FAC inverse-Hessian-vector products over every watched layer of a whole model.

The curvature is block-diagonal across layers. Each factorable layer's block is
`(Q_A (x) Q_S) diag(Lambda + lambda_L) (Q_A (x) Q_S)^T` (see
`vestigia.curvature.kronecker_factors`), so for a vector `V` reshaped to the layer's `(in, out)`
matrix (kernel rows, then the bias row)

    H^-1 V = Q_A [(Q_A^T V Q_S) / (Lambda + lambda_L)] Q_S^T,

and every other watched weight gets `v / (E[g^2] + lambda)`. The Fisher is the *true* Fisher by
default (labels drawn from the model's predictive distribution with a fixed seed; for the
losses of `vestigia.gradients.fisher_labels` it is the Gauss-Newton matrix of the mean training
loss), or the empirical Fisher (`fisher="empirical"`, the given labels). Damping:
`lambda_L = damping_fraction * mean(Lambda_L)` per layer (default 0.1), or `damping` for all.

Factors cost one pass over the training data (K-FAC) or two (EK-FAC: covariances, then the
eigenvalue refit, over every batch or, with `refit_fraction < 1`, an evenly spaced share);
with `factors_path` they are saved with the fingerprint of the model's weights, the layers, the
data and the settings, and loaded (refusing a mismatch) next time.
`factored_scoring()` scores without forming `(n, n_params)` gradients (see
`vestigia.curvature.kronecker_scoring`); `FirstOrderInfluenceCalculator` uses it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature import conv_covariance
from vestigia.curvature.base import InverseHessianVectorProduct
from vestigia.curvature.factor_file import load_factors, save_factors
from vestigia.curvature.kronecker_factors import (
    LayerFactors,
    batch_covariances,
    damped_power,
    eigenbasis,
    layer_damping,
    precondition,
    summed_squares,
)
from vestigia.curvature.kronecker_scoring import KroneckerScoring
from vestigia.data.dataset import Batch, iterate_batches
from vestigia.errors import InvalidDataError, check_fraction, check_non_negative, check_positive_int
from vestigia.gradients.fisher_labels import FISHERS, batch_seed, supports_sampling, unweighting
from vestigia.gradients.layer_capture import Captured, LayerCapture
from vestigia.gradients.layer_kinds import LayerSpec
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.progress import known_length, track
from vestigia.store import fingerprint


def batch_weights(batch: Batch) -> tf.Tensor:
    """The batch's sample weights `(batch,)` float32 (ones when it has none)."""
    return tf.ones([batch.size], tf.float32) if batch.weights is None else tf.cast(batch.weights, tf.float32)


def refit_selects(index: int, fraction: float) -> bool:
    """Whether batch `index` is in the evenly spaced `fraction` of batches that starts at batch 0
    (a systematic sample, every `1/f`-th batch): `ceil((i + 1) f) > ceil(i f)`, with a margin
    of 1e-9 against rounding at whole numbers."""
    return fraction >= 1.0 or np.ceil((index + 1) * fraction - 1e-9) > np.ceil(index * fraction - 1e-9)


def _summed_patch_covariances(spec: LayerSpec, calls: list[tf.Tensor], scale: tf.Tensor) -> tf.Tensor:
    """`sum_i sum_t a a^T / T` over every call of a stride-1 conv layer (see `conv_covariance`)."""
    parts = [conv_covariance.patch_covariance(spec, x, scale) for x in calls]
    return tf.add_n([matrix for matrix, _ in parts]) / float(sum(positions for _, positions in parts))


class ParameterLayout:
    """Maps the flat watched-parameter vector `(m, n_params)` to per-layer `(m, in, out)` matrices."""

    def __init__(self, variables: list[Any], specs: list[LayerSpec], others: list[Any]) -> None:
        self.offsets: dict[int, tuple[int, int]] = {}
        start = 0
        for v in variables:
            size = int(np.prod(v.shape))
            self.offsets[id(v)] = (start, start + size)
            start += size
        self.n_params = start
        self.specs, self.others = specs, others

    def _slice(self, vectors: np.ndarray, variable: Any) -> np.ndarray:
        start, stop = self.offsets[id(variable)]
        return vectors[:, start:stop]

    def to_matrices(self, vectors: np.ndarray, spec: LayerSpec) -> np.ndarray:
        """The layer's part of `vectors` as `(m, in, out)` (kernel in grouped order, bias row last)."""
        m = vectors.shape[0]
        kernel = self._slice(vectors, spec.kernel)
        if spec.equation is not None:
            grouped = kernel.reshape([m] + [int(s) for s in spec.kernel.shape])
            grouped = np.transpose(grouped, [0] + [1 + int(p) for p in np.argsort(spec.kernel_axes)])
            kernel = grouped.reshape(m, -1)
        matrix = kernel.reshape(m, -1, spec.n_out)
        if spec.has_bias:
            matrix = np.concatenate([matrix, self._slice(vectors, spec.bias)[:, None, :]], axis=1)
        return matrix

    def write_matrices(self, out: np.ndarray, matrices: np.ndarray, spec: LayerSpec) -> None:
        """Inverse of `to_matrices`: write `(m, in, out)` into the flat rows `out`."""
        parts = spec.kernel_gradient(tf.constant(matrices))
        for variable, part in zip(spec.variables, parts):
            start, stop = self.offsets[id(variable)]
            out[:, start:stop] = part.numpy()

    def other_slice(self, vectors: np.ndarray, variable: Any) -> np.ndarray:
        return self._slice(vectors, variable)

    def write_other(self, out: np.ndarray, values: np.ndarray, variable: Any) -> None:
        start, stop = self.offsets[id(variable)]
        out[:, start:stop] = values


QUERY_DTYPES = ("float32", "bfloat16")
"""Precisions of the queries held by `factored_scoring` (see `KroneckerIHVP`'s `query_dtype`)."""


class KroneckerIHVP(InverseHessianVectorProduct):
    """Shared machinery of `KFACIHVP` and `EKFACIHVP` (use those).

    Args:
        influence_model: the model; every watched weight is covered (Kronecker factors for
            `Dense`, `EinsumDense`, `Conv1D`, `Conv2D`, `Embedding`; a diagonal for the rest).
        train_dataset: batched training data defining the Fisher.
        damping: one absolute damping for every layer (>= 0), or None for
            `damping_fraction * mean eigenvalue` per layer.
        damping_fraction: see `damping` (default 0.1).
        fisher: "true" (labels sampled from the model, seeded) or "empirical" (given labels).
        seed: seed of the sampled labels.
        query_rank: if set, `factored_scoring` keeps a rank-`query_rank` SVD of each query's
            preconditioned gradient per layer instead of the full matrix.
        query_dtype: "float32" (default) or "bfloat16": `factored_scoring` holds the queries'
            preconditioned gradients in bfloat16 (half the memory) and pairs them by bfloat16
            GEMMs (about twice as fast on CPUs with AVX512-BF16); each layer's scores carry a
            relative rounding error of about `2^-9`, summed over layers in float32. An opt-in
            approximation for many queries on a large model: its fidelity to float32 is measured
            in `benchmarks/whole_model.py --fidelity-dtype`.
        factors_path: `.npz` file: loaded (if it exists and its fingerprint matches) or written.
        regularization: add the watched weights' own L2 regularizers (default True, as every
            solver): a layer's `R` (over its `(in, out)` matrix) enters as the diagonal of
            `(Q_A (x) Q_S)^T diag(vec R) (Q_A (x) Q_S)`, `(Q_A^2)^T R Q_S^2`, exact when `R` is
            uniform over the layer (e.g. an L2 on a kernel without bias); other weights add `r`.
    """

    corrected = False
    refit_fraction = 1.0

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any,
        damping: float | None = None,
        damping_fraction: float = 0.1,
        fisher: str = "true",
        seed: int = 0,
        query_rank: int | None = None,
        factors_path: str | os.PathLike[str] | None = None,
        regularization: bool = True,
        query_dtype: str = "float32",
    ) -> None:
        super().__init__(influence_model, train_dataset, 0.0, regularization)
        if query_dtype not in QUERY_DTYPES:
            raise ValueError(f"`query_dtype` must be one of {QUERY_DTYPES}. Received: query_dtype={query_dtype!r}")
        self.query_dtype = query_dtype
        self.damping_value = None if damping is None else check_non_negative("damping", damping)
        self.damping_fraction = check_non_negative("damping_fraction", damping_fraction)
        if fisher not in FISHERS:
            raise ValueError(f"`fisher` must be one of {FISHERS}. Received: fisher={fisher!r}")
        loss = influence_model.loss_function
        if fisher == "true" and not supports_sampling(loss):
            warnings.warn(
                f"No label sampling for the loss {type(loss).__name__}: the empirical Fisher (given labels) is "
                "used instead of the true Fisher. Pass fisher='empirical' to silence this.",
                UserWarning,
                stacklevel=3,
            )
            fisher = "empirical"
        self.fisher = fisher
        self.seed = int(seed)
        self.query_rank = None if query_rank is None else check_positive_int("query_rank", query_rank)
        self.capture = LayerCapture(influence_model.model, loss, influence_model.weights)
        self.layout = ParameterLayout(influence_model.weights, self.capture.specs, self.capture.others)
        self.layers: list[LayerFactors] = []
        self.diagonals: list[tuple[np.ndarray, float]] = []
        if self.train_dataset is None:
            raise InvalidDataError("`train_dataset` is required to fit Kronecker factors. Received: train_dataset=None")
        settings = {
            "method": type(self).__name__,
            "fisher": fisher,
            "seed": self.seed,
            "damping": self.damping_value,
            "damping_fraction": self.damping_fraction,
            "layers": [[s.name, s.kind, s.n_in, s.n_out] for s in self.capture.specs],
        }
        if self.refit_fraction < 1.0:
            settings["refit_fraction"] = self.refit_fraction
        if factors_path is not None and os.path.exists(factors_path):
            expected = fingerprint(influence_model, self.train_dataset, settings)
            self.layers, self.diagonals = load_factors(
                factors_path, expected, len(self.capture.specs), len(self.capture.others)
            )
        else:
            self._fit()
            if factors_path is not None:
                save_factors(
                    factors_path,
                    self.layers,
                    self.diagonals,
                    fingerprint(influence_model, self.train_dataset, settings),
                )
        self._add_regularization()

    def _add_regularization(self) -> None:
        """Fold `regularization_diagonal` into the eigenvalues (see `regularization`; the saved
        factors hold the data's curvature only)."""
        r = self.regularization_diagonal
        if r is None:
            return
        for spec, factors in zip(self.capture.specs, self.layers):
            matrix = self.layout.to_matrices(r[None, :], spec)[0]
            if matrix.any():
                rotated_in = matrix if factors.q_in is None else (factors.q_in**2).T @ matrix
                factors.eigenvalues = factors.eigenvalues + rotated_in @ factors.q_out**2
        self.diagonals = [
            (diagonal + self.layout.other_slice(r[None, :], v)[0], damping)
            for v, (diagonal, damping) in zip(self.capture.others, self.diagonals)
        ]

    # -- fitting -------------------------------------------------------------------------------

    def _passes(self, reducer: Any, fraction: float = 1.0) -> Any:
        """Yield `reducer(captured)` per training batch (only those `refit_selects(i, fraction)`),
        with sampled labels for the true Fisher.

        The curvature is the *weighted mean* `(1/n) sum_i w_i F_i` (as `H` weighs the losses),
        while the captured gradients of `w_i l_i` carry `w_i`: they are divided by `sqrt(w_i)`, so
        that their second moments carry `w_i` once. The reducer also gets the weights `(batch,)`.
        """
        sampled = self.fisher == "true"

        def rescaled(captured: Captured, weights: tf.Tensor) -> Any:
            scale = unweighting(weights)
            deltas = [d * scale[:, None, None] for d in captured.deltas]
            others = [g * scale[:, None] for g in captured.others]
            return reducer(captured._replace(deltas=deltas, others=others), weights)

        run = self.capture.traced(rescaled, sampled=sampled)
        batches = iterate_batches(self.train_dataset, self.model.process_batch_for_loss_fn, "train_dataset")
        total = known_length(self.train_dataset)
        for index, batch in enumerate(track(batches, "Kronecker factors (batches)", total)):
            if not refit_selects(index, fraction):
                continue
            weights = batch_weights(batch)
            args = [batch.inputs, batch.targets, weights]
            if sampled:
                args.append(batch_seed(self.seed, index))
            yield batch.size, run(*args, weights)

    def _fit(self) -> None:
        specs = self.capture.specs
        diagonal_input = [s.diagonal_input for s in specs]

        def covariances(captured: Captured, weights: tf.Tensor) -> Any:
            # A = sum_i w_i a a^T / sum_i w_i, S = sum_i w_i d d^T / n: A (x) S is the weighted mean
            squares = [tf.reduce_sum(tf.square(g), axis=0) for g in captured.others]
            root = tf.sqrt(weights)
            inputs = [a * root[:, None, None] for a in captured.inputs]
            # stride-1 convolutions: from shifted products of the layer input, no patches
            # (their `inputs` are then unused and not computed in the traced graph)
            known = [
                _summed_patch_covariances(s, calls, root) if conv_covariance.applies(s) else None
                for s, calls in zip(specs, captured.layer_inputs)
            ]
            covs = batch_covariances(inputs, captured.deltas, diagonal_input, known)
            return covs, squares, tf.reduce_sum(weights)

        sums_in = [np.zeros(s.n_in if s.diagonal_input else (s.n_in, s.n_in)) for s in specs]
        sums_out = [np.zeros((s.n_out, s.n_out)) for s in specs]
        sums_other = [np.zeros(int(np.prod(v.shape))) for v in self.capture.others]
        n, total_weight = 0, 0.0
        for size, (covs, squares, weight) in self._passes(covariances):
            n += size
            total_weight += float(weight)
            for i, (cov_in, cov_out) in enumerate(covs):
                sums_in[i] += cov_in.numpy()
                sums_out[i] += cov_out.numpy()
            for i, square in enumerate(squares):
                sums_other[i] += square.numpy()
        bases = [eigenbasis(s.name, a / total_weight, d / n) for s, a, d in zip(specs, sums_in, sums_out)]
        eigenvalues = [kfac for _, _, kfac in bases]
        if self.corrected:
            eigenvalues = self._refit_eigenvalues(bases)
        self.layers = [
            LayerFactors(s.name, q_in, q_out, lam, layer_damping(lam, self.damping_value, self.damping_fraction))
            for s, (q_in, q_out, _), lam in zip(specs, bases, eigenvalues)
        ]
        self.diagonals = []
        for v, total in zip(self.capture.others, sums_other):
            diagonal = total / n
            if not np.isfinite(diagonal).all():
                eigenbasis(v.path, diagonal, np.zeros((1, 1)))  # raises, naming the weight
            self.diagonals.append((diagonal, layer_damping(diagonal, self.damping_value, self.damping_fraction)))

    def _refit_eigenvalues(self, bases: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """EK-FAC: `Lambda = E_i[(Q_A^T G_i Q_S)^2]` per layer (a second pass), the mean over the
        examples of the batches `refit_selects`."""
        rotations = [
            (None if q_in is None else tf.constant(q_in, tf.float32), tf.constant(q_out, tf.float32))
            for q_in, q_out, _ in bases
        ]

        def squares(captured: Captured, weights: tf.Tensor) -> Any:
            return [
                summed_squares(a, d, q_in, q_out)
                for a, d, (q_in, q_out) in zip(captured.inputs, captured.deltas, rotations)
            ]

        totals = [np.zeros_like(kfac) for _, _, kfac in bases]
        n = 0
        for size, parts in self._passes(squares, self.refit_fraction):
            n += size
            for i, part in enumerate(parts):
                totals[i] += part.numpy()
        result = [total / n for total in totals]
        for spec, lam in zip(self.capture.specs, result):
            if not np.isfinite(lam).all():
                eigenbasis(spec.name, np.zeros(1), lam)  # raises, naming the layer
        return result

    # -- the solver interface ------------------------------------------------------------------

    def _apply(self, vectors: Any, power: float) -> tf.Tensor:
        array = self._check_vectors(vectors)
        out = np.zeros_like(array)
        for spec, factors in zip(self.capture.specs, self.layers):
            matrices = precondition(factors, self.layout.to_matrices(array, spec), power)
            self.layout.write_matrices(out, matrices, spec)
        for v, (diagonal, damping) in zip(self.capture.others, self.diagonals):
            self.layout.write_other(out, self.layout.other_slice(array, v) * damped_power(diagonal, damping, power), v)
        return tf.constant(out, tf.float32)

    def solve(self, vectors: Any) -> tf.Tensor:
        """`H^-1 v` per row, block by block: `Q_A [(Q_A^T V Q_S) / (Lambda + lambda)] Q_S^T`."""
        return self._apply(vectors, -1.0)

    def hvp(self, vectors: Any) -> tf.Tensor:
        """`H v` per row with the (damped) Kronecker-factored curvature."""
        return self._apply(vectors, 1.0)

    def factored_scoring(self) -> KroneckerScoring:
        """The scoring pairing that never forms `(n, n_params)` gradients (see `KroneckerScoring`)."""
        return KroneckerScoring(self)


class KFACIHVP(KroneckerIHVP):
    """K-FAC: `H ~ A (x) S` per layer, eigenvalues `alpha sigma^T`. One pass over the data.

    Arguments as for `KroneckerIHVP`.

    References:
        Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
        curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
        for convolution layers", ICML 2016.
    """


class EKFACIHVP(KroneckerIHVP):
    """EK-FAC: K-FAC's eigenbasis, eigenvalues refitted to `E_i[(Q_A^T G_i Q_S)^2]`. Two passes.

    Arguments as for `KroneckerIHVP`, and:
        refit_fraction: the share of training batches whose per-example gradients refit the
            eigenvalues, evenly spaced from the first batch (every `1/f`-th; default 1.0: all,
            the exact EK-FAC). The refit is then the same mean over a systematic subsample: its
            pass costs `f` as much (on a wide conv layer the refit's rotations, `T in^2` per
            example, are the largest cost of the factors). The covariances and the eigenbasis
            always use every batch.

    References:
        George et al., "Fast approximate natural gradient descent in a Kronecker-factored
        eigenbasis", NeurIPS 2018; Grosse et al., "Studying large language model generalization
        with influence functions", 2023.
    """

    corrected = True

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        train_dataset: Any,
        *args: Any,
        refit_fraction: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.refit_fraction = check_fraction("refit_fraction", refit_fraction)
        super().__init__(influence_model, train_dataset, *args, **kwargs)
