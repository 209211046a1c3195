"""The model: watched weights, trunk / head split, unreduced loss, model checks."""

from vestigia.model.checks import float32_copy
from vestigia.model.influence_model import BaseInfluenceModel, InfluenceModel

__all__ = ["BaseInfluenceModel", "InfluenceModel", "float32_copy"]
