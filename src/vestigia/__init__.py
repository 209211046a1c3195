"""Vestigia: trace what a trained Keras model learned back to its training data.

Every public name of Influenciae 0.3.0 is importable from here, so its snippets run with only
the import line changed (`from vestigia import ...`).
"""

from vestigia.curvature import (
    ConjugateGradientDescentIHVP,
    ExactIHVP,
    IHVPCalculator,
    InverseHessianVectorProduct,
    LissaIHVP,
)
from vestigia.data import default_process_batch
from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError
from vestigia.methods import (
    ArnoldiInfluenceCalculator,
    BaseInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    SecondOrderInfluenceCalculator,
    SelfInfluenceCalculator,
    TracIn,
)
from vestigia.model import BaseInfluenceModel, InfluenceModel
from vestigia.results import CACHE, ORDER, TopK

__version__ = "0.1.0"

__all__ = [
    "CACHE",
    "ArnoldiInfluenceCalculator",
    "ORDER",
    "BaseInfluenceCalculator",
    "BaseInfluenceModel",
    "ConjugateGradientDescentIHVP",
    "ExactIHVP",
    "FirstOrderInfluenceCalculator",
    "IHVPCalculator",
    "InfluenceModel",
    "InvalidDataError",
    "InvalidModelError",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "NonFiniteError",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TopK",
    "TracIn",
    "default_process_batch",
]
