"""Atomic writers: outputs get the permissions an ordinary open() gives (the group can read
results on a shared server when the umask allows it), never mkstemp's 0600, and a failed write
leaves the old file and no temporary behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from federated.core.io import HOST_TAG, atomic_write, atomic_write_text, temp_dir_beside, write_json


@pytest.fixture(params=[0o022, 0o027, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under each of a few common umasks, restoring the caller's afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_what_open_would_give(tmp_path: Path, umask: int) -> None:
    ordinary = tmp_path / "ordinary.txt"
    with open(ordinary, "w") as fh:
        fh.write("x")
    atomic_write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "summary.json", {"score": 1.0})
    atomic_write(tmp_path / "nested" / "b.bin", lambda tmp: tmp.write_bytes(b"\0"))
    expected = 0o666 & ~umask
    assert _mode(ordinary) == expected
    for path in (tmp_path / "a.txt", tmp_path / "summary.json", tmp_path / "nested" / "b.bin"):
        assert _mode(path) == expected, (path.name, oct(_mode(path)))


def test_group_can_read_results_under_the_usual_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "summary.json", {"score": 1.0})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "summary.json") & stat.S_IRGRP


def test_replacing_keeps_ordinary_permissions_and_content(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "results.csv"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and _mode(path) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_temporaries_are_unique_hidden_names_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []

    def record(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    for _ in range(3):
        atomic_write(tmp_path / "x.txt", record)
    assert len(set(seen)) == 3
    prefix = f".multimed-fl-tmp-{HOST_TAG}-{os.getpid()}-"  # a name no user picks, naming its writer
    assert all(p.parent == tmp_path and p.name.startswith(prefix) and p.name.endswith("-x.txt") for p in seen)


def test_temp_dir_beside_is_an_ordinary_folder(tmp_path: Path, umask: int) -> None:
    first, second = temp_dir_beside(tmp_path / "corpus"), temp_dir_beside(tmp_path / "corpus")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(".multimed-fl-tmp-") and first.name.endswith("-corpus") and not any(first.iterdir())
    assert _mode(first) == 0o777 & ~umask


def test_a_written_corpus_is_as_readable_as_any_folder(smoke_corpus: Path) -> None:
    """write_corpus renames its temporary folder into place: it must not stay 0700."""
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(Path(smoke_corpus)) == 0o777 & ~umask
    assert _mode(Path(smoke_corpus) / "spec.json") == 0o666 & ~umask
