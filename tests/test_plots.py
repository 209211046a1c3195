"""Image plots: layout, titles, drawn pixels, saved files, and clear errors on bad input.

Oracles: the pixels drawn in each axes are compared with the image reshaped and min-max
normalised here in NumPy; the saved PNG's size with `figsize * dpi`.
"""

from __future__ import annotations

import keras
import matplotlib
import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

from vestigia.errors import InvalidDataError
from vestigia.methods.boundary import SampleBoundaryCalculator
from vestigia.plots import plot_datacentric_explanations, plot_most_influential_images
from vestigia.results import TopK


def _normalised(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return (image - image.min()) / (image.max() - image.min())


def _drawn(fig: Figure, i: int) -> np.ndarray:
    return np.asarray(fig.axes[i].images[0].get_array())


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data[:40].astype("float32"), data.target[:40]  # flattened 8x8, 64 values


def test_most_influential_from_top_k_flattened_digits(digits, tmp_path) -> None:
    x, y = digits
    indices = np.array([7, 3, 30, 12, 0, 25, 9])
    values = np.array([3.14159, -0.5, 120.0, 1e-4, 0.0, 2.5, -7.25], dtype=np.float32)
    path = tmp_path / "most.png"
    fig = plot_most_influential_images(TopK(x[indices], values, indices), cols=3, labels=y[indices], save_path=path)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 7
    for ax, v, i in zip(fig.axes, values, indices):
        assert ax.get_title() == f"inf_value = {v:.3g}\n#{i}, label {y[i]}"
    for k, i in enumerate(indices):
        np.testing.assert_allclose(_drawn(fig, k), _normalised(x[i].reshape(8, 8)), atol=1e-12)
    assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 0, 0, 1, 1, 1, 2]
    png = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * fig.dpi
    assert png.shape[:2] == (round(height), round(width)) and png.shape[2] in (3, 4)
    assert png[..., :3].std() > 0.05  # not blank


@pytest.mark.parametrize(
    ("shape", "drawn_shape"),
    [((6, 9), (6, 9)), ((6, 9, 1), (6, 9)), ((6, 9, 3), (6, 9, 3)), ((3, 6, 9), (6, 9, 3)), ((54,), None)],
)
def test_image_layouts(shape: tuple[int, ...], drawn_shape: tuple[int, ...] | None, tmp_path) -> None:
    images = np.random.default_rng(0).random((4, *shape)).astype("float32")
    if drawn_shape is None:  # flattened, not square: needs image_shape
        with pytest.raises(InvalidDataError, match="image_shape"):
            plot_most_influential_images((images, np.arange(4.0)))
        fig = plot_most_influential_images((images, np.arange(4.0)), image_shape=(6, 9))
        expected = images.reshape(4, 6, 9)
    else:
        fig = plot_most_influential_images((images, np.arange(4.0)), save_path=tmp_path / "grid.png")
        expected = np.moveaxis(images, 1, -1) if shape[0] == 3 else images.reshape(4, *drawn_shape)
        assert (tmp_path / "grid.png").stat().st_size > 0
    for k in range(4):
        np.testing.assert_allclose(_drawn(fig, k), _normalised(expected[k]), atol=1e-7)
    cmap = fig.axes[0].images[0].get_cmap().name
    assert cmap == "gray" or (drawn_shape is not None and len(drawn_shape) == 3)


def test_values_none_and_indices_argument() -> None:
    images = np.random.default_rng(1).random((3, 5, 5))
    fig = plot_most_influential_images((images, None), indices=[4, 8, 15])
    assert [ax.get_title() for ax in fig.axes] == ["#4", "#8", "#15"]


def test_datacentric_explanation_layout(digits, tmp_path) -> None:
    x, y = digits
    test_image, explained = x[39].reshape(8, 8, 1), np.array([5, 1, 22, 14, 8, 19])
    values = np.linspace(2.0, -1.0, 6)
    onehot = np.eye(10)[y[explained]]
    path = tmp_path / "explanation.png"
    fig = plot_datacentric_explanations(
        test_image,
        (x[explained][None], values[None]),  # one query of `top_k`: a leading axis of 1
        cols=4,
        labels=onehot,
        indices=explained,
        image_label=y[39],
        save_path=path,
    )
    assert len(fig.axes) == 1 + 6
    assert fig.axes[0].get_title() == f"test image\nlabel {y[39]}"
    np.testing.assert_allclose(_drawn(fig, 0), _normalised(x[39].reshape(8, 8)), atol=1e-12)
    for k, (i, v) in enumerate(zip(explained, values), start=1):
        assert fig.axes[k].get_title() == f"inf_value = {v:.3g}\n#{i}, label {y[i]}"
        np.testing.assert_allclose(_drawn(fig, k), _normalised(x[i].reshape(8, 8)), atol=1e-12)
    assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 1, 1, 1, 1, 2, 2]
    png = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * fig.dpi
    assert png.shape[:2] == (round(height), round(width))


def test_colour_datacentric_with_string_labels() -> None:
    rng = np.random.default_rng(2)
    images = rng.random((4, 10, 12, 3))
    fig = plot_datacentric_explanations(images[0], (images[1:], [0.3, 0.2, 0.1]), labels=["cat", "dog", "ship"])
    assert [ax.get_title() for ax in fig.axes[1:]] == [
        "inf_value = 0.3\nlabel cat",
        "inf_value = 0.2\nlabel dog",
        "inf_value = 0.1\nlabel ship",
    ]
    assert _drawn(fig, 0).shape == (10, 12, 3)


def test_plots_leave_pyplot_and_the_backend_alone() -> None:
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    plot_most_influential_images((np.random.default_rng(3).random((2, 4, 4)), [1.0, 2.0]))
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures


def test_bad_inputs_raise_clear_errors() -> None:
    images = np.random.default_rng(4).random((5, 4, 4))
    with pytest.raises(InvalidDataError, match=r"`values` must have one entry per image \(5\). Received 4"):
        plot_most_influential_images((images, np.arange(4.0)))
    with pytest.raises(InvalidDataError, match=r"`labels` must have one entry per image \(4\). Received 5"):
        plot_datacentric_explanations(images[0], (images[1:], np.arange(4.0)), labels=np.arange(5))
    with pytest.raises(InvalidDataError, match="image_shape"):
        plot_most_influential_images((images, np.arange(5.0)), image_shape=(3, 5))
    with pytest.raises(InvalidDataError, match=r"\(images, values\)"):
        plot_most_influential_images((images, np.arange(5.0), np.arange(5)))
    with pytest.raises(ValueError, match="cols"):
        plot_most_influential_images((images, np.arange(5.0)), cols=0)
    with pytest.raises(InvalidDataError, match="NaN"):
        plot_most_influential_images((np.full((2, 3, 3), np.nan), [1.0, 2.0]))


def test_plots_a_real_self_influence_ranking(digits) -> None:
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    calculator = SampleBoundaryCalculator(model, step_nbr=5)
    top = calculator.compute_top_k_from_training_dataset((x, np.eye(10)[y]), 4)
    fig = plot_most_influential_images(top, labels=y[top.indices])
    for ax, i, v in zip(fig.axes, top.indices, top.values):
        assert ax.get_title() == f"inf_value = {v:.3g}\n#{i}, label {y[i]}"
