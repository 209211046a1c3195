"""The user's artefacts for the `vestigia` command: a saved model, its loss, its data, an output folder.

Data come in three forms, all read into NumPy arrays `(x, y)` in a fixed order:

- an `.npz` file holding arrays `x` and `y`;
- a folder of images with one sub-folder per class, as `keras.utils.image_dataset_from_directory`
  reads it (classes in alphabetical order, images resized to the model's input size);
- a directory written by `tf.data.Dataset.save` whose elements are `(x, y)` (batched or not).

Labels are fitted to the model's output: integer labels become one-hot rows when the loss is a
categorical (not sparse) one; labels outside the output's classes, or one-hot rows of another
width, are refused before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.errors import InvalidDataError, InvalidModelError

__all__ = ["Dataset", "check_output_dir", "fit_labels", "load_data", "load_model", "resolve_loss"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class Dataset:
    """Inputs `x (n, ...)`, labels `y (n, ...)` as the loss takes them, and the class names if known."""

    x: np.ndarray
    y: np.ndarray
    source: str
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def check_output_dir(path: str | os.PathLike[str], argument: str = "--output") -> Path:
    """Create `path` if needed and check that a file can be written there, before any work.

    Raises:
        InvalidDataError: the path is a file, or the folder cannot be created or written.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidDataError(f"`{argument}` must be a folder, but it is a file. Received: {argument}={str(path)!r}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".vestigia-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InvalidDataError(
            f"`{argument}` cannot be written ({error.strerror or error}). Received: {argument}={str(path)!r}; "
            "choose a folder you can write to."
        ) from None
    return folder


def load_model(path: str | os.PathLike[str]) -> keras.Model:
    """Load a `.keras` (or `.h5`) model saved by `model.save`, compiled if it was.

    Raises:
        InvalidModelError: no such file, or a file Keras cannot load (with Keras's reason).
    """
    if not os.path.isfile(path):
        raise InvalidModelError(f"`--model` names no file. Received: --model={str(path)!r}")
    compile_error = None
    try:
        model = keras.models.load_model(path, compile=True)
    except Exception as error:  # Keras raises many types for a bad file
        compile_error = _first_line(error)
        try:  # e.g. an unregistered custom loss: the architecture and weights may still load
            model = keras.models.load_model(path, compile=False)
        except Exception:
            model = None
    if model is None:
        reason = compile_error
        raise InvalidModelError(
            f"`--model` could not be loaded by keras.models.load_model: {reason}. Received: --model={str(path)!r}; "
            "save the model with model.save('model.keras') (custom layers must be registered with "
            "@keras.saving.register_keras_serializable)."
        ) from None
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"`--model` holds a {type(model).__name__}, not a Keras model. Received: {path!r}")
    model._vestigia_compile_error = compile_error  # why the compiled loss is missing, if it is
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _unreduced(loss: keras.losses.Loss, origin: str) -> keras.losses.Loss:
    """A copy of a `Loss` object rebuilt from its config with `reduction=None`."""
    try:
        config = loss.get_config()
        config["reduction"] = None
        rebuilt = type(loss).from_config(config)
    except Exception as error:
        raise InvalidModelError(
            f"The {origin} {type(loss).__name__} cannot be rebuilt with reduction=None from its config ({error}). "
            "Pass --loss with a Keras loss name, e.g. --loss sparse_categorical_crossentropy."
        ) from None
    return rebuilt


