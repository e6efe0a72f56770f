"""Short content hashes of JSON-able records, used as data versions and fingerprints."""

from __future__ import annotations

import hashlib
import json


def json_hash(obj) -> str:
    """The first 16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_of(sketch_versions: dict[str, str]) -> str:
    """Identifies the set of shard sketches a selection was made from (shard -> sketch data version)."""
    return json_hash(sorted(sketch_versions.items()))
