"""The Ray simulation engine: the same ServerApp logic and ClientApp under Flower's Ray backend.

`multimed-fl run engine=ray` calls flwr.simulation.run_simulation: every site is a SuperNode in
Ray's actor pool (`engine.cpus_per_site` / `engine.gpus_per_site` each; `engine.ray_cpus` CPUs in
all, or the cluster at `engine.ray_address` / $RAY_ADDRESS, joined as it is), the federation loop runs in
this process with the same callbacks as in-process, and `flwr run .` from the repository root
runs the very same apps through a local SuperLink. Ray is shut down when the run returns.

run_simulation gives apps an empty run config (only `flwr run` fuses pyproject defaults with
overrides, measured on flwr 1.42), so the ClientApp is wrapped to see ours: the keys are set
for the call and removed after it, because Flower refuses a Context whose run config changed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from clients.client_app import app as client_app
from federated.core.config import config_to_yaml
from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, SITE_STATE_DIR, STATE_DIR_KEY
from federated.server.callbacks import Callback
from federated.server.checkpoint import Checkpoint
from federated.server.loop import run_federation
from federated.server.records import FederationResult


class WithRunConfig(ClientApp):
    """A ClientApp that runs another with extra run-config keys (see module docstring)."""

    def __init__(self, inner: ClientApp, run_config: dict) -> None:
        super().__init__()
        self._inner, self._run_config = inner, dict(run_config)

    def __call__(self, message: Message, context: Context) -> Message:
        before = dict(context.run_config)
        context.run_config.update(self._run_config)
        try:
            return self._inner(message, context)
        finally:
            context.run_config.clear()
            context.run_config.update(before)


def run_ray(
    cfg: ExperimentConfig,
    corpus_path: Path,
    n_sites: int,
    callbacks: Sequence[Callback],
    out_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> FederationResult:
    from flwr.simulation import run_simulation

    run_config = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: str(Path(corpus_path).resolve())}
    # the simulated SuperNodes register while the ServerApp starts: wait for all of them
    server_cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, expected_sites=n_sites))
    if out_dir is not None:
        run_config[STATE_DIR_KEY] = str((Path(out_dir) / SITE_STATE_DIR).resolve())
    results: list[FederationResult] = []
    errors: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            results.append(run_federation(grid, server_cfg, callbacks, checkpoint_dir=out_dir, resume=resume))
        except BaseException as e:  # run_simulation logs and swallows ServerApp errors
            errors.append(e)

    before = ray_processes()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        run_simulation(
            server,
            WithRunConfig(client_app, run_config),
            num_supernodes=n_sites,
            backend_name="ray",
            # max_restarts: Ray brings a killed site process back; max_task_retries: a
            # message sent to it while it restarts (it may be another site's: the
            # actors are pooled) waits for the restart instead of failing that site.
            # One retry: a site that dies twice on the same message is a failure.
            # Flower passes client_resources to the actors' .options().
            backend_config={
                "client_resources": {
                    "num_cpus": cfg.engine.cpus_per_site,
                    "num_gpus": cfg.engine.gpus_per_site,
                    "max_restarts": -1,
                    "max_task_retries": 1,
                },
                "init_args": ray_init_args(cfg),
            },
        )
    finally:
        reap(ray_processes() - before)
    if errors:
        raise errors[0]
    if not results:
        raise RuntimeError("the Ray simulation ended without a result (see the log above)")
    return results[0]


def ray_address(cfg: ExperimentConfig) -> str:
    """The running cluster to join: engine.ray_address, else $RAY_ADDRESS; "" = start Ray here."""
    return cfg.engine.ray_address or os.environ.get("RAY_ADDRESS", "")


def ray_init_args(cfg: ExperimentConfig) -> dict[str, Any]:
    """ray.init's arguments. A running cluster refuses num_cpus/num_gpus (its nodes declared
    them), so only a Ray started here is sized, by engine.ray_cpus. Without an address, "local":
    ray.init would otherwise join the cluster `ray start` last recorded on this machine
    (/tmp/ray/ray_current_cluster), even one that has stopped since."""
    args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    address = ray_address(cfg)
    if address:
        return {**args, "address": address}
    return {**args, "address": "local", "num_cpus": cfg.engine.ray_cpus or os.cpu_count() or 1}


def ray_processes() -> set[int]:
    """PIDs of Ray processes (workers, raylet, GCS) in this process group, from /proc."""
    pids = set()
    me, group = os.getpid(), os.getpgrp()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            if pid == me or os.getpgid(pid) != group:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            pids.add(pid)
    return pids


def reap(pids: set[int], grace_s: float = 5.0) -> None:
    """Ray's shutdown can leave a worker that is still starting (measured: an actor alive 4
    minutes after run_simulation returned); no Ray process may outlive a run."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = set()
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.add(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                try:
                    if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                        alive.discard(pid)  # a zombie: dead, waiting for its parent
                        continue
                    os.kill(pid, 0)
                except (ProcessLookupError, FileNotFoundError):
                    alive.discard(pid)
            time.sleep(0.2)
        pids = alive
        if not pids:
            return
