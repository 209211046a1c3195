"""The bad-input matrix: one test per kind of bad input, each asserting the exact error type and a
phrase of its message, or the correct value against an independent oracle.

`HANDLED` holds the cases that already gave a clear error or the correct value before issue 7
(among them the documented ways around issue 7's cases: a dataset shuffled once, a loss over
all outputs of a model, a saturating trunk); `NEW` the cases that gave a wrong number, a hang or
an unhelpful crash (issue 7), each named after the issue's item; each of them fails on the code
before issue 7.
Curvature cases (spectrum, solver residuals, Hessian memory) and the CLI's output folder are
tested with the curvature solvers and the CLI.

Value oracles: closed-form softmax head gradients and Hessian in float64 (`tests/oracles.py`),
compared with `VALUE_RTOL` relative to the largest value (float32 gradients, float64 solve).
"""

from __future__ import annotations

import functools
import re
import signal
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import logits_loss, make_classification, make_mlp
from oracles import assert_close, features_of, softmax_head_gradients, softmax_head_hessian

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, SecondOrderInfluenceCalculator
from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError
from vestigia.model import BaseInfluenceModel

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning:numpy.*")

VALUE_RTOL = 1e-4  # float32 gradients against a float64 closed form, relative to the largest value
DAMPING = 0.1
HANG_SECONDS = 60  # every case finishes in a few seconds; this only stops a hang
N, D, C = 30, 5, 3


class Case(NamedTuple):
    action: Callable[[], Any]
    error: type[BaseException] | None  # None: `action` checks a value against an oracle itself
    match: str = ""


@functools.cache
def _data() -> tuple[np.ndarray, np.ndarray]:
    return make_classification(n=N, d=D, classes=C)


@functools.cache
def _calculator() -> FirstOrderInfluenceCalculator:
    """One calculator for the cases that only need one (its traced functions are reused)."""
    influence_model = InfluenceModel(make_mlp(), start_layer=-1, loss_function=logits_loss())
    return FirstOrderInfluenceCalculator(influence_model, _data(), "exact", damping=DAMPING)


def _model(**kwargs: Any) -> InfluenceModel:
    kwargs.setdefault("loss_function", logits_loss())
    return InfluenceModel(kwargs.pop("model", None) or make_mlp(), **kwargs)


def _ds(x: Any, y: Any, batch: int = 8) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _with(index: tuple[int, int], value: float) -> np.ndarray:
    x = _data()[0].copy()
    x[index] = value
    return x


def _self_influence(data: Any) -> Any:
    return _calculator().self_influence(data)


def _matrix(test: Any, train: Any = None) -> np.ndarray:
    return _calculator().influence_matrix(test, _data() if train is None else train)


# -- oracles ---------------------------------------------------------------------------------


def _oracle_matrix(x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """`G_test (H + damping I)^-1 G_train^T` of the MLP's last layer, closed form in float64."""
    model = _calculator().model.model
    x, y = _data()
    kernel, bias = model.layers[-1].get_weights()
    g_train = softmax_head_gradients(features_of(model, x), kernel, bias, y)
    g_test = softmax_head_gradients(features_of(model, x_test), kernel, bias, y_test)
    hessian = softmax_head_hessian(features_of(model, x), kernel, bias) + DAMPING * np.eye(g_train.shape[1])
    return g_test @ np.linalg.solve(hessian, g_train.T)


def _huge_input_saturates_to_the_oracle() -> None:
    """A finite 1e30 input through a tanh trunk: finite scores, equal to the float64 oracle."""
    x_test, y = _with((4, 1), 1e30), _data()[1]
    assert_close(_matrix((x_test, y)), _oracle_matrix(x_test, y), VALUE_RTOL)


def _fixed_shuffle_matches_the_shuffled_arrays() -> None:
    """`shuffle(..., reshuffle_each_iteration=False)` is accepted; columns follow the shuffled order."""
    x, y = _data()
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N, seed=3, reshuffle_each_iteration=False)
    order = np.array([np.flatnonzero((x == row).all(axis=1))[0] for row, _ in shuffled.as_numpy_iterator()])
    matrix = _matrix((x[:4], y[:4]), shuffled.batch(8))
    np.testing.assert_allclose(matrix, _oracle_matrix(x[:4], y[:4])[:, order], rtol=VALUE_RTOL, atol=1e-5)


def _two_output_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((D,))
    hidden = keras.layers.Dense(6, activation="tanh")(inputs)
    outputs = [keras.layers.Dense(C, name="classes")(hidden), keras.layers.Dense(2, name="sign")(hidden)]
    return keras.Model(inputs, outputs)


