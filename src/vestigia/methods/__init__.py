"""Attribution methods, all on one calculator engine."""

from vestigia.methods.arnoldi import ArnoldiInfluenceCalculator
from vestigia.methods.base import BaseInfluenceCalculator, SelfInfluenceCalculator
from vestigia.methods.first_order import FirstOrderInfluenceCalculator
from vestigia.methods.second_order import SecondOrderInfluenceCalculator
from vestigia.methods.tracin import TracIn

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TracIn",
]
