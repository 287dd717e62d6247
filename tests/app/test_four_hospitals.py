"""Four hospitals, one table, one data dictionary (issue 29): each hospital ingests only its own
rows; the site-local run over their four corpora (what a deployment runs: tests/engines/
test_deployment.py shows the deployed run equals it to 1e-6) equals a natural-sites simulation of
the whole table with the same split, and a hospital that ingests without the dictionary, so
with its own reference levels, is refused by name at the handshake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federated.app.cli import main
from tests.app.test_bring_your_own import HOSPITALS, RUN, clinical_csv, sepsis_spec

HELD = ["sites.holdout=named", "sites.holdout_sites=[lakeview]", "sites.min_site_size=10"]


def _spec_with_split(folder: Path, table: str, dictionary: bool = True) -> Path:
    """The README's sepsis spec, reading the table's own `split` column (so every ingest splits alike)."""
    spec = sepsis_spec(folder, table, dictionary=dictionary)
    raw = json.loads(spec.read_text())
    raw["sources"][0]["split_column"] = "split"
    spec.write_text(json.dumps(raw))
    return spec


def _ingest(spec: Path, out: Path) -> None:
    assert main(["corpus", "ingest", str(spec), "--out", str(out)]) == 0


def _run(out: Path, *overrides: str) -> dict:
    assert main(["run", "--out", str(out), "--no-progress", *RUN, *HELD, *overrides]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("four_hospitals")
    table = pd.read_csv(clinical_csv(root / "icu.csv"))
    table["split"] = np.where(np.random.default_rng(1).random(len(table)) < 0.25, "test", "train")
    table.to_csv(root / "table.csv", index=False)  # (the spec would write icu.csv afresh)
    _ingest(_spec_with_split(root, "table.csv"), root / "whole")
    for hospital in HOSPITALS:
        table[table["hospital"] == hospital].to_csv(root / f"{hospital}.csv", index=False)
        _ingest(_spec_with_split(root, f"{hospital}.csv"), root / "sites" / hospital)
    return root


@pytest.mark.slow
def test_hospitals_ingesting_their_own_rows_train_the_model_the_pooled_table_trains(hospitals: Path, tmp_path) -> None:
    simulated = _run(tmp_path / "natural", f"corpus.path={hospitals / 'whole'}", "sites.planner=natural")
    local = _run(tmp_path / "local", f"corpus.site_corpora={hospitals / 'sites'}", "sites.planner=site_local")
    assert sorted(r["site"] for r in simulated["per_site"]) == sorted(HOSPITALS)  # the hospitals' own names
    stats_sim, stats_local = simulated["feature_statistics"]["clinical"], local["feature_statistics"]["clinical"]
    for key in ("mean", "std", "fill", "n"):
        np.testing.assert_allclose(stats_local[key], stats_sim[key], rtol=0, atol=1e-9)
    by_site = {r["site"]: r for r in local["per_site"]}
    for row in simulated["per_site"]:
        mine = by_site[row["site"]]
        assert (mine["role"], mine["n_train"], mine["n_test"]) == (row["role"], row["n_train"], row["n_test"])
        for task, metrics in row["per_task"].items():
            for name, value in metrics.items():
                assert mine["per_task"][task][name] == pytest.approx(value, abs=1e-6), (row["site"], name)
    assert local["final"]["ood"]["score"] == pytest.approx(simulated["final"]["ood"]["score"], abs=1e-6)


def test_a_hospital_that_ingests_without_the_dictionary_is_refused_by_name(hospitals: Path, tmp_path, capsys) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(hospitals / "sites", sites)
    shutil.rmtree(sites / "lakeview")  # lakeview has more men: its own reference level for sex is M
    _ingest(_spec_with_split(hospitals, "lakeview.csv", dictionary=False), sites / "lakeview")
    overrides = [f"corpus.site_corpora={sites}", "sites.planner=site_local", "rounds=1"]
    code = main(["run", "--out", str(tmp_path / "refused"), "--no-progress", *RUN, *HELD, *overrides])
    err = capsys.readouterr().err
    assert code != 0
    assert "site lakeview" in err and "feature 10 is 'sex=F'" in err and "data dictionary" in err
    left_out = _run(tmp_path / "excluded", *overrides, "engine.on_incompatible_site=exclude")
    assert "lakeview" not in {r["site"] for r in left_out["per_site"]}


@pytest.mark.slow
def test_the_statistics_round_runs_under_ray_as_in_process(hospitals: Path, tmp_path) -> None:
    """`federated` is the default in every engine: under Ray the same round gives the same
    statistics and scores (the apps are the same; Ray only moves the messages)."""
    from federated.engines.ray_engine import ray_processes

    whole = [f"corpus.path={hospitals / 'whole'}", "sites.planner=natural", "rounds=1"]
    runs = {engine: _run(tmp_path / engine, *whole, f"engine={engine}") for engine in ("inprocess", "ray")}
    a, b = runs["inprocess"], runs["ray"]
    assert b["engine"] == "ray" and b["preprocess"]["statistics"] == "federated"
    for key in ("mean", "std", "fill", "n"):
        np.testing.assert_allclose(b["feature_statistics"]["clinical"][key], a["feature_statistics"]["clinical"][key])
    for group in ("id", "ood"):
        assert b["final"][group]["score"] == pytest.approx(a["final"][group]["score"], abs=1e-6)
    assert not ray_processes()
