"""Representer Point Selection with an L2-regularised last layer, RPS-L2 (Yeh et al. 2018).

A surrogate last layer `W*` `(d, C)` is fitted on the frozen features `f_i` of the `n` training
examples to reproduce the model, with the L2 term in the objective:

    W* = argmin_W (1/n) sum_i w_i l(t_i, f_i^T W) + lambda ||W||_F^2.

By default (`surrogate_loss="cross_entropy"`, `targets="model"`) `l` is the cross-entropy on
logits (softmax for `C >= 2`, sigmoid for a single logit) and the targets `t_i` are the model's
own predicted probabilities, as in Yeh et al. (Sec. 3.1 and their reference code): the
surrogate explains the model, not the labels. `targets="labels"` uses the dataset's labels
(the representer theorem on the training objective); `surrogate_loss="squared_error"`
regresses the logits (the seed's objective), `l = ||f^T W - t||^2`, solved in closed form.

The objective is strictly convex. Cross-entropy is solved by Newton's method (conjugate
gradient on exact Hessian-vector products, Armijo backtracking) in float64 until
`max |grad| <= tol`; at the stationary point `2 lambda W* = -(1/n) sum_i w_i f_i dl_i/dPhi^T`,
which is the representer theorem

    W* = sum_i f_i alpha_i^T,   alpha_i = -(w_i / (2 lambda n)) dl(t_i, Phi_i) / dPhi_i   (C,),

so `Phi(x_t, W*) = sum_i alpha_i f_i^T f_t` exactly, up to `|grad| / (2 lambda)`. The value of
training example `i` for test example `t` is `alpha_i[c_t] f_i^T f_t` (see
`vestigia.methods.representer`); influence vectors are `vec(f_i alpha_i^T)`, `(d * C,)`.

Differences from the seed: the L2 term really is in the objective (the seed's surrogate
ignored it); `alpha` is the derivative of the loss that was minimised (the seed used the loss on
the labels at a surrogate fitted with MSE, and divided by the features, multiplying `alpha` by
the number of non-zero features); `epochs` is the maximum number of Newton steps and
`scaling_factor` the Armijo constant; values for a single logit are signed by the prediction;
self-influence is `|alpha_i[c_i]| ||f_i||^2`.

References:
    Yeh, Kim, Yen, Ravikumar. Representer Point Selection for Explaining Deep Neural Networks.
    NeurIPS 2018.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from vestigia.curvature.solvers import conjugate_gradient
from vestigia.data.dataset import ProcessBatchFn, default_process_batch
from vestigia.errors import check_non_negative, check_positive_int
from vestigia.methods.representer import RepresenterPointCalculator, label_probabilities, outer_rows
from vestigia.model.influence_model import FeatureBatch

SURROGATE_LOSSES = ("cross_entropy", "squared_error")
TARGETS = ("model", "labels")


class SurrogateFit(NamedTuple):
    """The fitted surrogate kernel `(d, C)`, Newton steps taken, final `max |grad|`, convergence."""

    kernel: np.ndarray
    iterations: int
    gradient_norm: float
    converged: bool


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, or the sigmoid for a single logit, float64 `(n, C)`."""
    if logits.shape[1] == 1:
        return 0.5 * (1.0 + np.tanh(0.5 * logits))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def logit_gradients(surrogate_loss: str, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`dl(t, Phi) / dPhi` `(n, C)`: `p(Phi) - t` for cross-entropy, `2 (Phi - t)` for squared error."""
    if surrogate_loss == "squared_error":
        return 2.0 * (logits - targets)
    return probabilities(logits) - targets


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy on logits with probability targets, up to a constant in `t`."""
    if logits.shape[1] == 1:
        return (np.logaddexp(0.0, logits) - targets * logits)[:, 0]
    top = logits.max(axis=1)
    log_partition = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return log_partition * targets.sum(axis=1) - (targets * logits).sum(axis=1)


def fit_cross_entropy(
    features: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    lam: float,
    initial: np.ndarray,
    max_iterations: int = 100,
    armijo: float = 0.1,
    tol: float = 1e-10,
) -> SurrogateFit:
    """Minimise `(1/n) sum_i w_i CE(t_i, f_i^T W) + lam ||W||^2` by Newton-CG in float64.

    The Hessian-vector product is `(1/n) F^T [w_i S_i (F V)_i] + 2 lam V`, with
    `S_i = diag(p_i) - p_i p_i^T` (softmax) or `p_i (1 - p_i)` (sigmoid). Each Newton direction
    is solved by conjugate gradient to a relative residual `min(0.1, ||grad||)`; the step is
    halved until the Armijo condition with constant `armijo` holds.
    """
    n, d = features.shape
    classes = initial.shape[1]
    scale = weights[:, None] / n

    def objective(kernel: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        logits = features @ kernel
        value = float(np.sum(scale[:, 0] * _cross_entropy(logits, targets)) + lam * np.sum(kernel * kernel))
        p = probabilities(logits)
        return value, features.T @ (scale * (p - targets)) + 2.0 * lam * kernel, p

    kernel = np.array(initial, dtype=np.float64)
    value, grad, p = objective(kernel)
    iterations = 0
    while float(np.max(np.abs(grad))) > tol and iterations < max_iterations:

        def hvp(rows: np.ndarray, p: np.ndarray = p) -> np.ndarray:
            v = rows.reshape(-1, d, classes)
            u = np.einsum("nd,mdc->mnc", features, v)
            if classes == 1:
                su = p * (1.0 - p) * u
            else:
                su = p * u - p * np.sum(p * u, axis=2, keepdims=True)
            return (np.einsum("nd,mnc->mdc", features, scale * su) + 2.0 * lam * v).reshape(rows.shape)

        rhs = -grad.reshape(1, -1)
        cg = conjugate_gradient(hvp, rhs, 2 * rhs.size + 10, min(0.1, float(np.linalg.norm(rhs))), 0.0)
        direction = cg.solution.reshape(d, classes)
        slope = float(np.sum(grad * direction))
        if slope >= 0:  # not a descent direction (CG breakdown): fall back to the gradient
            direction, slope = -grad, -float(np.sum(grad * grad))
        step = 1.0
        while True:
            candidate = kernel + step * direction
            new_value, new_grad, new_p = objective(candidate)
            if new_value <= value + armijo * step * slope or step < 1e-12:
                break
            step *= 0.5
        if new_value > value:  # no decrease possible at this precision
            break
        kernel, value, grad, p = candidate, new_value, new_grad, new_p
        iterations += 1
    gradient_norm = float(np.max(np.abs(grad)))
    return SurrogateFit(kernel, iterations, gradient_norm, gradient_norm <= tol)


def fit_squared_error(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, lam: float) -> SurrogateFit:
    """Ridge regression in closed form: `W* = (F^T D F + n lam I)^-1 F^T D T`, `D = diag(w)`."""
    n, d = features.shape
    weighted = features * weights[:, None]
    kernel = np.linalg.solve(weighted.T @ features + n * lam * np.eye(d), weighted.T @ targets)
    grad = 2.0 * (weighted.T @ (features @ kernel - targets)) / n + 2.0 * lam * kernel
    return SurrogateFit(kernel, 1, float(np.max(np.abs(grad))), True)


class RepresenterPointL2(RepresenterPointCalculator):
    """RPS-L2: representer values of an L2-regularised surrogate of the last layer.

    `value(t, i) = alpha_i[c_t] f_i^T f_t`, the share of training example `i` in the surrogate's
    logit of the class predicted for `t`; self-influence `|alpha_i[c_i]| ||f_i||^2`.

    Args:
        model: a built Keras 3 classifier whose last layer with weights is a `Dense` (a bias is folded
            into the features as a constant input, see `vestigia.methods.representer`).
        train_set: the batched training data (or `(x, y[, w])` arrays): `n` is its size.
        loss_function: the model's unreduced training loss (checked; the surrogate uses
            `surrogate_loss`).
        lambda_regularization: `lambda > 0`, the weight of `||W||_F^2`.
        scaling_factor: Armijo constant of the Newton line search, in (0, 1).
        epochs: maximum number of Newton steps.
        layer_index: the last `Dense` layer, the layer feeding it (default -2, as the seed's
            benchmark factory), or a weightless layer after it.
        surrogate_loss: "cross_entropy" (Yeh et al.) or "squared_error" (the seed's MSE on logits).
        targets: "model" (the model's own predictions: probabilities for cross-entropy, logits
            for squared error) or "labels" (the dataset's targets, one-hot or class ids).
        tol: stop when `max |grad| <= tol`; a `RuntimeWarning` says if `epochs` steps did not.
        process_batch_for_loss_fn: maps a dataset element to `(inputs, y_true, sample_weight)`.

    Attributes:
        surrogate_kernel: `W*`, float64 `(d, C)`. representer_kernel: `sum_i f_i alpha_i^T`
            over the training set (equal to `W*` at the solver's precision). fit: a
            `SurrogateFit`. n_train: `n`.

    Raises:
        InvalidModelError: no last `Dense`, or a reduced loss.
        ValueError: `lambda_regularization <= 0`, `scaling_factor` outside (0, 1), unknown
            `surrogate_loss` or `targets`.
    """

    def __init__(
        self,
        model: keras.Model,
        train_set: Any,
        loss_function: Any,
        lambda_regularization: float,
        scaling_factor: float = 0.1,
        epochs: int = 100,
        layer_index: int | str = -2,
        *,
        surrogate_loss: str = "cross_entropy",
        targets: str = "model",
        tol: float = 1e-10,
        process_batch_for_loss_fn: ProcessBatchFn = default_process_batch,
    ) -> None:
        lam = check_non_negative("lambda_regularization", lambda_regularization)
        if lam == 0:
            raise ValueError("`lambda_regularization` must be > 0. Received: lambda_regularization=0")
        armijo = check_non_negative("scaling_factor", scaling_factor)
        if not 0 < armijo < 1:
            raise ValueError(f"`scaling_factor` must be in (0, 1). Received: scaling_factor={scaling_factor!r}")
        if surrogate_loss not in SURROGATE_LOSSES:
            raise ValueError(f"`surrogate_loss` must be one of {SURROGATE_LOSSES}. Received: {surrogate_loss!r}")
        if targets not in TARGETS:
            raise ValueError(f"`targets` must be one of {TARGETS}. Received: targets={targets!r}")
        super().__init__(model, layer_index, "layer_index", loss_function, process_batch_for_loss_fn)
        self.lambda_regularization = lam
        self.scaling_factor = armijo
        self.epochs = check_positive_int("epochs", epochs)
        self.surrogate_loss = surrogate_loss
        self.targets = targets
        self.tol = check_non_negative("tol", tol)
        data = self.feature_arrays(train_set, "train_set")
        self.n_train = len(data.features)
        surrogate_targets = self._surrogate_targets(data.features, data.targets)
        if surrogate_loss == "squared_error":
            self.fit = fit_squared_error(data.features, surrogate_targets, data.weights, lam)
        else:
            self.fit = fit_cross_entropy(
                data.features, surrogate_targets, data.weights, lam, self.kernel, self.epochs, armijo, self.tol
            )
        if not self.fit.converged:
            warnings.warn(
                f"RepresenterPointL2: the surrogate did not reach max |grad| <= {self.tol:g} in {self.epochs} Newton "
                f"steps (max |grad| = {self.fit.gradient_norm:.3g}); the representer decomposition is off by "
                "about max|grad| / (2 lambda). Increase `epochs` or `tol`.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.surrogate_kernel = self.fit.kernel
        self._surrogate32 = tf.constant(self.surrogate_kernel, tf.float32)
        self.representer_kernel = data.features.T @ self._alpha(data.features, surrogate_targets, data.weights)

    # -- the representer values ----------------------------------------------------------------

    def _surrogate_targets(self, features: np.ndarray, labels: Any) -> np.ndarray:
        """`t_i` `(n, C)` float64: the model's probabilities or logits, or the labels."""
        if self.targets == "labels":
            return label_probabilities(labels, len(features), self.n_classes, "train_set labels")
        logits = features @ self.kernel
        return logits if self.surrogate_loss == "squared_error" else probabilities(logits)

    def _alpha(self, features: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """`alpha_i = -(w_i / (2 lambda n)) dl(t_i, f_i^T W*) / dPhi`, float64 `(n, C)`."""
        grads = logit_gradients(self.surrogate_loss, features @ self.surrogate_kernel, targets)
        return -(weights[:, None] / (2.0 * self.lambda_regularization * self.n_train)) * grads

    def _batch_alpha(self, batch: FeatureBatch) -> np.ndarray:
        features = batch.features.numpy().astype(np.float64)
        targets = self._surrogate_targets(features, batch.targets)
        return self._alpha(features, targets, batch.weights.numpy().astype(np.float64))

    def _contributions(self, batch: FeatureBatch) -> tf.Tensor:
        """`vec(f_i alpha_i^T)`, `(batch, d * C)`."""
        return outer_rows(batch.features, tf.constant(self._batch_alpha(batch), tf.float32))

    def representer_values(self, dataset: Any) -> np.ndarray:
        """`alpha_i` for every example of `dataset`, float32 `(n, C)`, in order."""
        return np.concatenate(
            [self._batch_alpha(self._feature_batch(b)) for b in self._batches(dataset, "dataset")]
        ).astype(np.float32)

    def predict_with_kernel(self, samples: Any) -> tf.Tensor:
        """The surrogate's logits from the representer expansion, `sum_i alpha_i f_i^T f_t`.

        Args:
            samples: model inputs (a batch), as the model takes them.

        Returns:
            float32 `(batch, C)` (the seed returned `(batch,)` for a single logit).
        """
        features = self._features_of_inputs(samples)
        return tf.matmul(features, tf.constant(self.representer_kernel, tf.float32))
