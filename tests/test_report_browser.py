"""The report in a real headless browser (Debian's chromium): loads with no console message,
every image decodes, and a screenshot is taken.

The page's own load handler writes `data-rendered` (each image's `naturalWidth`) and
`data-images-rendered="ok/total"` on `<body>`, which `--dump-dom` returns after the load event;
console messages (errors, uncaught exceptions, failed loads) reach stderr through
`--enable-logging=stderr`. Every host resolves to nothing, so any network fetch would fail
loudly. A control page with a console error and a broken image shows that the checks can fail.

Skipped when no chromium is installed, unless `VESTIGIA_REQUIRE_BROWSER=1` (as `.ci/run` sets).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from sklearn.datasets import load_digits

from vestigia.report import ReportData, write_report

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None and os.environ.get("VESTIGIA_REQUIRE_BROWSER") != "1",
    reason="no chromium installed (apt-get install chromium; .ci/run installs it)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
]


def _browse(page: Path, *extra: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None, "VESTIGIA_REQUIRE_BROWSER=1 but no chromium found"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [BROWSER, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=90,
        )


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _rendered(dom: str) -> tuple[int, int]:
    found = re.search(r'data-images-rendered="(\d+)/(\d+)"', dom)
    assert found, "the page's load handler did not run"
    return int(found.group(1)), int(found.group(2))


def _image_report() -> ReportData:
    digits = load_digits()
    x, y = digits.images[:200] / 16.0, digits.target[:200]
    rng = np.random.default_rng(0)
    scores = rng.lognormal(0, 1.5, 200)
    mask = np.zeros(200, bool)
    mask[np.argsort(-scores)[:15]] = True
    report = ReportData("Digits", scores=scores, given=y, predicted=(y + mask).astype(np.int64) % 10)
    report.shown_index = np.argsort(-scores)[:24]
    report.shown_x = x[report.shown_index]
    report.noise_mask = mask
    matrix = rng.normal(size=(2, 200))
    report.set_explanations(matrix, np.array([0, 1]), x[:2], y[:2], y[:2], x, 4)
    report.settings = {"method": "influence", "n_train": 200}
    return report


@pytest.mark.parametrize("kind", ["images", "tabular", "text"])
def test_report_loads_without_console_messages_and_every_image_renders(tmp_path, kind) -> None:
    report = _image_report()
    if kind == "tabular":
        report.shown_x = np.random.default_rng(1).normal(size=(24, 30))
        report.explanations = []
    elif kind == "text":
        report.shown_x = np.array([f"review <b>{i}</b>: good & bad" for i in range(24)])
        report.explanations = []
    page = write_report(report, tmp_path / "report.html")
    html = page.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//|<link|@import|url\(", html)  # nothing fetched
    result = _browse(page, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _console(result.stderr) == []
    ok, total = _rendered(result.stdout)
    assert ok == total == html.count("<img ")
    if kind == "images":
        assert total == 24 + 2 * (1 + 4 + 4)  # suspicious + per query: itself, 4 proponents, 4 opponents
    else:
        assert total == 0 and ("features" if kind == "tabular" else "&lt;b&gt;0&lt;/b&gt;") in result.stdout


def test_screenshot_of_the_report_shows_the_page(tmp_path) -> None:
    page = write_report(_image_report(), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    result = _browse(page, "--window-size=1280,1600", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (1600, 1280)
    assert (pixels[..., :3] < 0.2).mean() > 0.01  # dark thumbnail pixels, not a blank page
    if os.environ.get("VESTIGIA_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["VESTIGIA_SCREENSHOT_DIR"]) / "report.png")


def test_the_checks_catch_a_console_error_and_a_broken_image(tmp_path) -> None:
    page = tmp_path / "bad.html"
    script = (
        "window.addEventListener('load',function(){var i=document.images[0];"
        "document.body.setAttribute('data-images-rendered',(i.naturalWidth>0?1:0)+'/1');});"
        "console.error('boom');"
    )
    page.write_text(
        f'<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA"><script>{script}</script></body></html>'
    )
    result = _browse(page, "--dump-dom")
    assert any("boom" in line for line in _console(result.stderr))
    assert _rendered(result.stdout) == (0, 1)
