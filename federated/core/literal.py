"""User values are taken literally: a `${...}` is refused wherever one enters.

OmegaConf resolves `${oc.env:HOME}` (the environment) and `${other.key}` when a config is built,
so a value a user, a study file or a coordinator's spec hands over could read what it was never
given. Command-line overrides, conf/ files, study files and ingest specs are checked with
`interpolation_in` before anything can resolve them; the caller raises its own error type,
naming the file and the key.
"""

from __future__ import annotations

from typing import Any

MARK = "${"


def interpolation_in(node: Any, where: str = "") -> str | None:
    """The dotted key (`axes.rate.0[1]`) of the first key or string value of `node` holding a
    `${`, or None when there is none. `where` prefixes the keys found."""
    found = interpolation_at(node, where)
    return None if found is None else found[0]


def interpolation_at(node: Any, where: str = "") -> tuple[str, str] | None:
    """As `interpolation_in`, with the key or value that holds the `${` (never resolved)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and MARK in key:
                return here, key
            found = interpolation_at(value, here)
            if found is not None:
                return found
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found = interpolation_at(value, f"{where}[{i}]")
            if found is not None:
                return found
    elif isinstance(node, str) and MARK in node:
        return where or "(value)", node
    return None


def refusal(key: str) -> str:
    """The words every refusal uses after naming the place."""
    return f"{key}: `${{...}}` interpolation is not allowed here; values are taken literally, nothing is resolved"
