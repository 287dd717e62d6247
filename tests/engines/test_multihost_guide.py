"""The multi-host guide (docs/tutorials/three-hospitals.md), run as written (slow): its bash
block, block by block, on one machine playing the coordinator and three hospitals.

Each `# [coordinator]` / `# [hospital]` block runs in its own bash (`-euo pipefail`) on the
machine it names; only its first line, the values marked `# your values`, is replaced (paths
under tmp_path, free ports). What a person carries between machines is done here by copying:
the CA certificate to each hospital, each hospital's node_key.pub to the coordinator's keys/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from federated.core.config import config_from_yaml
from federated.engines.deployment import flower_env, free_port
from federated.engines.deployment.environment import _port_open
from tests.app.test_bring_your_own import HOSPITALS, SEPSIS_DICTIONARY, TABULAR_SOURCE, clinical_csv, write_spec

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "three-hospitals.md"
MARKER = "<!-- multihost-guide:"
SITES = {"site_01": HOSPITALS[0], "site_02": HOSPITALS[1], "site_03": HOSPITALS[2]}


def guide_blocks(guide: Path = GUIDE) -> list[tuple[str, str]]:
    """(role, script) of every block of the multi-host guide, in order."""
    text = guide.read_text()
    start = text.index(MARKER)
    body = text[text.index("```bash\n", start) + len("```bash\n") :]
    body = body[: body.index("```\n")]
    blocks: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        role = re.match(r"# \[(coordinator|hospital)\]", line)
        if role:
            blocks.append((role.group(1), []))
        assert blocks, f"the guide must start with a role header, not {line!r}"
        blocks[-1][1].append(line)
    return [(role, "\n".join(lines) + "\n") for role, lines in blocks]


def with_values(script: str, values: dict[str, str]) -> str:
    """The block with its `# your values` line's assignments set to `values` (every one it has)."""
    lines = script.splitlines()
    (i,) = [k for k, line in enumerate(lines) if line.rstrip().endswith("# your values")]
    names = [a.split("=", 1)[0] for a in lines[i].split("#", 1)[0].split()]
    assert set(names) <= set(values), f"the guide sets {names}; the test knows {sorted(values)}"
    lines[i] = " ".join(f"{n}={shlex.quote(values[n])}" for n in names)
    return "\n".join(lines) + "\n"


def test_the_guide_has_the_blocks_in_the_order_that_works() -> None:
    roles = [role for role, _ in guide_blocks()]
    assert roles == ["coordinator", "hospital", "coordinator", "hospital", "coordinator"]
    for _, script in guide_blocks():
        assert script.count("# your values") == 1


def _hospital_files(folder: Path, hospital: str, table: pd.DataFrame) -> None:
    """A hospital's own files: its rows of the sepsis table, the coordinator's data dictionary and
    ingest spec (no site column): without the dictionary each hospital would pick its own
    reference levels and the handshake would refuse it."""
    folder.mkdir(parents=True)
    write_spec(folder / "sepsis_dictionary.yaml", SEPSIS_DICTIONARY)
    table[table["hospital"] == hospital].drop(columns="hospital").to_csv(folder / "icu.csv", index=False)
    source = {k: v for k, v in TABULAR_SOURCE.items() if k != "site_column"}
    source |= {"task": "sepsis", "label_column": "sepsis", "labels": {0: "no_sepsis", 1: "sepsis"}}
    write_spec(
        folder / "sepsis.yaml",
        {
            "name": "sepsis",
            "dictionary": "sepsis_dictionary.yaml",
            "test_fraction": 0.25,
            "modalities": {"clinical": {"kind": "vector", "features": 16}},
            "tasks": {"sepsis": {"inputs": ["clinical"], "target": "binary", "classes": ["no_sepsis", "sepsis"]}},
            "sources": [source],
        },
    )


def _ours(tag: str) -> list[int]:
    """Every process this test started, by the tag in its environment (Linux /proc; the guide's
    daemons outlive the bash that started them, so they are not anyone's children here)."""
    marker = f"MULTIMED_GUIDE_TEST={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _stop(tag: str) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _ours(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _ours(tag) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.slow
def test_the_readme_multihost_guide_runs_as_written(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    env = flower_env(tmp_path / "flwr_home") | {"MULTIMED_GUIDE_TEST": tag}
    coord = tmp_path / "coordinator"
    (coord / "keys").mkdir(parents=True)
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    table = pd.read_csv(clinical_csv(tmp_path / "all_hospitals.csv"))
    hospitals = {site: tmp_path / site for site in SITES}
    for site, folder in hospitals.items():
        _hospital_files(folder, SITES[site], table)
    appio = {site: str(free_port()) for site in SITES}

    def run(role: str, script: str, cwd: Path, values: dict[str, str], name: str) -> None:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", with_values(script, values)],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
        assert done.returncode == 0, (
            f"the guide's {role} block failed at {name} (exit {done.returncode}):\n" + (log.read_text()[-4000:])
        )

    blocks = guide_blocks()
    coord_values = {"COORD": str(coord), "SUPERLINK": superlink}
    try:
        run(*blocks[0], coord, coord_values, "coordinator_1")
        for site, folder in hospitals.items():  # the coordinator sends its CA certificate
            (folder / "ca.crt").write_bytes((coord / "pki" / "ca.crt").read_bytes())
            run(*blocks[1], folder, {"SITE": site, "HOSPITAL": str(folder)}, f"{site}_1")
            (coord / "keys" / f"{site}.pub").write_bytes((folder / "node_key.pub").read_bytes())
        deadline = time.monotonic() + 120
        while not _port_open("127.0.0.1", port):  # the coordinator's service is up
            assert time.monotonic() < deadline, (coord / "superlink.log").read_text()[-3000:]
            time.sleep(0.5)
        run(*blocks[2], coord, coord_values, "coordinator_2")
        for site, folder in hospitals.items():
            values = {"SITE": site, "HOSPITAL": str(folder), "SUPERLINK": superlink, "APPIO": appio[site]}
            run(*blocks[3], folder, values, f"{site}_2")
        run(*blocks[4], coord, coord_values, "coordinator_3")
    finally:
        _stop(tag)
    assert _ours(tag) == []

    out = coord / "runs" / "exp1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == config_from_yaml((out / "config.yaml").read_text()).rounds
    roles = {row["site"]: row["role"] for row in summary["per_site"]}
    assert roles == {"site_01": "train", "site_02": "train", "site_03": "held_out"}
    assert summary["failures"] == {} and summary["final"]["ood"]["score"] is not None
    for site, folder in hospitals.items():  # each hospital's corpus holds its own rows only
        manifest = pd.read_parquet(folder / "corpus" / "manifest.parquet")
        assert len(manifest) == (table["hospital"] == SITES[site]).sum()
        assert list((folder / "state" / site).glob("round_*.npz")), f"{site} kept no state"
