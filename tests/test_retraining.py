"""Retraining ground truth: subsets, manual-retraining oracle, on-disk resume, manifest checks."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import make_classification

from vestigia.errors import InvalidDataError
from vestigia.evaluation import (
    correct_class_margin,
    leave_one_out_retraining,
    random_subsets,
    retrain_on_subsets,
)

N_SUBSETS = 4


def build_model() -> keras.Model:
    """Logistic regression on 4 features, 2 logits."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


def train(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    model.fit(x, y, epochs=3, batch_size=8, shuffle=True, verbose=0)


class FailingTrain:
    """`train` that raises on call number `fail_on` (1-based), counting calls."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.fail_on = 0, fail_on

    def __call__(self, model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        train(model, x, y)


@pytest.fixture(scope="module")
def data():
    x, y = make_classification(n=40, d=4, classes=2, seed=1)
    return x[:32], y[:32], x[32:], y[32:]


@pytest.fixture(scope="module")
def reference(data):
    """An uninterrupted in-memory run."""
    return retrain_on_subsets(build_model, train, *data, n_subsets=N_SUBSETS, seed=3, progress=False)


def test_random_subsets_sizes_and_seeding():
    masks = random_subsets(101, n_subsets=200, fraction=0.3, seed=5)
    assert masks.dtype == bool and masks.shape == (200, 101)
    np.testing.assert_array_equal(masks.sum(axis=1), 30)  # round(30.3)
    assert random_subsets(5, 3, 0.5).sum(axis=1).tolist() == [3, 3, 3]  # 2.5 rounds half up
    np.testing.assert_array_equal(masks, random_subsets(101, 200, 0.3, seed=5))
    assert not np.array_equal(masks, random_subsets(101, 200, 0.3, seed=6))
    # every example is kept with probability 0.297; over 200 subsets the count has sd ~6.5
    np.testing.assert_allclose(masks.mean(axis=0), 30 / 101, atol=0.12)
    with pytest.raises(ValueError, match="fraction"):
        random_subsets(10, 2, fraction=1.5)


def test_retrain_on_subsets_matches_manual_retraining(data, reference):
    # Oracle: the documented procedure written out by hand for subset 2 (seed + 2).
    x_train, y_train, x_test, y_test = data
    masks, outputs = reference
    assert outputs.shape == (N_SUBSETS, 8) and outputs.dtype == np.float64
    keras.utils.set_random_seed(3 + 2)
    model = build_model()
    train(model, x_train[masks[2]], y_train[masks[2]])
    expected = correct_class_margin(np.asarray(model(x_test)), y_test)
    # model(x) vs model.predict(x): the same float32 matmul, up to summation order.
    np.testing.assert_allclose(outputs[2], expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(outputs[:, 0]) > 0  # different subsets give different models


def test_interrupted_run_resumes_to_identical_results(data, reference, tmp_path):
    failing = FailingTrain(fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        retrain_on_subsets(build_model, failing, *data, n_subsets=N_SUBSETS, seed=3, path=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["job_00000.npy", "job_00001.npy"]
    resumed_train = FailingTrain()
    resumed = retrain_on_subsets(
        build_model, resumed_train, *data, n_subsets=N_SUBSETS, seed=3, path=tmp_path, progress=False
    )
    assert resumed_train.calls == N_SUBSETS - 2  # finished subsets are not retrained
    np.testing.assert_array_equal(resumed.masks, reference.masks)
    np.testing.assert_array_equal(resumed.outputs, reference.outputs)  # bit-identical
    # a third run trains nothing and reads everything back
    idle = retrain_on_subsets(build_model, FailingTrain(fail_on=1), *data, n_subsets=N_SUBSETS, seed=3, path=tmp_path)
    np.testing.assert_array_equal(idle.outputs, reference.outputs)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "retrain_on_subsets" and manifest["n_subsets"] == N_SUBSETS


def test_manifest_mismatch_raises(data, tmp_path):
    x_train, y_train, x_test, y_test = data
    skip = FailingTrain(fail_on=1)  # the manifest is written before any training
    with pytest.raises(KeyboardInterrupt):
        retrain_on_subsets(build_model, skip, *data, n_subsets=3, seed=0, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match="n_subsets: stored 3, requested 5"):
        retrain_on_subsets(build_model, skip, *data, n_subsets=5, seed=0, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match="seed"):
        retrain_on_subsets(build_model, skip, *data, n_subsets=3, seed=1, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match="data_sha256"):
        retrain_on_subsets(
            build_model, skip, x_train + 1, y_train, x_test, y_test, n_subsets=3, path=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="measure"):
        retrain_on_subsets(
            build_model, skip, *data, n_subsets=3, path=tmp_path, measure=lambda p, y: p[:, 0], progress=False
        )
    (tmp_path / "manifest.json").unlink()
    np.save(tmp_path / "outputs" / "job_00000.npy", np.zeros(8))
    with pytest.raises(ValueError, match="no manifest"):
        retrain_on_subsets(build_model, skip, *data, n_subsets=3, path=tmp_path, progress=False)


def test_leave_one_out_retraining_and_resume(data, tmp_path):
    x_train, y_train, x_test, y_test = data
    result = leave_one_out_retraining(build_model, train, *data, indices=[4, 17], path=tmp_path, seed=2, progress=False)
    assert result.outputs.shape == (2, 8) and result.baseline.shape == (8,)
    # Oracle: retrain by hand without point 17, same seed for every retraining.
    keras.utils.set_random_seed(2)
    model = build_model()
    train(model, np.delete(x_train, 17, axis=0), np.delete(y_train, 17, axis=0))
    np.testing.assert_allclose(
        result.outputs[1], correct_class_margin(np.asarray(model(x_test)), y_test), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(result.output_drop, result.baseline[None, :] - result.outputs)
    again = leave_one_out_retraining(
        build_model, FailingTrain(fail_on=1), *data, indices=[4, 17], path=tmp_path, seed=2, progress=False
    )
    np.testing.assert_array_equal(again.outputs, result.outputs)
    np.testing.assert_array_equal(again.baseline, result.baseline)
    with pytest.raises(ValueError, match="indices"):
        leave_one_out_retraining(build_model, train, *data, indices=[4, 18], path=tmp_path, seed=2)
    with pytest.raises(InvalidDataError, match="indices"):
        leave_one_out_retraining(build_model, train, *data, indices=[4, 4])


def test_measure_shape_is_checked(data):
    with pytest.raises(InvalidDataError, match="measure"):
        retrain_on_subsets(build_model, train, *data, n_subsets=1, measure=lambda p, y: p, progress=False)


def test_progress_reports_on_stderr(data, tmp_path, capsys, monkeypatch):
    # vestigia.progress's bar: on a pipe, one final line per loop.
    retrain_on_subsets(build_model, train, *data, n_subsets=1, path=tmp_path, progress=True)
    assert "retrain_on_subsets (retrainings): 100% 1/1 [" in capsys.readouterr().err
    retrain_on_subsets(build_model, FailingTrain(fail_on=1), *data, n_subsets=1, path=tmp_path, progress=True)
    assert "retrain_on_subsets (retrainings): 100% 1/1 [" in capsys.readouterr().err  # resumed: nothing to train
    retrain_on_subsets(build_model, train, *data, n_subsets=1, path=tmp_path, progress=False)
    assert capsys.readouterr().err == ""
