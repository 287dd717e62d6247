"""The server side of one federated run: handshake, statistics, rounds, result.

    handshake            every node says which site it is (federated/server/handshake.py)
    after_handshake      what the answers must agree on (federated/server/preflight.py)
    statistics rounds    what every message carries, where a run needs it (no rows move)
    rounds               one loop; when each model is scored is the run's schedule
                         (federated/server/schedule.py), one round's training and evaluation
                         federated/server/round.py (secure: secure_train.py)

The loop calls the strategy through strategies/round_strategy.py's interface but is our own,
not Flower's Strategy.start: training goes to the training sites only, evaluation to every site
(ID and OOD). Side effects (progress, TensorBoard, metrics tables, checkpoints) are callbacks
invoked once per round (federated/server/callbacks.py).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from logging import INFO
from pathlib import Path

from flwr.common.logger import log
from flwr.serverapp.grid import Grid

from federated.core.arrays import pack_arrays
from federated.core.config.schema import ExperimentConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.models import build_model
from federated.core.models.init_weights import load_init_weights
from federated.core.protocol import FEATURE_STATS, SCHEMA_KEY, TARGET_SCALES
from federated.core.targets import REGRESSION
from federated.server.callbacks import Callback
from federated.server.checkpoint import Checkpoint, checkpointers
from federated.server.evaluation import SiteProfile
from federated.server.feature_round import FeatureStatistics, run_statistics
from federated.server.federated_stats import target_scales
from federated.server.handshake import handshake
from federated.server.preflight import after_handshake
from federated.server.records import FederationResult
from federated.server.round import Federation, accepted_model
from federated.server.schedule import schedule_for
from federated.server.site_roster import expected_site_names
from federated.server.transport import NodeSubsetGrid, exchange
from partitions.site_local import SITE_LOCAL
from strategies.round_strategy import RoundStrategy
from strategies.site_dp import build_private_strategy


def _strategy(cfg: ExperimentConfig, node_profiles: dict[int, SiteProfile], train_nodes: list[int]) -> RoundStrategy:
    """The run's strategy, told which node is which site and how much each holds (whether it can
    run under secure aggregation, preflight.before_run checked for every entry point)."""
    strategy = build_private_strategy(cfg, len(train_nodes))
    strategy.know_sites(
        {n: p.site for n, p in node_profiles.items()},
        {n: node_profiles[n].n_train for n in train_nodes},
        {n: (p.modalities, p.tasks) for n, p in node_profiles.items()},
    )
    return strategy


def _site_config(
    grid: Grid,
    cfg: ExperimentConfig,
    schema: CorpusSchema,
    node_profiles: dict[int, SiteProfile],
    train_nodes: list[int],
    resume: Checkpoint | None,
) -> tuple[dict[str, str], FeatureStatistics | None]:
    """What every train and evaluate message carries, from the statistics rounds before round 1
    (no rows move): in site-local mode the federation's schema and the regression targets' scales;
    in every mode, where the schema stores raw features, the feature statistics
    (federated/server/feature_round.py; on resume, the checkpoint's: not asked again)."""
    config: dict[str, str] = {}
    if cfg.sites.planner == SITE_LOCAL:
        regression = [t for t, task in schema.tasks.items() if task.target == REGRESSION]
        scales = target_scales(lambda messages: exchange(grid, messages), train_nodes, regression)
        config = {SCHEMA_KEY: json.dumps(schema.to_dict()), TARGET_SCALES: json.dumps(scales)}
    saved = resume.feature_statistics if resume is not None else None
    features = run_statistics(lambda ms: exchange(grid, ms), train_nodes, schema, cfg, node_profiles, saved)
    if features is not None and features.standardisers:
        config[FEATURE_STATS] = features.message()
    return config, features


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    planned_sites: Sequence[str] = (),
) -> FederationResult:
    """Run (or, given a checkpoint, continue) a federation. With engine.checkpoint_every = k
    and a checkpoint_dir, the server state is saved every k rounds and after the last one.
    planned_sites: the site names the plan expects, where the caller knows them (to name the
    missing ones if too few connect)."""
    t_start = time.perf_counter()
    random.seed(cfg.seed)  # Flower's node sampling uses Python's global RNG
    answered = handshake(
        grid,
        restore_round=resume.round if resume else None,
        expected=cfg.engine.expected_sites,
        timeout_s=cfg.engine.handshake_timeout_s,
        expected_names=expected_site_names(cfg, planned_sites),
    )
    agreed = after_handshake(cfg, answered)
    schema, node_profiles, train_nodes = agreed.schema, agreed.profiles, agreed.train_nodes
    site_config, features = _site_config(grid, cfg, schema, node_profiles, train_nodes, resume)
    hooks = [*callbacks, *checkpointers(cfg, checkpoint_dir, features.to_dict() if features else None)]
    profiles = list(node_profiles.values())
    for cb in hooks:
        cb.on_start(cfg, profiles)
    model = build_model(cfg.model, schema, cfg.seed)
    init_report = load_init_weights(model, cfg.model.init_weights) if cfg.model.init_weights and not resume else None
    if init_report:
        log(INFO, init_report.summary_line())
    arrays = pack_arrays(model.state_dict())  # one object per message, not two per tensor
    fed = Federation(
        grid,
        cfg,
        node_profiles,
        _strategy(cfg, node_profiles, train_nodes),
        NodeSubsetGrid(grid, train_nodes),
        cfg.engine.round_timeout_s or None,
        site_config=site_config,
        model_keys=list(model.state_dict()),
    )
    schedule = schedule_for(fed, hooks)  # when each round's model is scored
    done, arrays = schedule.begin(arrays, resume)
    for rnd in range(done + 1, cfg.rounds + 1):
        outcome = schedule.train(rnd, arrays)
        arrays = accepted_model(cfg, rnd, outcome, arrays)
        schedule.trained(rnd, arrays, outcome)
    initial, history = schedule.end(arrays)
    fed.timing.wall_s = time.perf_counter() - t_start
    result = FederationResult(
        profiles,
        initial,
        history,
        arrays,
        fed.timing,
        init_report.as_dict() if init_report else None,
        schema,
        agreed.excluded,
        json.loads(site_config.get(TARGET_SCALES, "{}")),
        features,
    )
    for cb in hooks:
        cb.on_end(result)
    return result
