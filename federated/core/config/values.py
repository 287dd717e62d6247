"""The values a str setting accepts, declared once beside its field.

    optimizer: str = one_of("adam", "sgd")

The config's check (`allowed_checks`, run by federated/core/config/checks.py and StrategyConfig),
its error message and the configuration reference (federated/core/config/keys.py) all read the
declaration; no other list of them is written anywhere.
"""

from __future__ import annotations

import re
from dataclasses import field, fields
from typing import Any

__all__ = ["ALLOWED", "PATTERN", "allowed_checks", "allowed_values", "one_of"]

ALLOWED = "allowed"  # field metadata: the values a str setting accepts
PATTERN = "pattern"  # field metadata: the regular expression a str setting must match (ALLOWED shows its forms)


def one_of(*values: str, pattern: re.Pattern[str] | None = None) -> Any:
    """A str setting that takes one of `values`; the first is its default. With `pattern`, a value
    must match it instead, and `values` are the forms shown to a user (cuda:N). The one declaration
    of them: the config's check, its error message and the configuration reference all read it
    (allowed_values). Field metadata, not a Literal or an Enum: OmegaConf 2.3's structured configs
    refuse typing.Literal, and an Enum field would hold members, not the strings that config.yaml,
    summary.json and every `== "adam"` in the code spell."""
    metadata: dict[str, Any] = {ALLOWED: values}
    if pattern is not None:
        metadata[PATTERN] = pattern
    return field(default=values[0], metadata=metadata)


def allowed_values(cls: type, name: str) -> tuple[str, ...] | None:
    """The values field `name` of config dataclass `cls` declares with one_of (None: any value of its type)."""
    for f in fields(cls):
        if f.name == name:
            values = f.metadata.get(ALLOWED)
            return tuple(values) if values is not None else None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def allowed_checks(section: Any) -> list[tuple[str, bool, str]]:
    """(field, ok, why) for each field of config dataclass instance `section` that declares its
    values (one_of, or a PATTERN with the forms it shows): the one check of them, whose message
    lists the declared values."""
    checks = []
    for f in fields(section):
        shown = f.metadata.get(ALLOWED)
        if shown is None:
            continue
        value = getattr(section, f.name)
        pattern = f.metadata.get(PATTERN)
        ok = pattern.fullmatch(value) is not None if pattern is not None else value in shown
        checks.append((f.name, ok, f"must be one of: {', '.join(shown)}"))
    return checks