def resolve_loss(model: keras.Model, name: str | None = None, from_logits: bool | None = None) -> keras.losses.Loss:
    """The per-example loss to attribute: `name` if given, else the model's compiled loss, unreduced.

    Args:
        model: the loaded model.
        name: a Keras loss name ("categorical_crossentropy", "mse", ...) or None for the compiled loss.
        from_logits: override `from_logits` of a cross-entropy (None: keep the compiled setting).

    Raises:
        InvalidModelError: no compiled loss and no name, several losses (a multi-output
            model), or a loss that cannot be made unreduced.
    """
    origin = "`--loss`" if name else "model's compiled loss"
    spec: Any = name if name else getattr(model, "loss", None)
    if spec is None and getattr(model, "_vestigia_compile_error", None):
        raise InvalidModelError(
            f"The model's compiled loss could not be restored ({model._vestigia_compile_error}). Pass --loss with a "
            "Keras loss name (e.g. --loss sparse_categorical_crossentropy), or register the custom loss with "
            "@keras.saving.register_keras_serializable."
        )
    if spec is None:
        raise InvalidModelError(
            "The model was saved without a compiled loss, so there is no loss to attribute. Pass --loss with a "
            "Keras loss name (e.g. --loss sparse_categorical_crossentropy, and --from-logits if the model "
            "outputs logits). Received: --loss=None"
        )
    if isinstance(spec, (list, tuple, dict)):
        raise InvalidModelError(
            f"The model was compiled with several losses ({spec!r}); influence needs one. Pass --loss with one "
            "Keras loss name that takes the model's whole output."
        )
    if isinstance(spec, str):
        try:
            found = keras.losses.get(spec)
        except (ValueError, TypeError):
            raise InvalidModelError(
                f"{origin} is not a Keras loss name. Received: {spec!r}; use e.g. categorical_crossentropy, "
                "sparse_categorical_crossentropy, binary_crossentropy, mean_squared_error."
            ) from None
        if isinstance(found, keras.losses.Loss):
            spec = found
        else:  # a plain function: per-example already; wrap it so that options can be set
            options = {"from_logits": bool(from_logits)} if from_logits is not None else {}
            return keras.losses.LossFunctionWrapper(found, reduction=None, name=spec, **options)
    if not isinstance(spec, keras.losses.Loss):
        raise InvalidModelError(
            f"The {origin} is a {type(spec).__name__}, which Vestigia cannot make unreduced. Pass --loss with a "
            "Keras loss name."
        )
    loss = _unreduced(spec, origin)
    if from_logits is not None:
        config = loss.get_config()
        if "from_logits" not in config:
            raise InvalidModelError(f"`--from-logits` does not apply to {type(loss).__name__}.")
        loss = type(loss).from_config({**config, "from_logits": bool(from_logits)})
    return loss


