"""`multimed-fl bench [--quick] --out DIR`: every benchmark under experiments/bench/, one table.

Each benchmark is a script that measures its ratios side by side in one run and writes JSON
(`--out`); this runs them one after another (never in parallel: they time things), keeps
each one's JSON in DIR/<name>.json and its output in DIR/<name>.log, and writes DIR/bench.json
(all results) and DIR/bench.md (the headline figures). A benchmark that fails is reported as
failed, with its log, and the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from federated.core.io import atomic_write_text, write_json
from federated.core.resources import shipped_dir

ORDER = [
    "aggregation",
    "site_planning",
    "dp_step",
    "ingest",
    "ingest_scale",
    "engines",
    "deployment",
    "secure_aggregation",
    "gpu",
]


def environment() -> dict[str, Any]:
    """What a benchmark's figures depend on: versions of the libraries it loaded, the machine."""
    import os
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for lib in ("numpy", "pandas", "torch", "flwr", "opacus"):
        if lib in sys.modules:
            env[lib] = getattr(sys.modules[lib], "__version__", "?")
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


def write_result(report: dict[str, Any], out: str | Path | None) -> None:
    """The tail every benchmark script shares: record the environment, write the JSON (if asked)."""
    report["environment"] = environment()
    if out:
        atomic_write_text(Path(out), json.dumps(report, indent=2))


def bench_dir() -> Path:
    """The benchmark scripts: shipped in the package (federated/_bench), or a clone's experiments/bench/."""
    return shipped_dir("_bench")