def _both_outputs_loss(y_true: Any, y_pred: Any) -> tf.Tensor:
    first = keras.losses.categorical_crossentropy(y_true[0], y_pred[0], from_logits=True)
    return first + keras.losses.categorical_crossentropy(y_true[1], y_pred[1], from_logits=True)


def _loop_gradients(model: keras.Model, variables: list[Any], loss: Callable, x: np.ndarray, y: Any) -> np.ndarray:
    """One tape per example on the whole model (targets may be a tuple of arrays)."""
    rows = []
    for i in range(len(x)):
        y_i = tf.nest.map_structure(lambda a, i=i: a[i : i + 1], y)
        with tf.GradientTape() as tape:
            value = tf.reshape(loss(y_i, model(x[i : i + 1])), [-1])[0]
        grads = tape.gradient(value, [v.value for v in variables])
        rows.append(np.concatenate([np.ravel(g) for g in grads]))
    return np.asarray(rows, np.float64)


def _multi_output_loss_over_all_outputs() -> None:
    """A loss that takes both outputs: per-example gradients equal a per-example tape oracle."""
    x, y = _data()
    y2 = np.eye(2, dtype="float32")[(x[:, 0] > 0).astype(int)]
    model = _two_output_model()
    influence_model = _model(model=model, start_layer=1, last_layer=3, loss_function=_both_outputs_loss)
    grads = influence_model.batch_jacobian(_ds(x, (y, y2), 7)).numpy()
    assert_close(grads, _loop_gradients(model, influence_model.weights, _both_outputs_loss, x, (y, y2)), 1e-5)


def _mixed_model() -> keras.Model:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return make_mlp()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _float32_copy_of_a_mixed_model() -> None:
    """`float32_copy` of a mixed_float16 model: gradients equal those of the float32 model."""
    from vestigia.model import float32_copy

    mixed, reference = _mixed_model(), make_mlp()
    mixed.set_weights(reference.get_weights())
    x, y = _data()
    grads = _model(model=float32_copy(mixed), start_layer=0, last_layer=1).batch_jacobian(_ds(x, y)).numpy()
    expected = _model(model=reference, start_layer=0, last_layer=1).batch_jacobian(_ds(x, y)).numpy()
    np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=1e-7)


def _float64_inputs_to_a_fully_watched_model() -> None:
    """NumPy's default float64 inputs, head starting at the first layer: same gradients as float32."""
    x, y = _data()
    model = _model(start_layer=0, last_layer=1)
    expected = model.batch_jacobian(_ds(x, y)).numpy()
    np.testing.assert_array_equal(model.batch_jacobian(_ds(x.astype("float64"), y)).numpy(), expected)


def _sparse_labels(bad: int) -> None:
    x, y = _data()
    labels = y.argmax(1).astype("int64")
    labels[11] = bad
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    FirstOrderInfluenceCalculator(_model(loss_function=loss), _ds(x, labels), "exact", damping=DAMPING)


def _nan_trunk_weight() -> None:
    model = make_mlp()
    kernel = model.layers[0].kernel
    kernel.assign(np.where(np.arange(kernel.shape[1]) == 2, np.nan, kernel.numpy()).astype("float32"))
    _model(model=model, start_layer=-1)


