"""The seed's ordering and caching switches."""

from __future__ import annotations

from enum import Enum


class ORDER(Enum):
    """Sort order of top-k results: DESCENDING keeps the largest values."""

    ASCENDING = 1
    DESCENDING = 2


class CACHE(Enum):
    """Where training-side influence vectors are kept between query batches."""

    MEMORY = 0
    DISK = 1
    NO_CACHE = 2
