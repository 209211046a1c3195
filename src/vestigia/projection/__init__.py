"""Projections of per-example gradients to `k` dimensions (TRAK's random projections)."""

from vestigia.projection.random import KINDS, RandomProjection, check_projection_dim

__all__ = ["KINDS", "RandomProjection", "check_projection_dim"]
