"""Attribution methods, all on one calculator engine."""

from vestigia.methods.base import BaseInfluenceCalculator, SelfInfluenceCalculator
from vestigia.methods.first_order import FirstOrderInfluenceCalculator
from vestigia.methods.tracin import TracIn

__all__ = [
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TracIn",
]