def _maxpool_calculator() -> FirstOrderInfluenceCalculator:
    """A trunk whose max-pooling maps a NaN pixel to a finite number."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((D, 1)), keras.layers.MaxPooling1D(2), keras.layers.Flatten(), keras.layers.Dense(C)]
    )
    x, y = _data()
    return FirstOrderInfluenceCalculator(_model(model=model, start_layer=-1), (x[..., None], y), "exact", damping=0.1)


def _relu_calculator() -> FirstOrderInfluenceCalculator:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(C)])
    return FirstOrderInfluenceCalculator(_model(model=model, start_layer=-1), _data(), "exact", damping=DAMPING)


def _nan_saved_vectors() -> Any:
    """Influence vectors saved by `compute_influence_vector`, one entry set to NaN, then read back."""
    import tempfile

    calculator = _calculator()
    with tempfile.TemporaryDirectory() as folder:
        saved = calculator.compute_influence_vector(_ds(x_, y_))
        broken = saved.enumerate().map(
            lambda i, pair: (pair[0], tf.where(i == 1, tf.fill(tf.shape(pair[1]), np.nan), pair[1]))
        )
        broken.save(folder)
        return calculator.estimate_influence_values_in_batches(
            _ds(x_, y_), _ds(x_, y_), load_influence_vector_path=folder
        )


_NOISE = tf.random.Generator.from_seed(1)  # its state advances from one pass to the next


def _memory_limited(action: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VESTIGIA_MEMORY_LIMIT_BYTES", "2000")  # a 30 x 30 float32 matrix needs 7,200
            return action()

    return run


def _huge_train_set() -> tf.data.Dataset:
    """10^9 examples by cardinality (only the first batches are ever read)."""
    x, y = _data()
    rows = tf.data.Dataset.range(10**9).map(lambda i: (tf.constant(x)[i % N], tf.constant(y)[i % N]))
    return rows.batch(1000)


# -- the table -------------------------------------------------------------------------------

x_, y_ = _data()

HANDLED = {
    "unbatched dataset": Case(
        lambda: _self_influence(tf.data.Dataset.from_tensor_slices((x_, y_))),
        InvalidDataError,
        r"`train_set` must be a batched tf.data.Dataset \(call `.batch",
    ),
    "empty arrays": Case(lambda: _self_influence((x_[:0], y_[:0])), InvalidDataError, r"`train_set` is empty"),
    "empty dataset": Case(
        lambda: _self_influence(_ds(x_, y_).unbatch().filter(lambda a, b: False).batch(4)),
        InvalidDataError,
        r"`train_set` is empty: iterating it yielded no examples",
    ),
    "arrays of unequal lengths": Case(
        lambda: _self_influence((x_, y_[:-1])), InvalidDataError, r"one row per example\. Received lengths \[29, 30\]"
    ),
    "targets shorter than inputs in a batch": Case(
        lambda: _self_influence(
            tf.data.Dataset.zip((_ds(x_, y_).map(lambda a, b: a), _ds(x_, y_, 7).map(lambda a, b: b)))
        ),
        InvalidDataError,
        r"a batch has 8 inputs but targets of shape \[\(7, 3\)\]",
    ),
    "sample weights of the wrong length": Case(
        lambda: _self_influence(_ds(x_, y_).map(lambda a, b: (a, b, tf.ones(tf.shape(a)[:1] - 1)))),
        InvalidDataError,
        r"a batch has 8 inputs but sample_weight of shape \(7,\)\. Give one weight per example",
    ),
    "element that is not a tuple": Case(
        lambda: _self_influence(tf.data.Dataset.from_tensor_slices({"x": x_, "y": y_}).batch(8)),
        InvalidDataError,
        r"Each dataset element must be a tuple `\(x, y\)`",
    ),
    "data of the wrong type": Case(
        lambda: _self_influence("train.csv"), InvalidDataError, r"Received: train_set of type str"
    ),
    "inputs of the wrong example shape": Case(
        lambda: _matrix((x_[:, :4], y_)), InvalidDataError, r"`dataset_to_evaluate`.*takes examples of shape \(5,\)"
    ),
    "integer inputs for a float model": Case(
        lambda: _self_influence((x_.astype("int32"), y_)), InvalidDataError, r"cast the data to it.*int32"
    ),
    "two inputs for a one-input model": Case(
        lambda: _self_influence(((x_, x_), y_)), InvalidDataError, r"the model takes 1 input\(s\) but a batch gives 2"
    ),
    "reduced loss": Case(
        lambda: _model(loss_function=keras.losses.CategoricalCrossentropy(from_logits=True)),
        InvalidModelError,
        r"create it with `reduction=None`.*reduction='sum_over_batch_size'",
    ),
    "loss function returning a scalar": Case(
        lambda: FirstOrderInfluenceCalculator(
            _model(loss_function=lambda t, p: tf.reduce_mean(keras.losses.categorical_crossentropy(t, p))),
            (x_, y_),
        ),
        InvalidModelError,
        r"must return one loss per example, shape \(batch,\)\. Received shape \(\)",
    ),
    "loss that is not callable": Case(
        lambda: _model(loss_function="categorical_crossentropy"), InvalidModelError, r"must be callable"
    ),
    "model that is not a Keras model": Case(
        lambda: InfluenceModel("model.keras"), InvalidModelError, r"`model` must be a Keras 3 model\. Received: str"
    ),
    "unbuilt model": Case(
        lambda: InfluenceModel(keras.Sequential([keras.layers.Dense(3)])), InvalidModelError, r"must be built"
    ),
    "start layer name that does not exist": Case(
        lambda: _model(start_layer="logits"), InvalidModelError, r"`start_layer` names no layer.*'logits'"
    ),
    "start layer index out of range": Case(
        lambda: _model(start_layer=7), InvalidModelError, r"out of range for a model with 2 layers.*start_layer=7"
    ),
    "last layer before the start layer": Case(
        lambda: _model(start_layer=1, last_layer=0), InvalidModelError, r"`last_layer` must not come before"
    ),
    "watched layer without weights": Case(
        lambda: _model(
            model=keras.Sequential([keras.Input((D,)), keras.layers.Dense(C), keras.layers.Activation("softmax")]),
            start_layer=1,
        ),
        InvalidModelError,
        r"have no trainable weights",
    ),
    "weights to watch from another model": Case(
        lambda: BaseInfluenceModel(make_mlp(), make_mlp(seed=1).trainable_variables, logits_loss()),
        InvalidModelError,
        r"`weights_to_watch` must hold trainable variables of `model`",
    ),
    "no weights to watch": Case(
        lambda: BaseInfluenceModel(make_mlp(), [], logits_loss()), InvalidModelError, r"is empty"
    ),
    "k = 0": Case(
        lambda: _calculator().top_k_indices((x_[:2], y_[:2]), (x_, y_), k=0),
        ValueError,
        r"`k` must be an integer >= 1\. Received: k=0",
    ),
    "k not an integer": Case(
        lambda: _calculator().top_k_indices((x_[:2], y_[:2]), (x_, y_), k=2.5),
        TypeError,
        r"`k` must be an integer >= 1\. Received: k=2.5",
    ),
    "k larger than the training set": Case(
        lambda: _calculator().top_k_indices((x_[:2], y_[:2]), (x_, y_), k=31),
        InvalidDataError,
        r"at most the number of training examples \(30\)\. Received: k=31",
    ),
    "negative damping": Case(
        lambda: ExactIHVP(_calculator().model, (x_, y_), damping=-1.0), ValueError, r"`damping`.*damping=-1.0"
    ),
    "calculator given a Keras model": Case(
        lambda: FirstOrderInfluenceCalculator(make_mlp(), (x_, y_)), TypeError, r"must be an InfluenceModel"
    ),
    "cache argument of the wrong type": Case(
        lambda: _calculator().estimate_influence_values_in_batches(
            (x_, y_), (x_, y_), influence_vector_in_cache="memory"
        ),
        TypeError,
        r"`influence_vector_in_cache` must be a CACHE",
    ),
    "Inf in the labels": Case(
        lambda: _self_influence((x_, np.where(np.arange(N)[:, None] == 3, np.inf, y_).astype("float32"))),
        NonFiniteError,
        r"`train_set`.*labels",
    ),
    "finite 1e30 input through a saturating trunk": Case(_huge_input_saturates_to_the_oracle, None),
    "dataset shuffled once": Case(_fixed_shuffle_matches_the_shuffled_arrays, None),
    "two-output model with a loss over both outputs": Case(_multi_output_loss_over_all_outputs, None),
    "NaN in a watched weight": Case(lambda: _model(model=_nan_weighted(-1), start_layer=-1), NonFiniteError, r"weight"),
}


def _nan_weighted(layer: int) -> keras.Model:
    model = make_mlp()
    kernel = model.layers[layer].kernel
    kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))
    return model


NEW = {
    "NaN in the inputs: batch and position": Case(
        lambda: _self_influence(_ds(_with((12, 3), np.nan), y_)),
        NonFiniteError,
        r"`train_set`, batch 1 \(examples 8-15\): the inputs hold nan at example 12 "
        r"\(row 4 of the batch, position \(3,\)\)",
    ),
    "Inf in the test inputs: batch and position": Case(
        lambda: _matrix(_ds(_with((20, 0), -np.inf), y_)),
        NonFiniteError,
        r"`dataset_to_evaluate`, batch 2 \(examples 16-23\): the inputs hold -inf at example 20",
    ),
    "NaN pixel that max-pooling hides": Case(
        lambda: _maxpool_calculator().self_influence((_with((5, 2), np.nan)[..., None], y_)),
        NonFiniteError,
        r"the inputs hold nan at example 5 \(row 5 of the batch, position \(2, 0\)\)",
    ),
    "NaN in a trunk (unwatched) weight": Case(
        _nan_trunk_weight,
        NonFiniteError,
        r"weight '.*kernel' \(not watched \(trunk or frozen\)\).*first at index \(0, 2\)",
    ),
    "finite 1e30 input that overflows the scores": Case(
        lambda: _relu_calculator().self_influence(_ds(_with((9, 1), 1e30), y_)),
        NonFiniteError,
        r"`train_set`, batch 1: the self-influence of example 9 \(row 1\) is (inf|nan)\..*overflow float32",
    ),
    "finite 1e30 input that overflows a score matrix": Case(
        lambda: _relu_calculator().influence_matrix(_ds(_with((9, 1), 1e30), y_), _ds(_with((9, 1), 1e30), y_)),
        NonFiniteError,
        r"score of `dataset_to_evaluate` example 9 against `train_set` example 9 \(training batch 1, column 1\) is",
    ),
    "finite 1e30 group whose first-order influence overflows": Case(
        lambda: _relu_calculator().estimate_influence_values_group(_ds(_with((9, 1), 1e30), y_)),
        NonFiniteError,
        r"The group influence value holds 1 NaN or Inf value\(s\) of 1.*overflow float32",
    ),
    "finite 1e30 group whose second-order influence overflows": Case(
        lambda: SecondOrderInfluenceCalculator(
            _relu_calculator().model, _data(), "exact", damping=DAMPING
        ).estimate_influence_values_group(_ds(_with((9, 1), 1e30)[:12], y_[:12])),
        NonFiniteError,
        r"The group influence value holds 1 NaN or Inf value\(s\) of 1",
    ),
    "NaN in influence vectors read back from disk": Case(
        _nan_saved_vectors,
        NonFiniteError,
        r"The influence vectors saved at '.*' hold",
    ),
    "dataset reshuffled at every pass": Case(
        lambda: _self_influence(tf.data.Dataset.from_tensor_slices((x_, y_)).shuffle(N, seed=1).batch(8)),
        InvalidDataError,
        r"`train_set` changes between passes.*reshuffle_each_iteration=False",
    ),
    "random augmentation in a .map": Case(
        lambda: _self_influence(_ds(x_, y_).map(lambda a, b: (a + _NOISE.uniform(tf.shape(a)), b))),
        InvalidDataError,
        r"`train_set` changes between passes: batch 0 differs between two iterations",
    ),
    "infinite dataset (.repeat())": Case(
        lambda: _self_influence(_ds(x_, y_).repeat()), InvalidDataError, r"`train_set` is infinite.*`.repeat\(\)`"
    ),
    "infinite dataset given to the solver": Case(
        lambda: ExactIHVP(_calculator().model, _ds(x_, y_).repeat()), InvalidDataError, r"`train_dataset` is infinite"
    ),
    "two-output model with a one-output loss": Case(
        lambda: FirstOrderInfluenceCalculator(_model(model=_two_output_model(), start_layer=-1), (x_, y_)),
        InvalidModelError,
        r"failed on the model's 2 outputs \['classes', 'sign'\].*keras.Model\(model.inputs, model.outputs\[0\]\)",
    ),
    "mixed_float16 model": Case(
        lambda: _model(model=_mixed_model(), start_layer=-1),
        InvalidModelError,
        r"dtype policy 'mixed_float16'.*`vestigia.model.float32_copy\(model\)`",
    ),
    "mixed_float16 model copied to float32": Case(_float32_copy_of_a_mixed_model, None),
    "float64 inputs to a fully watched model": Case(_float64_inputs_to_a_fully_watched_model, None),
    "sparse label above the number of classes": Case(
        lambda: _sparse_labels(7),
        InvalidDataError,
        r"label value 7 at example 11 \(batch 1, row 3\) is outside \[0, 3\) for a model with 3 classes",
    ),
    "negative sparse label": Case(lambda: _sparse_labels(-1), InvalidDataError, r"label value -1 at example 11"),
    "influence matrix larger than memory": Case(
        _memory_limited(lambda: _matrix((x_, y_))),
        MemoryError,
        r"influence_matrix \(30 x 30 float32, with its blocks\) needs 0.00 GiB.*`top_k_indices",
    ),
    "influence matrix larger than memory, length unknown": Case(
        _memory_limited(lambda: _matrix((x_, y_), _ds(x_, y_).filter(lambda a, b: True))),
        MemoryError,
        r"influence_matrix \(30 x >= 16 float32, with its blocks\)",
    ),
    "influence matrix of 10^9 columns": Case(
        lambda: _matrix((x_, y_), _huge_train_set()),
        MemoryError,
        r"influence_matrix \(30 x 1000000000 float32, with its blocks\) needs 223.52 GiB",
    ),
}


class _Hang(BaseException):
    """Raised by the alarm: a case ran past `HANG_SECONDS` (an infinite dataset used to hang)."""


def _run(case: Case) -> None:
    def hang(*_: Any) -> None:
        raise _Hang(f"still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_SECONDS)
    try:
        if case.error is None:
            case.action()
            return
        with pytest.raises(case.error) as info:
            case.action()
        assert re.search(case.match, str(info.value), re.S), f"message: {info.value}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", list(HANDLED))
def test_handled_case(name: str) -> None:
    _run(HANDLED[name])


@pytest.mark.parametrize("name", list(NEW))
def test_new_case(name: str) -> None:
    _run(NEW[name])
