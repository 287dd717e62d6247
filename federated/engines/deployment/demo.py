"""`multimed-fl deploy demo`: one experiment as a TLS + node-auth deployment on loopback,
from the config and site plan to the finished run's outputs, with every process stopped
before it returns; plus what that run needs from the app folder (the Flower app root, the
`flwr run --run-config` file, an output folder that `flwr run` will not pack)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federated.core import flower_door
from federated.core.config import config_to_yaml, load_config
from federated.core.config.checks import simulation_only_settings
from federated.core.config.schema import ExperimentConfig
from federated.core.protocol import CORPUS_KEY, SITE_KEY, SITE_STATE_DIR, STATE_DIR_KEY, Role
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.data.split import split_corpus
from federated.engines.deployment.environment import HOST, DeploymentError, check_binaries, check_port_free, flower_env
from federated.engines.deployment.federation import CLIENTAPP_MODES, LoopbackFederation
from federated.engines.deployment.flwr_cli import RunResult
from federated.engines.deployment.processes import sigterm_as_interrupt
from federated.engines.deployment.submit import app_dir, run_config_toml
from federated.server.run_folder import check_out_dir, fresh_setup_folder, record_outputs
from partitions import SitePlan, plan_sites
from partitions.site_local import SITE_LOCAL

MAX_SITES = 32


def _check_out_dir(out: Path, root: Path) -> None:
    """Outputs inside the app folder would be packed into the app bundle by `flwr run`
    unless .gitignore excludes them (flwr honours .gitignore)."""
    try:
        rel = out.relative_to(root)
    except ValueError:
        return
    import pathspec

    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    if not spec.match_file(f"{rel.as_posix()}/deploy/x.toml"):
        raise DeploymentError(
            f"--out {out} is inside the app folder {root} and not git-ignored, "
            "so `flwr run` would pack its files into the app bundle; use a folder "
            "under runs/ or outside the repository"
        )


# ------------------------------------------------------------------------------ the demo ----


def demo_overrides(n_sites: int, overrides: Sequence[str]) -> list[str]:
    """The user's overrides, plus a random-mix plan of n_sites (one held out) when they set
    no sites.* key, plus engine.expected_sites=n_sites."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    out = list(overrides)
    if not any(k == "sites" or k.startswith("sites.") for k in keys):
        out += [
            "sites.planner=random_mix",
            f"sites.n_sites={n_sites}",
            "sites.holdout=random",
            "sites.holdout_k=1",
            "sites.zero_shot=true",
        ]
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == "engine.expected_sites" and v.strip() != str(n_sites):
            raise DeploymentError(f"engine.expected_sites={v.strip()} contradicts --sites {n_sites}")
    if "engine.expected_sites" not in keys:
        out.append(f"engine.expected_sites={n_sites}")
    return out


@dataclass
class DemoResult:
    out_dir: Path
    run_id: str
    status: str
    summary: dict[str, Any]
    wall_s: float
    pids: dict[int, int]  # every process the demo started (pid -> start time)
    seconds: dict[str, float]


