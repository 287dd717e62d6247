"""Aggregation maths as pure functions on arrays (tested against hand-computed numbers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_i w_i * x_i / sum_i w_i for every key; float64 accumulation, each key's dtype kept.

    Refuses what would silently corrupt the result: no updates, weights that are not
    positive and finite, and updates whose keys or shapes disagree.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    w = w / w.sum()
    keys = list(updates[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = np.asarray(updates[0][key])
        acc = np.zeros(first.shape, dtype=np.float64)
        for i, (update, wi) in enumerate(zip(updates, w)):
            if key not in update:
                raise ValueError(f"update {i} lacks key {key!r}")
            value = np.asarray(update[key])
            if value.shape != first.shape:
                raise ValueError(f"update {i} key {key!r} has shape {value.shape}, expected {first.shape}")
            acc += wi * value
        out[key] = acc.astype(first.dtype, copy=False)
    for i, update in enumerate(updates):
        extra = set(update) - set(keys)
        if extra:
            raise ValueError(f"update {i} has unexpected keys {sorted(extra)}")
    return out


def groupwise_weighted_mean(current: Mapping[str, np.ndarray],
                            updates: Sequence[Mapping[str, np.ndarray]],
                            group_weights: Sequence[Mapping[str, float]],
                            group_of: Callable[[str], str]) -> dict[str, np.ndarray]:
    """Average each parameter group only over the updates that trained it.

    Key k of group g becomes sum_i w_ig * x_ik / sum_i w_ig over the updates i with
    w_ig > 0; a group no update trained keeps its current value. This is FedAvg when every
    update trains every group with the same weight.
    """
    if len(updates) != len(group_weights):
        raise ValueError(f"{len(updates)} updates but {len(group_weights)} group weight maps")
    out: dict[str, np.ndarray] = {}
    by_group: dict[str, list[str]] = {}
    for key in current:
        by_group.setdefault(group_of(key), []).append(key)
    for group, keys in by_group.items():
        contributors = [(u, float(gw.get(group, 0.0))) for u, gw in zip(updates, group_weights)
                        if float(gw.get(group, 0.0)) > 0]
        if not contributors:
            out.update({k: np.asarray(current[k]) for k in keys})
            continue
        sub = weighted_mean([{k: u[k] for k in keys} for u, _ in contributors],
                            [w for _, w in contributors])
        out.update(sub)
    return out
