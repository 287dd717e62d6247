"""The schema an ingest spec declares: MultiMed's catalogue, with the spec's `modalities:` and
`tasks:` blocks and its sources' `shape:` keys applied, so a group's own task or shape needs a
spec, not a code change.

    modalities:
      ct: {shape: [1, 128, 128]}              # a catalogue modality at another shape
      tabular: {features: 40}
      eeg: {channels: 22, samples: 512}
      notes: {kind: tokens, length: 64, vocab_size: 4096}   # a new modality: `kind` first
      dermoscopy: {kind: image, channels: 3, size: 64}
    tasks:
      sepsis:
        inputs: [clinical]
        target: binary
        classes: [no_sepsis, sepsis]
        metrics: [auroc, accuracy]            # default: the target type's usual metrics
        description: ICU admissions, 4 hospitals

Shape settings per kind: image `shape: [C, H, W]` or `channels` and `size` (an int or [H, W]);
signal `channels`, `samples`; tokens `length`, `vocab_size`; vector `features` (each kind also
takes `shape`). A catalogue modality keeps its kind and takes only the settings given; a new one
needs `kind` and a whole shape. A task needs `inputs` and `target`, and `classes` unless it is a
regression (then `unit`); a multilabel label shape comes from its classes, a per-residue one
from its tokens input's length. A catalogue task keeps its catalogue definition: it may be
repeated in `tasks:` only word for word. Every refusal names the spec file and the entry, and
comes before any data is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from federated.core.corpus_schema import CorpusSchema, Modality, SchemaError, Task, check_name, task_from_dict
from federated.core.multimed import CATALOGUE
from federated.core.targets import (
    BINARY,
    CLOSED_SET,
    IMAGE,
    KIND_RANK,
    KINDS,
    MULTICLASS,
    MULTILABEL,
    PER_RESIDUE,
    REGRESSION,
    SIGNAL,
    TARGET_TYPES,
    TOKENS,
    VECTOR,
)
from federated.data.ingest.core import ADAPTER_FILLS, IngestError, filled_modality
from federated.data.ingest.image_folders import image_modality

# What a task gets when its declaration lists no metrics: the primary metric first.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    BINARY: ("auroc", "accuracy"),
    MULTICLASS: ("macro_f1", "accuracy"),
    CLOSED_SET: ("macro_f1", "accuracy"),
    MULTILABEL: ("mean_auroc",),
    REGRESSION: ("mae", "pearson"),
    PER_RESIDUE: ("q3",),
}
# Friendly shape settings: kind -> setting -> the positions of the per-sample shape it sets.
SHAPE_SETTINGS: dict[str, dict[str, tuple[int, ...]]] = {
    IMAGE: {"channels": (0,), "size": (1, 2)},
    SIGNAL: {"channels": (0,), "samples": (1,)},
    TOKENS: {"length": (0,)},
    VECTOR: {"features": (0,)},
}
TASK_KEYS = ("inputs", "target", "classes", "unit", "metrics", "description", "label_shape")


def ingest_schema(
    modalities_block: object, tasks_block: object, sources: list[dict[str, Any]], spec_path: str | Path
) -> CorpusSchema:
    """The schema a spec's corpus declares (module docstring); IngestError names the entry at fault."""
    spec = str(spec_path)
    modalities, shaped = declared_modalities(modalities_block, spec)
    tasks_raw = _mapping(tasks_block, f"{spec} tasks")
    first = _schema(modalities, tasks_raw, spec)  # checks every task before any source is looked at
    _check_source_tasks(sources, first, tasks_raw, spec)
    schema = _schema(_with_source_shapes(first, sources, shaped, spec), tasks_raw, spec)
    _check_filled(sources, schema, spec)
    return schema


def declared_modalities(block: object, spec: str) -> tuple[dict[str, Modality], set[str]]:
    """The catalogue's modalities with the block applied, and the names whose shape the block set."""
    out = dict(CATALOGUE.modalities)
    shaped: set[str] = set()
    for name, raw in _mapping(block, f"{spec} modalities").items():
        where = f"{spec} modalities.{name}"
        try:
            check_name(name, "modality")
            out[name], sets_shape = _modality(name, raw, CATALOGUE.modalities.get(name), where)
        except SchemaError as e:
            raise IngestError(f"{where}: {e}") from None
        if sets_shape:
            shaped.add(name)
    return out, shaped


