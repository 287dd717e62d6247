"""The corpus format refuses bad data with a message naming the problem, and never half-writes."""

import json

import numpy as np
import pytest

from federated.data.format import Corpus, CorpusFormatError, _check_before_write, write_corpus


def _write(path, manifest, arrays, targets, **kw):
    return write_corpus(path, manifest, arrays, targets, name="tiny", provenance={"test": True}, **kw)


def test_round_trip_and_memory_mapping(tmp_path, tiny_frames):
    path = _write(tmp_path / "c", *tiny_frames())
    c = Corpus.open(path)
    assert c.spec["n_samples"] == 2 and c.tasks == ["cell_type"] and c.spec["origin_sites"] == ["s0", "s1"]
    assert isinstance(c.array("scrna"), np.memmap)
    assert (c.manifest["idx_ct"] == -1).all()  # every modality gets an index column


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m, a, t: a.__setitem__("scrna", np.full((2, 256), np.nan, dtype=np.float32)), "NaN"),
        (lambda m, a, t: a.__setitem__("scrna", np.zeros((2, 100), dtype=np.float32)), r"shape \(100,\)"),
        (lambda m, a, t: m.__setitem__("task", ["cell_type", "astrology"]), "'astrology' is not a MultiMed task"),
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
        (lambda m, a, t: m.__setitem__("idx_ct", [0, -1]), "idx_ct has rows but there is no arrays/ct.npy"),
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
        _check_before_write(manifest, arrays, targets)
