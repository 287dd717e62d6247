"""Which sites are held out: hospitals that never take part and measure generalisation.

`sites.holdout` picks how, over the sites the planner proposed:
  listed     the planner's own choice (the archetypes planner's `sites.held_out` list)
  named      the sites in `sites.holdout_sites`, by site id (site_03) or origin name (KY)
  random     `sites.holdout_k` sites drawn with the corpus seed
  archetype  every site whose archetype is in `sites.holdout_archetypes`
Leave-one-site-out is `named` with one site, once per site: `leave_one_site_out_overrides`
gives the override lists a study runs.
"""

from __future__ import annotations

from federated.core.config.loader import HOLDOUT_MODES
from federated.core.config.schema import ExperimentConfig
from federated.data.format import Corpus
from partitions.site_plan import PLANNERS, PlanError, SitePlan, as_held_out
from partitions.steps import step_rng
from federated.core.protocol import Role


def assign_roles(plans: list[SitePlan], cfg: ExperimentConfig) -> list[SitePlan]:
    mode = cfg.sites.holdout
    if mode == "listed":
        held = {p.site for p in plans if p.role == Role.HELD_OUT}
    elif mode == "named":
        held = _named(plans, cfg.sites.holdout_sites)
    elif mode == "random":
        k = cfg.sites.holdout_k
        if not 0 <= k < len(plans):
            raise PlanError(f"sites.holdout_k={k} must be in [0, {len(plans) - 1}]: "
                            f"the planner proposed {len(plans)} sites and one must train")
        rng = step_rng(cfg.corpus.seed, "holdout")
        held = {plans[i].site for i in rng.choice(len(plans), size=k, replace=False)}
    elif mode == "archetype":
        wanted = set(cfg.sites.holdout_archetypes)
        have = {p.archetype for p in plans}
        missing = sorted(wanted - have)
        if missing or not wanted:
            raise PlanError(f"sites.holdout_archetypes={sorted(wanted)}: no site of archetype "
                            f"{missing or '(none given)'}; planned archetypes: {sorted(have)}")
        held = {p.site for p in plans if p.archetype in wanted}
    else:
        raise PlanError(f"unknown sites.holdout {mode!r}; choices: {', '.join(HOLDOUT_MODES)}")
    out = []
    for p in plans:
        if p.site in held:
            out.append(as_held_out(p))
        else:
            out.append(p if p.role == Role.TRAIN else _as_training(p))
    return out


def _as_training(plan: SitePlan) -> SitePlan:
    import dataclasses

    return dataclasses.replace(plan, role=Role.TRAIN)


def _named(plans: list[SitePlan], names: list[str]) -> set[str]:
    if not names:
        raise PlanError("sites.holdout=named needs sites.holdout_sites (site ids or origin names)")
    by_name = {p.site: p.site for p in plans} | {p.origin_site: p.site for p in plans}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise PlanError(f"sites.holdout_sites names unknown sites {unknown}; planned sites: "
                        f"{', '.join(f'{p.site} ({p.origin_site})' for p in plans)}")
    return {by_name[n] for n in names}


def leave_one_site_out_overrides(corpus: Corpus, cfg: ExperimentConfig) -> list[list[str]]:
    """One override list per site, each holding out that site alone (for studies)."""
    sites = [p.site for p in PLANNERS.get(cfg.sites.planner)(corpus, cfg)]
    return [["sites.holdout=named", f"sites.holdout_sites=[{s}]"] for s in sites]
