"""The generated reference pages against their sources, walked here independently of the generator.

The generators (docs/hooks/gen_*.py) run in-process, without mkdocs:
the site's build (`mkdocs build --strict`, a CI step) renders the same text.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "hooks"
PACKAGES = ("federated", "clients", "strategies", "partitions")


sys.path.insert(0, str(HOOKS))  # the generators import each other by name, as mkdocs loads them
gen_reference = importlib.import_module("gen_reference")
gen_registries = importlib.import_module("gen_registries")
gen_results = importlib.import_module("gen_results")


@pytest.fixture(scope="module")
def config_rows() -> dict[str, list[str]]:
    """Anchor id -> the cells of its row, from the generated configuration page."""
    rows: dict[str, list[str]] = {}
    for line in gen_reference.config_page(ROOT / "conf").splitlines():
        match = re.match(r'\| <a id="([^"]+)"></a>(.*)\|\s*$', line)
        if match:
            cells = [c.strip() for c in re.findall(r"((?:`[^`]*`|\\\||[^|`])*)\|", match.group(2) + "|")]
            assert match.group(1) not in rows, f"config reference: key anchor {match.group(1)} twice"
            rows[match.group(1)] = cells
    return rows


def _leaves(node: DictConfig, prefix: str) -> dict[str, Any]:
    """Dotted key -> default, for every field of a structured config (a dict-typed field is one leaf)."""
    out: dict[str, Any] = {}
    for key in map(str, node):
        child = node._get_node(key)
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            out.update(_leaves(child, f"{prefix}{key}."))
        elif isinstance(child, DictConfig | ListConfig):
            out[f"{prefix}{key}"] = OmegaConf.to_container(child)
        else:
            out[f"{prefix}{key}"] = child._value()  # type: ignore[union-attr]
    return out


def _schema_defaults() -> dict[str, Any]:
    """Every settable key with its default, from the dataclasses through OmegaConf (not keys.py):
    ExperimentConfig's fields, and each registered strategy's settings as strategy.NAME.FIELD."""
    from federated.core.config import ExperimentConfig
    from strategies.registry import STRATEGIES

    flat = _leaves(OmegaConf.structured(ExperimentConfig), "")
    flat = {k: v for k, v in flat.items() if not k.startswith("strategy.settings")}
    for name, spec in STRATEGIES.items():
        own = _leaves(OmegaConf.structured(spec.settings), "")
        flat.update({f"strategy.{name}.{k}": v for k, v in own.items()})
    return flat


def _unquote(text: str) -> str:
    return text.strip().strip("`").strip()


def test_every_config_key_of_the_schema_is_in_the_reference_with_its_default(config_rows) -> None:
    schema = _schema_defaults()
    page = set(config_rows)
    assert page - set(schema) == set(), "keys in the configuration reference that the schema does not have"
    assert set(schema) - page == set(), "schema keys missing from the configuration reference"
    for key, default in schema.items():
        shown = yaml.safe_load(_unquote(config_rows[key][2]))
        if isinstance(default, list | tuple):
            default = list(default)
        assert shown == default, f"{key}: the reference shows default {shown!r}, the schema has {default!r}"


def test_config_reference_shows_declared_allowed_values(config_rows) -> None:
    import dataclasses

    from federated.core.config.schema import ExperimentConfig
    from federated.core.config.values import allowed_values
    from strategies.registry import STRATEGIES

    def walk(cls: type, prefix: str):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value) and f"{prefix}{f.name}" != "strategy.settings":
                yield from walk(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", cls, f.name

    fields = list(walk(ExperimentConfig, ""))
    for name in STRATEGIES.names():
        fields += [(f"strategy.{name}.{k}", c, n) for k, c, n in walk(STRATEGIES.get(name).settings, "")]
    checked = []
    for key, cls, name in fields:
        declared = allowed_values(cls, name)
        if declared:
            checked.append(key)
            shown = [_unquote(v) for v in config_rows[key][3].split(",")]
            assert shown == list(declared), key
    # every section that declares values: sites.holdout, model.missing, engine.device, ...
    assert {"sites.holdout", "engine.on_incompatible_site", "preprocess.statistics", "attack.kind"} <= set(checked)


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, (*path, name)))
    return found


def test_every_cli_command_and_option_is_in_the_reference() -> None:
    from federated.app.cli import build_parser

    parser = build_parser()
    page = gen_reference.cli_page(parser)
    sections = dict(re.findall(r"^## (multimed-fl[^\n]*)\n(.*?)(?=^## |\Z)", page, flags=re.MULTILINE | re.DOTALL))
    commands = {path: sub for path, sub in _commands(parser).items() if path}
    assert len(commands) > 10
    assert set(sections) == {" ".join(("multimed-fl", *path)) for path in commands}
    for path, sub in commands.items():
        text = sections[" ".join(("multimed-fl", *path))]
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert re.search(rf"`{re.escape(option)}(?![\w-])", text), (
                        f"multimed-fl {' '.join(path)}: {option} missing from the CLI reference"
                    )
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                positional = str(action.metavar or action.dest)
                assert f"`{positional}" in text, f"multimed-fl {' '.join(path)}: {positional} missing"
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                assert all(f"`{c}`" in text for c in action.choices)


def _registries_in_source() -> set[tuple[str, str]]:
    """(module, name) of every module-level `NAME = Registry(...)` in the packages, from their source."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if "Registry(" not in text:  # parse only the files that may create one
                continue
            tree = ast.parse(text)
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in tree.body:
                if not isinstance(node, ast.Assign | ast.AnnAssign):
                    continue
                value = node.value
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Registry":
                    assert isinstance(target, ast.Name), f"{path}: a Registry assigned to {ast.unparse(target)}"
                    found.add((module, target.id))
    return found


@pytest.fixture(scope="module")
def registries_page() -> str:
    return gen_registries.registries_page()


def test_every_registry_is_on_the_registries_page_with_every_name(registries_page) -> None:
    listed = {(r.module, r.attribute) for r in gen_registries.REGISTRIES}
    missing = _registries_in_source() - listed - gen_registries.MIRRORS
    assert not missing, f"registries not in docs/hooks/gen_registries.py REGISTRIES: {sorted(missing)}"
    sections = dict(re.findall(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", registries_page, flags=re.MULTILINE | re.DOTALL))
    for source in gen_registries.REGISTRIES:
        registry = getattr(importlib.import_module(source.module), source.attribute)
        assert len(registry) > 0, source
        for name in registry.names():
            assert f"| `{name}` |" in sections[source.title], f"{source.title}: {name} missing"


def test_attack_fault_and_adaptation_kinds_are_on_the_registries_page(registries_page) -> None:
    from federated.core.config.schema import AttackConfig, FaultConfig, OODConfig, allowed_values

    sections = dict(re.findall(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", registries_page, flags=re.MULTILINE | re.DOTALL))
    titles = {key: title for key, _, title in gen_registries.KINDS}
    for key, cls, name in (
        ("attack.kind", AttackConfig, "kind"),
        ("faults.kind", FaultConfig, "kind"),
        ("ood.adapt", OODConfig, "adapt"),
    ):
        values = allowed_values(cls, name)
        assert values
        for value in values:
            row = re.search(rf"^\| `{value}` \| (.*) \|$", sections[titles[key]], flags=re.MULTILINE)
            assert row and row.group(1).strip(), f"{key}={value}: no description on the registries page"


def test_docstring_table_reads_names_and_continuations() -> None:
    doc = "Intro.\n\n    crash    raise\n             in the round\n    stall    sleep\nOther text.\n"
    assert gen_registries._docstring_table(doc, ("crash", "stall", "exit")) == {
        "crash": "raise in the round",
        "stall": "sleep",
    }


@pytest.fixture(scope="module")
def results_site() -> Any:
    return gen_results.results_site(ROOT)


def _resolve(page_uri: str, target: str) -> str:
    parts = page_uri.split("/")[:-1]
    for piece in target.split("/"):
        if piece == "..":
            parts.pop()
        elif piece not in ("", "."):
            parts.append(piece)
    return "/".join(parts)


def test_results_pages_show_every_recorded_file_and_their_links_resolve(results_site) -> None:
    results = ROOT / "experiments" / "results"
    shown = "\n".join(results_site.pages.values())
    for md in results.rglob("*.md"):
        body = md.read_text().strip()
        # a report's heading becomes its page's title; the rest appears as written (a summary that its
        # report quotes, once)
        assert body.split("\n", 1)[-1].strip()[:200] in shown, f"{md.relative_to(ROOT)} is not on a results page"
    copied = {path.resolve() for path in results_site.files.values()}
    for path in results.rglob("*"):
        if path.is_file() and path.suffix != ".md":
            assert path.resolve() in copied, f"{path.relative_to(ROOT)} is not copied into the site"
    for uri, text in results_site.pages.items():
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" in target:
                continue
            resolved = _resolve(uri, target)
            assert resolved in results_site.files or resolved in results_site.pages, (
                f"{uri}: link {target} resolves to nothing"
            )


def test_results_nav_lists_every_results_page(results_site) -> None:
    def uris(entries: Any) -> list[str]:
        if isinstance(entries, str):
            return [entries]
        if isinstance(entries, dict):
            return [u for v in entries.values() for u in uris(v)]
        return [u for e in entries for u in uris(e)]

    listed = uris(results_site.nav)
    assert sorted(listed) == sorted(u for u in results_site.pages if u != "results/index.md")
    index = results_site.pages["results/index.md"]
    for uri in listed:
        assert f"]({uri.removeprefix('results/')})" in index, f"{uri} not listed on results/index.md"


def test_generated_pages_are_not_committed() -> None:
    for page in ("reference/config.md", "reference/cli.md", "reference/registries.md", "results/index.md"):
        assert not (ROOT / "docs" / page).exists(), (
            f"docs/{page} is generated at build time; a committed copy goes stale"
        )
