"""An ingest spec: which sources, through which adapters, into one corpus.

    name: my_corpus
    on_error: stop          # or skip: skip bad items and list them
    modalities:             # optional: shapes of catalogue modalities, or new modalities
      mri: {shape: [1, 64, 64]}
      clinical: {kind: vector, features: 24}
    tasks:                  # optional: new tasks (a source may also name a catalogue task)
      sepsis: {inputs: [clinical], target: binary, classes: [no, yes], metrics: [auroc, accuracy]}
    test_fraction: 0.2      # by patient
    seed: 0
    dictionary: dictionary.yaml   # optional: the coordinator's data dictionary (a path beside the
                            # spec, or the dictionary itself): every tabular source encodes by
                            # its columns, every h5ad source takes its genes
    sources:
      - adapter: image_folders
        task: brain_tumor_classification
        path: mri            # relative to the data root: the spec file's folder (or --data-root DIR)
      - adapter: tabular
        task: breast_cancer_classification
        path: wdbc.csv
        label_column: diagnosis
        simulated_sites: 3   # data without hospitals: deal patients into simulated_1..3
        on_error: skip       # this source only (default: the spec's on_error)

Every source may have `adapter`, `task`, `on_error`, `simulated_sites` and `shape` (the
per-sample shape of the modality it fills, e.g. [1, 64, 64] for image_folders); the other keys
are the adapter's own (its module's docstring lists them) and a misspelt key is refused by name.
The `modalities:` and `tasks:` blocks are described in federated/data/ingest/declare.py, the
data dictionary in federated/data/ingest/dictionary.py (a source's own `dictionary: PATH`
replaces the spec's for that source). The whole spec -- keys, declarations, shapes, every
source's task, the dictionaries -- is checked before any data is read, and the corpus records
the schema (spec.json: with each table's features) and the declared blocks (provenance). What
an adapter chose or noticed (the columns it took, levels chosen without a dictionary, constant
or mostly missing columns, genes a file lacks) is printed and kept in provenance.warnings.

A spec may come from someone else (a coordinator), so it reads only inside its data root: the
folder given with `--data-root DIR`, else its `data_root` (which must lie inside the spec's
folder), else the spec's folder. A path that leaves it (`../`, an absolute path, a symlink
pointing out: real paths are compared) is refused naming the key, before anything is opened;
so is a file a source lists (a CSV's image, a folder's symlink). A data dictionary is read from
beside the spec: its path is relative to the spec's folder and must lie inside it. A `${...}`
anywhere is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from federated.core.corpus_schema import CorpusSchema
from federated.core.io import read_yaml_mapping
from federated.core.literal import interpolation_in, refusal
from federated.data.ingest.core import (
    ADAPTER_DICTIONARY,
    ADAPTER_KEYS,
    ADAPTER_PATHS,
    ADAPTER_RETIRED,
    ADAPTERS,
    COMMON_KEYS,
    IngestError,
    Problems,
    SampleSet,
    assign_simulated_sites,
    ingest,
    inside,
    outside,
)
from federated.data.ingest.declare import ingest_schema
from federated.data.ingest.dictionary import DataDictionary, dictionary_at

KEYS = {"name", "on_error", "test_fraction", "seed", "sources", "data_root", "modalities", "tasks", "dictionary"}


def run_spec(
    spec_path: str | Path, out_dir: str | Path, overwrite: bool = False, data_root: str | Path | None = None
) -> tuple[Path, list[dict]]:
    """Ingest everything the spec names; returns the corpus path and the skipped items.
    Source paths are relative to `data_root`, else to the spec's `data_root` (itself relative to
    the spec file, and inside its folder), else to the spec file's folder; every source must lie
    inside that data root (symlinks followed), or it is refused before anything is read."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise IngestError(f"{spec_path}: ingest spec does not exist")
    raw = read_yaml_mapping(spec_path, KEYS, IngestError, "an ingest spec")
    interpolated = interpolation_in(raw)
    if interpolated is not None:
        raise IngestError(f"{spec_path}: {refusal(interpolated)}")
    if not raw.get("sources") or not isinstance(raw["sources"], list):
        raise IngestError(f"{spec_path}: needs a `sources` list")
    on_error = _on_error(raw.get("on_error", "stop"), str(spec_path))
    root = _data_root(spec_path, raw.get("data_root"), data_root)
    seed = int(raw.get("seed", 0))
    for i, source in enumerate(raw["sources"]):
        where = f"{spec_path} sources[{i}]"
        _check_source(source, where)
        _check_paths(source, root, where)
        _on_error(source.get("on_error", on_error), where)
    schema = ingest_schema(raw.get("modalities"), raw.get("tasks"), raw["sources"], spec_path)
    shared = _spec_dictionary(raw.get("dictionary"), spec_path)
    dictionaries = [
        _source_dictionary(source, shared, spec_path, f"{spec_path} sources[{i}]")
        for i, source in enumerate(raw["sources"])
    ]
    sets, skipped, warnings = [], [], []
    for i, source in enumerate(raw["sources"]):
        where = f"{spec_path} sources[{i}]"
        problems = Problems(_on_error(source.get("on_error", on_error), where))
        given = source if dictionaries[i] is None else {**source, "dictionary": dictionaries[i]}
        sets.append(_read_source(given, root, problems, seed + i, where, schema))
        skipped += problems.skipped
        warnings += problems.warnings
    for item in skipped:
        print(f"skipped {item['item']}: {item['reason']}")
    for item in warnings:
        print(f"note: {item['item']}: {item['warning']}")
    provenance = {
        "ingest_spec": str(spec_path.resolve()),
        "data_root": str(root.resolve()),
        "sources": _json_safe(raw["sources"]),
        "declared": {
            "modalities": _json_safe(raw.get("modalities") or {}),
            "tasks": _json_safe(raw.get("tasks") or {}),
        },
        "notes": [s.notes for s in sets],
        "skipped": skipped,
        "warnings": warnings,
    }
    if isinstance(raw.get("dictionary"), dict):  # a path is in `sources`' notes with its sha256
        provenance["dictionary"] = _json_safe(raw["dictionary"])
    path = ingest(
        sets,
        Path(out_dir),
        str(raw.get("name", spec_path.stem)),
        provenance,
        schema,
        test_fraction=float(raw.get("test_fraction", 0.2)),
        seed=seed,
        overwrite=overwrite,
    )
    return path, skipped


