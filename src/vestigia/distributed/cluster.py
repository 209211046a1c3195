"""Connecting to Ray: a local cluster when no address is given, the existing one otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DEFAULT_OBJECT_STORE_BYTES = 256 * 2**20


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Distributed runs need Ray: `pip install 'vestigia[distributed]'` (or `pip install ray`)."
        ) from None
    return ray


@contextlib.contextmanager
def ray_cluster(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
    **init_options: Any,
) -> Iterator[Any]:
    """Yield the `ray` module, connected; shut down on exit only what this call started.

    Args:
        address: None starts a local cluster (or uses one already initialised in this
            process); "auto" or "ray://host:port" / "host:port" joins an existing cluster.
        num_cpus: CPUs (= parallel tasks) of a local cluster; default: all.
        object_store_memory: bytes of shared memory for a local cluster's object store.
        init_options: passed to `ray.init`.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_memory,
                include_dashboard=False,
                **init_options,
            )
        else:
            ray.init(address=address, **init_options)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
