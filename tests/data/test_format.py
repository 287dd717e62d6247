"""The corpus format refuses bad data with a message naming the problem, and never half-writes."""

import json

import numpy as np
import pytest

from federated.core.multimed import MULTIMED
from federated.data.format import Corpus, CorpusFormatError, _check_before_write, write_corpus


def _write(path, manifest, arrays, targets, **kw):
    return write_corpus(path, manifest, arrays, targets, name="tiny", provenance={"test": True}, schema=MULTIMED, **kw)


def test_round_trip_and_memory_mapping(tmp_path, tiny_frames):
    path = _write(tmp_path / "c", *tiny_frames())
    c = Corpus.open(path)
    assert c.spec["n_samples"] == 2 and c.tasks == ["cell_type"] and c.spec["origin_sites"] == ["s0", "s1"]
    assert isinstance(c.array("scrna"), np.memmap)
    # the schema written is that of the tasks present: cell_type and its one input, so one index column
    assert c.schema == MULTIMED.restrict(["cell_type"]) and c.modalities == ["scrna"]
    assert [col for col in c.manifest.columns if col.startswith("idx_")] == ["idx_scrna"]


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m, a, t: a.__setitem__("scrna", np.full((2, 256), np.nan, dtype=np.float32)), "NaN"),
        (lambda m, a, t: a.__setitem__("scrna", np.zeros((2, 100), dtype=np.float32)), r"shape \(100,\)"),
        (
            lambda m, a, t: m.__setitem__("task", ["cell_type", "astrology"]),
            r"task\(s\) \['astrology'\] are not tasks of the schema",
        ),
        (lambda m, a, t: m.__setitem__("split", ["train", "validation"]), "split values"),
        (lambda m, a, t: m.__setitem__("sample_id", ["a", "a"]), "duplicate sample_id 'a'"),
        (lambda m, a, t: m.__setitem__("target_row", [0, 5]), "target_row"),
    ],
)
def test_bad_data_is_refused_and_nothing_is_left_behind(tmp_path, mutate, pattern, tiny_frames):
    manifest, arrays, targets = tiny_frames()
    mutate(manifest, arrays, targets)
    with pytest.raises(CorpusFormatError, match=pattern):
        _write(tmp_path / "c", manifest, arrays, targets)
    assert list(tmp_path.iterdir()) == []


def test_existing_corpus_is_not_overwritten_by_default(tmp_path, tiny_frames):
    path = _write(tmp_path / "c", *tiny_frames())
    with pytest.raises(CorpusFormatError, match="already exists"):
        _write(path, *tiny_frames())
    _write(path, *tiny_frames(), overwrite=True)


def test_open_names_what_is_wrong(tmp_path, tiny_frames):
    with pytest.raises(CorpusFormatError, match="spec.json is missing"):
        Corpus.open(tmp_path)
    path = _write(tmp_path / "c", *tiny_frames())
    spec = json.loads((path / "spec.json").read_text())
    (path / "spec.json").write_text(json.dumps(dict(spec, schema_version=99)))
    with pytest.raises(CorpusFormatError, match="schema_version 99"):
        Corpus.open(path)
    (path / "spec.json").write_text(json.dumps(spec))
    (path / "arrays" / "scrna.npy").unlink()
    with pytest.raises(CorpusFormatError, match="arrays/scrna.npy is missing"):
        Corpus.open(path)


def _drop(frame, column):
    frame.drop(columns=[column], inplace=True)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        # manifest rows
        (lambda m, a, t: _drop(m, "origin_site"), r"manifest lacks columns \['origin_site'\]"),
        # task targets
        (lambda m, a, t: t.pop("cell_type"), "no targets array for task 'cell_type'"),
        (
            lambda m, a, t: t.__setitem__("cell_type", np.zeros((2, 3), dtype=np.int64)),
            r"targets/cell_type.npy has per-sample shape \(3,\), expected \(\)",
        ),
        # modality arrays
        (
            lambda m, a, t: a.__setitem__("scrna", np.zeros((2, 256), dtype=np.float64)),
            "arrays/scrna.npy has dtype float64, expected float32",
        ),
        (lambda m, a, t: m.__setitem__("idx_scrna", [0, 2]), "idx_scrna points past the end of arrays/scrna.npy"),
        # index columns without an array
        (lambda m, a, t: a.pop("scrna"), "idx_scrna has rows but there is no arrays/scrna.npy"),
        (
            lambda m, a, t: m.__setitem__("idx_ct", [0, -1]),
            "idx_ct has rows, but 'ct' is not a modality of the schema",  # no task of this corpus reads ct
        ),
    ],
)
def test_each_check_names_its_column_or_file(tmp_path, mutate, pattern, tiny_frames):
    manifest, arrays, targets = tiny_frames()
    mutate(manifest, arrays, targets)
    with pytest.raises(CorpusFormatError, match=pattern):
        _write(tmp_path / "c", manifest, arrays, targets)
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_is_checked_before_the_tasks_and_the_tasks_before_the_arrays(tmp_path, tiny_frames):
    manifest, arrays, targets = tiny_frames()
    manifest["split"] = ["train", "validation"]  # manifest rows
    targets.pop("cell_type")  # task targets
    arrays["scrna"] = arrays["scrna"].astype(np.float64)  # modality arrays
    with pytest.raises(CorpusFormatError, match="split values"):
        _write(tmp_path / "c", manifest, arrays, targets)
    manifest["split"] = ["train", "test"]
    with pytest.raises(CorpusFormatError, match="no targets array"):
        _write(tmp_path / "c", manifest, arrays, targets)


