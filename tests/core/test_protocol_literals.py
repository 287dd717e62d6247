"""No protocol key is spelled as a string literal outside federated/core/protocol.py.

A key the server and a site both spell can drift apart with nothing to notice it but a site that
silently reads a default. So every key that travels (a record's name, a key of a message's config or
metrics record, a run-config or node-config key, a handshake profile's key) is a constant of
protocol.py, and this scan fails where one is spelled again: a string constant used as a key (a
subscript, a dict display's key, the first argument of get/pop/setdefault, the left side of `in`)
whose value is a protocol.py constant's.

Many protocol values are also words other formats use ("site", "n_train", "origin_site" are also
fields of summary.json, of a corpus's manifest and of the reports). Such a value is flagged only in
a module that speaks the protocol (it imports a key, record or helper of federated.core.protocol, or
Flower's message API; Role alone is a site's role in outputs too); a
hyphenated one ("server-round", "partition-id", "out-dir"), which no other format uses, is flagged
everywhere. What remains legitimate is named below, each with the reason.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import federated.core.protocol as protocol

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("federated", "clients", "strategies", "partitions")
PROTOCOL_MODULE = "federated/core/protocol.py"
SHARED = re.compile(r"[a-z0-9_]+")  # a value other formats use too: flagged only where the protocol is spoken
KEY_METHODS = {"get", "pop", "setdefault"}
PROTOCOL = "federated.core.protocol"
SPEAKS = (PROTOCOL, "flwr.app", "flwr.common", "flwr.clientapp", "flwr.serverapp")

# Modules that speak the protocol but whose literals equal to a protocol value are the fields of
# a file they write or read (an output contract, DESIGN.md "Contracts", or a state file), not keys
# of a message.
OUTPUT_MODULES = {
    "federated/server/outputs.py": "the run report, from summary.json (tasks, metrics)",
    "federated/server/profile_report.py": "stats.json and report.md of `multimed-fl stats` (site, role, privacy)",
    "federated/server/run_folder.py": "the run folder's manifest (version)",
    "federated/app/stats.py": "stats.json's fields, printed by `multimed-fl stats` (site, privacy)",
    "clients/site_state.py": "a site's state file (site, round)",
    "clients/dp_sgd.py": "the site's privacy report (tasks, steps): summary.json's privacy, sent whole",
    "strategies/site_dp.py": "the site-level DP privacy report (steps): summary.json's privacy",
}

# One (module, value) where a shared word is not a protocol key, though the module speaks it. The
# statistics queries' and the profile's JSON bodies are a payload format (the value of one protocol
# key, FEATURE_MOMENTS, FEATURE_HISTOGRAM, PROFILE_REPLY), built on one side and read on the other.
NOT_PROTOCOL_KEYS = {
    ("federated/core/arrays.py", "arrays"): "the packed-arrays header's field (a byte format)",
    ("federated/server/feature_round.py", "site"): "the server's own note of which site sent a reply",
    ("federated/server/feature_round.py", "modalities"): "the query's JSON body, and a checkpoint's field",
    ("clients/site_runtime.py", "modalities"): "the feature statistics query's JSON body",
    ("clients/site_profile.py", "tasks"): "the profile reply's JSON body",
    ("clients/site_profile.py", "modalities"): "the profile reply's JSON body",
    ("federated/server/profile.py", "tasks"): "the profile reply's JSON body",
    ("federated/server/profile.py", "modalities"): "the profile reply's JSON body",
}


def protocol_values() -> dict[str, str]:
    """Each string value of a protocol.py constant, with the constants' names."""
    names: dict[str, list[str]] = {}
    for name, value in vars(protocol).items():
        if name.isupper() and isinstance(value, str) and value:
            names.setdefault(value, []).append(f"protocol.{name}")
    return {value: " or ".join(n) for value, n in names.items()}


def _speaks_protocol(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith(SPEAKS)
            and (node.module != PROTOCOL or any(a.name != "Role" for a in node.names))
        ):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith(SPEAKS) for a in node.names):
            return True
    return False


def _keys(tree: ast.Module) -> Iterator[ast.expr]:
    """Every expression used as a key: subscripts, dict keys, get/pop/setdefault, `in`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            yield node.slice
        elif isinstance(node, ast.Dict):
            yield from (k for k in node.keys if k is not None)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in KEY_METHODS:
                yield node.args[0]
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn):
            yield node.left


def literal_keys(source: str, values: dict[str, str], module: str) -> list[str]:
    """'module:line: "value" (protocol.NAME)' for each protocol value spelled as a key in `source`."""
    tree = ast.parse(source)
    speaks = _speaks_protocol(tree)
    found = []
    for key in _keys(tree):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in values):
            continue
        if SHARED.fullmatch(key.value) and not speaks:
            continue
        if (module, key.value) in NOT_PROTOCOL_KEYS:
            continue
        found.append(f"{module}:{key.lineno}: {key.value!r} ({values[key.value]})")
    return found


def scanned_modules() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py"))


def test_no_protocol_key_is_spelled_as_a_literal() -> None:
    values = protocol_values()
    found = []
    for path in scanned_modules():
        module = path.relative_to(ROOT).as_posix()
        if module == PROTOCOL_MODULE or module in OUTPUT_MODULES:
            continue
        found += literal_keys(path.read_text(), values, module)
    assert not found, "protocol keys spelled as literals (use the protocol.py constant):\n" + "\n".join(found)


def test_every_allowed_module_exists() -> None:
    """An allow-list entry for a module that moved or went away would hide nothing: drop it."""
    gone = [m for m in {*OUTPUT_MODULES, *(m for m, _ in NOT_PROTOCOL_KEYS)} if not (ROOT / m).is_file()]
    assert not gone


def test_the_run_config_the_app_declares_is_the_protocols() -> None:
    """pyproject's [tool.flwr.app.config] (what `flwr run` sends when no --run-config overrides
    it) spells the run-config keys once more, in TOML: each must be a protocol.py constant."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) - set(protocol_values()) == set()


VALUES = {"partition-id": "PARTITION_ID_KEY", "site": "SITE_KEY"}


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ('node_config["partition-id"]', True),  # a subscript
        ('{"partition-id": 0}', True),  # a dict display's key
        ('run_config.get("partition-id", 0)', True),
        ('"partition-id" in node_config', True),
        ('"site" in node_config', False),  # a plain word, in a module that does not speak the protocol
        ('import federated.core.protocol\n"site" in node_config', True),  # ... and in one that does
        ('print("partition-id")', False),  # not a key: a message may name it
        ("node_config[PARTITION_ID_KEY]", False),
    ],
)
def test_the_scan_flags_keys_only(source: str, flagged: bool) -> None:
    assert bool(literal_keys(source, VALUES, "m.py")) is flagged
