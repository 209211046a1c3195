"""Second-order group influence (Basu, You & Feizi 2020, "On second-order group influence functions").

Removing a group `U` of `|U| = p n` examples from the `n` training examples and retraining moves
the parameters by about

    I2(U) = c1 H^-1 g_U + c2 H^-1 H_U H^-1 g_U,
    c1 = (1 - 2p) / ((1 - p)^2 n),   c2 = 1 / ((1 - p)^2 n^2),

where `g_U = sum_{z in U} g_z`, `H_U = sum_{z in U} d^2 l_z / d theta^2` (the group's summed
Hessian, applied to a vector by summed Hessian-vector products: no per-example Hessian is
formed) and `H` is the damped mean training Hessian of the chosen solver. The first term is
the first-order group influence with a size correction, the second the pairwise interactions
within the group. On a quadratic loss with a group whose Hessian is proportional to `H`
(`H_U = p n H`), `I2(U) = H^-1 g_U / ((1 - p) n)`, which is the exact change on retraining.

Sign and scale. The group value is `(sum_{t in T} g_t)^T I2(U)`: to first order, the change
of the summed loss of `T` when `U` is removed (positive: `U` are proponents of `T`, as
everywhere in Vestigia). `FirstOrderInfluenceCalculator`'s group value has no `1/n`:
`(sum_T g_t)^T H^-1 g_U`. The documented rescaling multiplies by `n`
(`first_order_scale=True`): `n I2(U) = H^-1 g_U + O(p)`, which tends to the first-order group
vector as the group shrinks (`p -> 0`). For a group of one, the gap is
`-p^2/(1-p)^2 H^-1 g_z + p/(1-p)^2 H^-1 (d^2 l_z) H^-1 g_z`, of order `p = 1/n`.

Differences from the seed: `n` and `|U|` are the true numbers of examples (the seed counts
partial batches as full), every solver and its settings (damping, scale, ...) apply to both
inverse products, and groups of any size and batching fit in memory.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from vestigia.curvature.base import summed_hessian_products
from vestigia.data.dataset import as_batched_dataset, dataset_size
from vestigia.errors import InvalidDataError
from vestigia.methods.first_order import build_ihvp, summed_gradient
from vestigia.methods.score_checks import check_finite_result
from vestigia.model.influence_model import BaseInfluenceModel, check_influence_model


def basu_coefficients(group_size: int, n_train: int) -> tuple[float, float]:
    """`(c1, c2) = ((1 - 2p) / ((1 - p)^2 n), 1 / ((1 - p)^2 n^2))` with `p = group_size / n_train`.

    Raises:
        InvalidDataError: if the group is not smaller than the training set (`p >= 1`).
    """
    if not 0 < group_size < n_train:
        raise InvalidDataError(
            f"The group must hold at least one and fewer than all {n_train} training examples. "
            f"Received a group of {group_size} examples."
        )
    p = group_size / n_train
    shrink = (1.0 - p) ** 2
    return (1.0 - 2.0 * p) / (shrink * n_train), 1.0 / (shrink * n_train**2)


class GroupInfluenceTerms(NamedTuple):
    """The two terms of `I2(U)`, each `(1, n_params)` float64, and the group's true size."""

    additive: np.ndarray
    pairwise: np.ndarray
    group_size: int


class SecondOrderInfluenceCalculator:
    """Group influence with pairwise interactions (second order), for groups of any size.

    Args:
        model: the `InfluenceModel`.
        dataset: batched training data: its true size is `n`, and it defines `H` unless a
            solver instance is given.
        ihvp_calculator: "exact", "cgd" ("cg"), "lissa", an `IHVPCalculator`, a solver class or
            an instance (used as is; `n_samples_for_hessian` then has no effect).
        n_samples_for_hessian: build `H` on this many training examples (`n` stays the size
            of `dataset`).
        shuffle_buffer_size: shuffle buffer used to draw them.
        **ihvp_options: solver settings (`damping`, `n_opt_iters`, `scale`, ...) for a solver built here.

    Attributes:
        n_train: the true number of training examples `n`.
        ihvp_calculator: the solver of `H^-1 v`.
    """

    def __init__(
        self,
        model: BaseInfluenceModel,
        dataset: Any,
        ihvp_calculator: Any = "exact",
        n_samples_for_hessian: int | None = None,
        shuffle_buffer_size: int = 10000,
        **ihvp_options: Any,
    ) -> None:
        check_influence_model(model, "model")
        self.model = model
        self.process_batch_for_loss_fn = model.process_batch_for_loss_fn
        self.train_set = as_batched_dataset(dataset, "dataset")
        self.n_train = dataset_size(self.train_set, self.process_batch_for_loss_fn)
        self.ihvp_calculator = build_ihvp(
            model, self.train_set, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, **ihvp_options
        )

    def _solve(self, vectors: np.ndarray | tf.Tensor) -> np.ndarray:
        return np.asarray(self.ihvp_calculator.solve(vectors), dtype=np.float64)

    def _terms(self, group: Any, name: str) -> tuple[GroupInfluenceTerms, tf.Tensor]:
        summed, size = summed_gradient(self.model, group, name)
        c1, c2 = basu_coefficients(size, self.n_train)
        first = self._solve(summed)
        batches = self.model.feature_batches(as_batched_dataset(group, name), name)
        group_hvp = summed_hessian_products(self.model, batches, first)
        return GroupInfluenceTerms(c1 * first, c2 * self._solve(group_hvp), size), summed

    def compute_influence_terms_group(self, group: Any) -> GroupInfluenceTerms:
        """`(c1 H^-1 g_U, c2 H^-1 H_U H^-1 g_U, |U|)`: the two terms of `I2(U)` separately.

        Two solves and one pass of summed HVPs over the group's batches.
        """
        return self._terms(group, "group")[0]

    def _vector(self, terms: GroupInfluenceTerms, first_order_scale: bool) -> np.ndarray:
        vector = terms.additive + terms.pairwise
        return vector * self.n_train if first_order_scale else vector

    def compute_influence_vector_group(self, group: Any, *, first_order_scale: bool = False) -> tf.Tensor:
        """`I2(U)`, the predicted parameter change when `group` is removed, shape `(1, n_params)`.

        Args:
            group: batched data (or arrays), any size below `n` and any batching.
            first_order_scale: multiply by `n` (the documented rescaling), which makes it comparable
                to `FirstOrderInfluenceCalculator.compute_influence_vector_group`.
        """
        terms, _ = self._terms(group, "group")
        vector = tf.constant(self._vector(terms, first_order_scale), dtype=tf.float32)
        return check_finite_result(vector, "The group's second-order influence vector")

    def estimate_influence_values_group(
        self, group_train: Any, group_to_evaluate: Any = None, *, first_order_scale: bool = False
    ) -> tf.Tensor:
        """`(sum_{t in T} g_t)^T I2(U)` with `U = group_train`, shape `(1, 1)`.

        With `group_to_evaluate=None`, `T = U` (the group's self-influence). The groups may
        differ in size and batching.

        Args:
            group_train: the removed group `U`.
            group_to_evaluate: the group `T` whose summed loss is affected.
            first_order_scale: multiply by `n` (see the module docstring).
        """
        terms, evaluated = self._terms(group_train, "group_train")
        vector = self._vector(terms, first_order_scale)
        if group_to_evaluate is not None:
            evaluated, _ = summed_gradient(self.model, group_to_evaluate, "group_to_evaluate")
        value = tf.constant(np.asarray(evaluated, dtype=np.float64) @ vector.T, dtype=tf.float32)
        return check_finite_result(value, "The group influence value")
