"""`multimed-fl stats`: a federated pre-flight profile of the sites, before anyone trains.

    multimed-fl stats --out DIR [key=value ...]                       # simulation
    multimed-fl stats --connection NAME --out DIR [key=value ...]     # a running SuperLink

Per site and pooled: samples per task and split, the label mix of each classification task,
missingness per feature of every vector modality, and per feature its mean, SD, quantiles and
histogram; every count under preprocess.min_count suppressed, histograms sent only in cells of at
least that many values, a quantile shown only with that many values on each side; with
preprocess.epsilon > 0, DP noise (federated/server/profile_report.py). A deployed site holds the
request to its own floor (node config stats-min-count, stats-epsilon). Writes DIR/stats.json,
report.md, config.yaml and plots/.

In simulation the same ClientApp and profile flow run on the in-process grid, over the
config's corpus and plan (any planner; site-local mode over corpus.site_corpora): a profile
trains nothing, so there is nothing for Ray to parallelise and engine.name is not used. With
--connection the profile is submitted to a running SuperLink as a statistics-only run (run
config `statistics-only = true`), which its ServerApp runs and writes on its own machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from clients.client_app import app as client_app
from federated.core.config import ConfigError, ExperimentConfig, config_to_yaml
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, NUM_PARTITIONS_KEY, PARTITION_ID_KEY, STATISTICS_ONLY_KEY
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.engines.inprocess import InProcessGrid
from federated.server.profile import run_profile
from federated.server.profile_report import STATS_FILE, check_profile_dir, write_profile
from federated.server.run_folder import RunLock
from partitions import plan_sites
from partitions.site_local import SITE_LOCAL, plan_local_sites


def _sites(cfg: ExperimentConfig) -> tuple[str, list[str]]:
    """(the path the sites read, the plan's site names), refused as `multimed-fl run` refuses them."""
    if cfg.sites.planner == SITE_LOCAL:
        if not cfg.corpus.site_corpora:
            raise ConfigError(
                "sites.planner=site_local in simulation needs corpus.site_corpora (a folder with one corpus per "
                "site; `multimed-fl corpus split` makes one); over a deployment use --connection"
            )
        return str(cfg.corpus.site_corpora), [p.site for p, _ in plan_local_sites(cfg.corpus.site_corpora, cfg)]
    path = prepare_corpus(cfg.corpus)
    return str(path), [p.site for p in plan_sites(Corpus.open(path), cfg)]


def run_stats(
    cfg: ExperimentConfig, out_dir: str | Path, overwrite: bool = False, client: ClientApp | Any = client_app
) -> dict[str, Any]:
    """Profile the config's sites in simulation and write the profile to out_dir; returns stats.json's
    content. `client`: the ClientApp every site runs (a test wraps it to read every reply)."""
    out = Path(out_dir)
    with RunLock(out):
        check_profile_dir(out, overwrite)
        corpus_path, sites = _sites(cfg)
        run_config = {CONFIG_KEY: config_to_yaml(cfg), CORPUS_KEY: corpus_path}
        node_configs = [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: len(sites)} for i in range(len(sites))]
        grid = InProcessGrid(client, node_configs, run_config)
        profile = run_profile(grid, cfg, sites)
        return write_profile(out, profile, cfg, "inprocess")


def stats_run_config(config_yaml: str, out_dir: str) -> str:
    """The `flwr run --run-config` text of a statistics-only run: a training run's, plus the switch."""
    from federated.engines.deployment.submit import run_config_toml

    return run_config_toml(config_yaml, "", out_dir) + f"{STATISTICS_ONLY_KEY} = true\n"


def submit_stats(
    connection: str,
    out_dir: str,
    cfg: ExperimentConfig,
    timeout_s: float = 3600.0,
    poll_s: float = 5.0,
    say: Callable[[str], None] = lambda s: None,
) -> bool:
    """Submit a statistics-only run to the SuperLink of `connection` ($FLWR_HOME/config.toml), wait
    for it to end; True when it completed. out_dir is a path on the SuperLink's machine."""
    from federated.engines.deployment.submit import app_dir, user_flwr

    cli = user_flwr(connection)
    with tempfile.TemporaryDirectory(prefix="multimed-stats-") as tmp:
        run_config = Path(tmp) / "run_config.toml"
        run_config.write_text(stats_run_config(config_to_yaml(cfg), out_dir))
        run_id = cli.submit(app_dir(), run_config)
    say(f"submitted statistics-only run {run_id} to `{connection}`")
    done = (Path(out_dir) / STATS_FILE).exists
    result = cli.wait(
        run_id, timeout_s, on_status=lambda s: say(f"run {run_id}: {s}"), poll_s=poll_s, finished_hint=done
    )
    if not result.completed:
        tail = "\n".join(cli.run_log(run_id).strip().splitlines()[-15:])
        say(f"run {run_id} ended {result.status}: {result.details or 'no details'}\n{tail}")
    return result.completed


def summary_lines(stats: dict[str, Any], out_dir: Path) -> list[str]:
    """What the command prints: the sites, the pooled samples per task, where the rest is."""
    lines = [f"profile of {len(stats['sites'])} sites: {', '.join(s['site'] for s in stats['sites'])}"]
    for t, per in stats["samples"].items():
        lines.append(
            f"  {t}: {per['total']['pooled']} samples (train {per['train']['pooled']}, test {per['test']['pooled']})"
        )
    lines.append(f"  {stats['privacy']}")
    lines.append(f"wrote {out_dir / STATS_FILE}, {out_dir / 'report.md'} and {len(stats.get('plots', []))} plots")
    return lines
