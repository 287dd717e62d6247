"""Issue 28, finding 4: compressed bombs. A 2.9 MB checkpoint.npz holding a 1 GiB deflated
member, and a 1 MB model.init_weights npz, were decompressed whole before anything was checked
(1.55 GB and 1.87 GB peak). Now every member's declared size and .npy header are checked from the
zip directory before any data is decompressed; a refused bomb costs no more memory than a
normal refusal (measured in child processes: the slow tests below).

The bombs are built here byte by byte (a zip writer of a few lines), so their declared sizes
can also lie.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import site_state
from federated.core.models.init_weights import WeightsFileError, load_init_weights, read_weights
from federated.core.npz import NpzError, SafeNpz
from federated.core.statefile import StateFileError, read_state_file, write_state_file
from federated.server.checkpoint import CHECKPOINT_FILE, FORMAT_VERSION, KIND, CheckpointError, load_checkpoint

GIB = 1 << 30
MIB = 1 << 20

# ------------------------------------------------------------------ a raw zip writer ----


@dataclass(frozen=True)
class Entry:
    """One member as the zip directory declares it (which may lie about the data that follows)."""

    name: str
    method: int
    crc: int
    data: bytes  # what follows the local header (compressed or stored bytes)
    declared: int  # the uncompressed size the directory declares
    compressed: int | None = None  # the compressed size it declares (default: len(data))


def _local(e: Entry) -> bytes:
    name = e.name.encode()
    size = len(e.data) if e.compressed is None else e.compressed
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, e.method, 0, 0x21, e.crc, size, e.declared, len(name), 0) + name
    )


def _central(e: Entry, offset: int) -> bytes:
    name = e.name.encode()
    size = len(e.data) if e.compressed is None else e.compressed
    version, flags, time, date = 20, 0, 0, 0x21  # 1980-01-01
    head = (0x02014B50, version, version, flags, e.method, time, date, e.crc, size, e.declared, len(name))
    fixed = struct.pack("<IHHHHHHIIIHHHHHII", *head, 0, 0, 0, 0, 0, offset)
    return fixed + name


def write_zip(path: Path, entries: list[Entry]) -> Path:
    body, offsets = b"", []
    for e in entries:
        offsets.append(len(body))
        body += _local(e) + e.data
    directory = b"".join(_central(e, off) for e, off in zip(entries, offsets, strict=True))
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    path.write_bytes(body + directory + end)
    return path


def stored_entries(path: Path) -> list[Entry]:
    """The members of a genuine (stored) zip, as Entries to rebuild it with."""
    with zipfile.ZipFile(path) as z:
        return [Entry(i.filename, zipfile.ZIP_STORED, i.CRC, z.read(i), i.file_size) for i in z.infolist()]


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Bomb:
    """A deflate stream of an .npy of 2**28 float32 zeros (1 GiB) and its true sizes."""

    data: bytes
    crc: int
    declared: int


def _zero_stream(prefix: bytes, mib: int) -> tuple[bytes, int]:
    """Deflate of prefix + `mib` MiB of zeros, and its CRC-32. Each MiB is one full-flushed block
    (the compressor starts afresh after it), so one block's bytes stand for every MiB."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(prefix) + c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == block  # the same bytes, block after block
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return first + block * (mib - 1) + c.flush(), crc


