"""One experiment from a config: corpus -> site plan -> engine -> outputs in DIR."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from rich.console import Console

from clients.site_runtime import apply_torch_threads
from federated.core.config import ExperimentConfig, config_from_yaml
from federated.core.io import write_json
from federated.core.protocol import SITE_STATE_DIR
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.engines import ENGINES
from federated.server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from federated.server.federation import Callback
from federated.server.outputs import build_summary, write_config, write_final_model
from federated.server.results import RunSummary
from federated.server.tracking import MetricsTable, ProgressBar, TensorBoardLogger
from partitions import plan_sites


class RunError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an earlier run's outputs)."""


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    resume: bool = False,
) -> RunSummary:
    """Run one federated experiment and write its outputs; returns the summary.
    resume=True continues the run in out_dir from its last checkpoint (cfg is ignored:
    the run's own config.yaml is used)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    checkpoint = None
    if resume:
        if (out_dir / "summary.json").exists():
            raise RunError(f"{out_dir} holds a finished run (summary.json): nothing to resume")
        checkpoint = load_checkpoint(out_dir)
        cfg = config_from_yaml(checkpoint.config_yaml)
        overwrite = False
    elif cfg is None:
        raise RunError("a new run needs a config (cfg is None only with resume=True)")
    elif (out_dir / "summary.json").exists() and not overwrite:
        raise RunError(
            f"{out_dir} already holds a finished run (summary.json); choose another --out or pass --overwrite"
        )
    engine = ENGINES.get(cfg.engine.name)  # fail on a bad engine name before any work
    apply_torch_threads(cfg.engine.torch_threads)
    corpus_path = prepare_corpus(cfg.corpus)
    plans = plan_sites(Corpus.open(corpus_path), cfg)  # a plan that cannot work fails here
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite or (not resume and (out_dir / CHECKPOINT_FILE).exists()):
        # a fresh run must not mix with an earlier run's logs, checkpoint or site states
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        shutil.rmtree(out_dir / SITE_STATE_DIR, ignore_errors=True)
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    write_config(out_dir, cfg)
    callbacks: list[Callback] = [MetricsTable(out_dir / "metrics.parquet"), TensorBoardLogger(out_dir / "tensorboard")]
    if progress:
        callbacks.append(ProgressBar(console))
    result = engine(cfg, corpus_path, len(plans), callbacks, out_dir=out_dir, resume=checkpoint)
    summary = dataclasses.replace(
        build_summary(cfg, result, time.perf_counter() - t0),
        corpus=str(corpus_path),
        resumed_from_round=checkpoint.round if checkpoint is not None else None,
    )
    write_final_model(out_dir, result.arrays)
    write_json(out_dir / "summary.json", summary.to_dict())
    return summary