def available() -> list[str]:
    """Benchmark names, the headline ones first in ORDER."""
    names = sorted(p.stem for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def headline(name: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows for the table."""
    if name == "aggregation":
        t = r["target"]
        return [("FedAvg aggregation / numpy floor", f"{t['ratio']:.2f}x", f"<= {t['max_ratio']:g}x")]
    if name == "site_planning":
        return [
            (
                f"plan {v['sites']:,} sites ({k})",
                f"{v['median_s']:.2f} s, plan {v['plan_bytes'] / 2**20:.1f} MB "
                f"vs copies {v['copy_bytes'] / 2**20:.0f} MB",
                f"<= {r['target_s']:g} s",
            )
            for k, v in r["results"].items()
        ]
    if name == "dp_step":
        rows = [
            (f"DP-SGD step / plain step ({m})", f"{v:.2f}x", "<= 2.0x" if m == r["target"]["mode"] else "")
            for m, v in r["round_ratio"].items()
        ]
        return rows
    if name == "ingest":
        c = r["config"]
        return [
            (
                f"ingest {c['images']} JPEGs {c['side']}x{c['side']}",
                f"{r['ingest_images_per_s']:.0f} images/s ({r['ingest_over_decode']:.2f}x decode alone)",
                "",
            ),
            (
                "corpus read, random batches of 32",
                f"{r['read_mmap_samples_per_s']:,.0f} samples/s memory-mapped "
                f"({r['mmap_over_ram_time']:.2f}x in-RAM time)",
                "",
            ),
            ("site load through SiteData", f"{r['site_load_samples_per_s']:,.0f} samples/s", ""),
        ]
    if name == "ingest_scale":
        return ingest_scale_headline(r)
    if name == "engines":
        rows = [("in-process engine / plain PyTorch loop", f"{r['inprocess_ratio']:.2f}x", "<= 1.15x")]
        if r.get("ray"):
            rows.append(("Ray engine after start-up / plain loop", f"{r['ray_ratio']:.2f}x", "<= 2.0x"))
            rows.append(("Ray start-up", f"{r['ray']['startup_s']:.1f} s", ""))
        if r.get("scale"):
            s = r["scale"]
            per_round = s["round_s"][1:] or s["round_s"]
            rows.append(
                (
                    f"in-process, {s['sites']} sites, small model",
                    f"{sum(per_round) / len(per_round):.1f} s per round, peak RSS {s['peak_rss_mb']:.0f} MB",
                    "",
                )
            )
        return rows
    if name == "deployment":
        rows = []
        for size, v in r["sizes"].items():
            rows.append((f"3 TLS SuperNodes / Ray, round after start-up ({size})", f"{v['ratio']:.2f}x", "<= 1.5x"))
            rows.append((f"  the same, SuperLink state in memory ({size})", f"{v['ratio_in_memory']:.2f}x", "<= 1.5x"))
            rows.append(
                (f"  before: evaluation apart, Flower's own SuperLink ({size})", f"{v['ratio_before']:.2f}x", "")
            )
        return rows
    if name == "secure_aggregation":
        return [
            (
                f"SecAgg+ round / plain round, {n}"
                if "neighbours" in n
                else f"SecAgg+ round / plain round, {n} sites (every site a neighbour)",
                f"{v['ratio']:.2f}x (+{v['added_s_per_round']:.2f} s), "
                f"update {v['masked_bytes'] / v['plain_bytes']:.1f}x bytes",
                "",
            )
            for n, v in r["sites"].items()
        ]
    if name == "gpu":
        return gpu_headline(r)
    return [(f"{name}: {k}", str(v), "") for k, v in r.items() if isinstance(v, (int, float))][:4]


def ingest_scale_headline(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for c in r["results"]:
        what = " (hospital table)" if c["hospitals"] else ", simulated sites"
        million = c["rows"] == 1_000_000 and c["features"] == 1 and not c["hospitals"]
        target = f"< {r['target_s']:g} s" if million else ""
        rows.append(
            (
                f"tabular ingest, {c['rows']:,} rows x {c['features']} features{what}",
                f"{c['ingest_s']:.1f} s ({c['ingest_cpu_s']:.1f} s CPU, {c['us_per_row']:.1f} us/row)",
                target,
            )
        )
    if "linearity" in r:
        lin = r["linearity"]
        rows.append(
            (
                f"ingest time {lin['large_rows']:,} / {lin['small_rows']:,} rows",
                f"{lin['time_ratio']:.1f}x ({lin['cpu_ratio']:.1f}x CPU)",
                f"~{lin['row_ratio']:g}x (linear)",
            )
        )
    return rows


def gpu_headline(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "skipped" in r:
        return [("GPU figures", f"skipped: {r['skipped']}", "")]
    on = f"on {r['device']} ({r['device_name']})"
    rows = [
        (f"in-process engine / plain loop, {on}", f"{r['engine']['ratio']:.2f}x", f"<= {r['engine']['target']:g}x"),
        (
            f"DP-SGD step / plain step ({r['dp_step']['mode']}), {on}",
            f"{r['dp_step']['ratio']:.2f}x",
            f"<= {r['dp_step']['target']:g}x",
        ),
    ]
    for model, t in r["throughput"].items():
        rows.append(
            (
                f"{model} training, {on}",
                f"{t['fp32_samples_per_s']:,.0f} / {t['bf16_samples_per_s']:,.0f} samples/s fp32 / bf16",
                "",
            )
        )
    if r.get("ray"):
        q = r["ray"]
        rows.append(
            (
                "Ray, engine.gpus_per_site=0.25",
                f"{q['0.25']['max_processes_on_gpu']} processes on the GPU at once, "
                f"{q['speedup_0.25_over_1']:.2f}x one site per GPU",
                "",
            )
        )
    return rows


def run_benchmarks(out: Path, quick: bool = False, names: list[str] | None = None) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in names or available():
        script = bench_dir() / f"{name}.py"
        if not script.is_file():
            raise FileNotFoundError(f"no benchmark {name!r}; available: {', '.join(available())}")
        t0 = time.perf_counter()
        cmd = [sys.executable, str(script), "--out", str(out / f"{name}.json"), *(["--quick"] if quick else [])]
        print(f"bench {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        atomic_write_text(out / f"{name}.log", proc.stdout + proc.stderr)
        entry: dict[str, Any] = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode}
        if proc.returncode == 0 and (out / f"{name}.json").is_file():
            entry["result"] = json.loads((out / f"{name}.json").read_text())
        else:
            entry["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        results[name] = entry
    write_json(out / "bench.json", {"quick": quick, "benchmarks": results})
    lines = [
        f"# Benchmarks{' (--quick)' if quick else ''}",
        "",
        "| benchmark | figure | measured | target |",
        "|---|---|---|---|",
    ]
    for name, entry in results.items():
        if "result" in entry:
            for figure, value, target in headline(name, entry["result"]):
                lines.append(f"| {name} | {figure} | {value} | {target} |")
        else:
            lines.append(f"| {name} | FAILED (see {name}.log) | {entry['error'][0]} | |")
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results