def test_an_array_without_its_index_column_is_refused(tiny_frames):
    # write_corpus adds every missing idx_ column (as -1), so only a direct caller can get here
    manifest, arrays, targets = tiny_frames()
    _drop(manifest, "idx_scrna")
    with pytest.raises(CorpusFormatError, match="manifest lacks column idx_scrna for array scrna"):
        _check_before_write(MULTIMED, manifest, arrays, targets)


def test_a_version_1_corpus_is_migrated_to_the_catalogue_schema_on_open(tmp_path, tiny_frames):
    """Corpora written before they declared a schema took every task and shape from the catalogue."""
    path = _write(tmp_path / "c", *tiny_frames())
    spec = json.loads((path / "spec.json").read_text())
    old = {k: v for k, v in spec.items() if k != "schema"} | {"schema_version": 1}
    (path / "spec.json").write_text(json.dumps(old))
    c = Corpus.open(path)
    assert c.spec["schema_version"] == 2 and c.schema == MULTIMED.restrict(["cell_type"])
    assert c.check() == []
    (path / "spec.json").write_text(json.dumps(old | {"modalities": {"scrna": {"shape": [100], "dtype": "float32"}}}))
    with pytest.raises(CorpusFormatError, match="version-1 corpus whose modality 'scrna' does not match"):
        Corpus.open(path)


def test_a_schema_naming_a_path_is_refused_on_open(tmp_path, tiny_frames):
    path = _write(tmp_path / "c", *tiny_frames())
    spec = json.loads((path / "spec.json").read_text())
    for entry in spec["schema"]["modalities"]:
        if entry["name"] == "scrna":
            entry["name"] = "../scrna"
    (path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CorpusFormatError, match=r"spec.json: schema: modality name '\.\./scrna'"):
        Corpus.open(path)


def test_a_build_finished_meanwhile_is_kept_not_replaced(tmp_path, tiny_frames, monkeypatch):
    """Two processes building one cached corpus: the one that renames second must not delete the
    first one's folder (which a run may already be reading); it gives up with the usual error."""
    import federated.data.format as fmt

    other = tmp_path / "c"
    real_np_save = np.save

    def save_then_other_build_finishes(file, arr, *args, **kwargs):
        real_np_save(file, arr, *args, **kwargs)
        if not other.exists():  # the other process's rename lands while this one writes
            other.mkdir()
            (other / "spec.json").write_text("{}")

    monkeypatch.setattr(fmt.np, "save", save_then_other_build_finishes)
    with pytest.raises(CorpusFormatError, match="already exists"):
        _write(other, *tiny_frames())
    assert (other / "spec.json").read_text() == "{}"  # the other build's folder, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # and no temporary folder left behind


def test_a_builds_temporary_folder_keeps_its_name_and_carries_ios_host_tag(tmp_path):
    """The build folder's name stays `.<name>.tmp-<host>-<pid>-<hex>` (earlier releases' leftovers in
    a cache are recognised by it) with the host tag federated.core.io's temporaries carry."""
    import os
    import re

    from federated.core.io import HOST_TAG
    from federated.data.format import _build_dir_beside, remove_stale_builds

    tmp = _build_dir_beside(tmp_path / "c")
    assert tmp.is_dir() and re.fullmatch(rf"\.c\.tmp-{HOST_TAG}-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
    assert remove_stale_builds(tmp_path / "c") == [] and tmp.is_dir()  # its writer (this process) is alive
