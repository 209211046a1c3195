"""Smoke test of the detection benchmark runner (benchmarks/detection/run.py) with --quick settings.

Runs the script in a subprocess (it clears the Keras session while retraining) on the quick
MNIST MLP setting with one method of each kind (curvature, checkpoints, K-FAC, an ensemble,
baselines), which exercises the LDS with retraining and its cache, and checks the report: one
table row per method, a number in the AUC column of every method that Vestigia has, values in
range, the curve plot written. Under `-m slow`: every method of the whole-model setting, and
the report keeping earlier settings and rows across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "detection"
sys.path.insert(0, str(BENCH))

from detection_methods import available, methods_for  # noqa: E402
from detection_setups import SETTINGS, flip_labels, quick  # noqa: E402

SETTING = "mnist_mlp"
FAST = ["Influence (exact)", "TracIn (all layers)", "EK-FAC (all layers)", "TRAK-10 (all layers)"]
FAST += ["Loss (baseline)", "Random (baseline)"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _run(out: Path, setting: str, methods: list[str] | None, *extra: str) -> None:
    command = [sys.executable, str(BENCH / "run.py"), "--quick", "--settings", setting, "--quiet"]
    command += ["--out-dir", str(out), "--cache-dir", str(out / "cache"), *extra]
    command += [] if methods is None else ["--methods", ",".join(methods)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _check_rows(report: str, methods: list) -> None:
    rows = _table_rows(report)
    assert sorted(rows) == sorted(m.name for m in methods)
    for method in methods:
        status = rows[method.name][0]
        if available(method) is None:
            assert status == "not available"
        else:
            assert 0.0 <= float(status) <= 1.0, f"{method.name}: {rows[method.name]}"  # the AUC, not "failed: ..."


def _table_rows(report: str) -> dict[str, list[str]]:
    """`{method: cells after the name}` of every table row of a Markdown report."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_flip_labels_flips_exactly_the_fraction_uniformly_to_other_classes() -> None:
    labels = np.random.default_rng(3).integers(0, 10, 90_000)
    noisy, mask = flip_labels(labels, 10, 0.1, seed=7)
    assert mask.sum() == 9_000
    assert (noisy[mask] != labels[mask]).all() and (noisy[~mask] == labels[~mask]).all()
    # each of the 9 other classes (offsets 1..9) is drawn 1,000 times in expectation, std ~31:
    # 15% (~5 std) tolerates sampling noise and catches a skewed draw (e.g. offsets 1..8 only).
    offsets = np.bincount((noisy[mask] - labels[mask]) % 10, minlength=10)
    assert offsets[0] == 0
    np.testing.assert_allclose(offsets[1:], 1000, rtol=0.15)
    again, mask_again = flip_labels(labels, 10, 0.1, seed=7)
    assert (again == noisy).all() and (mask_again == mask).all()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detection")
    _run(out, SETTING, FAST)
    return out


def test_quick_report_has_a_row_per_method_run(quick_run: Path) -> None:
    methods = [m for m in methods_for(quick(SETTINGS[SETTING])) if m.name in FAST]
    assert len(methods) == len(FAST)
    _check_rows((quick_run / "detection.md").read_text(), methods)


@pytest.mark.slow
def test_every_method_runs_on_the_quick_whole_model_setting(tmp_path: Path) -> None:
    _run(tmp_path, "mnist_mlp64", None)
    _check_rows((tmp_path / "detection.md").read_text(), methods_for(quick(SETTINGS["mnist_mlp64"])))


def test_quick_results_are_consistent(quick_run: Path) -> None:
    payload = json.loads((quick_run / "detection.json").read_text())
    (result,) = payload["results"]
    ran = [r for r in result["rows"] if r["status"] == "ok"]
    assert ran, "no method ran"
    for row in ran:
        found = row["found"]
        assert 0.0 <= found["0.1"] <= found["0.2"] <= 1.0, row
        assert row["self_influence_s"] >= 0.0
    lds = {r["name"]: r for r in ran if r["lds"] is not None}
    assert "Random (baseline)" in lds
    for row in lds.values():
        assert -1.0 <= row["lds_ci"][0] <= row["lds"] <= row["lds_ci"][1] <= 1.0, row
    assert (quick_run / f"curves_{SETTING}.png").stat().st_size > 10_000
    assert len(list((quick_run / "cache").rglob("job_*.npy"))) == quick(SETTINGS[SETTING]).lds_subsets


@pytest.mark.slow
def test_later_runs_keep_the_earlier_tables_and_rows(quick_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    for name in ("detection.md", "detection.json", f"curves_{SETTING}.npz"):
        (out / name).write_bytes((quick_run / name).read_bytes())
    _run(out, "digits_cnn", ["Loss (baseline)", "Random (baseline)"], "--no-lds")
    report = (out / "detection.md").read_text()
    assert report.index(f"## {SETTING}:") < report.index("## digits_cnn:")  # kept, in the order of SETTINGS
    before = json.loads((quick_run / "detection.json").read_text())["results"][0]
    after = {r["name"]: r for r in json.loads((out / "detection.json").read_text())["results"]}
    assert after[SETTING]["rows"] == before["rows"]
    assert [r["name"] for r in after["digits_cnn"]["rows"]] == ["Loss (baseline)", "Random (baseline)"]
    assert (
        _table_rows(report)["Influence (exact)"]
        == _table_rows((quick_run / "detection.md").read_text())["Influence (exact)"]
    )
    # a run of one method of the same setting replaces that row only, and keeps the others' curves
    _run(out, SETTING, ["Loss (baseline)"], "--no-lds")
    rows = json.loads((out / "detection.json").read_text())["results"][0]["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in before["rows"]]
    assert rows[0] == before["rows"][0]
    with np.load(out / f"curves_{SETTING}.npz") as curves:
        assert sorted(curves.files) == sorted(FAST)
