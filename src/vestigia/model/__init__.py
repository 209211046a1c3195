"""The model: watched weights, trunk / head split, unreduced loss."""

from vestigia.model.influence_model import BaseInfluenceModel, InfluenceModel

__all__ = ["BaseInfluenceModel", "InfluenceModel"]
