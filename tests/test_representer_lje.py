"""RPS-LJE against an independent numpy computation of the same formula.

The oracle recomputes the features with a float64 numpy forward pass and writes, for softmax
(or sigmoid) cross-entropy on a bias-free last `Dense` kernel `W` `(d, C)`, flattened row-major:
the ascent step `W_0 = W + eta (1/n) sum_i f_i (x) (p_i - y_i)`, the per-example gradients at
`W_0`, the mean Hessian `H_0 = (1/n) sum_i (f_i f_i^T) (x) S_i + damping I` as Kronecker products,
the contributions `W_i = (W_0 - H_0^-1 g_i) / n` with a dense solve, and the values
`[f_t^T W_i]_{c_t}` by a double loop.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import batched, logits_loss, make_classification
from oracles import features_of, probs

from vestigia import ExactIHVP, InfluenceModel
from vestigia.errors import InvalidModelError
from vestigia.methods.representer_lje import RepresenterPointLJE

D_IN, HIDDEN, CLASSES, N_TRAIN, N_TEST = 5, 8, 3, 60, 12
ETA, DAMPING = 0.5, 1e-3
# The library computes features, gradients and scores in float32 and the Hessian's entries in float32
# (factored in float64); values are O(1e-2..1): a relative error of 1e-4 leaves a wide margin.
VALUE_RTOL = 1e-4
# CG stops at a relative residual of 1e-5 (the solver's default) on a Hessian of condition ~1e4.
CG_RTOL = 1e-3


def make_model(classes: int = CLASSES, seed: int = 0, head_bias: bool = False, softmax: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((D_IN,)),
        keras.layers.Dense(HIDDEN, activation="tanh"),
        keras.layers.Dense(classes, use_bias=head_bias, kernel_initializer=keras.initializers.RandomNormal(0, 1)),
    ]
    return keras.Sequential(layers + ([keras.layers.Activation("softmax")] if softmax else []))


def oracle(
    f: np.ndarray, y: np.ndarray, kernel: np.ndarray, f_test: np.ndarray, eta: float = ETA, damping: float = DAMPING
) -> dict:
    n, d = f.shape
    c = kernel.shape[1]
    mean_grad = f.T @ (probs(f @ kernel) - y) / n
    w0 = kernel + eta * mean_grad
    p0 = probs(f @ w0)
    grads = np.stack([np.outer(f[i], p0[i] - y[i]).ravel() for i in range(n)])
    hessian = damping * np.eye(d * c)
    for fi, pi in zip(f, p0):
        curvature = np.diag(pi) - np.outer(pi, pi) if c > 1 else np.array([[pi[0] * (1 - pi[0])]])
        hessian += np.kron(np.outer(fi, fi), curvature) / n
    contributions = (w0.ravel()[None, :] - np.linalg.solve(hessian, grads.T).T) / n  # (n, d * c)
    logits = f_test @ kernel
    classes = np.argmax(logits, axis=1) if c > 1 else np.zeros(len(f_test), int)
    signs = np.ones(len(f_test)) if c > 1 else np.where(logits[:, 0] >= 0, 1.0, -1.0)
    values = np.zeros((len(f_test), n))
    for t in range(len(f_test)):
        for i in range(n):
            values[t, i] = signs[t] * (f_test[t] @ contributions[i].reshape(d, c)[:, classes[t]])
    newton = w0 - np.linalg.solve(hessian, (grads.mean(axis=0))).reshape(d, c)
    return dict(w0=w0, values=values, newton=newton, classes=classes, signs=signs)


@pytest.fixture(scope="module")
def problem() -> dict:
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, CLASSES, seed=1)
    model = make_model()
    f = features_of(model, x)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    expected = oracle(f[:N_TRAIN], y[:N_TRAIN].astype(np.float64), kernel, f[N_TRAIN:])
    train = batched(x[:N_TRAIN], y[:N_TRAIN], 16)
    lje = RepresenterPointLJE(
        InfluenceModel(model, loss_function=logits_loss()), train, damping=DAMPING, learning_rate=ETA
    )
    return dict(x=x, y=y, model=model, f=f, kernel=kernel, expected=expected, lje=lje, train=train)


def test_perturbation_is_an_ascent_step_on_the_mean_loss(problem: dict) -> None:
    np.testing.assert_allclose(problem["lje"].perturbed_kernel, problem["expected"]["w0"], rtol=0, atol=1e-6)
    assert problem["lje"].n_train == N_TRAIN


def test_pairwise_values_match_numpy_oracle(problem: dict) -> None:
    lje, x, y = problem["lje"], problem["x"], problem["y"]
    expected = problem["expected"]["values"]
    values = lje.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:], 5), problem["train"])
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())
    # The seed's pairing (vec(W_i) against f_t (x) e_t) gives the same numbers as the scoring pairing.
    seed_pairing = (
        lje._preprocess_samples((x[N_TRAIN:], y[N_TRAIN:])).numpy()
        @ lje._compute_influence_vector((x[:N_TRAIN], y[:N_TRAIN])).numpy().T
    )
    np.testing.assert_allclose(seed_pairing, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected).max())


def test_values_sum_to_the_newton_step_from_the_perturbed_kernel(problem: dict) -> None:
    """sum_i W_i = W_0 - H_0^-1 mean_i g_i: the values of a test point add up to that kernel's logit."""
    lje, f, x, y = problem["lje"], problem["f"], problem["x"], problem["y"]
    exp = problem["expected"]
    values = lje.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:]), problem["train"])
    newton_logits = (f[N_TRAIN:] @ exp["newton"])[np.arange(N_TEST), exp["classes"]]
    np.testing.assert_allclose(values.sum(axis=1), newton_logits, rtol=VALUE_RTOL, atol=1e-5)


