"""A corpus's schema: the modalities it holds and the tasks it poses, declared as data.

Every corpus carries its schema in spec.json. Site planning, the model, the metrics, the
strategies' parameter groups and the reports read the schema of the corpus they run on, so a
research group's own task ("sepsis from 13 clinical variables") or shape (CT at 128x128) needs a
spec, not a code change. MultiMed's catalogue (federated/core/multimed.py) is one schema,
ready by name.

Names become file names (arrays/<modality>.npy) and keys ("encoder/<modality>",
"<task>/<metric>"), so they are restricted to lower-case letters, digits and underscores: a
schema read from disk or from a network peer cannot name a path outside the corpus.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from federated.core.features import IMPUTE_METHODS, Feature, FeatureError, features_from_list
from federated.core.metrics import validate_metrics
from federated.core.targets import (
    CLASS_TARGETS,
    KIND_DTYPE,
    KIND_RANK,
    KINDS,
    MULTILABEL,
    PER_RESIDUE,
    REGRESSION,
    TARGET_TYPES,
    TOKENS,
    VECTOR,
)

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_ELEMENTS = 1 << 26  # per-sample elements of one modality (a 4x4096x4096 image); far above any use
MAX_CLASSES = 100_000


class SchemaError(ValueError):
    """A schema that cannot describe a corpus; the message names the modality or task and the field."""


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SchemaError(
            f"{what} name {name!r}: use 1-64 lower-case letters, digits and underscores, starting with a letter"
        )
    return name


@dataclass(frozen=True)
class Modality:
    name: str
    kind: str  # one of targets.KINDS
    shape: tuple[int, ...]  # per-sample array shape in the corpus
    dtype: str = ""  # numpy dtype name of the stored array; "" = the kind's
    vocab_size: int = 0  # token modalities only, padding included
    # Vector modalities ingested from a table: what each column means (federated/core/features.py),
    # and how a missing value is filled at load time ("" = none may be missing).
    features: tuple[Feature, ...] = ()
    impute: str = ""

    def __post_init__(self) -> None:
        where = f"modality {self.name!r}"
        check_name(self.name, "modality")
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        object.__setattr__(self, "shape", _positive_ints(self.shape, f"{where}: shape"))
        if len(self.shape) != KIND_RANK[self.kind]:
            raise SchemaError(
                f"{where}: a {self.kind} sample has {KIND_RANK[self.kind]} dimensions "
                f"({_RANK_WORDS[self.kind]}), shape {list(self.shape)} has {len(self.shape)}"
            )
        if math.prod(self.shape) > MAX_ELEMENTS:
            raise SchemaError(f"{where}: shape {list(self.shape)} holds more than {MAX_ELEMENTS} values per sample")
        if not self.dtype:
            object.__setattr__(self, "dtype", KIND_DTYPE[self.kind])
        if self.dtype != KIND_DTYPE[self.kind]:
            raise SchemaError(f"{where}: a {self.kind} modality is stored as {KIND_DTYPE[self.kind]}, not {self.dtype}")
        if self.kind == TOKENS and not (isinstance(self.vocab_size, int) and 2 <= self.vocab_size <= 10_000_000):
            raise SchemaError(f"{where}: a tokens modality needs vocab_size >= 2 (padding included)")
        if self.kind != TOKENS and self.vocab_size:
            raise SchemaError(f"{where}: vocab_size is for tokens modalities only")
        if self.features or self.impute:
            if self.kind != VECTOR:
                raise SchemaError(f"{where}: features and impute are for vector modalities only")
            try:
                object.__setattr__(self, "features", features_from_list(self.features, self.shape[0], where))
            except FeatureError as e:
                raise SchemaError(str(e)) from None
            if self.impute not in IMPUTE_METHODS:
                raise SchemaError(f"{where}: impute {self.impute!r} is not one of mean, median (or empty)")
            if self.impute and not self.features:
                raise SchemaError(f"{where}: impute needs the modality's features")

    @property
    def raw_features(self) -> bool:
        """Stored raw: imputed and standardised at load time from the run's statistics."""
        return bool(self.features)

    @property
    def is_tokens(self) -> bool:
        return self.kind == TOKENS

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.vocab_size:
            d["vocab_size"] = self.vocab_size
        if self.features:
            d["features"] = [f.to_dict() for f in self.features]
        if self.impute:
            d["impute"] = self.impute
        return d


_RANK_WORDS = {
    "image": "channels, height, width",
    "signal": "channels, samples",
    "tokens": "length",
    "vector": "features",
}


