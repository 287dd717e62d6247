"""Installs without a clone: the wheel carries conf/, the study definitions and the benchmark
scripts, lists every package, and declares every library the code imports; a wheel installed in
a fresh venv runs an experiment, a quick study and benchmarks from a folder outside the checkout."""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Mapping
from importlib.metadata import packages_distributions
from pathlib import Path

import pandas as pd
import pytest

import federated
from federated.app.bench import bench_dir
from federated.app.studies.spec import STUDY_DIR_ENV, available, study_dir
from federated.core import resources
from federated.core.config.merge import conf_dir, load_config
from federated.core.resources import SHIPPED, shipped_dir

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CODE_PACKAGES = ("federated", "clients", "strategies", "partitions")
# First-party packages at the repository root that the wheel does not carry: the tooling CI runs
# from a checkout (import_contracts: lint-imports' contract types). Found, not listed, so a new one
# is checked too.
REPO_PACKAGES = tuple(sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in CODE_PACKAGES))
SELF = "multimed-fl"
EDITABLE_FROM_HERE = Path(federated.__file__).resolve().parents[1] == ROOT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _norm(match.group(1))


def _core_dependencies() -> set[str]:
    return {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}


def _extra(name: str) -> set[str]:
    """The distributions an extra brings, following its `multimed-fl[...]` references."""
    out: set[str] = set()
    for requirement in PYPROJECT["project"]["optional-dependencies"][name]:
        nested = re.fullmatch(rf"\s*{SELF}\[(.+)\]\s*", requirement)
        if nested:
            for other in nested.group(1).split(","):
                out |= _extra(other.strip())
        else:
            out.add(_requirement_name(requirement))
    return out


# --- what the wheel holds ---------------------------------------------------------------------


def test_every_package_and_data_folder_is_listed_for_the_wheel() -> None:
    """pyproject lists packages by hand (data packages cannot be discovered): nothing missing."""
    setup = PYPROJECT["tool"]["setuptools"]
    code = {
        ".".join(init.relative_to(ROOT).parent.parts)
        for top in CODE_PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
    }
    data = set()
    for package, folder in setup["package-dir"].items():
        base = ROOT / folder
        data |= {
            ".".join((package, *d.relative_to(base).parts))
            for d in [base, *base.rglob("*")]
            if d.is_dir() and "__pycache__" not in d.parts
        }
    listed = setup["packages"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(code | data)


def test_the_data_packages_are_the_folders_resources_reads() -> None:
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapping == {f"federated.{name}": folder.as_posix() for name, folder in SHIPPED.items()}
    # what the readers need from each: YAML files (package data) and bench scripts (modules)
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["*"] == ["*.yaml"]
    assert list((ROOT / SHIPPED["_conf"]).glob("config.yaml"))
    assert list((ROOT / SHIPPED["_studies"]).glob("*.yaml"))
    assert list((ROOT / SHIPPED["_bench"]).glob("*.py"))


@pytest.mark.skipif(not EDITABLE_FROM_HERE, reason="federated is not imported from this checkout")
def test_an_editable_install_reads_the_checkouts_folders() -> None:
    assert conf_dir() == ROOT / "conf"
    assert study_dir() == ROOT / "experiments" / "studies"
    assert bench_dir() == ROOT / "experiments" / "bench"


def test_a_packaged_copy_wins_over_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_studies").mkdir()
    (tmp_path / "_studies" / "only_here.yaml").write_text("name: only_here\n")
    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    monkeypatch.delenv(STUDY_DIR_ENV, raising=False)
    assert shipped_dir("_studies") == tmp_path / "_studies"
    assert available() == ["only_here"]
    # a folder the package does not carry falls back to the checkout's
    assert shipped_dir("_bench") == resources.checkout_root() / "experiments" / "bench"


def test_an_unknown_data_folder_is_refused_by_name() -> None:
    with pytest.raises(KeyError, match="unknown data folder '_nope'; known: _bench, _conf, _studies"):
        shipped_dir("_nope")


def test_environment_overrides_still_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "config.yaml").write_text((conf / "config.yaml").read_text().replace("rounds: 20", "rounds: 7"))
    monkeypatch.setenv("MULTIMED_FL_CONF", str(conf))
    assert conf_dir() == conf and load_config().rounds == 7
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "mine.yaml").write_text("name: mine\n")
    monkeypatch.setenv(STUDY_DIR_ENV, str(studies))
    assert study_dir() == studies and available() == ["mine"]


