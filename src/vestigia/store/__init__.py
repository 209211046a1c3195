"""On-disk stores: fingerprints of what made them, chunked arrays written atomically."""

from vestigia.store.fingerprint import (
    Fingerprint,
    canonical_json,
    fingerprint,
    fingerprint_data,
    fingerprint_settings,
    fingerprint_weights,
)

__all__ = [
    "Fingerprint",
    "canonical_json",
    "fingerprint",
    "fingerprint_data",
    "fingerprint_settings",
    "fingerprint_weights",
]
