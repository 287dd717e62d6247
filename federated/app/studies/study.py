"""`multimed-fl study NAME`: expand the grid, run it (resuming), write results and the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from federated.app.studies.report import write_report
from federated.app.studies.runner import RunOutcome, log_hparams, results_frame, run_jobs, study_rows
from federated.app.studies.spec import Run, Study, StudyError, load_study
from federated.core.config import load_config
from federated.core.config.schema import ExperimentConfig
from federated.core.io import atomic_write
from federated.core.protocol import Role


def generated_axes(study: Study, cfg: ExperimentConfig) -> dict[str, dict[str, list[str]]]:
    """Axes that depend on the site plan (built from the study's base config `cfg`)."""
    if not study.generated_axes:
        return {}
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from partitions.holdout import leave_one_site_out_overrides

    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    axes: dict[str, dict[str, list[str]]] = {}
    if "local_sites" in study.generated_axes:  # one local-only run per training site
        from partitions import plan_sites

        axes["training"] = {
            f"local:{p.site}": [f"sites.train_only=[{p.site}]"] for p in plan_sites(corpus, cfg) if p.role == Role.TRAIN
        }
    if "leave_one_site_out" in study.generated_axes:
        axes["held_out"] = {ov[1].split("[", 1)[1].rstrip("]"): ov for ov in leave_one_site_out_overrides(corpus, cfg)}
    return axes


def check_same_overrides(out: Path, overrides: list[str]) -> None:
    """A study folder resumes only under the overrides it was started with: finished runs are
    reused by id, and mixing runs of two corpora under one id would be silently wrong."""
    record = out / "study_overrides.json"
    if record.exists():
        before = json.loads(record.read_text())
        if before != overrides:
            raise StudyError(
                f"{out} holds a study run with overrides {before}, not {overrides}; "
                "use another --out (or the same overrides to resume)"
            )


def record_overrides(out: Path, overrides: list[str]) -> None:
    record = out / "study_overrides.json"
    if not record.exists():
        atomic_write(record, lambda tmp: tmp.write_text(json.dumps(overrides)))


def check_corpus(study: Study, cfg: ExperimentConfig) -> None:
    """A real-data study's corpus must exist before its runs start: say how to build it."""
    path = cfg.corpus.path
    if path and not Path(path).expanduser().is_dir():
        how = f"; build it with {study.setup}" if study.setup else ""
        raise StudyError(f"study {study.name}: corpus {path} does not exist{how} (or set corpus.path=DIR)")


def _run_grid(study: Study, runs: list[Run], out: Path, processes: int, console: Console) -> dict[str, RunOutcome]:
    """Every run of the grid, with a progress bar; finished runs are read back, not run again."""
    with Progress(
        TextColumn(f"study {study.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=len(runs))

        def done(run_id: str, ok: bool, error: str) -> None:
            progress.update(task, advance=1, description=f"{'ok' if ok else 'FAILED'} {run_id}")

        return run_jobs([(r.run_id, r.overrides) for r in runs], out, processes, done)


def _prepare(name: str, out: Path, quick: bool, overrides: list[str]) -> tuple[Study, ExperimentConfig]:
    """The study with `overrides` added to its base, and its grid's shared config, checked against
    what the folder was started with."""
    study = load_study(name)
    out.mkdir(parents=True, exist_ok=True)
    study = dataclasses.replace(study, base=[*study.base, *overrides])
    cfg = load_config([*study.base, *(study.quick if quick else [])])  # the grid's shared settings
    check_same_overrides(out, overrides)
    check_corpus(study, cfg)  # before the folder records its overrides: a fixed rerun may go on
    record_overrides(out, overrides)
    return study, cfg


def run_study(
    name: str,
    out: Path,
    quick: bool = False,
    processes: int | None = None,
    console: Console | None = None,
    overrides: list[str] | None = None,
) -> pd.DataFrame:
    """`overrides` (key=value) are added to every run after the study's own base settings."""
    console = console or Console(stderr=True)
    out, overrides = Path(out), list(overrides or [])
    study, cfg = _prepare(name, out, quick, overrides)
    extra = generated_axes(study, cfg)
    runs = study.runs(quick, extra)
    axes = list(dict.fromkeys([*study.axes, *extra]))
    outcomes = _run_grid(study, runs, out, processes or study.processes, console)
    rows = study_rows(runs, outcomes)
    df = results_frame(rows)
    atomic_write(out / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
    for run, row in zip(runs, rows, strict=True):
        if outcomes[run.run_id].ran or not (out / "tensorboard" / run.run_id).exists():
            log_hparams(out, run, row)
    command = " ".join(
        ["multimed-fl study", study.name, *(["--quick"] if quick else []), "--out", str(out), *overrides]
    )
    write_report(study, df, axes, out, command)
    ran = sum(1 for o in outcomes.values() if o.ran)
    console.print(
        f"study {study.name}: {len(runs)} runs ({ran} run now, {len(runs) - ran} reused), "
        f"{int(df['error'].astype(bool).sum())} failed; report: {out / 'report.md'}"
    )
    return df
