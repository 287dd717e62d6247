"""An ingest spec: which sources, through which adapters, into one corpus.

    name: my_corpus
    on_error: stop          # or skip: skip bad items and list them
    test_fraction: 0.2      # by patient
    seed: 0
    sources:
      - adapter: image_folders
        task: brain_tumor_classification
        path: mri            # relative to the spec file's folder
      - adapter: tabular
        task: breast_cancer_classification
        path: wdbc.csv
        label_column: diagnosis
"""

from __future__ import annotations

from pathlib import Path

import yaml

from federated.corpus.ingest.core import ADAPTERS, IngestError, Problems, ingest
from federated.multimed import TASKS

KEYS = {"name", "on_error", "test_fraction", "seed", "sources"}


def run_spec(spec_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> tuple[Path, list[dict]]:
    """Ingest everything the spec names; returns the corpus path and the skipped items."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise IngestError(f"{spec_path}: ingest spec does not exist")
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as e:
        raise IngestError(f"{spec_path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not raw.get("sources"):
        raise IngestError(f"{spec_path}: needs a `sources` list")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise IngestError(f"{spec_path}: unknown key(s) {unknown}; valid: {', '.join(sorted(KEYS))}")
    on_error = raw.get("on_error", "stop")
    if on_error not in ("stop", "skip"):
        raise IngestError(f"{spec_path}: on_error must be stop or skip (got {on_error!r})")
    problems = Problems(on_error)
    sets = []
    for i, source in enumerate(raw["sources"]):
        where = f"{spec_path} sources[{i}]"
        if not isinstance(source, dict) or "adapter" not in source or "task" not in source:
            raise IngestError(f"{where}: each source needs `adapter` and `task`")
        if source["adapter"] not in ADAPTERS:
            raise IngestError(f"{where}: unknown adapter {source['adapter']!r}; valid: {', '.join(ADAPTERS.names())}")
        if source["task"] not in TASKS:
            raise IngestError(f"{where}: unknown task {source['task']!r}; valid: {', '.join(TASKS.names())}")
        try:
            sets.append(ADAPTERS.get(source["adapter"])(source, spec_path.parent, problems))
        except (ValueError, KeyError) as e:
            if isinstance(e, IngestError):
                raise
            raise IngestError(f"{where}: {e}") from None
    for item in problems.skipped:
        print(f"skipped {item['item']}: {item['reason']}")
    path = ingest(sets, Path(out_dir), str(raw.get("name", spec_path.stem)),
                  {"ingest_spec": str(spec_path.resolve()), "sources": raw["sources"],
                   "skipped": problems.skipped},
                  test_fraction=float(raw.get("test_fraction", 0.2)), seed=int(raw.get("seed", 0)),
                  overwrite=overwrite)
    return path, problems.skipped
