"""Representer Point Selection via Local Jacobian Expansion, RPS-LJE (Sui, Wu & Sanner 2021).

No surrogate is fitted: the trained last-layer kernel `W` `(d, C)` itself is decomposed. With
`L(V) = (1/n) sum_i w_i l_i(V)` the mean training loss of the last layer and `eta` a step size:

1. Perturb: `W_0 = W + eta grad L(W)`, one gradient-ascent step on the *mean* loss (the
   authors' code; the seed stepped on the summed loss with a fixed rate, so its step grew with
   `n`).
2. Expand the Jacobian (the gradient) around `W_0`: `grad L(W) ~ grad L(W_0) + H_0 (W - W_0)`,
   with `H_0` the mean Hessian at `W_0`. The trained `W` is stationary, so
   `W ~ W_0 - H_0^-1 grad L(W_0) = sum_i W_i`, with one contribution per training example

       W_i = (W_0 - H_0^-1 g_i) / n,   g_i = w_i grad l_i(W_0)   (vectors of `d * C` entries),

   exact up to the Taylor remainder `O(eta^2)`.
3. The logits decompose as `Phi(x_t) = f_t^T W ~ sum_i f_t^T W_i`, and the value of `i` for `t`
   is `[f_t^T W_i]_{c_t} = (psi_t . vec(W_0) - psi_t^T H_0^-1 g_i) / n`, with `psi_t = f_t (x) e_t`.
   The first term is shared by every training example; the second is the influence (as in
   Koh & Liang, on the predicted logit instead of the loss) of upweighting `i`: positive means
   `i` raises the predicted logit.

`W_i` is a full `(d, C)` matrix, not `alpha_i f_i^T`: the seed forced it into that shape by
dividing by the features elementwise and summing over them, which is not the same sum. Here
the influence vector is `vec(W_i)` and scoring pairs `[1/n, -g_i/n]` with
`[psi_t . vec(W_0), H_0^-1 psi_t]`, so one IHVP per test example and none per training example.
`H_0` comes from the shared IHVP solvers on the last layer (`"exact"`, `"cgd"`, `"lissa"`, a
solver instance or a seed factory with `build(model, dataset)`), built on the training set's
features, or on `n_samples_for_hessian` of them (then also used for the ascent step).

References:
    Sui, Wu, Sanner. Representer Point Selection via Local Jacobian Expansion for Post-hoc
    Classifier Explanation of Deep Neural Networks and Ensemble Models. NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vestigia.curvature.base import InverseHessianVectorProduct
from vestigia.data.dataset import Batch, as_batched_dataset, dataset_size
from vestigia.errors import InvalidModelError, check_non_negative
from vestigia.methods.first_order import build_ihvp, hessian_dataset
from vestigia.methods.representer import RepresenterPointCalculator
from vestigia.model.influence_model import BaseInfluenceModel, FeatureBatch, InfluenceModel, check_influence_model


def perturbed_head(dense: keras.layers.Dense, post_layers: list[keras.layers.Layer], kernel: np.ndarray) -> keras.Model:
    """A copy of the last `Dense` (and the weightless layers after it) with kernel `kernel`
    (its last row the bias when the layer has one), taking the features `(batch, d)` as inputs."""
    layers = [type(layer).from_config(layer.get_config()) for layer in [dense, *post_layers]]
    n_inputs = int(dense.kernel.shape[0])
    head = keras.Sequential([keras.Input((n_inputs,)), *layers])
    layers[0].kernel.assign(kernel[:n_inputs].astype(layers[0].kernel.dtype))
    if dense.use_bias:
        layers[0].bias.assign(kernel[n_inputs].astype(layers[0].bias.dtype))
    return head


class RepresenterPointLJE(RepresenterPointCalculator):
    """RPS-LJE: the trained last layer decomposed over the training set by a local Jacobian expansion.

    `value(t, i) = [f_t^T W_i]_{c_t}` with `W_i = (W_0 - H_0^-1 g_i) / n`; self-influence
    `|value(i, i)|`.

    Args:
        influence_model: an `InfluenceModel` of the classifier; its model, loss and
            `process_batch_for_loss_fn` are used (its watched layers are not: the last `Dense`
            is).
        dataset: the batched training data (or `(x, y[, w])` arrays): `n` is its size.
        ihvp_calculator: "exact", "cgd", "lissa", a solver class, or a seed factory with
            `build(influence_model, dataset)`, called with `head_model` and the features (the
            seed's third argument, `ihvp_calculator_factory`, is also accepted by keyword). An
            instance is used as is: it must hold the Hessian of the last layer at `W_0`.
        n_samples_for_hessian: build `H_0` (and take the ascent step) on this many examples.
        target_layer: the last `Dense` layer, with or without bias (default -1), or a weightless layer
            after it (e.g. an `Activation`), or the layer feeding it.
        shuffle_buffer_size: shuffle buffer used to draw the Hessian examples.
        epsilon: accepted for the seed's signature; unused (nothing is divided by the features).
        learning_rate: `eta`, the step of the gradient ascent on the mean loss (>= 0).
        ihvp_calculator_factory: the seed's name for `ihvp_calculator`.
        **ihvp_options: solver settings (`damping`, `n_opt_iters`, ...) for a solver built here.

    Attributes:
        perturbed_kernel: `W_0`, float64 `(d, C)`. perturbed_head: the last layer with `W_0`, as a
            Keras model on the features. head_model: its `InfluenceModel`. ihvp_calculator:
            the solver of `H_0`. n_train: `n`.

    Raises:
        TypeError: `influence_model` is not an `InfluenceModel`.
        InvalidModelError: no last `Dense`, or layers after it that do not form a chain.
    """

    def __init__(
        self,
        influence_model: BaseInfluenceModel,
        dataset: Any,
        ihvp_calculator: Any = "exact",
        n_samples_for_hessian: int | None = None,
        target_layer: int | str = -1,
        shuffle_buffer_size: int = 10000,
        epsilon: float = 1e-5,
        *,
        learning_rate: float = 0.01,
        ihvp_calculator_factory: Any = None,
        **ihvp_options: Any,
    ) -> None:
        check_influence_model(influence_model, "influence_model")
        super().__init__(
            influence_model.model,
            target_layer,
            "target_layer",
            influence_model.loss_function,
            influence_model.process_batch_for_loss_fn,
        )
        self.learning_rate = check_non_negative("learning_rate", learning_rate)
        self.epsilon = epsilon
        head_layers = self.split.differentiator.head.layers
        if head_layers is None:
            raise InvalidModelError(
                f"RPS-LJE needs the layers from {self.dense.name!r} to the output to form a chain. Received model "
                f"{self.model.name!r} whose graph after that layer branches."
            )
        data_set = as_batched_dataset(dataset, "dataset")
        hessian_data = hessian_dataset(data_set, n_samples_for_hessian, shuffle_buffer_size)
        data = self.feature_arrays(hessian_data, "dataset")
        n_hessian = len(data.features)
        self.n_train = (
            n_hessian if n_samples_for_hessian is None else dataset_size(data_set, self.process_batch_for_loss_fn)
        )
        features = tf.data.Dataset.from_tensor_slices(
            (data.features[:, : self.n_inputs].astype(np.float32), data.targets, data.weights.astype(np.float32))
        ).batch(max(data.batch_sizes))
        summed = np.zeros(self.kernel.size)
        for f, y, w in features:
            batch = FeatureBatch(f, y, w, int(f.shape[0]))
            summed += self.split.batch_losses_and_gradients(batch, "dataset")[1].numpy().sum(axis=0)
        self.perturbed_kernel = self.kernel + self.learning_rate * (summed / n_hessian).reshape(self.kernel.shape)
        self.perturbed_head = perturbed_head(self.dense, list(head_layers[1:]), self.perturbed_kernel)
        self.head_model = InfluenceModel(self.perturbed_head, start_layer=0, loss_function=self.loss_function)
        solver = ihvp_calculator if ihvp_calculator_factory is None else ihvp_calculator_factory
        if _is_factory(solver):
            self.ihvp_calculator: InverseHessianVectorProduct = solver.build(self.head_model, features)
        else:
            self.ihvp_calculator = build_ihvp(
                self.head_model, features, solver, None, shuffle_buffer_size, **ihvp_options
            )
        if self.ihvp_calculator.n_params != self.head_model.nb_params:
            raise InvalidModelError(
                f"`ihvp_calculator` must solve with the Hessian of the last layer ({self.head_model.nb_params} "
                f"parameters, built on `head_model`). Received a solver on {self.ihvp_calculator.n_params} parameters."
            )
        self._theta0 = tf.constant(self.perturbed_kernel.reshape(-1, 1), tf.float32)

    def _head_gradients(self, batch: FeatureBatch) -> tf.Tensor:
        """`g_i = w_i grad l_i(W_0)`, `(batch, d * C)`."""
        inputs = batch.features[:, : self.n_inputs]
        head_batch = self.head_model.features_of(Batch(inputs, batch.targets, batch.weights, batch.size))
        return self.head_model.batch_losses_and_gradients(head_batch)[1]

    def _contributions(self, batch: FeatureBatch) -> tf.Tensor:
        """`vec(W_i) = (vec(W_0) - H_0^-1 g_i) / n`, `(batch, d * C)`."""
        ihvp = self.ihvp_calculator.solve(self._head_gradients(batch))
        return (tf.transpose(self._theta0) - ihvp) / self.n_train

    def _score_train_side(self, batch: Batch, component: int) -> tf.Tensor:
        """`[1/n, -g_i/n]`, `(batch, 1 + d * C)`."""
        fb = self._feature_batch(batch)
        grads = self._head_gradients(fb)
        return tf.concat([tf.ones([fb.size, 1]), -grads], axis=1) / self.n_train

    def _score_test_side(self, batch: Batch, component: int) -> tf.Tensor:
        """`[psi_t . vec(W_0), H_0^-1 psi_t]`, `(batch, 1 + d * C)`."""
        psi = self._preprocess(batch)
        return tf.concat([tf.matmul(psi, self._theta0), self.ihvp_calculator.solve(psi)], axis=1)


def _is_factory(solver: Any) -> bool:
    return not isinstance(solver, (str, type, InverseHessianVectorProduct)) and callable(getattr(solver, "build", None))