def is_sparse_loss(loss: Any) -> bool:
    """Whether the loss takes integer class labels (a sparse cross-entropy) rather than one-hot rows."""
    text = (type(loss).__name__ + " " + str(getattr(loss, "name", "")) + " " + str(getattr(loss, "fn", ""))).lower()
    return "sparse" in text


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" not in keys or "y" not in keys:
                raise InvalidDataError(
                    f"An .npz data file must hold arrays named 'x' and 'y'. Received: {str(path)!r} with {keys}; "
                    "save it with numpy.savez(path, x=inputs, y=labels)."
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as error:
        if isinstance(error, InvalidDataError):
            raise
        raise InvalidDataError(f"{str(path)!r} is not a readable .npz file ({error}).") from None
    return Dataset(x, y, str(path))


def _image_folder(path: Path, model: keras.Model) -> Dataset:
    shape = tuple(model.inputs[0].shape[1:]) if model.inputs else ()
    if len(shape) != 3 or shape[0] is None or shape[2] not in (1, 3, 4):
        raise InvalidDataError(
            f"A folder of images needs a model whose input is (height, width, channels) with 1, 3 or 4 channels. "
            f"Received: the model's input shape {shape} and the folder {str(path)!r}."
        )
    color_mode = {1: "grayscale", 3: "rgb", 4: "rgba"}[int(shape[2])]
    dataset = keras.utils.image_dataset_from_directory(
        str(path),
        labels="inferred",
        label_mode="int",
        color_mode=color_mode,
        image_size=(int(shape[0]), int(shape[1])),
        shuffle=False,
        batch_size=256,
        verbose=False,
    )
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(images.numpy())
        ys.append(labels.numpy())
    if not xs:
        raise InvalidDataError(f"The image folder {str(path)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    return Dataset(np.concatenate(xs), np.concatenate(ys), str(path), list(dataset.class_names))


def _saved_dataset(path: Path) -> Dataset:
    try:
        dataset = tf.data.Dataset.load(str(path))
    except Exception as error:
        raise InvalidDataError(f"{str(path)!r} could not be read by tf.data.Dataset.load ({error}).") from None
    spec = dataset.element_spec
    if not isinstance(spec, (tuple, list)) or len(spec) < 2:
        raise InvalidDataError(
            f"A saved tf.data.Dataset must yield (x, y) pairs. Received: element_spec={spec!r} in {str(path)!r}"
        )
    batched = bool(spec[0].shape.rank and spec[0].shape[0] is None)
    xs, ys = [], []
    for element in dataset:
        x, y = element[0].numpy(), element[1].numpy()
        xs.append(x if batched else x[None])
        ys.append(y if batched else y[None])
    if not xs:
        raise InvalidDataError(f"The saved dataset {str(path)!r} is empty.")
    return Dataset(np.concatenate(xs), np.concatenate(ys), str(path))


def load_data(path: str | os.PathLike[str], model: keras.Model, argument: str = "--train") -> Dataset:
    """Read an `.npz`, an image folder or a saved `tf.data.Dataset` into arrays (see the module).

    Raises:
        InvalidDataError: a path that does not exist or is none of the three forms.
    """
    where = Path(path)
    if where.is_file() and where.suffix == ".npz":
        data = _load_npz(where)
    elif where.is_dir() and (where / "dataset_spec.pb").exists():
        data = _saved_dataset(where)
    elif where.is_dir() and any(child.is_dir() for child in where.iterdir()):
        data = _image_folder(where, model)
    else:
        raise InvalidDataError(
            f"`{argument}` must be an .npz file with arrays x and y, a folder with one sub-folder of images per "
            f"class, or a folder written by tf.data.Dataset.save. Received: {argument}={str(path)!r}"
        )
    if len(data.x) == 0 or len(data.y) != len(data.x):
        raise InvalidDataError(
            f"`{argument}` must hold as many labels as inputs, at least one. Received: {len(data.x)} inputs "
            f"and {len(data.y)} labels in {str(path)!r}"
        )
    if np.issubdtype(data.x.dtype, np.number) and data.x.dtype != np.float32:
        data.x = data.x.astype(np.float32)
    return data


def _output_width(model: keras.Model) -> int | None:
    shape = model.outputs[0].shape if getattr(model, "outputs", None) else None
    return int(shape[-1]) if shape is not None and shape[-1] is not None else None


def check_inputs_fit(model: keras.Model, data: Dataset, argument: str) -> None:
    """Run the model on two examples; raise `InvalidDataError` (with both shapes) if the inputs do not fit."""
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if expected is not None and len(expected) != data.x.ndim - 1:
        raise InvalidDataError(
            f"`{argument}` inputs have shape {data.x.shape[1:]} per example but the model takes {expected}. "
            "Reshape the data (or save it as the model was trained on it)."
        )
    try:
        model(data.x[:2], training=False)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InvalidDataError(
            f"`{argument}` inputs of shape {data.x.shape[1:]} per example do not fit the model's input "
            f"{expected}: {reason}"
        ) from None


def fit_labels(model: keras.Model, loss: Any, data: Dataset, argument: str) -> np.ndarray:
    """Labels as the loss takes them: checked against the model's output, one-hot when needed.

    Raises:
        InvalidDataError: labels outside the output's classes, one-hot rows of another width, or
            labels the loss cannot compare with the output.
    """
    width = _output_width(model)
    y = data.y
    integer = np.issubdtype(y.dtype, np.integer) or (y.ndim == 1 and np.all(np.mod(y, 1) == 0))
    classifier = width is not None and width > 1
    if classifier and width is not None and integer and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        labels = y.reshape(-1).astype(np.int64)
        if labels.min() < 0 or labels.max() >= width:
            raise InvalidDataError(
                f"`{argument}` labels must be class indices in [0, {width}) for a model with {width} outputs. "
                f"Received: labels in [{labels.min()}, {labels.max()}]"
            )
        y = labels if is_sparse_loss(loss) else np.eye(width, dtype=np.float32)[labels]
    elif classifier and y.ndim == 2 and y.shape[1] != width:
        raise InvalidDataError(
            f"`{argument}` labels have {y.shape[1]} columns but the model has {width} outputs. Received: y of "
            f"shape {y.shape}"
        )
    else:
        y = y.astype(np.float32) if np.issubdtype(y.dtype, np.number) else y
    try:
        values = loss(y[:2], model(data.x[:2], training=False))
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InvalidDataError(
            f"`{argument}` labels of shape {data.y.shape[1:]} per example do not fit the model's output of shape "
            f"{tuple(model.outputs[0].shape[1:])} under the loss {type(loss).__name__}: {reason}"
        ) from None
    if tuple(np.shape(values)) != (min(2, len(y)),):
        raise InvalidModelError(
            f"The loss {type(loss).__name__} returned shape {tuple(np.shape(values))} for 2 examples, not one "
            "value per example; pass --loss with a Keras loss name."
        )
    return y


def predicted_labels(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's predicted class per example (argmax; a threshold at 0.5 / 0 for one output), or
    the raw output when it is not a classifier."""
    outputs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return np.argmax(outputs, axis=1)
    return outputs.reshape(len(x), -1)[:, 0]


def class_indices(y: np.ndarray) -> np.ndarray:
    """Given labels as class indices (argmax of one-hot rows) where they are classes, else as they are."""
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    return y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
