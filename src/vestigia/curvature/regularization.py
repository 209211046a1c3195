"""The model's own weight regularisation, as a term of the curvature.

Keras adds `sum_v R_v(v)` to the training objective (once per step, next to the mean data
loss), where `R_v` is the regularizer a layer put on its variable `v` (`kernel_regularizer`,
`bias_regularizer`, ...). An L2 regularizer `l2 * ||v||^2` contributes the constant Hessian
`2 * l2 * I` on `v`'s entries, so the Hessian of the training objective is

    H = (1/n) sum_i d^2 l_i / d theta^2 + diag(r),   r = 2 * l2 on each watched regularised entry,

which every solver uses by default (`regularization=True`), so that influence matches what the
model was trained on. L1 has no second derivative (0 almost everywhere): it is left out with a
`SpectrumWarning`, as is any regularizer without an `l2` setting.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from vestigia.errors import SpectrumWarning
from vestigia.model.influence_model import BaseInfluenceModel


def _l1_l2(regularizer: Any) -> tuple[float, float] | None:
    """`(l1, l2)` of a Keras L1 / L2 / L1L2 regularizer, or None for another kind."""
    try:
        config = regularizer.get_config()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(config, dict) or not ({"l1", "l2"} & set(config)):
        return None
    return float(config.get("l1", 0.0)), float(config.get("l2", 0.0))


def regularization_diagonal(model: BaseInfluenceModel) -> np.ndarray | None:
    """`r` `(n_params,)` float64, the Hessian of the watched weights' L2 regularizers, or None if
    none is set. Warns (`SpectrumWarning`) about L1 terms and unknown regularizers, left out."""
    parts, found = [], False
    for variable in model.weights:
        size = int(np.prod(variable.shape))
        regularizer = getattr(variable, "regularizer", None)
        value = 0.0
        if regularizer is not None:
            pair = _l1_l2(regularizer)
            name = getattr(variable, "path", getattr(variable, "name", "?"))
            if pair is None:
                warnings.warn(
                    f"The regularizer of watched weight {name!r} ({type(regularizer).__name__}) is not an L1/L2 "
                    "regularizer: its curvature is left out of the Hessian.",
                    SpectrumWarning,
                    stacklevel=3,
                )
            else:
                l1, l2 = pair
                if l1 > 0:
                    warnings.warn(
                        f"Watched weight {name!r} has an L1 regularizer (l1={l1:g}): it has no second derivative, "
                        "so it is left out of the Hessian (only its L2 part, if any, is included).",
                        SpectrumWarning,
                        stacklevel=3,
                    )
                value = 2.0 * l2
                found = found or l2 > 0
        parts.append(np.full(size, value))
    return np.concatenate(parts) if found else None
