"""Results: orderings, cache switches, streaming top-k."""

from vestigia.results.enums import CACHE, ORDER
from vestigia.results.topk import StreamingTopK, TopK, top_k_of_scores

__all__ = ["CACHE", "ORDER", "StreamingTopK", "TopK", "top_k_of_scores"]
