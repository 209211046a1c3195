"""Fingerprints of a model's weights, a data set and settings, so a store is never reused by mistake.

A store on disk (features, factors, scores) is only valid for the model, data and settings that
made it. Each is reduced to a short, stable digest (SHA-256, hex):

- **weights**: the bytes, shape and dtype of *every* weight of the model (trainable or not, in
  `model.weights` order, with their paths), the positions and paths of the watched weights, and the names and
  classes of the layers. Retraining one step, watching another layer or renaming a layer all
  change it. Keras numbers automatic names per process (`dense`, then `dense_1` for the same
  model built again), so a numeric suffix `_<n>` of a name or path segment is dropped before
  hashing: rebuilding the same model in the same process keeps its fingerprint (the order of
  layers and weights still tells them apart).
- **data**: the number of examples, the element spec (per-example shape and dtype of every
  component, batch dimension removed) and a content hash of the samples. Each component is
  hashed as one stream of C-ordered rows, so the digest does not depend on the batch size.
  By default every example is hashed (BLAKE2b runs at about 1 GB/s, cheap next to the gradient
  pass that a store saves); `stride=s` hashes only examples `0, s, 2s, ...` (size and spec are
  still exact), for data sets too large to read twice.
- **settings**: a canonical JSON (sorted keys, no spaces, NumPy scalars and arrays as lists,
  floats by `repr`), so equal settings give equal digests across processes and machines.

`Fingerprint` holds the three digests (and a summary for error messages); `differences` names
what changed between two of them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from vestigia.data.dataset import ProcessBatchFn, as_batched_dataset, default_process_batch
from vestigia.errors import InvalidDataError, check_positive_int

__all__ = [
    "Fingerprint",
    "canonical_json",
    "fingerprint",
    "fingerprint_data",
    "fingerprint_settings",
    "fingerprint_weights",
]


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def _array_record(name: str, value: Any) -> bytes:
    array = np.ascontiguousarray(np.asarray(value))
    header = json.dumps([name, list(array.shape), array.dtype.str]).encode()
    return header + b"\0" + hashlib.blake2b(array.tobytes(), digest_size=32).digest()


def _model_and_watched(model: Any) -> tuple[Any, list[Any]]:
    """Accept a Keras model, an `InfluenceModel` (`.model`, `.weights`) or a list of weights."""
    if hasattr(model, "model") and hasattr(model, "weights") and isinstance(model.weights, list):
        return model.model, list(model.weights)
    if isinstance(model, (list, tuple)):
        return None, list(model)
    if hasattr(model, "weights") and hasattr(model, "layers"):
        return model, list(model.trainable_weights)
    raise TypeError(
        "`model` must be a Keras model, an InfluenceModel or a list of weights. "
        f"Received: model of type {type(model).__name__}"
    )


def _normalise(name: str) -> str:
    return re.sub(r"_\d+(?=/|$)", "", name)


def _weight_name(weight: Any, index: int) -> str:
    return _normalise(str(getattr(weight, "path", None) or getattr(weight, "name", None) or f"weight_{index}"))


def fingerprint_weights(model: Any, watched: Iterable[Any] | None = None) -> str:
    """SHA-256 of every weight's bytes, shape and dtype, the watched weights' paths and the layers.

    Args:
        model: a Keras model, an `InfluenceModel` (its model and watched weights are used), or a
            list of weights / arrays (then only those are hashed, named by position or path).
        watched: the watched weights; default: those of the `InfluenceModel`, or the model's
            trainable weights.

    Returns:
        A 64-character hex digest.
    """
    keras_model, default_watched = _model_and_watched(model)
    watched = default_watched if watched is None else list(watched)
    weights = list(keras_model.weights) if keras_model is not None else watched
    records = [_array_record(_weight_name(w, i), w) for i, w in enumerate(weights)]
    position = {id(w): i for i, w in enumerate(weights)}
    watched_names = [[position.get(id(w), -1), _weight_name(w, i)] for i, w in enumerate(watched)]
    layers = (
        [] if keras_model is None else [[_normalise(layer.name), type(layer).__name__] for layer in keras_model.layers]
    )
    meta = json.dumps({"watched": watched_names, "layers": layers}, sort_keys=True).encode()
    return _sha256(meta, *records)


def _component_spec(spec: Any) -> list[Any]:
    return [[list(s.shape[1:]), s.dtype.name] for s in tf.nest.flatten(spec)]


def fingerprint_data(
    data: Any,
    process_batch_fn: ProcessBatchFn = default_process_batch,
    stride: int = 1,
) -> dict[str, Any]:
    """Size, element spec and content hash of a batched data set, independent of its batch size.

    Args:
        data: a batched `tf.data.Dataset` or a tuple of arrays `(x, y[, sample_weight])`.
        process_batch_fn: unused for hashing (the raw elements are hashed); kept so callers can
            pass what they pass to the calculators.
        stride: hash the content of every `stride`-th example (1: all of them).

    Returns:
        `{"n": int, "spec": [[shape, dtype], ...], "stride": int, "sha256": str}`.

    Raises:
        InvalidDataError: if `data` is not batched data or is empty.
    """
    del process_batch_fn
    stride = check_positive_int("stride", stride)
    dataset = as_batched_dataset(data, "data")
    spec = _component_spec(dataset.element_spec)
    hashers = [hashlib.blake2b(digest_size=32) for _ in spec]
    n = 0
    for element in dataset:
        parts = [np.asarray(p) for p in tf.nest.flatten(element)]
        size = int(parts[0].shape[0])
        if stride > 1:
            first = (-n) % stride
            parts = [p[first::stride] for p in parts]
        for hasher, part in zip(hashers, parts):
            hasher.update(np.ascontiguousarray(part).tobytes())
        n += size
    if n == 0:
        raise InvalidDataError("`data` is empty: iterating it yielded no examples, so it cannot be fingerprinted.")
    content = _sha256(json.dumps([n, spec, stride]).encode(), *(h.digest() for h in hashers))
    return {"n": n, "spec": spec, "stride": stride, "sha256": content}


def _to_json(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"float": repr(value)}
        return value
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return _to_json(value.item())
    if isinstance(value, np.ndarray):
        return {"array": _to_json(value.tolist()), "dtype": value.dtype.str}
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    raise TypeError(
        "`settings` must hold only numbers, strings, booleans, None, enums, paths, NumPy values, "
        f"lists and dicts. Received a value of type {type(value).__name__}: {value!r:.80}"
    )


def canonical_json(settings: Mapping[str, Any]) -> str:
    """The settings as canonical JSON: sorted keys, no spaces, floats by shortest round-trip repr."""
    return json.dumps(_to_json(dict(settings)), sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint_settings(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of `canonical_json(settings)`."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a store was made from: digests of the weights, the data and the settings.

    Attributes:
        weights: `fingerprint_weights` digest, or "" when the store does not depend on a model.
        data: `fingerprint_data` result (`n`, `spec`, `stride`, `sha256`), or {} when not used.
        settings: canonical JSON of the settings (kept readable for error messages).
    """

    weights: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    settings: str = "{}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's `fingerprint` entry)."""
        return {"weights": self.weights, "data": dict(self.data), "settings": self.settings}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Fingerprint:
        """Inverse of `to_dict`."""
        return cls(str(record.get("weights", "")), dict(record.get("data", {})), str(record.get("settings", "{}")))

    @property
    def digest(self) -> str:
        """One SHA-256 over the three parts."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable list of what differs between `self` (expected) and `other` (found)."""
        found = []
        if self.weights != other.weights:
            found.append(f"model weights (expected {self.weights[:12]}, found {other.weights[:12]})")
        for key in ("n", "spec", "stride", "sha256"):
            mine, theirs = self.data.get(key), other.data.get(key)
            if mine != theirs:
                shown = (str(mine)[:12], str(theirs)[:12]) if key == "sha256" else (mine, theirs)
                found.append(f"data {key} (expected {shown[0]}, found {shown[1]})")
        if self.settings != other.settings:
            mine_s, theirs_s = json.loads(self.settings), json.loads(other.settings)
            keys = sorted(k for k in set(mine_s) | set(theirs_s) if mine_s.get(k) != theirs_s.get(k))
            found.append(
                "settings " + ", ".join(f"{k} (expected {mine_s.get(k)!r}, found {theirs_s.get(k)!r})" for k in keys)
            )
        return found


def fingerprint(
    model: Any = None,
    data: Any = None,
    settings: Mapping[str, Any] | None = None,
    *,
    process_batch_fn: ProcessBatchFn = default_process_batch,
    stride: int = 1,
) -> Fingerprint:
    """The `Fingerprint` of a model (or InfluenceModel), a data set and settings; any may be None."""
    return Fingerprint(
        weights="" if model is None else fingerprint_weights(model),
        data={} if data is None else fingerprint_data(data, process_batch_fn, stride),
        settings=canonical_json(settings or {}),
    )
