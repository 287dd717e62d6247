"""A one-pass index of the manifest by (origin site, task, split).

Planners look up "the training rows of task t at origin o" once per site; with 1,000 sites
over a 1,000,000-row manifest a boolean mask per lookup would cost 1,000 full scans. One
stable argsort over integer codes answers every lookup with a slice instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from federated.data.format import Corpus

SPLITS = ("train", "test")


class ManifestIndex:
    def __init__(self, manifest: pd.DataFrame) -> None:
        origin_codes, self.origins = pd.factorize(manifest["origin_site"], sort=True)
        task_codes, self.tasks = pd.factorize(manifest["task"], sort=True)
        split = manifest["split"].to_numpy()
        split_codes = np.where(split == "train", 0, np.where(split == "test", 1, 2))
        self._n_tasks = len(self.tasks)
        # Per-row task code: steps compare small ints, not strings (10x faster on 1M rows).
        self.task_code = task_codes.astype(np.int16)
        key = (origin_codes.astype(np.int64) * self._n_tasks + task_codes) * 3 + split_codes
        self._order = np.argsort(key, kind="stable")  # rows ascending within each key
        sorted_keys = key[self._order]
        self._keys, self._starts = np.unique(sorted_keys, return_index=True)
        self._ends = np.append(self._starts[1:], len(sorted_keys))
        self._origin_pos = {o: i for i, o in enumerate(self.origins)}
        self._task_pos = {t: i for i, t in enumerate(self.tasks)}
        self.origin_sizes = pd.Series(np.bincount(origin_codes, minlength=len(self.origins)), index=list(self.origins))

    def rows(self, origin: str, task: str, split: str) -> np.ndarray:
        """Manifest row positions of one (origin site, task, split), ascending; may be empty."""
        o, t = self._origin_pos.get(origin), self._task_pos.get(task)
        if o is None or t is None:
            return np.empty(0, dtype=np.int64)
        key = (o * self._n_tasks + t) * 3 + SPLITS.index(split)
        i = int(np.searchsorted(self._keys, key))
        if i == len(self._keys) or self._keys[i] != key:
            return np.empty(0, dtype=np.int64)
        return self._order[self._starts[i] : self._ends[i]]

    def task_rows(self, rows: np.ndarray, task: str) -> np.ndarray:
        """Positions within `rows` (manifest rows) whose task is `task`."""
        t = self._task_pos.get(task, -1)
        return np.flatnonzero(self.task_code[rows] == t)

    def tasks_at(self, origin: str) -> list[str]:
        """Tasks with at least one row at an origin site."""
        o = self._origin_pos[origin]
        lo, hi = o * self._n_tasks * 3, (o + 1) * self._n_tasks * 3
        present = self._keys[(self._keys >= lo) & (self._keys < hi)]
        return sorted({str(self.tasks[(k // 3) % self._n_tasks]) for k in present})


def manifest_index(corpus: Corpus) -> ManifestIndex:
    """The corpus's index, built once per Corpus object."""
    cached = vars(corpus).get("_manifest_index")
    if cached is None:
        cached = vars(corpus)["_manifest_index"] = ManifestIndex(corpus.manifest)
    return cached
