"""Boundary-based self-influence (DeepFool in input and weight space).

Oracles: hand-derived closed forms on linear classifiers (Influenciae 0.3.0's two exact tests,
and the polytope distance of any linear classifier), an eager one-example-at-a-time DeepFool
written here from the formula (the weight-space one assigns the weights of a *clone*), and a
line search along gradient directions as a sanity bound on the distance found.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_classification, make_mlp

from vestigia.errors import InvalidDataError, InvalidModelError, NonFiniteError
from vestigia.methods.boundary import SampleBoundaryCalculator, WeightsBoundaryCalculator
from vestigia.model import InfluenceModel
from vestigia.results import ORDER

# float32 search: a handful of steps, each exact to a few ulps of O(1) values.
EXACT_TOL = 1e-6
# Batched (pfor, graph) vs one-example eager search: float32 round-off along a few Newton-like steps.
PATH_RTOL = 1e-4
PATH_ATOL = 1e-5


def _seed_linear_model(kernel: np.ndarray) -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.layers[0].set_weights([kernel.astype("float32"), np.array([4.0, 0.0], "float32")])
    return model


# Influenciae's test builds the kernel with `tf.constant_initializer([[1, 1, 1], [0, 0, 0]])`,
# which fills the (3, 2) kernel in row-major order: [[1, 1], [1, 0], [0, 0]].
SEED_KERNEL = np.reshape([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], (3, 2))
# The literal reading W = [[1, 1, 1], [0, 0, 0]]^T: column 0 all ones, column 1 zeros.
TRANSPOSED_KERNEL = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).T
ZERO_INPUT = (np.zeros((1, 3), "float32"), np.eye(2, dtype="float32")[[0]])


@pytest.mark.parametrize(("kernel", "expected"), [(SEED_KERNEL, -4.0), (TRANSPOSED_KERNEL, -4.0 / np.sqrt(3.0))])
def test_sample_boundary_seed_closed_form(kernel: np.ndarray, expected: float) -> None:
    """f(x) = W^T x + b with b = (4, 0), at x = 0: f = (4, 0), class 0.

    One DeepFool step towards class 1: df = f_1 - f_0 = -4, dg = grad_x(f_1 - f_0) = W[:, 1] - W[:, 0],
    r = |df| / ||dg||^2 * dg lands on f_0 = f_1 (the model is linear), so the score is -4 / ||dg||.
    Seed kernel [[1, 1], [1, 0], [0, 0]]: dg = (0, -1, 0), ||dg|| = 1, x_adv = (0, -4, 0), score -4.0
    (Influenciae's expected value, "if input has one -4 instead of 0, the logit is 0").
    Transposed kernel (ones | zeros): dg = -(1, 1, 1), ||dg|| = sqrt(3), score -4 / sqrt(3).
    """
    model = _seed_linear_model(kernel)
    calculator = SampleBoundaryCalculator(model)
    np.testing.assert_allclose(calculator.self_influence(ZERO_INPUT), [expected], rtol=0, atol=EXACT_TOL)
    x_adv = calculator.boundary_points(ZERO_INPUT[0])
    logits = model(x_adv).numpy()
    np.testing.assert_allclose(logits[:, 0], logits[:, 1], atol=EXACT_TOL)


@pytest.mark.parametrize("kernel", [SEED_KERNEL, TRANSPOSED_KERNEL])
@pytest.mark.parametrize(("norm_type", "expected"), [(2, -2.0 * np.sqrt(2.0)), (1, -4.0), (np.inf, -2.0)])
def test_weights_boundary_seed_closed_form(kernel: np.ndarray, norm_type: float, expected: float) -> None:
    """Same model; the weights are (W (3, 2), b (2,)), at x = 0: f = (4, 0).

    d f_j / d W = x e_j^T = 0 and d f_j / d b = e_j, so dg = (0, e_1 - e_0), ||dg||^2 = 2 and
    r = 4 / 2 * (0, (-1, 1)) moves b from (4, 0) to (2, 2), where f_0 = f_1 = 2. Whatever the
    kernel: ||r||_2 = 2 sqrt(2) (Influenciae's -2 sqrt(2)), ||r||_1 = 4, ||r||_inf = 2.
    """
    model = _seed_linear_model(kernel)
    calculator = WeightsBoundaryCalculator(model, norm_type=norm_type)
    np.testing.assert_allclose(calculator.self_influence(ZERO_INPUT), [expected], rtol=0, atol=EXACT_TOL)
    w_adv = calculator.boundary_points(ZERO_INPUT[0])
    np.testing.assert_allclose(w_adv[0, -2:], [2.0, 2.0], atol=EXACT_TOL)
    np.testing.assert_array_equal(w_adv[0, :-2], kernel.reshape(-1))


def test_traced_search_reads_the_current_weights() -> None:
    """After the model is updated in place (e.g. trained further), the same calculators see the
    new weights: with b = (6, 0) the input-space score is -6 (seed kernel) and the weight-space
    one -3 sqrt(2) (b moves from (6, 0) to (3, 3))."""
    model = _seed_linear_model(SEED_KERNEL)
    sample, weights = SampleBoundaryCalculator(model), WeightsBoundaryCalculator(model)
    sample.self_influence(ZERO_INPUT), weights.self_influence(ZERO_INPUT)
    model.layers[0].bias.assign(np.array([6.0, 0.0], "float32"))
    np.testing.assert_allclose(sample.self_influence(ZERO_INPUT), [-6.0], rtol=0, atol=EXACT_TOL)
    np.testing.assert_allclose(weights.self_influence(ZERO_INPUT), [-3.0 * np.sqrt(2.0)], rtol=0, atol=EXACT_TOL)


def _linear_classifier(d: int = 4, classes: int = 5, seed: int = 0) -> tuple[keras.Model, np.ndarray]:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(classes)])
    rng = np.random.default_rng(seed)
    model.layers[0].set_weights(
        [rng.normal(size=(d, classes)).astype("float32"), rng.normal(size=classes).astype("float32")]
    )
    return model, rng.normal(size=(32, d)).astype("float32")


def test_linear_multiclass_input_space_is_polytope_distance() -> None:
    """For a linear classifier the region of class c is a convex polytope, so the distance of
    an interior x to its boundary is min_{k != c} (f_c - f_k) / ||w_c - w_k||, the first
    DeepFool step exactly."""
    model, x = _linear_classifier()
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    logits = x.astype(np.float64) @ kernel + bias
    c = logits.argmax(axis=1)
    gaps = logits[np.arange(len(x)), c][:, None] - logits
    norms = np.linalg.norm(kernel[:, c].T[:, :, None] - kernel[None], axis=1)
    own = np.arange(kernel.shape[1])[None] == c[:, None]
    ratios = np.where(own, np.inf, gaps / np.where(own, 1.0, norms))
    expected = -ratios.min(axis=1)
    got = SampleBoundaryCalculator(model).self_influence((x, np.zeros((len(x), 1))))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=EXACT_TOL)


def test_linear_multiclass_weight_space_closed_form() -> None:
    """In weight space f_k = x . W_k + b_k is linear in the weights with d f_k / d(W_k, b_k) =
    (x, 1), so ||grad(f_k - f_c)||^2 = 2 (||x||^2 + 1) for every k and the distance is
    (top1 - top2) / sqrt(2 (||x||^2 + 1))."""
    model, x = _linear_classifier(seed=1)
    kernel, bias = (w.astype(np.float64) for w in model.layers[0].get_weights())
    top2 = np.sort(x.astype(np.float64) @ kernel + bias, axis=1)[:, -2:]
    expected = -(top2[:, 1] - top2[:, 0]) / np.sqrt(2.0 * (np.sum(x.astype(np.float64) ** 2, axis=1) + 1.0))
    got = WeightsBoundaryCalculator(model).self_influence((x, np.zeros((len(x), 1))))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=EXACT_TOL)


# -- an independent, one-example-at-a-time DeepFool --------------------------------------------


def _deepfool_step(logits: np.ndarray, jacobian: np.ndarray, label: int) -> np.ndarray:
    """One DeepFool step from logits (C,) and jacobian (C, D), in float64."""
    gaps = np.abs(logits - logits[label])
    directions = jacobian - jacobian[label]
    norms = np.linalg.norm(directions, axis=1)
    ratios = [gaps[k] / norms[k] if k != label else np.inf for k in range(len(logits))]
    k = int(np.argmin(ratios))
    return gaps[k] / norms[k] ** 2 * directions[k]


def _stopped(logits: np.ndarray, label: int, eps: float) -> bool:
    top2 = np.sort(logits)[-2:]
    return int(np.argmax(logits)) != label or top2[1] - top2[0] <= eps


def loop_sample_deepfool(model: keras.Model, x: np.ndarray, step_nbr: int = 100, eps: float = 1e-6) -> np.ndarray:
    """Distances `||x_i - x_adv_i||`, one eager search per example."""
    distances = []
    for row in x:
        point = tf.Variable(row[None])
        label = None
        for _ in range(step_nbr):
            with tf.GradientTape() as tape:
                logits = model(point)[0]
            jacobian = tape.jacobian(logits, point).numpy().reshape(len(logits), -1)
            logits = logits.numpy()
            label = int(np.argmax(logits)) if label is None else label
            if _stopped(logits, label, eps):
                break
            point.assign_add(_deepfool_step(logits, jacobian, label).reshape(point.shape).astype("float32"))
        distances.append(np.linalg.norm(point.numpy()[0] - row))
    return np.asarray(distances)


def loop_weights_deepfool(model: keras.Model, x: np.ndarray, step_nbr: int = 100, eps: float = 1e-6) -> np.ndarray:
    """Distances `||w - w_adv_i||_2`, one eager search per example on a clone (the seed's way)."""
    clone = keras.models.clone_model(model)
    original = model.get_weights()
    variables = clone.trainable_variables
    distances = []
    for row in x:
        clone.set_weights(original)
        start = np.concatenate([v.numpy().reshape(-1) for v in variables])
        label = None
        for _ in range(step_nbr):
            with tf.GradientTape() as tape:
                logits = clone(row[None])[0]
            parts = tape.jacobian(logits, [v.value for v in variables])
            jacobian = np.concatenate([p.numpy().reshape(len(logits), -1) for p in parts], axis=1)
            logits = logits.numpy()
            label = int(np.argmax(logits)) if label is None else label
            if _stopped(logits, label, eps):
                break
            step = _deepfool_step(logits, jacobian, label)
            for v, piece in zip(variables, np.split(step, np.cumsum([int(np.prod(v.shape)) for v in variables])[:-1])):
                v.assign_add(piece.reshape(v.shape).astype("float32"))
        end = np.concatenate([v.numpy().reshape(-1) for v in variables])
        distances.append(np.linalg.norm(end - start))
    return np.asarray(distances)


def _mlp_problem(n: int = 12, classes: int = 4) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    x, y = make_classification(n=n, d=5, classes=classes, seed=3)
    model = make_mlp(d=5, hidden=8, classes=classes, seed=3)
    return model, x, y


def test_sample_batched_equals_per_example_loop() -> None:
    model, x, y = _mlp_problem(n=10)
    calculator = SampleBoundaryCalculator(model)
    batched = calculator.self_influence((x, y))
    one_by_one = calculator.self_influence(tf.data.Dataset.from_tensor_slices((x, y)).batch(1))
    np.testing.assert_allclose(batched, one_by_one, rtol=PATH_RTOL, atol=PATH_ATOL)
    np.testing.assert_allclose(-batched, loop_sample_deepfool(model, x), rtol=PATH_RTOL, atol=PATH_ATOL)
    assert np.all(batched < 0)


def test_weights_batched_equals_per_example_loop() -> None:
    model, x, y = _mlp_problem(n=6)
    calculator = WeightsBoundaryCalculator(model)
    batched = calculator.self_influence((x, y))
    one_by_one = calculator.self_influence(tf.data.Dataset.from_tensor_slices((x, y)).batch(3))
    np.testing.assert_allclose(batched, one_by_one, rtol=PATH_RTOL, atol=PATH_ATOL)
    np.testing.assert_allclose(-batched, loop_weights_deepfool(model, x), rtol=PATH_RTOL, atol=PATH_ATOL)


def test_weights_boundary_on_a_convolutional_model() -> None:
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 1)),
            keras.layers.Conv2D(2, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    x = np.random.default_rng(5).normal(size=(3, 5, 5, 1)).astype("float32")
    got = WeightsBoundaryCalculator(model).self_influence((x, np.zeros((3, 1))))
    np.testing.assert_allclose(-got, loop_weights_deepfool(model, x), rtol=PATH_RTOL, atol=PATH_ATOL)


def _line_search_distance(model: keras.Model, x: np.ndarray, direction: np.ndarray, label: int) -> float:
    """Smallest t (bisection to 1e-6 after a doubling bracket) with the class of x + t u changed, u = unit direction."""
    unit = direction / np.linalg.norm(direction)

    def flipped(t: float) -> bool:
        return int(np.argmax(model(x[None] + t * unit[None]).numpy()[0])) != label

    high = 1e-3
    while not flipped(high):
        high *= 2.0
        if high > 1e4:
            return np.inf
    low = 0.0
    while high - low > 1e-6:
        mid = 0.5 * (low + high)
        low, high = (low, mid) if flipped(mid) else (mid, high)
    return high


# DeepFool has no optimality guarantee on a curved boundary: its path bends and its last step
# may cross the boundary. On the mildly curved model below (first kernel scaled by 0.1, so tanh is
# near-linear) it was at most 1.6% farther than the best line search; on the same MLP unscaled
# (saturated tanh) up to 32% farther, which is DeepFool's approximation, not an error (the
# one-example oracle agrees there). A wrong step (scale, direction or class) is off by far more.
LINE_SEARCH_RTOL = 0.02


def test_sample_boundary_point_is_on_the_boundary_and_near_closest_along_gradients() -> None:
    """x_adv changes the class or ties the top-2 logits, ||x_adv - x|| is the score, and it is no
    farther (up to LINE_SEARCH_RTOL) than the boundary found by a line search along any
    grad(f_k - f_c), k != c."""
    model, x, y = _mlp_problem(n=10, classes=5)
    kernel, bias = model.layers[0].get_weights()
    model.layers[0].set_weights([0.1 * kernel, bias])
    calculator = SampleBoundaryCalculator(model)
    x_adv = calculator.boundary_points(x)
    scores = calculator.self_influence((x, y))
    np.testing.assert_allclose(-scores, np.linalg.norm(x_adv - x, axis=1), rtol=1e-6)
    logits, adv_logits = model(x).numpy(), model(x_adv).numpy()
    labels = logits.argmax(axis=1)
    top2 = np.sort(adv_logits, axis=1)[:, -2:]
    on_boundary = (adv_logits.argmax(axis=1) != labels) | (top2[:, 1] - top2[:, 0] <= 1e-5)
    assert on_boundary.all(), f"examples {np.flatnonzero(~on_boundary)} stopped short of the boundary"
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = model(xt)
    jacobian = tape.batch_jacobian(out, xt).numpy()
    line = np.array(
        [
            min(_line_search_distance(model, x[i], jacobian[i, k] - jacobian[i, c], c) for k in range(5) if k != c)
            for i, c in enumerate(labels)
        ]
    )
    assert np.all(-scores <= line * (1 + LINE_SEARCH_RTOL) + 1e-5), np.stack([-scores, line])


def test_model_weights_never_change_even_after_an_error() -> None:
    """A model that raises mid-search (a runtime assert on large activations, hit by the second
    batch) leaves its weights bit-identical; so does a normal run."""

    class Tripwire(keras.layers.Layer):
        def call(self, inputs: tf.Tensor) -> tf.Tensor:
            with tf.control_dependencies([tf.debugging.assert_less(tf.reduce_max(tf.abs(inputs)), 50.0)]):
                return tf.identity(inputs)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), Tripwire(), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    before = [w.copy() for w in model.get_weights()]
    x, y = make_classification(n=8, d=5, classes=3, seed=0)
    for calculator in (SampleBoundaryCalculator(model), WeightsBoundaryCalculator(model)):
        calculator.self_influence((x, y))
        for w, w0 in zip(model.get_weights(), before):
            np.testing.assert_array_equal(w, w0)
        bad = np.concatenate([x, 100.0 * x])
        with pytest.raises(tf.errors.InvalidArgumentError):
            calculator.self_influence(tf.data.Dataset.from_tensor_slices((bad, np.concatenate([y, y]))).batch(8))
        for w, w0 in zip(model.get_weights(), before):
            np.testing.assert_array_equal(w, w0)


def test_influence_model_and_top_k_use_the_engine() -> None:
    model, x, y = _mlp_problem()
    calculator = SampleBoundaryCalculator(InfluenceModel(model, start_layer=-1))
    scores = calculator.self_influence((x, y))
    np.testing.assert_allclose(scores, SampleBoundaryCalculator(model).self_influence((x, y)), rtol=1e-6)
    top = calculator.compute_top_k_from_training_dataset((x, y), 3, ORDER.DESCENDING)
    np.testing.assert_array_equal(top.indices, np.argsort(-scores, kind="stable")[:3])
    np.testing.assert_array_equal(top.samples, x[top.indices])


def test_bad_arguments_raise_clear_errors() -> None:
    model, x, y = _mlp_problem()
    with pytest.raises(ValueError, match="step_nbr"):
        SampleBoundaryCalculator(model, step_nbr=0)
    with pytest.raises(ValueError, match="norm_type"):
        WeightsBoundaryCalculator(model, norm_type=0.5)
    with pytest.raises(InvalidModelError, match="Keras"):
        SampleBoundaryCalculator("not a model")
    single = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    for calculator_class in (SampleBoundaryCalculator, WeightsBoundaryCalculator):
        with pytest.raises(InvalidModelError, match="2 classes"):
            calculator_class(single).self_influence((x, y))
    with pytest.raises(InvalidDataError, match="single"):
        SampleBoundaryCalculator(model).self_influence(((x, x), y))
    x_nan = x.copy()
    x_nan[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="inputs"):
        WeightsBoundaryCalculator(model).self_influence((x_nan, y))
