"""What a report shows, saved next to it (`results.npz` + `settings.json`) so that it can be rebuilt.

Only the examples the page shows are stored (the most suspicious ones, the queries and their
proponents and opponents), with the scores and labels of the whole training set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vestigia.errors import InvalidDataError

__all__ = ["Explanation", "ReportData", "load_noise_mask"]

RESULTS, SETTINGS = "results.npz", "settings.json"


@dataclass
class Explanation:
    """One explained test example: its input, labels, and its top proponents / opponents
    (training indices, values and inputs, best first)."""

    index: int
    x: Any
    label: Any
    predicted: Any
    proponents: np.ndarray
    proponent_values: np.ndarray
    proponent_x: np.ndarray
    opponents: np.ndarray
    opponent_values: np.ndarray
    opponent_x: np.ndarray


@dataclass
class ReportData:
    """The content of a report.

    Attributes:
        scores: self-influence of every training example `(n_train,)`, or None.
        given, predicted: class (or value) per training example `(n_train,)`, or None.
        shown_index, shown_x: the training examples shown as most suspicious, best first.
        explanations: explained test examples.
        noise_mask: True where a label is known to be wrong `(n_train,)` (draws the detection curve).
        image_shape: "auto", "none" or "H,W[,C]": how 1-D inputs are drawn (see `report.render`).
    """

    title: str
    scores: np.ndarray | None = None
    given: np.ndarray | None = None
    predicted: np.ndarray | None = None
    class_names: list[str] | None = None
    shown_index: np.ndarray | None = None
    shown_x: np.ndarray | None = None
    explanations: list[Explanation] = field(default_factory=list)
    noise_mask: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    image_shape: str = "auto"

    def label_text(self, labels: np.ndarray | None, i: int) -> str:
        """Label `i` of `labels` as text, with its class name when known."""
        if labels is None:
            return ""
        value = labels[i]
        if np.issubdtype(np.asarray(value).dtype, np.integer) and self.class_names is not None:
            if 0 <= int(value) < len(self.class_names):
                return f"{int(value)} ({self.class_names[int(value)]})"
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            return f"{float(value):.4g}"
        return str(value)

    def set_explanations(
        self,
        matrix: np.ndarray,
        queries: np.ndarray,
        query_x: np.ndarray,
        query_labels: np.ndarray,
        query_predicted: np.ndarray,
        train_x: np.ndarray,
        k: int,
    ) -> None:
        """Fill `explanations` from a score matrix `(n_queries, n_train)` (positive: proponent)."""
        self.explanations = []
        for row, t in enumerate(queries):
            order = np.argsort(-matrix[row], kind="stable")
            top, bottom = order[:k], order[::-1][:k]
            self.explanations.append(
                Explanation(
                    int(t), query_x[row], query_labels[row], query_predicted[row],
                    top, matrix[row, top], train_x[top], bottom, matrix[row, bottom], train_x[bottom],
                )
            )  # fmt: skip

    def save(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write `results.npz` and `settings.json` into `folder`; return their paths."""
        arrays: dict[str, Any] = {}
        for name in ("scores", "given", "predicted", "shown_index", "shown_x", "noise_mask"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value)
        for j, item in enumerate(self.explanations):
            for name, value in vars(item).items():
                arrays[f"explanation{j}_{name}"] = np.asarray(value)
        results, settings = Path(folder) / RESULTS, Path(folder) / SETTINGS
        np.savez_compressed(results, **arrays)
        meta = {
            "title": self.title,
            "class_names": self.class_names,
            "n_explanations": len(self.explanations),
            "image_shape": self.image_shape,
            "settings": self.settings,
        }
        settings.write_text(json.dumps(meta, indent=1, default=_plain))
        return [results, settings]

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ReportData:
        """Read what `save` wrote (the output folder of `vestigia self-influence` / `explain`).

        Raises:
            InvalidDataError: the folder holds no `results.npz` / `settings.json`.
        """
        results, settings = Path(folder) / RESULTS, Path(folder) / SETTINGS
        if not results.is_file() or not settings.is_file():
            raise InvalidDataError(
                f"`--results` must be a folder written by `vestigia self-influence` or `vestigia explain` (with "
                f"{RESULTS} and {SETTINGS}). Received: --results={str(folder)!r}"
            )
        meta = json.loads(settings.read_text())
        with np.load(results, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        data = cls(
            title=meta["title"],
            class_names=meta.get("class_names"),
            settings=meta.get("settings", {}),
            image_shape=meta.get("image_shape", "auto"),
        )
        for name in ("scores", "given", "predicted", "shown_index", "shown_x", "noise_mask"):
            setattr(data, name, arrays.get(name))
        for j in range(int(meta.get("n_explanations", 0))):
            fields = {name: arrays[f"explanation{j}_{name}"] for name in Explanation.__dataclass_fields__}
            fields["index"] = int(fields["index"])
            data.explanations.append(Explanation(**fields))
        return data


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def load_noise_mask(path: str | os.PathLike[str], n_train: int) -> np.ndarray:
    """A boolean mask `(n_train,)` of the known wrong labels, from `.npy` (bools / 0-1, or indices) or text.

    Raises:
        InvalidDataError: a file that does not exist or does not match `n_train`.
    """
    where = Path(path)
    if not where.is_file():
        raise InvalidDataError(f"`--noise-mask` names no file. Received: --noise-mask={str(path)!r}")
    values = np.load(where, allow_pickle=False) if where.suffix == ".npy" else np.loadtxt(where, ndmin=1)
    values = np.asarray(values).reshape(-1)
    if values.dtype == bool or (values.size == n_train and set(np.unique(values)) <= {0, 1}):
        mask = values.astype(bool)
    else:
        if values.size and (values.min() < 0 or values.max() >= n_train or np.any(values % 1)):
            raise InvalidDataError(
                f"`--noise-mask` holds neither {n_train} booleans nor indices in [0, {n_train}). Received "
                f"{values.size} values in [{values.min()}, {values.max()}]"
            )
        mask = np.zeros(n_train, dtype=bool)
        mask[values.astype(np.int64)] = True
    if mask.size != n_train:
        raise InvalidDataError(
            f"`--noise-mask` must have one entry per training example ({n_train}). Received: {mask.size}"
        )
    return mask
