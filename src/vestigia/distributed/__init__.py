"""Beyond one process: Ray tasks over data shards and stores, and several local accelerators."""

from vestigia.distributed.cluster import ray_cluster
from vestigia.distributed.ray_engine import featurise_to_store, reduce_statistics, score_on_ray
from vestigia.distributed.statistics import DenseKroneckerStatistics

__all__ = [
    "DenseKroneckerStatistics",
    "featurise_to_store",
    "ray_cluster",
    "reduce_statistics",
    "score_on_ray",
]
