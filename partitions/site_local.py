"""Site-local mode (`sites.planner=site_local`): a site is its own corpus, nothing is planned across sites.

A hospital ingests its own files into its own corpus; its node names that corpus and its site
name. The site holds every task of its corpus (or those in `sites.tasks_only`) with the
train/test split as stored, and takes its role from the coordinator's config: held out when
`sites.holdout_sites` names it (by site name or origin), evaluation-only when `sites.train_only`
lists other sites, training otherwise. No site sees, or plans from, another site's data; in
simulation, `corpus.site_corpora` holds one such corpus per site (folder name = site name).
Planner steps that reshape a site's data are refused by the config (SIMULATION_ONLY in
federated/core/config/checks.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import Role
from federated.data.format import Corpus
from partitions.site_plan import PlanError, SitePlan, as_held_out, held_modalities

SITE_LOCAL = "site_local"
HOLDOUT_MODES = ("listed", "named")  # the others choose among sites, which no single site knows


def plan_own_site(corpus: Corpus, site: str, cfg: ExperimentConfig) -> SitePlan:
    """This site's plan: all of its corpus, its stored split, its role from the config."""
    if cfg.sites.holdout not in HOLDOUT_MODES:
        raise PlanError(
            f"sites.holdout={cfg.sites.holdout} needs every site's data in one place; with "
            f"sites.planner={SITE_LOCAL} use sites.holdout=named and sites.holdout_sites"
        )
    manifest = corpus.manifest
    tasks = [t for t in corpus.tasks if not cfg.sites.tasks_only or t in cfg.sites.tasks_only]
    if not tasks:
        raise PlanError(f"site {site}: its corpus holds none of sites.tasks_only={list(cfg.sites.tasks_only)}")
    origins = sorted(manifest["origin_site"].unique().tolist())
    in_tasks = manifest["task"].isin(tasks).to_numpy()
    is_train = (manifest["split"] == "train").to_numpy()
    plan = SitePlan(
        site=site,
        role=Role.TRAIN,
        archetype=SITE_LOCAL,
        origin_site="+".join(origins),
        tasks=tuple(tasks),
        modalities=tuple(corpus.schema.modalities_of(tasks)),
        train_rows=np.flatnonzero(in_tasks & is_train),
        test_rows=np.flatnonzero(in_tasks & ~is_train),
    )
    held = set(cfg.sites.holdout_sites) if cfg.sites.holdout == "named" else set()
    if site in held or plan.origin_site in held:
        plan = as_held_out(plan)
    elif cfg.sites.train_only and site not in cfg.sites.train_only:
        plan = dataclasses.replace(plan, role=Role.ID_EVAL)
    elif plan.n_train < cfg.sites.min_samples:
        raise PlanError(
            f"site {site} has {plan.n_train} training samples, fewer than sites.min_samples="
            f"{cfg.sites.min_samples}; hold it out (sites.holdout_sites) or lower sites.min_samples"
        )
    return held_modalities(plan, corpus)


def site_corpus_folders(folder: str | Path) -> dict[str, Path]:
    """site name -> its corpus folder, for every corpus folder (one holding spec.json) in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlanError(f"corpus.site_corpora={folder} is not a folder of site corpora")
    found = {p.name: p for p in sorted(folder.iterdir()) if (p / "spec.json").is_file() and not p.name.startswith(".")}
    if not found:
        raise PlanError(f"corpus.site_corpora={folder} holds no corpus folder (a folder with spec.json per site)")
    return found


def plan_local_sites(folder: str | Path, cfg: ExperimentConfig) -> list[tuple[SitePlan, Corpus]]:
    """Simulation of site-local mode: each folder's own plan, from its own corpus only."""
    out = [(plan_own_site(corpus, site, cfg), corpus) for site, corpus in _open_all(folder)]
    if not any(p.role == Role.TRAIN for p, _ in out):
        raise PlanError(f"no site of {folder} trains: sites.holdout_sites / sites.train_only leave none")
    return out


def _open_all(folder: str | Path) -> list[tuple[str, Corpus]]:
    return [(site, Corpus.open(path)) for site, path in site_corpus_folders(folder).items()]
