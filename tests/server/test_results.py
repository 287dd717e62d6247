"""Typed results: summary.json, the end-of-run tables and metrics.parquet are what they were before
the results became dataclasses, and a summary reads back as it was written."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from rich.console import Console

from federated.core.config import load_config
from federated.core.io import write_json
from federated.core.multimed import MULTIMED, CorpusSchema
from federated.core.protocol import Role
from federated.server.evaluation import SiteEvaluation, SiteProfile, summarize
from federated.server.outputs import build_summary, print_report
from federated.server.records import FederationResult, FederationTiming, RoundRecord, TrainStats
from federated.server.results import RunSummary
from federated.server.tracking import MetricsTable

SCHEMA = MULTIMED.restrict(["bone_age", "cell_type"])
# Written by the code before this change (dict summaries) for exactly the input built below.
GOLDEN = Path(__file__).parent / "data" / "summary_before_typing.json"

PROFILES = {
    "site_a": SiteProfile(
        "site_a", Role.TRAIN, "imaging_centre", ["xray"], ["bone_age", "cell_type"], 40, 10, "site_a"
    ),
    "site_b": SiteProfile("site_b", Role.TRAIN, "genomics_lab", ["scrna"], ["cell_type"], 30, 8, "site_b"),
    "site_c": SiteProfile(
        "site_c", Role.HELD_OUT, "eye_clinic", ["xray", "scrna"], ["bone_age", "cell_type"], 0, 12, "site_x"
    ),
    "site_d": SiteProfile("site_d", Role.ID_EVAL, "neuro_clinic", ["scrna"], ["cell_type"], 20, 6, "site_d"),
}


def _evals(shift: float) -> list[SiteEvaluation]:
    """Four sites: two training sites with personalised models, one held out (a NaN metric), one id_eval."""
    p = PROFILES
    return [
        SiteEvaluation(
            p["site_a"],
            {
                "bone_age": {"mae": 12.5 - shift, "score": 0.5 + shift, "n": 10.0},
                "cell_type": {"macro_f1": 0.25, "score": 0.25, "n": 10.0},
            },
            personal={
                "bone_age": {"mae": 11.0, "score": 0.625 + shift, "n": 10.0},
                "cell_type": {"macro_f1": 0.5, "score": 0.5, "n": 10.0},
            },
        ),
        SiteEvaluation(
            p["site_b"],
            {"cell_type": {"macro_f1": 0.125 + shift, "score": 0.125 + shift, "n": 8.0}},
            personal={"cell_type": {"macro_f1": 0.375, "score": 0.375, "n": 8.0}},
        ),
        SiteEvaluation(
            p["site_c"],
            {
                "bone_age": {"mae": 30.0, "score": 0.1 + shift, "n": 12.0},
                "cell_type": {"macro_f1": math.nan, "score": math.nan, "n": 12.0},
            },
        ),
        SiteEvaluation(p["site_d"], {"cell_type": {"macro_f1": 0.75, "score": 0.75 - shift, "n": 6.0}}),
    ]


def _result() -> FederationResult:
    """Two rounds with everything a summary reports: failures, rejections, a skipped round, DP spend."""
    e0, e1, e2 = _evals(0.0), _evals(0.0625), _evals(0.125)
    initial = RoundRecord(0, e0, summarize(e0), failures={"evaluate:site_b": "no reply within 5.0 s"})
    r1 = RoundRecord(
        1,
        e1,
        summarize(e1),
        train={"site_a": TrainStats(1.5, 40.0, 4.0), "site_b": TrainStats(2.25, 30.0, 3.0)},
        failures={"train:site_d": "boom"},
        rejections={"site_b": "non-finite update"},
        privacy={
            "site_a": {"epsilon": 1.5, "delta": 1e-05, "steps": [4], "accountant": "rdp"},
            "site_b": {"epsilon": 2.0, "delta": 1e-05, "steps": [3], "accountant": "rdp"},
        },
        train_s=1.0,
        aggregate_s=0.5,
    )
    r2 = RoundRecord(
        2,
        e2,
        summarize(e2),
        train={"site_a": TrainStats(1.25, 40.0, 4.0)},
        rejections={"site_a": "norm too large", "site_b": "non-finite update"},
        skipped=True,
        privacy={"site_a": {"epsilon": 2.5, "delta": 1e-05, "steps": [4, 4], "accountant": "rdp"}},
        train_s=1.25,
        aggregate_s=0.25,
    )
    return FederationResult(
        list(PROFILES.values()),
        initial,
        [r1, r2],
        ArrayRecord(),
        FederationTiming(train_s=2.25, aggregate_s=0.75, evaluate_s=0.5, wall_s=4.0),
    )


def _summary(schema: CorpusSchema | None = None) -> RunSummary:
    """The golden summary; with `schema`, as a run whose sites agreed on it (a `tasks` section)."""
    result = dataclasses.replace(_result(), schema=schema)
    summary = build_summary(load_config(["scale=smoke", "seed=3"]), result, 5.5)
    return dataclasses.replace(summary, corpus="/data/corpus", resumed_from_round=1)


def test_summary_json_is_byte_for_byte_what_it_was_before_typing(tmp_path):
    write_json(tmp_path / "summary.json", _summary().to_dict())
    assert (tmp_path / "summary.json").read_text() == GOLDEN.read_text()


def test_a_summary_reads_back_as_it_was_written():
    raw = json.loads(GOLDEN.read_text())
    back = RunSummary.from_dict(raw)
    assert back.final.worst_site is not None and back.final.worst_site.role is Role.HELD_OUT
    assert math.isnan(back.per_site[2].per_task["cell_type"]["score"])  # null in JSON is NaN again
    assert back.failures == {0: {"evaluate:site_b": "no reply within 5.0 s"}, 1: {"train:site_d": "boom"}}
    assert back.max_epsilon() == 2.5
    assert json.dumps(back.to_dict(), allow_nan=True) == json.dumps(_summary().to_dict(), allow_nan=True)


def test_optional_fields_are_left_out_not_written_as_null():
    summary = dataclasses.replace(_summary(), corpus=None, resumed_from_round=None)
    out = summary.to_dict()
    assert "corpus" not in out and "resumed_from_round" not in out
    plain = next(r for r in out["per_site"] if r["site"] == "site_c")
    assert "personal_score" not in plain and "personal_per_task" not in plain
    assert RunSummary.from_dict(json.loads(json.dumps(out))).corpus is None


def test_every_role_is_labelled_as_the_summary_scores_it():
    buf = io.StringIO()
    print_report(_summary(SCHEMA), Path("/out"), Console(file=buf, width=200))
    lines = {line.split("│")[1].strip(): line for line in buf.getvalue().splitlines() if line.startswith("│ site_")}
    assert "│ ID        │" in lines["site_a"] and "│ ID (eval) │" in lines["site_d"] and "│ OOD " in lines["site_c"]
    cell_type = next(line for line in buf.getvalue().splitlines() if line.startswith("│ cell_type"))
    assert cell_type.split("│")[5].strip() == "3"  # the id_eval site counts as an ID site
    assert Role.ID_EVAL.scored_id and not Role.HELD_OUT.scored_id


def test_the_summary_carries_the_tasks_of_the_schema_and_reads_them_back():
    summary = _summary(SCHEMA)
    out = json.loads(json.dumps(summary.to_dict()))
    assert list(out["tasks"]) == ["bone_age", "cell_type"]  # schema order
    assert out["tasks"]["bone_age"] == {
        "inputs": ["xray"],
        "target": "regression",
        "metrics": ["mae"],
        "classes": [],
        "label_shape": [],
        "unit": "months",
        "description": "images + CSV",
        "multimed": True,
    }
    listed = [{"name": name, **task} for name, task in out["tasks"].items()]
    assert CorpusSchema.from_dict({"modalities": SCHEMA.to_dict()["modalities"], "tasks": listed}) == SCHEMA
    assert RunSummary.from_dict(out).tasks == out["tasks"]
    # the task table reads the primary metric from the summary, not from a global catalogue
    buf = io.StringIO()
    print_report(summary, Path("/out"), Console(file=buf, width=200))
    bone_age = next(line for line in buf.getvalue().splitlines() if line.startswith("│ bone_age"))
    assert bone_age.split("│")[2].strip() == "mae"


def test_metrics_table_rows_from_typed_records(tmp_path):
    table = MetricsTable(tmp_path / "metrics.parquet")
    result = _result()
    table.on_round_end(result.history[0])
    rows = [r for r in table.rows if r["task"] == "*"]
    assert [(r["site"], r["metric"], r["value"]) for r in rows] == [
        ("site_b", "update_rejected", 1.0),
        ("site_d", "train_failed", 1.0),
        ("site_a", "train_loss", 1.5),
        ("site_b", "train_loss", 2.25),
        ("site_a", "epsilon", 1.5),
        ("site_b", "epsilon", 2.0),
    ]
    assert {r["metric"] for r in table.rows if r["site"] == "site_a"} >= {"personal_mae", "personal_score"}
    table.on_round_end(dataclasses.replace(result.history[0], evaluations=[]))
    assert table.rows[-1]["role"] == Role.TRAIN == "train"  # a site that did not evaluate: a training site


def test_summarize_scores_id_eval_sites_as_id_and_reads_role_strings():
    evals = _evals(0.0)
    s = summarize(evals)
    assert s.id.per_task["cell_type"] == pytest.approx((0.25 * 10 + 0.125 * 8 + 0.75 * 6) / 24)
    assert s.id_personal is not None and s.id_personal.per_task["cell_type"] == pytest.approx(
        (0.5 * 10 + 0.375 * 8) / 18
    )  # training sites' personal models only
    assert SiteProfile("x", "held_out", "a", [], [], 0, 0).role is Role.HELD_OUT  # type: ignore[arg-type]  # a plain string on purpose
