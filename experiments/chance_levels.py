"""Chance-level scores of the default experiment's tasks: the bar "clearly above chance" is set against.

For every task, on the same ID (training sites' test splits) and OOD (held-out sites) data and
with the same score mapping and site weighting as `multimed-fl run`, two predictors that never
look at the inputs: the constant one (the training sites' majority class / label rates / mean)
and a uniformly random one (mean of 20 draws). Chance is the better of the two.

    python experiments/chance_levels.py [key=value ...]     # same overrides as multimed-fl run
"""

from __future__ import annotations

import sys

import numpy as np

import strategies  # noqa: F401  (registers every strategy's settings with load_config)
from clients.site_data import SiteData
from federated.core.config import load_config
from federated.core.metrics import task_metrics, unit_score
from federated.core.multimed import (
    BINARY,
    CLOSED_SET,
    MULTICLASS,
    MULTILABEL,
    MULTIMED,
    MULTIMED_TASKS,
    PER_RESIDUE,
    REGRESSION,
)
from federated.core.protocol import Role
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.server.evaluation import SiteEvaluation, SiteProfile, group_scores
from partitions import plan_sites


def _constant_outputs(kind: str, train: np.ndarray, n: int, shape: tuple[int, ...]) -> np.ndarray:
    if kind in (MULTICLASS, CLOSED_SET):
        logits = np.log(np.bincount(train, minlength=shape[-1]) + 1e-9)
        return np.tile(logits, (n, 1))
    if kind == BINARY:
        p = train.mean()
        return np.full(n, np.log(p / (1 - p)))
    if kind == MULTILABEL:
        p = train.mean(0).clip(1e-6, 1 - 1e-6)
        return np.tile(np.log(p / (1 - p)), (n, 1))
    if kind == REGRESSION:
        return np.full(n, train.mean())
    if kind == PER_RESIDUE:
        labels = train[train >= 0]
        logits = np.log(np.bincount(labels, minlength=shape[-1]) + 1e-9)
        return np.broadcast_to(logits, (n, *shape)).copy()
    raise ValueError(kind)


def _random_outputs(
    kind: str, rng: np.random.Generator, train: np.ndarray, n: int, shape: tuple[int, ...]
) -> np.ndarray:
    if kind == REGRESSION:
        return rng.normal(train.mean(), train.std(), size=n)
    return rng.normal(size=(n, *shape)) if shape else rng.normal(size=n)


@np.errstate(invalid="ignore", divide="ignore")
def main(overrides: list[str]) -> None:
    cfg = load_config(overrides)
    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    plans = plan_sites(corpus, cfg)
    data = {p.site: SiteData(corpus, p) for p in plans}
    rng = np.random.default_rng(0)
    rows = {"constant": [], "random": []}
    for p in plans:
        site = data[p.site]
        profile = SiteProfile(p.site, p.role, p.archetype, list(p.modalities), list(p.tasks), p.n_train, p.n_test)
        evs = {k: SiteEvaluation(profile) for k in rows}
        for t in p.tasks:
            test = site.split(t, "test")
            if test is None:
                continue
            task = MULTIMED.task(t)
            scale = site.scales[t]
            train = np.concatenate(
                [data[q.site].split(t, "train").targets.numpy() for q in plans if q.role == Role.TRAIN and t in q.tasks]
            )
            target = test.targets.numpy()
            if task.target == REGRESSION:
                train, target = train * scale.std + scale.mean, target * scale.std + scale.mean
            n = len(test)
            shape = (
                (task.label_shape[0], task.n_outputs)
                if task.target == PER_RESIDUE
                else ((task.n_outputs,) if task.n_outputs > 1 else ())
            )
            const = _constant_outputs(task.target, train, n, shape)
            m = task_metrics(task, const, target)
            evs["constant"].per_task[t] = {"score": unit_score(task, m, scale.mad), "n": n}
            draws = [
                unit_score(
                    task, task_metrics(task, _random_outputs(task.target, rng, train, n, shape), target), scale.mad
                )
                for _ in range(20)
            ]
            evs["random"].per_task[t] = {"score": float(np.nanmean(draws)), "n": n}
        for k in rows:
            rows[k].append(evs[k])
    print(f"{'task':32s} {'metric':11s} {'ID const':>9s} {'ID rand':>8s} {'OOD const':>10s} {'OOD rand':>9s}")
    summary = {
        k: {g: group_scores([e for e in v if (e.profile.role == Role.TRAIN) == (g == "id")]) for g in ("id", "ood")}
        for k, v in rows.items()
    }
    for t in MULTIMED_TASKS:
        vals = [summary[k][g].per_task.get(t, float("nan")) for g in ("id", "ood") for k in ("constant", "random")]
        print(f"{t:32s} {MULTIMED.task(t).primary_metric:11s} " + " ".join(f"{v:9.3f}" for v in vals))


if __name__ == "__main__":
    main(sys.argv[1:])