# --- every imported library is declared --------------------------------------------------------


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names of absolute imports in a file: (at module level, anywhere)."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def names(nodes: list[ast.AST]) -> set[str]:
        out = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                out |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
        return out

    return names(list(tree.body)), names(list(ast.walk(tree)))


def _local_modules(shipped_only: bool = False) -> set[str]:
    """The project's packages, and the benchmark scripts (gpu.py imports its siblings by name);
    with the repository's own tooling packages unless `shipped_only` (what the wheel holds)."""
    local = set(CODE_PACKAGES) | {p.stem for p in (ROOT / SHIPPED["_bench"]).glob("*.py")} | {"__future__"}
    return local if shipped_only else local | set(REPO_PACKAGES)


def _third_party(names: set[str], shipped_only: bool = False) -> set[str]:
    local = _local_modules(shipped_only)
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


@functools.cache
def _providers() -> Mapping[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def _distributions(module: str) -> set[str]:
    found = _providers().get(module)
    assert found, f"{module!r} is imported but no installed distribution provides it"
    return {_norm(d) for d in found}


def _shipped_sources() -> list[Path]:
    folders = [ROOT / p for p in CODE_PACKAGES] + [ROOT / SHIPPED["_bench"]]
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def test_every_library_the_package_imports_is_declared() -> None:
    """Module-level imports need a core dependency; lazy ones (a format's reader, a benchmark's
    optional part) may come from an extra. Pillow was once used and undeclared."""
    core = _core_dependencies()
    any_extra = core.union(*(_extra(e) for e in PYPROJECT["project"]["optional-dependencies"]))
    missing = []
    for path in _shipped_sources():
        top, everywhere = _imports(path)
        assert not everywhere & set(REPO_PACKAGES), f"{path}: imports a package the wheel does not carry"
        for module in sorted(_third_party(everywhere, shipped_only=True)):
            allowed = core if module in top else any_extra
            if not _distributions(module) & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module} ({'core' if module in top else 'any extra'})")
    assert not missing, missing


def test_optional_imports_name_an_extra_that_brings_them() -> None:
    """`optional_import("anndata", "h5ad")` tells users to install that extra: it must bring it."""
    calls = []
    for path in _shipped_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import":
                module, extra = (a.value if isinstance(a, ast.Constant) else None for a in node.args)
                assert isinstance(module, str) and isinstance(extra, str), f"{path}: name the module and extra"
                calls.append((module, extra))
    assert {m for m, _ in calls} >= {"anndata", "pyedflib"}
    for module, extra in calls:
        assert _distributions(module.split(".")[0]) & _extra(extra), (module, extra)


def test_the_repository_tooling_is_found_and_stays_out_of_the_wheel() -> None:
    """import_contracts/ is first-party (the tests and lint-imports import it from the checkout),
    not a package the wheel lists."""
    assert "import_contracts" in REPO_PACKAGES
    assert not set(REPO_PACKAGES) & {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}


def test_every_library_the_tests_import_is_declared() -> None:
    """The tests and the repository's tooling (import_contracts: lint-imports' contract types) run
    on the core dependencies and the test extra, which CI installs."""
    allowed = _core_dependencies() | _extra("test")
    missing = []
    tooling = [p for package in REPO_PACKAGES for p in (ROOT / package).rglob("*.py")]
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *tooling]):
        for module in sorted(_third_party(_imports(path)[1]) - {"tests"}):  # tests share helpers
            if not _distributions(module) & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module}")
    assert not missing, missing


