"""`vestigia self-influence`, `explain`, `report` and `bench` on a user's saved model and data files.

Oracle for the scores: the closed-form softmax head (`tests/oracles.py`): per-example gradients
`kron([a, 1], p - y)` and the mean Hessian `kron(a~ a~^T, diag(p) - p p^T)`, solved densely with
NumPy at the same damping; nothing of Vestigia is used on that side.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, softmax_head_gradients, softmax_head_hessian
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from vestigia.app.methods import EXACT_MAX_PARAMS, METHODS, Setup, choose_method
from vestigia.cli import bench_runner_path, main
from vestigia.demo import flip_labels
from vestigia.methods.engine import SelfInfluenceCalculator

N_TRAIN, DAMPING = 240, 1e-3
RTOL = 1e-4  # float32 gradients and Hessian through TF vs float64 NumPy (measured: 3.0e-6 at most)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _scoring_must_not_start(*args, **kwargs):
    raise AssertionError("scoring started: the error must come before any work")


def _training_must_not_start(*args, **kwargs):
    raise AssertionError("training started: the error must come before any work")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A digits MLP trained on 10% flipped labels, saved as `.keras`, with `.npz` train / test files."""
    folder = tmp_path_factory.mktemp("user")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    noisy, mask = flip_labels(y[:N_TRAIN], 0.1, 10, seed=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(10, name="logits")]
    )
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:N_TRAIN], noisy, epochs=30, batch_size=32, verbose=0)
    model.save(folder / "model.keras")
    np.savez(folder / "train.npz", x=x[:N_TRAIN], y=noisy)
    np.savez(folder / "test.npz", x=x[1500:1510], y=y[1500:1510])
    np.save(folder / "mask.npy", mask)
    return {"dir": folder, "model": model, "x": x[:N_TRAIN], "y": noisy, "mask": mask, "x_test": x[1500:1510]}


