"""`CheckpointRecorder` during `model.fit`, and TracIn built from its folder in one call.

Oracles: the learning rates are the schedule's closed form `lr0 * rate ** (step / decay_steps)`
at the recorded steps; `TracIn.from_checkpoints` equals a TracIn built by hand from the same
weight files, and its self-influence equals `sum_c eta_c ||g_c||^2` from per-example tapes; the
TRAK ensemble of the recorder equals TRAK built by hand from the same files.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import logits_loss, make_classification, make_mlp
from oracles import assert_close, loop_gradients

from vestigia import TRAK, InfluenceModel, TracIn
from vestigia.callbacks import CheckpointRecorder, load_checkpoints
from vestigia.errors import InvalidDataError

LR0, DECAY_STEPS, RATE = 0.05, 4, 0.5


def _train(folder, **recorder_options):
    x, y = make_classification(n=48, d=5, classes=3, seed=2)
    model = make_mlp(d=5, hidden=6, classes=3, seed=1)
    schedule = keras.optimizers.schedules.ExponentialDecay(LR0, DECAY_STEPS, RATE)
    model.compile(keras.optimizers.SGD(schedule), keras.losses.CategoricalCrossentropy(from_logits=True))
    recorder = CheckpointRecorder(folder, **recorder_options)
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=[recorder])
    return model, recorder, x, y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return (folder, *_train(folder))


def test_recorder_saves_each_epoch_with_the_schedules_learning_rate(trained) -> None:
    tmp_path, model, recorder, x, y = trained
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    assert [r["epoch"] for r in manifest] == [1, 2, 3] and [r["step"] for r in manifest] == [3, 6, 9]
    expected = [LR0 * RATE ** (step / DECAY_STEPS) for step in (3, 6, 9)]
    np.testing.assert_allclose([r["learning_rate"] for r in manifest], expected, rtol=1e-6)
    models, rates = load_checkpoints(tmp_path)
    for loaded, original in zip(models[-1].get_weights(), model.get_weights()):
        np.testing.assert_array_equal(loaded, original)  # the last checkpoint is the trained model


def test_tracin_from_checkpoints_equals_tracin_built_by_hand(trained) -> None:
    tmp_path, _, recorder, x, y = trained
    tracin = TracIn.from_checkpoints(str(tmp_path))
    # By hand: rebuild each checkpoint from its weight file, with the manifest's rates.
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    hand_models, rates, grads = [], [], []
    for record in manifest:
        model = make_mlp(d=5, hidden=6, classes=3, seed=1)
        model.load_weights(tmp_path / record["file"])
        hand_models.append(InfluenceModel(model, start_layer=-1, loss_function=logits_loss()))
        rates.append(record["learning_rate"])
        grads.append(loop_gradients(model, model.layers[-1].trainable_variables, logits_loss(), x[:12], y[:12]))
    by_hand = TracIn(hand_models, rates)
    np.testing.assert_allclose(tracin.self_influence((x, y)), by_hand.self_influence((x, y)), rtol=1e-6)
    np.testing.assert_allclose(
        tracin.influence_matrix((x[:5], y[:5]), (x, y)), by_hand.influence_matrix((x[:5], y[:5]), (x, y)), rtol=1e-6
    )
    expected = sum(rate * np.sum(g**2, axis=1) for rate, g in zip(rates, grads))
    assert_close(recorder.tracin().self_influence((x[:12], y[:12])), expected, 1e-5)  # float32 vs per-example tapes


def test_trak_ensemble_from_checkpoints_equals_trak_built_by_hand(trained) -> None:
    tmp_path, _, recorder, x, y = trained
    ensemble = recorder.trak((x, y), seed=3)
    manifest = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    hand = []
    for record in manifest:
        model = make_mlp(d=5, hidden=6, classes=3, seed=1)
        model.load_weights(tmp_path / record["file"])
        hand.append(InfluenceModel(model, start_layer=-1, loss_function=logits_loss()))
    by_hand = TRAK(hand, (x, y), seed=3)
    assert len(ensemble.models) == 3
    np.testing.assert_allclose(ensemble.self_influence((x, y)), by_hand.self_influence((x, y)), rtol=1e-5)
    np.testing.assert_allclose(
        ensemble.influence_matrix((x[:4], y[:4]), (x, y)), by_hand.influence_matrix((x[:4], y[:4]), (x, y)), rtol=1e-5
    )


def test_recorder_by_steps_and_a_folder_without_manifest(tmp_path) -> None:
    _, recorder, _, _ = _train(tmp_path / "steps", every_steps=4)
    assert [r["step"] for r in recorder.records] == [4, 8]
    np.testing.assert_allclose([r["learning_rate"] for r in recorder.records], [LR0 * RATE, LR0 * RATE**2], rtol=1e-6)
    with pytest.raises(InvalidDataError, match="not written by vestigia.callbacks.CheckpointRecorder"):
        TracIn.from_checkpoints(str(tmp_path))
