"""The methods of the detection benchmark: a registry that builds each calculator on a trained model.

A method is run only if its class is importable from Vestigia (`available`); otherwise it is
listed as "not available". Each method is built by a function of a `Context` (the trained
model, its checkpoints, the training data and the setting), so the runner can time building
(setup: Hessian, eigendecomposition, surrogate fit, ...) separately from scoring.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from detection_setups import Setting

LOSS = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


@dataclass
class Context:
    """What a method is built from: the trained logits model, its TracIn checkpoints (with their
    learning-rate weights), the training data as a batched dataset, the setting, and
    `train_model(seed)`, which trains another model on the same labels (for ensembles)."""

    setting: Setting
    model: keras.Model
    checkpoints: list[keras.Model]
    checkpoint_rates: list[float]
    train: tf.data.Dataset
    train_model: Callable[[int], keras.Model] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def ensemble(self, size: int) -> list[keras.Model]:
        """The context's model and `size - 1` more trained independently (seeds `seed + 1000 + i`),
        trained once per context and shared by the methods."""
        models = self.shared.setdefault("ensemble", [self.model])
        if len(models) < size and self.train_model is None:
            raise ValueError(f"this context cannot train an ensemble of {size} models (no `train_model`)")
        while len(models) < size:
            start = time.perf_counter()
            models.append(self.train_model(self.setting.seed + 1000 + len(models)))
            self.shared["ensemble_s"] = self.shared.get("ensemble_s", 0.0) + time.perf_counter() - start
        return models[:size]

    def rebatched(self, batch_size: int) -> Context:
        """The same context with the training data in batches of `batch_size` (shared state kept)."""
        return dataclasses.replace(self, train=self.train.unbatch().batch(batch_size))

    def influence_model(self, all_layers: bool = False, model: keras.Model | None = None) -> Any:
        """`InfluenceModel` watching the last `Dense` (default) or every layer."""
        from vestigia import InfluenceModel

        target = self.model if model is None else model
        if all_layers:
            return InfluenceModel(target, start_layer=0, last_layer=-1, loss_function=LOSS)
        return InfluenceModel(target, start_layer=-1, loss_function=LOSS)


def resolve(class_name: str) -> Any | None:
    """The Vestigia class called `class_name`, from the package, `vestigia.methods` (or one of its
    modules) or `vestigia.curvature`; None if it does not exist (yet)."""
    for module_name in ("vestigia", "vestigia.methods", "vestigia.curvature"):
        module = importlib.import_module(module_name)
        if hasattr(module, class_name):
            return getattr(module, class_name)
    methods = importlib.import_module("vestigia.methods")
    for info in pkgutil.iter_modules(methods.__path__):
        try:
            module = importlib.import_module(f"vestigia.methods.{info.name}")
        except Exception:  # a module being written by someone else may not import yet
            continue
        if hasattr(module, class_name):
            return getattr(module, class_name)
    return None


@dataclass(frozen=True)
class Method:
    """A benchmarked method.

    Attributes:
        name: row label of the tables.
        class_name: the Vestigia class it needs (None for the baselines).
        build: `build(cls, context) -> calculator` (`cls` is the resolved class).
        batch_size: the setting's batch size for this method, if not `influence_batch_size`.
    """

    name: str
    class_name: str | None
    build: Callable[[Any, Context], Any]
    batch_size: Callable[[Setting], int] | None = None


class LossBaseline:
    """Baseline: the training loss of each example under its (possibly flipped) label."""

    def __init__(self, context: Context) -> None:
        self.model = context.model

    def self_influence(self, train: tf.data.Dataset) -> np.ndarray:
        values = [LOSS(y, self.model(x, training=False)).numpy() for x, y in train]
        return np.concatenate(values)


class RandomBaseline:
    """Baseline: independent standard normal scores (seeded); attributions too, for the LDS floor."""

    def __init__(self, context: Context) -> None:
        self.rng = np.random.default_rng(context.setting.seed)

    def self_influence(self, train: tf.data.Dataset) -> np.ndarray:
        return self.rng.normal(size=sum(int(x.shape[0]) for x, _ in train))

    def influence_matrix(self, test: tf.data.Dataset, train: tf.data.Dataset) -> np.ndarray:
        n_test = sum(int(x.shape[0]) for x, _ in test)
        return self.rng.normal(size=(n_test, sum(int(x.shape[0]) for x, _ in train)))


def _damping(setting: Setting, target: Any) -> dict[str, Any]:
    """`damping = 2 * l2` (the Hessian of the kernels' L2 penalty, see README), and, where the
    solver `target` (a class) can add the model's own L2 terms to `H` itself (`regularization=`),
    that turned off, so the penalty is counted once whichever version of Vestigia runs."""
    options: dict[str, Any] = {"damping": setting.damping}
    if "regularization" in inspect.signature(target.__init__).parameters:
        options["regularization"] = False
    return options


def _solver_class(name: str) -> Any:
    """The IHVP class behind a solver name ("exact", "cgd", "lissa")."""
    from vestigia.curvature import ConjugateGradientDescentIHVP, ExactIHVP, LissaIHVP

    return {"exact": ExactIHVP, "cgd": ConjugateGradientDescentIHVP, "lissa": LissaIHVP}[name]


def _exact_ihvp(context: Context, all_layers: bool = False) -> Any:
    """The exact solver of the last (or every) layer, built once per context (RelatIF reuses exact's)."""
    key = "exact (all layers)" if all_layers else "exact"
    if key not in context.shared:
        from vestigia import ExactIHVP

        model = context.influence_model(all_layers)
        context.shared[key] = ExactIHVP(model, context.train, **_damping(context.setting, ExactIHVP))
    return context.shared[key]


def _first_order(solver: str, normalize: bool = False, all_layers: bool = False) -> Callable[[Any, Context], Any]:
    def build(cls: Any, c: Context) -> Any:
        s = c.setting
        model = c.influence_model(all_layers)
        if solver == "exact":
            return cls(model, c.train, ihvp_calculator=_exact_ihvp(c, all_layers), normalize=normalize)
        options = _damping(s, _solver_class(solver))
        if solver == "cgd":
            options["n_opt_iters"] = s.cg_iters
        else:
            options.update(n_opt_iters=s.lissa_iters, scale=s.lissa_scale)
        return cls(model, c.train, solver, n_samples_for_hessian=s.cg_hessian_samples, **options)

    return build


def kronecker(solver: str, fisher: str = "true", **solver_options: Any) -> Callable[[Any, Context], Any]:
    """K-FAC / EK-FAC over every layer, by name (`cls` is only the availability check of the
    solver class): true Fisher (seeded sampled labels; or `fisher="empirical"`, the given labels),
    the setting's damping on every layer (the model's own L2 left out, as `_damping`: the damping
    is that L2's Hessian), and `solver_options` (e.g. `refit_fraction`).
    `kronfluence_side_by_side.py` builds its rows with it."""

    def build(cls: Any, c: Context) -> Any:
        from vestigia import FirstOrderInfluenceCalculator

        options = {"damping": c.setting.damping, "regularization": False, "seed": c.setting.seed, "fisher": fisher}
        options.update(solver_options)
        return FirstOrderInfluenceCalculator(c.influence_model(True), c.train, solver, **options)

    return build


def _trak(n_models: int) -> Callable[[Any, Context], Any]:
    """TRAK over every layer: one model, or an ensemble of independently trained ones (the
    setting's `ensemble_size`, 10 except in `--quick`). Projection: dense Rademacher to k = 2048
    (the class default) up to 10,000 parameters, else LoGra's factored projection with
    k_in = k_out = 40 (k = 2,000 on the 784-64-10 MLP; the dense one costs ~2 min per model
    there, mostly drawing the random matrix); kernel damping: the class default."""

    def build(cls: Any, c: Context) -> Any:
        size = 1 if n_models == 1 else c.setting.ensemble_size
        models = [c.influence_model(True, model) for model in c.ensemble(size)]
        projection: Any = "rademacher"
        if models[0].nb_params > 10_000:
            from vestigia.projection import FactoredProjection

            projection = FactoredProjection(models[0], k_in=40, k_out=40, seed=c.setting.seed)
        return cls(models, c.train, projection=projection, seed=c.setting.seed)

    return build


def _datainf(cls: Any, c: Context) -> Any:
    """DataInf over every layer: exact per-layer blocks where they are small enough (<= 4,096
    parameters, the class's limit), else one Rademacher-projected block of 2,048."""
    from vestigia.methods.datainf import layer_blocks

    model = c.influence_model(True)
    if max(width for _, width in layer_blocks(model)) <= 4096:
        return cls(model, c.train)
    return cls(model, c.train, projection="rademacher", projection_dim=2048, seed=c.setting.seed)


def _arnoldi(all_layers: bool) -> Callable[[Any, Context], Any]:
    def build(cls: Any, c: Context) -> Any:
        s = c.setting
        return cls(
            c.influence_model(all_layers),
            c.train,
            subspace_dim=s.arnoldi_dim,
            force_hermitian=True,
            k_largest_eig_vals=s.arnoldi_k,
            seed=s.seed,
            **_damping(s, cls),
        )

    return build


def _tracin(all_layers: bool) -> Callable[[Any, Context], Any]:
    def build(cls: Any, c: Context) -> Any:
        models = [c.influence_model(all_layers, checkpoint) for checkpoint in c.checkpoints]
        return cls(models, c.checkpoint_rates)

    return build


def _rps_l2(targets: str) -> Callable[[Any, Context], Any]:
    def build(cls: Any, c: Context) -> Any:
        s = c.setting
        return cls(
            c.model,
            c.train,
            LOSS,
            lambda_regularization=s.rps_lambda,
            epochs=s.rps_epochs,
            layer_index=-1,
            targets=targets,
        )

    return build


def _rps_lje(cls: Any, c: Context) -> Any:
    s = c.setting
    if s.lje_solver == "exact":
        return cls(c.influence_model(), c.train, ihvp_calculator="exact", **_damping(s, _solver_class("exact")))
    return cls(
        c.influence_model(),
        c.train,
        ihvp_calculator=s.lje_solver,
        n_samples_for_hessian=s.cg_hessian_samples,
        n_opt_iters=s.cg_iters,
        **_damping(s, _solver_class(s.lje_solver)),
    )


METHODS: list[Method] = [
    Method("Influence (exact)", "FirstOrderInfluenceCalculator", _first_order("exact")),
    Method("RelatIF (exact)", "FirstOrderInfluenceCalculator", _first_order("exact", True)),
    Method("Influence (CG)", "FirstOrderInfluenceCalculator", _first_order("cgd")),
    Method("Influence (LiSSA)", "FirstOrderInfluenceCalculator", _first_order("lissa")),
    Method("Influence exact (all layers)", "FirstOrderInfluenceCalculator", _first_order("exact", all_layers=True)),
    Method("RelatIF exact (all layers)", "FirstOrderInfluenceCalculator", _first_order("exact", True, True)),
    Method("Influence CG (all layers)", "FirstOrderInfluenceCalculator", _first_order("cgd", all_layers=True)),
    Method("Influence LiSSA (all layers)", "FirstOrderInfluenceCalculator", _first_order("lissa", all_layers=True)),
    Method("EK-FAC (all layers)", "EKFACIHVP", kronecker("ekfac")),
    Method("EK-FAC refit 1/4 (all layers)", "EKFACIHVP", kronecker("ekfac", refit_fraction=0.25)),
    Method("K-FAC (all layers)", "KFACIHVP", kronecker("kfac")),
    Method("Arnoldi", "ArnoldiInfluenceCalculator", _arnoldi(False)),
    Method("Arnoldi (all layers)", "ArnoldiInfluenceCalculator", _arnoldi(True)),
    Method("TracIn", "TracIn", _tracin(False)),
    Method("TracIn (all layers)", "TracIn", _tracin(True)),
    Method("TRAK-1 (all layers)", "TRAK", _trak(1)),
    Method("TRAK-10 (all layers)", "TRAK", _trak(10)),
    Method(
        "LoGra (all layers)",
        "LoGra",
        lambda cls, c: cls(c.influence_model(True), c.train, k_in=32, k_out=32, seed=c.setting.seed),
    ),
    Method(
        "LoGra K-FAC (all layers)",
        "LoGra",
        lambda cls, c: cls(c.influence_model(True), c.train, k_in=32, k_out=32, seed=c.setting.seed, curvature="kfac"),
    ),
    Method("Grad-Dot (all layers)", "GradDot", lambda cls, c: cls(c.influence_model(True))),
    Method("Grad-Cos (all layers)", "GradCos", lambda cls, c: cls(c.influence_model(True))),
    Method("DataInf (all layers)", "DataInf", _datainf),
    Method("RPS-L2", "RepresenterPointL2", _rps_l2("model")),
    Method("RPS-L2 (label targets)", "RepresenterPointL2", _rps_l2("labels")),
    Method("RPS-LJE", "RepresenterPointLJE", _rps_lje),
    Method("Boundary (sample)", "SampleBoundaryCalculator", lambda cls, c: cls(c.model, c.setting.boundary_steps)),
    Method(
        "Boundary (weights)",
        "WeightsBoundaryCalculator",
        lambda cls, c: cls(c.model, c.setting.boundary_steps),
        batch_size=lambda s: s.boundary_batch_size,
    ),
    Method("Loss (baseline)", None, lambda cls, c: LossBaseline(c)),
    Method("Random (baseline)", None, lambda cls, c: RandomBaseline(c)),
]


# The methods of issue 11 (whole-model attribution); the others are "the methods available before".
NEW_METHODS = (
    "EK-FAC (all layers)",
    "EK-FAC refit 1/4 (all layers)",
    "K-FAC (all layers)",
    "TRAK-1 (all layers)",
    "TRAK-10 (all layers)",
    "LoGra (all layers)",
    "LoGra K-FAC (all layers)",
    "Grad-Dot (all layers)",
    "Grad-Cos (all layers)",
    "DataInf (all layers)",
)
LAST_LAYER_ONLY = ("Influence (", "RelatIF (", "Arnoldi", "TracIn")


def methods_for(setting: Setting) -> list[Method]:
    """The methods that apply to a setting: all-layer variants only where asked, rows watching
    only the last layer unless the setting turns them off."""
    chosen = []
    for m in METHODS:
        whole = "(all layers)" in m.name
        if whole and not setting.all_layer_variants:
            continue
        if not whole and not setting.last_layer_rows and m.name.startswith(LAST_LAYER_ONLY):
            continue
        chosen.append(m)
    return chosen


def available(method: Method) -> Any | None:
    """The class a method needs (or `True` for a baseline), None if Vestigia does not have it."""
    return True if method.class_name is None else resolve(method.class_name)
