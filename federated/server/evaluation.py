"""From per-site, per-task evaluation results to ID and OOD scores.

  site score          mean over the site's tasks of the task's [0, 1] score
  per_task (ID/OOD)   mean over the training (ID) or held-out (OOD) sites that hold the task,
                      weighted by their test sample counts
  score (ID/OOD)      mean over tasks of per_task (every task counts once, whatever its size)
  gap                 mean over the tasks scored both ID and OOD of (ID - OOD): comparing the
                      same tasks, so a different task mix at the held-out sites cannot pass
                      for a generalisation gap
Tasks whose metric is undefined at a site (e.g. AUROC with one class) are left out there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from federated.core.corpus_schema import CorpusSchema
from federated.core.protocol import Role
from federated.server.results import GroupScores, PerTaskMetrics, RoundSummary, SiteRow, WorstSite


@dataclass
class SiteProfile:
    """What a site said about itself in the handshake."""

    site: str
    role: Role
    archetype: str
    modalities: list[str]
    tasks: list[str]
    n_train: int
    n_test: int
    origin_site: str = ""
    # The schema of the site's corpus (what the model is built for); None for profiles from a plan.
    schema: CorpusSchema | None = field(default=None, repr=False, compare=False)
    version: str = field(default="", repr=False, compare=False)  # the site's multimed-fl version

    def __post_init__(self) -> None:
        self.role = Role(self.role)  # a plan's or a reply's spelling becomes the one enum


@dataclass
class SiteEvaluation:
    """One site's evaluation of the global model in one round."""

    profile: SiteProfile
    per_task: PerTaskMetrics = field(default_factory=dict)  # task -> metric -> value (and "n")
    # The site's personalised model (strategies that keep parameters local), training sites only.
    personal: PerTaskMetrics | None = None
    # A held-out site's test-time-adapted model (ood.adapt), last round only.
    adapted: PerTaskMetrics | None = None

    @property
    def score(self) -> float:
        return _nanmean([m["score"] for m in self.per_task.values()])


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def group_scores(evals: list[SiteEvaluation]) -> GroupScores:
    """Per task, the test-size-weighted mean score of the sites holding it; overall, the mean over tasks."""
    per_task: dict[str, float] = {}
    tasks = sorted({t for e in evals for t in e.per_task})
    for t in tasks:
        pairs = [
            (e.per_task[t]["score"], e.per_task[t]["n"])
            for e in evals
            if t in e.per_task and not math.isnan(e.per_task[t]["score"])
        ]
        if pairs:
            s, n = np.array(pairs).T
            per_task[t] = float(np.average(s, weights=n))
    return GroupScores(_nanmean(list(per_task.values())), per_task)


def _personal_scores(evals: list[SiteEvaluation]) -> GroupScores | None:
    """ID scores of the training sites' personalised models; None when no site keeps one."""
    personal = [
        SiteEvaluation(e.profile, e.personal) for e in evals if e.profile.role == Role.TRAIN and e.personal is not None
    ]
    return group_scores(personal) if personal else None


def _adapted_scores(evals: list[SiteEvaluation]) -> GroupScores | None:
    """OOD scores of the held-out sites' adapted models; None when no site adapted."""
    adapted = [
        SiteEvaluation(e.profile, e.adapted) for e in evals if e.profile.role == Role.HELD_OUT and e.adapted is not None
    ]
    return group_scores(adapted) if adapted else None


def _worst_site(evals: list[SiteEvaluation]) -> WorstSite | None:
    scored = [e for e in evals if not math.isnan(e.score)]
    if not scored:
        return None
    worst = min(scored, key=lambda e: e.score)
    return WorstSite(worst.profile.site, worst.profile.role, worst.score)


def summarize(evals: list[SiteEvaluation]) -> RoundSummary:
    """A round's ID and OOD scores, their gap over the tasks scored both ways, and its worst site."""
    id_scores = group_scores([e for e in evals if e.profile.role.scored_id])
    ood_scores = group_scores([e for e in evals if not e.profile.role.scored_id])
    shared = sorted(set(id_scores.per_task) & set(ood_scores.per_task))
    gap = _nanmean([id_scores.per_task[t] - ood_scores.per_task[t] for t in shared])
    return RoundSummary(
        id_scores, ood_scores, gap, shared, _worst_site(evals), _personal_scores(evals), _adapted_scores(evals)
    )


def _without_counts(per_task: PerTaskMetrics) -> PerTaskMetrics:
    return {t: {k: v for k, v in m.items() if k != "n"} for t, m in per_task.items()}


def site_row(e: SiteEvaluation) -> SiteRow:
    """A site's entry of summary.json's per_site (its metrics without sample counts)."""
    p = e.profile
    personal = e.personal
    return SiteRow(
        p.site,
        p.role,
        p.archetype,
        p.origin_site,
        p.modalities,
        p.tasks,
        p.n_train,
        p.n_test,
        e.score,
        _without_counts(e.per_task),
        SiteEvaluation(p, personal).score if personal is not None else None,
        _without_counts(personal) if personal is not None else None,
        SiteEvaluation(p, e.adapted).score if e.adapted is not None else None,
        _without_counts(e.adapted) if e.adapted is not None else None,
    )


def per_site_rows(evals: list[SiteEvaluation]) -> list[SiteRow]:
    return [site_row(e) for e in evals]
