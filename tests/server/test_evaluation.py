import math

import pytest

from federated.core.protocol import Role
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize


def _site(name, role, scores):
    tasks = list(scores)
    ev = SiteEvaluation(SiteProfile(name, role, "x", [], tasks, 10, 10))
    for t, (s, n) in scores.items():
        ev.per_task[t] = {"score": s, "n": n}
    return ev


def test_summary_by_hand():
    evals = [
        _site("a", Role.TRAIN, {"t1": (0.8, 10), "t2": (0.6, 30)}),
        _site("b", Role.TRAIN, {"t1": (0.4, 30)}),
        _site("c", Role.HELD_OUT, {"t1": (0.3, 5), "t2": (math.nan, 5)}),
    ]
    s = summarize(evals)
    # ID t1 = (0.8*10 + 0.4*30)/40 = 0.5; ID t2 = 0.6; ID score = 0.55
    assert s.id.per_task == pytest.approx({"t1": 0.5, "t2": 0.6})
    assert s.id.score == pytest.approx(0.55)
    # OOD: t2 undefined at c -> left out
    assert s.ood.per_task == pytest.approx({"t1": 0.3})
    # gap over shared tasks only: t1: 0.5 - 0.3
    assert s.gap == pytest.approx(0.2) and s.gap_tasks == ["t1"]
    assert s.worst_site is not None and s.worst_site.to_dict() == {
        "site": "c",
        "role": "held_out",
        "score": pytest.approx(0.3),
    }
    assert s.id_personal is None  # no site keeps a personal model
    assert evals[0].score == pytest.approx(0.7)
