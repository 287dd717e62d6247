"""What planner steps share: their random streams and which tasks have scalar class labels."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from federated.core.corpus_schema import Task
from federated.core.protocol import Role
from federated.core.targets import BINARY, CLOSED_SET, MULTICLASS
from partitions.site_plan import SitePlan


def step_rng(seed: int, *keys: str) -> np.random.Generator:
    """A stream named by (seed, step, site, task...): independent of order and process."""
    digest = hashlib.blake2b("/".join(keys).encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def class_count(spec: Task) -> int | None:
    """Number of classes of a task with one class label per sample, else None."""
    if spec.target == BINARY:
        return 2
    if spec.target in (MULTICLASS, CLOSED_SET):
        return len(spec.classes)
    return None


def at_training_sites(plans: list[SitePlan], change: Callable[[SitePlan], SitePlan]) -> list[SitePlan]:
    """Apply `change` to each training site's plan; other sites are scored as they are."""
    return [change(p) if p.role == Role.TRAIN else p for p in plans]
