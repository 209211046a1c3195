"""`ChunkedStore`: row-chunked arrays on disk (zarr v3) under a manifest holding a `Fingerprint`.

Layout of a store directory::

    manifest.json          format, fingerprint, and for each array: shape, chunk rows, dtype
    zarr.json, <name>/...  a zarr v3 group; one file per chunk, each with a CRC32C checksum

Why zarr v3: it is the maintained, documented format for chunked N-d arrays on disk (readable
from NumPy, Dask, xarray, TensorStore and other languages without Vestigia); each chunk is its
own file, so independent processes (Ray workers) write disjoint chunks without locks; its local
store writes a chunk to a temporary file and renames it into place, so a chunk is either absent
or complete; and its `crc32c` codec stores a checksum in every chunk that is verified on read.

Guarantees:
- **Atomic chunks.** A `kill -9` at any moment leaves each chunk absent or complete and
  verified; the manifest is written by write-fsync-rename under a file lock.
- **Resume.** `missing_chunks` lists chunks that are absent *or* fail their checksum;
  `fill(compute)` computes only those.
- **Refusal.** Opening a store with another fingerprint raises `StoreMismatchError` naming
  what differs (weights, data size/spec/content, or which settings).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from vestigia.errors import InvalidDataError, StoreMismatchError, check_positive_int
from vestigia.store.fingerprint import Fingerprint

FORMAT = "vestigia-store/1"
MANIFEST = "manifest.json"


def _write_json_atomically(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` via a temporary file, fsync and rename (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StoredArray:
    """One row-chunked array of a `ChunkedStore`: chunk `i` holds rows `[i * chunk_rows, ...)`."""

    def __init__(self, array: zarr.Array, name: str) -> None:
        self._array = array
        self.name = name
        self.shape: tuple[int, ...] = tuple(int(s) for s in array.shape)
        self.chunk_rows = int(array.chunks[0])
        self.dtype = np.dtype(array.dtype)
        self.n_chunks = -(-self.shape[0] // self.chunk_rows) if self.shape[0] else 0

    def rows(self, index: int) -> slice:
        """The rows of chunk `index`."""
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.shape[0]))

    def _chunk_key(self, index: int) -> str:
        rest = "/".join("0" for _ in self.shape[1:])
        return f"{index}/{rest}" if rest else f"{index}"

    def _chunk_path(self, index: int) -> pathlib.Path:
        store = self._array.store
        return pathlib.Path(str(store.root)) / self._array.path / "c" / self._chunk_key(index)  # type: ignore[attr-defined]

    def has_chunk(self, index: int, verify: bool = True) -> bool:
        """True if chunk `index` is on disk and (with `verify`) decodes with a valid checksum."""
        if not self._chunk_path(index).is_file():
            return False
        if not verify:
            return True
        try:
            self._array[self.rows(index)]
        except Exception:  # a checksum or decoding failure: the chunk is recomputed
            return False
        return True

    def missing_chunks(self, verify: bool = True) -> list[int]:
        """Chunks that are absent or fail their checksum, in order."""
        return [i for i in range(self.n_chunks) if not self.has_chunk(i, verify)]

    def write_chunk(self, index: int, values: np.ndarray) -> None:
        """Write chunk `index` (atomically: temporary file, then rename)."""
        rows = self.rows(index)
        values = np.asarray(values, dtype=self.dtype)
        expected = (rows.stop - rows.start, *self.shape[1:])
        if values.shape != expected:
            raise InvalidDataError(
                f"Chunk {index} of store array {self.name!r} must have shape {expected}. Received: {values.shape}"
            )
        self._array[rows] = values

    def read_chunk(self, index: int) -> np.ndarray:
        """Chunk `index` as a NumPy array (raises if absent or corrupt)."""
        if not self._chunk_path(index).is_file():
            raise InvalidDataError(f"Chunk {index} of store array {self.name!r} has not been written yet.")
        return np.asarray(self._array[self.rows(index)])

    def read(self) -> np.ndarray:
        """The whole array (every chunk must be present)."""
        missing = self.missing_chunks(verify=False)
        if missing:
            raise InvalidDataError(
                f"Store array {self.name!r} is incomplete: {len(missing)} of {self.n_chunks} chunks are missing "
                f"(first: {missing[0]}). Rerun the computation with the same store to finish it."
            )
        return np.asarray(self._array[...])

    def fill(
        self,
        compute: Callable[[int], np.ndarray],
        on_chunk: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Compute and write every missing chunk with `compute(index)`; return the indices computed."""
        done = []
        for index in self.missing_chunks():
            self.write_chunk(index, compute(index))
            done.append(index)
            if on_chunk is not None:
                on_chunk(index)
        return done


