"""Ground truth by retraining: random subsets for the LDS, leave-one-out retraining.

Both run the same loop over "retraining jobs", each a boolean mask of the training examples
to keep: clear the Keras session, seed (`keras.utils.set_random_seed`), `build_model()`,
`train(model, x_kept, y_kept)`, predict `x_test` and `measure(predictions, y_test)`. With
`path` every finished job is stored (see `vestigia.evaluation.storage`), so a rerun skips
what is done and returns identical results; the expensive ground truth is computed once.

Determinism: each job is seeded independently of the others, so its result does not depend on
which jobs ran before in the process. It is as deterministic as the user's training (enable
`tf.config.experimental.enable_op_determinism()` for bit-exact results on GPUs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np

from vestigia.errors import InvalidDataError, NonFiniteError, check_fraction, check_positive_int
from vestigia.evaluation.lds import correct_class_margin
from vestigia.evaluation.storage import RetrainingStore, callable_name, data_fingerprint
from vestigia.progress import bar

Measure = Callable[[Any, Any], Any]


class RetrainingResult(NamedTuple):
    """Models retrained on random subsets; unpacks as `masks, outputs`.

    Attributes:
        masks: `(n_subsets, n_train)` bool, True = kept in the subset.
        outputs: `(n_subsets, n_test)` float64 measured outputs of each retrained model.
    """

    masks: np.ndarray
    outputs: np.ndarray


class LeaveOneOutResult(NamedTuple):
    """Models retrained without one training point each; unpacks as `outputs, baseline`.

    Attributes:
        outputs: `(n_removed, n_test)` measured outputs of the model trained without `indices[j]`.
        baseline: `(n_test,)` measured outputs of the model trained on all the data.
    """

    outputs: np.ndarray
    baseline: np.ndarray

    @property
    def output_drop(self) -> np.ndarray:
        """`baseline - outputs`, `(n_removed, n_test)`: the output lost by removing each point.

        Positive for proponents, like Vestigia's attributions: correlate its transpose with
        `attributions[:, indices]` (see `leave_one_out_correlation`).
        """
        return self.baseline[None, :] - self.outputs


def random_subsets(n_train: int, n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random training subsets of a fixed size, drawn with `numpy.random.default_rng(seed)`.

    Each row keeps exactly `k = floor(fraction * n_train + 0.5)` examples (rounded half up),
    chosen uniformly without replacement, independently across rows.

    Returns:
        A boolean array of shape `(n_subsets, n_train)`, True = kept.

    Raises:
        ValueError: `fraction` not in (0, 1] or `k` < 1.
    """
    check_positive_int("n_train", n_train)
    check_positive_int("n_subsets", n_subsets)
    fraction = check_fraction("fraction", fraction)
    k = int(math.floor(fraction * n_train + 0.5))
    if k < 1:
        raise ValueError(f"`fraction * n_train` must round to >= 1. Received: fraction={fraction}, n_train={n_train}")
    keys = np.random.default_rng(seed).random((n_subsets, n_train))
    kept = np.argpartition(keys, k - 1, axis=1)[:, :k]
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    np.put_along_axis(masks, kept, True, axis=1)
    return masks


def _length(name: str, data: Any) -> int:
    """Number of examples of an array or of a tuple / list / dict of arrays (all the same length)."""
    leaves = data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else [data]
    lengths = {len(leaf) for leaf in leaves}
    if len(lengths) != 1:
        raise InvalidDataError(f"`{name}` must hold arrays of one length. Received lengths {sorted(lengths)}")
    return lengths.pop()


