"""Assemble the per-(task, site) batches into a corpus: manifest, arrays, targets.

Every (task, origin site) pair has its own random stream, so the corpus for a subset of
tasks holds exactly the samples the full corpus holds for those tasks.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from federated.data.format import index_column, write_corpus
from federated.data.synthetic.acquisition import site_acquisition
from federated.data.synthetic.config import GeneratorConfig
from federated.data.synthetic.seeding import rng_for
from federated.data.synthetic.tasks import GENERATORS, SiteContext, TaskBatch
from federated.core.multimed import MODALITIES, modality, task

CORPUS_NAME = "synthetic-multimed"


def generate(cfg: GeneratorConfig) -> tuple[pd.DataFrame, dict[str, np.ndarray],
                                            dict[str, np.ndarray]]:
    """(manifest, arrays per modality, targets per task), ready for `write_corpus`."""
    n = cfg.samples_per_task_site
    n_test = cfg.n_test()
    columns: dict[str, list[np.ndarray]] = {c: [] for c in (
        "sample_id", "dataset", "task", "patient_id", "origin_site", "split", "label",
        "target_row")}
    index_chunks: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    array_chunks: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    target_chunks: dict[str, list[np.ndarray]] = {}
    n_rows = {m: 0 for m in MODALITIES}
    for task_name in cfg.task_names:
        generator = GENERATORS.get(task_name)
        target_chunks[task_name] = []
        for k, site in enumerate(cfg.site_names):
            ctx = SiteContext(cfg.seed, site_acquisition(cfg.seed, site, cfg.shift_severity))
            batch = generator(rng_for(cfg.seed, "samples", task_name, site), n, ctx)
            _check_batch(task_name, batch, n)
            split = np.full(n, "train", dtype=object)
            split[rng_for(cfg.seed, "split", task_name, site).permutation(n)[:n_test]] = "test"
            stem = [f"{task_name}-{site}-{i:05d}" for i in range(n)]
            columns["sample_id"].append(np.array([f"syn-{s}" for s in stem], dtype=object))
            columns["patient_id"].append(np.array([f"pat-{s}" for s in stem], dtype=object))
            columns["dataset"].append(np.full(n, f"synthetic_{task_name}", dtype=object))
            columns["task"].append(np.full(n, task_name, dtype=object))
            columns["origin_site"].append(np.full(n, site, dtype=object))
            columns["split"].append(split)
            columns["label"].append(batch.label.astype(np.float64))
            columns["target_row"].append(np.arange(k * n, (k + 1) * n, dtype=np.int64))
            target_chunks[task_name].append(batch.target)
            for m in MODALITIES:
                if m in batch.inputs:
                    index_chunks[m].append(np.arange(n_rows[m], n_rows[m] + n, dtype=np.int64))
                    array_chunks[m].append(batch.inputs[m])
                    n_rows[m] += n
                else:
                    index_chunks[m].append(np.full(n, -1, dtype=np.int64))
    manifest = pd.DataFrame({c: np.concatenate(v) for c, v in columns.items()})
    for m in MODALITIES:
        manifest[index_column(m)] = np.concatenate(index_chunks[m])
    arrays = {m: np.concatenate(chunks) for m, chunks in array_chunks.items() if chunks}
    targets = {t: np.concatenate(chunks) for t, chunks in target_chunks.items()}
    return manifest, arrays, targets


def build_synthetic_corpus(out_dir: str | Path, cfg: GeneratorConfig,
                           overwrite: bool = False) -> Path:
    """Generate and write atomically; the config is recorded as the corpus' provenance."""
    manifest, arrays, targets = generate(cfg)
    return write_corpus(out_dir, manifest, arrays, targets, name=CORPUS_NAME,
                        provenance={"generator": "synthetic", "config": asdict(cfg)},
                        overwrite=overwrite)


def _check_batch(task_name: str, batch: TaskBatch, n: int) -> None:
    """A generator bug must fail here, naming the task, not later in the format check."""
    spec = task(task_name)
    if set(batch.inputs) != set(spec.inputs):
        raise RuntimeError(f"{task_name}: generated {sorted(batch.inputs)}, task reads "
                           f"{sorted(spec.inputs)}")
    for m, arr in batch.inputs.items():
        want = (n, *modality(m).shape)
        if arr.shape != want or arr.dtype != np.dtype(modality(m).dtype):
            raise RuntimeError(f"{task_name}: {m} is {arr.shape} {arr.dtype}, expected {want} "
                               f"{modality(m).dtype}")
    if batch.target.shape != (n, *spec.label_shape) or batch.label.shape != (n,):
        raise RuntimeError(f"{task_name}: target {batch.target.shape} / label "
                           f"{batch.label.shape}, expected {(n, *spec.label_shape)} / {(n,)}")
