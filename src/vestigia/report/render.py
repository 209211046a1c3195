"""One training or test example as HTML: an embedded PNG thumbnail, a feature row, or text.

- Images, `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`, become base64 PNGs (scaled to
  [0, 1] by their own range, drawn pixelated at 72 px wide).
- 1-D inputs are drawn as images when `image_shape` says so ("H,W" or "H,W,C"), or, with "auto",
  when their length is a perfect square of at least 64 and every value is >= 0 (flattened
  images, e.g. 784 MNIST pixels or 64 sklearn digits); otherwise they are a row of features
  (the first 12 values).
- Strings (and bytes) are shown as escaped text, cut at 200 characters.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
from matplotlib import image as mpimg

__all__ = ["example_html", "png_data_uri", "to_image"]

THUMB_PX = 72
MAX_FEATURES = 12
MAX_TEXT = 200


def png_data_uri(image: np.ndarray) -> str:
    """A `data:image/png;base64,...` URI of an image `(H, W)` or `(H, W, 1|3|4)`."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    low, high = np.nanmin(array), np.nanmax(array)
    scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low)
    scaled = np.nan_to_num(scaled, nan=0.0)
    buffer = io.BytesIO()
    if scaled.ndim == 2:
        mpimg.imsave(buffer, scaled, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        mpimg.imsave(buffer, scaled, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_shape(image_shape: str) -> tuple[int, ...] | None:
    if image_shape in ("auto", "none", ""):
        return None
    return tuple(int(part) for part in image_shape.split(","))


def to_image(x: Any, image_shape: str = "auto") -> np.ndarray | None:
    """`x` as an image array to draw, or None when it is not an image (see the module)."""
    array = np.asarray(x)
    if array.dtype.kind not in "biuf" or image_shape == "none":
        return None
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return array
    if array.ndim != 1:
        return None
    shape = _parse_shape(image_shape)
    if shape is not None:
        return array.reshape(shape) if int(np.prod(shape)) == array.size else None
    side = math.isqrt(array.size)
    if side * side == array.size and array.size >= 64 and np.all(array >= 0):
        return array.reshape(side, side)
    return None


def example_html(x: Any, image_shape: str = "auto", alt: str = "example") -> str:
    """The example as an `<img>` with an embedded PNG, a feature row, or text."""
    image = to_image(x, image_shape)
    if image is not None:
        return f'<img class="thumb" src="{png_data_uri(image)}" alt="{html.escape(alt)}" width="{THUMB_PX}">'
    array = np.asarray(x)
    if array.dtype.kind in "USO":
        text = array.item() if array.ndim == 0 else " ".join(map(str, array.reshape(-1)))
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        text = str(text)
        cut = text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "\u2026"
        return f'<div class="text">{html.escape(cut)}</div>'
    values = array.reshape(-1)
    shown = ", ".join(f"{v:.3g}" for v in values[:MAX_FEATURES].astype(np.float64))
    more = f", \u2026 ({values.size} features)" if values.size > MAX_FEATURES else ""
    return f'<div class="features">[{html.escape(shown + more)}]</div>'
