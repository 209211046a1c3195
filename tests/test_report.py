"""The report's pieces: embedded thumbnails decode to the input, the histogram counts, graceful
non-image inputs, noise masks, and the saved results rebuilding the same page."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from matplotlib import image as mpimg

from vestigia.errors import InvalidDataError
from vestigia.report import ReportData, load_noise_mask, render_report
from vestigia.report.charts import histogram_svg
from vestigia.report.render import example_html, png_data_uri, to_image


def _decode(uri: str) -> np.ndarray:
    return mpimg.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")


def test_thumbnail_png_decodes_to_the_min_max_scaled_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(-3, 5, size=(9, 7)).astype(np.float32)
    decoded = _decode(png_data_uri(image))
    assert decoded.shape[:2] == (9, 7)
    expected = (image - image.min()) / (image.max() - image.min())
    # Two quantisations of 1/255 each: the gray colormap's 256-entry lookup, then 8-bit PNG values.
    np.testing.assert_allclose(decoded[..., 0], expected, atol=2 / 255 + 1e-6)
    rgb = rng.uniform(0, 1, size=(4, 5, 3))
    np.testing.assert_allclose(
        _decode(png_data_uri(rgb))[..., :3], (rgb - rgb.min()) / np.ptp(rgb), atol=1 / 255 + 1e-6
    )


@pytest.mark.parametrize(
    "x, shape, expected",
    [
        (np.ones((8, 8)), "auto", (8, 8)),
        (np.ones((5, 6, 1)), "auto", (5, 6, 1)),
        (np.ones(784), "auto", (28, 28)),
        (-np.ones(784), "auto", None),  # negative values: features, not pixels
        (np.ones(30), "auto", None),
        (np.ones(30), "5,6", (5, 6)),
        (np.ones(64), "none", None),
        (np.array("text"), "auto", None),
    ],
)
def test_which_inputs_are_drawn_as_images(x, shape, expected) -> None:
    image = to_image(x, shape)
    assert (None if image is None else image.shape) == expected


def test_tabular_and_text_inputs_degrade_to_rows_and_escaped_text() -> None:
    row = example_html(np.arange(20, dtype=float) / 3)
    assert row.startswith('<div class="features">[0, 0.333, 0.667') and "(20 features)" in row
    text = example_html(np.array("<script>alert(1)</script> & more"))
    assert "<script>" not in text and "&lt;script&gt;" in text and "&amp; more" in text
    assert example_html(np.array(b"bytes \xc3\xa9")) == '<div class="text">bytes \u00e9</div>'


def test_histogram_bars_hold_numpys_counts() -> None:
    scores = np.random.default_rng(3).lognormal(0, 2, 500)  # > 2 decades: log10 axis
    svg = histogram_svg(scores, bins=20)
    counts = [int(c) for c in re.findall(r"<title>(\d+) examples", svg)]
    np.testing.assert_array_equal(counts, np.histogram(np.log10(scores), bins=20)[0])
    assert "log10(self-influence)" in svg
    linear = histogram_svg(np.linspace(-1, 1, 50), bins=5)
    assert [int(c) for c in re.findall(r"<title>(\d+) examples", linear)] == [10] * 5


def test_noise_mask_from_booleans_indices_and_text(tmp_path) -> None:
    np.save(tmp_path / "b.npy", np.array([True, False, True, False]))
    np.save(tmp_path / "i.npy", np.array([0, 2]))
    (tmp_path / "t.txt").write_text("0\n2\n")
    for name in ("b.npy", "i.npy", "t.txt"):
        np.testing.assert_array_equal(load_noise_mask(tmp_path / name, 4), [True, False, True, False])
    with pytest.raises(InvalidDataError, match="neither 4 booleans nor indices"):
        np.save(tmp_path / "bad.npy", np.array([0, 9]))
        load_noise_mask(tmp_path / "bad.npy", 4)


def test_saved_results_rebuild_the_same_page(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (30, 8, 8))
    report = ReportData("t", scores=rng.normal(size=30), given=np.arange(30) % 3, predicted=np.arange(30) % 2)
    report.shown_index = np.arange(5)
    report.shown_x = x[:5]
    report.class_names = ["a", "b", "c"]
    report.set_explanations(rng.normal(size=(1, 30)), np.array([3]), x[:1], np.array([1]), np.array([2]), x, 2)
    report.settings = {"method": "influence"}
    report.save(tmp_path)
    again = ReportData.load(tmp_path)
    strip = re.compile(r"made \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert strip.sub("", render_report(again)) == strip.sub("", render_report(report))
    assert "given: 1 (b)" in render_report(again)
    with pytest.raises(InvalidDataError, match="written by `vestigia self-influence`"):
        ReportData.load(tmp_path / "nowhere")