def _modality(name: str, raw: object, base: Modality | None, where: str) -> tuple[Modality, bool]:
    """One entry of the modalities block, over the catalogue's modality of that name if any."""
    if not isinstance(raw, dict):
        raise IngestError(f"{where}: must be a mapping of setting -> value (e.g. {{shape: [1, 64, 64]}})")
    if base is None and "kind" not in raw:
        raise IngestError(
            f"{where}: {name!r} is not a catalogue modality ({', '.join(CATALOGUE.modalities)}); "
            f"a new modality needs `kind` (one of {', '.join(KINDS)})"
        )
    kind = raw.get("kind", base.kind if base else None)
    if kind not in KINDS:
        raise IngestError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if base is not None and kind != base.kind:
        raise IngestError(
            f"{where}: {name} is a catalogue {base.kind} modality; its kind cannot become {kind} "
            "(declare a new modality under another name)"
        )
    valid = {"kind", "shape", *SHAPE_SETTINGS[kind], *(("vocab_size",) if kind == TOKENS else ())}
    unknown = sorted(map(str, set(raw) - valid))
    if unknown:
        raise IngestError(f"{where}: unknown key(s) {unknown} for a {kind} modality; valid: {', '.join(sorted(valid))}")
    shape = _shape(kind, raw, base, where)
    vocab_size = raw.get("vocab_size", base.vocab_size if base else 0)
    if kind == TOKENS and "vocab_size" not in raw and base is None:
        raise IngestError(f"{where}: a new tokens modality needs `vocab_size` (ids, padding included)")
    if kind == TOKENS:
        _positive_int(vocab_size, f"{where}: vocab_size")
    sets_shape = "shape" in raw or any(k in raw for k in SHAPE_SETTINGS[kind])
    return Modality(name, kind, shape, vocab_size=vocab_size), sets_shape


def _shape(kind: str, raw: dict[str, Any], base: Modality | None, where: str) -> tuple[int, ...]:
    """The per-sample shape from `shape` or the kind's friendly settings, the rest from `base`."""
    settings = SHAPE_SETTINGS[kind]
    friendly = [k for k in settings if k in raw]
    if "shape" in raw:
        if friendly:
            raise IngestError(f"{where}: give `shape` or {', '.join(settings)}, not both")
        return _int_list(raw["shape"], f"{where}: shape")
    parts: list[int | None] = list(base.shape) if base else [None] * KIND_RANK[kind]
    for key in friendly:
        positions = settings[key]
        value = raw[key]
        if len(positions) == 2 and isinstance(value, list | tuple):  # size: [H, W]
            values = _int_list(value, f"{where}: {key}")
            if len(values) != 2:
                raise IngestError(f"{where}: {key} is one integer or [height, width], got {list(value)}")
        else:
            values = (_positive_int(value, f"{where}: {key}"),) * len(positions)
        for position, v in zip(positions, values, strict=True):
            parts[position] = v
    if any(p is None for p in parts):
        raise IngestError(
            f"{where}: a new {kind} modality needs `shape` ({KIND_RANK[kind]} numbers) or {', '.join(settings)}"
        )
    return tuple(int(p) for p in parts if p is not None)


def _schema(modalities: dict[str, Modality], tasks_raw: dict[str, Any], spec: str) -> CorpusSchema:
    """The catalogue's tasks over these modalities (a per-residue label follows its tokens input's
    length), plus the declared tasks."""
    tasks = {name: _per_residue_shape(task, modalities) for name, task in CATALOGUE.tasks.items()}
    for name, raw in tasks_raw.items():
        where = f"{spec} tasks.{name}"
        base = tasks.get(name)
        try:
            check_name(name, "task")
            declared = _task(name, raw, modalities, where, base)
            CorpusSchema({m: modalities[m] for m in declared.inputs}, {name: declared})  # per-residue shape
        except SchemaError as e:
            raise IngestError(f"{where}: {e}") from None
        if base is None:
            tasks[name] = declared
            continue
        differ = [k for k in TASK_KEYS if getattr(declared, k) != getattr(base, k)]
        if differ:  # the same words keep the catalogue's task (its multimed flag included)
            raise IngestError(
                f"{where}: task {name!r} is a catalogue task; choose another name "
                f"(this declaration differs in {', '.join(differ)})"
            )
    try:
        return CorpusSchema(modalities, tasks)
    except SchemaError as e:
        raise IngestError(f"{spec}: {e}") from None


def _per_residue_shape(task: Task, modalities: Mapping[str, Modality]) -> Task:
    if task.target != PER_RESIDUE:
        return task
    tokens = next(m for m in task.inputs if modalities[m].kind == TOKENS)
    return replace(task, label_shape=modalities[tokens].shape)


