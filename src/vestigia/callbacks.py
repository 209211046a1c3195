"""Keras-native capture: checkpoints and learning rates saved during `model.fit`, for TracIn.

    recorder = vestigia.callbacks.CheckpointRecorder("run/checkpoints")
    model.fit(x, y, epochs=5, callbacks=[recorder])
    tracin = recorder.tracin()                       # or TracIn.from_checkpoints("run/checkpoints")

The folder holds `model.keras` (the architecture and compiled loss, saved once when training
starts), one `ckpt-XXXX.weights.h5` per checkpoint and `checkpoints.json`, the manifest: for each
checkpoint its file, epoch, optimizer step and the learning rate in effect when it was saved
(`optimizer.learning_rate`, i.e. a schedule evaluated at that step). TracIn's
`value(z_test, z) = sum_c eta_c g_c(z_test)^T g_c(z)` uses these `eta_c`; a TRAK ensemble
(`recorder.trak(train_set)`) averages over the same checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from vestigia.errors import InvalidDataError, check_positive_int

__all__ = ["CheckpointRecorder", "load_checkpoints", "tracin_from_checkpoints", "trak_from_checkpoints"]

MANIFEST = "checkpoints.json"
ARCHITECTURE = "model.keras"


def _learning_rate(model: keras.Model) -> float:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise InvalidDataError("CheckpointRecorder needs a compiled model (no optimizer found).")
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class CheckpointRecorder(keras.callbacks.Callback):
    """Save the weights and the learning rate every `every_epochs` epochs (or `every_steps` steps).

    Args:
        directory: folder for `model.keras`, the weight files and `checkpoints.json` (created;
            a manifest already there is replaced when training starts).
        every_epochs: save at the end of every `every_epochs`-th epoch (the last epoch always).
        every_steps: if given, save every `every_steps` optimizer steps instead of by epoch.

    Attributes:
        records: one dict per checkpoint: `file`, `epoch` (1-based), `step`, `learning_rate`.
    """

    def __init__(self, directory: str | os.PathLike[str], every_epochs: int = 1, every_steps: int | None = None):
        super().__init__()
        self.directory = Path(directory)
        self.every_epochs = check_positive_int("every_epochs", every_epochs)
        self.every_steps = None if every_steps is None else check_positive_int("every_steps", every_steps)
        self.records: list[dict[str, Any]] = []
        self._epoch = 0
        self._step = 0
        self._epochs = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.records = []
        self._step = 0
        self._epochs = int(self.params.get("epochs", 0) or 0) if self.params else 0
        self.model.save(self.directory / ARCHITECTURE)
        self._write_manifest()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self.every_steps is not None and self._step % self.every_steps == 0:
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every_steps is not None:
            return
        if (epoch + 1) % self.every_epochs == 0 or epoch + 1 == self._epochs:
            self._save()

    def _save(self) -> None:
        name = f"ckpt-{len(self.records) + 1:04d}.weights.h5"
        self.model.save_weights(self.directory / name)
        self.records.append(
            {"file": name, "epoch": self._epoch, "step": self._step, "learning_rate": _learning_rate(self.model)}
        )
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {"model": ARCHITECTURE, "checkpoints": self.records}
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1))

    def tracin(self, **options: Any) -> Any:
        """`TracIn` over the checkpoints saved so far (see `tracin_from_checkpoints` for `options`)."""
        return tracin_from_checkpoints(self.directory, **options)

    def trak(self, train_set: Any, **options: Any) -> Any:
        """A `TRAK` ensemble over the checkpoints saved so far (see `trak_from_checkpoints`)."""
        return trak_from_checkpoints(self.directory, train_set, **options)


def load_checkpoints(directory: str | os.PathLike[str]) -> tuple[list[keras.Model], list[float]]:
    """The models at each checkpoint of a `CheckpointRecorder` folder and their learning rates.

    Raises:
        InvalidDataError: no manifest, or one that lists no checkpoint or a missing file.
    """
    folder = Path(directory)
    path = folder / MANIFEST
    if not path.is_file():
        raise InvalidDataError(
            f"`directory` holds no {MANIFEST}: it was not written by vestigia.callbacks.CheckpointRecorder. "
            f"Received: directory={str(directory)!r}"
        )
    manifest = json.loads(path.read_text())
    records = manifest.get("checkpoints", [])
    if not records:
        raise InvalidDataError(f"{str(path)!r} lists no checkpoint: did model.fit run with the recorder?")
    models, rates = [], []
    for record in records:
        weights = folder / record["file"]
        if not weights.is_file():
            raise InvalidDataError(f"Checkpoint file {str(weights)!r} listed in {str(path)!r} is missing.")
        model = keras.models.load_model(folder / manifest.get("model", ARCHITECTURE), compile=True)
        model.load_weights(weights)
        models.append(model)
        rates.append(float(record["learning_rate"]))
    return models, rates


def tracin_from_checkpoints(
    directory: str | os.PathLike[str],
    loss_function: Any = None,
    start_layer: int | str | None = -1,
    last_layer: int | str | None = None,
) -> Any:
    """`TracIn` built in one call from a `CheckpointRecorder` folder.

    Args:
        directory: the recorder's folder.
        loss_function: unreduced loss; default: the model's compiled loss rebuilt with
            `reduction=None` (see `vestigia.app.artefacts.resolve_loss`).
        start_layer: first watched layer (index or name); default: the last layer.
        last_layer: last watched layer (default: `start_layer`).

    Returns:
        `TracIn(models, learning_rates)` with one `InfluenceModel` per checkpoint.
    """
    from vestigia.methods.tracin import TracIn

    models, rates = load_checkpoints(directory)
    watched = _watched(models, loss_function, start_layer, last_layer)
    return TracIn(watched, np.asarray(rates, dtype=np.float64).tolist())


def _watched(models: list[keras.Model], loss_function: Any, start_layer: Any, last_layer: Any) -> list[Any]:
    from vestigia.app.artefacts import resolve_loss
    from vestigia.model import InfluenceModel

    loss = resolve_loss(models[0]) if loss_function is None else loss_function
    return [InfluenceModel(m, start_layer=start_layer, last_layer=last_layer, loss_function=loss) for m in models]


def trak_from_checkpoints(
    directory: str | os.PathLike[str],
    train_set: Any,
    loss_function: Any = None,
    start_layer: int | str | None = -1,
    last_layer: int | str | None = None,
    **options: Any,
) -> Any:
    """A `TRAK` ensemble over the checkpoints of a `CheckpointRecorder` folder, in one call.

    Args:
        directory: the recorder's folder.
        train_set: training data (defines TRAK's kernel).
        loss_function, start_layer, last_layer: as in `tracin_from_checkpoints`.
        **options: `TRAK`'s settings (`projection`, `projection_dim`, `damping`, `seed`, ...).

    Returns:
        `TRAK(models, train_set, **options)` with one `InfluenceModel` per checkpoint (TRAK
        averages over them; the learning rates are not used).
    """
    from vestigia.methods.trak import TRAK

    models, _ = load_checkpoints(directory)
    return TRAK(_watched(models, loss_function, start_layer, last_layer), train_set, **options)