def _take(data: Any, index: np.ndarray) -> Any:
    """Rows `index` of an array or of each array of a tuple / list / dict."""
    if isinstance(data, dict):
        return {key: np.asarray(value)[index] for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(np.asarray(value)[index] for value in data)
    return np.asarray(data)[index]


def _retrain_once(
    build_model: Callable[[], Any],
    train: Callable[[Any, Any, Any], Any],
    data: tuple[Any, Any, Any, Any],
    keep: np.ndarray,
    seed: int,
    measure: Measure,
    batch_size: int,
) -> np.ndarray:
    """Train a fresh seeded model on the kept examples; return `measure(predictions, y_test)` `(n_test,)`."""
    x_train, y_train, x_test, y_test = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_model()
    index = np.flatnonzero(keep)
    train(model, _take(x_train, index), _take(y_train, index))
    predictions = model.predict(x_test, batch_size=batch_size, verbose=0)
    values = np.asarray(measure(predictions, y_test), dtype=np.float64)
    n_test = _length("x_test", x_test)
    if values.shape != (n_test,):
        raise InvalidDataError(f"`measure` must return shape ({n_test},). Received: shape {values.shape}")
    if not np.isfinite(values).all():
        raise NonFiniteError(f"`measure` returned non-finite values for the model trained with seed {seed}.")
    return values


def _run_retrainings(
    build_model: Callable[[], Any],
    train: Callable[[Any, Any, Any], Any],
    data: tuple[Any, Any, Any, Any],
    keep: np.ndarray,
    seeds: Sequence[int],
    measure: Measure,
    path: str | os.PathLike[str] | None,
    settings: dict[str, Any],
    progress: bool,
    batch_size: int,
) -> np.ndarray:
    """Run (or load) one retraining per row of `keep`; return outputs `(n_jobs, n_test)` float64."""
    x_train, y_train, x_test, y_test = data
    n_train = _length("x_train", x_train)
    n_test = _length("x_test", x_test)
    if _length("y_train", y_train) != n_train or _length("y_test", y_test) != n_test:
        raise InvalidDataError(
            f"`y_train` / `y_test` must have as many rows as `x_train` ({n_train}) / `x_test` ({n_test}). "
            f"Received: {_length('y_train', y_train)} and {_length('y_test', y_test)}"
        )
    store = None
    if path is not None:
        settings = {
            **settings,
            "n_train": n_train,
            "n_test": n_test,
            "measure": callable_name(measure),
            "data_sha256": data_fingerprint(x_train, y_train, x_test, y_test),
        }
        store = RetrainingStore(path, settings, keep, n_test)
    outputs: list[np.ndarray | None] = [store.load(job) if store else None for job in range(len(keep))]
    todo = [job for job, values in enumerate(outputs) if values is None]
    with bar(len(keep), f"{settings['kind']} (retrainings)", enabled=progress, done=len(keep) - len(todo)) as reporter:
        for job in todo:
            values = _retrain_once(build_model, train, data, keep[job], int(seeds[job]), measure, batch_size)
            if store is not None:
                store.save(job, values)
            outputs[job] = values
            reporter.advance()
    return np.stack([values for values in outputs if values is not None])


def retrain_on_subsets(
    build_model: Callable[[], Any],
    train: Callable[[Any, Any, Any], Any],
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    path: str | os.PathLike[str] | None = None,
    measure: Measure = correct_class_margin,
    progress: bool = True,
    batch_size: int = 256,
) -> RetrainingResult:
    """Retrain a model on random subsets and measure it on the test set (ground truth for the LDS).

    Subset `s` is row `s` of `random_subsets(n_train, n_subsets, fraction, seed)`, trained under
    `keras.utils.set_random_seed(seed + s)`.

    Args:
        build_model: returns a fresh Keras model (compiled or not).
        train: `train(model, x, y)` trains `model` in place on the kept examples.
        x_train: training inputs `(n_train, ...)`, or a tuple / list / dict of such arrays.
        y_train: training targets `(n_train, ...)`.
        x_test: test inputs `(n_test, ...)`.
        y_test: test targets, passed to `measure`.
        n_subsets: number of subsets (retrainings).
        fraction: share of the training set kept in each subset.
        seed: seed of the subsets and (offset by `s`) of each retraining.
        path: directory where masks and outputs are stored and resumed from (None: memory only).
        measure: `measure(model.predict(x_test), y_test) -> (n_test,)`, higher = better.
        progress: show a progress bar on stderr (`vestigia.progress`; False: silent).
        batch_size: batch size of `model.predict`.

    Returns:
        `RetrainingResult(masks (n_subsets, n_train) bool, outputs (n_subsets, n_test) float64)`.

    Raises:
        ValueError: `path` holds a run with other settings, masks or data.
    """
    masks = random_subsets(_length("x_train", x_train), n_subsets, fraction, seed)
    settings = {"kind": "retrain_on_subsets", "n_subsets": n_subsets, "fraction": float(fraction), "seed": seed}
    seeds = [seed + s for s in range(n_subsets)]
    data = (x_train, y_train, x_test, y_test)
    outputs = _run_retrainings(build_model, train, data, masks, seeds, measure, path, settings, progress, batch_size)
    return RetrainingResult(masks, outputs)


def leave_one_out_retraining(
    build_model: Callable[[], Any],
    train: Callable[[Any, Any, Any], Any],
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    indices: Sequence[int] | np.ndarray,
    measure: Measure = correct_class_margin,
    path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 256,
) -> LeaveOneOutResult:
    """Retrain without each of `indices` in turn, plus once on all the data (the baseline).

    Every retraining, the baseline included, uses the same `keras.utils.set_random_seed(seed)`
    so that the initialisation is shared and the differences come from the removed point (and
    from the data order it shifts). Arguments are those of `retrain_on_subsets`.

    Args:
        indices: training indices to remove, one retraining each.

    Returns:
        `LeaveOneOutResult(outputs (len(indices), n_test), baseline (n_test,))`; its
        `.output_drop` is the effect to compare with attributions.
    """
    n_train = _length("x_train", x_train)
    removed = np.asarray(indices, dtype=np.int64).reshape(-1)
    if removed.size == 0 or removed.min() < 0 or removed.max() >= n_train or len(np.unique(removed)) != removed.size:
        raise InvalidDataError(
            f"`indices` must be distinct training indices in [0, {n_train}). Received: indices={removed.tolist()[:20]}"
        )
    keep = np.ones((removed.size + 1, n_train), dtype=bool)
    keep[np.arange(1, removed.size + 1), removed] = False
    settings = {"kind": "leave_one_out_retraining", "indices": removed.tolist(), "seed": seed}
    data = (x_train, y_train, x_test, y_test)
    seeds = [seed] * len(keep)
    outputs = _run_retrainings(build_model, train, data, keep, seeds, measure, path, settings, progress, batch_size)
    return LeaveOneOutResult(outputs[1:], outputs[0])