def test_the_metadata_leaves_the_torch_build_and_the_python_version_to_the_user() -> None:
    """torch has a lower bound only and Python no cap; the CPU wheel for CI and the README's
    commands comes from constraints-cpu.txt, which pins the torch these tests run on."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    (torch,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    assert {s.operator for s in torch.specifier} == {">="}, torch
    python = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert {s.operator for s in python} == {">="} and "3.11" in python and "3.13" in python
    pins = [
        Requirement(line) for line in (ROOT / "constraints-cpu.txt").read_text().splitlines() if line and line[0] != "#"
    ]
    assert [str(p) for p in pins] == [f"torch=={version('torch').split('+')[0]}"]
    readme = (ROOT / "README.md").read_text()
    setup = [line for line in readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines() if "pip install" in line]
    assert len(setup) == 2 and all("-c constraints-cpu.txt" in line for line in setup), setup


# --- the wheel, installed in a fresh venv ------------------------------------------------------


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def _copy_sources(dest: Path) -> None:
    """What the build reads: pyproject, README, the code packages and the mapped data folders."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in [*CODE_PACKAGES, *PYPROJECT["tool"]["setuptools"]["package-dir"].values()]:
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)


@pytest.mark.slow
def test_the_wheel_runs_an_experiment_a_study_and_benchmarks_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it in a fresh venv, run the CLI from a folder outside the checkout.

    Offline and in seconds: the build uses this environment's setuptools (--no-build-isolation);
    `python -m venv --without-pip` makes a bare venv, and a .pth file in its site-packages appends
    this environment's site-packages (torch, flwr, ... already installed) to its sys.path, after
    its own. A .pth line only adds a folder: the .pth files inside that folder (this checkout's
    editable-install finder among them) are not run, so `federated` can only be the wheel's copy,
    which comes first anyway. This environment's pip, aimed at the venv with --python, installs
    the wheel with --no-deps --no-index, so the console script runs the venv's interpreter.
    """
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    for d in (src, work):
        d.mkdir()
    _copy_sources(src)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MULTIMED_FL_CONF", STUDY_DIR_ENV}
    }
    env["MULTIMED_FL_CACHE"] = str(tmp_path / "cache")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("multimed_fl-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env).strip()
    )
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_multimed_fl_test_deps.pth").write_text("\n".join(here) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp_path,
        env,
    )
    checkout_env = dict(env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cli = str(venv / "bin" / "multimed-fl")

    where = json.loads(
        _run(
            [
                str(python),
                "-c",
                (
                    "import json, clients, federated, partitions, strategies\n"
                    "from federated.core.config.merge import conf_dir\n"
                    "from federated.app.studies.spec import study_dir\n"
                    "from federated.app.bench import bench_dir\n"
                    "print(json.dumps([m.__file__ for m in (clients, federated, partitions, strategies)]"
                    " + [str(f()) for f in (conf_dir, study_dir, bench_dir)]))"
                ),
            ],
            work,
            env,
        )
    )
    for path in where:  # everything from the installed copy, nothing from the checkout
        assert Path(path).is_relative_to(site) and not Path(path).resolve().is_relative_to(ROOT), path
    assert "rounds: 20" in _run([cli, "config", "show"], work, env)

    _run([cli, "run", "--out", "out", "scale=smoke"], work, env)
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and math.isfinite(summary["final"]["id"]["score"])
    assert {"site", "role", "score", "per_task"} <= set(summary["per_site"][0])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((work / "out" / "summary.json").stat().st_mode) == 0o666 & ~umask
    # the same experiment from the checkout scores identically: the packaged conf is the repo's
    _run(
        [sys.executable, "-m", "federated.app.cli", "run", "--out", str(tmp_path / "from_checkout"), "scale=smoke"],
        ROOT,
        checkout_env,
    )
    reference = json.loads((tmp_path / "from_checkout" / "summary.json").read_text())
    assert summary["final"] == reference["final"]
    assert [s["score"] for s in summary["per_site"]] == [s["score"] for s in reference["per_site"]]

    # the cheapest quick study (two 2-round smoke runs, about 25 s on 2 cores)
    _run([cli, "study", "strategies", "--quick", "--out", "study"], work, env)
    results = pd.read_csv(work / "study" / "results.csv")
    assert len(results) == 2 and results["error"].isna().all()
    assert (work / "study" / "summary.md").is_file()

    _run([cli, "bench", "--quick", "--only", "aggregation", "site_planning", "--out", "bench"], work, env)
    bench = json.loads((work / "bench" / "bench.json").read_text())
    assert {name: b["returncode"] for name, b in bench["benchmarks"].items()} == {"aggregation": 0, "site_planning": 0}
