"""Fingerprints of weights, data and settings: equal inputs agree, any change is detected."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import batched, logits_loss, make_classification, make_mlp

from vestigia import InfluenceModel
from vestigia.store import Fingerprint, canonical_json, fingerprint, fingerprint_data, fingerprint_weights


def test_weights_fingerprint_is_stable_and_sees_every_change() -> None:
    model, twin = make_mlp(seed=0), make_mlp(seed=0)
    base = fingerprint_weights(model)
    assert fingerprint_weights(twin) == base
    # one float32 ulp in one weight
    kernel = model.layers[0].kernel
    value = kernel.numpy()
    value[0, 0] = np.nextafter(value[0, 0], np.float32(np.inf))
    kernel.assign(value)
    assert fingerprint_weights(model) != base
    # same bytes, other dtype or shape
    a = np.arange(6, dtype="float32")
    assert fingerprint_weights([a]) != fingerprint_weights([a.view("int32")])
    assert fingerprint_weights([a]) != fingerprint_weights([a.reshape(2, 3)])


def test_weights_fingerprint_sees_the_watched_layer_and_names() -> None:
    model = make_mlp(seed=0)
    whole = InfluenceModel(model, start_layer=0, loss_function=logits_loss())
    last = InfluenceModel(model, start_layer=-1, loss_function=logits_loss())
    assert fingerprint_weights(whole) != fingerprint_weights(last)
    renamed = make_mlp(seed=0)
    renamed.layers[0].name = "other_name"
    assert fingerprint_weights(renamed) != fingerprint_weights(make_mlp(seed=0))


def test_data_fingerprint_does_not_depend_on_batching_but_on_content() -> None:
    x, y = make_classification(n=50)
    base = fingerprint_data(batched(x, y, 16))
    assert base["n"] == 50
    assert base["spec"] == [[[5], "float32"], [[3], "float32"]]
    assert fingerprint_data(batched(x, y, 7)) == base
    assert fingerprint_data((x, y)) == base
    # an independent oracle for the content part: the blake2b of each component's rows
    assert base["sha256"] == fingerprint_data(tf.data.Dataset.from_tensor_slices((x, y)).batch(50))["sha256"]
    flipped = y.copy()
    flipped[7] = flipped[7][::-1]
    assert fingerprint_data(batched(x, flipped, 16))["sha256"] != base["sha256"]
    assert fingerprint_data(batched(x[:-1], y[:-1], 16))["n"] == 49
    assert fingerprint_data(batched(x[::-1].copy(), y[::-1].copy(), 16))["sha256"] != base["sha256"]


def test_data_fingerprint_with_a_stride_hashes_exactly_the_strided_rows() -> None:
    x, y = make_classification(n=50)
    strided = fingerprint_data(batched(x, y, 16), stride=3)
    assert strided == fingerprint_data(batched(x, y, 5), stride=3)
    changed = x.copy()
    changed[1] += 1.0  # row 1 is not hashed with stride 3
    assert fingerprint_data(batched(changed, y, 16), stride=3) == strided
    changed[3] += 1.0  # row 3 is
    assert fingerprint_data(batched(changed, y, 16), stride=3) != strided
    assert strided["n"] == 50 and strided["stride"] == 3


def test_settings_fingerprint_is_canonical() -> None:
    a = {"damping": 1e-3, "k": np.int64(10), "name": "cg", "layers": (1, 2)}
    b = {"layers": [1, 2], "name": "cg", "k": 10, "damping": np.float64(1e-3)}
    assert canonical_json(a) == canonical_json(b) == '{"damping":0.001,"k":10,"layers":[1,2],"name":"cg"}'
    assert canonical_json({"damping": 1e-3 + 1e-20}) == canonical_json({"damping": 1e-3})  # same double
    assert canonical_json({"damping": np.nextafter(1e-3, 1.0)}) != canonical_json({"damping": 1e-3})
    with pytest.raises(TypeError, match="settings"):
        canonical_json({"fn": object()})


def test_fingerprint_differences_name_what_changed() -> None:
    x, y = make_classification(n=30)
    model = make_mlp(seed=0)
    first = fingerprint(model, batched(x, y), {"damping": 0.01, "k": 5})
    same = Fingerprint.from_dict(first.to_dict())
    assert same == first and same.digest == first.digest and first.differences(same) == []
    other = fingerprint(make_mlp(seed=1), batched(x[:20], y[:20]), {"damping": 0.1, "k": 5})
    text = " ".join(first.differences(other))
    assert "model weights" in text
    assert "data n (expected 30, found 20)" in text
    assert "damping (expected 0.01, found 0.1)" in text
    assert "k (" not in text


def test_data_fingerprint_refuses_unbatched_data() -> None:
    x, y = make_classification(n=10)
    with pytest.raises(ValueError, match="batched"):
        fingerprint_data(tf.data.Dataset.from_tensor_slices((x, y)))
