"""`store=` on calculators: same numbers as without, read back on rerun, refused for other
models, data or settings.

Oracle: the same calculator without a store (itself checked against NumPy in
test_first_order.py), and a dense NumPy `g_z^T (H + damping I)^-1 g_z` for self-influence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification, make_mlp
from oracles import loop_gradients, softmax_head_hessian

from vestigia import FirstOrderInfluenceCalculator, InfluenceModel, InvalidDataError, TracIn
from vestigia.errors import StoreMismatchError
from vestigia.store import ChunkedStore
from vestigia.store.calculator import calculator_fingerprint

DAMPING = 0.05


@pytest.fixture(scope="module")
def setup() -> dict:
    x, y = make_classification(n=50, d=5, classes=3, seed=4)
    model = make_mlp(d=5, hidden=6, classes=3, seed=4)
    im = InfluenceModel(model, start_layer=1, loss_function=logits_loss())
    x_train, y_train, x_test, y_test = x[:37], y[:37], x[37:], y[37:]
    train_ds, test_ds = batched(x_train, y_train, 8), batched(x_test, y_test, 5)
    calc = FirstOrderInfluenceCalculator(im, train_ds, damping=DAMPING)
    hidden, head = model.layers
    features = np.tanh(x_train.astype(np.float64) @ hidden.kernel.numpy() + hidden.bias.numpy())
    hessian = softmax_head_hessian(features, head.kernel.numpy(), head.bias.numpy()) + DAMPING * np.eye(im.nb_params)
    g = loop_gradients(model, im.weights, logits_loss(), x_train, y_train)
    oracle = np.einsum("ij,ij->i", g, np.linalg.solve(hessian, g.T).T)
    return {
        "model": model,
        "im": im,
        "calc": calc,
        "train": train_ds,
        "test": test_ds,
        "oracle": oracle,
        "xy": (x_train, y_train),
    }


def test_self_influence_with_a_store_equals_without_and_is_read_back(setup: dict, tmp_path: Path) -> None:
    calc, train = setup["calc"], setup["train"]
    plain = calc.self_influence(train)
    stored = calc.self_influence(train, store=tmp_path / "s")
    np.testing.assert_array_equal(stored, plain)
    np.testing.assert_allclose(stored, setup["oracle"], rtol=1e-4)  # float32 gradients x cond(H) ~ 1e2
    # The rerun reads the chunks: overwrite chunk 2 with a marker and it comes back as is.
    array = ChunkedStore(tmp_path / "s", calculator_fingerprint(calc, train)).array("self_influence")
    assert array.n_chunks == 5 and array.chunk_rows == 8
    array.write_chunk(2, np.full(8, -7.0, np.float32))
    again = calc.self_influence(train, store=tmp_path / "s")
    np.testing.assert_array_equal(again[16:24], -7.0)
    np.testing.assert_array_equal(np.delete(again, range(16, 24)), np.delete(plain, range(16, 24)))
    # A lost chunk is recomputed.
    (tmp_path / "s" / "self_influence" / "c" / "2").unlink()
    np.testing.assert_array_equal(calc.self_influence(train, store=tmp_path / "s"), plain)


def test_top_k_and_matrix_with_a_store_equal_without(setup: dict, tmp_path: Path) -> None:
    calc, train, test = setup["calc"], setup["train"], setup["test"]
    values, indices = calc.top_k_indices(test, train, k=4)
    for _ in range(2):  # first run writes the training-side vectors, the second reads them
        stored_values, stored_indices = calc.top_k_indices(test, train, k=4, store=tmp_path / "s")
        np.testing.assert_array_equal(stored_indices, indices)
        np.testing.assert_array_equal(stored_values, values)
    np.testing.assert_array_equal(
        calc.influence_matrix(test, train, store=tmp_path / "s"), calc.influence_matrix(test, train)
    )
    assert "train_side_0" in ChunkedStore(tmp_path / "s", calculator_fingerprint(calc, train))


def test_tracin_components_are_stored_separately(setup: dict, tmp_path: Path) -> None:
    im = setup["im"]
    tracin = TracIn([im, im], [0.1, 0.2])
    train, test = setup["train"], setup["test"]
    np.testing.assert_array_equal(
        tracin.influence_matrix(test, train, store=tmp_path / "t"), tracin.influence_matrix(test, train)
    )
    store = ChunkedStore(tmp_path / "t", calculator_fingerprint(tracin, train))
    assert "train_side_0" in store and "train_side_1" in store


def test_a_store_of_other_settings_data_or_model_is_refused(setup: dict, tmp_path: Path) -> None:
    calc, train, im = setup["calc"], setup["train"], setup["im"]
    calc.self_influence(train, store=tmp_path / "s")
    other_damping = FirstOrderInfluenceCalculator(im, train, damping=0.1)
    with pytest.raises(StoreMismatchError, match=r"settings .*damping"):
        other_damping.self_influence(train, store=tmp_path / "s")
    x, y = setup["xy"]
    with pytest.raises(StoreMismatchError, match=r"data n \(expected 36, found 37\)"):
        calc.self_influence(batched(x[:36], y[:36], 8), store=tmp_path / "s")
    other_model = make_mlp(d=5, hidden=6, classes=3, seed=5)
    other_im = InfluenceModel(other_model, start_layer=1, loss_function=logits_loss())
    with pytest.raises(StoreMismatchError, match="model weights"):
        FirstOrderInfluenceCalculator(other_im, train, damping=DAMPING).self_influence(train, store=tmp_path / "s")
    with pytest.raises(InvalidDataError, match="batches of one size"):
        calc.self_influence(batched(x, y, 8).rebatch([8, 3, 8, 8, 8, 2]), store=tmp_path / "u")
