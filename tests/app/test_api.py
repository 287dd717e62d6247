"""The Python API (federated/app/api.py): what a notebook user calls, with typed results back."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from federated.app import api
from federated.core.config import ConfigError
from federated.server.results import RunSummary


def smoke(corpus: Path) -> api.ExperimentConfig:
    return api.config(
        {"scale": "smoke", "corpus.path": corpus, "rounds": 1, "model.dim": 16, "model.heads": 2, "seed": 3}
    )


def test_a_mapping_of_overrides_is_the_command_line_s_key_value_list(smoke_corpus: Path) -> None:
    cfg = api.config({"scale": "smoke", "train.lr": 0.01, "sites.tasks_only": ["cell_type", "bone_age"]})
    same = api.config(["scale=smoke", "train.lr=0.01", "sites.tasks_only=[cell_type,bone_age]"])
    assert cfg == same
    assert cfg.train.lr == 0.01 and list(cfg.sites.tasks_only) == ["cell_type", "bone_age"]
    with pytest.raises(ConfigError, match="train.lrr"):
        api.config({"train.lrr": 1})
    with pytest.raises(ConfigError, match="not the string"):
        api.config("scale=smoke")  # type: ignore[arg-type]  # a common slip: one string, not a list


def test_run_returns_the_summary_it_writes_and_flower_stays_quiet(smoke_corpus: Path, tmp_path: Path) -> None:
    summary = api.run(smoke(smoke_corpus), tmp_path / "run")
    assert isinstance(summary, RunSummary)
    assert summary.rounds_completed == 1 and 0.0 <= summary.final.id.score <= 1.0
    assert {row.site for row in summary.per_site} == {s for s in api.sites(smoke(smoke_corpus))["site"]}
    assert api.load_summary(tmp_path / "run").to_dict() == summary.to_dict()
    assert logging.getLogger("flwr").level == logging.WARNING
    api.flower_logs(True)
    try:
        assert logging.getLogger("flwr").level == logging.INFO
    finally:
        api.flower_logs(False)


def test_sites_and_plans_describe_the_same_sites(smoke_corpus: Path) -> None:
    cfg = smoke(smoke_corpus)
    frame, plans = api.sites(cfg), api.site_plans(cfg)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["site"]) == [p.site for p in plans]
    assert api.corpus(cfg).schema.task_names == api.corpus(cfg).tasks


def test_a_folder_without_a_finished_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(api.RunError, match="summary.json"):
        api.load_summary(tmp_path)