def _spec_dictionary(value: object, spec_path: Path) -> DataDictionary | None:
    """The spec's `dictionary:` (a mapping, or a path inside the spec's folder), read and checked."""
    if value is None:
        return None
    return dictionary_at(value, spec_path.parent, f"{spec_path} `dictionary`", "spec's folder")


def _source_dictionary(
    source: dict[str, Any], shared: DataDictionary | None, spec_path: Path, where: str
) -> DataDictionary | None:
    """The dictionary a source's adapter encodes by: its own `dictionary:` (which must hold the part
    the adapter reads), else the spec's when that holds the part, else none."""
    part = ADAPTER_DICTIONARY.get(source["adapter"])
    if part is None:
        return None
    if source.get("dictionary") is None:
        return shared if shared is not None and getattr(shared, part) else None
    own = dictionary_at(source["dictionary"], spec_path.parent, f"{where} `dictionary`", "spec's folder")
    if not getattr(own, part):
        raise IngestError(
            f"{where}: the data dictionary {own.where} has no `{part}:` (adapter {source['adapter']} reads them)"
        )
    return own


def _data_root(spec_path: Path, declared: object, given: str | Path | None) -> Path:
    """The folder every source must lie in: `given` (--data-root: the user names it), else the
    spec's `data_root`, which must itself lie inside the spec's folder (a spec may come from a
    coordinator: it cannot point the ingest at the rest of the machine), else the spec's folder."""
    if given:
        root = Path(given)
    elif declared is not None:
        found = inside(spec_path.parent / str(declared), spec_path.parent)
        if found is None:
            raise IngestError(
                f"{spec_path}: `data_root`: {declared} lies outside the spec's folder "
                f"{spec_path.parent.resolve()}; not opened. Name a data root elsewhere with --data-root DIR"
            )
        root = found
    else:
        root = spec_path.parent
    if not root.is_dir():
        raise IngestError(f"{spec_path}: data root {root} is not a folder")
    return Path(os.path.realpath(root))


def _check_paths(source: dict[str, Any], root: Path, where: str) -> None:
    """Every file or folder the source names lies inside the data root, symlinks followed; checked
    for every source before any is read, so a path outside is refused without being opened."""
    for key in sorted(ADAPTER_PATHS[source["adapter"]]):
        value = source.get(key)
        if value is not None and inside(root / str(value), root) is None:
            raise IngestError(f"{where}: {outside(key, value, root)}")


def _json_safe(value: Any) -> Any:
    """YAML may give int keys ({769: left_hand}); spec.json needs string keys."""
    return json.loads(json.dumps(value, default=str))


def _check_source(source: object, where: str) -> None:
    """A source names a known adapter, a task and only keys that adapter reads, so typos fail by
    name (whether the task exists is the schema's question: federated/data/ingest/declare.py)."""
    if not isinstance(source, dict) or "adapter" not in source or "task" not in source:
        raise IngestError(f"{where}: each source needs `adapter` and `task`")
    if not isinstance(source["adapter"], str) or source["adapter"] not in ADAPTERS:
        raise IngestError(f"{where}: unknown adapter {source['adapter']!r}; valid: {', '.join(ADAPTERS.names())}")
    if not isinstance(source["task"], str):
        raise IngestError(f"{where}: task must be a task name, got {source['task']!r}")
    allowed = COMMON_KEYS | ADAPTER_KEYS.get(source["adapter"], frozenset())
    for key, instead in ADAPTER_RETIRED.get(source["adapter"], {}).items():
        if key in source:
            raise IngestError(f"{where}: `{key}`: {instead}")
    unknown_keys = sorted(set(source) - allowed)
    if unknown_keys:
        raise IngestError(
            f"{where}: unknown key(s) {unknown_keys} for adapter {source['adapter']}; "
            f"valid: {', '.join(sorted(allowed))}"
        )


def _read_source(
    source: dict[str, Any], root: Path, problems: Problems, seed: int, where: str, schema: CorpusSchema
) -> SampleSet:
    """Run the source's adapter; an adapter's plain ValueError or KeyError gains the source's place."""
    try:
        samples = ADAPTERS.get(source["adapter"])(source, root, problems, schema)
        samples.where = where
        if source.get("simulated_sites") is not None:
            assign_simulated_sites(samples, int(source["simulated_sites"]), seed)
    except (ValueError, KeyError) as e:
        if isinstance(e, IngestError):
            raise
        raise IngestError(f"{where}: {e}") from None
    return samples


def _on_error(value: object, where: str) -> str:
    """The spec's or a source's on_error, refused by name unless it is one Problems understands."""
    if value not in ("stop", "skip"):
        raise IngestError(f"{where}: on_error must be stop or skip (got {value!r})")
    return str(value)