def _task(name: str, raw: object, modalities: Mapping[str, Modality], where: str, base: Task | None) -> Task:
    """One entry of the tasks block; a catalogue task (`base`) lends the values not given."""
    if not isinstance(raw, dict):
        raise IngestError(f"{where}: must be a mapping (inputs, target, classes or unit, metrics)")
    unknown = sorted(map(str, set(raw) - set(TASK_KEYS)))
    if unknown:
        raise IngestError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TASK_KEYS)}")
    d = {k: v for k, v in base.to_dict().items() if k in TASK_KEYS} if base else {}
    d.update(raw)
    missing = [k for k in ("inputs", "target") if k not in d]
    if missing:
        raise IngestError(f"{where}: missing {', '.join(missing)}")
    target = d["target"]
    if target not in TARGET_TYPES:
        raise IngestError(f"{where}: target {target!r} is not a target type; valid: {', '.join(TARGET_TYPES)}")
    inputs = d["inputs"]
    if not isinstance(inputs, list | tuple) or not inputs or not all(isinstance(m, str) for m in inputs):
        raise IngestError(f"{where}: inputs must be a list of modality names")
    absent = [m for m in inputs if m not in modalities]
    if absent:
        raise IngestError(
            f"{where}: input(s) {absent} are not modalities; declare them under `modalities:` "
            f"(kind and shape) or use catalogue ones ({', '.join(CATALOGUE.modalities)})"
        )
    if target != REGRESSION and not d.get("classes"):
        raise IngestError(f"{where}: a {target} task needs `classes` (the names of its labels, in label order)")
    d.setdefault("metrics", list(DEFAULT_METRICS[target]))
    if "label_shape" not in d:
        d["label_shape"] = _label_shape(target, d, modalities)
    return task_from_dict(name, d)


def _label_shape(target: str, d: dict[str, Any], modalities: Mapping[str, Modality]) -> list[int]:
    """Multilabel: one 0/1 per class; per-residue: one class per position of the tokens input."""
    if target == MULTILABEL and isinstance(d["classes"], list | tuple):
        return [len(d["classes"])]
    if target == PER_RESIDUE:
        tokens = [m for m in d["inputs"] if modalities[m].kind == TOKENS]
        return list(modalities[tokens[0]].shape) if tokens else []
    return []


def _check_source_tasks(
    sources: list[dict[str, Any]], schema: CorpusSchema, declared: dict[str, Any], spec: str
) -> None:
    """Every source's task is declared or in the catalogue; refused naming the source otherwise."""
    for i, source in enumerate(sources):
        if source["task"] not in schema.tasks:
            raise IngestError(
                f"{spec} sources[{i}]: task {source['task']!r} is not declared; declare it under `tasks:` "
                f"or use a catalogue task ({', '.join(CATALOGUE.tasks)})"
                + (f"; declared: {', '.join(declared)}" if declared else "")
            )


def _with_source_shapes(
    schema: CorpusSchema, sources: list[dict[str, Any]], shaped: set[str], spec: str
) -> dict[str, Modality]:
    """The modalities with each source's `shape:` applied to the modality that source fills.
    Two sources giving one modality two shapes, or a source contradicting the modalities block,
    are refused naming both; a shape nobody else set becomes the modality's."""
    out = dict(schema.modalities)
    given: dict[str, tuple[int, tuple[int, ...]]] = {}  # modality -> (source index, shape)
    for i, source in enumerate(sources):
        if "shape" not in source:
            continue
        where = f"{spec} sources[{i}]"
        shape = _int_list(source["shape"], f"{where}: shape")
        try:
            name = filled_modality(schema.task(source["task"]), schema, ADAPTER_FILLS[source["adapter"]], source)
            replace(schema.modality(name), shape=shape)  # checks the shape against the kind
        except (SchemaError, ValueError) as e:
            raise IngestError(f"{where}: shape {list(shape)}: {e}") from None
        if name in shaped and schema.modality(name).shape != shape:
            raise IngestError(
                f"{where}: shape {list(shape)} for modality {name} contradicts modalities.{name} "
                f"(shape {list(schema.modality(name).shape)}); a modality has one shape in a corpus"
            )
        if name in given and given[name][1] != shape:
            other, other_shape = given[name]
            raise IngestError(
                f"{where}: shape {list(shape)} for modality {name} contradicts sources[{other}] "
                f"(shape {list(other_shape)}); a modality has one shape in a corpus"
            )
        given.setdefault(name, (i, shape))
        out[name] = replace(schema.modality(name), shape=shape)
    return out


def _check_filled(sources: list[dict[str, Any]], schema: CorpusSchema, spec: str) -> None:
    """Each source can fill its modality at the declared shape (an image of 1 or 3 channels), so
    a shape no adapter can produce is refused before the first source is read."""
    for i, source in enumerate(sources):
        kind = ADAPTER_FILLS[source["adapter"]]
        task = schema.task(source["task"])
        try:
            if kind == IMAGE:
                image_modality(task, schema, source)
            else:
                filled_modality(task, schema, kind, source)
        except ValueError as e:
            raise IngestError(f"{spec} sources[{i}]: {e}") from None


def _mapping(block: object, where: str) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise IngestError(f"{where}: must be a mapping of name -> settings")
    return block


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IngestError(f"{where} must be a positive integer, got {value!r}")
    return value


def _int_list(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise IngestError(f"{where} must be a list of positive integers, got {value!r}")
    return tuple(_positive_int(v, where) for v in value)
