"""`multimed-fl stats`: profile the sites before training (federated/app/stats.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from federated.app.commands import Subparsers
from federated.core.config import load_config


def add_parser(sub: Subparsers) -> None:
    stats = sub.add_parser(
        "stats",
        help="profile the sites before training (counts, label mix, missingness, quantiles, histograms; "
        "small cells suppressed): stats.json, report.md and plots in --out",
    )
    stats.add_argument("--out", required=True, help="output folder (with --connection: on the SuperLink's machine)")
    stats.add_argument("--overwrite", action="store_true", help="replace an earlier profile in --out")
    stats.add_argument(
        "--connection",
        help="a [superlink.NAME] connection in $FLWR_HOME/config.toml: run the profile on that deployment "
        "(a statistics-only run), not in simulation",
    )
    stats.add_argument("--timeout", type=float, default=3600.0, help="with --connection: seconds to wait for the run")
    stats.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, as for run (corpus.path, sites.planner...)"
    )
    stats.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    """A federated pre-flight profile of the sites (federated/app/stats.py), in simulation or, with
    --connection, as a statistics-only run on a running SuperLink."""
    from federated.app.runner import RunError
    from federated.app.stats import run_stats, submit_stats, summary_lines

    cfg = load_config(args.overrides)
    out = Path(args.out)
    if not args.connection:
        for line in summary_lines(run_stats(cfg, out, overwrite=args.overwrite), out):
            print(line)
        return 0
    if args.overwrite:
        raise RunError("stats --connection: the ServerApp never replaces a profile; choose a new --out")
    completed = submit_stats(
        args.connection, args.out, cfg, timeout_s=args.timeout, say=lambda line: print(f"[stats] {line}", flush=True)
    )
    if not completed:
        return 1
    if (out / "stats.json").is_file():
        import json

        for line in summary_lines(json.loads((out / "stats.json").read_text()), out):
            print(line)
    else:  # the ServerApp ran on another machine
        print(f"[stats] completed; the profile is in {args.out} on the SuperLink's machine")
    return 0
