"""Beyond one process: Ray tasks over data shards and stores, and several local accelerators."""

from vestigia.distributed.cluster import ray_cluster
from vestigia.distributed.mirrored import default_strategy, mirrored_featurise, mirrored_statistics
from vestigia.distributed.ray_engine import featurise_to_store, reduce_statistics, score_on_ray
from vestigia.distributed.statistics import DenseKroneckerStatistics

__all__ = [
    "DenseKroneckerStatistics",
    "default_strategy",
    "featurise_to_store",
    "mirrored_featurise",
    "mirrored_statistics",
    "ray_cluster",
    "reduce_statistics",
    "score_on_ray",
]
