"""Missing modalities: sites that lack a modality entirely, and samples that lack one.

A planner step, applied to every site (a held-out hospital may lack a scanner too). Only the
modalities of multimodal tasks are ever masked, and never all of a sample's modalities, so
every sample keeps at least one input:
  site rate r_s   each (site, multimodal task) loses one of its input modalities with
                  probability r_s, chosen at random; the site then lacks it for that task
  sample rate r_p each remaining input of each multimodal-task sample is masked with
                  probability r_p; if that would mask all of them, one (at random) is kept
For a two-input task the expected masked share per modality is r_p (1 - r_p / 2) (both masked
happens with r_p^2, and then one of the two comes back). Masked rows are listed per modality in
SitePlan.masked; the data is not copied or changed:
SiteData gives those samples zeros with present=False, which the fusion block masks out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from federated.data.format import Corpus
from partitions.index import manifest_index
from partitions.site_plan import STEPS, SitePlan, Step
from partitions.steps import step_rng


def apply_missing_modalities(
    plans: list[SitePlan], corpus: Corpus, site_rate: float, sample_rate: float, seed: int
) -> list[SitePlan]:
    index = manifest_index(corpus)
    out = []
    for p in plans:
        masked: dict[str, list[np.ndarray]] = {}
        rows = np.concatenate([p.train_rows, p.test_rows])
        for t in p.tasks:
            inputs = corpus.schema.task(t).inputs
            if len(inputs) < 2:
                continue
            rng = step_rng(seed, "missing", p.site, t)
            of_task = rows[index.task_rows(rows, t)]
            keep = np.ones((len(of_task), len(inputs)), dtype=bool)
            available = list(range(len(inputs)))
            if rng.random() < site_rate:
                available.remove(int(rng.integers(len(inputs))))
            keep[:, [j for j in range(len(inputs)) if j not in available]] = False
            keep &= rng.random(keep.shape) >= sample_rate
            none_left = np.flatnonzero(~keep.any(axis=1))
            if len(none_left):  # every sample keeps one input the site has
                keep[none_left, rng.choice(available, size=len(none_left))] = True
            for j, m in enumerate(inputs):
                if (~keep[:, j]).any():
                    masked.setdefault(m, []).append(of_task[~keep[:, j]])
        out.append(dataclasses.replace(p, masked={m: np.sort(np.concatenate(v)) for m, v in masked.items()}))
    return out


STEPS.add(
    "missing_modalities",
    Step(
        lambda plans, corpus, cfg: apply_missing_modalities(
            plans, corpus, cfg.sites.missing_site_rate, cfg.sites.missing_sample_rate, cfg.corpus.seed
        ),
        lambda cfg: bool(cfg.sites.missing_site_rate or cfg.sites.missing_sample_rate),
    ),
)