def _oracle(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form per-example gradients `(n, P)` and damped mean Hessian of the last layer."""
    hidden = np.asarray(model.layers[0](x)).astype(np.float64)
    kernel, bias = model.layers[1].get_weights()
    one_hot = np.eye(10)[y]
    grads = softmax_head_gradients(hidden, kernel, bias, one_hot)
    hessian = softmax_head_hessian(hidden, kernel, bias) + DAMPING * np.eye(grads.shape[1])
    return grads, hessian


def test_self_influence_command_matches_the_closed_form_and_writes_a_report(files, tmp_path) -> None:
    d = files["dir"]
    out = tmp_path / "out"
    code = main(
        ["self-influence", "--model", d / "model.keras", "--train", d / "train.npz", "--output", out, "--quiet"]
    )
    assert code == 0
    rows = _read_csv(out / "scores.csv")
    index = np.array([int(r["index"]) for r in rows])
    scores = np.array([float(r["self_influence"]) for r in rows])
    np.testing.assert_array_equal(np.sort(index), np.arange(N_TRAIN))
    assert np.all(np.diff(scores) <= 0)  # ranked, most suspicious first
    grads, hessian = _oracle(files["model"], files["x"], files["y"])
    expected = np.einsum("np,np->n", grads, np.linalg.solve(hessian, grads.T).T)
    assert_close(scores[np.argsort(index)], expected, RTOL)
    assert [r["given_label"] for r in rows[:3]] == [str(files["y"][i]) for i in index[:3]]
    page = (out / "report.html").read_text()
    assert "Most suspicious training examples" in page and page.count("data:image/png;base64,") >= 48
    assert "Detection curve" not in page  # no noise mask given


def test_report_command_adds_the_detection_curve_of_a_noise_mask(files, tmp_path) -> None:
    d = files["dir"]
    out = tmp_path / "out"
    main(["self-influence", "--model", d / "model.keras", "--train", d / "train.npz", "--output", out, "--quiet"])
    assert main(["report", "--results", out, "--noise-mask", d / "mask.npy", "--output", tmp_path / "r.html"]) == 0
    page = (tmp_path / "r.html").read_text()
    rows = _read_csv(out / "scores.csv")
    scores = np.zeros(N_TRAIN)
    scores[[int(r["index"]) for r in rows]] = [float(r["self_influence"]) for r in rows]
    auc = roc_auc_score(files["mask"], scores)  # sklearn's ROC-AUC as the oracle of the printed one
    assert f"ROC-AUC {auc:.3f}" in page and "Detection curve" in page
    assert auc > 0.8  # 30 epochs on 240 digits: measured 0.990; chance is 0.5


def test_explain_lists_the_largest_and_smallest_pairwise_values(files, tmp_path) -> None:
    d = files["dir"]
    out = tmp_path / "out"
    args = ["explain", "--model", d / "model.keras", "--train", d / "train.npz", "--test", d / "test.npz"]
    assert main([*args, "--output", out, "--queries", "1,4", "-k", "3", "--quiet"]) == 0
    rows = _read_csv(out / "scores.csv")
    grads, hessian = _oracle(files["model"], files["x"], files["y"])
    test_y = load_digits().target[1500:1510]
    test_grads, _ = _oracle(files["model"], files["x_test"], test_y)
    matrix = test_grads @ np.linalg.solve(hessian, grads.T)  # value = g_test^T H^-1 g_z
    for t in (1, 4):
        for kind, order in (("proponent", np.argsort(-matrix[t])), ("opponent", np.argsort(matrix[t]))):
            picked = [r for r in rows if r["test_index"] == str(t) and r["kind"] == kind]
            np.testing.assert_array_equal([int(r["train_index"]) for r in picked], order[:3])
            assert_close([float(r["influence"]) for r in picked], matrix[t, order[:3]], RTOL)
    assert (out / "report.html").read_text().count("Proponents") == 2


def test_image_folder_and_saved_dataset_give_the_npz_scores(files, tmp_path) -> None:
    """The same training set as PNGs by class folder, and as `tf.data.Dataset.save`, scores the same."""
    d = files["dir"]
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10, name="logits")])
    model.compile("adam", keras.losses.CategoricalCrossentropy(from_logits=True))
    pixels = np.round(files["x"][:60] * 255).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = files["y"][:60]
    model.fit(pixels.astype(np.float32), np.eye(10)[labels], epochs=2, verbose=0)
    model.save(tmp_path / "conv.keras")
    images = tmp_path / "images"
    for i, (image, label) in enumerate(zip(pixels, labels)):
        (images / f"class{label}").mkdir(parents=True, exist_ok=True)
        keras.utils.save_img(images / f"class{label}" / f"{i:03d}.png", image, scale=False)
    # The folder reader orders by class, then file name: the same order by hand.
    order = sorted(range(60), key=lambda i: (f"class{labels[i]}", f"{i:03d}.png"))
    np.savez(tmp_path / "same.npz", x=pixels[order].astype(np.float32), y=labels[order])
    tf.data.Dataset.from_tensor_slices((pixels[order].astype(np.float32), labels[order])).batch(7).save(
        str(tmp_path / "saved")
    )
    results = {}
    for name, source in (("npz", tmp_path / "same.npz"), ("folder", images), ("saved", tmp_path / "saved")):
        out = tmp_path / name
        args = ["self-influence", "--model", tmp_path / "conv.keras", "--train", source, "--output", out, "--quiet"]
        args += ["--method", "grad-dot"]  # the cheapest method: the loaders are under test here
        assert main(args) == 0
        rows = _read_csv(out / "scores.csv")
        results[name] = {int(r["index"]): float(r["self_influence"]) for r in rows}
    for name in ("folder", "saved"):
        np.testing.assert_allclose(
            [results[name][i] for i in range(60)], [results["npz"][i] for i in range(60)], rtol=1e-5
        )
    assert d.exists()


@pytest.mark.parametrize(
    "change, phrase",
    [
        ("bad_model", "could not be loaded by keras.models.load_model"),
        ("missing_model", "`--model` names no file"),
        ("wrong_inputs", "do not fit the model's input"),
        ("wrong_labels", "class indices in [0, 10)"),
        ("one_hot_width", "labels have 7 columns but the model has 10 outputs"),
        ("no_keys", "must hold arrays named 'x' and 'y'"),
        ("no_loss", "saved without a compiled loss"),
        ("bad_loss", "is not a Keras loss name"),
        ("custom_loss", "compiled loss could not be restored"),
        ("output_is_file", "`--output` must be a folder"),
        ("unknown_layer", "`--layers` names no layer"),
        ("tracin_without_checkpoints", "--checkpoints DIR"),
    ],
)
def test_bad_artefacts_get_one_clear_line_before_any_work(files, tmp_path, capsys, monkeypatch, change, phrase) -> None:
    d = files["dir"]
    model, train, extra = d / "model.keras", d / "train.npz", []
    out: Path = tmp_path / "out"
    if change == "bad_model":
        model = tmp_path / "broken.keras"
        model.write_text("not a zip")
    elif change == "missing_model":
        model = tmp_path / "nothing.keras"
    elif change == "wrong_inputs":
        train = tmp_path / "t.npz"
        np.savez(train, x=files["x"][:, :63], y=files["y"])
    elif change == "wrong_labels":
        train = tmp_path / "t.npz"
        np.savez(train, x=files["x"], y=files["y"] + 3)
    elif change == "one_hot_width":
        train = tmp_path / "t.npz"
        np.savez(train, x=files["x"], y=np.eye(7, dtype=np.float32)[files["y"] % 7])
    elif change == "no_keys":
        train = tmp_path / "t.npz"
        np.savez(train, inputs=files["x"], labels=files["y"])
    elif change == "no_loss":
        bare = keras.Sequential([keras.Input((64,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(10)])
        bare.set_weights(files["model"].get_weights())  # never compiled: no loss saved
        model = tmp_path / "bare.keras"
        bare.save(model)
    elif change == "custom_loss":
        custom = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(10)]
        )
        custom.set_weights(files["model"].get_weights())
        custom.compile("sgd", loss=lambda y_true, y_pred: keras.ops.mean((y_true - y_pred) ** 2, axis=-1))
        model = tmp_path / "custom.keras"
        custom.save(model)  # the lambda loss cannot be deserialised
    elif change == "bad_loss":
        extra = ["--loss", "not_a_loss"]
    elif change == "output_is_file":
        out.write_text("a file")
    elif change == "unknown_layer":
        extra = ["--layers", "dense_99"]
    elif change == "tracin_without_checkpoints":
        extra = ["--method", "tracin"]
    monkeypatch.setattr(SelfInfluenceCalculator, "self_influence", _scoring_must_not_start)
    code = main(["self-influence", "--model", model, "--train", train, "--output", out, "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("vestigia self-influence: error:") and phrase in err, err
    assert "Traceback" not in err
    assert not (out / "scores.csv").exists() if out.is_dir() else True


@pytest.mark.parametrize("command", ["demo", "tour"])
def test_demo_and_tour_refuse_an_unwritable_output_before_training(tmp_path, capsys, monkeypatch, command) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(keras.Model, "fit", _training_must_not_start)
    code = main([command, "--dataset", "digits", "--output", blocker / "sub", "--quiet"])
    assert code == 1
    assert "`--output` cannot be written" in capsys.readouterr().err


def test_layers_all_and_names_watch_the_named_weights(files, tmp_path) -> None:
    d = files["dir"]
    for layers, n_params in (("all", 64 * 12 + 12 + 130), ("logits", 130)):
        out = tmp_path / layers
        args = ["self-influence", "--model", d / "model.keras", "--train", d / "train.npz", "--output", out]
        assert main([*args, "--layers", layers, "--quiet", "--method", "grad-dot"]) == 0
        assert f'"n_params": {n_params}' in (out / "settings.json").read_text()


def test_auto_method_is_exact_for_small_heads_and_arnoldi_above(files) -> None:
    small = Setup(
        files["model"],
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
        files["x"],
        files["y"],
    )
    assert choose_method(small, "auto") == "influence" and small.solver == "exact"
    keras.utils.set_random_seed(0)
    wide = keras.Sequential([keras.Input((64,)), keras.layers.Dense(EXACT_MAX_PARAMS // 10 + 1)])
    big = Setup(wide, keras.losses.MeanSquaredError(reduction=None), files["x"], files["x"])
    assert choose_method(big, "auto") == "influence" and big.solver == "ekfac"
    every = {"influence", "relatif", "arnoldi", "tracin", "trak", "grad-dot", "grad-cos", "datainf", "logra"}
    assert set(METHODS) >= every | {"representer-l2", "representer-lje", "boundary-sample", "boundary-weights"}


def test_grad_dot_method_is_the_squared_gradient_norm(files, tmp_path) -> None:
    d = files["dir"]
    out = tmp_path / "out"
    args = ["self-influence", "--model", d / "model.keras", "--train", d / "train.npz", "--output", out]
    assert main([*args, "--method", "grad-dot", "--quiet"]) == 0
    rows = _read_csv(out / "scores.csv")
    scores = np.zeros(N_TRAIN)
    scores[[int(r["index"]) for r in rows]] = [float(r["self_influence"]) for r in rows]
    grads, _ = _oracle(files["model"], files["x"], files["y"])
    assert_close(scores, np.sum(grads**2, axis=1), 1e-4)  # float32 gradients vs float64 closed form


def test_bench_finds_the_runner_of_this_checkout() -> None:
    runner = bench_runner_path()
    assert runner is not None and runner.read_text().startswith('"""Mislabel detection and LDS benchmark')


@pytest.mark.slow
def test_bench_runs_the_benchmark_runner(capfd) -> None:
    assert main(["bench", "--help-runner"]) == 0
    assert "--quick" in capfd.readouterr().out  # the runner's own flags
