"""A real Flower deployment on this machine: SuperLink with TLS and SuperNode authentication,
one SuperNode per site, the experiment submitted with `flwr run` (`multimed-fl deploy demo`).

A package so that each part can be read on its own; every name is importable from here, as
it was from the single module this package replaced:

- `environment`: `DeploymentError`, the environment of Flower processes (`flower_env`,
  `check_binaries`) and TCP ports (`free_port`, `check_port_free`).
- `processes`: `ManagedProcess`, a child process with its log file, started in its own
  session, stopped with SIGTERM by PID, then SIGKILL after a grace period, together with
  every descendant it spawned (the SuperLink's SuperExec and ServerApp, a SuperNode's
  SuperExec and ClientApps); `stop_all`, `pid_alive`, `sigterm_as_interrupt`.
- `federation`: `LoopbackFederation`, a context manager owning a demo PKI, a private
  FLWR_HOME, the SuperLink, SuperNodes and their ClientApp workers; leaving it stops all of them.
- `flwr_cli`: `FlwrCli`, the `flwr` CLI against one connection (register, submit, wait, log).
- `submit`: `submit_and_wait` (`multimed-fl deploy submit`), a run on a running SuperLink,
  waited for; the run config file and the app folder it needs.
- `demo`: `deploy_demo`, the whole demo flow, and what it needs from the app folder.
- `clientapp_worker`: the long-lived ClientApp process (why, and what it saves: its docstring).
  It runs as a script by path, importing nothing of the project; `python -m
  federated.engines.deployment clientapp-worker ...` (`__main__.py`) restarts as that script.
- `flower_services`: `flower-superlink` and `flower-supernode` as we run them, with what Flower
  1.42 hard-codes set for a deployment (the SuperNode's timers; the SuperLink's SQLite state
  with message objects, node keys, running runs and byte counts in memory and its token sweep at
  most once a second); a script too
  (`python -m federated.engines.deployment superlink|supernode -- FLOWER-ARGS`). Every change to
  Flower goes through federated/core/flower_door; with MULTIMED_FL_STOCK_FLOWER=1 (or
  `deploy_demo(..., stock_flower=True)`) none is made and Flower's own binaries run.
"""

from __future__ import annotations

from federated.engines.deployment.clientapp_worker import (
    WORKER_PRELOAD,
    _pull_task_input,
    _run_clientapp_task,
    clientapp_worker,
    main,
    venv_bin,
    worker_argv,
)
from federated.engines.deployment.demo import (
    MAX_SITES,
    DemoResult,
    _check_out_dir,
    demo_overrides,
    deploy_demo,
)
from federated.engines.deployment.environment import (
    FLOWER_BINARIES,
    HOST,
    DeploymentError,
    _port_open,
    check_binaries,
    check_port_free,
    flower_env,
    free_port,
)
from federated.engines.deployment.federation import (
    CLIENTAPP_MODES,
    CONNECTION,
    LoopbackFederation,
    SuperNodeHandle,
    node_config_string,
)
from federated.engines.deployment.flwr_cli import FlwrCli, RunResult
from federated.engines.deployment.processes import (
    _ANSI,
    ManagedProcess,
    _descendants,
    _die_with_parent,
    _proc_stat,
    pid_alive,
    sigterm_as_interrupt,
    stop_all,
)
from federated.engines.deployment.submit import app_dir, run_config_toml, submit_and_wait

__all__ = [
    "CLIENTAPP_MODES",
    # federation
    "CONNECTION",
    "FLOWER_BINARIES",
    # environment
    "HOST",
    # demo
    "MAX_SITES",
    "WORKER_PRELOAD",
    # processes
    "_ANSI",
    "DemoResult",
    "DeploymentError",
    "FlwrCli",
    "LoopbackFederation",
    "ManagedProcess",
    "RunResult",
    "SuperNodeHandle",
    "_check_out_dir",
    "_descendants",
    "_die_with_parent",
    "_port_open",
    "_proc_stat",
    "_pull_task_input",
    "_run_clientapp_task",
    "app_dir",
    "check_binaries",
    "check_port_free",
    # the ClientApp worker
    "clientapp_worker",
    "demo_overrides",
    "deploy_demo",
    "flower_env",
    "free_port",
    "main",
    "node_config_string",
    "pid_alive",
    "run_config_toml",
    "sigterm_as_interrupt",
    "stop_all",
    "submit_and_wait",
    "venv_bin",
    "worker_argv",
]
