"""Split one corpus into one corpus per site, each holding only that site's rows.

What a federation of real hospitals looks like on one machine: the deployment demo and the
site-local simulation give each site its own folder, so no site can read another's data.
Each site's corpus keeps the stored train/test split, its rows' order, and the schema of the
tasks it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from federated.data.format import Corpus, CorpusFormatError, index_column, write_corpus


def split_corpus(
    corpus: Corpus, rows_by_site: Mapping[str, np.ndarray], out_dir: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """Write out_dir/<site>/ for each site: the corpus restricted to its manifest rows."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CorpusFormatError(f"{out_dir} is not empty; choose another --out or pass --overwrite")
    _refuse_shared_rows(rows_by_site)
    written = {}
    for site, rows in rows_by_site.items():
        written[site] = _write_site(corpus, site, np.sort(np.asarray(rows, dtype=np.int64)), out_dir / site, overwrite)
    return written


def _refuse_shared_rows(rows_by_site: Mapping[str, np.ndarray]) -> None:
    """A manifest row planned at two sites is refused, naming the first such row (in plan order)
    and both sites. One dict lookup per row: linear (1M rows: 0.4-0.9 s of a 4-9 s split)."""
    taken: dict[int, str] = {}
    for site, rows in rows_by_site.items():
        for r in np.asarray(rows).tolist():
            if r in taken:
                raise CorpusFormatError(f"manifest row {r} is planned at both {taken[r]} and {site}")
            taken[r] = site


def _write_site(corpus: Corpus, site: str, rows: np.ndarray, out: Path, overwrite: bool) -> Path:
    manifest = corpus.manifest.iloc[rows].reset_index(drop=True).copy()
    arrays: dict[str, np.ndarray] = {}
    for m in corpus.modalities:
        col = index_column(m)
        idx = manifest[col].to_numpy()
        have = idx >= 0
        if have.any():
            arrays[m] = np.asarray(corpus.array(m)[idx[have]])
        new = np.full(len(manifest), -1, dtype=np.int64)
        new[have] = np.arange(int(have.sum()))
        manifest[col] = new
    targets: dict[str, np.ndarray] = {}
    target_rows = manifest["target_row"].to_numpy().copy()
    for t in manifest["task"].unique():
        of_task = (manifest["task"] == t).to_numpy()
        targets[t] = np.asarray(corpus.targets(t)[target_rows[of_task]])
        target_rows[of_task] = np.arange(int(of_task.sum()))
    manifest["target_row"] = target_rows
    provenance = {"split_from": str(corpus.path), "fingerprint": corpus.fingerprint, "site": site}
    return write_corpus(
        out, manifest, arrays, targets, corpus.spec.get("name", "corpus"), provenance, corpus.schema, overwrite
    )