def deploy_demo(
    n_sites: int,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    clientapp: str | None = None,
    superlink_port: int = 0,
    timeout_s: float = 3600.0,
    say: Callable[[str], None] = print,
    grace_s: float = 10.0,
    superlink_database: bool = True,
    flower_superlink: bool = False,
    stock_flower: bool | None = None,
) -> DemoResult:
    """Run one experiment as a TLS + node-auth deployment on loopback; outputs go to out_dir,
    logs and keys to out_dir/deploy. Every process started is stopped before returning.
    clientapp: "worker" (our long-lived ClientApp process per SuperNode) or "subprocess"
    (Flower's flwr-clientapp per message); None: the worker, or under stock Flower Flower's own.
    superlink_database=False: the SuperLink keeps its state in memory (faster; a restarted
    SuperLink then knows no nodes and no runs). flower_superlink=True: Flower's own
    `flower-superlink`, without flower_services' lighter SQLite state (the bench's before).
    stock_flower=True (None: MULTIMED_FL_STOCK_FLOWER): Flower's own SuperLink and SuperNodes,
    nothing of Flower patched in any process of the run (what that loses is said first)."""
    t0 = time.perf_counter()
    stock = flower_door.stock_flower() if stock_flower is None else stock_flower
    clientapp = clientapp or ("subprocess" if stock else "worker")
    _check_demo_args(n_sites, clientapp, superlink_port)
    root = app_dir()
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, root)
    # what the ServerApp would refuse (a finished or interrupted run, a user's files, a link), before an
    # earlier attempt's deploy/ is deleted or anything is started
    check_out_dir(out, overwrite=False)
    check_binaries(flower_env(out / "deploy" / "flwr_home"))
    cfg, corpus_path, plans = _demo_plan(n_sites, overrides)
    say(f"site plan: {', '.join(f'{p.site} ({p.role})' for p in plans)}; corpus {corpus_path}")

    # a previous, unfinished attempt's keys and logs are stale: deleted if its manifest lists them
    deploy = fresh_setup_folder(out, "deploy")
    record_outputs(out, SITE_STATE_DIR)  # the sites' state-dir (below), listed before they write it
    site_folders = split_corpus(
        Corpus.open(corpus_path), {p.site: np.concatenate([p.train_rows, p.test_rows]) for p in plans}, deploy / "sites"
    )
    say(f"split the corpus into one folder per site under {deploy / 'sites'}: each SuperNode reads only its own")
    cfg = site_local_config(cfg, plans)
    run_config = deploy / "run_config.toml"
    run_config.write_text(run_config_toml(config_to_yaml(cfg), "", str(out)))

    seconds: dict[str, float] = {}
    fed = LoopbackFederation(
        deploy,
        n_sites,
        superlink_port=superlink_port,
        say=say,
        grace_s=grace_s,
        database=superlink_database,
        flower_superlink=flower_superlink,
        stock_flower=stock,
    )
    if stock:
        say(stock_flower_note(clientapp))
    try:
        with sigterm_as_interrupt():
            fed.start_superlink()
            seconds["superlink_s"] = time.perf_counter() - t0
            _start_sites(fed, plans, site_folders, out, clientapp, say)
            seconds["nodes_online_s"] = time.perf_counter() - t0
            run_id, result = _run_to_completion(fed, root, run_config, deploy, timeout_s, seconds, say)
    finally:
        fed.close()
    summary = _read_summary(out, run_id, deploy)
    wall = time.perf_counter() - t0
    say(
        f"timing: SuperLink up at {seconds['superlink_s']:.0f} s, {n_sites} SuperNodes online at "
        f"{seconds['nodes_online_s']:.0f} s, run {seconds['run_s']:.0f} s, total {wall:.0f} s"
    )
    say(f"outputs in {out} (summary.json, metrics.parquet, config.yaml, tensorboard/); logs and keys in {deploy}")
    return DemoResult(out, run_id, result.status, summary, wall, fed.started_pids(), seconds)


def stock_flower_note(clientapp: str) -> str:
    """What a deployment on stock Flower runs, and what it does without the framework's changes
    to Flower (flower_door.WHAT_STOCK_LOSES)."""
    apps = "Flower's flwr-clientapp, one process per message" if clientapp == "subprocess" else "our ClientApp worker"
    lost = "; ".join(f"{group}: {what}" for group, what in flower_door.WHAT_STOCK_LOSES.items())
    return (
        f"stock Flower ({flower_door.STOCK_FLOWER_ENV}=1): flower-superlink and flower-supernode as shipped, "
        f"ClientApps in {apps}, nothing of Flower patched in any process. Without the framework's changes, "
        f"slower and less told: {lost}"
    )


def _check_demo_args(n_sites: int, clientapp: str, superlink_port: int) -> None:
    """Refuse bad arguments before anything is built or started, naming the option."""
    if not 1 <= n_sites <= MAX_SITES:
        raise DeploymentError(
            f"--sites must be between 1 and {MAX_SITES} (got {n_sites}): "
            "each site is a SuperNode process on this machine"
        )
    if clientapp not in CLIENTAPP_MODES:
        raise DeploymentError(f"--clientapp must be one of {', '.join(CLIENTAPP_MODES)} (got {clientapp!r})")
    if superlink_port:
        check_port_free(HOST, superlink_port, "SuperLink")


