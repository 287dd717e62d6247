"""The Flower ServerApp: the same federation logic under `flwr run` (Ray or a SuperLink).

Run config: `multimed-config` (resolved experiment YAML; empty = conf/ defaults),
`corpus-path` (where sites read data; empty = build/reuse the synthetic corpus),
`out-dir` (where outputs go; empty = runs/flwr-<run id>) and `resume` (true: continue the
interrupted run in out-dir from its last checkpoint, with that run's config). The out-dir is checked as
`multimed-fl run --out` checks its folder (federated/server/run_folder.py): another run's or a
user's files refuse the run, and a lock keeps a second run out while this one is in it. Before
anything is written the run is checked as `multimed-fl run` checks it (federated/server/preflight.py).
`statistics-only` (true: `multimed-fl stats --connection`) profiles the sites instead of training
(federated/server/profile.py) and writes stats.json, report.md and plots/ to out-dir.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from federated.core.config import ExperimentConfig, config_from_yaml, load_config
from federated.core.corpus_schema import CorpusSchema
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, OUT_DIR_KEY, RESUME_KEY, STATISTICS_ONLY_KEY
from federated.server.checkpoint import Checkpoint, check_resume, load_checkpoint, resume_config
from federated.server.loop import run_federation
from federated.server.outputs import build_summary, write_config, write_final_model, write_summary
from federated.server.preflight import before_run
from federated.server.profile import run_profile
from federated.server.profile_report import check_profile_dir, write_profile
from federated.server.run_folder import (
    CHECKPOINT_FILE,
    RunFolderError,
    RunLock,
    check_out_dir,
    check_resumable,
    record_outputs,
    remove_stale_temps,
)
from federated.server.tracking import MetricsTable, TensorBoardLogger
from federated.server.transport import over_superlink

if TYPE_CHECKING:
    from partitions import SitePlan

app = ServerApp()


@dataclass(frozen=True)
class LocalPlan:
    """The corpus schema and site plan, as this machine sees them."""

    schema: CorpusSchema
    sites: list[SitePlan]

    @property
    def names(self) -> list[str]:
        return [p.site for p in self.sites]


def local_plan(cfg: ExperimentConfig, corpus_path: str) -> LocalPlan | None:
    """The corpus's schema and the plan's sites, when this machine can see the corpus (simulation,
    the deployment demo); None when it cannot (a real deployment's server holds no data: the
    model and plan are then checked on what the sites say in the handshake, preflight.after_handshake)."""
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from partitions import plan_sites
    from partitions.site_local import SITE_LOCAL

    if cfg.sites.planner == SITE_LOCAL:  # each site holds its own corpus; the server none
        return None
    try:
        corpus = Corpus.open(corpus_path or prepare_corpus(cfg.corpus))
        return LocalPlan(corpus.schema, plan_sites(corpus, cfg))
    except Exception:  # no data here: the sites will say what they hold in the handshake
        return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation of the run config and write its outputs."""
    text = str(context.run_config.get(CONFIG_KEY, ""))
    cfg = config_from_yaml(text) if text else load_config()
    out_dir = Path(str(context.run_config.get(OUT_DIR_KEY, "")) or f"runs/flwr-{grid.run.run_id}")
    resume = context.run_config.get(RESUME_KEY, False) is True
    if context.run_config.get(STATISTICS_ONLY_KEY, False) is True:
        if resume:
            raise RunFolderError(f"{STATISTICS_ONLY_KEY}: a profile trains nothing, so it has nothing to resume")
        with RunLock(out_dir):  # as `multimed-fl stats --out`: a new folder, or an empty one
            check_profile_dir(out_dir, overwrite=False)
            _profile(grid, context, cfg, out_dir)
        return
    with RunLock(out_dir):  # as `multimed-fl run`: one run per folder, another run's files kept
        checkpoint = None
        if resume:  # as `multimed-fl run --resume`: the run's own config, from its checkpoint
            check_resumable(out_dir)
            checkpoint = load_checkpoint(out_dir)
            cfg = _resumed_config(text, checkpoint, out_dir)
        else:
            check_out_dir(out_dir, overwrite=False)
        remove_stale_temps(out_dir)  # the folder accepted: temporaries of dead writers only
        _run(grid, context, cfg, out_dir, checkpoint)


