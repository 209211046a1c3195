"""Property-based tests (Hypothesis) of the data layer, per-example gradients and the engine.

Over dataset sizes, batch sizes (partial last batches included), input dtypes and value
ranges: results never depend on the batching, and never hold NaN or Inf without an error.
One model and one calculator serve every example (traced once for every batch size), so the
whole file runs in well under a minute.

Oracles: the same quantity computed in one batch (batching invariance), the closed-form
float64 softmax-head gradients of `tests/oracles.py`, and plain NumPy indexing.
Tolerances: `BATCH_RTOL` for the same float32 computation split differently (summation order
only); `ORACLE_RTOL` for float32 against the float64 closed form.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf
from conftest import logits_loss, make_classification, make_mlp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracles import assert_close, features_of, softmax_head_gradients

from vestigia import FirstOrderInfluenceCalculator, InfluenceModel
from vestigia.data import as_batched_dataset, dataset_size, select_samples
from vestigia.errors import NonFiniteError

pytestmark = [
    pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("error:divide by zero encountered:RuntimeWarning"),
]

POOL, D, C = 40, 5, 3
BATCH_RTOL = 1e-5  # float32, same operations, different batch boundaries
ORACLE_RTOL = 1e-5  # float32 gradients against the float64 closed form, relative to the largest entry
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(1, POOL)
batch_sizes = st.integers(1, 17)


@functools.cache
def _pool() -> tuple[np.ndarray, np.ndarray]:
    return make_classification(n=POOL, d=D, classes=C, seed=5)


@functools.cache
def _calculator() -> FirstOrderInfluenceCalculator:
    """Watches the whole MLP (hidden layer: generic autodiff of a tanh trunk-free head)."""
    x, y = _pool()
    influence_model = InfluenceModel(make_mlp(), start_layer=0, last_layer=1, loss_function=logits_loss())
    return FirstOrderInfluenceCalculator(influence_model, (x, y), "exact", damping=0.1)


@functools.cache
def _last_layer_model() -> InfluenceModel:
    return InfluenceModel(make_mlp(), start_layer=-1, loss_function=logits_loss())


def _ds(x: np.ndarray, y: np.ndarray, batch: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


# -- data layer ------------------------------------------------------------------------------


@SETTINGS
@given(n=sizes, batch=batch_sizes, data=st.data())
def test_dataset_views_do_not_depend_on_batching(n: int, batch: int, data: st.DataObject) -> None:
    x, y = (a[:n] for a in _pool())
    pipelines = [_ds(x, y, batch), _ds(x, y, batch).prefetch(2), _ds(x, y, batch).map(lambda a, b: (a, b))]
    indices = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6)))
    for dataset in pipelines + [as_batched_dataset((x, y), batch_size=batch)]:
        assert dataset_size(dataset) == n
        np.testing.assert_array_equal(select_samples(dataset, indices), x[indices])


# -- per-example gradients -------------------------------------------------------------------


@SETTINGS
@given(n=sizes, batch=batch_sizes, dtype=st.sampled_from(["float16", "float32", "float64"]))
def test_per_example_gradients_match_the_closed_form_for_any_batching_and_dtype(n: int, batch: int, dtype: str) -> None:
    """Last Dense layer of the MLP: `g_i = [a_i, 1] (x) (p_i - y_i)`, any batch size and input dtype."""
    x, y = (a[:n] for a in _pool())
    x = x.astype(dtype)
    model = _last_layer_model()
    grads = model.batch_jacobian(_ds(x, y, batch)).numpy()
    kernel, bias = model.model.layers[-1].get_weights()
    expected = softmax_head_gradients(features_of(model.model, x.astype("float32")), kernel, bias, y)
    assert_close(grads, expected, ORACLE_RTOL)


@SETTINGS
@given(
    n=sizes,
    batch=batch_sizes,
    row=st.integers(0, POOL - 1),
    col=st.integers(0, D - 1),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_a_non_finite_input_is_reported_at_its_example(n: int, batch: int, row: int, col: int, bad: float) -> None:
    x, y = (a[:n].copy() for a in _pool())
    row = row % n
    x[row, col] = bad
    with pytest.raises(NonFiniteError, match=rf"batch {row // batch} .*the inputs hold {bad} at example {row} "):
        _calculator().self_influence(_ds(x, y, batch))


# -- the engine ------------------------------------------------------------------------------


@SETTINGS
@given(n_train=sizes, n_test=st.integers(1, 8), train_batch=batch_sizes, test_batch=batch_sizes)
def test_scores_do_not_depend_on_batching(n_train: int, n_test: int, train_batch: int, test_batch: int) -> None:
    """`influence_matrix`, self-influence and top-k with any batch sizes equal the one-batch results."""
    x, y = _pool()
    calc = _calculator()
    train, test = (x[:n_train], y[:n_train]), (x[-n_test:], y[-n_test:])
    expected = calc.influence_matrix(_ds(*test, POOL), _ds(*train, POOL))
    matrix = calc.influence_matrix(_ds(*test, test_batch), _ds(*train, train_batch))
    assert_close(matrix, expected, BATCH_RTOL)
    self_influence = calc.self_influence(_ds(*train, train_batch))
    assert_close(self_influence, np.diag(calc.influence_matrix(_ds(*train, POOL), _ds(*train, POOL))), BATCH_RTOL)
    k = min(3, n_train)
    values, indices = calc.top_k_indices(_ds(*test, test_batch), _ds(*train, train_batch), k=k)
    np.testing.assert_allclose(values, np.take_along_axis(expected, indices, axis=1), rtol=BATCH_RTOL, atol=1e-6)
    assert_close(values, -np.sort(-expected, axis=1)[:, :k], BATCH_RTOL)


@SETTINGS
@given(n=sizes, batch=batch_sizes, exponent=st.integers(-30, 30))
@example(n=POOL, batch=7, exponent=0)  # finite
@example(n=POOL, batch=7, exponent=30)  # self-influence near 1e60: NonFiniteError
def test_scaled_inputs_give_finite_scores_or_an_error(n: int, batch: int, exponent: int) -> None:
    """Inputs scaled by 10^-30 .. 10^30: finite self-influence, or `NonFiniteError`; never NaN."""
    x, y = (a[:n] for a in _pool())
    try:
        values = _calculator().self_influence(_ds(x * np.float32(10.0**exponent), y, batch))
    except NonFiniteError as error:
        assert "example" in str(error)
        return
    assert np.isfinite(values).all()