class ChunkedStore:
    """A directory of row-chunked arrays made for one `Fingerprint`.

    Args:
        path: the store's directory (created if absent).
        fingerprint: what the contents depend on (model weights, data, settings).
        mode: "a" (default): create, or open an existing store with the same fingerprint and
            remove temporary files left by a killed writer; "r+": open an existing store for
            writing without cleaning (for workers writing in parallel); "r": read only.

    Raises:
        StoreMismatchError: the directory holds a store made with another fingerprint, or
            something that is not a Vestigia store.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: Fingerprint, mode: str = "a") -> None:
        if mode not in ("a", "r+", "r"):
            raise ValueError(f"`mode` must be 'a', 'r+' or 'r'. Received: mode={mode!r}")
        self.path = pathlib.Path(path)
        self.fingerprint = fingerprint
        self.mode = mode
        manifest = self.path / MANIFEST
        if mode == "a":
            self.path.mkdir(parents=True, exist_ok=True)
            with _locked(self.path):
                if not manifest.exists():
                    if any(p.name not in (".lock",) for p in self.path.iterdir()):
                        raise StoreMismatchError(
                            f"`store` must be an empty or new directory, or a Vestigia store. Received: "
                            f"store={str(self.path)!r}, a non-empty directory without {MANIFEST}."
                        )
                    zarr.open_group(str(self.path), mode="a", zarr_format=3)
                    _write_json_atomically(
                        manifest, {"format": FORMAT, "fingerprint": fingerprint.to_dict(), "arrays": {}}
                    )
            self._remove_partial_files()
        self._check(manifest)
        self._group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+", zarr_format=3)

    def _check(self, manifest: pathlib.Path) -> None:
        if not manifest.exists():
            raise StoreMismatchError(
                f"`store` is not a Vestigia store (no {MANIFEST}). Received: store={str(self.path)!r}"
            )
        record = json.loads(manifest.read_text())
        if record.get("format") != FORMAT:
            raise StoreMismatchError(
                f"`store` has format {record.get('format')!r}, this version reads {FORMAT!r}. "
                f"Received: store={str(self.path)!r}"
            )
        found = Fingerprint.from_dict(record["fingerprint"])
        differences = self.fingerprint.differences(found)
        if differences:
            raise StoreMismatchError(
                f"`store` at {str(self.path)!r} was made with another model, data or settings, so it "
                f"cannot be reused: {'; '.join(differences)}. Use a new directory, or delete this one "
                "to recompute."
            )

    def _remove_partial_files(self) -> None:
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)

    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict."""
        return dict(json.loads((self.path / MANIFEST).read_text()))

    def __contains__(self, name: str) -> bool:
        return name in self.manifest()["arrays"]

    def array(
        self, name: str, shape: tuple[int, ...] | None = None, chunk_rows: int | None = None, dtype: Any = "float32"
    ) -> StoredArray:
        """The array `name`, created with `shape`, `chunk_rows` and `dtype` if absent.

        Raises:
            StoreMismatchError: the array exists with another shape, chunking or dtype.
            KeyError: the array is absent and no shape was given.
        """
        spec = None
        if shape is not None:
            chunk_rows = check_positive_int("chunk_rows", chunk_rows if chunk_rows is not None else max(1, shape[0]))
            spec = {"shape": [int(s) for s in shape], "chunk_rows": chunk_rows, "dtype": np.dtype(dtype).str}
        with _locked(self.path) if self.mode != "r" else contextlib.nullcontext():
            record = self.manifest()
            known = record["arrays"].get(name)
            if known is None:
                if spec is None:
                    raise KeyError(f"Store {str(self.path)!r} has no array {name!r}; known: {sorted(record['arrays'])}")
                if self.mode == "r":
                    raise StoreMismatchError(f"Cannot create array {name!r} in a store opened with mode='r'.")
                self._group.create_array(
                    name,
                    shape=tuple(spec["shape"]),
                    chunks=(spec["chunk_rows"], *spec["shape"][1:]),
                    dtype=np.dtype(dtype),
                    serializer=BytesCodec(),
                    compressors=[Crc32cCodec()],
                    fill_value=0,
                    overwrite=True,
                )
                record["arrays"][name] = spec
                _write_json_atomically(self.path / MANIFEST, record)
            elif spec is not None and known != spec:
                raise StoreMismatchError(
                    f"Store array {name!r} exists with {known}, but {spec} was asked for. "
                    "Use a new store directory for other sizes."
                )
        return StoredArray(self._group[name], name)  # type: ignore[arg-type]

    def put(self, name: str, values: np.ndarray) -> None:
        """Save a whole (small) array as one chunk, e.g. curvature factors."""
        values = np.asarray(values)
        shape = values.shape if values.ndim else (1,)
        stored = self.array(name, shape, max(1, shape[0]), values.dtype)
        stored.write_chunk(0, values.reshape(shape))

    def get(self, name: str) -> np.ndarray | None:
        """An array saved by `put` (or any complete array), or None if absent or incomplete."""
        if name not in self:
            return None
        stored = self.array(name)
        return None if stored.missing_chunks() else stored.read()
