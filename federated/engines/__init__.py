"""Engines move messages between the ServerApp logic and the ClientApps; nothing else.

An engine is a function (cfg, corpus_path, n_sites, callbacks, out_dir, resume) ->
FederationResult. Sites keep their own state under out_dir/site_state (clients/site_state.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from federated.checkpoint import Checkpoint
from federated.config.schema import ExperimentConfig
from federated.federation import Callback, FederationResult
from federated.registry import Registry

Engine = Callable[..., FederationResult]
SITE_STATE_DIR = "site_state"
ENGINES: Registry[Engine] = Registry("engine")


@ENGINES.register("ray")
def run_ray(*args, **kwargs) -> FederationResult:  # type: ignore[no-untyped-def]
    from federated.engines.ray_engine import run_ray as run  # imports Ray only when used

    return run(*args, **kwargs)


@ENGINES.register("inprocess")
def run_inprocess(cfg: ExperimentConfig, corpus_path: Path, n_sites: int, callbacks: Sequence[Callback],
                  out_dir: Path | None = None, resume: Checkpoint | None = None) -> FederationResult:
    from clients.client_app import app as client_app
    from clients.site_runtime import CONFIG_KEY, CORPUS_KEY
    from clients.site_state import STATE_DIR_KEY
    from federated.config import config_to_yaml
    from federated.engines.inprocess import InProcessGrid
    from federated.federation import run_federation

    run_config = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: str(corpus_path)}
    if out_dir is not None:
        run_config[STATE_DIR_KEY] = str(Path(out_dir) / SITE_STATE_DIR)
    node_configs = [{"partition-id": i, "num-partitions": n_sites} for i in range(n_sites)]
    grid = InProcessGrid(client_app, node_configs, run_config)
    return run_federation(grid, cfg, callbacks, checkpoint_dir=out_dir, resume=resume)
