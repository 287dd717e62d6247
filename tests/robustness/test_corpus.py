"""Issue 14, corpus cases: a corrupt corpus is named (file, task, row, column) by `Corpus.open`,
`multimed-fl corpus check` and `multimed-fl run`, before anything trains or is written; a
corpus's fingerprint changes with what it holds; a killed build's temporary folder is removed by
the next build, a running build's never."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federated.app.cli import main
from federated.core.multimed import MULTIMED
from federated.data.checks import check_corpus
from federated.data.format import Corpus, CorpusFormatError, remove_stale_builds, write_corpus


@pytest.fixture
def corpus(smoke_corpus, tmp_path) -> Path:
    """A private copy of the smoke corpus, to corrupt."""
    return Path(shutil.copytree(smoke_corpus, tmp_path / "corpus"))


def _poke(file: Path, row: int, value) -> None:
    """Overwrite one row of an .npy file in place (as a careless edit would)."""
    arr = np.load(file, mmap_mode="r+")
    arr[row] = value
    arr.flush()
    del arr


def _check(capsys, path: Path) -> tuple[int, str]:
    code = main(["corpus", "check", str(path)])
    return code, " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------ the must-show case
def test_label_99_is_named_by_corpus_check_open_and_run(corpus, tmp_path, capsys):
    target = corpus / "targets" / "cell_type.npy"
    _poke(target, 7, 99)
    code, err = _check(capsys, corpus)
    assert code == 1
    assert f"{target}: row 7 holds label 99, outside task cell_type's labels: class indices 0..9 (10 classes)" in err
    with pytest.raises(CorpusFormatError, match=r"cell_type\.npy: row 7 holds label 99, outside task cell_type"):
        Corpus.open(corpus)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", "scale=smoke", f"corpus.path={corpus}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cell_type.npy: row 7 holds label 99, outside task cell_type's labels" in err
    assert not out.exists()  # refused before training: no output folder, no checkpoint


def test_a_clean_corpus_passes_every_check(smoke_corpus, capsys):
    assert check_corpus(smoke_corpus) == []
    code = main(["corpus", "check", str(smoke_corpus)])
    assert code == 0
    assert Corpus.open(smoke_corpus).fingerprint in capsys.readouterr().out


# -------------------------------------------------------------- each corruption, named at open
def _spec_edit(path: Path, edit) -> None:
    spec = json.loads((path / "spec.json").read_text())
    edit(spec)
    (path / "spec.json").write_text(json.dumps(spec))


def _manifest_edit(path: Path, column: str, row: int, value) -> None:
    m = pd.read_parquet(path / "manifest.parquet")
    m.loc[row, column] = value
    m.to_parquet(path / "manifest.parquet", index=False)


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 100)


def _append(file: Path, data: bytes) -> None:
    with open(file, "ab") as f:
        f.write(data)


def _reshape(file: Path) -> None:
    arr = np.load(file)
    np.save(file, arr.reshape(len(arr) * 2, -1))  # same bytes, another header


def _rename_task_in_spec(spec: dict) -> None:
    spec["tasks"]["cell_kind"] = spec["tasks"].pop("cell_type")


CASES = {
    "split value": (
        lambda p: _manifest_edit(p, "split", 3, "validation"),
        r"manifest.parquet: column split row 3: 'validation' is not one of train, test \(1 row in all\)",
    ),
    "task renamed in the manifest": (
        lambda p: _manifest_edit(p, "task", 5, "astrology"),
        r"manifest.parquet: column task row 5: 'astrology' is not a task spec.json lists",
    ),
    "task renamed in the spec": (
        lambda p: _spec_edit(p, _rename_task_in_spec),
        r"spec.json: tasks \[[^]]*'cell_kind'[^]]*\] differ from the schema's tasks \[[^]]*'cell_type'",
    ),
    "truncated array": (
        lambda p: _truncate(p / "arrays" / "xray.npy"),
        r"arrays/xray.npy: truncated: \d+ bytes, but its header \(shape \(\d+, 1, 32, 32\), dtype float32\) promises",
    ),
    "reshaped array": (
        lambda p: _reshape(p / "arrays" / "scrna.npy"),
        r"arrays/scrna.npy: per-sample shape \(128,\), expected \(256,\)",
    ),
    "missing targets file": (
        lambda p: (p / "targets" / "bone_age.npy").unlink(),
        r"targets/bone_age.npy is missing",
    ),
    "garbage manifest": (
        lambda p: (p / "manifest.parquet").write_bytes(b"not parquet at all" * 10),
        r"manifest.parquet: not a readable Parquet table",
    ),
    "manifest column dropped": (
        lambda p: (
            pd.read_parquet(p / "manifest.parquet")
            .drop(columns=["idx_eeg"])
            .to_parquet(p / "manifest.parquet", index=False)
        ),
        r"manifest.parquet: lacks columns \['idx_eeg'\]",
    ),
    "index past its array": (
        lambda p: _manifest_edit(p, "idx_text", 0, 10**6),
        r"manifest.parquet: column idx_text row 0: 1000000 is outside .*arrays/text.npy",
    ),
    "multi-label value 2": (
        lambda p: _poke(p / "targets" / "radiographic_findings.npy", 4, 2),
        r"radiographic_findings.npy: row 4 holds label 2, outside task radiographic_findings's labels: 0 or 1",
    ),
    "regression NaN": (
        lambda p: _poke(p / "targets" / "bone_age.npy", 2, np.nan),
        r"bone_age.npy: row 2 holds label nan, outside task bone_age's labels: finite numbers",
    ),
    "row count": (
        lambda p: _spec_edit(p, lambda s: s.update(n_samples=s["n_samples"] + 1)),
        r"manifest.parquet: 2200 rows, but spec.json says n_samples=2201",
    ),
    "pickled object array": (
        lambda p: np.save(p / "arrays" / "tabular.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True),
        r"arrays/tabular.npy: holds Python objects \(dtype object\)",
    ),
    "bytes after the data": (
        lambda p: _append(p / "arrays" / "eeg.npy", b"\0" * 64),
        r"arrays/eeg.npy: longer than its header says",
    ),
    "spec not an object": (
        lambda p: (p / "spec.json").write_text("[1, 2]"),
        r"spec.json is not a JSON object",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_corruption_is_named_by_open_and_by_check(corpus, capsys, case):
    corrupt, pattern = CASES[case]
    corrupt(corpus)
    with pytest.raises(CorpusFormatError, match=pattern):
        Corpus.open(corpus)
    code, err = _check(capsys, corpus)
    assert code == 1
    assert any(re.search(pattern, p) for p in check_corpus(corpus)), err


# ----------------------------------------------------------- what only the full scans can see
@pytest.mark.parametrize(
    "modality, row, value, pattern",
    [
        (
            "text",
            9,
            500,
            r"arrays/text.npy: row 9 holds token ids outside 0..127 \(the text vocabulary\) \(1 row",
        ),
        ("eeg", 3, np.inf, r"arrays/eeg.npy: row 3 holds NaN or infinite values \(1 row in all\)"),
    ],
)
def test_scans_name_the_array_and_row(corpus, capsys, modality, row, value, pattern):
    _poke(corpus / "arrays" / f"{modality}.npy", row, value)
    Corpus.open(corpus)  # the cheap checks read no input value: opening stays fast
    code, err = _check(capsys, corpus)
    assert code == 1
    assert re.search(pattern, err), err


def test_open_lists_several_problems_and_points_to_corpus_check(corpus):
    _poke(corpus / "targets" / "cell_type.npy", 1, 99)
    _poke(corpus / "targets" / "motor_imagery.npy", 2, -3)
    with pytest.raises(CorpusFormatError) as info:
        Corpus.open(corpus)
    text = str(info.value)
    assert "has 2 problems" in text and "cell_type.npy: row 1" in text and "motor_imagery.npy: row 2" in text
    assert f"multimed-fl corpus check {corpus}" in text


# ------------------------------------------------------------------------------- fingerprint
def test_fingerprint_follows_the_contents(smoke_corpus, corpus):
    base = Corpus.open(smoke_corpus).fingerprint
    assert len(base) == 64 and Corpus.open(corpus).fingerprint == base  # a copy is the same corpus
    _poke(corpus / "targets" / "cell_type.npy", 0, (int(np.load(corpus / "targets" / "cell_type.npy")[0]) + 1) % 10)
    relabelled = Corpus.open(corpus).fingerprint
    assert relabelled != base
    _poke(corpus / "arrays" / "tabular.npy", 0, 0.123)  # small arrays are hashed whole
    assert Corpus.open(corpus).fingerprint not in (base, relabelled)


def test_fingerprint_changes_with_the_manifest_and_the_spec(corpus):
    base = Corpus.open(corpus).fingerprint
    _manifest_edit(corpus, "origin_site", 0, "site_01")
    moved = Corpus.open(corpus).fingerprint
    _spec_edit(corpus, lambda s: s.update(name="renamed"))
    assert len({base, moved, Corpus.open(corpus).fingerprint}) == 3


# ------------------------------------------------------------------ temp folders of killed builds
KILLED_BUILD = """
import os, sys
from pathlib import Path
from federated.data.format import _build_dir_beside
tmp = _build_dir_beside(Path(sys.argv[1]))
(tmp / "arrays").mkdir()
(tmp / "arrays" / "half.npy").write_bytes(b"x" * 1000)
print(tmp, flush=True)
os._exit(9)  # dies as a killed process does: no cleanup runs
"""


def test_the_next_build_removes_a_killed_builds_folder_only(tmp_path, tiny_frames):
    target = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(target)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    dead = Path(done.stdout.strip())
    assert dead.is_dir() and dead.name.startswith(".corpus.tmp-")
    live = target.with_name(f"{dead.name.rsplit('-', 2)[0]}-{os.getpid()}-0000")  # this process: running
    live.mkdir()
    foreign = [tmp_path / ".corpus.tmp-0123456789ab", tmp_path / f".corpus.tmp-ffffffff-{dead.name.split('-')[-2]}-1"]
    for folder in foreign:  # an old-style name, another host's build: their owners cannot be checked here
        folder.mkdir()
    user = tmp_path / ".corpus.notes"
    user.write_text("mine")
    manifest, arrays, targets = tiny_frames()
    write_corpus(target, manifest, arrays, targets, name="tiny", provenance={}, schema=MULTIMED)
    assert not dead.exists()
    assert live.is_dir() and all(f.is_dir() for f in foreign) and user.read_text() == "mine"
    assert Corpus.open(target).spec["n_samples"] == 2


def test_the_cache_removes_killed_builds_of_any_synthetic_corpus(tmp_path):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(corpora / "synthetic-0000")], capture_output=True, text=True
    )
    dead = Path(done.stdout.strip())
    assert dead.is_dir()
    assert remove_stale_builds(corpora / "synthetic-1111", any_name=True) == [dead]
    assert not dead.exists()
