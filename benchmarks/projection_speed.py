"""TRAK featurisation cost on a CNN, as a ratio to one training epoch measured in the same run.

Featurising = the per-example projected margin gradients of every training example, once per
checkpoint (`TRAK.featurize`). Two projections: LoGra's `FactoredProjection` (per layer
`k_in x k_out`, never forms the per-example gradient) and the dense `RandomProjection` to
`k = 2048` (forms `(batch, n_params)` gradients, then `R` block by block; timed on a few
batches and scaled to the epoch). Both are checked against the full gradients on 8 examples:
projected inner products against exact ones (relative error of the Gram matrix).

    python benchmarks/projection_speed.py                 # reduced: 2,000 images, ~0.1M params
    python benchmarks/projection_speed.py --n-train 50000 --width 64   # issue size, ~1M params
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import machine  # noqa: E402

from vestigia import TRAK, BaseInfluenceModel  # noqa: E402
from vestigia.data.dataset import Batch  # noqa: E402
from vestigia.projection import FactoredProjection  # noqa: E402


def resnet(width: int, classes: int = 10) -> keras.Model:
    """A small ResNet on 32 x 32 x 3: two stages of two residual blocks, global pooling, Dense."""
    x_in = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(width // 2, 3, padding="same", activation="relu")(x_in)
    for stage, channels in enumerate((width // 2, width)):
        if stage:
            x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu")(x)
        for _ in range(2):
            y = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
            y = keras.layers.Conv2D(channels, 3, padding="same")(y)
            x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(x_in, keras.layers.Dense(classes)(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k-factor", type=int, default=14, help="k_in = k_out of the factored projection")
    parser.add_argument("--dense-batches", type=int, default=3, help="batches timed for the dense projection")
    args = parser.parse_args()
    print(machine())
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n_train, 32, 32, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, args.n_train)]
    model = resnet(args.width)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=loss)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)
    model.fit(data.take(2), epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    epoch = time.perf_counter() - start
    watched = BaseInfluenceModel(model, loss_function=keras.losses.CategoricalCrossentropy(True, reduction=None))
    print(f"{model.count_params():,} parameters, {args.n_train:,} images, one epoch {epoch:.1f} s")

    factored = FactoredProjection(watched, args.k_factor, args.k_factor)
    small = data.take(1)
    trak = TRAK(watched, small, projection=factored)
    trak.featurize(small)
    start = time.perf_counter()
    trak.featurize(data)
    logra = time.perf_counter() - start
    print(f"TRAK featurisation, LoGra k={factored.k}: {logra:.1f} s = {logra / epoch:.2f} epochs")

    # The dense path forms the full per-example gradients (from the capture pass), then `R`.
    dense = TRAK(watched, small, projection="rademacher", projection_dim=min(2048, watched.nb_params))
    few = data.take(args.dense_batches)
    start = time.perf_counter()
    dense.featurize(few)
    per_batch = (time.perf_counter() - start) / args.dense_batches
    n_batches = -(-args.n_train // args.batch_size)
    print(
        f"TRAK featurisation, dense k=2048: {per_batch:.2f} s per batch -> "
        f"{per_batch * n_batches / epoch:.2f} epochs (timed on {args.dense_batches} batches)"
    )

    # Check: projected inner products against the full per-example margin gradients.
    sample = tf.data.Dataset.from_tensor_slices((x[:8], y[:8])).batch(8)
    batch = Batch(tf.constant(x[:8]), tf.constant(y[:8]), None, 8)
    full = trak.models[0].example_gradients(batch)[1].numpy().astype(np.float64)
    gram = full @ full.T
    for name, calc in (("LoGra", trak), ("dense", dense)):
        phi = calc.featurize(sample)[0].astype(np.float64)
        error = np.abs(phi @ phi.T - gram).max() / np.abs(gram).max()
        print(f"{name}: max |<phi_i, phi_j> - <g_i, g_j>| / max |<g_i, g_j>| over 8 examples = {error:.3f}")


if __name__ == "__main__":
    main()
