"""The aggregation benchmark runs end to end (--quick) and writes its JSON; no timing assertions."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "aggregation.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_aggregation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_json_with_positive_times(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["clients"] == 10 and report["config"]["quick"] is True
    cases = {"numpy_add_reference", "weighted_mean", "groupwise_weighted_mean", "coordinate_median", "trimmed_mean"}
    assert set(report["results"]) == cases and report["reference"] == "numpy_add_reference"
    for result in report["results"].values():
        assert result["median_s"] > 0 and result["min_s"] > 0 and result["ratio_to_reference"] > 0
        assert len(result["times_s"]) == report["config"]["repeats"]
    assert report["results"]["numpy_add_reference"]["ratio_to_reference"] == 1.0
    assert report["target"]["case"] == "weighted_mean" and isinstance(report["target"]["met"], bool)
    assert report["peak_rss_mb"] > 0
    assert "weighted_mean" in capsys.readouterr().out
