"""Resolve an `ihvp_calculator` argument (string, enum, class or instance) to a solver."""

from __future__ import annotations

from enum import Enum
from typing import Any

from vestigia.curvature.base import InverseHessianVectorProduct
from vestigia.curvature.exact import ExactIHVP
from vestigia.curvature.iterative import ConjugateGradientDescentIHVP, LissaIHVP
from vestigia.curvature.kfac import EKFACIHVP, KFACIHVP
from vestigia.model.influence_model import BaseInfluenceModel


class IHVPCalculator(Enum):
    """The seed's names for the solvers."""

    Exact = "exact"
    Cgd = "cgd"
    Lissa = "lissa"
    Kfac = "kfac"
    Ekfac = "ekfac"

    @staticmethod
    def from_string(name: str) -> IHVPCalculator:
        return IHVPCalculator(_ALIASES.get(name.lower(), name.lower()))


_ALIASES = {"cg": "cgd", "conjugate_gradient": "cgd", "k-fac": "kfac", "ek-fac": "ekfac"}
_CLASSES: dict[str, type[InverseHessianVectorProduct]] = {
    "exact": ExactIHVP,
    "cgd": ConjugateGradientDescentIHVP,
    "lissa": LissaIHVP,
    "kfac": KFACIHVP,
    "ekfac": EKFACIHVP,
}


def get(
    identifier: Any, influence_model: BaseInfluenceModel, dataset: Any, **options: Any
) -> InverseHessianVectorProduct:
    """Build or pass through an IHVP solver.

    Args:
        identifier: an `InverseHessianVectorProduct` instance (returned as is), a subclass, an
            `IHVPCalculator` member, or one of "exact", "cgd" (alias "cg"), "lissa", "kfac", "ekfac".
        influence_model: the model whose Hessian is inverted.
        dataset: batched training data defining the Hessian.
        **options: solver settings (`damping`, `n_opt_iters`, `scale`, `tol`, ...; for "kfac" /
            "ekfac": `damping_fraction`, `fisher`, `seed`, `query_rank`, `factors_path`).

    Raises:
        ValueError: an unknown name. TypeError: an object of another type.
    """
    if isinstance(identifier, InverseHessianVectorProduct):
        return identifier
    if isinstance(identifier, str):
        try:
            identifier = IHVPCalculator.from_string(identifier)
        except ValueError:
            raise ValueError(
                f"`ihvp_calculator` must be one of {sorted(_CLASSES)} (or 'cg'), an IHVPCalculator or an "
                f"InverseHessianVectorProduct. Received: ihvp_calculator={identifier!r}"
            ) from None
    if isinstance(identifier, IHVPCalculator):
        identifier = _CLASSES[identifier.value]
    if isinstance(identifier, type) and issubclass(identifier, InverseHessianVectorProduct):
        if identifier is ExactIHVP:
            return ExactIHVP(influence_model, dataset, **options)
        return identifier(influence_model, train_dataset=dataset, **options)  # type: ignore[call-arg]
    raise TypeError(
        "`ihvp_calculator` must be a string, an IHVPCalculator, an InverseHessianVectorProduct class "
        f"or instance. Received: {type(identifier).__name__}"
    )
