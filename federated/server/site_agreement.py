"""What the sites must agree on before the first round: one schema for the model, one version.

Every site sends its corpus schema and its multimed-fl version in the handshake. In simulation
all sites read one corpus, so they agree by construction. In site-local mode each hospital
ingested its own corpus: the federation's schema is the union of what the sites declare for
the tasks they hold, and where sites define one modality or task differently (another shape,
other classes, another target) the definition most sites hold wins (ties: the first site by
name) and each other site is incompatible, named with the difference. A site running another
version is incompatible too: the two sides would read messages differently.
`engine.on_incompatible_site` decides: fail (stop, naming every site and reason) or exclude
(run without them; summary.json lists them).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from federated import __version__
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.features import first_feature_difference
from federated.server.evaluation import SiteProfile
from partitions.site_local import SITE_LOCAL


class FederationError(RuntimeError):
    """The federation cannot run as configured (no training sites, a node that fails the handshake, ...)."""


@dataclass
class Agreement:
    schema: CorpusSchema
    incompatible: dict[str, str] = field(default_factory=dict)  # site -> why


def _canonical(item: Modality | Task) -> str:
    return json.dumps(item.to_dict(), sort_keys=True)


def agree(profiles: Iterable[SiteProfile], version: str, per_site_tasks: bool) -> Agreement:
    """The federation's schema and the sites that cannot join it. per_site_tasks (site-local
    mode): each site contributes only the tasks it holds (and their inputs), so a definition it
    does not use cannot exclude it; otherwise every site contributes its whole corpus schema."""
    profiles = [p for p in profiles if p.schema is not None]
    if not profiles:
        raise FederationError("handshake: no site sent its corpus schema")
    incompatible = {
        p.site: f"runs multimed-fl {p.version}, the server {version}" for p in profiles if p.version != version
    }
    schemas = {
        p.site: p.schema.restrict(t for t in p.schema.tasks if t in p.tasks) if per_site_tasks else p.schema
        for p in profiles
        if p.site not in incompatible and p.schema is not None
    }
    chosen: dict[str, dict[str, Modality | Task]] = {"modality": {}, "task": {}}
    for kind, section in (("modality", "modalities"), ("task", "tasks")):
        votes: dict[str, Counter[str]] = {}
        first: dict[tuple[str, str], Modality | Task] = {}
        for schema in schemas.values():
            for name, item in getattr(schema, section).items():
                key = _canonical(item)
                votes.setdefault(name, Counter())[key] += 1
                first.setdefault((name, key), item)
        for name, counter in votes.items():
            top = max(counter.values())
            winner = next(k for k in counter if counter[k] == top)  # insertion order: site-name order
            chosen[kind][name] = first[(name, winner)]
    for site, schema in schemas.items():
        for kind, section in (("modality", "modalities"), ("task", "tasks")):
            for name, item in getattr(schema, section).items():
                want = chosen[kind][name]
                if item != want and site not in incompatible:
                    incompatible[site] = _difference(kind, name, item, want)
    order = [s for s in sorted(schemas) if s not in incompatible]
    if not order:
        raise FederationError(f"handshake: no site is compatible with another: {incompatible}")
    merged = schemas[order[0]]
    for site in order[1:]:
        merged = merged.merged(schemas[site])
    return Agreement(merged, incompatible)


def _difference(kind: str, name: str, item: Modality | Task, want: Modality | Task) -> str:
    """Why a site's definition is not the federation's. Features are named one by one: two
    hospitals whose tables encode to one width but mean different things by a column (another
    reference level, another unit) differ there, and a person needs the feature, not two blobs."""
    if isinstance(item, Modality) and isinstance(want, Modality) and item.features != want.features:
        where = first_feature_difference(item.features, want.features).replace("there", "in the federation's")
        return (
            f"its modality {name!r} encodes its features unlike the federation's (held by most sites): {where}; "
            "every hospital must ingest with the coordinator's data dictionary"
        )
    return f"its {kind} {name!r} is {_canonical(item)}, the federation's (held by most sites) is {_canonical(want)}"


def exact_schema(profiles: Iterable[SiteProfile]) -> CorpusSchema:
    """Simulation: every site reads one corpus, so their schemas are equal; a difference is a bug
    or a misconfigured site and stops the run, naming the two sites and the first difference."""
    by_site = {p.site: p.schema for p in profiles if p.schema is not None}
    if not by_site:
        raise FederationError("handshake: no site sent its corpus schema")
    first_site, first = next(iter(by_site.items()))
    for site, schema in by_site.items():
        if schema != first:
            raise FederationError(
                f"handshake: sites {first_site} and {site} hold corpora with different schemas "
                f"({schema_difference(first, schema)}); every site must ingest with the same spec"
            )
    return first


def schema_difference(a: CorpusSchema, b: CorpusSchema) -> str:
    for kind, x, y in (("modality", a.modalities, b.modalities), ("task", a.tasks, b.tasks)):
        for name in sorted(x.keys() | y.keys()):
            if x.get(name) != y.get(name):
                return f"{kind} {name!r}: {_entry(x.get(name))} vs {_entry(y.get(name))}"
    return "order of modalities or tasks"


def _entry(item: Any) -> str:
    return "absent" if item is None else json.dumps(item.to_dict(), sort_keys=True)


def agreed_schema(
    cfg: ExperimentConfig, profiles: dict[int, SiteProfile], without: str = "runs without them"
) -> tuple[CorpusSchema, dict[str, str]]:
    """The schema the federation works under, and the sites left out (engine.on_incompatible_site
    =exclude): one rule for a training run and a statistics-only run, so a profile refuses what
    training would. `without` says what exclude does (in the error that suggests it)."""
    if cfg.sites.planner != SITE_LOCAL:
        versions = {p.site: p.version for p in profiles.values() if p.version != __version__}
        if versions:
            raise FederationError(
                f"handshake: sites run other multimed-fl versions than the server's {__version__}: {versions}"
            )
        return exact_schema(profiles.values()), {}
    agreement = agree(profiles.values(), __version__, per_site_tasks=True)
    if agreement.incompatible and cfg.engine.on_incompatible_site == "fail":
        reasons = "; ".join(f"site {s}: {why}" for s, why in sorted(agreement.incompatible.items()))
        raise FederationError(
            f"handshake: incompatible site(s) ({reasons}); engine.on_incompatible_site=exclude {without}"
        )
    for site, why in sorted(agreement.incompatible.items()):
        log(WARNING, "site %s left out: %s", site, why)
    return agreement.schema, agreement.incompatible
