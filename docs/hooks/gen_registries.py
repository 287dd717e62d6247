"""The registries page, generated from the Registry objects when the site is built.

Each registry's names with the first line of each entry's description or docstring, and the fixed
kinds of a few settings (attacks, faults, test-time adaptation) with what their module says of
each. A test (tests/docs/) finds every Registry in the source and fails if one is not listed here.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gen_reference import GENERATED, cell, code, describe, import_all


@dataclass(frozen=True)
class RegistrySource:
    """A Registry object: where it lives, what selects one of its names, what its page says."""

    module: str
    attribute: str
    title: str
    selected_by: str  # how a user picks a name ('' = not selected by one key)
    intro: str
    # The module's docstring before the entry's own: a strategy module describes its algorithm,
    # the class docstring only its server side.
    module_first: bool = False


REGISTRIES = (
    RegistrySource(
        "strategies.registry",
        "STRATEGIES",
        "Strategies",
        "strategy=NAME",
        "Server strategies with their site sides; their settings are in the"
        " [configuration reference](config.md#each-strategys-own-settings).",
        module_first=True,
    ),
    RegistrySource(
        "federated.core.metrics",
        "METRICS",
        "Metrics",
        "a task's `metrics` in the corpus schema",
        "What a task can be scored by; a task's first metric is its primary one.",
    ),
    RegistrySource(
        "federated.core.models.architectures",
        "ARCHITECTURES",
        "Models",
        "model.name=NAME",
        "Which encoder each kind of input gets (`multimed-fl models` lists them).",
    ),
    RegistrySource(
        "federated.data.ingest.core",
        "ADAPTERS",
        "Ingest adapters",
        "an ingest spec's `adapter:`",
        "Readers of a source format, for `multimed-fl corpus ingest` and `api.ingest`.",
    ),
    RegistrySource(
        "partitions.site_plan",
        "PLANNERS",
        "Site planners",
        "sites.planner=NAME",
        "What proposes a simulation's sites from a corpus.",
    ),
    RegistrySource(
        "partitions.site_plan",
        "STEPS",
        "Planner steps",
        "sites.steps=[...]",
        "Transformations of a site plan, applied in `sites.steps` order; each is skipped when its setting is off.",
    ),
    RegistrySource(
        "federated.engines",
        "ENGINES",
        "Engines",
        "engine=NAME",
        "Where a simulation runs (a deployment is `multimed-fl deploy`).",
    ),
    RegistrySource(
        "clients.local_trainers",
        "LOCAL_TRAINERS",
        "Privacy modes (local training)",
        "privacy=NAME",
        "How a site trains locally under each privacy mode.",
    ),
    RegistrySource(
        "federated.data.synthetic.tasks",
        "GENERATORS",
        "Synthetic task generators",
        "",
        "How the synthetic MultiMed corpus makes each task's data.",
    ),
)
# Registries that only mirror one above (strategy settings, filled together with STRATEGIES).
MIRRORS = {("federated.core.config.schema", "STRATEGY_SETTINGS")}
# Settings whose values are fixed kinds rather than a Registry, listed beside the registries.
KINDS = (
    ("attack.kind", "clients.attacks", "Attacks (simulated bad sites)"),
    ("faults.kind", "clients.faults", "Faults (simulated failing sites)"),
    ("ood.adapt", "clients.test_time", "Test-time adaptation at held-out sites"),
)


def registry(source: RegistrySource) -> Any:
    return getattr(importlib.import_module(source.module), source.attribute)


def registries_page() -> str:
    """Each registry's names, with the first line of each one's description or docstring."""
    import_all()
    from federated.core.config.keys import config_keys

    out = [
        GENERATED,
        "# Registries",
        "",
        "Every pluggable part is looked up by name from the configuration; a name not registered is",
        "refused with the list of valid ones. Generated from the registries themselves",
        "(`federated.core.registry.Registry` objects): each name with the first line of its docstring or",
        "description. A new part registered in code appears here at the next build.",
        "",
    ]
    for source in REGISTRIES:
        reg = registry(source)
        out += [f"## {source.title}", "", source.intro, ""]
        where = f"`{source.module}.{source.attribute}`"
        out += [
            f"Registry: {where}" + (f"; selected by {_selected(source.selected_by)}." if source.selected_by else "."),
            "",
        ]
        out += ["| name | description |", "|---|---|"]
        out += [f"| {code(name)} | {cell(describe(item, source.module_first))} |" for name, item in reg.items()]
        out.append("")
    keys = {k.key: k for k in config_keys()}
    for key, module, title in KINDS:
        doc = keys[key]
        out += [
            f"## {title}",
            "",
            f"Selected by `{key}=NAME` (values declared in the schema; what each does: `{module}`).",
            "",
        ]
        lines = _docstring_table(importlib.import_module(module).__doc__ or "", doc.allowed or ())
        out += ["| name | description |", "|---|---|"]
        for v in doc.allowed or ():
            text = lines.get(v, "off (the default)" if v == doc.default else "")
            out.append(f"| {code(v)} | {cell(text)} |")
        out.append("")
    return "\n".join(out) + "\n"


def _selected(how: str) -> str:
    return how if "`" in how else f"`{how}`"


def _docstring_table(doc: str, names: Sequence[str]) -> dict[str, str]:
    """name -> text from a docstring's two-column list (`name   what it does`, a known name followed
    by two spaces or more; continuation lines indented under the text)."""
    found: dict[str, str] = {}
    last, column = "", 0
    for line in doc.splitlines():
        stripped = line.strip()
        parts = stripped.split(None, 1)
        if len(parts) == 2 and parts[0] in names and stripped[len(parts[0]) :].startswith("  "):
            last, column = parts[0], line.index(parts[1])
            found[last] = parts[1].strip()
        elif last and stripped and len(line) - len(line.lstrip()) >= column:
            found[last] += " " + stripped
        else:
            last = ""
    return found