def _resumed_config(text: str, checkpoint: Checkpoint, out_dir: Path) -> ExperimentConfig:
    """The interrupted run's config. The sites read the run config's, so it must be the same one:
    sites planning or training under another config would continue a different experiment. A changed
    privacy or secure-aggregation setting is named, key by key (checkpoint.check_resume)."""
    cfg = resume_config(checkpoint, out_dir)
    if text:
        check_resume(checkpoint, config_from_yaml(text), out_dir, f"the run config's {CONFIG_KEY}")
    if not text or config_from_yaml(text) != cfg:
        raise RunFolderError(
            f"resuming {out_dir}: the run config's {CONFIG_KEY} is "
            f"{'empty' if not text else 'not the config of the run being resumed'}; submit the run's own "
            f"{out_dir / 'config.yaml'} (`multimed-fl deploy submit --resume` does)"
        )
    return cfg


def _expecting(cfg: ExperimentConfig, planned: list[str]) -> ExperimentConfig:
    """Where the server knows the plan: wait for, and insist on, every planned site."""
    if not planned or cfg.engine.expected_sites:
        return cfg
    return dataclasses.replace(
        cfg,
        engine=dataclasses.replace(
            cfg.engine, expected_sites=len(planned), handshake_timeout_s=min(cfg.engine.handshake_timeout_s, 120.0)
        ),
    )


def _profile(grid: Grid, context: Context, cfg: ExperimentConfig, out_dir: Path) -> None:
    """The statistics-only run: the sites' profile (aggregates only) into out-dir; nothing trains."""
    plan = local_plan(cfg, str(context.run_config.get(CORPUS_KEY, "")))
    planned = plan.names if plan is not None else []
    profile = run_profile(grid, _expecting(cfg, planned), planned)
    write_profile(out_dir, profile, cfg, f"flwr run ({type(grid).__name__})")


def _run(grid: Grid, context: Context, cfg: ExperimentConfig, out_dir: Path, checkpoint: Checkpoint | None) -> None:
    plan = local_plan(cfg, str(context.run_config.get(CORPUS_KEY, "")))
    # as `multimed-fl run` does, before anything is written; over a SuperLink the sites resolve
    # engine.device on their own machines, and without a corpus here the model and the plan are
    # checked on the sites' answers (preflight.after_handshake, in the round loop)
    before_run(
        cfg,
        plan.schema if plan is not None else None,
        plan.sites if plan is not None else None,
        sites_here=not over_superlink(grid),
    )
    if cfg.engine.checkpoint_every > 0:  # the Checkpointer's file, listed before it is written
        record_outputs(out_dir, CHECKPOINT_FILE)
    write_config(out_dir, cfg)
    planned = plan.names if plan is not None else []
    cfg = _expecting(cfg, planned)
    result = run_federation(
        grid,
        cfg,
        [MetricsTable(out_dir / "metrics.parquet"), TensorBoardLogger(out_dir / "tensorboard")],
        checkpoint_dir=out_dir,
        resume=checkpoint,
        planned_sites=planned,
    )
    # the engine is `flwr run`, not the config's in-process default
    summary = dataclasses.replace(
        build_summary(cfg, result, result.timing.wall_s),
        engine=f"flwr run ({type(grid).__name__})",
        resumed_from_round=checkpoint.round if checkpoint is not None else None,
    )
    write_final_model(out_dir, result.arrays)
    write_summary(out_dir, summary)
    for line in summary.problems:  # the run's status stays Flower's; the summary and the log say it
        log(WARNING, "multimed-fl: incomplete scores: %s", line)
