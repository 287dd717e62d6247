"""Run a list of named experiments in parallel processes, resuming finished ones: the older
table scripts' entry point to the study runner (federated/app/studies/runner.py).

Each run writes DIR/runs/<name>/ as `multimed-fl run` would; a run whose summary.json exists is
read back instead of run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from federated.app.studies.runner import run_jobs


def run_grid(jobs: list[tuple[str, list[str]]], out: Path, processes: int = 2) -> dict[str, tuple[dict | None, str]]:
    """name -> (summary or None, error text), printing one line per finished run."""
    finished = 0

    def report(name: str, ok: bool, error: str) -> None:
        nonlocal finished
        finished += 1
        status = "ok" if ok else f"FAILED: {error.splitlines()[0]}"
        print(f"[{finished}/{len(jobs)}] {name}: {status}", flush=True)

    results = run_jobs(jobs, Path(out), processes, report)
    return {name: (o.summary.to_dict() if o.summary is not None else None, o.error) for name, o in results.items()}
