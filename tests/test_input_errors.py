"""Bad input gets a clear error that names the argument and what was received."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import logits_loss, make_classification, make_mlp

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, NonFiniteError
from vestigia.errors import InvalidDataError


@pytest.fixture
def calculator() -> tuple[FirstOrderInfluenceCalculator, np.ndarray, np.ndarray]:
    x, y = make_classification(n=30, d=5, classes=3)
    influence_model = InfluenceModel(make_mlp(), start_layer=-1, loss_function=logits_loss())
    return FirstOrderInfluenceCalculator(influence_model, (x, y), "exact", damping=0.1), x, y


def test_wrong_dtype_names_the_argument_and_the_dtype(calculator) -> None:
    calc, x, y = calculator
    with pytest.raises(InvalidDataError, match=r"`train_set`.*float32.*int32"):
        calc.self_influence((x.astype("int32"), y))


def test_wrong_example_shape_names_the_argument_and_the_shape(calculator) -> None:
    calc, x, y = calculator
    with pytest.raises(InvalidDataError, match=r"`dataset_to_evaluate`.*\(5,\).*\(30, 4\)"):
        calc.influence_matrix((x[:, :4], y), (x, y))


def test_wrong_number_of_inputs(calculator) -> None:
    calc, x, y = calculator
    with pytest.raises(InvalidDataError, match=r"`train_set`: the model takes 1 input\(s\) but a batch gives 2"):
        calc.self_influence(((x, x), y))


def test_nan_in_hessian_data_names_the_dataset_and_the_inputs() -> None:
    x, y = make_classification(n=30, d=5, classes=3)
    x[7, 2] = np.nan
    influence_model = InfluenceModel(make_mlp(), start_layer=-1, loss_function=logits_loss())
    with pytest.raises(NonFiniteError, match=r"`train_dataset`, batch 0 .*the inputs hold nan at example 7 "):
        ExactIHVP(influence_model, (x, y))


def test_inf_in_labels_is_reported_as_labels(calculator) -> None:
    calc, x, y = calculator
    y = y.copy()
    y[3, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"`train_set`, batch 0 .*the labels hold inf at example 3 "):
        calc.self_influence((x, y))


def test_nan_weights_of_the_model_are_refused() -> None:
    model = make_mlp()
    kernel = model.layers[-1].kernel
    kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))
    with pytest.raises(NonFiniteError, match="weight"):
        InfluenceModel(model, start_layer=-1, loss_function=logits_loss())