def _demo_plan(n_sites: int, overrides: Sequence[str]) -> tuple[ExperimentConfig, Path, list[SitePlan]]:
    """(config, corpus path, site plans) of the demo: one SuperNode per planned site, so their counts must agree."""
    cfg = load_config(demo_overrides(n_sites, overrides))
    corpus_path = Path(prepare_corpus(cfg.corpus)).resolve()
    plans = plan_sites(Corpus.open(corpus_path), cfg)
    if len(plans) != n_sites:
        raise DeploymentError(
            f"the site plan has {len(plans)} sites ({', '.join(p.site for p in plans)}) "
            f"but --sites is {n_sites}; make the plan's sites match (e.g. "
            f"sites.n_sites={n_sites} with sites.planner=random_mix)"
        )
    return cfg, corpus_path, plans


def site_local_config(cfg: ExperimentConfig, plans: Sequence[SitePlan]) -> ExperimentConfig:
    """The demo's experiment as the coordinator of real hospitals states it: each site is its own
    corpus folder (sites.planner=site_local), the plan's held-out sites held out by name."""
    reshaping = simulation_only_settings(cfg)
    if reshaping:
        raise DeploymentError(
            f"{', '.join(reshaping)} reshape a simulated site's data; the demo's sites each hold their own "
            "rows as stored (site-local mode), so these settings cannot apply"
        )
    held = [p.site for p in plans if p.role == Role.HELD_OUT]
    sites = dataclasses.replace(
        cfg.sites, planner=SITE_LOCAL, holdout="named" if held else "listed", holdout_sites=held
    )
    return dataclasses.replace(cfg, sites=sites)


def _start_sites(
    fed: LoopbackFederation,
    plans: Sequence[Any],
    site_folders: dict[str, Path],
    out: Path,
    clientapp: str,
    say: Callable[[str], None],
) -> None:
    """Register every site's key, start its SuperNode on its own corpus folder and wait until all are online."""
    for plan, key in zip(plans, fed.pki.nodes, strict=True):
        fed.register(key, plan.site)
    for plan, key in zip(plans, fed.pki.nodes, strict=True):  # state-dir: as `multimed-fl run` lays it out
        node_config = {
            SITE_KEY: plan.site,
            CORPUS_KEY: str(site_folders[plan.site]),
            STATE_DIR_KEY: str(out / SITE_STATE_DIR),
        }
        fed.start_supernode(plan.site, key, node_config, clientapp=clientapp)
    fed.wait_online(len(plans))
    processes = (
        "one long-lived ClientApp process each" if clientapp == "worker" else "one ClientApp process per message"
    )
    say(f"{len(plans)} SuperNodes online ({processes})")


def _run_to_completion(
    fed: LoopbackFederation,
    root: Path,
    run_config: Path,
    deploy: Path,
    timeout_s: float,
    seconds: dict[str, float],
    say: Callable[[str], None],
) -> tuple[str, RunResult]:
    """Submit the run and wait for it; a run that did not complete fails with its status and logs."""
    run_id = fed.submit(root, run_config)
    t_submit = time.perf_counter()
    say(f"submitted run {run_id}")
    result = fed.wait_run(  # the ServerApp writes summary.json last: then ask Flower how the run ended
        run_id,
        timeout_s,
        on_status=lambda s: say(f"run {run_id}: {s}"),
        poll_s=30.0,
        finished_hint=(deploy.parent / "summary.json").exists,
    )
    seconds["run_s"] = time.perf_counter() - t_submit
    fed.save_run_log(run_id, deploy / "logs" / "run.log")
    if result.status != "finished:completed":
        raise DeploymentError(
            f"run {run_id} ended {result.status}: {result.details or 'no details'} (logs: {deploy / 'logs'})"
        )
    info = result.info
    for k in ("elapsed", "compute-time", "network-traffic"):
        if k in info:
            say(f"run {run_id} {k}: {info[k]}")
    return run_id, result


def _read_summary(out: Path, run_id: str, deploy: Path) -> dict[str, Any]:
    """The finished run's summary.json; flwr reports success even when the ServerApp wrote nothing."""
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise DeploymentError(f"run {run_id} completed but wrote no {summary_path} (logs: {deploy / 'logs'})")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