@pytest.fixture(scope="module")
def bomb() -> Bomb:
    header = npy_header((GIB // 4,))
    data, crc = _zero_stream(header, GIB // MIB)
    return Bomb(data, crc, len(header) + GIB)


def _checkpoint_bomb(folder: Path, bomb: Bomb) -> Path:
    """A genuine checkpoint (a 2 MB weight and a small one), its small weight's member replaced
    by the 1 GiB deflated bomb: the probe's 2.9 MB file."""
    rng = np.random.default_rng(0)
    path = write_state_file(
        folder / CHECKPOINT_FILE,
        KIND,
        FORMAT_VERSION,
        {"arrays": {"w": rng.standard_normal(500_000).astype(np.float32), "b": np.zeros(3, np.float32)}},
    )
    entries = stored_entries(path)
    small = min((e for e in entries if e.name.startswith("a")), key=lambda e: e.declared)
    bombed = Entry(small.name, zipfile.ZIP_DEFLATED, bomb.crc, bomb.data, bomb.declared)
    return write_zip(path, [bombed if e is small else e for e in entries])


def _init_weights_bomb(path: Path, bomb: Bomb) -> Path:
    """A 1 MB npz whose one member, named like the toy model's first weight, inflates to 1 GiB."""
    return write_zip(path, [Entry("0.weight.npy", zipfile.ZIP_DEFLATED, bomb.crc, bomb.data, bomb.declared)])


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


# ------------------------------------------------- refused before decompressing (fast) ----


def test_the_checkpoint_bomb_is_the_probes_and_is_refused_by_name(tmp_path, bomb):
    path = _checkpoint_bomb(tmp_path, bomb)
    assert 2.5e6 < path.stat().st_size < 3.5e6  # ~3 MB on disk ...
    with zipfile.ZipFile(path) as z:  # ... declaring over 1 GiB
        assert sum(i.file_size for i in z.infolist()) > GIB
    with pytest.raises(
        CheckpointError,
        match=rf"{path} is not a MultiMed-FL checkpoint: unreadable \(member 'a\d\.npy' is deflate; "
        r"only stored \(uncompressed\) members are read: it is not decompressed\)",
    ):
        load_checkpoint(tmp_path)


def test_stored_members_that_overlap_cannot_declare_more_than_the_file(tmp_path):
    """Stored members whose data regions overlap (each 'contains' the next local headers and one
    shared 2 MB blob) declare 200 x the file's size without any compression."""
    blob = np.random.default_rng(1).bytes(2 * MIB)
    names = [f"a{i}.npy" for i in range(200)]
    headers = [_local(Entry(n, zipfile.ZIP_STORED, 0, b"", 0)) for n in names]
    body = b"".join(headers) + blob
    entries, offset = [], 0
    for n, h in zip(names, headers, strict=True):
        rest = len(body) - offset - len(h)
        entries.append((Entry(n, zipfile.ZIP_STORED, 0, b"", rest, rest), offset))
        offset += len(h)
    directory = b"".join(_central(e, off) for e, off in entries)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    path = tmp_path / "state.npz"
    path.write_bytes(body + directory + end)
    with pytest.raises(
        StateFileError, match=r"members declare .* more than the .* this reader allows for a 2\.\d MiB file"
    ):
        read_state_file(path, "checkpoint", FORMAT_VERSION)


def test_a_site_state_bomb_is_refused(tmp_path, bomb):
    path = site_state.state_file(tmp_path, "site_a", 2)
    path.parent.mkdir(parents=True)
    write_zip(path, [Entry("meta.npy", zipfile.ZIP_DEFLATED, bomb.crc, bomb.data, bomb.declared)])
    with pytest.raises(site_state.SiteStateError, match=r"site site_a: .* 'meta\.npy' is deflate; .* not decompressed"):
        site_state.load(path, "site_a", 2)


def test_the_init_weights_bomb_is_refused_with_or_without_the_model(tmp_path, bomb):
    path = _init_weights_bomb(tmp_path / "w.npz", bomb)
    assert path.stat().st_size < 1.1e6  # the probe's 1 MB file
    with pytest.raises(
        WeightsFileError,
        match=r"model.init_weights: .*w\.npz: unreadable or corrupt \.npz \(its members declare 1\.0 GiB or more "
        r".* refused before decompressing anything",
    ):
        read_weights(path)  # the preflight: no model, a bound from the file's size (16 x + 64 MiB)
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # with the model: the member's header says (268435456,), the model's 0.weight is (3, 4): it is
    # reported as a mismatch from its header, never decompressed, and nothing else matches
    with pytest.raises(WeightsFileError, match=r"no tensor matches .*shape mismatches: 0\.weight"):
        load_init_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_torch_checkpoint_bomb_is_refused_before_torch_reads_it(tmp_path, bomb):
    path = tmp_path / "w.pt"
    torch.save(toy_model().state_dict(), path)
    entries = stored_entries(path)
    data = next(e for e in entries if "/data/" in e.name)
    bombed = Entry(data.name, zipfile.ZIP_DEFLATED, bomb.crc, bomb.data, bomb.declared)
    write_zip(path, [bombed if e is data else e for e in entries])
    with pytest.raises(WeightsFileError, match=r"corrupt torch file \(its members declare 1\.0 GiB or more"):
        read_weights(path)


def test_a_declared_size_that_lies_is_refused(tmp_path, bomb):
    """The directory says 144 bytes (the header of 4 floats) while the data inflates to 1 GiB."""
    header = npy_header((4,))
    lie = Entry("0.weight.npy", zipfile.ZIP_DEFLATED, zlib.crc32(header + bytes(16)), bomb.data, len(header) + 16)
    path = write_zip(tmp_path / "w.npz", [lie])
    with pytest.raises(
        WeightsFileError,
        match=r"'0\.weight\.npy' has 1\.0 MiB of compressed data for a declared 144 bytes: "
        r"its declared size is false",
    ):
        load_init_weights(toy_model(), path)
    stored_lie = Entry("a0.npy", zipfile.ZIP_STORED, 0, bytes(64), 3 * GIB, 64)
    path = write_zip(tmp_path / "s.npz", [stored_lie])
    with pytest.raises(NpzError, match=r"stored uncompressed in 64 bytes but declares 3221225472"):
        SafeNpz(path, max_bytes=1 << 50)


def test_a_lie_too_small_to_see_still_yields_only_the_declared_bytes(tmp_path):
    """A stream of 4 floats then 64 KiB more zeros (120 compressed bytes) passes the directory
    check; streaming with a limit reads the 16 declared bytes and nothing more."""
    header = npy_header((4,))
    data, _ = _zero_stream(header + np.arange(4, dtype="<f4").tobytes(), 0)
    small = header + np.arange(4, dtype="<f4").tobytes()
    path = write_zip(tmp_path / "w.npz", [Entry("x.npy", zipfile.ZIP_DEFLATED, zlib.crc32(small), data, len(small))])
    with SafeNpz(path, max_bytes=1024) as z:
        assert z.read("x").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_header_that_disagrees_with_the_declared_size_is_refused_unread(tmp_path):
    """Header: 2**28 floats; directory: a 144-byte member. Nothing is allocated for the header's claim."""
    header = npy_header((GIB // 4,))
    body = header + bytes(16)
    path = write_zip(tmp_path / "w.npz", [Entry("x.npy", zipfile.ZIP_STORED, zlib.crc32(body), body, len(body))])
    with (
        SafeNpz(path, max_bytes=4096) as z,
        pytest.raises(
            NpzError, match=r"describes float32 \(268435456,\) \(1\.0 GiB of data\) but the zip declares 144 bytes"
        ),
    ):
        z.member("x")


def test_object_arrays_and_other_compressions_are_refused_unread(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([1, {"a": 1}], dtype=object), allow_pickle=True)
    obj = buf.getvalue()
    path = write_zip(tmp_path / "o.npz", [Entry("a0.npy", zipfile.ZIP_STORED, zlib.crc32(obj), obj, len(obj))])
    with SafeNpz(path, max_bytes=4096) as z, pytest.raises(NpzError, match=r"holds Python objects \(dtype object\)"):
        z.member("a0")
    for method, name in ((zipfile.ZIP_BZIP2, "12"), (zipfile.ZIP_LZMA, "14")):
        path = tmp_path / f"m{name}.npz"
        with zipfile.ZipFile(path, "w", compression=method) as z:
            z.writestr("a0.npy", npy(np.zeros(3)))
        with pytest.raises(NpzError, match=rf"'a0\.npy' is compression method {name}; only stored or deflate"):
            SafeNpz(path, max_bytes=1 << 20)


def test_savez_compressed_weights_still_load(tmp_path):
    """The checks refuse lies and bombs, not compression: np.savez_compressed's file loads."""
    model, source = toy_model(), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    path = tmp_path / "w.npz"
    np.savez_compressed(path, **{k: v.detach().numpy() for k, v in source.state_dict().items()})
    report = load_init_weights(model, path)
    assert not report.kept_fresh
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.savez_compressed(path, f=fortran)
    with SafeNpz(path, max_bytes=1 << 20) as z:
        assert np.array_equal(z.read("f"), fortran)


# ------------------------------------------------------ peak memory, in child processes ----

_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    what, path = sys.argv[1], Path(sys.argv[2])
    try:
        if what == "checkpoint":
            from federated.server.checkpoint import load_checkpoint
            load_checkpoint(path.parent)
        elif what == "site_state":
            from clients.site_state import load
            load(path, "site_a", 2)
        elif what == "read_weights":
            from federated.core.models.init_weights import read_weights
            read_weights(path)
        else:
            import torch
            from federated.core.models.init_weights import load_init_weights
            torch.manual_seed(0)
            load_init_weights(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), path)
        print("loaded")
    except Exception as e:  # the refusal (each reader has its own error type)
        print(e)
    """
)

# ru_maxrss survives fork and exec: a child forked from this (large) pytest process reports at
# least this process's size. So a small launcher starts the child and reports its children's
# ru_maxrss, which is the child's own.
_LAUNCH = textwrap.dedent(
    """
    import json, resource, subprocess, sys
    done = subprocess.run([sys.executable, "-c", *sys.argv[1:]], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = {"rc": done.returncode, "out": done.stdout.strip(), "err": done.stderr[-3000:], "maxrss_kib": peak}
    print(json.dumps(result))
    """
)


def _child(what: str, path: Path) -> dict:
    """Peak memory (ru_maxrss) of a fresh process that only tries to load `path`."""
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH, _CHILD, what, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["err"]
    return {"outcome": result["out"], "maxrss_kib": result["maxrss_kib"]}


def _wrong_state(path: Path, kind: str) -> Path:
    """The normal refusal: a genuine small state file with one weight changed (not authenticated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_state_file(path, kind, FORMAT_VERSION if kind == KIND else site_state.FORMAT_VERSION, {"w": rng.random(8)})
    entries = stored_entries(path)
    w = next(e for e in entries if e.name == "a0.npy")
    changed = npy(np.zeros(8))
    return write_zip(
        path,
        [
            Entry(w.name, zipfile.ZIP_STORED, zlib.crc32(changed), changed, len(changed)) if e is w else e
            for e in entries
        ],
    )


@pytest.mark.slow
def test_the_bombs_are_live(tmp_path, bomb):
    """The control: the member really inflates to 1 GiB with a valid CRC (zipfile checks it at the end)."""
    path = _init_weights_bomb(tmp_path / "w.npz", bomb)
    total = 0
    with zipfile.ZipFile(path) as z, z.open("0.weight.npy") as f:
        while chunk := f.read(64 * MIB):
            total += len(chunk)
    assert total == bomb.declared > GIB


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "site_state", "read_weights", "load_init_weights"])
def test_a_refused_bomb_peaks_within_1_2x_a_normal_refusal(tmp_path, bomb, what):
    if what in ("checkpoint", "site_state"):
        bombed = _checkpoint_bomb(tmp_path / "bomb", bomb) if what == "checkpoint" else tmp_path / "bomb" / "s.npz"
        if what == "site_state":
            bombed.parent.mkdir()
            write_zip(bombed, [Entry("meta.npy", zipfile.ZIP_DEFLATED, bomb.crc, bomb.data, bomb.declared)])
        normal = _wrong_state(
            tmp_path / "normal" / (CHECKPOINT_FILE if what == "checkpoint" else "s.npz"),
            KIND if what == "checkpoint" else site_state.KIND,
        )
        expected = "not authenticated by this user's key"
    else:
        bombed = _init_weights_bomb(tmp_path / "bomb.npz", bomb)
        weight = np.ones((3, 4), dtype=np.float32)
        weight[0, 0] = np.nan
        normal = tmp_path / "normal.npz"
        np.savez(normal, **{"0.weight": weight})
        expected = "non-finite values"
    base, refused = _child(what, normal), _child(what, bombed)
    assert expected in base["outcome"]
    assert any(why in refused["outcome"] for why in ("not decompressed", "before decompressing", "no tensor matches"))
    print(f"{what}: normal refusal {base['maxrss_kib'] / 1024:.0f} MiB, bomb {refused['maxrss_kib'] / 1024:.0f} MiB")
    assert refused["maxrss_kib"] <= 1.2 * base["maxrss_kib"]
