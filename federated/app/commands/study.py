"""`multimed-fl study`: a grid of runs over seeds, and its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from federated.app.commands import Subparsers


def add_parser(sub: Subparsers) -> None:
    study = sub.add_parser("study", help="run a study (a grid of runs over seeds) and write its report")
    study.add_argument("name", help="a study in experiments/studies/ (e.g. leave_one_site_out) or a YAML path")
    study.add_argument("--out", required=True, help="output folder (an interrupted study resumes here)")
    study.add_argument("--quick", action="store_true", help="the study's small variant (minutes)")
    study.add_argument("--processes", type=int, default=None, help="runs in parallel (default: the study's, 2)")
    study.add_argument("overrides", nargs="*", help="key=value settings added to every run (e.g. corpus.path=DIR)")
    study.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from federated.app.studies.study import run_study

    df = run_study(args.name, Path(args.out), quick=args.quick, processes=args.processes, overrides=args.overrides)
    print((Path(args.out) / "summary.md").read_text(), end="")
    return 1 if df["error"].astype(bool).any() else 0
