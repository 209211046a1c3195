"""LoGra's factored projection (Choe et al. 2024): project a layer's inputs and output
gradients separately, so that the per-example gradient is never formed.

For a layer whose per-example kernel gradient is `G_i = sum_t a_it d_it^T` (`n_in x n_out`,
see `vestigia.gradients.layer_kinds`), with seeded random `P_in` (`k_in x n_in`) and `P_out`
(`k_out x n_out`), each scaled by `1 / sqrt(k)` like `RandomProjection`,

    P_in G_i P_out^T = sum_t (P_in a_it) (P_out d_it)^T,

which, flattened row-major, is `(P_in (x) P_out) vec(G_i)`: a Kronecker-structured random
projection of the layer's gradient computed from `(batch, T, k_in)` and `(batch, T, k_out)`
tensors only. A side whose width is not above its `k` is left unprojected (exact, cheaper).
Watched weights without a Kronecker form (normalisation scales, ...) keep their per-example
gradients, randomly projected together to at most `k_in * k_out` dimensions.

The features of one batch come from one pass of `kfac`'s `LayerCapture` (any Functional,
Sequential or subclassed model); `P_in` / `P_out` of layer `l` are drawn from the seed and `l`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import keras
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.errors import InvalidModelError, NonFiniteError, check_positive_int
from vestigia.gradients.layer_capture import Captured, LayerCapture
from vestigia.gradients.layer_kinds import LayerSpec
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.projection.random import KINDS, RandomProjection

DEFAULT_FACTOR_DIM = 16

_SEED_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class _ProjectedInputSpec(LayerSpec):
    """A `LayerSpec` whose captured inputs come projected, `(batch, T, k_in)`: `P_in a_t` without
    forming `a_t`. For a convolution, `P_in` reshaped to `(k_h, k_w, c_in, k_in)` is itself a
    convolution kernel, so the projected patches are one convolution of the layer input with
    `k_in` filters (same strides, dilation and padding); the unfolded patches never exist."""

    p_in: Any = None

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        if self.p_in is None:
            return super().input_rows(inputs)
        batch, k = tf.shape(inputs)[0], int(self.p_in.shape[1])
        if self.kind == "embedding":
            return tf.reshape(tf.gather(self.p_in, tf.cast(inputs, tf.int32)), [batch, -1, k])
        if self.kind != "conv":
            return tf.matmul(super().input_rows(inputs), self.p_in)
        layer = self.layer
        kernel_in = self.n_in - int(self.has_bias)
        filters = tf.reshape(self.p_in[:kernel_in], list(self.kernel.shape[:-1]) + [k])
        padding = layer.padding
        if padding == "causal":
            inputs = tf.pad(inputs, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0], [0, 0]])
            padding = "valid"
        x = tf.cast(inputs, tf.float32)
        rows = keras.ops.conv(x, filters, list(layer.strides), padding, "channels_last", layer.dilation_rate)
        rows = tf.reshape(rows, [batch, -1, k])
        return rows + self.p_in[kernel_in] if self.has_bias else rows


def _factor_matrix(n: int, k: int, kind: str, seed: int) -> tf.Tensor | None:
    """`P^T`, `(n, k)`, or None (identity) when `k >= n`."""
    if k >= n:
        return None
    return RandomProjection(n, k, kind=kind, seed=seed, block_size=n).matrix()


class FactoredProjection:
    """LoGra's per-layer factored projection of per-example gradients.

    Usable wherever a projection is taken: `TRAK(..., projection=FactoredProjection(model))`,
    `GradDot`, `GradCos`, `DataInf` (one block per layer), and the `LoGra` calculator.

    Args:
        model: the `InfluenceModel` whose watched weights are projected.
        k_in: rows of `P_in` (per layer, at most the layer's input width); default 16.
        k_out: rows of `P_out`; default 16.
        kind: "rademacher" or "gaussian" entries.
        seed: an integer; layer `l` uses seeds derived from `(seed, l)`.

    Attributes:
        output_blocks: feature width per captured layer (then one block for the other weights).
        k: the total feature width.

    Raises:
        ValueError: an unknown `kind`, or `k_in` / `k_out` below 1.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        k_in: int = DEFAULT_FACTOR_DIM,
        k_out: int = DEFAULT_FACTOR_DIM,
        kind: str = "rademacher",
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")
        self.k_in, self.k_out = check_positive_int("k_in", k_in), check_positive_int("k_out", k_out)
        self.kind, self.seed = kind, int(seed)
        capture = LayerCapture(model.model, model.loss_function, model.weights)
        self.layer_names = [spec.name for spec in capture.specs]
        self._shapes = [(spec.n_in, spec.n_out) for spec in capture.specs]
        self.inputs, self.outputs = [], []
        for index, (n_in, n_out) in enumerate(self._shapes):
            base = self.seed * _SEED_STRIDE + 2 * index
            self.inputs.append(_factor_matrix(n_in, self.k_in, kind, base))
            self.outputs.append(_factor_matrix(n_out, self.k_out, kind, base + 1))
        self.output_blocks = [min(self.k_in, i) * min(self.k_out, o) for i, o in self._shapes]
        n_others = sum(int(tf.size(v)) for v in capture.others)
        self.others = None
        if n_others:
            width = min(n_others, self.k_in * self.k_out)
            if width < n_others:
                self.others = RandomProjection(n_others, width, kind=kind, seed=self.seed * _SEED_STRIDE - 1)
            self.output_blocks.append(width)
        self.k = int(sum(self.output_blocks))
        self._runs: dict[int, Any] = {}
        self._runs[id(model)] = (model, self._traced(capture))

    def _traced(self, capture: LayerCapture, reducer: Any = None, sampled: bool = False) -> Any:
        """The capture pass with projected inputs (see `_ProjectedInputSpec`), then `reducer`
        (default `_reduce`)."""
        capture.specs = [
            _ProjectedInputSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(LayerSpec)}, p_in=p_in)
            for spec, p_in in zip(capture.specs, self.inputs)
        ]
        return capture.traced(self._reduce if reducer is None else reducer, sampled=sampled)

    def _run(self, model: BaseInfluenceModel) -> Any:
        """The traced capture-and-project pass for `model` (one per model and loss)."""
        entry = self._runs.get(id(model))
        if entry is None:
            capture = LayerCapture(model.model, model.loss_function, model.weights)
            shapes = [(spec.n_in, spec.n_out) for spec in capture.specs]
            if shapes != self._shapes:
                raise InvalidModelError(
                    f"This FactoredProjection was built for layers of shapes {self._shapes}; the model "
                    f"{model.model.name!r} has {shapes}. Build one per architecture."
                )
            entry = (model, self._traced(capture))
            self._runs[id(model)] = entry
        return entry[1]

    def _reduce(self, captured: Captured) -> tuple[tf.Tensor, tf.Tensor]:
        """`(losses, features (batch, k))` from one capture, inside the traced graph."""
        parts = []
        for a, d, p_out in zip(captured.inputs, captured.deltas, self.outputs):
            d = tf.cast(d, tf.float32)
            d = d if p_out is None else tf.einsum("bto,ok->btk", d, p_out)
            projected = tf.einsum("bti,bto->bio", a, d)
            parts.append(tf.reshape(projected, [tf.shape(projected)[0], -1]))
        if captured.others:
            others = tf.cast(tf.concat(captured.others, axis=1), tf.float32)
            parts.append(others if self.others is None else self.others._projected(others))
        return captured.losses, tf.concat(parts, axis=1)

    def traced_capture(self, model: BaseInfluenceModel, reducer: Any, sampled: bool = False) -> Any:
        """The capture pass of `model` with both sides projected, traced once, for passes other
        than the features' (LoGra's projected K-FAC factors): `reducer(captured, *extra)` gets per
        captured layer `inputs[l] = a P_in^T` `(batch, T, k_in)` and `deltas[l] = d P_out^T`
        `(batch, T, k_out)` (unprojected on a side not wider than its `k`), and in `others` one
        `(batch, width)` tensor, the other weights' per-example gradients projected to their block.
        The call signature is `LayerCapture.traced`'s (`sampled=True`: labels drawn from the model).

        Raises:
            InvalidModelError: `model`'s layers have other shapes than this projection's.
        """
        self._run(model)  # refuses another architecture
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights without a Kronecker form were named at construction
            capture = LayerCapture(model.model, model.loss_function, model.weights)

        def projected(captured: Captured, *extra: Any) -> Any:
            deltas = [
                d if p_out is None else tf.einsum("bto,ok->btk", tf.cast(d, tf.float32), p_out)
                for d, p_out in zip(captured.deltas, self.outputs)
            ]
            others = []
            if captured.others:
                flat = tf.cast(tf.concat(captured.others, axis=1), tf.float32)
                others = [flat if self.others is None else self.others._projected(flat)]
            return reducer(captured._replace(deltas=deltas, others=others), *extra)

        return self._traced(capture, projected, sampled)

    def project_batch(self, model: BaseInfluenceModel, batch: Batch) -> tuple[tf.Tensor, tf.Tensor]:
        """`(losses (batch,), features (batch, k))` of a raw batch for `model` (its loss).

        Raises:
            NonFiniteError: a loss or feature is NaN or Inf.
        """
        model.check_inputs(batch.inputs, batch.source)
        dtype = model.weights[0].dtype
        weights = tf.ones([batch.size], dtype) if batch.weights is None else tf.cast(batch.weights, dtype)
        losses, features = self._run(model)(batch.inputs, batch.targets, tf.reshape(weights, [-1]))
        if not bool(tf.reduce_all(tf.math.is_finite(features))) or not bool(tf.reduce_all(tf.math.is_finite(losses))):
            raise NonFiniteError(
                f"A batch of `{batch.source}` gives non-finite losses or projected gradients (NaN or Inf): check "
                "its inputs and labels, and the model's outputs."
            )
        return losses, features
