"""Describe a site plan: a table, sites.parquet, and a heatmap of sites x modalities/tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.io import atomic_write
from federated.data.format import Corpus
from partitions.site_plan import SitePlan


def plan_frame(corpus: Corpus, plans: list[SitePlan], cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per site: role, archetype, what it holds, sample counts and its label mix."""
    m = corpus.manifest
    tasks, labels = m["task"].to_numpy(), m["label"].to_numpy()
    rows = []
    for p in plans:
        rows_all = np.concatenate([p.train_rows, p.test_rows])
        mix = []
        for t in p.tasks:
            lab = labels[rows_all[tasks[rows_all] == t]]
            lab = lab[~np.isnan(lab)]
            if len(lab) and corpus.schema.task(t).is_classification:
                counts = np.bincount(lab.astype(int))
                mix.append(f"{t}: {counts.max() / counts.sum():.0%} top class")
        rows.append(
            {
                "site": p.site,
                "role": p.role,
                "archetype": p.archetype,
                "origin_site": p.origin_site,
                "modalities": list(p.modalities),
                "tasks": list(p.tasks),
                "n_train": p.n_train,
                "n_test": p.n_test,
                "label_mix": "; ".join(mix),
                # the corpus's own per-origin shift, and this site's load-time acquisition shift
                "corpus_shift": cfg.corpus.origin_shift_severity,
                "site_shift": ", ".join(f"{m}: {s:.2f}" for m, s in p.shift.items()),
                "label_skew_alpha": cfg.sites.label_skew_alpha or None,
                "label_skew_classes": cfg.sites.label_skew_classes or None,
                "quantity_skew_sigma": cfg.sites.quantity_skew_sigma or None,
                "masked_samples": ", ".join(f"{m}: {len(r)}" for m, r in p.masked.items()),
                "noisy_labels": int(sum(len(r) for r, _ in p.relabelled.values())),
            }
        )
    return pd.DataFrame(rows)


def write_heatmap(frame: pd.DataFrame, path: Path, schema: CorpusSchema) -> None:
    """Sites (rows) x modalities and tasks (columns): which site holds what."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = schema.modality_names + schema.task_names
    grid = np.array([[float(c in set(r.modalities) | set(r.tasks)) for c in cols] for r in frame.itertuples()])
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(frame) + 2.5))
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(
        range(len(frame)),
        [f"{r.site} {r.archetype} ({'OOD' if r.role != 'train' else 'ID'})" for r in frame.itertuples()],
        fontsize=8,
    )
    ax.axvline(len(schema.modalities) - 0.5, color="black", linewidth=1)
    ax.set_title("Sites x modalities | tasks")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
