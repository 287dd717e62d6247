"""The import-linter contract that keeps Flower's internals behind the door
(import_contracts/flower_internals.py, configured in pyproject.toml): the project keeps it, and
a planted import of a Flower internal outside the door breaks it, through `lint-imports` itself."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = "Flower's internals only through the door (federated/core/flower_door)"


@pytest.fixture
def contract_module():
    """import_contracts/flower_internals.py, loaded by path (lint-imports imports it by name from
    the repository root; it is not an installed package)."""
    spec = importlib.util.spec_from_file_location("flower_internals", ROOT / "import_contracts/flower_internals.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configured() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["name"] == CONTRACT]
    return {"config": config, "contract": contract}


def _modules(root: Path, packages: list[str]) -> set[str]:
    out = set()
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_project_keeps_flower_s_internals_behind_the_door(contract_module) -> None:
    configured = _configured()
    assert configured["config"]["contract_types"] == [
        "forbidden_external: import_contracts.flower_internals.ForbiddenExternalSubpackages"
    ]
    options = {k: v for k, v in configured["contract"].items() if k not in ("name", "type")}
    assert set(options["forbidden_modules"]) >= {"flwr.supercore", "flwr.superlink", "flwr.supernode", "flwr.proto"}
    contract = contract_module.ForbiddenExternalSubpackages(CONTRACT, {}, options)
    graph = SimpleNamespace(modules=_modules(ROOT, configured["config"]["root_packages"]))
    assert "federated.core.flower_door.runtime" in graph.modules
    check = contract.check(graph, verbose=False)
    assert check.metadata["violations"] == [] and check.metadata["unread"] == []
    assert check.kept


PLANTED = {
    "planted/__init__.py": "",
    "planted/door/__init__.py": "from .inside import run\n",
    "planted/door/inside.py": "from flwr.supercore.run import Run\n\ndef run():\n    return Run\n",
    "planted/fine.py": "from flwr.app import Message\nfrom flwr.serverapp.grid import Grid\nfrom planted import door\n",
    "planted/lazy.py": "def f():\n    from flwr.superlink.grid import http_grid\n    return http_grid\n",
    "planted/by_name.py": "import importlib\n\nPROTO = importlib.import_module('flwr.proto.node_pb2')\n",
    "planted/typed.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import flwr.supernode.cli\n",
    "planted/server_superlink.py": "from flwr.server.superlink import linkstate\n",
}
PLANTED_CONFIG = """
[tool.importlinter]
root_packages = ["planted"]
contract_types = ["forbidden_external: import_contracts.flower_internals.ForbiddenExternalSubpackages"]

[[tool.importlinter.contracts]]
name = "door"
type = "forbidden_external"
forbidden_modules = ["flwr.supercore", "flwr.superlink", "flwr.supernode", "flwr.proto", "flwr.server.superlink"]
allowed_modules = ["planted.door"]
"""


def test_lint_imports_fails_on_an_internal_imported_outside_the_door(tmp_path: Path) -> None:
    for name, text in PLANTED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(PLANTED_CONFIG))
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([lint, "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "door BROKEN" in text
    for line in (
        "planted.lazy:2 imports flwr.superlink.grid.http_grid",
        "planted.by_name:3 imports flwr.proto.node_pb2",
        "planted.typed:4 imports flwr.supernode.cli",
        "planted.server_superlink:1 imports flwr.server.superlink.linkstate",
    ):
        assert line in text, text
    assert "planted.door" not in text.split("door BROKEN")[1].split("Only")[0]  # the door may
    assert "planted.fine" not in text  # public flwr and the door itself are fine
