"""Attribution methods, all on one calculator engine."""

from vestigia.methods.arnoldi import ArnoldiInfluenceCalculator
from vestigia.methods.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator
from vestigia.methods.datainf import DataInf
from vestigia.methods.engine import BaseInfluenceCalculator, SelfInfluenceCalculator
from vestigia.methods.first_order import FirstOrderInfluenceCalculator
from vestigia.methods.gradient_similarity import GradCos, GradDot
from vestigia.methods.logra import LoGra
from vestigia.methods.representer import RepresenterPointCalculator
from vestigia.methods.representer_l2 import RepresenterPointL2
from vestigia.methods.representer_lje import RepresenterPointLJE
from vestigia.methods.second_order import SecondOrderInfluenceCalculator
from vestigia.methods.tracin import TracIn
from vestigia.methods.trak import TRAK

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "DataInf",
    "FirstOrderInfluenceCalculator",
    "GradCos",
    "GradDot",
    "LoGra",
    "RepresenterPointCalculator",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TRAK",
    "TracIn",
    "WeightsBoundaryCalculator",
]
