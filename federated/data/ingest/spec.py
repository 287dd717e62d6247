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
The `modalities:` and `tasks:` blocks are described in federated/data/ingest/declare.py. The
whole spec -- keys, declarations, shapes, every source's task -- is checked before any data is
read, and the corpus records the schema (spec.json) and the declared blocks (provenance).

A spec may come from someone else (a coordinator), so it reads only inside its data root: the
folder given with `--data-root DIR`, else its `data_root` (which must lie inside the spec's
folder), else the spec's folder. A path that leaves it (`../`, an absolute path, a symlink
pointing out: real paths are compared) is refused naming the key, before anything is opened;
so is a file a source lists (a CSV's image, a folder's symlink). A `${...}` anywhere is refused.
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
    ADAPTER_KEYS,
    ADAPTER_PATHS,
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

KEYS = {"name", "on_error", "test_fraction", "seed", "sources", "data_root", "modalities", "tasks"}


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
    sets, skipped = [], []
    for i, source in enumerate(raw["sources"]):
        where = f"{spec_path} sources[{i}]"
        problems = Problems(_on_error(source.get("on_error", on_error), where))
        sets.append(_read_source(source, root, problems, seed + i, where, schema))
        skipped += problems.skipped
    for item in skipped:
        print(f"skipped {item['item']}: {item['reason']}")
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
    }
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
