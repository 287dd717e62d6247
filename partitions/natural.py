"""The `natural` planner: one site per origin site of the corpus (the hospital a sample came from),
named after it.

Real multi-site data (ingested with an `origin_site` column) is split the way it was
collected, as FLamby does, and each site keeps its hospital's name (`KY`, `lakeview`) in plans,
summaries, reports and metrics, so a person reads which hospital is which.

Origin sites with fewer than `sites.min_site_size` samples (manifest rows, over all tasks) are
grouped, in name order, into sites of at least that size (a site of 12 patients cannot train or
be scored alone); a group is named, and its origin_site lists, its members joined by '+'. A
warning names the key and the grouped origins; origins too small even together are refused,
naming them and the key. A site holds every task it has at least `sites.min_samples` training
samples of. No site is held out unless `sites.holdout` says which (named, random or archetype;
every site's archetype is "natural").

Site names become folder names (site_state/<site>, `corpus split`'s <out>/<site>), Flower node
config values (`site='<site>'`: no space or quote) and config list entries
(`sites.holdout_sites=[<site>]`, read as YAML). So a name keeps letters (any script), digits and
`_ . -`; every other run of characters becomes `_` ('St Mary's' -> St_Mary_s), '+' included (it
joins a group's members); `_ . -` are stripped from the ends (no hidden folder, no option-like
name); a name the config would read as something else (`007` -> 7, `yes` -> true, `null`) is
prefixed `site_`; a name is at most MAX_SITE_NAME characters (a group too long for that is
`<first>+<k>_more`). Two origins that come out as one name (or names differing only in case, one
folder on a case-insensitive disk) are refused, naming both.
"""

from __future__ import annotations

import logging
import re
import unicodedata

import numpy as np
from omegaconf import OmegaConf

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import PLANNERS, PlanError, SitePlan

log = logging.getLogger(__name__)

NATURAL = "natural"  # the planner's name, and every one of its sites' archetype

# 60 four-byte characters still fit a 255-byte file name, with room for the name's folder files
MAX_SITE_NAME = 60
_UNSAFE = re.compile(r"[^\w.-]+")  # \w: letters and digits of any script, and "_"
_ENDS = "_.-"
_PREFIX = "site_"
# YAML reads a plain scalar starting with a letter as text, except these words (any case)
_YAML_WORDS = frozenset({"yes", "no", "true", "false", "on", "off", "null", "y", "n"})
# grouping messages already logged in this process: every ClientApp process plans the same sites
_TOLD: set[str] = set()


def _reads_back(name: str) -> bool:
    """Whether `name` in a config list (sites.holdout_sites=[name]) is read as that same text:
    the config's own YAML reading decides (073 is 59, yes is true, 73 stays 73)."""
    if name[:1].isalpha() and name.casefold() not in _YAML_WORDS:
        return True  # the common case, without a YAML parse (0.4 ms a name: 0.4 s for 1,000 sites)
    try:
        value = OmegaConf.from_dotlist([f"k=[{name}]"])["k"][0]
    except Exception:  # the YAML scanner refuses it: not a usable list entry
        return False
    return value is not None and not isinstance(value, bool) and str(value) == name


def _clip(name: str, limit: int) -> str:
    return name[:limit].rstrip(_ENDS) if len(name) > limit else name


def site_name(origin: str) -> str:
    """The site name of one origin site: the origin's own name where it is safe as a file name, a
    node config value and a config list entry; else the closest safe name (module docstring)."""
    name = _UNSAFE.sub("_", unicodedata.normalize("NFC", origin)).strip(_ENDS)
    if not name:
        raise PlanError(
            f"origin site {origin!r} has no letter or digit to name its site by; rename it in the corpus "
            "(the ingest spec's site_column values or origin_site)"
        )
    name = _clip(name, MAX_SITE_NAME)
    return name if _reads_back(name) else _clip(_PREFIX + name, MAX_SITE_NAME)


def group_site_name(members: list[str]) -> str:
    """A grouped site's name: its members' site names joined by '+', or `<first>+<k>_more` when
    that is longer than MAX_SITE_NAME (its origin_site still lists every member)."""
    names = [site_name(o) for o in members]
    joined = "+".join(names)
    if len(joined) > MAX_SITE_NAME:
        tail = f"+{len(names) - 1}_more"
        joined = _clip(names[0], MAX_SITE_NAME - len(tail)) + tail
    return joined if _reads_back(joined) else _clip(_PREFIX + joined, MAX_SITE_NAME)


