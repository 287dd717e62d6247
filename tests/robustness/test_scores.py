"""Wrong scores never exit 0: a diverged model is not scored, a site that fails every round or a task
that disappears is printed and makes `multimed-fl run` exit non-zero (unless
engine.allow_site_failures=true), and infinite epsilon is written as "inf" with a flag, never null."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from rich.console import Console

from clients.site_data import SiteData
from clients.trainer import NonFiniteOutputError, check_finite_outputs, evaluate_site
from federated.app.cli import main
from federated.core.config import load_config
from federated.core.io import write_json
from federated.core.models import build_model
from federated.core.protocol import Role
from federated.data.format import Corpus
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize
from federated.server.outputs import build_summary, exit_code, print_report, run_problems
from federated.server.records import FederationResult, FederationTiming, RoundRecord
from federated.server.results import RunSummary
from partitions import plan_sites

# ------------------------------------------------------------------- a diverged model is refused --


def test_non_finite_outputs_are_counted_in_the_error():
    out = np.zeros((4, 3), dtype=np.float32)
    out[0, 1], out[2, 0], out[3, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(
        NonFiniteOutputError, match=r"^site site_07, task bone_age: 3 of 12 model outputs are not finite"
    ):
        check_finite_outputs("site_07", "bone_age", out)
    check_finite_outputs("site_07", "bone_age", np.full((4, 3), 3e38, dtype=np.float32))  # large but finite


def test_a_diverged_model_gets_no_score(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    cfg = load_config(["scale=smoke"])
    plan = plan_sites(corpus, cfg)[0]
    data = SiteData(corpus, plan)
    model = build_model(cfg.model, data.schema, cfg.seed)
    clean = evaluate_site(model, data)  # the same model, finite: scored as before
    assert set(clean) == set(plan.tasks) and all(0.0 <= m["score"] <= 1.0 for m in clean.values())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("heads."):
                p.fill_(math.inf)
    with pytest.raises(
        NonFiniteOutputError, match=rf"site {plan.site}, task {plan.tasks[0]}: \d+ of \d+ model outputs"
    ):
        evaluate_site(model, data)


# ------------------------------------------------------------------------- end-of-run problems --

PROFILES = [
    SiteProfile("site_a", Role.TRAIN, "imaging_centre", ["xray"], ["bone_age", "cell_type"], 40, 10, "site_a"),
    SiteProfile("site_b", Role.TRAIN, "genomics_lab", ["scrna"], ["cell_type"], 30, 8, "site_b"),
    SiteProfile("site_c", Role.HELD_OUT, "imaging_centre", ["xray"], ["bone_age"], 0, 12, "site_c"),
]


def _evals(sites: set[str]) -> list[SiteEvaluation]:
    scores = {
        "site_a": {
            "bone_age": {"mae": 10.0, "score": 0.5, "n": 10.0},
            "cell_type": {"macro_f1": 0.4, "score": 0.4, "n": 10.0},
        },
        "site_b": {"cell_type": {"macro_f1": 0.2, "score": 0.2, "n": 8.0}},
        "site_c": {"bone_age": {"mae": 20.0, "score": 0.25, "n": 12.0}},
    }
    return [SiteEvaluation(p, scores[p.site]) for p in PROFILES if p.site in sites]


def _result(rounds: list[tuple[set[str], dict[str, str]]]) -> FederationResult:
    """Round 0 with every site scored, then one record per (sites scored, failures)."""
    everyone = {p.site for p in PROFILES}
    e0 = _evals(everyone)
    history = []
    for rnd, (sites, failures) in enumerate(rounds, start=1):
        e = _evals(sites)
        history.append(RoundRecord(rnd, e, summarize(e), failures=failures))
    return FederationResult(PROFILES, RoundRecord(0, e0, summarize(e0)), history, ArrayRecord(), FederationTiming())


def test_a_clean_run_has_no_problems():
    everyone = {"site_a", "site_b", "site_c"}
    assert run_problems(_result([(everyone, {}), (everyone, {"train:site_b": "late"})])) == []


def test_a_site_failing_every_round_is_a_problem():
    failing = {"site_a", "site_c"}
    result = _result(
        [(failing, {"evaluate:site_b": "NonFiniteOutputError: 40 of 40"}), (failing, {"train:site_b": "boom"})]
    )
    assert run_problems(result) == ["site site_b failed in every round (2); last: boom"]


def test_a_site_failing_only_some_rounds_is_not():
    everyone = {"site_a", "site_b", "site_c"}
    assert run_problems(_result([(everyone, {"train:site_a": "boom"}), (everyone, {})])) == []


def test_a_task_that_disappears_is_a_problem():
    # site_c fails to evaluate in the last round: bone_age is no longer scored OOD
    result = _result([({"site_a", "site_b", "site_c"}, {}), ({"site_a", "site_b"}, {"evaluate:site_c": "x"})])
    assert run_problems(result) == ["task bone_age was scored OOD in round 0 but not in round 2"]


def test_problems_are_written_printed_and_set_the_exit_code(tmp_path):
    failing = {"site_a", "site_c"}
    result = _result([(failing, {"train:site_b": "boom"})])
    summary = build_summary(load_config(["scale=smoke"]), result, 1.0)
    write_json(tmp_path / "summary.json", summary.to_dict())
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["problems"] == ["site site_b failed in every round (1); last: boom"]
    assert RunSummary.from_dict(raw).problems == summary.problems
    buf = io.StringIO()
    print_report(summary, Path("/out"), Console(file=buf, width=200))
    assert "incomplete (1 problem(s))" in buf.getvalue() and "site site_b failed in every round" in buf.getvalue()
    assert exit_code(summary, allow_site_failures=False) == 1
    assert exit_code(summary, allow_site_failures=True) == 0


def test_a_clean_summary_has_no_problems_key():
    everyone = {"site_a", "site_b", "site_c"}
    summary = build_summary(load_config(["scale=smoke"]), _result([(everyone, {})]), 1.0)
    assert "problems" not in summary.to_dict()


# ------------------------------------------------------------------------------ infinite epsilon --


def test_infinite_epsilon_is_written_as_inf_with_a_flag(tmp_path):
    everyone = {"site_a", "site_b", "site_c"}
    result = _result([(everyone, {})])
    result.history[0].privacy = {
        "site_a": {"epsilon": math.inf, "delta": 1e-5},
        "site_b": {"epsilon": 1.5, "delta": 1e-5},
    }
    write_json(tmp_path / "summary.json", build_summary(load_config(["scale=smoke"]), result, 1.0).to_dict())
    text = (tmp_path / "summary.json").read_text()
    raw = json.loads(text)
    assert raw["privacy"]["site_a"] == {"epsilon": "inf", "epsilon_infinite": True, "delta": 1e-5}
    assert raw["privacy"]["site_b"] == {"epsilon": 1.5, "delta": 1e-5}
    assert "null" not in text.split('"privacy"')[1].split('"failures"')[0]
    back = RunSummary.from_dict(raw)
    assert back.privacy["site_a"] == {"epsilon": math.inf, "delta": 1e-5} and back.max_epsilon() == math.inf


# ------------------------------------------------------------------------------- whole runs ----


@pytest.mark.slow
def test_a_site_whose_training_crashes_every_round_exits_non_zero(tmp_path, capsys, smoke_corpus):
    base = ["run", "--no-progress", "scale=smoke", "rounds=2", f"corpus.path={smoke_corpus}"]
    crash = ["faults.kind=crash", "faults.sites=[site_03]"]
    out = tmp_path / "crash"
    assert main([*base, "--out", str(out), *crash]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert "site site_03 failed in every round (2)" in printed and "SimulatedCrash" in printed
    summary = json.loads((out / "summary.json").read_text())  # written all the same
    assert summary["problems"][0].startswith("site site_03 failed in every round (2)")
    allowed = tmp_path / "allowed"
    assert main([*base, "--out", str(allowed), *crash, "engine.allow_site_failures=true"]) == 0
    assert json.loads((allowed / "summary.json").read_text())["problems"] == summary["problems"]


@pytest.mark.slow
def test_a_clean_run_exits_zero_with_no_problems(tmp_path, smoke_corpus):
    out = tmp_path / "clean"
    assert (
        main(["run", "--no-progress", "--out", str(out), "scale=smoke", "rounds=2", f"corpus.path={smoke_corpus}"]) == 0
    )
    assert "problems" not in json.loads((out / "summary.json").read_text())


def test_a_diverged_global_model_is_an_evaluation_failure_with_the_count(smoke_corpus):
    """Through the ClientApp and the round loop: every site reports an error naming the count, none a score."""
    from clients.client_app import app as client_app
    from federated.core.config import config_to_yaml
    from federated.engines.inprocess import InProcessGrid
    from federated.server.handshake import handshake
    from federated.server.round_evaluation import evaluate_all

    cfg = load_config(["scale=smoke"])
    run_config = {"multimed-config": config_to_yaml(cfg), "corpus-path": str(smoke_corpus)}
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(10)], run_config)
    profiles = handshake(grid)
    weights = build_model(cfg.model, Corpus.open(smoke_corpus).schema, cfg.seed).state_dict()
    for k, v in weights.items():
        if k.startswith("heads."):
            v.fill_(math.nan)
    evals, failures = evaluate_all(grid, ArrayRecord(weights), 1, profiles)
    assert evals == [] and sorted(failures) == sorted(p.site for p in profiles.values())
    for site, reason in failures.items():
        assert f"site {site}, task " in reason and "model outputs are not finite" in reason, reason
