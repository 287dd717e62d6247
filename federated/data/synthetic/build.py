"""Assemble the per-(task, site) batches into a corpus: manifest, arrays, targets.

Every (task, origin site) pair has its own random stream, so the corpus for a subset of
tasks holds exactly the samples the full corpus holds for those tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from federated.core.multimed import MULTIMED
from federated.data.format import index_column, write_corpus
from federated.data.synthetic.acquisition import site_acquisition
from federated.data.synthetic.config import GeneratorConfig
from federated.data.synthetic.seeding import rng_for
from federated.data.synthetic.tasks import GENERATORS, SiteContext, TaskBatch

CORPUS_NAME = "synthetic-multimed"


_COLUMNS = ("sample_id", "dataset", "task", "patient_id", "origin_site", "split", "label", "target_row")


@dataclass
class _Assembly:
    """The corpus' columns, modality rows and targets, gathered one (task, site) batch at a time."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in _COLUMNS})
    index_chunks: dict[str, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in MULTIMED.modalities})
    array_chunks: dict[str, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in MULTIMED.modalities})
    target_chunks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    n_rows: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MULTIMED.modalities})

    def add(self, task_name: str, site: str, k: int, batch: TaskBatch, split: np.ndarray) -> None:
        """Append the batch of the k-th site of a task; its targets follow the earlier sites' rows."""
        n = len(split)
        stem = [f"{task_name}-{site}-{i:05d}" for i in range(n)]
        self.columns["sample_id"].append(np.array([f"syn-{s}" for s in stem], dtype=object))
        self.columns["patient_id"].append(np.array([f"pat-{s}" for s in stem], dtype=object))
        self.columns["dataset"].append(np.full(n, f"synthetic_{task_name}", dtype=object))
        self.columns["task"].append(np.full(n, task_name, dtype=object))
        self.columns["origin_site"].append(np.full(n, site, dtype=object))
        self.columns["split"].append(split)
        self.columns["label"].append(batch.label.astype(np.float64))
        self.columns["target_row"].append(np.arange(k * n, (k + 1) * n, dtype=np.int64))
        self.target_chunks.setdefault(task_name, []).append(batch.target)
        self._add_inputs(batch, n)

    def _add_inputs(self, batch: TaskBatch, n: int) -> None:
        """Each modality is stored once: the batch's rows go after the earlier ones, -1 where it lacks one."""
        for m in MULTIMED.modalities:
            if m in batch.inputs:
                self.index_chunks[m].append(np.arange(self.n_rows[m], self.n_rows[m] + n, dtype=np.int64))
                self.array_chunks[m].append(batch.inputs[m])
                self.n_rows[m] += n
            else:
                self.index_chunks[m].append(np.full(n, -1, dtype=np.int64))

    def result(self) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(manifest, arrays, targets) in the shape `write_corpus` takes."""
        manifest = pd.DataFrame({c: np.concatenate(v) for c, v in self.columns.items()})
        for m in MULTIMED.modalities:
            manifest[index_column(m)] = np.concatenate(self.index_chunks[m])
        arrays = {m: np.concatenate(chunks) for m, chunks in self.array_chunks.items() if chunks}
        targets = {t: np.concatenate(chunks) for t, chunks in self.target_chunks.items()}
        return manifest, arrays, targets


def generate(cfg: GeneratorConfig) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(manifest, arrays per modality, targets per task), ready for `write_corpus`."""
    n = cfg.samples_per_task_site
    n_test = cfg.n_test()
    assembly = _Assembly()
    for task_name in cfg.task_names:
        generator = GENERATORS.get(task_name)
        for k, site in enumerate(cfg.site_names):
            ctx = SiteContext(cfg.seed, site_acquisition(cfg.seed, site, cfg.origin_shift_severity))
            batch = generator(rng_for(cfg.seed, "samples", task_name, site), n, ctx)
            _check_batch(task_name, batch, n)
            split = np.full(n, "train", dtype=object)
            split[rng_for(cfg.seed, "split", task_name, site).permutation(n)[:n_test]] = "test"
            assembly.add(task_name, site, k, batch, split)
    return assembly.result()


def build_synthetic_corpus(out_dir: str | Path, cfg: GeneratorConfig, overwrite: bool = False) -> Path:
    """Generate and write atomically; the config is recorded as the corpus' provenance."""
    manifest, arrays, targets = generate(cfg)
    return write_corpus(
        out_dir,
        manifest,
        arrays,
        targets,
        name=CORPUS_NAME,
        provenance={"generator": "synthetic", "config": asdict(cfg)},
        schema=MULTIMED,
        overwrite=overwrite,
    )


def _check_batch(task_name: str, batch: TaskBatch, n: int) -> None:
    """A generator bug must fail here, naming the task, not later in the format check."""
    spec = MULTIMED.task(task_name)
    if set(batch.inputs) != set(spec.inputs):
        raise RuntimeError(f"{task_name}: generated {sorted(batch.inputs)}, task reads {sorted(spec.inputs)}")
    for m, arr in batch.inputs.items():
        want = (n, *MULTIMED.modality(m).shape)
        if arr.shape != want or arr.dtype != np.dtype(MULTIMED.modality(m).dtype):
            raise RuntimeError(
                f"{task_name}: {m} is {arr.shape} {arr.dtype}, expected {want} {MULTIMED.modality(m).dtype}"
            )
    if batch.target.shape != (n, *spec.label_shape) or batch.label.shape != (n,):
        raise RuntimeError(
            f"{task_name}: target {batch.target.shape} / label "
            f"{batch.label.shape}, expected {(n, *spec.label_shape)} / {(n,)}"
        )
