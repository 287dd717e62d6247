"""`multimed-fl run`: one federated experiment, its outputs written to --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from federated.app.commands import Subparsers
from federated.core.config import load_config


def add_parser(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="run one federated experiment and write its outputs to --out")
    run.add_argument("--out", help="output folder")
    run.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (engine.checkpoint_every)"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="run in an --out that holds an earlier run or other files: the earlier run's files are replaced, "
        "files multimed-fl did not write are left untouched",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides: group=name (e.g. scale=smoke) or a.b=value"
    )
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from federated.app.runner import RunError, run_experiment
    from federated.core.config import config_from_yaml
    from federated.server.outputs import exit_code, print_report

    console = Console()
    if args.resume:
        if args.overrides or args.out:
            raise RunError(
                "--resume DIR continues the run in DIR with its own config.yaml; "
                "give neither --out nor key=value overrides"
            )
        out, cfg = args.resume, None
    elif not args.out:
        raise RunError("run needs --out DIR (or --resume DIR to continue a checkpointed run)")
    else:
        out, cfg = args.out, load_config(args.overrides)
    summary = run_experiment(
        cfg,
        out,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        console=Console(stderr=True),
        resume=bool(args.resume),
    )
    print_report(summary, Path(out), console)
    if cfg is None:  # resumed: the run's own config decides
        cfg = config_from_yaml((Path(out) / "config.yaml").read_text())
    code = exit_code(summary, cfg.engine.allow_site_failures)
    if code:
        console.print(
            f"exit code {code}: the summary is written, but its scores miss what is listed above "
            "(engine.allow_site_failures=true accepts that)",
            markup=False,
        )
    return code
