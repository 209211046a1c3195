"""Projections of per-example gradients to `k` dimensions: TRAK's dense random projections
(`RandomProjection`) and LoGra's factored per-layer projections (`FactoredProjection`)."""

from vestigia.projection.factored import FactoredProjection
from vestigia.projection.random import KINDS, RandomProjection, check_projection_dim

__all__ = ["KINDS", "FactoredProjection", "RandomProjection", "check_projection_dim"]
