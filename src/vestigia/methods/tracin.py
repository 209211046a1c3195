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

from vestigia.data.blocks import rows_within
from vestigia.data.dataset import Batch
from vestigia.errors import InvalidModelError, check_non_negative
from vestigia.gradients.factored import factored_inner_products, factored_squared_norms
from vestigia.methods.engine import BaseInfluenceCalculator
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
        # Score with factored Dense gradients (<g_i, g_j> = <a_i, a_j><d_i, d_j>) where smaller.
        self._factored = [0 < sum(i + o for i, o in m.differentiator.factor_widths) < m.nb_params for m in self.models]

    @classmethod
    def from_checkpoints(cls, directory: str, **options: Any) -> TracIn:
        """TracIn over the checkpoints that `vestigia.callbacks.CheckpointRecorder` saved in `directory`
        during `model.fit`, with their recorded learning rates (`options`: see
        `vestigia.callbacks.tracin_from_checkpoints`)."""
        from vestigia.callbacks import tracin_from_checkpoints

        return tracin_from_checkpoints(directory, **options)

    def _block_rows(self, extra_width: int = 0) -> int | None:
        """Blocks where every checkpoint's head has a closed form: each checkpoint's gradients
        and the scores of a block within `BLOCK_BYTES`."""
        rows = [m.block_rows() for m in self.models]
        if any(r is None for r in rows):
            return None
        width = max(m.nb_params for m in self.models) + extra_width
        return min(*[r for r in rows if r is not None], rows_within(4 * 2 * width))

    def _influence_vector(self, batch: Batch, component: int = 0) -> tf.Tensor:
        """`sqrt(eta_c) g_c(z)`, `(batch, n_params_c)`."""
        return np.sqrt(self.learning_rates[component]) * example_gradients(self.models[component], batch)

    def _preprocess(self, batch: Batch, component: int = 0) -> tf.Tensor:
        return self._influence_vector(batch, component)

    def _score_train_side(self, batch: Batch, component: int) -> tf.Tensor:
        """Packed factors of `g_c(z)` (see `vestigia.gradients.factored`) if used, else `sqrt(eta_c) g_c(z)`."""
        if self._factored[component]:
            result = self.models[component].example_factors(batch)
            if result is not None:
                return result[1]
            self._factored[component] = False
        return self._influence_vector(batch, component)

    def _score_test_side(self, batch: Batch, component: int) -> tf.Tensor:
        return self._score_train_side(batch, component)

    def _pair(self, test_side: tf.Tensor, train_side: tf.Tensor, component: int) -> tf.Tensor:
        if not self._factored[component]:
            return super()._pair(test_side, train_side, component)
        widths = self.models[component].differentiator.factor_widths
        return self.learning_rates[component] * factored_inner_products(test_side, train_side, widths)

    def _self_influence(self, batch: Batch) -> np.ndarray:
        total = np.zeros(batch.size)
        for c in range(self.n_components):
            side = self._score_train_side(batch, c)
            if self._factored[c]:
                widths = self.models[c].differentiator.factor_widths
                norms = self.learning_rates[c] * factored_squared_norms(side, widths)
            else:
                norms = tf.reduce_sum(tf.square(side), axis=1)
            total += norms.numpy()
        return total
