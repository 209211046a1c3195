"""The methods the `vestigia` command offers: one table, one row per method, built from a `Setup`.

Adding a method to the command is one `MethodSpec` row in `METHODS` (its name, what it is, how to
build it from the `Setup`, and whether it gives pairwise values for `vestigia explain`). The
IHVP solvers of the influence rows come from `vestigia.curvature.IHVPCalculator`, so a solver
added to that registry is offered by `--solver` with no change here. `--method auto` picks by
the number of watched parameters through `AUTO_RULES`: exact influence up to 4,096, EK-FAC
influence above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from vestigia.curvature import IHVPCalculator
from vestigia.errors import InvalidDataError, InvalidModelError
from vestigia.methods import (
    TRAK,
    ArnoldiInfluenceCalculator,
    DataInf,
    FirstOrderInfluenceCalculator,
    GradCos,
    GradDot,
    LoGra,
    RepresenterPointL2,
    RepresenterPointLJE,
    SampleBoundaryCalculator,
    SelfInfluenceCalculator,
    WeightsBoundaryCalculator,
)
from vestigia.model import BaseInfluenceModel, InfluenceModel

__all__ = ["AUTO_RULES", "METHODS", "MethodSpec", "Setup", "choose_method", "solver_names", "watch"]

DEFAULT_DAMPING = 1e-3
KRONECKER_SOLVERS = ("kfac", "ekfac")
EXACT_MAX_PARAMS = 4096  # a dense float64 Hessian of 4,096^2 is 134 MB and factors in ~1 s
ARNOLDI_SUBSPACE, ARNOLDI_KEPT = 200, 100
RPS_LAMBDA = 1e-3
BOUNDARY_STEPS = 50


def solver_names() -> list[str]:
    """The IHVP solvers `--solver` accepts: "auto" and every name of the registry."""
    return ["auto", *[member.value for member in IHVPCalculator]]


def _layers_with_weights(model: keras.Model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if layer.trainable_variables]


def watch(model: keras.Model, layers: str | Sequence[str], loss: Any) -> BaseInfluenceModel:
    """The `InfluenceModel` watching `layers`: "last" (the last layer with weights), "all" (every
    layer with weights, as one contiguous block), or layer names.

    Raises:
        InvalidModelError: a name that is no layer of the model, or a layer with no weights.
    """
    with_weights = _layers_with_weights(model)
    if not with_weights:
        raise InvalidModelError(f"The model {model.name!r} has no trainable weights to watch.")
    if layers == "last":
        return InfluenceModel(model, start_layer=with_weights[-1], loss_function=loss)
    if layers == "all":
        return InfluenceModel(model, start_layer=with_weights[0], last_layer=with_weights[-1], loss_function=loss)
    names = [layers] if isinstance(layers, str) else list(layers)
    known = [layer.name for layer in model.layers]
    variables = []
    for name in names:
        if name not in known:
            raise InvalidModelError(f"`--layers` names no layer of the model. Received: {name!r}; layers: {known}")
        found = model.get_layer(name).trainable_variables
        if not found:
            raise InvalidModelError(f"`--layers` names a layer with no trainable weights. Received: {name!r}")
        variables.extend(found)
    return BaseInfluenceModel(model, weights_to_watch=variables, loss_function=loss)


@dataclass
class Setup:
    """What every method is built from: the model, its loss, the training arrays and the settings."""

    model: keras.Model
    loss: Any
    x: np.ndarray
    y: np.ndarray
    layers: str | Sequence[str] = "last"
    solver: str = "auto"
    damping: float | None = None
    checkpoints: str | None = None
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    _watched: BaseInfluenceModel | None = None

    def influence_model(self) -> BaseInfluenceModel:
        """The watched model (built once)."""
        if self._watched is None:
            self._watched = watch(self.model, self.layers, self.loss)
        return self._watched

    @property
    def n_params(self) -> int:
        return int(self.influence_model().nb_params)

    def resolved_solver(self) -> str:
        """`solver`, with "auto" resolved: exact up to `EXACT_MAX_PARAMS` watched parameters, else CG."""
        if self.solver != "auto":
            return self.solver
        return "exact" if self.n_params <= EXACT_MAX_PARAMS else "cgd"

    def solver_options(self) -> dict[str, Any]:
        """`damping` for the solver: the user's, else `DEFAULT_DAMPING` (K-FAC / EK-FAC: their own
        rule, a fraction of the mean eigenvalue, when the user gave none)."""
        if self.damping is None and self.resolved_solver() in KRONECKER_SOLVERS:
            return {}
        return {"damping": DEFAULT_DAMPING if self.damping is None else self.damping}


@dataclass(frozen=True)
class MethodSpec:
    """A row of the method table.

    Attributes:
        description: one line for `--help`, with the value's sign and scale.
        build: makes the calculator from a `Setup` (and records its settings in `setup.settings`).
        pairwise: it scores test x train pairs (usable by `vestigia explain`).
    """

    description: str
    build: Callable[[Setup], SelfInfluenceCalculator]
    pairwise: bool = True


def _first_order(normalize: bool) -> Callable[[Setup], SelfInfluenceCalculator]:
    def build(setup: Setup) -> SelfInfluenceCalculator:
        solver = setup.resolved_solver()
        setup.settings.update(solver=solver, **setup.solver_options())
        return FirstOrderInfluenceCalculator(
            setup.influence_model(), (setup.x, setup.y), solver, normalize=normalize, **setup.solver_options()
        )

    return build


def _arnoldi(setup: Setup) -> SelfInfluenceCalculator:
    n = setup.n_params
    subspace = min(ARNOLDI_SUBSPACE, n)
    kept = min(ARNOLDI_KEPT, subspace)
    damping = DEFAULT_DAMPING if setup.damping is None else setup.damping
    setup.settings.update(subspace_dim=subspace, k_largest_eig_vals=kept, damping=damping)
    return ArnoldiInfluenceCalculator(
        setup.influence_model(), (setup.x, setup.y), subspace, True, kept, seed=setup.seed, damping=damping
    )


def _tracin(setup: Setup) -> SelfInfluenceCalculator:
    from vestigia.callbacks import load_checkpoints
    from vestigia.methods import TracIn

    if setup.checkpoints is None:
        raise InvalidDataError(
            "`--method tracin` needs the checkpoints saved during training: train with "
            "vestigia.callbacks.CheckpointRecorder(DIR) and pass --checkpoints DIR. Received: --checkpoints=None"
        )
    models, rates = load_checkpoints(setup.checkpoints)
    setup.settings.update(checkpoints=setup.checkpoints, learning_rates=rates)
    return TracIn([watch(m, setup.layers, setup.loss) for m in models], rates)


def _trak(setup: Setup) -> SelfInfluenceCalculator:
    """TRAK on the watched layers; an ensemble over the checkpoints when `--checkpoints` is given."""
    from vestigia.callbacks import load_checkpoints

    models = [setup.influence_model()]
    if setup.checkpoints is not None:
        models = [watch(m, setup.layers, setup.loss) for m in load_checkpoints(setup.checkpoints)[0]]
    setup.settings.update(trak_models=len(models))
    return TRAK(models, (setup.x, setup.y), seed=setup.seed)


def _representer_l2(setup: Setup) -> SelfInfluenceCalculator:
    setup.settings.update(lambda_regularization=RPS_LAMBDA)
    return RepresenterPointL2(setup.model, (setup.x, setup.y), setup.loss, RPS_LAMBDA, targets="labels")


def _representer_lje(setup: Setup) -> SelfInfluenceCalculator:
    solver = setup.resolved_solver()
    setup.settings.update(solver=solver, **setup.solver_options())
    return RepresenterPointLJE(setup.influence_model(), (setup.x, setup.y), solver, **setup.solver_options())


def _boundary(kind: str) -> Callable[[Setup], SelfInfluenceCalculator]:
    def build(setup: Setup) -> SelfInfluenceCalculator:
        setup.settings.update(step_nbr=BOUNDARY_STEPS)
        if kind == "sample":
            return SampleBoundaryCalculator(setup.model, step_nbr=BOUNDARY_STEPS)
        return WeightsBoundaryCalculator(setup.model, step_nbr=BOUNDARY_STEPS)

    return build


METHODS: dict[str, MethodSpec] = {
    "influence": MethodSpec(
        "first-order influence g_test^T H^-1 g_z (Koh & Liang); --solver picks H^-1", _first_order(False)
    ),
    "relatif": MethodSpec("RelatIF g_test^T H^-1 g_z / ||H^-1 g_z|| (Barshan et al.)", _first_order(True)),
    "arnoldi": MethodSpec("influence through the top eigenpairs of H (Schioppa et al.), for large heads", _arnoldi),
    "tracin": MethodSpec("TracIn sum_c eta_c g_c(z_test)^T g_c(z) over --checkpoints (Pruthi et al.)", _tracin),
    "trak": MethodSpec("TRAK (Park et al.): projected margin gradients; an ensemble over --checkpoints", _trak),
    "grad-dot": MethodSpec("Grad-Dot g_test^T g_z (no curvature)", lambda s: GradDot(s.influence_model())),
    "grad-cos": MethodSpec("Grad-Cos, the cosine of g_test and g_z", lambda s: GradCos(s.influence_model())),
    "datainf": MethodSpec(
        "DataInf (Kwon et al.): per-layer closed-form inverse", lambda s: DataInf(s.influence_model(), (s.x, s.y))
    ),
    "logra": MethodSpec(
        "LoGra (Choe et al.): factored projections of every layer", lambda s: LoGra(s.influence_model(), (s.x, s.y))
    ),
    "representer-l2": MethodSpec("representer points with L2 (Yeh et al.); bias-free last Dense", _representer_l2),
    "representer-lje": MethodSpec("representer points by local Jacobian expansion (Sui et al.)", _representer_lje),
    "boundary-sample": MethodSpec(
        "-||x - x_adv||, distance to the decision boundary in input space", _boundary("sample"), False
    ),
    "boundary-weights": MethodSpec(
        "-||w - w_adv||, distance to the boundary in weight space", _boundary("weights"), False
    ),
}

# (largest number of watched parameters, method, solver) in order; the first that fits wins.
AUTO_RULES: list[tuple[int | None, str, str]] = [
    (EXACT_MAX_PARAMS, "influence", "exact"),
    (None, "influence", "ekfac"),
]


def choose_method(setup: Setup, method: str) -> str:
    """`method`, or for "auto" the first row of `AUTO_RULES` that fits the watched parameter count
    (setting `setup.solver` when the user left it on "auto")."""
    if method != "auto":
        return method
    n = setup.n_params
    for limit, name, solver in AUTO_RULES:
        if limit is None or n <= limit:
            if setup.solver == "auto":
                setup.solver = solver
            return name
    raise AssertionError("AUTO_RULES must end with a catch-all row")  # pragma: no cover