def site_names(groups: list[list[str]]) -> list[str]:
    """One unique site name per group of origins; two groups with one name (or names that differ
    only in case) are a PlanError naming both groups' origins and the name."""
    out: list[str] = []
    seen: dict[str, list[str]] = {}
    for members in groups:
        name = group_site_name(members)
        clash = seen.get(name.casefold())
        if clash is not None:
            other = group_site_name(clash)
            both = f"{'+'.join(clash)!r} and {'+'.join(members)!r}"
            what = f"both become site {name}"
            if other != name:
                what = f"become sites {other} and {name}, which differ only in case (one folder on a case-blind disk)"
            raise PlanError(
                f"origin sites {both} {what}: a site's name must be unique; rename one of them in the corpus "
                "(the ingest spec's site_column values or origin_site)"
            )
        seen[name.casefold()] = members
        out.append(name)
    return out


def group_small_origins(sizes: dict[str, int], min_size: int) -> list[list[str]]:
    """Origins of at least min_size stand alone; smaller ones are merged, in name order,
    into groups of at least min_size (a small remainder joins the last group)."""
    groups = [[o] for o in sorted(sizes) if sizes[o] >= min_size]
    small, current, total = [], [], 0
    for o in sorted(o for o in sizes if sizes[o] < min_size):
        current.append(o)
        total += sizes[o]
        if total >= min_size:
            small.append(current)
            current, total = [], 0
    if current:
        if small:
            small[-1].extend(current)
        else:
            small.append(current)  # everything small together is still small: refused by check_group_sizes
    return groups + small


def _listed(members: list[str], sizes: dict[str, int]) -> str:
    parts = [f"{o} ({sizes[o]} samples)" for o in members]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def check_group_sizes(groups: list[list[str]], sizes: dict[str, int], min_size: int) -> None:
    """Say what sites.min_site_size did: warn (once per process) which small origins were
    grouped into which site, and refuse origins too small even together, naming them and the key."""
    for members in groups:
        total = sum(sizes[o] for o in members)
        smallest = min(sizes[o] for o in members)
        if total < min_size and len(members) == 1:
            raise PlanError(
                f"sites.min_site_size={min_size}: origin site {_listed(members, sizes)} is smaller and no other "
                f"origin site is small enough to be grouped with it, so it is refused; "
                f"sites.min_site_size={total} or lower keeps it as its own site"
            )
        if total < min_size:
            raise PlanError(
                f"sites.min_site_size={min_size}: origin sites {_listed(members, sizes)} are smaller, and "
                f"grouped have only {total} samples, so they are refused; sites.min_site_size={smallest} or lower "
                f"keeps each as its own site, {total} keeps them as one site {group_site_name(members)}"
            )
        if len(members) > 1:
            text = (
                f"sites.min_site_size={min_size}: origin sites {_listed(members, sizes)} are each smaller, so they "
                f"train and are scored as one site, {group_site_name(members)} ({total} samples); "
                f"sites.min_site_size={smallest} or lower keeps each as its own site"
            )
            if text not in _TOLD:
                _TOLD.add(text)
                log.warning(text)


@PLANNERS.register(NATURAL)
def plan_natural(corpus: Corpus, cfg: ExperimentConfig) -> list[SitePlan]:
    index = manifest_index(corpus)
    sizes = index.origin_sizes.to_dict()
    groups = group_small_origins(sizes, cfg.sites.min_site_size)
    check_group_sizes(groups, sizes, cfg.sites.min_site_size)
    names = site_names(groups)
    plans = []
    for name, members in zip(names, groups, strict=True):
        rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        tasks = []
        for t in sorted({t for o in members for t in index.tasks_at(o)}):
            by_split = {s: np.concatenate([index.rows(o, t, s) for o in members]) for s in rows}
            if len(by_split["train"]) < cfg.sites.min_samples:
                continue  # too few to train on here; the rows stay unused
            tasks.append(t)
            for s in rows:
                rows[s].append(by_split[s])
        if not tasks:
            raise PlanError(
                f"site {name} (origin {'+'.join(members)}) has no task with at least "
                f"sites.min_samples={cfg.sites.min_samples} training samples"
            )
        plans.append(
            SitePlan(
                site=name,
                role=Role.TRAIN,
                archetype=NATURAL,
                origin_site="+".join(members),
                tasks=tuple(tasks),
                modalities=tuple(corpus.schema.modalities_of(tasks)),
                train_rows=np.sort(np.concatenate(rows["train"])),
                test_rows=np.sort(np.concatenate(rows["test"])),
            )
        )
    return plans
