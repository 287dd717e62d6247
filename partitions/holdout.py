"""Which sites are held out: hospitals that never take part and measure generalisation.

`sites.holdout` picks how, over the sites the planner proposed:
  listed     the planner's own choice (the archetypes planner's `sites.held_out` list)
  named      the sites in `sites.holdout_sites`, by site name or origin name: a natural site is
             named after its origin (KY; a grouped one NY+TX), a simulated one by its number
             (site_03). The natural planner's old numbers (site_00 for the first origin) are not
             accepted: a number pointed at whichever origin sorted there, so it named another
             hospital when the corpus or sites.min_site_size changed.
  random     `sites.holdout_k` sites drawn with the corpus seed
  archetype  every site whose archetype is in `sites.holdout_archetypes`
Leave-one-site-out is `named` with one site, once per site: `leave_one_site_out_overrides`
gives the override lists a study runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from federated.core.config.schema import HOLDOUT_MODES, ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.natural import NATURAL, site_name
from partitions.site_plan import PLANNERS, PlanError, SitePlan, as_held_out
from partitions.steps import step_rng


def assign_roles(plans: list[SitePlan], cfg: ExperimentConfig) -> list[SitePlan]:
    """The planner's sites with their roles set by `sites.holdout`: the selected sites held out,
    every other site training (a site the planner listed as held out trains on its train split)."""
    mode = cfg.sites.holdout
    if mode not in SELECTORS:
        raise PlanError(f"unknown sites.holdout {mode!r}; choices: {', '.join(HOLDOUT_MODES)}")
    held = SELECTORS[mode](plans, cfg)
    out = []
    for p in plans:
        if p.site in held:
            out.append(as_held_out(p))
        else:
            out.append(p if p.role == Role.TRAIN else _as_training(p))
    return out


def _as_training(plan: SitePlan) -> SitePlan:
    return dataclasses.replace(plan, role=Role.TRAIN)


def _listed(plans: list[SitePlan], cfg: ExperimentConfig) -> set[str]:
    """The planner's own choice: the sites it proposed as held out."""
    return {p.site for p in plans if p.role == Role.HELD_OUT}


def _named(plans: list[SitePlan], cfg: ExperimentConfig) -> set[str]:
    """The sites in sites.holdout_sites, by site name or origin name; an unknown name lists the
    planned sites, and an origin grouped into a natural site names that site."""
    names = cfg.sites.holdout_sites
    if not names:
        raise PlanError("sites.holdout=named needs sites.holdout_sites (site names or origin names)")
    by_name = {p.site: p.site for p in plans} | {p.origin_site: p.site for p in plans}
    unknown = [n for n in names if n not in by_name]
    for n in unknown:
        p = next((p for p in plans if _grouped_into(n, p)), None)
        if p is not None:
            raise PlanError(
                f"sites.holdout_sites names origin site {n}, which sites.min_site_size={cfg.sites.min_site_size} "
                f"grouped into site {p.site} (origins {p.origin_site}); hold out {p.site}, or lower "
                "sites.min_site_size to keep it as its own site"
            )
    if unknown:
        natural = any(p.archetype == NATURAL for p in plans)
        hint = "; natural sites are named after their origin sites, not numbered" if natural else ""
        raise PlanError(
            f"sites.holdout_sites names unknown sites {unknown}; planned sites: "
            f"{', '.join(p.site if p.site == p.origin_site else f'{p.site} ({p.origin_site})' for p in plans)}{hint}"
        )
    return {by_name[n] for n in names}


def _grouped_into(origin: str, plan: SitePlan) -> bool:
    """Whether `origin` is one of the origins grouped into a natural site. A plan records its
    origins joined by '+', and an origin's own name may hold a '+' ("A+B"): so not by splitting
    on '+'. A grouped site's name joins its members' site names by '+' (a site name never holds
    one), so a member's site name is one of those parts, and its name a '+'-delimited run of the
    plan's origin_site; a site cut to `<first>+<k>_more` is matched by the run alone."""
    if plan.archetype != NATURAL or "+" not in plan.site or origin == plan.origin_site:
        return False
    parts = plan.site.split("+")
    if not parts[-1].endswith("_more") and _site_name_of(origin) not in parts:
        return False
    return f"+{origin}+" in f"+{plan.origin_site}+"


def _site_name_of(origin: str) -> str | None:
    """The site name an origin gets, or None where it has none (no letter or digit)."""
    try:
        return site_name(origin)
    except PlanError:
        return None


def _random(plans: list[SitePlan], cfg: ExperimentConfig) -> set[str]:
    """sites.holdout_k sites drawn with the corpus seed, so a config always holds out the same ones."""
    k = cfg.sites.holdout_k
    if not 0 <= k < len(plans):
        raise PlanError(
            f"sites.holdout_k={k} must be in [0, {len(plans) - 1}]: "
            f"the planner proposed {len(plans)} sites and one must train"
        )
    rng = step_rng(cfg.corpus.seed, "holdout")
    return {plans[i].site for i in rng.choice(len(plans), size=k, replace=False)}


def _by_archetype(plans: list[SitePlan], cfg: ExperimentConfig) -> set[str]:
    """Every site of an archetype in sites.holdout_archetypes; each one named must have a site."""
    wanted = set(cfg.sites.holdout_archetypes)
    have = {p.archetype for p in plans}
    missing = sorted(wanted - have)
    if missing or not wanted:
        raise PlanError(
            f"sites.holdout_archetypes={sorted(wanted)}: no site of archetype "
            f"{missing or '(none given)'}; planned archetypes: {sorted(have)}"
        )
    return {p.site for p in plans if p.archetype in wanted}


# sites.holdout mode -> the sites it holds out; the keys are the config's HOLDOUT_MODES
SELECTORS: dict[str, Callable[[list[SitePlan], ExperimentConfig], set[str]]] = {
    "listed": _listed,
    "named": _named,
    "random": _random,
    "archetype": _by_archetype,
}


def leave_one_site_out_overrides(corpus: Corpus, cfg: ExperimentConfig) -> list[list[str]]:
    """One override list per site, each holding out that site alone (for studies)."""
    sites = [p.site for p in PLANNERS.get(cfg.sites.planner)(corpus, cfg)]
    return [["sites.holdout=named", f"sites.holdout_sites=[{s}]"] for s in sites]
