"""Deployment overhead: a round of 3 TLS SuperNodes on loopback against the same round under Ray.

Workload: `multimed-fl deploy demo --sites 3` (site-local mode, one long-lived ClientApp worker
per SuperNode), with the SuperLink's state in its SQLite database (as the multi-host guide runs
it; a restart keeps nodes and runs) and in memory (`deploy demo --in-memory`), and the Ray engine
on the same sites' corpora (`sites.planner=site_local`), at the default model size and at smoke
size (--quick: smoke only), R rounds. Measured side by side in one run, interleaved:
  round time after start-up = (train + aggregate + evaluate seconds of the round loop) / R, from
  each run's summary.json timing (round 0's evaluation of the initial model included; the
  handshake, the statistics round and, for the deployment, the SuperLink, SuperNodes and
  ServerApp start-up excluded)
  deployment round / Ray round                            target <= 1.5
for the deployment as it runs (a training site scores the model it receives in its train
message, engine.evaluate_with_train; the SuperLink is flower_services' `superlink`, message
objects in memory under its SQLite state) and, with a database, as it ran before both (evaluation
in an exchange of its own, engine.evaluate_with_train=false, under Flower's own
`flower-superlink`); and, from the ClientApp workers' logs (database runs, both ways), every
message's pull / app / push seconds.
The per-message floor is Flower's path: the ServerApp pushes the message to the SuperLink, a
SuperNode polling every 0.2 s (Flower's 3 s, shortened) pulls it and its objects, its ClientApp
process pulls them from the SuperNode, and the reply goes back the same way; each hop is an
HTTP call (TLS to the SuperLink) and, with a database, SQLite writes in the SuperLink.

    python experiments/bench/deployment.py [--quick] [--rounds R] [--repeats N] [--out results.json]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federated.app.bench import write_result

MESSAGE = re.compile(r"(\w+) message: completed in ([\d.]+) s \(pull ([\d.]+) s, app ([\d.]+) s, push ([\d.]+) s\)")


def round_seconds(summary: dict[str, Any]) -> float:
    """Seconds per round after start-up, from the summary's timing: the round loop's seconds (round
    0's evaluation of the initial model included: a deployment scores it in round 1's exchange,
    engine.evaluate_with_train) over the rounds."""
    t = summary["timing"]
    return (t["train_s"] + t["aggregate_s"] + t["evaluate_s"]) / int(summary["rounds_completed"])


def message_times(logs: Path) -> dict[str, dict[str, float]]:
    """kind -> median total/pull/app/push seconds over every worker's messages (query excluded)."""
    rows: dict[str, list[tuple[float, ...]]] = {}
    for log in sorted(logs.glob("clientapp-*.log")):
        for kind, *values in MESSAGE.findall(log.read_text()):
            rows.setdefault(kind, []).append(tuple(float(v) for v in values))
    return {
        kind: {k: statistics.median(v[i] for v in vs) for i, k in enumerate(("total", "pull", "app", "push"))}
        for kind, vs in rows.items()
        if kind != "query"
    }


def deployed(
    out: Path, overrides: list[str], database: bool, flower_superlink: bool = False
) -> tuple[dict[str, Any], Path]:
    from federated.engines.deployment import deploy_demo

    result = deploy_demo(
        3,
        out,
        overrides,
        say=lambda line: None,
        timeout_s=1800,
        grace_s=5,
        superlink_database=database,
        flower_superlink=flower_superlink,
    )
    return result.summary, out / "deploy"


def ray_run(sites: Path, out: Path, config_yaml: str) -> dict[str, Any]:
    import dataclasses

    from federated.app.runner import run_experiment
    from federated.core.config import config_from_yaml

    cfg = config_from_yaml(config_yaml)
    cfg = dataclasses.replace(
        cfg,
        corpus=dataclasses.replace(cfg.corpus, site_corpora=str(sites)),
        engine=dataclasses.replace(cfg.engine, name="ray", expected_sites=0),
    )
    return run_experiment(cfg, out, progress=False).to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size only, 1 repeat")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = {"smoke": ["scale=smoke"]} if args.quick else {"default": [], "smoke": ["scale=smoke"]}
    repeats = 1 if args.quick else args.repeats
    report: dict[str, Any] = {"rounds": args.rounds, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for size, extra in sizes.items():
            overrides = [*extra, f"rounds={args.rounds}"]
            dep_rounds, mem_rounds, sep_rounds, ray_rounds, messages, before = [], [], [], [], [], []
            for r in range(repeats):
                summary, deploy = deployed(Path(tmp) / f"{size}-dep-{r}", overrides, database=True)
                in_memory, _ = deployed(Path(tmp) / f"{size}-mem-{r}", overrides, database=False)
                separate, separate_deploy = deployed(
                    Path(tmp) / f"{size}-sep-{r}",
                    [*overrides, "engine.evaluate_with_train=false"],
                    database=True,
                    flower_superlink=True,
                )
                config_yaml = (Path(tmp) / f"{size}-dep-{r}" / "config.yaml").read_text()
                ray = ray_run(deploy / "sites", Path(tmp) / f"{size}-ray-{r}", config_yaml)
                dep_rounds.append(round_seconds(summary))
                mem_rounds.append(round_seconds(in_memory))
                sep_rounds.append(round_seconds(separate))
                ray_rounds.append(round_seconds(ray))
                messages.append(message_times(deploy / "logs"))
                before.append(message_times(separate_deploy / "logs"))
            dep, mem, sep, ray_s = (statistics.median(x) for x in (dep_rounds, mem_rounds, sep_rounds, ray_rounds))
            report["sizes"][size] = {
                "deployment_round_s": dep_rounds,
                "deployment_in_memory_round_s": mem_rounds,
                "deployment_before_round_s": sep_rounds,
                "ray_round_s": ray_rounds,
                "ratio": dep / ray_s,
                "ratio_in_memory": mem / ray_s,
                "ratio_before": sep / ray_s,
                "messages": messages[-1],
                "messages_before": before[-1],
            }
            per = ", ".join(
                f"{k} {v['total']:.2f} s (pull {v['pull']:.2f} / app {v['app']:.2f} / push {v['push']:.2f})"
                for k, v in messages[-1].items()
            )
            print(
                f"{size}: deployed round {dep:.2f} s (SuperLink state in memory: {mem:.2f} s; before, evaluation "
                f"in its own exchange under Flower's own SuperLink: {sep:.2f} s), Ray round {ray_s:.2f} s, ratio "
                f"{dep / ray_s:.2f} (in memory {mem / ray_s:.2f}, before {sep / ray_s:.2f}; target <= 1.5); "
                f"per message (median): {per}"
            )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
