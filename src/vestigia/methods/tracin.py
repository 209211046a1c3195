"""TracIn (Pruthi et al. 2020), the checkpoint version TracInCP.

`value(z_test, z) = sum_c eta_c g_c(z_test)^T g_c(z)` over checkpoints `c` with learning rates
`eta_c`; self-influence `sum_c eta_c ||g_c(z)||^2`. Positive means proponent, as everywhere.
Scoring holds one checkpoint's training gradients (one batch of them) at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.errors import InvalidModelError, check_non_negative
from vestigia.methods.base import BaseInfluenceCalculator
from vestigia.methods.first_order import example_gradients
from vestigia.model.influence_model import BaseInfluenceModel


class TracIn(BaseInfluenceCalculator):
    """TracIn over checkpoints.

    Args:
        models: one `InfluenceModel` per checkpoint (the same data format and loss).
        learning_rates: one learning rate per checkpoint, or one for all.

    Raises:
        InvalidModelError: no checkpoint, or a number of learning rates that does not match.
    """

    def __init__(self, models: Sequence[BaseInfluenceModel], learning_rates: float | Sequence[float]) -> None:
        models = list(models) if isinstance(models, (list, tuple)) else [models]  # type: ignore[list-item]
        if not models or not all(isinstance(m, BaseInfluenceModel) for m in models):
            raise InvalidModelError(
                f"`models` must be a non-empty list of InfluenceModel. Received: {[type(m).__name__ for m in models]}"
            )
        rates: list[Any] = (
            [learning_rates] * len(models) if np.isscalar(learning_rates) else list(learning_rates)  # type: ignore[arg-type]
        )
        if len(rates) != len(models):
            raise InvalidModelError(
                f"`learning_rates` must hold one rate per checkpoint ({len(models)}). Received {len(rates)}: {rates}"
            )
        self.models = models
        self.learning_rates = [check_non_negative("learning_rates", r) for r in rates]
        self.n_components = len(models)
        self.process_batch_for_loss_fn = models[0].process_batch_for_loss_fn

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`sqrt(eta_c) g_c(z)`, `(batch, n_params_c)`."""
        return np.sqrt(self.learning_rates[component]) * example_gradients(self.models[component], batch)

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        return self._influence_vector(batch, component)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        total = np.zeros(batch.size)
        for c in range(self.n_components):
            total += tf.reduce_sum(tf.square(self._influence_vector(batch, c)), axis=1).numpy()
        return total
