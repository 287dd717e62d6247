"""`multimed-fl bench --quick`: every benchmark runs and lands in bench.json and bench.md."""

from __future__ import annotations

import json

import pytest

from federated.app.bench import available, run_benchmarks


@pytest.mark.slow
def test_quick_bench_runs_every_benchmark(tmp_path):
    results = run_benchmarks(tmp_path, quick=True)
    assert set(results) == set(available()) >= {"aggregation", "site_planning", "dp_step", "engines"}
    for name, entry in results.items():
        assert entry["returncode"] == 0, (name, (tmp_path / f"{name}.log").read_text()[-2000:])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["quick"] is True and set(saved["benchmarks"]) == set(results)
    table = (tmp_path / "bench.md").read_text()
    for figure in (
        "FedAvg aggregation / numpy floor",
        "DP-SGD step / plain step (ew)",
        "in-process engine / plain PyTorch loop",
        "plan 100 sites (natural)",
    ):
        assert figure in table
