"""On-disk store of a retraining experiment, so that ground truth is computed once and resumed.

Layout of the directory `path`:

    manifest.json          settings of the run (kind, sizes, seed, measure, data fingerprint)
    masks.npy              (n_jobs, n_train) bool, the training examples kept by each retraining
    outputs/job_00000.npy  (n_test,) float64 measured outputs, one file per finished retraining

Every file is written to a temporary name and renamed (atomic on POSIX and Windows), the
manifest last when the run is created, so an interrupted run leaves only whole files. Opening
an existing directory with different settings raises instead of mixing two experiments.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vestigia.errors import InvalidDataError

FORMAT_VERSION = 1


def data_fingerprint(*arrays: Any) -> str:
    """SHA-256 of the shapes, dtypes and bytes of arrays (or tuples / lists / dicts of arrays)."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, dict):
            for key in sorted(item):
                digest.update(str(key).encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"seq{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            array = np.ascontiguousarray(np.asarray(item))
            digest.update(f"{array.shape}{array.dtype.str}".encode())
            digest.update(array.data.cast("B"))

    for array in arrays:
        feed(array)
    return digest.hexdigest()


def callable_name(function: Any) -> str:
    """A name of `function` stable across processes (for the manifest)."""
    if isinstance(function, functools.partial):
        return f"partial({callable_name(function.func)}, args={function.args!r}, keywords={function.keywords!r})"
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def _atomic_write(target: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file next to `target`, then rename it to `target`."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, target)


class RetrainingStore:
    """Directory holding the masks and per-retraining outputs of one experiment.

    Args:
        path: the directory (created if missing).
        settings: JSON-serialisable settings; must equal the stored ones when the directory exists.
        masks: `(n_jobs, n_train)` boolean masks; must equal the stored ones.
        n_test: length of each stored output vector.

    Raises:
        ValueError: the directory holds a run with other settings or masks.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any], masks: np.ndarray, n_test: int):
        self.path = Path(path)
        self.n_test = n_test
        self.outputs_dir = self.path / "outputs"
        settings = json.loads(json.dumps({"format": FORMAT_VERSION, **settings}))
        manifest = self.path / "manifest.json"
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            self._check_settings(stored, settings)
            stored_masks = np.load(self.path / "masks.npy")
            if stored_masks.shape != masks.shape or not np.array_equal(stored_masks, masks):
                raise ValueError(
                    f"`path` ({self.path}) holds masks that differ from the requested ones although the settings "
                    "match. Use a new `path` or delete this one."
                )
        else:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            if any(self.outputs_dir.glob("job_*.npy")):
                raise ValueError(
                    f"`path` ({self.path}) holds outputs but no manifest.json: refusing to mix them with a new "
                    "run. Use a new `path` or delete this one."
                )
            _atomic_write(self.path / "masks.npy", lambda handle: np.save(handle, masks))
            _atomic_write(manifest, lambda handle: handle.write(json.dumps(settings, indent=2).encode()))

    def _check_settings(self, stored: dict[str, Any], requested: dict[str, Any]) -> None:
        differences = [
            f"{key}: stored {stored.get(key)!r}, requested {requested.get(key)!r}"
            for key in sorted(set(stored) | set(requested))
            if stored.get(key) != requested.get(key)
        ]
        if differences:
            raise ValueError(
                f"`path` ({self.path}) holds a retraining run with different settings ("
                + "; ".join(differences)
                + "). Use a new `path`, delete this one, or rerun with the stored settings."
            )

    def _job_file(self, job: int) -> Path:
        return self.outputs_dir / f"job_{job:05d}.npy"

    def load(self, job: int) -> np.ndarray | None:
        """The stored outputs `(n_test,)` of retraining `job`, or None if it has not finished."""
        target = self._job_file(job)
        if not target.exists():
            return None
        values = np.load(target)
        if values.shape != (self.n_test,):
            raise InvalidDataError(
                f"{target} holds outputs of shape {values.shape}, expected ({self.n_test},). Delete it to recompute."
            )
        return values

    def save(self, job: int, values: np.ndarray) -> None:
        """Store the outputs of retraining `job` atomically."""
        _atomic_write(self._job_file(job), lambda handle: np.save(handle, values))
