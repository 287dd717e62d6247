"""One experiment from a config: corpus -> site plan -> engine -> outputs in DIR."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from clients.site_runtime import apply_torch_threads
from federated.core.config import ConfigError, ExperimentConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.io import write_json
from federated.core.protocol import SITE_STATE_DIR
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.engines import ENGINES
from federated.engines.ray_engine import ray_address
from federated.server.callbacks import Callback
from federated.server.checkpoint import Checkpoint, load_checkpoint, resume_config
from federated.server.outputs import build_summary, write_config, write_final_model, write_summary
from federated.server.preflight import RunError, before_run, check_same_corpus
from federated.server.results import RunSummary
from federated.server.run_folder import (
    CHECKPOINT_FILE,
    CORPUS_RECORD,
    RunLock,
    check_out_dir,
    check_resumable,
    clear_run_outputs,
    record_outputs,
    remove_stale_temps,
)
from federated.server.tracking import MetricsTable, ProgressBar, TensorBoardLogger
from partitions import SitePlan, plan_sites
from partitions.site_local import SITE_LOCAL, plan_local_sites

__all__ = ["RunError", "SiteCorpora", "run_experiment", "sites_here"]


@dataclass(frozen=True)
class SiteCorpora:
    """Site-local mode in simulation: a folder of per-site corpora, planned and fingerprinted as one."""

    path: Path
    plans: list[SitePlan]
    schema: CorpusSchema
    fingerprint: str

    @classmethod
    def open(cls, folder: str | Path, cfg: ExperimentConfig) -> SiteCorpora:
        planned = plan_local_sites(folder, cfg)
        digest = hashlib.sha256(b"multimed-fl site corpora v1\0")
        for plan, corpus in planned:
            digest.update(f"{plan.site}\0{corpus.fingerprint}\0".encode())
        # the model-size check's schema: the first site's (the server settles the federation's
        # schema, and which sites disagree with it, in the handshake)
        first_plan, first = planned[0]
        merged = first.schema.restrict(first_plan.tasks)
        return cls(Path(folder), [p for p, _ in planned], merged, digest.hexdigest())


def sites_here(cfg: ExperimentConfig) -> bool:
    """Whether the sites run on this machine (in-process, or a Ray started here), so engine.device
    must exist here; a Ray cluster's sites resolve it on their own machines."""
    return cfg.engine.name == "inprocess" or (cfg.engine.name == "ray" and not ray_address(cfg))


def _open_corpus(cfg: ExperimentConfig) -> tuple[Path, Corpus | SiteCorpora]:
    """(the path the engine hands the sites, the corpus or, in site-local mode, the site corpora)."""
    if cfg.sites.planner == SITE_LOCAL:
        if not cfg.corpus.site_corpora:
            raise ConfigError(
                "sites.planner=site_local in simulation needs corpus.site_corpora (a folder with one corpus per "
                "site; `multimed-fl corpus split` makes one); in deployment each site's node config names its own"
            )
        corpora = SiteCorpora.open(cfg.corpus.site_corpora, cfg)
        return corpora.path, corpora
    corpus_path = prepare_corpus(cfg.corpus)
    return Path(corpus_path), Corpus.open(corpus_path)


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
    if not resume and cfg is None:
        raise RunError("a new run needs a config (cfg is None only with resume=True)")
    with RunLock(out_dir):  # a second run into this folder fails here, naming this one's PID
        checkpoint = None
        if resume:
            check_resumable(out_dir)  # a finished run, no checkpoint, a symbolic link: refused by name
            checkpoint = load_checkpoint(out_dir)
            # held to the privacy and secure aggregation the run trained with (each site checks too)
            cfg = resume_config(checkpoint, out_dir)
            overwrite = False
        else:
            check_out_dir(out_dir, overwrite)  # another run's or a user's files: refused unless overwrite
        remove_stale_temps(out_dir)  # only now, the folder accepted: temporaries of dead writers
        assert cfg is not None
        return _run(cfg, out_dir, checkpoint, overwrite and not resume, progress, console, t0)


def _run(
    cfg: ExperimentConfig,
    out_dir: Path,
    checkpoint: Checkpoint | None,
    clear: bool,
    progress: bool,
    console: Console | None,
    t0: float,
) -> RunSummary:
    """The run itself, in a folder this process holds the lock of."""
    engine = ENGINES.get(cfg.engine.name)  # fail on a bad engine name before any work
    apply_torch_threads(cfg.engine.torch_threads)
    corpus_path, corpus = _open_corpus(cfg)
    # before anything is written into the folder; a plan that cannot work fails in it, after the model
    plans = before_run(
        cfg,
        corpus.schema,
        lambda: corpus.plans if isinstance(corpus, SiteCorpora) else plan_sites(corpus, cfg),
        sites_here=sites_here(cfg),
    )
    assert plans is not None  # a schema was given, so the plan was made
    if clear:  # --overwrite: a fresh run must not mix with what the folder's manifest lists of an earlier run
        clear_run_outputs(out_dir)
    if checkpoint is not None:
        check_same_corpus(out_dir, corpus)
    else:
        record_outputs(out_dir, CORPUS_RECORD)
        write_json(out_dir / CORPUS_RECORD, {"path": str(corpus_path), "fingerprint": corpus.fingerprint})
    if cfg.engine.checkpoint_every > 0:  # written by the Checkpointer and the sites: listed before they are
        record_outputs(out_dir, CHECKPOINT_FILE, SITE_STATE_DIR)
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
    write_summary(out_dir, summary)
    return summary
