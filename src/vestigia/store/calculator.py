"""Stores for calculators: `store=` makes self-influence and training-side vectors resumable.

A calculator's store is fingerprinted by its model(s) (every weight and the watched ones),
the training data it scores, and its settings: the calculator's class and its plain public
attributes (`damping`, `normalize`, learning rates, ...), those of its IHVP solver, and the
fingerprint of the data defining the Hessian. Chunk `i` of every array is training batch `i`,
so batches must have one size (the last may be smaller).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vestigia.data.dataset import Batch
from vestigia.errors import InvalidDataError
from vestigia.store.chunked import ChunkedStore
from vestigia.store.fingerprint import Fingerprint, canonical_json, fingerprint_data, fingerprint_weights

_PLAIN = (bool, int, float, str, type(None))


def _plain_attributes(obj: Any) -> dict[str, Any]:
    """Public attributes that are numbers, strings, None, or short lists of numbers."""
    found: dict[str, Any] = {"class": type(obj).__qualname__}
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, _PLAIN) or isinstance(value, np.generic):
            found[name] = value
        elif isinstance(value, (list, tuple)) and len(value) <= 64 and all(isinstance(v, _PLAIN) for v in value):
            found[name] = list(value)
    return found


def calculator_fingerprint(calculator: Any, train_set: Any) -> Fingerprint:
    """The `Fingerprint` of what a calculator's training-side results depend on."""
    models = getattr(calculator, "models", None) or [getattr(calculator, "model", None)]
    weights = "+".join(fingerprint_weights(m) for m in models if m is not None)
    settings: dict[str, Any] = {"calculator": _plain_attributes(calculator)}
    solver = getattr(calculator, "ihvp_calculator", None)
    if solver is not None:
        settings["ihvp"] = _plain_attributes(solver)
    hessian_data = getattr(calculator, "train_set", None)
    if hessian_data is not None:
        settings["hessian_data"] = fingerprint_data(hessian_data)["sha256"]
    data = fingerprint_data(train_set)
    return Fingerprint(weights=weights, data=data, settings=canonical_json(settings))


def open_calculator_store(calculator: Any, train_set: Any, path: str | os.PathLike[str]) -> ChunkedStore:
    """Open (or create) the store at `path` for `calculator` and `train_set`; refuse a mismatch."""
    return ChunkedStore(path, calculator_fingerprint(calculator, train_set))


def stored_rows(
    store: ChunkedStore,
    names: list[str],
    batches: Iterator[Batch],
    compute: Callable[[Batch], list[np.ndarray]],
) -> Iterator[list[np.ndarray]]:
    """Yield `compute(batch)` (one array per name) for each training batch, read from the arrays
    `names` of `store` when that chunk is there in all of them and verified, else computed and
    written (atomically)."""
    n_train = int(store.fingerprint.data["n"])
    stored = [store.array(name) if name in store else None for name in names]
    chunk_rows = next((s.chunk_rows for s in stored if s is not None), None)
    start = 0
    for index, batch in enumerate(batches):
        chunk_rows = batch.size if chunk_rows is None else chunk_rows
        if batch.size != chunk_rows and start + batch.size != n_train:
            raise InvalidDataError(
                f"`store=` needs training batches of one size (the last may be smaller). Received a batch of "
                f"{batch.size} at example {start} after batches of {chunk_rows}. Rebatch the data with `.batch(n)`."
            )
        start += batch.size
        values = _read_all(stored, index)
        if values is None:
            values = [np.asarray(v) for v in compute(batch)]
            for i, (name, v) in enumerate(zip(names, values)):
                if stored[i] is None:
                    stored[i] = store.array(name, (n_train, *v.shape[1:]), chunk_rows, v.dtype)
                stored[i].write_chunk(index, v)  # type: ignore[union-attr]
        yield values


def _read_all(stored: list[Any], index: int) -> list[np.ndarray] | None:
    """Chunk `index` of every array, or None if one is absent or fails its checksum."""
    if any(s is None or not s.has_chunk(index, verify=False) for s in stored):
        return None
    try:
        return [s.read_chunk(index) for s in stored]
    except Exception:  # a checksum failure: recompute the chunk
        return None
