"""The Python API, for notebooks and scripts: what the command line does, with typed results back.

    from federated.app import api

    cfg = api.config(["scale=smoke", "strategy=fedprox"])   # or {"rounds": 5, "corpus.path": "corpora/mine"}
    summary = api.run(cfg, "runs/notebook")                 # a RunSummary, as summary.json holds it
    summary.final.id.score, summary.final.ood.score, summary.final.gap
    api.sites(cfg)                                          # the site plan, one row per site (pandas)
    api.study("leave_one_site_out", "runs/loso", quick=True)  # results.csv as a DataFrame
    api.ingest("my_spec.yaml", "corpora/mine")              # a Corpus; corpus.schema lists its tasks

Every function checks its input as the command line does and raises the same errors (ConfigError,
IngestError, CorpusFormatError, ...) instead of exiting. Flower logs every round at INFO; these
functions keep it at WARNING unless `flower_logs(True)` was called.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from federated.app.runner import RunError, run_experiment
from federated.core.config import ConfigError, ExperimentConfig, load_config
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.server.results import RunSummary
from federated.server.run_folder import SUMMARY_FILE
from partitions import SitePlan, plan_sites

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "RunError",
    "RunSummary",
    "config",
    "corpus",
    "flower_logs",
    "ingest",
    "load_summary",
    "resume",
    "run",
    "site_plans",
    "sites",
    "study",
]

_flower_verbose = False


def flower_logs(verbose: bool = True) -> None:
    """Show Flower's INFO logs (verbose=True) or only its warnings (the default)."""
    global _flower_verbose
    _flower_verbose = verbose
    _apply_flower_level()


def _apply_flower_level() -> None:
    import flwr.common.logger  # noqa: F401  (configures the flwr logger on import; set the level after)

    logging.getLogger("flwr").setLevel(logging.INFO if _flower_verbose else logging.WARNING)


def config(overrides: Sequence[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """A validated config: conf/ plus overrides, as `multimed-fl run key=value ...` takes them.
    A mapping {"strategy": "fedprox", "train.lr": 0.01, "sites.steps": ["label_skew"]} is the same
    as the strings "strategy=fedprox", "train.lr=0.01", "sites.steps=[label_skew]"."""
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={_value(value)}" for key, value in overrides.items()]
    elif isinstance(overrides, str):
        raise ConfigError(f"config() takes a list of key=value strings or a mapping, not the string {overrides!r}")
    return load_config(list(overrides))


def _value(value: Any) -> str:
    """An override's value as the command line spells it (YAML flow: lists in brackets, no quotes needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value)


def run(
    cfg: ExperimentConfig | Sequence[str] | Mapping[str, Any], out: str | Path, overwrite: bool = False
) -> RunSummary:
    """Run one experiment into `out` (summary.json, final_model.npz, metrics.parquet, ...) and return
    its summary. A run whose scores miss a site or task still returns; `summary.problems` says what."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = config(cfg)
    _apply_flower_level()
    return run_experiment(cfg, out, overwrite=overwrite, progress=False)


def resume(out: str | Path) -> RunSummary:
    """Continue the checkpointed run in `out` (engine.checkpoint_every) to its last round."""
    _apply_flower_level()
    return run_experiment(None, out, progress=False, resume=True)


def load_summary(out: str | Path) -> RunSummary:
    """The summary of a finished run folder, as `run` returned it."""
    path = Path(out) / SUMMARY_FILE
    if not path.is_file():
        raise RunError(f"{out} holds no finished run ({SUMMARY_FILE} is missing)")
    return RunSummary.from_dict(json.loads(path.read_text()))


def corpus(cfg: ExperimentConfig | Sequence[str] | Mapping[str, Any] = ()) -> Corpus:
    """The corpus a config runs on (corpus.path, or the synthetic corpus, built once and cached)."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = config(cfg)
    return Corpus.open(prepare_corpus(cfg.corpus))


def site_plans(cfg: ExperimentConfig | Sequence[str] | Mapping[str, Any] = ()) -> list[SitePlan]:
    """The sites a run with this config would have: their roles, tasks, modalities and rows."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = config(cfg)
    return plan_sites(corpus(cfg), cfg)


def sites(cfg: ExperimentConfig | Sequence[str] | Mapping[str, Any] = ()) -> pd.DataFrame:
    """The site plan as a table, one row per site (what `multimed-fl sites show` prints)."""
    from partitions.report import plan_frame

    if not isinstance(cfg, ExperimentConfig):
        cfg = config(cfg)
    data = corpus(cfg)
    return plan_frame(data, plan_sites(data, cfg), cfg)


def study(
    name: str,
    out: str | Path,
    quick: bool = False,
    processes: int | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> pd.DataFrame:
    """Run a study (a built-in name or a YAML path) into `out`; its results.csv as a DataFrame (one
    row per run; summary.md and report.md are written beside it). An interrupted study resumes."""
    from federated.app.studies.study import run_study

    if isinstance(overrides, Mapping):
        overrides = [f"{key}={_value(value)}" for key, value in overrides.items()]
    _apply_flower_level()
    return run_study(name, Path(out), quick=quick, processes=processes, overrides=list(overrides))


def ingest(spec: str | Path, out: str | Path, overwrite: bool = False, data_root: str | Path | None = None) -> Corpus:
    """Ingest the sources an ingest spec names into a corpus at `out` and open it."""
    from federated.data.ingest.spec import run_spec

    path, _ = run_spec(spec, out, overwrite=overwrite, data_root=data_root)
    return Corpus.open(path)
