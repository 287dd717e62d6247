"""What each column of a vector modality means: its features, declared in the schema.

Two hospitals whose tables encode to the same width can still disagree on what a column holds
(one's indicator for `sex` means female, the other's male, when each chose the reference level
from its own frequencies). So a vector modality ingested from a table lists its features, in
column order: the name, the source column, the kind (a `numeric` value or an `indicator` of one
categorical level), the level, the unit and the range the data dictionary allows. spec.json
records them and the handshake compares them feature by feature, naming the first that differs.

A vector modality that lists features is stored raw (missing values as NaN); its imputation and
standardisation are a load-time transform (federated/core/feature_stats.py) whose statistics
come from the run's `preprocess.statistics` setting. A vector without features (the synthetic corpus,
corpora ingested before features existed) is used as stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NUMERIC = "numeric"
INDICATOR = "indicator"
FEATURE_KINDS = (NUMERIC, INDICATOR)
IMPUTE_METHODS = ("", "mean", "median")  # "": a missing value is refused at ingest


class FeatureError(ValueError):
    """A feature list that cannot describe a vector modality; the message names the feature."""


@dataclass(frozen=True)
class Feature:
    name: str  # "age", or "<column>=<level>" for an indicator
    column: str  # the source column it comes from
    kind: str = NUMERIC
    level: str = ""  # indicators: the level whose presence the feature marks
    unit: str = ""
    low: float | None = None  # the range the data dictionary allows (None: unbounded)
    high: float | None = None

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            raise FeatureError(f"feature name {self.name!r}: a non-empty string of at most 256 characters")
        if not isinstance(self.column, str) or not self.column:
            raise FeatureError(f"{where}: column must be a non-empty string")
        if self.kind not in FEATURE_KINDS:
            raise FeatureError(f"{where}: kind {self.kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        if (self.kind == INDICATOR) != bool(self.level):
            raise FeatureError(f"{where}: an indicator names its level, a numeric feature has none")
        if not isinstance(self.level, str) or not isinstance(self.unit, str):
            raise FeatureError(f"{where}: level and unit must be strings")
        for key in ("low", "high"):
            v = getattr(self, key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise FeatureError(f"{where}: {key} must be a finite number, got {v!r}")
                object.__setattr__(self, key, float(v))
        if self.low is not None and self.high is not None and self.low > self.high:
            raise FeatureError(f"{where}: low {self.low} is above high {self.high}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "column": self.column, "kind": self.kind}
        for key in ("level", "unit", "low", "high"):
            v = getattr(self, key)
            if v not in ("", None):
                d[key] = v
        return d

    @classmethod
    def from_dict(cls, raw: object) -> Feature:
        allowed = {"name", "column", "kind", "level", "unit", "low", "high"}
        if not isinstance(raw, dict) or "name" not in raw or "column" not in raw:
            raise FeatureError(f"a feature must be a mapping with `name` and `column`, got {raw!r}"[:300])
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise FeatureError(
                f"feature {raw['name']!r}: unknown field(s) {unknown}; valid: {', '.join(sorted(allowed))}"
            )
        return cls(**raw)


def features_from_list(raw: object, width: int, where: str) -> tuple[Feature, ...]:
    """A modality's feature list read from spec.json or a peer: at most `width` features with
    distinct names (a table narrower than the modality is zero-padded after them)."""
    if not isinstance(raw, list | tuple):
        raise FeatureError(f"{where}: features must be a list")
    feats = tuple(f if isinstance(f, Feature) else Feature.from_dict(f) for f in raw)
    if len(feats) > width:
        raise FeatureError(f"{where}: {len(feats)} features for a vector of {width}")
    names = [f.name for f in feats]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FeatureError(f"{where}: feature name(s) {twice} appear more than once")
    return feats


def first_feature_difference(a: tuple[Feature, ...], b: tuple[Feature, ...]) -> str:
    """'' when equal, else where the two lists first differ, for a handshake error a person acts on:
    the position, the feature on each side, and the fields that differ. A difference in what a
    column means (name, source column, kind, level) is named before one in its unit or range:
    an indicator of another level is the error that silently trains a wrong model."""
    meaning, metadata = ("name", "column", "kind", "level"), ("unit", "low", "high")
    pairs = list(zip(a, b, strict=False))
    for keys in (meaning, metadata):
        for i, (x, y) in enumerate(pairs):
            differ = [k for k in keys if getattr(x, k) != getattr(y, k)]
            if differ:
                also = sum(x != y for x, y in pairs) - 1
                more = f"; {also} other feature(s) differ too" if also else ""
                return f"feature {i + 1} is {x.name!r} here and {y.name!r} there (differs in {', '.join(differ)}){more}"
    if len(a) != len(b):
        extra = (a if len(a) > len(b) else b)[min(len(a), len(b))].name
        return f"{len(a)} features here, {len(b)} there (first unmatched: {extra!r})"
    return ""


def indicator_mask(modality: Any) -> list[bool]:
    """Per feature of a vector modality (a Modality with `features`): whether it is an indicator."""
    return [f.kind == INDICATOR for f in modality.features]
