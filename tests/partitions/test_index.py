"""The manifest index answers (origin, task, split) lookups exactly as a boolean mask would."""

import numpy as np

from partitions.index import ManifestIndex


def test_lookups_equal_masks(manifest_corpus):
    corpus = manifest_corpus({"A": 50, "B": 70, "C": 3}, tasks=("cell_type", "bone_age", "motor_imagery"))
    m = corpus.manifest
    index = ManifestIndex(m)
    for o in ("A", "B", "C", "Z"):
        for t in ("cell_type", "bone_age", "motor_imagery", "medical_vqa"):
            for s in ("train", "test"):
                mask = (m["origin_site"] == o) & (m["task"] == t) & (m["split"] == s)
                assert np.array_equal(index.rows(o, t, s), np.flatnonzero(mask.to_numpy()))
    assert index.tasks_at("A") == sorted(set(m.loc[m.origin_site == "A", "task"]))
    assert index.origin_sizes.to_dict() == {"A": 50, "B": 70, "C": 3}
