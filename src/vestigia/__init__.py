"""Vestigia: trace what a trained Keras model learned back to its training data.

Every public name of Influenciae 0.3.0 is importable from here, so its snippets run with only
the import line changed (`from vestigia import ...`).
"""

from vestigia.curvature import (
    EKFACIHVP,
    KFACIHVP,
    ConjugateGradientDescentIHVP,
    ExactIHVP,
    IHVPCalculator,
    InverseHessianVectorProduct,
    LissaIHVP,
)
from vestigia.data import default_process_batch
from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError
from vestigia.methods import (
    TRAK,
    ArnoldiInfluenceCalculator,
    BaseInfluenceCalculator,
    DataInf,
    FirstOrderInfluenceCalculator,
    GradCos,
    GradDot,
    LoGra,
    RepresenterPointL2,
    RepresenterPointLJE,
    SampleBoundaryCalculator,
    SecondOrderInfluenceCalculator,
    SelfInfluenceCalculator,
    TracIn,
    WeightsBoundaryCalculator,
)
from vestigia.model import BaseInfluenceModel, InfluenceModel
from vestigia.plots import plot_datacentric_explanations, plot_most_influential_images
from vestigia.results import CACHE, ORDER, TopK

__version__ = "0.1.0"

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "BaseInfluenceModel",
    "CACHE",
    "ConjugateGradientDescentIHVP",
    "DataInf",
    "EKFACIHVP",
    "ExactIHVP",
    "FirstOrderInfluenceCalculator",
    "GradCos",
    "GradDot",
    "IHVPCalculator",
    "InfluenceModel",
    "InvalidDataError",
    "InvalidModelError",
    "InverseHessianVectorProduct",
    "KFACIHVP",
    "LissaIHVP",
    "LoGra",
    "NonFiniteError",
    "ORDER",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TRAK",
    "TopK",
    "TracIn",
    "WeightsBoundaryCalculator",
    "default_process_batch",
    "plot_datacentric_explanations",
    "plot_most_influential_images",
]
