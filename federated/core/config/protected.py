"""The settings that decide what a run protects: every privacy.* and secure_aggregation.* key.

The server records them with every round (the round records a checkpoint holds) and each site with
every state it saves, so a resumed run can be held to what it trained with: a resume whose config
changes one of them is refused, naming each key with its old and new value, by the server and by
every site. Left out: privacy.grad_sample_mode, which only picks how Opacus computes per-sample
gradients (every mode is exact: tests/clients/test_dp_sgd.py), not what is protected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from federated.core.config.schema import ExperimentConfig

PROTECTED_SECTIONS = ("privacy", "secure_aggregation")
NOT_PROTECTING = frozenset({"privacy.grad_sample_mode"})


def protected_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """`section.key` -> value for every key of PROTECTED_SECTIONS but NOT_PROTECTING (JSON values)."""
    settings: dict[str, Any] = {}
    for section in PROTECTED_SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            key = f"{section}.{f.name}"
            if key not in NOT_PROTECTING:
                settings[key] = getattr(getattr(cfg, section), f.name)
    return settings


def changed_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Each key whose value differs, as `key: old -> new` (a key only one side has: `<absent>`)."""
    absent = "<absent>"
    return [
        f"{key}: {recorded.get(key, absent)!r} -> {current.get(key, absent)!r}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key, absent) != current.get(key, absent)
    ]