def test_values_reconstruct_the_logits_of_a_stationary_last_layer() -> None:
    """With soft labels equal to the model's own probabilities the trained kernel is stationary: the
    ascent step vanishes and the contributions add up to the model's logits."""
    x, _ = make_classification(N_TRAIN + N_TEST, D_IN, CLASSES, seed=4)
    model = make_model(seed=5)
    f = features_of(model, x)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    soft = probs(f[:N_TRAIN] @ kernel).astype(np.float32)
    lje = RepresenterPointLJE(
        InfluenceModel(model, loss_function=logits_loss()), batched(x[:N_TRAIN], soft), damping=DAMPING
    )
    values = lje.influence_matrix(batched(x[N_TRAIN:], np.zeros((N_TEST, CLASSES), np.float32)), (x[:N_TRAIN], soft))
    logits = f[N_TRAIN:] @ kernel
    np.testing.assert_allclose(values.sum(axis=1), logits.max(axis=1), rtol=0, atol=1e-4)


def test_self_influence_is_the_absolute_diagonal(problem: dict) -> None:
    lje, y, f = problem["lje"], problem["y"], problem["f"]
    diagonal = oracle(f[:N_TRAIN], y[:N_TRAIN].astype(np.float64), problem["kernel"], f[:N_TRAIN])["values"]
    expected = np.abs(np.diag(diagonal))
    values = lje.self_influence(problem["train"])
    np.testing.assert_allclose(values, expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * expected.max())
    np.testing.assert_allclose(
        values, np.abs(np.diag(lje.influence_matrix(problem["train"], problem["train"]))), rtol=1e-4, atol=1e-7
    )


def test_binary_single_logit() -> None:
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, 2, seed=2)
    labels = y[:, 1:].astype(np.float64)
    model = make_model(classes=1, seed=7)
    f = features_of(model, x)
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    expected = oracle(f[:N_TRAIN], labels[:N_TRAIN], kernel, f[N_TRAIN:])
    assert 0 < (expected["signs"] > 0).sum() < N_TEST  # both predicted classes occur
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    lje = RepresenterPointLJE(
        InfluenceModel(model, loss_function=loss),
        batched(x[:N_TRAIN], y[:N_TRAIN, 1:]),
        damping=DAMPING,
        learning_rate=ETA,
    )
    values = lje.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:, 1:]), batched(x[:N_TRAIN], y[:N_TRAIN, 1:]))
    exp = expected["values"]
    np.testing.assert_allclose(values, exp, rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(exp).max())