@dataclass(frozen=True)
class Task:
    name: str
    inputs: tuple[str, ...]
    target: str  # one of targets.TARGET_TYPES
    metrics: tuple[str, ...]  # the first is the primary metric
    classes: tuple[str, ...] = ()  # class / label / answer names; empty for regression
    label_shape: tuple[int, ...] = ()  # per-sample label array shape
    unit: str = ""  # regression targets only
    description: str = ""  # where the data comes from, for a reader of the corpus
    multimed: bool = False  # one of MultiMed's 11 tasks (the catalogue sets it)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        check_name(self.name, "task")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "label_shape", _positive_ints(self.label_shape, f"{where}: label_shape"))
        if not self.inputs:
            raise SchemaError(f"{where}: needs at least one input modality")
        if len(set(self.inputs)) != len(self.inputs):
            raise SchemaError(f"{where}: inputs {list(self.inputs)} name a modality twice")
        if self.target not in TARGET_TYPES:
            raise SchemaError(f"{where}: target {self.target!r} is not one of {', '.join(TARGET_TYPES)}")
        self._check_classes(where)
        try:
            validate_metrics(self.name, self.target, self.metrics)
        except ValueError as e:
            raise SchemaError(str(e)) from None
        if self.unit and self.target != REGRESSION:
            raise SchemaError(f"{where}: unit is for regression targets only")

    def _check_classes(self, where: str) -> None:
        n = len(self.classes)
        if self.target == REGRESSION:
            if n:
                raise SchemaError(f"{where}: a regression task has no classes")
        elif n < 2 or n > MAX_CLASSES:
            raise SchemaError(f"{where}: a {self.target} task needs 2 to {MAX_CLASSES} classes, got {n}")
        if len(set(self.classes)) != n:
            raise SchemaError(f"{where}: classes {list(self.classes)} repeat a name")
        if self.target == "binary" and n != 2:
            raise SchemaError(f"{where}: a binary task has exactly 2 classes (negative, positive), got {n}")
        want = {MULTILABEL: (n,)}.get(self.target)
        if want is not None and self.label_shape != want:
            raise SchemaError(f"{where}: a multilabel label is one 0/1 per class, label_shape {list(want)}")
        if self.target not in (MULTILABEL, PER_RESIDUE) and self.label_shape:
            raise SchemaError(f"{where}: a {self.target} label is a scalar (label_shape [])")

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def n_outputs(self) -> int:
        """Width of the model head's output (per position for per-residue tasks)."""
        if self.target in ("binary", REGRESSION):
            return 1
        return len(self.classes)

    @property
    def is_classification(self) -> bool:
        return self.target in CLASS_TARGETS

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "inputs": list(self.inputs),
            "target": self.target,
            "metrics": list(self.metrics),
            "classes": list(self.classes),
            "label_shape": list(self.label_shape),
        }
        for key in ("unit", "description"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.multimed:
            d["multimed"] = True
        return d


def _positive_ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise SchemaError(f"{where} must be a list of positive integers, got {value!r}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class CorpusSchema:
    """Modalities and tasks in a fixed order (the order encoders, heads and reports use)."""

    modalities: Mapping[str, Modality] = field(default_factory=dict)
    tasks: Mapping[str, Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", dict(self.modalities))
        object.__setattr__(self, "tasks", dict(self.tasks))
        for t in self.tasks.values():
            self._check_inputs(t)

    def _check_inputs(self, t: Task) -> None:
        unknown = [m for m in t.inputs if m not in self.modalities]
        if unknown:
            raise SchemaError(
                f"task {t.name!r}: input(s) {unknown} are not modalities of this schema "
                f"(modalities: {', '.join(self.modalities) or 'none'})"
            )
        if t.target == PER_RESIDUE:
            tokens = [m for m in t.inputs if self.modalities[m].kind == TOKENS]
            if not tokens:
                raise SchemaError(f"task {t.name!r}: a per_residue task needs a tokens input")
            want = self.modalities[tokens[0]].shape
            if t.label_shape != want:
                raise SchemaError(
                    f"task {t.name!r}: a per_residue label has one class per position of {tokens[0]}, "
                    f"label_shape {list(want)}, not {list(t.label_shape)}"
                )

    def modality(self, name: str) -> Modality:
        try:
            return self.modalities[name]
        except KeyError:
            raise SchemaError(
                f"unknown modality {name!r}; modalities of this corpus: {', '.join(self.modalities)}"
            ) from None

    def task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise SchemaError(f"unknown task {name!r}; tasks of this corpus: {', '.join(self.tasks)}") from None

    @property
    def modality_names(self) -> list[str]:
        return list(self.modalities)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def modalities_of(self, task_names: Iterable[str]) -> list[str]:
        """The modalities the given tasks read, in schema order."""
        wanted = {m for t in task_names for m in self.task(t).inputs}
        return [m for m in self.modalities if m in wanted]

    def restrict(self, task_names: Iterable[str]) -> CorpusSchema:
        """The schema of a corpus holding only these tasks: them and their inputs, in this order."""
        keep = set(task_names)
        for t in keep:
            self.task(t)
        tasks = {n: t for n, t in self.tasks.items() if n in keep}
        mods = self.modalities_of(tasks)
        return CorpusSchema({m: self.modalities[m] for m in mods}, tasks)

    def merged(self, other: CorpusSchema) -> CorpusSchema:
        """This schema plus another's modalities and tasks; a name defined two ways is refused."""
        for kind, mine, theirs in (("modality", self.modalities, other.modalities), ("task", self.tasks, other.tasks)):
            for name in mine.keys() & theirs.keys():
                if mine[name] != theirs[name]:
                    raise SchemaError(
                        f"{kind} {name!r} is defined two ways: {_dict(mine[name])} and {_dict(theirs[name])}"
                    )
        return CorpusSchema({**self.modalities, **other.modalities}, {**self.tasks, **other.tasks})

    def to_dict(self) -> dict[str, Any]:
        """Lists, not name -> entry mappings: the order is part of the schema (it is the order the
        model builds its encoders and heads in, so their initial weights), and JSON writers sort
        object keys (spec.json is written with sort_keys)."""
        return {
            "modalities": [{"name": n, **m.to_dict()} for n, m in self.modalities.items()],
            "tasks": [{"name": n, **t.to_dict()} for n, t in self.tasks.items()],
        }

    @classmethod
    def from_dict(cls, raw: object, where: str = "schema") -> CorpusSchema:
        """Parse and check a schema read from disk or the network; errors name `where` and the entry."""
        if not isinstance(raw, dict) or set(raw) != {"modalities", "tasks"}:
            raise SchemaError(f"{where}: must be a mapping with exactly `modalities` and `tasks`")
        try:
            mods = {n: modality_from_dict(n, d) for n, d in _entries(raw["modalities"], "modalities")}
            tasks = {n: task_from_dict(n, d) for n, d in _entries(raw["tasks"], "tasks")}
            return cls(mods, tasks)
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None


def _entries(raw: object, section: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, definition) of each entry of a schema section: a list of mappings with a `name`."""
    if not isinstance(raw, list) or not all(isinstance(e, dict) and "name" in e for e in raw):
        raise SchemaError(f"`{section}` must be a list of definitions, each with a `name`")
    names = [e["name"] for e in raw]
    twice = sorted({str(n) for n in names if names.count(n) > 1})
    if twice:
        raise SchemaError(f"`{section}` defines {twice} more than once")
    return [(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in raw]


def _dict(item: Modality | Task) -> dict[str, Any]:
    return item.to_dict()


_MODALITY_KEYS = {f.name for f in fields(Modality)} - {"name"}
_TASK_KEYS = {f.name for f in fields(Task)} - {"name"}


def modality_from_dict(name: str, raw: object) -> Modality:
    check_name(name, "modality")
    d = _known_keys(raw, _MODALITY_KEYS, f"modality {name!r}")
    return Modality(name=name, **d)


def task_from_dict(name: str, raw: object) -> Task:
    check_name(name, "task")
    d = _known_keys(raw, _TASK_KEYS, f"task {name!r}")
    for key in ("inputs", "metrics", "classes"):
        if key in d and not (isinstance(d[key], list | tuple) and all(isinstance(v, str | int) for v in d[key])):
            raise SchemaError(f"task {name!r}: {key} must be a list of names")
    for key in ("target", "unit", "description"):
        if key in d and not isinstance(d[key], str):
            raise SchemaError(f"task {name!r}: {key} must be a string")
    if "multimed" in d and not isinstance(d["multimed"], bool):
        raise SchemaError(f"task {name!r}: multimed must be true or false")
    missing = [k for k in ("inputs", "target", "metrics") if k not in d]
    if missing:
        raise SchemaError(f"task {name!r}: missing {', '.join(missing)}")
    return Task(name=name, **d)


def _known_keys(raw: object, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: must be a mapping of field -> value")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {unknown}; valid: {', '.join(sorted(allowed))}")
    return dict(raw)
