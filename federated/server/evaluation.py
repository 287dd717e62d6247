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
from typing import Any

import numpy as np

ID, OOD = "id", "ood"


@dataclass
class SiteProfile:
    site: str
    role: str
    archetype: str
    modalities: list[str]
    tasks: list[str]
    n_train: int
    n_test: int
    origin_site: str = ""


@dataclass
class SiteEvaluation:
    profile: SiteProfile
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    # The site's personalised model (strategies that keep parameters local), training sites only.
    personal: dict[str, dict[str, float]] | None = None

    @property
    def score(self) -> float:
        return _nanmean([m["score"] for m in self.per_task.values()])


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def group_scores(evals: list[SiteEvaluation]) -> dict[str, Any]:
    per_task: dict[str, float] = {}
    tasks = sorted({t for e in evals for t in e.per_task})
    for t in tasks:
        pairs = [(e.per_task[t]["score"], e.per_task[t]["n"]) for e in evals
                 if t in e.per_task and not math.isnan(e.per_task[t]["score"])]
        if pairs:
            s, n = np.array(pairs).T
            per_task[t] = float(np.average(s, weights=n))
    return {"score": _nanmean(list(per_task.values())), "per_task": per_task}


ID_ROLES = ("train", "id_eval")  # id_eval: a training site that does not train this run (local-only)


def summarize(evals: list[SiteEvaluation], train_role: str = "train") -> dict[str, Any]:
    id_scores = group_scores([e for e in evals if e.profile.role in ID_ROLES])
    ood_scores = group_scores([e for e in evals if e.profile.role not in ID_ROLES])
    shared = sorted(set(id_scores["per_task"]) & set(ood_scores["per_task"]))
    gap = _nanmean([id_scores["per_task"][t] - ood_scores["per_task"][t] for t in shared])
    personal = [SiteEvaluation(e.profile, e.personal) for e in evals
                if e.profile.role == train_role and e.personal is not None]
    scored = [e for e in evals if not math.isnan(e.score)]
    worst = min(scored, key=lambda e: e.score) if scored else None
    return {
        ID: id_scores,
        OOD: ood_scores,
        **({"id_personal": group_scores(personal)} if personal else {}),
        "gap": gap,
        "gap_tasks": shared,
        "worst_site": ({"site": worst.profile.site, "role": worst.profile.role, "score": worst.score}
                       if worst else None),
    }


def per_site_rows(evals: list[SiteEvaluation]) -> list[dict[str, Any]]:
    return [{
        "site": e.profile.site, "role": e.profile.role, "archetype": e.profile.archetype,
        "origin_site": e.profile.origin_site, "modalities": e.profile.modalities,
        "tasks": e.profile.tasks, "n_train": e.profile.n_train, "n_test": e.profile.n_test,
        "score": e.score,
        "per_task": {t: {k: v for k, v in m.items() if k != "n"} for t, m in e.per_task.items()},
        **({"personal_score": SiteEvaluation(e.profile, e.personal).score,
            "personal_per_task": {t: {k: v for k, v in m.items() if k != "n"} for t, m in e.personal.items()}}
           if e.personal is not None else {}),
    } for e in evals]
