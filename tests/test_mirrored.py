"""Factor statistics and featurisation under MirroredStrategy on one CPU split into two logical
devices, against the single-device run and the closed form.

Logical devices must be configured before TensorFlow initialises, so the check runs in a fresh
subprocess that prints its measurements as JSON; this test asserts on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from vestigia.distributed import DenseKroneckerStatistics, default_strategy, mirrored_featurise, mirrored_statistics
    from vestigia.store import ChunkedStore, Fingerprint

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(45, 5)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 45)]
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])
    stats = DenseKroneckerStatistics(model, -1, keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)  # last batch of 5: split 3 + 2
    strategy = default_strategy()
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored_sums = mirrored_statistics(stats.sums, dataset, strategy)
    single_sums = mirrored_statistics(stats.sums, dataset, single)
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in model.get_weights())
    a = np.tanh(x @ w1 + b1)
    z = a @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    d = p / p.sum(axis=1, keepdims=True) - y
    a1 = np.concatenate([a, np.ones((45, 1))], axis=1)
    oracle = {"A": a1.T @ a1, "G": d.T @ d, "count": np.array([45.0])}
    grads = np.einsum("bi,bj->bij", a1, d).reshape(45, -1)
    out = {"replicas": strategy.num_replicas_in_sync}
    for name in ("A", "G", "count"):
        out[f"{name}_vs_single"] = float(np.max(np.abs(mirrored_sums[name] - single_sums[name])))
        error = np.abs(mirrored_sums[name] - oracle[name]) / (1 + np.abs(oracle[name]))
        out[f"{name}_vs_oracle"] = float(np.max(error))
    fp = Fingerprint(settings='{"test":"mirrored"}')
    for label, strat in (("mirrored", strategy), ("single", single)):
        stored = ChunkedStore(sys.argv[1] + "/" + label, fp).array("g", grads.shape, 10)
        out[label + "_written"] = mirrored_featurise(stats.example_gradients, dataset, stored, strat)
        out[label + "_rewritten"] = mirrored_featurise(stats.example_gradients, dataset, stored, strat)
        np.save(sys.argv[1] + f"/{label}.npy", stored.read())
    np.save(sys.argv[1] + "/oracle.npy", grads)
    print("RESULT " + json.dumps(out))
    """
)


def test_mirrored_strategy_on_two_logical_cpus_equals_one_device_and_the_closed_form(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["replicas"] == 2
    for name in ("A", "G", "count"):
        # each replica runs float32 kernels on half a batch, whose rounding can differ from the
        # whole batch's in the last bit (seen: 3e-8 on G); sums are float64
        assert result[f"{name}_vs_single"] < 1e-6, result
        # float32 forward pass against a float64 oracle: ~1e-6 relative
        assert result[f"{name}_vs_oracle"] < 1e-5, result
    assert result["mirrored_written"] == result["single_written"] == [0, 1, 2, 3, 4]
    assert result["mirrored_rewritten"] == []  # a rerun skips every chunk
    mirrored, single, oracle = (np.load(tmp_path / f"{n}.npy") for n in ("mirrored", "single", "oracle"))
    np.testing.assert_allclose(mirrored, single, rtol=1e-6, atol=1e-7)  # rows back in dataset order
    np.testing.assert_allclose(mirrored, oracle, rtol=1e-5, atol=1e-6)
