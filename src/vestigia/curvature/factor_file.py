"""Kronecker factors on disk, with the fingerprint of the model, data and settings that made them.

One `.npz` file: per layer `q_in`, `q_out`, `eigenvalues`, `damping`; per other weight its
diagonal; and the `Fingerprint` (see `vestigia.store`) as JSON. Loading checks it against the
fingerprint of the model and data at hand and refuses a mismatch, naming what differs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vestigia.curvature.kronecker_factors import LayerFactors
from vestigia.errors import InvalidDataError
from vestigia.store import Fingerprint


def save_factors(
    path: str | os.PathLike[str],
    layers: list[LayerFactors],
    diagonals: list[tuple[np.ndarray, float]],
    found: Fingerprint,
) -> None:
    """Write the factors and their fingerprint to `path` (`.npz`), atomically (temp file, rename)."""
    arrays: dict[str, Any] = {"fingerprint": np.array(json.dumps(found.to_dict()))}
    for i, layer in enumerate(layers):
        arrays[f"layer{i}_name"] = np.array(layer.name)
        if layer.q_in is not None:
            arrays[f"layer{i}_q_in"] = layer.q_in
        arrays[f"layer{i}_q_out"] = layer.q_out
        arrays[f"layer{i}_eigenvalues"] = layer.eigenvalues
        arrays[f"layer{i}_damping"] = np.array(layer.damping)
    for i, (diagonal, damping) in enumerate(diagonals):
        arrays[f"other{i}_diagonal"] = diagonal
        arrays[f"other{i}_damping"] = np.array(damping)
    path = os.fspath(path)
    temporary = path + ".partial.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def load_factors(
    path: str | os.PathLike[str], expected: Fingerprint, n_layers: int, n_others: int
) -> tuple[list[LayerFactors], list[tuple[np.ndarray, float]]]:
    """Read factors saved by `save_factors`, refusing them unless their fingerprint is `expected`.

    Raises:
        InvalidDataError: the file was made for other weights, layers, data or settings (the
            message names what differs), or holds another number of layers.
    """
    with np.load(os.fspath(path), allow_pickle=False) as data:
        found = Fingerprint.from_dict(json.loads(str(data["fingerprint"])))
        differences = expected.differences(found)
        if differences:
            raise InvalidDataError(
                f"The factor file {os.fspath(path)!r} does not match this model and data: "
                f"{'; '.join(differences)}. Delete it or pass another `factors_path` to recompute the factors."
            )
        stored = sum(1 for key in data.files if key.endswith("_q_out"))
        if stored != n_layers or sum(1 for key in data.files if key.endswith("_diagonal")) != n_others:
            raise InvalidDataError(
                f"The factor file {os.fspath(path)!r} holds {stored} layers; this model has {n_layers}."
            )
        layers = [
            LayerFactors(
                str(data[f"layer{i}_name"]),
                data[f"layer{i}_q_in"] if f"layer{i}_q_in" in data.files else None,
                data[f"layer{i}_q_out"],
                data[f"layer{i}_eigenvalues"],
                float(data[f"layer{i}_damping"]),
            )
            for i in range(n_layers)
        ]
        diagonals = [(data[f"other{i}_diagonal"], float(data[f"other{i}_damping"])) for i in range(n_others)]
    return layers, diagonals
