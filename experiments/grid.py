"""Run a list of named experiments in parallel processes, resuming finished ones.

Each run writes DIR/<name>/ as `multimed-fl run` would; a run whose summary.json exists is not
run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import traceback
from pathlib import Path
from typing import Any


def _one(job: tuple[str, list[str], str]) -> tuple[str, dict[str, Any] | None, str]:
    name, overrides, out = job
    path = Path(out) / name
    if (path / "summary.json").exists():
        return name, json.loads((path / "summary.json").read_text()), ""
    try:
        import logging

        import flwr.common.logger  # noqa: F401

        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("strategies").setLevel(logging.ERROR)
        from federated.config import load_config
        from federated.runner import run_experiment

        summary = run_experiment(load_config(overrides), path, overwrite=True, progress=False)
        return name, summary, ""
    except Exception as e:  # a failed run is a result too: report it, keep the grid going
        return name, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def run_grid(jobs: list[tuple[str, list[str]]], out: Path, processes: int = 2) -> dict[str, tuple[dict | None, str]]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[dict | None, str]] = {}
    with mp.get_context("spawn").Pool(processes) as pool:
        for i, (name, summary, error) in enumerate(pool.imap_unordered(_one, [(n, o, str(out)) for n, o in jobs])):
            results[name] = (summary, error)
            status = "ok" if summary else f"FAILED: {error.splitlines()[0]}"
            print(f"[{i + 1}/{len(jobs)}] {name}: {status}", flush=True)
    return results
