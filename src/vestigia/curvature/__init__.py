"""Curvature: inverse-Hessian-vector products (exact, conjugate gradient, LiSSA, Arnoldi, K-FAC, EK-FAC)."""

from vestigia.curvature.arnoldi import ArnoldiIHVP, arnoldi_iteration, distill
from vestigia.curvature.base import InverseHessianVectorProduct
from vestigia.curvature.exact import ExactIHVP, mean_hessian
from vestigia.curvature.iterative import ConjugateGradientDescentIHVP, IterativeIHVP, LissaIHVP
from vestigia.curvature.kfac import EKFACIHVP, KFACIHVP, KroneckerIHVP
from vestigia.curvature.registry import IHVPCalculator, get
from vestigia.curvature.solvers import conjugate_gradient, lissa

__all__ = [
    "ArnoldiIHVP",
    "ConjugateGradientDescentIHVP",
    "EKFACIHVP",
    "ExactIHVP",
    "IHVPCalculator",
    "InverseHessianVectorProduct",
    "IterativeIHVP",
    "KFACIHVP",
    "KroneckerIHVP",
    "LissaIHVP",
    "arnoldi_iteration",
    "conjugate_gradient",
    "distill",
    "get",
    "lissa",
    "mean_hessian",
]
