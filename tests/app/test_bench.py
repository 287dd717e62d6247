"""`multimed-fl bench --quick`: every benchmark runs and lands in bench.json and bench.md."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from federated.app.bench import available, bench_dir, headline, run_benchmarks


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
        "SecAgg+ round / plain round, 10 sites (every site a neighbour)",
    ):
        assert figure in table
    secure = results["secure_aggregation"]["result"]["sites"]
    assert set(secure) == {"3", "10"}
    for v in secure.values():  # the masked vector: int64, one entry per parameter, group weight and factor
        assert v["plain_bytes"] == 4 * v["parameters"] and v["masked_bytes"] > 8 * v["parameters"]
        assert v["ratio"] == pytest.approx(
            statistics.median(v["secure_round_s"]) / statistics.median(v["plain_round_s"])
        )


GPU = bench_dir() / "gpu.py"


def _gpu(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(GPU), "--out", str(out), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # a fresh interpreter running the benchmark script
@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the skip on a machine without CUDA")
def test_gpu_bench_without_a_gpu_says_it_skipped_and_exits_0(tmp_path):
    result, stdout = _gpu(tmp_path)
    assert result["skipped"] == "no CUDA device (torch.cuda.is_available() is False)"
    assert stdout.startswith("gpu: skipped: no CUDA device")
    assert headline("gpu", result) == [("GPU figures", f"skipped: {result['skipped']}", "")]


@pytest.mark.slow
def test_gpu_bench_measures_every_figure_when_run_on_the_cpu(tmp_path):
    """The script's own code paths, on the device this machine has (GPU figures need a GPU)."""
    result, stdout = _gpu(tmp_path, "--device", "cpu", "--quick")
    assert result["device"] == "cpu" and "skipped" not in result
    e, d = result["engine"], result["dp_step"]
    assert e["plain_s"] > 0 and e["inprocess_s"] > 0 and e["ratio"] == e["inprocess_s"] / e["plain_s"]
    assert d["round_plain_ms"] > 0 and d["ratio"] == d["round_private_ms"] / d["round_plain_ms"]
    assert len(d["per_task_ms"]) == 2
    models = result["throughput"]
    assert set(models) == {"default", "resnet18_32px"}
    assert all(m["fp32_samples_per_s"] > 0 and m["bf16_samples_per_s"] > 0 for m in models.values())
    assert models["resnet18_32px"]["parameters"] > 11_000_000
    rows = headline("gpu", result)
    assert rows[0][0] == "in-process engine / plain loop, on cpu (cpu)" and rows[0][2] == "<= 1.15x"
    assert "DP-SGD step / plain step" in stdout