def test_target_layer_honoured_with_a_trailing_activation(problem: dict) -> None:
    """A model ending with Activation('softmax') and a loss on probabilities is the same classifier:
    target_layer=-2 (the Dense) and the seed's -1 (the activation after it) both explain that Dense."""
    x, y = problem["x"], problem["y"]
    model = make_model(softmax=True)
    model.layers[1].set_weights(problem["model"].layers[1].get_weights())
    loss = keras.losses.CategoricalCrossentropy(from_logits=False, reduction=None)
    expected = problem["expected"]["values"]
    for target_layer in (-2, -1):
        lje = RepresenterPointLJE(
            InfluenceModel(model, loss_function=loss),
            problem["train"],
            target_layer=target_layer,
            damping=DAMPING,
            learning_rate=ETA,
        )
        values = lje.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:]), problem["train"])
        np.testing.assert_allclose(
            values, expected, rtol=10 * VALUE_RTOL, atol=10 * VALUE_RTOL * np.abs(expected).max()
        )
    deeper = keras.Sequential(
        [keras.Input((D_IN,)), keras.layers.Dense(4), keras.layers.Dense(4), keras.layers.Dense(3, use_bias=False)]
    )
    with pytest.raises(InvalidModelError, match="target_layer"):
        RepresenterPointLJE(InfluenceModel(deeper, loss_function=logits_loss()), problem["train"], target_layer=0)


def test_solvers_factories_and_hessian_subsets(problem: dict) -> None:
    x, y, model = problem["x"], problem["y"], problem["model"]
    test = batched(x[N_TRAIN:], y[N_TRAIN:])
    expected = problem["expected"]["values"]
    scale = np.abs(expected).max()
    influence_model = InfluenceModel(model, loss_function=logits_loss())

    cg = RepresenterPointLJE(influence_model, problem["train"], "cgd", damping=DAMPING, learning_rate=ETA)
    np.testing.assert_allclose(
        cg.influence_matrix(test, problem["train"]), expected, rtol=CG_RTOL, atol=CG_RTOL * scale
    )

    class Factory:  # the seed's InverseHessianVectorProductFactory protocol
        def build(self, head_model: InfluenceModel, features: object) -> ExactIHVP:
            return ExactIHVP(head_model, features, damping=DAMPING)

    built = RepresenterPointLJE(influence_model, problem["train"], ihvp_calculator_factory=Factory(), learning_rate=ETA)
    assert isinstance(built.ihvp_calculator, ExactIHVP)
    np.testing.assert_allclose(
        built.influence_matrix(test, problem["train"]), expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * scale
    )

    # All n examples drawn in shuffled order define the same mean step and Hessian as the dataset itself.
    shuffled = RepresenterPointLJE(
        influence_model, problem["train"], n_samples_for_hessian=N_TRAIN, damping=DAMPING, learning_rate=ETA
    )
    assert shuffled.n_train == N_TRAIN
    np.testing.assert_allclose(
        shuffled.influence_matrix(test, problem["train"]), expected, rtol=VALUE_RTOL, atol=VALUE_RTOL * scale
    )
    with pytest.raises(TypeError, match="influence_model"):
        RepresenterPointLJE(model, problem["train"])


def test_last_layer_with_bias_is_folded_into_the_features() -> None:
    """A biased last Dense: the decomposition runs on `[f, 1]` and `[W; b]`; values equal the
    oracle's on those augmented features, and the perturbed head carries the perturbed bias."""
    x, y = make_classification(N_TRAIN + N_TEST, D_IN, CLASSES, seed=3)
    model = make_model(head_bias=True, seed=3)
    f = np.concatenate([features_of(model, x), np.ones((len(x), 1))], axis=1)
    kernel, bias = (w.astype(np.float64) for w in model.layers[-1].get_weights())
    augmented = np.vstack([kernel, bias[None, :]])
    expected = oracle(f[:N_TRAIN], y[:N_TRAIN].astype(np.float64), augmented, f[N_TRAIN:])
    train = batched(x[:N_TRAIN], y[:N_TRAIN], 16)
    lje = RepresenterPointLJE(
        InfluenceModel(model, loss_function=logits_loss()), train, damping=DAMPING, learning_rate=ETA
    )
    np.testing.assert_allclose(lje.perturbed_kernel, expected["w0"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(lje.perturbed_head.layers[0].bias.numpy(), expected["w0"][-1], rtol=0, atol=1e-6)
    values = lje.influence_matrix(batched(x[N_TRAIN:], y[N_TRAIN:], 5), train)
    np.testing.assert_allclose(
        values, expected["values"], rtol=VALUE_RTOL, atol=VALUE_RTOL * np.abs(expected["values"]).max()
    )
