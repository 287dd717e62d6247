"""Random streams derived from (seed, names), stable across processes and platforms.

Every random quantity comes from `rng_for(seed, *keys)`: the keys (task, site, purpose) are
hashed with BLAKE2b -- never Python's `hash()`, which is salted per process -- into a
`SeedSequence` spawn key. Separate streams per (task, site) mean that generating a subset of
tasks or sites gives exactly the same samples for the ones that remain.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _key_to_int(key: str | int) -> int:
    digest = hashlib.blake2b(f"{type(key).__name__}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator for the stream named by `keys` under `seed`."""
    spawn_key = tuple(_key_to_int(k) for k in keys)
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=spawn_key))
