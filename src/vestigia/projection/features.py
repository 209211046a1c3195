"""Per-example features for projection-based methods: gradients, projected or not.

A *projection* here is `None` (the full gradients), a `RandomProjection` (or any callable
mapping `(batch, n_params)` to `(batch, k)`), or an object with a
`project_batch(model, batch) -> (losses, features)` method that projects without forming the
full gradient (LoGra's factored projection).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from vestigia.data.dataset import Batch
from vestigia.model.influence_model import BaseInfluenceModel
from vestigia.projection.captured import example_gradients
from vestigia.projection.random import KINDS, RandomProjection

DEFAULT_PROJECTION_DIM = 2048


def make_projection(projection: Any, n_params: int, projection_dim: int | None, seed: int) -> Any:
    """The projection an argument names: None, a kind ("rademacher", "gaussian") built with
    `projection_dim` and `seed`, or an object used as is. With a kind and no `projection_dim`:
    `DEFAULT_PROJECTION_DIM` dimensions, or no projection at all (None, the exact gradients)
    when `n_params` is not larger than that.

    Raises:
        ValueError: an unknown name, `projection_dim` above `n_params`, or a `projection_dim`
            with no projection.
    """
    if projection is None:
        if projection_dim is not None:
            raise ValueError(
                "`projection_dim` needs a projection: pass projection='rademacher' or 'gaussian'. "
                f"Received: projection=None, projection_dim={projection_dim!r}"
            )
        return None
    if isinstance(projection, str):
        if projection not in KINDS:
            raise ValueError(f"`projection` must be None, one of {KINDS} or a projection. Received: {projection!r}")
        if projection_dim is None and n_params <= DEFAULT_PROJECTION_DIM:
            return None
        k = DEFAULT_PROJECTION_DIM if projection_dim is None else projection_dim
        return RandomProjection(n_params, k, kind=projection, seed=seed)
    if not callable(projection) and not hasattr(projection, "project_batch"):
        raise TypeError(f"`projection` must be None, a name or a projection object. Received: {projection!r}")
    return projection


def projected_gradients(model: BaseInfluenceModel, batch: Batch, projection: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """`(losses (batch,), features (batch, k))`: the per-example gradients of `model`'s loss,
    projected by `projection` (see the module docstring)."""
    if hasattr(projection, "project_batch"):
        return projection.project_batch(model, batch)
    losses, grads = example_gradients(model, batch)
    return losses, grads if projection is None else projection(grads)
