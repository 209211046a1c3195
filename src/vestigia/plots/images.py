"""Image grids of influential training examples, and data-centric explanations of a prediction.

Both functions return a `matplotlib.figure.Figure` built without `pyplot`: nothing is shown, no
global backend or state is touched, and the figure is saved when `save_path` is given. In a
notebook, display it with `display(fig)` (or leave it as the cell's last value).

Images may be grayscale `(H, W)` or `(H, W, 1)`, colour `(H, W, 3)` or `(H, W, 4)`,
channels-first `(1|3, H, W)`, or flattened: `(H * W,)` is shown as a square, anything else
needs `image_shape`. Each image is min-max normalised to `[0, 1]` on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vestigia.errors import InvalidDataError, check_positive_int

_MARGIN = 0.3  # inches around the grid
_TITLE_HEIGHT = 0.45  # inches above each image for up to two title lines
_DPI = 100


def _to_numpy(value: Any) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _as_images(images: Any, image_shape: Sequence[int] | None, name: str) -> np.ndarray:
    """`(n, H, W)` grayscale or `(n, H, W, 3|4)` colour, float64, from any supported layout."""
    array = _to_numpy(images).astype(np.float64)
    if array.ndim < 2:
        raise InvalidDataError(f"`{name}` must hold one image per row. Received shape {array.shape}.")
    n = array.shape[0]
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if int(np.prod(shape)) != int(np.prod(array.shape[1:])):
            raise InvalidDataError(
                f"`image_shape` {shape} does not match the {int(np.prod(array.shape[1:]))} values of each "
                f"image of `{name}` (shape {array.shape})."
            )
        array = array.reshape((n, *shape))
    elif array.ndim == 2:
        side = math.isqrt(array.shape[1])
        if side * side != array.shape[1]:
            raise InvalidDataError(
                f"`{name}` holds flattened images of {array.shape[1]} values, not a square: pass "
                "`image_shape`, e.g. image_shape=(H, W) or (H, W, 3)."
            )
        array = array.reshape(n, side, side)
    if array.ndim == 4 and array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = np.moveaxis(array, 1, -1)  # channels-first
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (3, 4)):
        raise InvalidDataError(
            f"`{name}` images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (or flattened with "
            f"`image_shape`). Received images of shape {array.shape[1:]}."
        )
    if not np.isfinite(array).all():
        raise InvalidDataError(f"`{name}` holds NaN or Inf pixel values.")
    return array


def _normalize(image: np.ndarray) -> np.ndarray:
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _label_text(label: Any) -> str:
    """A label as text: one-hot or score rows become their argmax, whole floats become ints."""
    if isinstance(label, (str, bytes)):
        return label.decode() if isinstance(label, bytes) else label
    array = _to_numpy(label)
    if array.size > 1:
        return str(int(np.argmax(array)))
    item = array.reshape(-1)[0].item()
    if isinstance(item, bytes):
        return item.decode()
    return str(int(item)) if isinstance(item, float) and item.is_integer() else str(item)


def _entries(name: str, given: Any, n: int) -> list[Any]:
    if name == "labels":
        rows = list(given) if isinstance(given, (list, tuple)) else list(_to_numpy(given))
    else:
        rows = list(_to_numpy(given).reshape(-1))
    if len(rows) != n:
        raise InvalidDataError(f"`{name}` must have one entry per image ({n}). Received {len(rows)} entries.")
    return rows


def _titles(n: int, values: Any, indices: Any, labels: Any) -> list[str]:
    """Per image: `inf_value = v` on one line, then `#index, label y`."""
    given = {"values": values, "indices": indices, "labels": labels}
    columns = {name: _entries(name, rows, n) for name, rows in given.items() if rows is not None}
    titles = []
    for i in range(n):
        lines = [f"inf_value = {float(columns['values'][i]):.3g}"] if "values" in columns else []
        tags = [f"#{int(columns['indices'][i])}"] if "indices" in columns else []
        tags += [f"label {_label_text(columns['labels'][i])}"] if "labels" in columns else []
        lines += [", ".join(tags)] if tags else []
        titles.append("\n".join(lines))
    return titles


def _split_explanations(explanations: Any, name: str) -> tuple[Any, Any, Any]:
    """`(images, values, indices)` from a `TopK`, an `(images, values)` pair or images alone."""
    indices = getattr(explanations, "indices", None)
    if isinstance(explanations, (tuple, list)) and len(explanations) == 2:
        images, values = explanations
    elif isinstance(explanations, (tuple, list)):
        raise InvalidDataError(
            f"`{name}` must be `(images, values)` or a TopK. Received a {type(explanations).__name__} "
            f"of {len(explanations)} parts."
        )
    else:
        images, values = explanations, None
    if isinstance(images, (dict, tuple, list)):
        raise InvalidDataError(f"`{name}`: the samples must be one image array. Received a {type(images).__name__}.")
    return images, values, indices


def _draw(ax: Axes, image: np.ndarray, title: str) -> None:
    image = _normalize(image)
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def _figure(rows: int, cols: int, img_size: float, aspect: float) -> Figure:
    width = cols * img_size + 2 * _MARGIN
    height = rows * (img_size * aspect + _TITLE_HEIGHT) + 2 * _MARGIN
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _check_layout(cols: Any, img_size: Any) -> tuple[int, float]:
    cols = check_positive_int("cols", cols)
    if not isinstance(img_size, (int, float, np.floating, np.integer)) or not img_size > 0:
        raise ValueError(f"`img_size` must be a number > 0 (inches). Received: img_size={img_size!r}")
    return cols, float(img_size)


def plot_most_influential_images(
    influential_images: Any,
    cols: int = 5,
    img_size: float = 2.0,
    save_path: str | None = None,
    indices: Any = None,
    labels: Any = None,
    image_shape: Sequence[int] | None = None,
) -> Figure:
    """A grid of images titled with their influence values, training indices and labels.

    Args:
        influential_images: what `compute_top_k_from_training_dataset` returns, a `TopK` (its
            `.indices` are shown) or an `(images (k, ...), values (k,))` pair; `values` may be None.
        cols: images per row.
        img_size: width of each image, in inches.
        save_path: where to save the figure (format from the extension), if given.
        indices: training indices to show, `(k,)`; default: the TopK's.
        labels: a label per image (ints, strings, or one-hot rows), `(k,)` or `(k, classes)`.
        image_shape: the shape of one image, for flattened images that are not square.

    Returns:
        The `matplotlib.figure.Figure`, one axes per image.

    Raises:
        InvalidDataError: unusable images, or values, indices or labels not one per image.
    """
    cols, img_size = _check_layout(cols, img_size)
    images, values, top_k_indices = _split_explanations(influential_images, "influential_images")
    images = _as_images(images, image_shape, "influential_images")
    n = len(images)
    titles = _titles(n, values, top_k_indices if indices is None else indices, labels)
    rows = math.ceil(n / cols)
    fig = _figure(rows, min(cols, n), img_size, images.shape[1] / images.shape[2])
    grid = fig.add_gridspec(rows, min(cols, n))
    for i, (image, title) in enumerate(zip(images, titles)):
        _draw(fig.add_subplot(grid[i // cols, i % cols]), image, title)
    if save_path is not None:
        fig.savefig(save_path)
    return fig


def plot_datacentric_explanations(
    image: Any,
    explanations: Any,
    cols: int = 5,
    img_size: float = 2.0,
    save_path: str | None = None,
    indices: Any = None,
    labels: Any = None,
    image_label: Any = None,
    image_shape: Sequence[int] | None = None,
) -> Figure:
    """A test image on the first row, then the training images that explain it, with values.

    Args:
        image: the explained test image (any supported layout, with or without a batch axis of 1).
        explanations: its top-k training images: a `TopK` or an `(images (k, ...), values (k,))`
            pair (for one query of `top_k`: `(samples[i], values[i])`); a leading axis of 1
            is dropped.
        cols: training images per row.
        img_size: width of each image, in inches.
        save_path: where to save the figure, if given.
        indices: training indices to show, `(k,)`; default: the TopK's.
        labels: a label per training image.
        image_label: the test image's label (or prediction) for its title.
        image_shape: the shape of one image, for flattened images that are not square.

    Returns:
        The `matplotlib.figure.Figure`: one axes for the test image, then one per training image.

    Raises:
        InvalidDataError: unusable images, or values, indices or labels not one per image.
    """
    cols, img_size = _check_layout(cols, img_size)
    images, values, top_k_indices = _split_explanations(explanations, "explanations")
    raw = _to_numpy(images)
    if values is not None and np.ndim(_to_numpy(values)) == 2 and _to_numpy(values).shape[0] == 1:
        values, raw = _to_numpy(values)[0], raw[0]
    train_images = _as_images(raw, image_shape, "explanations")
    test = _to_numpy(image)
    test = test.reshape((1, *raw.shape[1:])) if test.size == int(np.prod(raw.shape[1:])) else test[None]
    test_image = _as_images(test, image_shape, "image")[0]
    n = len(train_images)
    titles = _titles(n, values, top_k_indices if indices is None else indices, labels)
    width = min(cols, n)
    rows = math.ceil(n / cols) + 1
    fig = _figure(rows, width, img_size, train_images.shape[1] / train_images.shape[2])
    grid = fig.add_gridspec(rows, width)
    test_title = "test image" + ("" if image_label is None else f"\nlabel {_label_text(image_label)}")
    _draw(fig.add_subplot(grid[0, 0]), test_image, test_title)
    for i, (train_image, title) in enumerate(zip(train_images, titles)):
        _draw(fig.add_subplot(grid[1 + i // cols, i % cols]), train_image, title)
    if save_path is not None:
        fig.savefig(save_path)
    return fig
