"""ChunkedStore: atomic chunks, resume after kill -9, checksums, refusal of another fingerprint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vestigia.errors import StoreMismatchError
from vestigia.store import ChunkedStore, Fingerprint

FP = Fingerprint(weights="w" * 64, data={"n": 10, "spec": [], "stride": 1, "sha256": "d" * 64}, settings='{"k":1}')


def _rows(index: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng(index).normal(size=(rows, dim)).astype("float32")


def test_chunks_round_trip_and_resume_skips_written_chunks(tmp_path: Path) -> None:
    store = ChunkedStore(tmp_path / "s", FP)
    stored = store.array("features", (23, 4), chunk_rows=5)
    assert stored.n_chunks == 5 and stored.missing_chunks() == [0, 1, 2, 3, 4]
    expected = np.concatenate([_rows(i, len(range(*stored.rows(i).indices(23))), 4) for i in range(5)])
    stored.write_chunk(1, expected[5:10])
    stored.write_chunk(4, expected[20:23])
    reopened = ChunkedStore(tmp_path / "s", FP).array("features", (23, 4), chunk_rows=5)
    calls: list[int] = []
    computed = reopened.fill(lambda i: calls.append(i) or expected[reopened.rows(i)])
    assert computed == calls == [0, 2, 3]
    np.testing.assert_array_equal(reopened.read(), expected)
    assert reopened.fill(lambda i: pytest.fail("nothing left to compute")) == []


def test_a_corrupt_or_truncated_chunk_is_detected_and_recomputed(tmp_path: Path) -> None:
    store = ChunkedStore(tmp_path / "s", FP)
    stored = store.array("x", (8, 3), chunk_rows=4)
    values = _rows(0, 8, 3)
    stored.fill(lambda i: values[stored.rows(i)])
    chunk = tmp_path / "s" / "x" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF  # one flipped bit pattern inside the payload: the CRC32C no longer matches
    chunk.write_bytes(bytes(data))
    assert stored.missing_chunks() == [1]
    chunk.write_bytes(bytes(data[:10]))  # truncated
    assert stored.missing_chunks() == [1]
    stored.fill(lambda i: values[stored.rows(i)])
    np.testing.assert_array_equal(stored.read(), values)


def test_a_store_of_another_model_data_or_settings_is_refused(tmp_path: Path) -> None:
    ChunkedStore(tmp_path / "s", FP).array("x", (4, 2), 2)
    other_settings = Fingerprint(FP.weights, FP.data, '{"k":2}')
    with pytest.raises(StoreMismatchError, match=r"settings k \(expected 2, found 1\)"):
        ChunkedStore(tmp_path / "s", other_settings)
    other_data = Fingerprint(FP.weights, {**FP.data, "n": 11}, FP.settings)
    with pytest.raises(StoreMismatchError, match=r"data n \(expected 11, found 10\)"):
        ChunkedStore(tmp_path / "s", other_data)
    with pytest.raises(StoreMismatchError, match="model weights"):
        ChunkedStore(tmp_path / "s", Fingerprint("v" * 64, FP.data, FP.settings))
    with pytest.raises(StoreMismatchError, match="exists with"):
        ChunkedStore(tmp_path / "s", FP).array("x", (4, 3), 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(StoreMismatchError, match="non-empty directory"):
        ChunkedStore(tmp_path / "other", FP)


def test_put_and_get_small_arrays(tmp_path: Path) -> None:
    store = ChunkedStore(tmp_path / "s", FP)
    factor = np.random.default_rng(0).normal(size=(6, 6))
    store.put("factors/dense/A", factor)
    np.testing.assert_array_equal(ChunkedStore(tmp_path / "s", FP).get("factors/dense/A"), factor)
    assert store.get("absent") is None
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["arrays"]["factors/dense/A"] == {"shape": [6, 6], "chunk_rows": 6, "dtype": "<f8"}
    assert manifest["fingerprint"] == FP.to_dict()


def _expected_chunk(index: int) -> np.ndarray:
    return np.random.default_rng(index).normal(size=(100, 256)).astype("float32")


def _fill(path: Path, on_chunk: Any, compute: Any = _expected_chunk) -> list[int]:
    stored = ChunkedStore(path, FP).array("x", (4000, 256), chunk_rows=100)
    return stored.fill(compute, on_chunk=on_chunk)


def _slow_chunk(index: int) -> np.ndarray:
    """A chunk that takes ~10 ms to compute, as real chunks do, so that a kill within 30 ms of
    the first finished chunk always lands before the whole store is written, on any machine."""
    time.sleep(0.01)
    return _expected_chunk(index)


def _writer_child(path: Path, write_end: int) -> None:
    """Run in a forked child: fill the store, reporting each finished chunk on the pipe."""
    try:
        _fill(path, lambda i: os.write(write_end, f"{i}\n".encode()), _slow_chunk)
    finally:
        os._exit(0)


def test_kill_9_at_random_moments_never_corrupts_and_rerun_completes(tmp_path: Path) -> None:
    """SIGKILL a writer process at seeded random moments, five times; every chunk on disk must
    verify, and the rerun computes exactly the missing chunks and equals an uninterrupted run.

    The writer is a forked child (it uses only NumPy and zarr; zarr resets its event loop after
    a fork), so that each round does not pay a fresh TensorFlow import.
    """
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    kills = 0
    for _ in range(5):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _writer_child(path, write_end)
        os.close(write_end)
        with os.fdopen(read_end) as reader:
            reader.readline()  # it is writing chunks now
            time.sleep(float(rng.uniform(0.0, 0.03)))
            os.kill(pid, signal.SIGKILL)
            kills += 1
            os.waitpid(pid, 0)
    assert kills == 5
    stored = ChunkedStore(path, FP).array("x")  # opening cleans leftovers of killed writes
    assert list(path.rglob("*.partial")) == []
    written = [i for i in range(stored.n_chunks) if stored.has_chunk(i, verify=False)]
    assert 0 < len(written) < 40
    for i in written:  # every chunk on disk is complete, verified and right
        np.testing.assert_array_equal(stored.read_chunk(i), _expected_chunk(i))
    recomputed = _fill(path, None)
    assert sorted(recomputed) == sorted(set(range(40)) - set(written))  # nothing recomputed twice, nothing lost
    np.testing.assert_array_equal(stored.read(), np.concatenate([_expected_chunk(i) for i in range(40)]))
