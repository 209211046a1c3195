"""First-order influence functions (Koh & Liang 2017), RelatIF, and first-order groups.

`value(z_test, z) = g_test^T H^-1 g_z`: positive means `z` is a proponent (upweighting it
lowers the test loss). Removing `z` from `n` training examples changes the test loss by about
`+value / n`. Self-influence `g_z^T H^-1 g_z` ranks suspicious examples.
RelatIF (Barshan et al. 2020, `normalize=True`) divides by `||H^-1 g_z||`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.curvature import registry
from vestigia.curvature.base import InverseHessianVectorProduct
from vestigia.data.blocks import rows_within
from vestigia.data.dataset import Batch, as_batched_dataset, iterate_batches
from vestigia.errors import InvalidDataError, check_positive_int
from vestigia.methods.engine import BaseInfluenceCalculator
from vestigia.methods.score_checks import check_finite_result
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model


def hessian_dataset(
    dataset: tf.data.Dataset, n_samples: int | None, shuffle_buffer_size: int, seed: int = 0
) -> tf.data.Dataset:
    """The data defining `H`: all of `dataset`, or `n_samples` examples drawn with a fixed seed."""
    if n_samples is None:
        return dataset
    n_samples = check_positive_int("n_samples_for_hessian", n_samples)
    batch_size = int(tf.shape(tf.nest.flatten(next(iter(dataset)))[0])[0])
    return (
        dataset.unbatch()
        .shuffle(
            check_positive_int("shuffle_buffer_size", shuffle_buffer_size), seed=seed, reshuffle_each_iteration=False
        )
        .take(n_samples)
        .batch(batch_size)
    )


def build_ihvp(
    model: BaseInfluenceModel,
    dataset: tf.data.Dataset,
    ihvp_calculator: Any,
    n_samples_for_hessian: int | None,
    shuffle_buffer_size: int,
    **ihvp_options: Any,
) -> InverseHessianVectorProduct:
    """The solver an influence calculator uses: an instance as given, or one built on `dataset`
    (or on `n_samples_for_hessian` examples of it) from a name, enum or class."""
    if isinstance(ihvp_calculator, InverseHessianVectorProduct):
        return ihvp_calculator
    data = hessian_dataset(dataset, n_samples_for_hessian, shuffle_buffer_size)
    return registry.get(ihvp_calculator, model, data, **ihvp_options)


def example_gradients(model: BaseInfluenceModel, batch: Batch) -> tf.Tensor:
    """Per-example gradients `(batch, n_params)` of a raw batch."""
    return model.example_gradients(batch)[1]


def summed_gradient(model: BaseInfluenceModel, group: Any, name: str) -> tuple[tf.Tensor, int]:
    """`sum_{z in group} g_z` as `(1, n_params)`, and the true group size."""
    total, count = None, 0
    for batch in iterate_batches(as_batched_dataset(group, name), model.process_batch_for_loss_fn, name):
        summed = tf.reduce_sum(example_gradients(model, batch), axis=0, keepdims=True)
        total = summed if total is None else total + summed
        count += batch.size
    if total is None:
        raise InvalidDataError(f"`{name}` is empty.")
    return total, count


class FirstOrderInfluenceCalculator(BaseInfluenceCalculator):
    """Influence functions `g_test^T H^-1 g_z`, RelatIF with `normalize=True`, first-order groups.

    Args:
        model: the `InfluenceModel`.
        dataset: batched training data (defines `H` unless a solver instance is given).
        ihvp_calculator: "exact", "cgd" ("cg"), "lissa", "kfac", "ekfac", an `IHVPCalculator`, a solver class or
            an instance (used as is; `n_samples_for_hessian` then has no effect).
        n_samples_for_hessian: build `H` on this many training examples.
        shuffle_buffer_size: shuffle buffer used to draw them.
        normalize: RelatIF: divide each training example's influence by `||H^-1 g_z||`.
        **ihvp_options: solver settings passed to a solver built here.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        dataset: Any,
        ihvp_calculator: Any = "exact",
        n_samples_for_hessian: int | None = None,
        shuffle_buffer_size: int = 10000,
        normalize: bool = False,
        **ihvp_options: Any,
    ) -> None:
        check_influence_model(model, "model")
        self.model = model
        self.train_set = as_batched_dataset(dataset, "dataset")
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.ihvp_calculator = build_ihvp(
            model,
            self.train_set,
            ihvp_calculator,
            n_samples_for_hessian,
            shuffle_buffer_size,
            **ihvp_options,
        )
        self.normalize = bool(normalize)
        # Solvers with a factored pairing (K-FAC / EK-FAC) score without (n, n_params) gradients.
        factored = getattr(self.ihvp_calculator, "factored_scoring", None)
        self._factored = factored() if factored is not None and not self.normalize else None

    def _block_rows(self, extra_width: int = 0) -> int | None:
        """Blocks where the head has a closed form and the solver pairs plain gradients: the
        gradients, their solves and the scores of a block within `BLOCK_BYTES`."""
        rows = self.model.block_rows()
        if rows is None or self._factored is not None:
            return None
        return min(rows, rows_within(4 * (3 * self.model.nb_params + extra_width)))

    def _gradients(self, batch: Batch) -> tf.Tensor:
        return example_gradients(self.model, batch)

    def _summed_gradient(self, group: Any, name: str) -> tuple[tf.Tensor, int]:
        return summed_gradient(self.model, group, name)

    def _normalized(self, ihvp: tf.Tensor) -> tf.Tensor:
        if not self.normalize:
            return ihvp
        norms = tf.norm(ihvp, axis=1, keepdims=True)
        return ihvp / tf.maximum(norms, 1e-30)

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`H^-1 g_z` (divided by its norm for RelatIF), `(batch, n_params)`."""
        return self._normalized(self.ihvp_calculator.solve(self._gradients(batch)))

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`g_test`, `(batch, n_params)`."""
        return self._gradients(batch)

    def _score_train_side(self, batch: Batch, component: int) -> tf.Tensor:
        if self._factored is not None:
            return self._factored.train_side(batch)
        return self._influence_vector(batch) if self.normalize else self._gradients(batch)

    def _score_test_side(self, batch: Batch, component: int) -> tf.Tensor:
        if self._factored is not None:
            return self._factored.test_side(batch)
        grads = self._gradients(batch)
        return grads if self.normalize else self.ihvp_calculator.solve(grads)

    def _paired_blocks(self, test_blocks: list[tf.Tensor], train_side: Any, component: int) -> np.ndarray:
        if self._factored is not None:
            return self._factored.pair(test_blocks, train_side)
        return super()._paired_blocks(test_blocks, train_side, component)

    def _packed_side(self, train_side: Any, component: int) -> np.ndarray:
        if self._factored is not None:
            return self._factored.pack(train_side)
        return super()._packed_side(train_side, component)

    def _unpacked_side(self, packed: np.ndarray, component: int) -> Any:
        if self._factored is not None:
            return self._factored.unpack(packed)
        return super()._unpacked_side(packed, component)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        if self._factored is not None:
            return self._factored.self_influence(batch)
        grads = self._gradients(batch)
        solved = np.asarray(self._normalized(self.ihvp_calculator.solve(grads)))
        return np.einsum("ij,ij->i", np.asarray(grads), solved)

    def compute_influence_vector_group(self, group: Any) -> tf.Tensor:
        """`H^-1 sum_{z in group} g_z` (normalised for RelatIF), shape `(1, n_params)`."""
        summed, _ = self._summed_gradient(group, "group")
        return check_finite_result(self._normalized(self.ihvp_calculator.solve(summed)), "The group's influence vector")

    def estimate_influence_values_group(self, group_train: Any, group_to_evaluate: Any = None) -> tf.Tensor:
        """`(sum_T g_t)^T H^-1 sum_U g_z`, shape `(1, 1)`: the sum of the pairwise values.

        With `group_to_evaluate=None`, the group's self-influence (`T = U`). Groups may differ
        in size and batching.
        """
        train_sum, _ = self._summed_gradient(group_train, "group_train")
        vector = self._normalized(self.ihvp_calculator.solve(train_sum))
        if group_to_evaluate is None:
            evaluated = train_sum
        else:
            evaluated, _ = self._summed_gradient(group_to_evaluate, "group_to_evaluate")
        return check_finite_result(tf.matmul(evaluated, vector, transpose_b=True), "The group influence value")
